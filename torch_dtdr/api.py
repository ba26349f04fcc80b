"""The public entry points: save, load, open, verify, repair.

Data flows one way: objects go through :mod:`torch_dtdr.tree` (no pickle),
tensors through a codec, sections into the container writer, bytes into a
storage sink; loading runs the same path backwards.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch

from . import codecs, tree
from . import decoding, torchfiles
from .decoding import Decoder, byte_progress, check_workers, stored_bytes
from .codecs.base import Codec, flat_contiguous
from .errors import ArgumentError, CheckpointNotFoundError, CodecError, DamageWarning, DTDRError, IntegrityError
from .format import constants
from .format.index import (PROVENANCE_DEGRADED, PROVENANCE_LOST, Index, IndexText, RecordInfo, TensorInfo, dtype_name,
                           encode_index)
from .format.reader import ContainerReader
from .format.writer import ContainerWriter
from .report import DEGRADED, EXACT, LOST, REPAIRED, Report, TensorReport
from .storage import open_sink, open_source

#: Parity levels: (data chunks k, parity chunks m, inner RS symbols) per stripe.
PARITY_LEVELS: dict[str, tuple[int, int, int]] = {
    "off": (32, 0, 0),
    "default": (32, 2, 0),  # 6.25 %: any 2 damaged chunks of a 34-chunk stripe are repaired
    "strong": (16, 4, 0),  # 25 %: any 4 of 20
    # ~25 %: every 4 KiB chunk also carries RS(255,223) parity (16 byte errors per
    # 223-byte codeword), so scattered byte errors are fixed inside each chunk.
    "archive": (32, 2, 32),
}

#: Tensors encoded (save) or decoded (load) at once (see
#: :data:`torch_dtdr.decoding.DEFAULT_WORKERS`).
DEFAULT_WORKERS = decoding.DEFAULT_WORKERS

#: The keywords torch.load hands on to pickle's ``Unpickler`` (its
#: ``**pickle_load_args``: ``fix_imports``, ``encoding``, ``buffers``; the
#: fourth, ``errors``, is torch_dtdr's own). :func:`load` accepts and ignores
#: them for a DTDR file, which is never unpickled; any other unknown keyword
#: is a TypeError there, as torch.load's unpickler would raise one.
PICKLE_LOAD_KEYWORDS = frozenset({"fix_imports", "encoding", "buffers"})

CodecSpec = str | Codec | Mapping[str, "str | Codec"] | Callable[[str, torch.Tensor], "str | Codec | None"]


def _make_codec(spec, block_size) -> Codec:
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise CodecError(f"a codec is a name or a Codec instance, got {spec!r}")
    params = {}
    if block_size is not None and spec != "raw":
        params["block_size"] = block_size
    return codecs.get(spec, **params)


def _choose_codec(codec: CodecSpec, name: str, tensor: torch.Tensor, block_size, cache: dict) -> Codec:
    if callable(codec) and not isinstance(codec, Codec):
        spec = codec(name, tensor)
        spec = "dtdr" if spec is None else spec
    elif isinstance(codec, Mapping):
        spec = next((v for pat, v in codec.items() if fnmatch.fnmatchcase(name, pat)), "dtdr")
    else:
        spec = codec
    key = spec if isinstance(spec, str) else id(spec)
    if key not in cache:
        cache[key] = _make_codec(spec, block_size)
    chosen = cache[key]
    if not chosen.accepts(tensor.dtype):
        chosen = _raw_for(tensor, cache)
    elif chosen.name == "raw" and not (tensor.is_floating_point() or tensor.is_complex()):
        chosen = _raw_for(tensor, cache)
    return chosen


#: Integer and bool tensors up to this size get 5 copies instead of 3: they are
#: small in real checkpoints (steps, position ids, RNG states) and cannot degrade.
SMALL_EXACT_BYTES = 1 << 20


def _raw_for(tensor: torch.Tensor, cache: dict) -> Codec:
    small = tensor.numel() * tensor.element_size() <= SMALL_EXACT_BYTES
    copies = 5 if small and not (tensor.is_floating_point() or tensor.is_complex()) else 3
    key = ("raw", copies)
    if key not in cache:
        cache[key] = codecs.get("raw", copies=copies)
    return cache[key]


def _parity(parity) -> tuple[int, int, int]:
    """``(k, m, inner nsym)`` of a parity argument; anything else is an ArgumentError."""
    if parity is None or parity is False:
        return PARITY_LEVELS["off"]
    if isinstance(parity, str):
        try:
            return PARITY_LEVELS[parity]
        except KeyError:
            raise ArgumentError(f"unknown parity level {parity!r}; known: {sorted(PARITY_LEVELS)} or (k, m)",
                                field="parity") from None
    try:
        values = tuple(parity)
    except TypeError:
        values = ()
    if len(values) not in (2, 3) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ArgumentError(f"parity must be a level name or (k, m) / (k, m, inner) integers, got {parity!r}",
                            field="parity")
    k, m, inner = values[0], values[1], values[2] if len(values) == 3 else 0
    if not 1 <= k <= constants.MAX_K or not 0 <= m <= constants.MAX_M or k + m > 255:
        raise ArgumentError(f"parity (k={k}, m={m}) out of range: 1 <= k <= {constants.MAX_K}, 0 <= m <= {constants.MAX_M}, "
                            "k + m <= 255", field="parity")
    if inner and (inner % 2 or not 2 <= inner <= 128):
        raise ArgumentError(f"inner parity symbols must be 0 or even in [2, 128], got {inner}", field="parity")
    return k, m, inner


def save(obj: Any, f, *, codec: CodecSpec = "dtdr", block_size: int | None = None, parity="default",
         metadata: Mapping[str, str] | None = None, storage_options: Mapping | None = None,
         chunk_size: int = constants.DEFAULT_CHUNK_SIZE, segment_elems: int = constants.DEFAULT_SEGMENT_ELEMS,
         workers: int | None = None, progress: bool = False) -> None:
    """Save ``obj`` (a tensor, or dicts/lists/tuples around tensors and plain
    values) to ``f``: a local path, an fsspec URL or a writable binary file.

    ``codec`` is a codec name (``"dtdr"`` lossless, ``"dtdr8"``, ``"dtdr16"``,
    ``"raw"``), a :class:`~torch_dtdr.codecs.Codec`, a dict of name patterns
    (fnmatch) to codecs, or a callable ``(name, tensor) -> codec``. Tensors the
    chosen codec cannot hold (integers, bool, fp8, complex) are stored raw.
    ``parity`` is ``"default"``, ``"strong"``, ``"off"`` or ``(k, m)``.
    The destination is written atomically: a failed save leaves nothing there.
    ``workers`` threads encode segments ahead of the writer (default
    ``DEFAULT_WORKERS``); memory stays bounded by a few segments.
    ``progress=True`` shows a bar of the tensor bytes encoded (on a terminal only).
    """
    k, m, inner = _parity(parity)
    skeleton, entries = tree.flatten(obj)
    meta = {str(a): str(b) for a, b in (metadata or {}).items()}
    cache: dict = {}
    codec_dicts: dict[int, dict] = {}  # one per codec chosen (the index only reads them)
    infos = []
    chosen = []
    for e in entries:
        c = _choose_codec(codec, e.name, e.tensor, block_size, cache)
        chosen.append(c)
        codec_dict = codec_dicts.get(id(c))
        if codec_dict is None:
            codec_dict = codec_dicts[id(c)] = c.to_dict()
        infos.append(TensorInfo(e.name, e.tensor.dtype, tuple(e.tensor.shape), codec_dict, segment_elems))
    for t in infos:
        dtype_name(t.dtype)
    index = Index(skeleton, infos, meta, {"chunk_size": chunk_size, "k": k, "m": m, "inner_nsym": inner})
    index_text = IndexText(index)
    with open_sink(f, storage_options) as sink:
        w = ContainerWriter(sink, chunk_size=chunk_size, k=k, m=m, inner_nsym=inner)
        index.geometry["algorithm"] = w.code.algorithm
        w.write_record(constants.RECORD_KIND_MANIFEST, constants.MANIFEST_TENSOR_ID, 0, 0, 0,
                       [("manifest", 1, index_text.manifest())])
        jobs = ((tid, seg, start, part, c, info)
                for tid, (e, info, c) in enumerate(zip(entries, infos, chosen))
                for seg, (start, part) in enumerate(_segments(e.tensor, segment_elems)))
        encoded_jobs = _encode_in_order(jobs, workers or DEFAULT_WORKERS)
        if progress:
            segment_bytes = [min(segment_elems, e.tensor.numel() - start) * e.tensor.element_size()
                             for e in entries for start in range(0, max(e.tensor.numel(), 1), segment_elems)]
            encoded_jobs = byte_progress(encoded_jobs, segment_bytes, True, "save")
        layouts: dict = {}  # (codec, dtype): its sections' (name, copies), asked once
        for (tid, seg, start, part, c, info), encoded in encoded_jobs:
            layout = layouts.get((id(c), part.dtype))
            if layout is None:
                layout = layouts[(id(c), part.dtype)] = [(s.name, s.copies) for s in c.sections(part.dtype)]
            numel = part.numel()
            offset, header = w.write_record(constants.RECORD_KIND_SEGMENT, tid, seg, start, numel,
                                            [(name, copies, encoded[name]) for name, copies in layout])
            info.records.append(RecordInfo(offset, header.size, start, numel, header.sections))
        stream_end = w.logical_offset
        index.geometry["n_data_chunks"] = -(-stream_end // chunk_size)
        w.finish(index_text)


def _segments(tensor: torch.Tensor, segment_elems: int):
    """``(first element, 1-D contiguous part)`` of each segment (one for an empty tensor)."""
    flat = flat_contiguous(tensor)
    if flat.numel() <= segment_elems:  # one segment, the whole tensor (or an empty one)
        yield 0, flat
        return
    for start in range(0, flat.numel(), segment_elems):
        yield start, flat[start:start + segment_elems]


def _encode_in_order(jobs, workers: int):
    """Encode segments on ``workers`` threads, yielding ``(job, sections)`` in
    job order. Up to ``2 * workers`` segments' worth of bytes are encoded ahead
    of the writer (at least ``2 * workers`` segments, at most ``64 * workers``),
    so memory stays bounded by a few full segments."""
    if workers <= 1:
        try:
            for job in jobs:
                yield job, job[4].encode(job[3])
        finally:
            codecs.release_thread_buffers()
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="dtdr-encode") as pool:
        pending = deque()
        pending_bytes = 0
        budget = None
        for job in jobs:
            nbytes = job[3].numel() * job[3].element_size()
            if budget is None:
                # as many bytes ahead as 2 * workers segments of the first tensor's dtype: small
                # tensors (whose records cost the writer more than their encoding) queue deeper
                budget = 2 * workers * max(nbytes, 1, job[5].segment_elems * job[3].element_size())
            # a small segment costs the pool's hand-off (a future, a wake-up, the GIL twice) more
            # than its encoding: the writer encodes it itself when its turn comes
            task = None if nbytes < decoding.INLINE_BYTES else pool.submit(job[4].encode, job[3])
            pending.append((job, task, nbytes))
            pending_bytes += nbytes
            while pending and (len(pending) >= 64 * workers or
                               (len(pending) >= 2 * workers and pending_bytes >= budget)):
                job0, task, done_bytes = pending.popleft()
                pending_bytes -= done_bytes
                yield job0, job0[4].encode(job0[3]) if task is None else task.result()
        while pending:
            job0, task, _ = pending.popleft()
            yield job0, job0[4].encode(job0[3]) if task is None else task.result()


def load(f, map_location=None, pickle_module=None, *, weights_only: bool | None = None, mmap: bool | None = None,
         errors: str = "recover", storage_options: Mapping | None = None, report: bool = False,
         max_workers: int | None = None, partial: bool = False, workers: int | None = None,
         progress: bool = False, **pickle_load_args) -> Any:
    """Load a DTDR file, or hand anything else to :func:`torch.load`.

    ``f`` is a local path, an fsspec URL (``s3://``, ``gs://``, ``memory://``,
    ...) or a binary file object; what it holds is told by its first 8 bytes,
    or, when those are damaged, by the DTDR trailer or footer at its end (a
    file object is peeked from its current position and, when it is not DTDR,
    left exactly there). A file shorter than the magic that begins like it
    (an empty file, say) counts as a truncated DTDR file; a missing path
    raises :class:`~torch_dtdr.errors.CheckpointNotFoundError` (a
    ``FileNotFoundError``).

    **DTDR files** are decoded by :mod:`torch_dtdr.decoding`: ``map_location``
    takes all of torch.load's forms (device string, :class:`torch.device`, a
    dict of saved-location remaps, a callable ``(storage, location)``);
    ``errors="recover"`` (default) repairs and degrades gracefully with a
    :class:`~torch_dtdr.errors.DamageWarning`, ``"strict"`` raises unless
    every tensor is bit-exact; a lost tensor raises
    :class:`~torch_dtdr.errors.IntegrityError` naming every lost tensor unless
    ``partial=True``, which returns ``None`` in its place; ``report=True`` returns ``(obj, Report)``;
    ``max_workers`` bounds the concurrent range requests to a remote store
    (default :data:`torch_dtdr.storage.DEFAULT_MAX_WORKERS`); ``workers``
    threads decode (several tensors at once, or the segments of a lone
    tensor; default ``DEFAULT_WORKERS``), as ``workers`` threads encode in
    :func:`save`. Nothing is unpickled, so ``pickle_module``, ``weights_only``
    and pickle's own keywords (:data:`PICKLE_LOAD_KEYWORDS`) have no effect;
    any other keyword is a TypeError. ``mmap=True`` is accepted and has no
    effect yet (the data is read and verified in full).

    **Anything else** goes to the original :func:`torch.load` with
    ``map_location``, ``pickle_module``, ``weights_only``, ``mmap`` and the
    extra pickle arguments exactly as given. ``weights_only=None`` (default)
    means torch's own default: ``True`` since torch 2.6 (this function passes
    ``True`` on older torch, unless a ``pickle_module`` is given). An fsspec
    URL, which torch.load cannot open, is opened with ``storage_options`` and
    passed as a file object. ``errors``, ``max_workers`` and ``workers`` do not apply (torch.load repairs
    nothing) and ``report=True`` returns ``(obj, None)``.
    """
    check_workers(workers)
    kind, src = torchfiles.sniff(f, storage_options, partial=True)
    if kind == "dtdr":
        check_pickle_load_args(pickle_load_args)
        return load_dtdr_source(src, f, map_location, errors=errors, storage_options=storage_options, report=report,
                                progress=progress,
                                max_workers=max_workers, partial=partial, workers=workers)
    if kind == "missing":
        raise CheckpointNotFoundError("no such file", file=src)
    obj = torchfiles.load_torch(f, kind, src, map_location, pickle_module, weights_only=weights_only, mmap=mmap,
                                storage_options=storage_options, **pickle_load_args)
    return (obj, None) if report else obj


def check_pickle_load_args(pickle_load_args: Mapping) -> None:
    """TypeError for a keyword :func:`load` does not take on a DTDR file
    (pickle's own keywords, :data:`PICKLE_LOAD_KEYWORDS`, are accepted)."""
    unknown = sorted(set(pickle_load_args) - PICKLE_LOAD_KEYWORDS)
    if unknown:
        raise TypeError(f"load() got an unexpected keyword argument {unknown[0]!r}"
                        + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""))


