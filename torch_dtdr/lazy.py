"""``torch_dtdr.open``: lazy, per-tensor access in the shape of safetensors' ``safe_open``."""

from __future__ import annotations

import bisect
import contextlib
import threading
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch

from . import codecs, slicing, tree
from .codecs.base import Damage
from .decoding import DEFAULT_WORKERS, Decoder, check_workers, load_from_reader, place
from .errors import DamageWarning, FormatError, IntegrityError, warn_caller
from .format.reader import ContainerReader
from .report import DEGRADED, EXACT, LOST, REPAIRED, Report, worst
from .storage import open_source

#: dtype names as safetensors' ``get_dtype()`` gives them
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
    **{getattr(torch, n): code for n, code in [("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                                               ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")]
       if isinstance(getattr(torch, n, None), torch.dtype)},
}


#: A slice decodes the units that hold it (blocks, or ``dtdr`` residual frames) in at most this many
#: separate ranges per segment (each a few reads); beyond that, or past half the segment, the segment
#: is decoded whole.
MAX_UNIT_SPANS = 64


def _contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return strides[::-1]


class DTDRFile:
    """An open DTDR file. Reads only the byte ranges a call needs.

    Use as a context manager, as safetensors' ``safe_open``::

        with torch_dtdr.open("model.dtdr") as f:
            for name in f.keys():
                t = f.get_tensor(name)
            rows = f.get_slice("embed.weight")[:1000]   # reads only those rows
            some = f.get_tensors(["a.weight", "a.bias"])  # one planned read
    """

    def __init__(self, f, *, device=None, errors: str = "recover", storage_options: Mapping | None = None,
                 max_workers: int | None = None, warn_damage: bool = True, workers: int | None = None):
        check_workers(workers)
        self._workers = workers or DEFAULT_WORKERS
        self._warn_damage = warn_damage
        self._source = open_source(f, storage_options, max_workers=max_workers)
        try:
            self._reader = ContainerReader(self._source)
        except BaseException:
            self._source.close()
            raise
        self._device = device
        self._errors = errors
        self._decoder = Decoder(self._reader, errors, workers=self._workers)
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

    def holds_mapping(self) -> bool:
        """Whether the saved object is a mapping (as a state dict is), not a list or a tensor."""
        return tree.root_is_mapping(self._reader.index.tree)

    def metadata(self) -> dict[str, str]:
        """The ``metadata`` mapping given to :func:`torch_dtdr.save`."""
        return dict(self._reader.index.metadata)

    def get_tensor(self, name: str) -> torch.Tensor | None:
        """Decode one tensor (reading only its byte ranges). None if it is lost."""
        try:
            i = self._refs[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self._reader.name}") from None
        tensor = self._builder.tensor_at(i)
        self._warn_if_damaged([self._builder.tables.records[i][0]])
        return tensor

    def get_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor | None]:
        """``{name: get_tensor(name)}`` for ``names``, fetched in one planned
        read (see :meth:`prefetch`): on a remote store, concurrent large parts
        instead of a round trip per tensor."""
        names = list(names)
        with self.prefetch(names):
            return {name: self.get_tensor(name) for name in names}

    def get_slice(self, name: str) -> "TensorSlice":
        """A handle on tensor ``name`` that reads nothing until indexed:
        ``get_shape()``, ``get_dtype()`` (safetensors' names, ``"F32"``) and
        ``[...]`` with ints, slices (positive steps) and ``...``, as
        safetensors' ``get_slice``. Indexing reads only the checksum chunks
        that hold the selected elements of a ``raw`` tensor; for the transform
        codecs it reads and decodes only the units that hold them: blocks of
        ``block_size`` elements (``dtdr8``, ``dtdr16``), residual frames of
        ``frame_elements`` (``dtdr``), plus each touched segment's small
        ``meta`` section. (A file without its chunk checksums, a truncated one,
        decodes whole segments.)"""
        try:
            i = self._refs[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self._reader.name}") from None
        return TensorSlice(self, name, i)

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

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Decode tensor ``name`` straight into ``out``'s memory, one segment at
        a time (no full-size temporary). Only when the tensor is stored whole as
        its own entry and ``out`` is a contiguous CPU tensor of its dtype and
        shape; returns False (nothing read) otherwise. Damage is handled per
        ``errors``; a lost tensor raises :class:`~torch_dtdr.errors.IntegrityError`."""
        try:
            i = self._refs[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self._reader.name}") from None
        e, dtype, offset, shape, stride, *_ = self._builder.tables.records[i]
        entry = self._reader.tensors[e]
        if (offset != 0 or tuple(out.shape) != tuple(shape) or out.dtype != dtype or entry.dtype != dtype
                or out.device.type != "cpu" or not out.is_contiguous() or entry.numel != out.numel()
                or (out.numel() and list(stride) != _contiguous_strides(shape))):
            return False
        with torch.no_grad():
            flat = out.detach().view(-1)
            with self._reader.prefetch(entry.records):
                got = self._decoder.tensor(e, out=flat)
        if got is None:
            raise IntegrityError("tensor is lost", file=self._reader.name, tensor=name)
        return True

    def codec(self, name: str) -> str:
        """Name of the codec that stored tensor ``name``."""
        entry = self._builder.tables.records[self._refs[name]][0]
        return self._reader.tensors[entry].codec.get("name", "?")

    def load(self, map_location=None) -> Any:
        """The whole saved object, like :func:`torch_dtdr.load`."""
        obj, _rep = load_from_reader(self._reader, map_location or self._device, self._errors,
                                     workers=self._workers)
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

    def _warn_if_damaged(self, entries: Iterable[int]) -> None:
        """A DamageWarning at the caller's line for the stored tensors
        ``entries`` that did not come back exact (or repaired), as
        :func:`torch_dtdr.load` warns for a whole file."""
        if not self._warn_damage:
            return
        damaged = []
        for e in entries:
            rep = self._decoder.tensor_report(e)
            if rep is not None and rep.status not in ("exact", "repaired"):
                damaged.append(f"{rep.name!r} {rep.status}")
        if damaged:
            warn_caller(DamageWarning(f"{self._reader.name}: " + ", ".join(damaged)))

    def _read_slice(self, name: str, i: int, key) -> torch.Tensor | None:
        e, dtype, offset, shape, strides, _device, _rg, kind, _np = self._builder.tables.records[i]
        info = self._reader.tensors[e]
        selection = slicing.axes(key, shape)
        out_shape = slicing.result_shape(selection)
        plain = kind != "ndarray" and dtype == info.dtype and info.provenance is None and not self._reader.truncated
        if not plain:
            whole = self.get_tensor(name)
            return None if whole is None else whole[key]
        runs = slicing.plan(selection, offset, strides)
        if not runs:
            return place(torch.empty(out_shape, dtype=dtype), self._device, self._devices[e], self._reader.name,
                          info.name)
        gap = max(1, self._reader.geometry.chunk_size // max(1, dtype.itemsize))
        pieces = slicing.merge(runs, gap)
        if pieces[0][0] < 0 or pieces[-1][1] > info.numel:
            raise FormatError(f"view of {pieces[-1][1]} elements over stored data of {info.numel}",
                              file=self._reader.name, tensor=name)
        values, status, bad = self._read_pieces(e, pieces)
        if status == LOST or (status == DEGRADED and self._errors == "strict"):
            if self._errors == "strict":
                raise IntegrityError(f"slice of a {status} tensor", file=self._reader.name, tensor=name,
                                     byte_range=bad[0] if bad else None)
            if self._warn_damage:
                warn_caller(DamageWarning(f"{self._reader.name}: {name!r} lost"))
            return None
        if status == DEGRADED and self._warn_damage:
            warn_caller(DamageWarning(f"{self._reader.name}: {name!r} degraded (damaged elements of the slice "
                                      "are zero)"))
        parts = []
        starts = [a for a, _b in pieces]
        for run in runs:
            k = bisect.bisect_right(starts, run.start) - 1
            piece = values[k]
            parts.append(piece.as_strided(run.sizes, run.strides, run.start - pieces[k][0]).reshape(-1))
        out = torch.cat(parts).reshape(out_shape) if len(parts) > 1 else parts[0].reshape(out_shape).clone()
        return place(out, self._device, self._devices[e], self._reader.name, info.name)

    def _read_pieces(self, e: int, pieces: list[tuple[int, int]]):
        """The stored elements ``[a, b)`` of each piece of entry ``e``, their
        worst status and the damaged byte ranges. A ``raw`` section stored
        once is read byte range by byte range (checked, and repaired by
        parity, chunk by chunk); a codec with units decodes only the units
        the pieces touch (:meth:`_read_units`); any other codec decodes the
        whole segments the pieces touch."""
        info = self._reader.tensors[e]
        codec = codecs.from_dict(info.codec)
        itemsize = info.dtype.itemsize
        values = [torch.empty(b - a, dtype=info.dtype) for a, b in pieces]
        status, bad = EXACT, []
        records = [rec for rec in info.records
                   if any(a < rec.elem_start + rec.elem_count and b > rec.elem_start for a, b in pieces)]
        by_range = (codec.name == "raw" and self._reader.verifies_chunks
                    and all(len(rec.sections) == 1 and rec.sections[0].copies == 1 for rec in records))
        unit = codec.unit_elements() if self._reader.verifies_chunks else None
        by_units = unit is not None and all(any(s.name == "meta" for s in rec.sections) for rec in records)
        if sum(rec.elem_count for rec in info.records) < info.numel:
            return values, LOST, []
        floating = info.dtype.is_floating_point or info.dtype.is_complex
        with contextlib.nullcontext() if by_range or by_units else self._reader.prefetch(records):
            for rec in records:
                rec_end = rec.elem_start + rec.elem_count
                wanted = [(k, max(a, rec.elem_start), min(b, rec_end)) for k, (a, b) in enumerate(pieces)
                          if a < rec_end and b > rec.elem_start]
                spans = self._unit_spans(rec, unit, wanted) if by_units else None
                if spans is not None:
                    got = self._read_units(info, codec, rec, unit, spans, wanted, pieces, values, floating)
                    status = worst(status, got[0])
                    bad += got[1]
                    continue
                if by_range:
                    for k, lo, hi in wanted:
                        first = rec.body_start + (lo - rec.elem_start) * itemsize
                        res = self._reader.read_logical(first, first + (hi - lo) * itemsize)
                        damage = Damage({"data": [(x - first, y - first) for x, y in res.bad]}) if res.bad else None
                        result = codec.decode({"data": res.data}, info.dtype, hi - lo, damage)
                        if res.repaired:
                            status = worst(status, REPAIRED)
                        bad += res.bad
                        status = worst(status, self._status_of(result, floating, damage))
                        values[k][lo - pieces[k][0]: hi - pieces[k][0]] = result.values
                    continue
                seg = self._reader.read_record(rec)
                if seg.repaired:
                    status = worst(status, REPAIRED)
                bad += seg.bad
                result = codec.decode(seg.sections, info.dtype, rec.elem_count, seg.damage if seg.damage else None)
                status = worst(status, self._status_of(result, floating, seg.damage))
                for k, lo, hi in wanted:
                    values[k][lo - pieces[k][0]: hi - pieces[k][0]] = result.values[lo - rec.elem_start:
                                                                                    hi - rec.elem_start]
        return values, status, bad

    def _unit_spans(self, rec, unit: int, wanted) -> list[list[int]] | None:
        """The ranges of units of ``unit`` elements of record ``rec`` that the ``wanted`` pieces
        ``(k, first, end)`` touch, merged where less than a checksum chunk of units apart (a read costs a
        chunk anyway); None when decoding the whole record is the better plan: the ranges cover more than
        half its units, or they are more than :data:`MAX_UNIT_SPANS` (one read each)."""
        gap = self._reader.geometry.chunk_size // unit
        spans: list[list[int]] = []
        for _k, lo, hi in sorted(wanted, key=lambda w: w[1]):
            u0, u1 = (lo - rec.elem_start) // unit, -(-(hi - rec.elem_start) // unit)
            if spans and u0 <= spans[-1][1] + gap:
                spans[-1][1] = max(spans[-1][1], u1)
            else:
                spans.append([u0, u1])
        covered = sum(u1 - u0 for u0, u1 in spans)
        if len(spans) > MAX_UNIT_SPANS or 2 * covered > -(-rec.elem_count // unit):
            return None
        return spans

    def _read_units(self, info, codec, rec, unit: int, spans, wanted, pieces, values, floating: bool):
        """Decode, of record ``rec``, only the unit ranges ``spans`` (which hold the ``wanted`` pieces
        ``(k, first, end)``), reading the record's ``meta`` and the byte ranges of its other sections those
        units need; write the pieces into ``values``. Returns the worst status and the damaged ranges."""
        reader = self._reader
        status, bad = EXACT, []
        lengths = {s.name: s.length for s in rec.sections}
        meta = reader.read_section(rec, "meta")
        for u0, u1 in spans:
            reads = codec.unit_reads(info.dtype, rec.elem_count, (u0, u1), meta.data,
                                     Damage({"meta": meta.damage}) if meta.damage else None, lengths)
            parts = {name: reader.read_section(rec, name, a, b) for name, (a, b) in reads.items()}
            damage = Damage({name: part.damage for name, part in [("meta", meta), *parts.items()] if part.damage})
            data = {"meta": meta.data, **{name: part.data for name, part in parts.items()}}
            result = codec.decode_units(data, info.dtype, rec.elem_count, (u0, u1), damage if damage else None,
                                        lengths)
            for part in (meta, *parts.values()):
                if part.repaired:
                    status = worst(status, REPAIRED)
                bad += part.bad
            status = worst(status, self._status_of(result, floating, damage))
            first = rec.elem_start + u0 * unit
            for k, lo, hi in wanted:
                if first <= lo and hi <= first + result.values.numel():
                    values[k][lo - pieces[k][0]: hi - pieces[k][0]] = result.values[lo - first: hi - first]
        return status, bad

    @staticmethod
    def _status_of(result, floating: bool, damage) -> str:
        """As the whole-tensor decoder rates a segment: without a bounded value it is lost."""
        if result.exact:
            return EXACT
        missing = damage.missing if damage is not None else frozenset()
        return DEGRADED if floating and not (missing - {"residual"}) else LOST

    def _entry(self, i: int) -> torch.Tensor | None:
        with self._plan_lock:
            planned = i in self._planned
        with contextlib.nullcontext() if planned else self._reader.prefetch(self._reader.tensors[i].records):
            t = self._decoder.tensor(i)
        if t is None:
            return None
        return place(t, self._device, self._devices[i], self._reader.name, self._reader.tensors[i].name)



def open(f, *, device=None, errors: str = "recover", storage_options: Mapping | None = None,  # noqa: A001
         max_workers: int | None = None, warn_damage: bool = True, workers: int | None = None) -> DTDRFile:
    """Open a DTDR file for lazy reading, in the shape of safetensors'
    ``safe_open``: ``keys()``, ``metadata()``, ``get_tensor(name)``,
    ``get_slice(name)[...]``, ``get_tensors(names)``.

    ``max_workers`` bounds the concurrent range requests to a remote store;
    ``workers`` threads decode the segments of a tensor (:meth:`DTDRFile.load`:
    several tensors at once), as in :func:`torch_dtdr.load`.
    A tensor or slice that comes back degraded (or lost) raises a
    :class:`~torch_dtdr.errors.DamageWarning` at the caller's line;
    ``warn_damage=False`` leaves that to the caller (who reads
    :meth:`DTDRFile.report` at the end, as ``convert`` does)."""
    return DTDRFile(f, device=device, errors=errors, storage_options=storage_options, max_workers=max_workers,
                    warn_damage=warn_damage, workers=workers)


class TensorSlice:
    """What :meth:`DTDRFile.get_slice` returns: shape and dtype without
    reading, the selected elements on ``[...]``."""

    def __init__(self, file: DTDRFile, name: str, index: int):
        self._file = file
        self._name = name
        self._index = index
        record = file._builder.tables.records[index]
        self.dtype: torch.dtype = record[1]
        self.shape: tuple[int, ...] = tuple(record[3])

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        """The dtype as safetensors names it (``"F32"``, ``"BF16"``, ``"I64"``...);
        the torch dtype is :attr:`dtype`."""
        return SAFETENSORS_DTYPES.get(self.dtype, str(self.dtype).removeprefix("torch."))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor | None:
        """The selected elements (a new, contiguous tensor), or None when the
        tensor is lost (``errors="recover"``)."""
        return self._file._read_slice(self._name, self._index, key)

    def __repr__(self) -> str:
        return f"TensorSlice({self._name!r}, shape={self.get_shape()}, dtype={self.get_dtype()})"
