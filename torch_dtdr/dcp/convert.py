"""Converting between a DCP checkpoint folder and one DTDR file.

:func:`dcp_to_dtdr` gathers a checkpoint of any number of ranks (written by
``DTDRWriter``, or, trusted, by DCP's own writers) into one DTDR file;
:func:`dtdr_to_dcp` writes a DTDR file's state dict as a single-rank
checkpoint that any number of ranks can load, resharded by DCP. Both run
in one process and import ``torch.distributed.checkpoint`` when called.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import FormatError, IntegrityError
from ..report import LOST
from ..storage import is_url, listdir
from .metadata import METADATA_NAMES, norm_path

__all__ = ["dcp_to_dtdr", "dtdr_to_dcp"]


def _set_element(root: dict, path, value) -> None:
    """Put ``value`` at ``path`` (DCP's object path: str keys, int list indices)."""
    cur = root
    for i in range(1, len(path)):
        prev, key = path[i - 1], path[i]
        default = {} if type(key) is str else []
        if isinstance(cur, dict):
            cur = cur.setdefault(prev, default)
        else:
            while len(cur) <= prev:
                cur.append(None)
            if cur[prev] is None:
                cur[prev] = default
            cur = cur[prev]
    key = path[-1]
    if type(key) is int:
        while len(cur) <= key:
            cur.append(None)
    cur[key] = value


def _full_state_dict_planner(weights_only: bool):
    """A DCP load planner that rebuilds the whole saved state dict from the
    metadata (like DCP's ``_EmptyStateDictLoadPlanner``), unpickling byte items
    with ``torch.load(weights_only=weights_only)``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class _FullStateDictPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            if state_dict:
                raise ValueError("the state dict to fill must start empty")
            pd = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
            for k, v in metadata.state_dict_metadata.items():
                if isinstance(v, TensorStorageMetadata):
                    v = torch.empty(v.size, dtype=v.properties.dtype)
                if k in pd:
                    _set_element(state_dict, pd[k], v)
                else:
                    state_dict[k] = v
            super().set_up_planner(state_dict, metadata, is_coordinator)

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=weights_only)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                _set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _FullStateDictPlanner()


class _unwrapped:
    """Re-raise the one failure inside DCP's CheckpointException (a BaseException
    wrapping per-rank errors) as itself: a single-process conversion has one rank."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        failures = getattr(exc, "failures", None) if exc is not None else None
        if isinstance(failures, dict) and len(failures) == 1:
            inner = next(iter(failures.values()))
            inner = inner[0] if isinstance(inner, tuple) and inner else inner
            if isinstance(inner, Exception):
                raise inner from None
        return False


def _dcp_reader_for(base: str, storage_options, errors: str, allow_pickle: bool):
    names = listdir(base, storage_options)
    if any(n in METADATA_NAMES for n in names) or not any(n == ".metadata" for n in names):
        from .reader import DTDRReader

        return DTDRReader(base, errors=errors, storage_options=storage_options, allow_pickle=allow_pickle)
    # a checkpoint of DCP's own FileSystemWriter: pickled metadata, torch.save shards
    if not allow_pickle:
        raise FormatError("this is a standard DCP checkpoint: its .metadata is a pickle, which can run code "
                          "when loaded. Pass allow_pickle=True (dtdr dcp-convert --allow-pickle) if you trust it",
                          file=base)
    if is_url(base):
        try:
            from torch.distributed.checkpoint import FsspecReader
        except ImportError:  # pragma: no cover - exported from the package only in some releases
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(base, **(storage_options or {}))
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(base)


def dcp_to_dtdr(dcp_dir, out, *, codec="dtdr", block_size: int | None = None, parity="default",
                errors: str = "strict", allow_pickle: bool = False, storage_options: Mapping | None = None,
                out_storage_options: Mapping | None = None, progress: bool = False) -> None:
    """Gather a DCP checkpoint (any number of ranks) into one DTDR file, e.g.
    for serving. Runs in one process and holds the whole state dict in memory.

    ``dcp_dir`` is a checkpoint written by :class:`DTDRWriter`, or, with
    ``allow_pickle=True``, one written by DCP's own ``FileSystemWriter`` /
    ``FsspecWriter`` (whose metadata is a pickle). Non-tensor values come back
    with ``torch.load(weights_only=True)`` unless ``allow_pickle``. The output
    holds the nested state dict as it was saved (``{"model": {...}, "optim":
    {...}}``), written by :func:`torch_dtdr.save` with ``codec`` and ``parity``.
    ``errors="strict"`` (default) refuses a checkpoint that is not bit-exact
    after repair; ``"recover"`` converts what can be recovered (with a
    DamageWarning; a lost tensor always fails). ``progress=True`` shows a
    bar of the bytes encoded into the DTDR file (on a terminal only).
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from ..api import save

    reader = _dcp_reader_for(norm_path(dcp_dir), storage_options, errors, allow_pickle)
    reader.read_metadata()  # fail early, with our own error, on an incomplete checkpoint
    sd: dict = {}
    with _unwrapped():
        _load_state_dict(sd, storage_reader=reader, planner=_full_state_dict_planner(not allow_pickle), no_dist=True)
    save(sd, out, codec=codec, block_size=block_size, parity=parity, storage_options=out_storage_options,
         progress=progress)


def dtdr_to_dcp(src, dcp_dir, *, codec="dtdr", block_size: int | None = None, parity="default",
                errors: str = "strict", storage_options: Mapping | None = None,
                out_storage_options: Mapping | None = None, progress: bool = False) -> None:
    """Write the state dict in DTDR file ``src`` as a (single-rank) DCP
    checkpoint in ``dcp_dir`` with :class:`DTDRWriter`; any number of ranks can
    then load it with :class:`DTDRReader`, resharded by DCP. The file must hold
    a dict with string keys (a state dict). ``errors`` as in
    :func:`dcp_to_dtdr`; lost tensors raise IntegrityError. ``progress=True``
    shows a bar of the stored bytes decoded, then one of the bytes encoded
    into the checkpoint (on a terminal only)."""
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    from ..decoding import load_file as load

    obj, rep = load(src, errors=errors, storage_options=storage_options, report=True, progress=progress)
    lost = [t.name for t in rep.tensors if t.status == LOST]
    if lost:
        raise IntegrityError(f"{len(lost)} tensor(s) are lost; cannot convert", file=str(src), tensor=lost[0])
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise TypeError(f"DCP saves a dict with str keys; {src} holds {type(obj).__name__}")
    from .writer import DTDRWriter

    writer = DTDRWriter(dcp_dir, codec=codec, block_size=block_size, parity=parity,
                        storage_options=out_storage_options, progress=progress)
    with _unwrapped():
        _save_state_dict(obj, storage_writer=writer, no_dist=True)