def load_dtdr_source(src, orig_f, map_location=None, *, errors: str = "recover",
                     storage_options: Mapping | None = None, report: bool = False, max_workers: int | None = None,
                     partial: bool = False, workers: int | None = None, progress: bool = False):
    """Decode the DTDR file :func:`torch_dtdr.torchfiles.sniff` found (``src``)
    as :func:`load` does, then leave a file object ``orig_f`` after its data."""
    check_workers(workers)
    out = decoding.load_file(src, map_location, errors=errors, storage_options=storage_options, report=report,
                             max_workers=max_workers, partial=partial, workers=workers or DEFAULT_WORKERS,
                             progress=progress)
    torchfiles.consume(orig_f)
    return out


def info(f, *, storage_options: Mapping | None = None) -> dict:
    """What a DTDR file holds, from its index alone (no tensor data is read)."""
    with open_source(f, storage_options) as src:
        reader = ContainerReader(src)
        g = reader.geometry
        tensors = []
        for t in reader.tensors:
            stored = sum(r.end - r.offset for r in t.records)
            raw = t.numel * torch.empty(0, dtype=t.dtype).element_size()
            tensors.append({"name": t.name, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                            "codec": t.codec.get("name", "?"), "codec_params": t.codec,
                            "stored_bytes": stored, "raw_bytes": raw, "segments": len(t.records),
                            "provenance": t.provenance})
        return {"file": reader.name, "format_version": f"{constants.FORMAT_MAJOR}.{constants.FORMAT_MINOR}", "file_size": reader.size,
                "geometry": {"chunk_size": g.chunk_size, "k": g.k, "m": g.m, "algorithm": reader.algorithm,
                             "n_data_chunks": g.n_data_chunks, "inner_nsym": g.inner_nsym},
                "metadata": dict(reader.index.metadata), "events": list(reader.events),
                "truncated": reader.truncated, "tensors": tensors}


