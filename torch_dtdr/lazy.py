"""``torch_dtdr.open``: lazy, per-tensor access in the shape of safetensors' ``safe_open``."""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch

from . import tree
from .decoding import Decoder, load_from_reader, place
from .errors import DamageWarning
from .format.reader import ContainerReader
from .report import Report
from .storage import open_source


class DTDRFile:
    """An open DTDR file. Reads only the byte ranges a call needs.

    Use as a context manager::

        with torch_dtdr.open("model.dtdr") as f:
            for name in f.keys():
                t = f.get_tensor(name)
    """

    def __init__(self, f, *, device=None, errors: str = "recover", storage_options: Mapping | None = None,
                 max_workers: int | None = None):
        self._source = open_source(f, storage_options, max_workers=max_workers)
        try:
            self._reader = ContainerReader(self._source)
        except BaseException:
            self._source.close()
            raise
        self._device = device
        self._errors = errors
        self._decoder = Decoder(self._reader, errors)
        skeleton = self._reader.index.tree
        self._refs = tree.tensor_refs(skeleton, len(self._reader.tensors))
        self._devices = tree.entry_devices(skeleton, len(self._reader.tensors))
        self._builder = tree.Builder(skeleton, self._entry)
        self._planned: dict[int, int] = {}  # stored tensor -> active prefetches covering it
        self._plan_lock = threading.Lock()

    # context manager -------------------------------------------------------
    def __enter__(self) -> "DTDRFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    # safetensors-shaped API ---------------------------------------------------
    def keys(self) -> list[str]:
        """Names of the tensors, as paths in the saved object (``"model.layer.0.weight"``)."""
        return list(self._refs)

    def metadata(self) -> dict[str, str]:
        """The ``metadata`` mapping given to :func:`torch_dtdr.save`."""
        return dict(self._reader.index.metadata)

    def get_tensor(self, name: str) -> torch.Tensor | None:
        """Decode one tensor (reading only its byte ranges). None if it is lost."""
        try:
            i = self._refs[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self._reader.name}") from None
        return self._builder.tensor_at(i)

    @contextlib.contextmanager
    def prefetch(self, names: Iterable[str] | None = None) -> Iterator[None]:
        """Fetch the data of ``names`` (default: every tensor) ahead, in that
        order, while the block runs ``get_tensor`` on them: on a remote store
        one planned download in large concurrent parts instead of a round trip
        per tensor. Memory stays bounded by the prefetch window. ::

            with f.prefetch(wanted):
                weights = {k: f.get_tensor(k) for k in wanted}
        """
        names = self.keys() if names is None else list(names)
        entries: list[int] = []
        for name in names:
            try:
                i = self._refs[name]
            except KeyError:
                raise KeyError(f"no tensor named {name!r} in {self._reader.name}") from None
            e = self._builder.tables.records[i][0]
            if e not in entries:
                entries.append(e)
        with self._plan_lock:
            for e in entries:
                self._planned[e] = self._planned.get(e, 0) + 1
        try:
            with self._reader.prefetch(rec for e in entries for rec in self._reader.tensors[e].records):
                yield
        finally:
            with self._plan_lock:
                for e in entries:
                    self._planned[e] -= 1
                    if not self._planned[e]:
                        del self._planned[e]

    def release(self) -> None:
        """Forget the tensors decoded so far (they are cached so that tensors
        sharing storage come back sharing it); frees memory between reads."""
        self._builder.loaded.clear()
        self._builder.built.clear()

    def codec(self, name: str) -> str:
        """Name of the codec that stored tensor ``name``."""
        entry = self._builder.tables.records[self._refs[name]][0]
        return self._reader.tensors[entry].codec.get("name", "?")

    def load(self, map_location=None) -> Any:
        """The whole saved object, like :func:`torch_dtdr.load`."""
        obj, _rep = load_from_reader(self._reader, map_location or self._device, self._errors)
        return obj

    def report(self) -> Report:
        """What the tensors read so far looked like (see :func:`torch_dtdr.verify`)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            return self._decoder.finish()

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from storage so far (proof of laziness)."""
        return self._source.bytes_read

    def _entry(self, i: int) -> torch.Tensor | None:
        with self._plan_lock:
            planned = i in self._planned
        with contextlib.nullcontext() if planned else self._reader.prefetch(self._reader.tensors[i].records):
            t = self._decoder.tensor(i)
        if t is None:
            return None
        return place(t, self._device, self._devices[i], self._reader.name, self._reader.tensors[i].name)



def open(f, *, device=None, errors: str = "recover", storage_options: Mapping | None = None,  # noqa: A001
         max_workers: int | None = None) -> DTDRFile:
    """Open a DTDR file for lazy reading: ``keys()``, ``get_tensor(name)``, ``metadata()``.

    ``max_workers`` bounds the concurrent range requests to a remote store."""
    return DTDRFile(f, device=device, errors=errors, storage_options=storage_options, max_workers=max_workers)