def _first_offset(t: TensorInfo) -> int:
    return min((rec.offset for rec in t.records), default=0)


def verify(f, *, storage_options: Mapping | None = None, progress: bool = False,
           max_workers: int | None = None, workers: int | None = None) -> Report:
    """Check every checksum of a DTDR file (every chunk, parity and metadata
    included), try parity repair in memory and report per tensor: exact /
    repaired / degraded / lost. Never raises for
    damage; a file that cannot be opened at all gives a report with
    ``unreadable`` set. ``max_workers`` and ``workers`` (threads decoding
    the segments of each tensor) are as in :func:`load`. One file: a
    DCP checkpoint folder is verified by :func:`torch_dtdr.dispatch.verify`
    (which is :func:`torch_dtdr.verify`)."""
    check_workers(workers)
    try:
        with open_source(f, storage_options, max_workers=max_workers) as src:
            reader = ContainerReader(src)
            dec = Decoder(reader, "recover", workers=workers or DEFAULT_WORKERS)
            # Tensors in file order, each record followed by the scrub of the
            # stripes behind it: one pass over the file serves both (one
            # download, memory bounded by a record and the prefetch window).
            order = sorted(range(len(reader.tensors)), key=lambda i: _first_offset(reader.tensors[i]))
            scrubber = reader.scrubber()

            def scrub_behind(rec: RecordInfo, _seg) -> None:
                reads = reader.record_reads(rec)
                if reads:
                    scrubber.run_until(max(o + n for o, n in reads))

            with reader.prefetch((rec for i in order for rec in reader.tensors[i].records), also=scrubber.reads()):
                sizes = [stored_bytes(reader.tensors[i]) for i in order]
                for i in byte_progress(order, sizes, progress, "verify"):
                    dec.tensor(i, after_record=scrub_behind)
                dec.report.events += scrubber.finish()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DamageWarning)
                return dec.finish()
    except DTDRError as e:
        if isinstance(e, FileNotFoundError):
            raise
        return Report(str(getattr(f, "name", f)), unreadable=str(e))


class _RecordCopier:
    """Writes the records of one tensor, as the decoder reads them, into a new
    container: sections copied bit for bit, or re-encoded where damaged."""

    def __init__(self, writer: ContainerWriter, tid: int, old: TensorInfo, new: TensorInfo):
        self.writer, self.tid, self.old, self.new = writer, tid, old, new
        self.codec = codecs.from_dict(old.codec)
        self.copies = {s.name: s.copies for s in self.codec.sections(old.dtype)}

    def __call__(self, rec: RecordInfo, seg) -> None:
        sections = seg.sections
        if seg.damage:
            values = self.codec.decode(sections, self.old.dtype, rec.elem_count, seg.damage).values
            sections = self.codec.encode(values.reshape(-1).contiguous())
        offset, header = self.writer.write_record(
            constants.RECORD_KIND_SEGMENT, self.tid, len(self.new.records), rec.elem_start, rec.elem_count,
            [(s.name, self.copies.get(s.name, s.copies), sections[s.name]) for s in rec.sections])
        self.new.records.append(RecordInfo(offset, header.size, rec.elem_start, rec.elem_count, header.sections))


class _NeedsMarking(Exception):
    """Raised inside the first repair pass (aborting its sink) when a tensor
    turns out degraded or lost: the file must be written again with those
    tensors marked, in the head manifest too."""


def repair(f, out=None, *, storage_options: Mapping | None = None, out_storage_options: Mapping | None = None,
           progress: bool = False, max_workers: int | None = None, allow_degraded: bool = False,
           salvage: bool = False, workers: int | None = None) -> Report:
    """Write a healed copy of ``f`` to ``out`` (default: replace ``f`` atomically;
    ``out_storage_options`` default to ``storage_options``).

    Sections that verify, or that parity or voting restores, are copied bit for
    bit. A repair never launders damage: when a tensor cannot be restored
    exactly, the output records it (a per-tensor ``provenance`` marker in the
    index and the head manifest, format.md section 5), so that ``verify``,
    strict loads and load reports keep calling it degraded or lost.

    * Degraded tensors are re-encoded from their best recovered values and
      marked ``degraded``. Replacing ``f`` in place with such a file needs
      ``allow_degraded=True``; otherwise IntegrityError (carrying ``.report``)
      and ``f`` is left untouched. Writing to a separate ``out`` is allowed.
    * Lost tensors (a truncated file, say) are only dropped with
      ``salvage=True``: the surviving tensors go into a partial file in which
      the lost ones are listed, marked ``lost``. Otherwise IntegrityError and
      the destination is left untouched.

    The returned report describes ``f``; its ``exact`` is False whenever the
    output is marked. ``max_workers`` and ``workers`` (threads decoding the
    segments of each tensor) are as in :func:`load`.
    """
    check_workers(workers)
    workers = workers or DEFAULT_WORKERS
    try:
        return _repair_pass(f, out, storage_options, out_storage_options, progress, max_workers, None, workers)
    except _NeedsMarking as need:
        rep = need.args[0]
    statuses = {t.name: t.status for t in rep.tensors}
    lost = [n for n, st in statuses.items() if st == LOST]
    degraded = [n for n, st in statuses.items() if st == DEGRADED]
    name = rep.file
    if lost and not salvage:
        err = IntegrityError(f"{len(lost)} tensors are lost and cannot be repaired ({_names(lost)}); "
                             "pass salvage=True (dtdr repair --salvage) to write the others into a partial file",
                             file=name, tensor=lost[0])
        err.report = rep
        raise err
    if out is None and not (salvage if lost else allow_degraded):
        err = IntegrityError(f"{len(degraded)} tensors are degraded ({_names(degraded)}) and cannot be restored "
                             "exactly; not replacing the file in place: write to another file (dtdr repair -o) "
                             "or pass allow_degraded=True (--allow-degraded)", file=name, tensor=(degraded or lost)[0])
        err.report = rep
        raise err
    marks = {t.name: t for t in rep.tensors if t.status in (DEGRADED, LOST)}
    return _repair_pass(f, out, storage_options, out_storage_options, progress, max_workers, marks, workers)


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _repair_pass(f, out, storage_options, out_storage_options, progress, max_workers,
                 marks: dict[str, TensorReport] | None, workers: int = 1) -> Report:
    """One pass of :func:`repair`: each record is checked (and decoded, for the
    report) and written out at once. With ``marks`` None, the first tensor that
    is neither exact nor repaired raises :class:`_NeedsMarking` (aborting the
    sink, so nothing reaches the destination); with ``marks``, those tensors
    are written marked (``lost`` ones without records)."""
    with open_source(f, storage_options, max_workers=max_workers) as src:
        reader = ContainerReader(src)
        source_name = _base_name(reader.name)
        dec = Decoder(reader, "recover", workers=workers)
        g = reader.geometry
        index = Index(reader.index.tree, [], dict(reader.index.metadata),
                      {"chunk_size": g.chunk_size, "k": g.k, "m": g.m, "inner_nsym": g.inner_nsym})
        index.tensors = [TensorInfo(t.name, t.dtype, t.shape, t.codec, t.segment_elems, provenance=t.provenance)
                         for t in reader.tensors]
        for t in index.tensors:
            mark = (marks or {}).get(t.name)
            if mark is not None and t.provenance is None:
                t.provenance = ({"status": PROVENANCE_LOST, "source": source_name} if mark.status == LOST else
                                {"status": PROVENANCE_DEGRADED, "source": source_name,
                                 "degraded_elements": int(mark.degraded_elements),
                                 "error_bound": _finite_or_none(mark.error_bound)})
            elif mark is not None and mark.status == LOST and t.provenance["status"] != PROVENANCE_LOST:
                t.provenance = {"status": PROVENANCE_LOST, "source": source_name}
        target = f if out is None else out
        out_options = storage_options if out is None or out_storage_options is None else out_storage_options
        try:
            with open_sink(target, out_options) as sink, \
                    reader.prefetch(rec for t in reader.tensors for rec in t.records):
                w = ContainerWriter(sink, chunk_size=g.chunk_size, k=g.k, m=g.m, algorithm=reader.algorithm,
                                    inner_nsym=g.inner_nsym)
                index.geometry["algorithm"] = w.code.algorithm
                w.write_record(constants.RECORD_KIND_MANIFEST, constants.MANIFEST_TENSOR_ID, 0, 0, 0,
                               [("manifest", 1, encode_index(index.to_json(with_records=False)))])
                pairs = list(enumerate(zip(reader.tensors, index.tensors)))
                for tid, (tinfo, new) in byte_progress(pairs, [stored_bytes(t) for t in reader.tensors], progress,
                                                       "repair"):
                    lost_mark = new.provenance is not None and new.provenance["status"] == PROVENANCE_LOST
                    if lost_mark and tinfo.provenance is None:
                        dec.tensor(tid, after_record=None)  # for the report; nothing of it is written
                        continue
                    dec.tensor(tid, after_record=_RecordCopier(w, tid, tinfo, new))
                    if marks is None and dec._reports[tid].status not in (EXACT, REPAIRED):
                        raise _NeedsMarking(None)
                index.geometry["n_data_chunks"] = -(-w.logical_offset // g.chunk_size)
                w.finish(index.to_json())
        except _NeedsMarking:
            # finish the report over every tensor (nothing more is written), then start again
            for tid in range(len(reader.tensors)):
                if tid not in dec._reports:
                    dec.tensor(tid)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DamageWarning)
                raise _NeedsMarking(dec.finish()) from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            rep = dec.finish()
    return rep


def _base_name(name: str) -> str:
    """The last component of a path or URL: what a marker records as its source
    (never the directories of the machine that ran the repair)."""
    return str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1][:1024]


def _finite_or_none(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
