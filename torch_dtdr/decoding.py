"""The decoder: DTDR container records back into tensors, placed where asked.

It owns the read half of the data flow for one DTDR file: :class:`Decoder`
turns each tensor's records (already checked and repaired by the container
reader) into a CPU tensor through its codec and keeps the per-tensor
:class:`~torch_dtdr.report.Report`; :func:`place` moves it to the device
``map_location`` names (torch.load's forms); :func:`load_from_reader`
decodes a whole file (several tensors at a time) and rebuilds the object
through :mod:`torch_dtdr.tree`. :mod:`torch_dtdr.api`, :mod:`torch_dtdr.lazy`
and :mod:`torch_dtdr.dcp` call down into it; it knows none of them.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from typing import Any, Callable

import torch

from . import _memory as memory, codecs, tree
from .codecs.base import copy_elements
from ._cpu import compute_cores
from .errors import ArgumentError, DamageWarning, DeviceError, IntegrityError, TruncatedError, warn_caller
from .format import constants
from .format.index import PROVENANCE_LOST, RecordInfo, TensorInfo, dtype_name
from .format.reader import ContainerReader, SegmentData, merge_ranges
from .report import DEGRADED, EXACT, LOST, REPAIRED, Report, TensorReport, worst
from .storage import open_source

#: Threads that decode (tensors at once, or the segments of a lone tensor):
#: reads, checks and decodes overlap, and the compiled codec kernels, the
#: checksums and zstd release the GIL. One per physical core, at most 4 (see
#: :func:`torch_dtdr._cpu.compute_cores`). Measured on MiniLM x4 on a quiet
#: 2-core machine (``benchmarks/save_load.py --workers 1,2``, medians of 5):
#: with 2 workers instead of 1 a lossless ``dtdr`` load took 0.35 s instead
#: of 0.54 s in fp32 and 0.26 s instead of 0.42 s in bf16, a save 0.57 s
#: instead of 0.80 s (fp32) and 0.55 s instead of 0.91 s (bf16).
DEFAULT_WORKERS = min(4, compute_cores())

#: Tensors whose records take fewer bytes than this are decoded on the calling
#: thread, the rest on the workers. A small tensor's decode is mostly Python
#: (and its kernels keep the GIL), so on a worker it only trades the GIL back and
#: forth: 416 tensors of 16 floats loaded in ~30 ms on one thread and ~50 ms on two.
INLINE_BYTES = 1 << 16


def check_errors(errors, partial: bool = False) -> None:
    """Refuse an ``errors`` / ``partial`` combination load cannot honour."""
    if errors not in ("recover", "strict"):
        raise ArgumentError(f"errors must be 'recover' or 'strict', got {errors!r}", field="errors")
    if partial and errors != "recover":
        raise ArgumentError("partial=True returns what errors='recover' recovers; it cannot apply to "
                            "errors='strict'", field="partial")


def check_workers(workers) -> None:
    """Refuse a ``workers`` argument that is neither None nor a positive int."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ArgumentError(f"workers must be a positive integer or None, got {workers!r}", field="workers")


class Decoder:
    """Decodes tensors from a reader and accumulates the report."""

    def __init__(self, reader: ContainerReader, errors: str, workers: int = 1):
        check_errors(errors)
        self.reader = reader
        self.errors = errors
        #: threads that decode the segments of one tensor while the next records are read
        self.workers = max(1, int(workers))
        self.report = Report(reader.name, f"{constants.FORMAT_MAJOR}.{constants.FORMAT_MINOR}", list(reader.events), reader.truncated)
        self._reports: dict[int, TensorReport] = {}

    def tensor(self, i: int, after_record: Callable[[RecordInfo, SegmentData], None] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The stored tensor ``i`` on CPU, or None when it is lost.
        ``after_record(record, segment)`` is called after each record is read.
        ``out`` (1-D, contiguous, CPU, the stored dtype and element count) receives
        the values segment by segment instead of a new tensor."""
        r = self.reader
        info: TensorInfo = r.tensors[i]
        codec = codecs.from_dict(info.codec)
        rep = TensorReport(info.name, dtype_name(info.dtype), list(info.shape), codec.name)
        self._reports[i] = rep
        covered = sum(rec.elem_count for rec in info.records)
        numel = info.numel
        prov = info.provenance
        rep.provenance = None if prov is None else dict(prov)
        if prov is not None and prov["status"] == PROVENANCE_LOST:
            rep.status = LOST
            rep.error_bound = None
            self._fail(rep, IntegrityError, f"tensor was lost before this file was written (the file is a partial "
                       f"copy salvaged by repair from {prov['source']!r})", None)
            return None
        if covered < numel or (numel == 0 and not info.records and r.truncated):
            rep.status = LOST
            rep.error_bound = None
            self._fail(rep, TruncatedError, "the file ends before this tensor's data", None)
            return None
        bound = 0.0
        if out is None and len(info.records) > 1:
            out = memory.empty(numel, info.dtype)  # the segments decode straight into it
        for rec, seg, result in self._decoded_records(info, codec, after_record, out):
            if seg.bad:
                rep.damaged_bytes += r.physical(seg.bad)
            if seg.repaired:
                rep.repaired_bytes += r.physical(seg.repaired)
                rep.status = worst(rep.status, REPAIRED)
            rep.wrong_bytes_repaired += seg.wrong_bytes
            if not result.exact:
                floating = info.dtype.is_floating_point or info.dtype.is_complex
                # Only the residual layer is optional: without anything else a segment has no bounded value.
                if not floating or (seg.damage.missing - {"residual"}):
                    rep.status = LOST
                else:
                    rep.status = worst(rep.status, DEGRADED)
                rep.degraded_elements += result.degraded_elements
                bound = None if (bound is None or result.error_bound is None) else max(bound, result.error_bound)
            values = result.values
            if len(info.records) == 1 and out is None:
                out = values
            elif values.numel() and values.data_ptr() != out[rec.elem_start:].data_ptr():
                copy_elements(out, rec.elem_start, values)
        if out is None:
            out = torch.empty(0, dtype=info.dtype)
        if rep.damaged_bytes:
            rep.damaged_bytes = merge_ranges(rep.damaged_bytes)
            rep.unrepaired_bytes = sum(e - s for s, e in rep.damaged_bytes)
        if rep.repaired_bytes:
            rep.repaired_bytes = merge_ranges(rep.repaired_bytes)
        if rep.status in (DEGRADED, LOST):
            rep.error_bound = bound
        if prov is not None and rep.status != LOST:
            # written by repair from degraded data: it stays degraded, whatever its checksums say
            rep.status = DEGRADED
            rep.degraded_elements += prov["degraded_elements"]
            old_bound = prov["error_bound"]
            rep.error_bound = None if (old_bound is None or rep.error_bound is None) else rep.error_bound + old_bound
            self._fail(rep, IntegrityError, f"tensor is degraded: repair wrote it from data of {prov['source']!r} "
                       f"that could not be restored exactly ({prov['degraded_elements']} elements affected)",
                       rep.damaged_bytes[0] if rep.damaged_bytes else None)
        if rep.status != EXACT and rep.status != REPAIRED:
            self._fail(rep, TruncatedError if r.truncated else IntegrityError,
                       f"tensor is {rep.status} ({rep.degraded_elements} elements affected)",
                       rep.damaged_bytes[0] if rep.damaged_bytes else None)
        if rep.status == LOST:
            return None
        return out if out.shape == info.shape else out.view(info.shape)

    def _decoded_records(self, info: TensorInfo, codec, after_record, out: torch.Tensor | None):
        """``(record, segment, decoded result)`` for each record of ``info``, in
        order. Records are read (checked, repaired) here, one after another;
        with ``workers`` > 1 their codec work runs on that many threads, at
        most ``2 * workers`` segments ahead of the caller. Codecs that can
        decode into ``out`` (the whole tensor, 1-D) write their slice of it."""
        r = self.reader

        def read(rec: RecordInfo) -> SegmentData:
            seg = r.read_record(rec)
            if after_record is not None:
                after_record(rec, seg)
            return seg

        into = out is not None and codec.decodes_into and out.is_contiguous() and out.device.type == "cpu"

        def decode(rec: RecordInfo, seg: SegmentData):
            damage = seg.damage if seg.damage else None
            if into and rec.elem_start + rec.elem_count <= out.numel():
                target = out[rec.elem_start: rec.elem_start + rec.elem_count]
                return codec.decode(seg.sections, info.dtype, rec.elem_count, damage, out=target)
            return codec.decode(seg.sections, info.dtype, rec.elem_count, damage)

        if self.workers <= 1 or len(info.records) < 2:
            for rec in info.records:
                seg = read(rec)
                yield rec, seg, decode(rec, seg)
            return
        window = 2 * self.workers
        with ThreadPoolExecutor(self.workers, thread_name_prefix="dtdr-decode-segment") as pool:
            pending: deque = deque()
            for rec in info.records:
                seg = read(rec)
                pending.append((rec, seg, pool.submit(decode, rec, seg)))
                if len(pending) >= window:
                    rec0, seg0, fut = pending.popleft()
                    yield rec0, seg0, fut.result()
            while pending:
                rec0, seg0, fut = pending.popleft()
                yield rec0, seg0, fut.result()

    def tensor_report(self, i: int) -> TensorReport | None:
        """The report of stored tensor ``i`` once it has been decoded."""
        return self._reports.get(i)

    def _fail(self, rep: TensorReport, cls, message: str, byte_range) -> None:
        if self.errors == "strict":
            raise cls(message, file=self.reader.name, tensor=rep.name, byte_range=byte_range)

    def finish(self) -> Report:
        rep = self.report
        rep.tensors = [self._reports[i] for i in sorted(self._reports)]
        rep.truncated = self.reader.truncated
        if rep.status != EXACT:
            warn_caller(DamageWarning(rep.summary()))
        return rep


def map_device(map_location, saved_device: str) -> torch.device | str | None:
    """The device a tensor saved on ``saved_device`` goes to, in torch.load's terms."""
    if map_location is None:
        return saved_device
    if isinstance(map_location, (str, torch.device)):
        return map_location
    if isinstance(map_location, Mapping):
        return map_location.get(saved_device, saved_device)
    if callable(map_location):
        probe = torch.empty(0, dtype=torch.uint8).untyped_storage()
        result = map_location(probe, saved_device)
        if result is None:
            return saved_device
        if isinstance(result, (torch.UntypedStorage, torch.TypedStorage)):
            return result.device
        if isinstance(result, (str, torch.device)):
            return result
        raise TypeError(f"map_location callable returned {type(result).__name__}, expected a storage or None")
    raise TypeError(f"map_location of type {type(map_location).__name__} is not supported")


def place(t: torch.Tensor, map_location, saved_device: str, file, name: str) -> torch.Tensor:
    """Move a decoded CPU tensor where ``map_location`` (torch.load's forms) sends it."""
    dev = map_device(map_location, saved_device)
    if dev is None:
        return t
    try:
        dev = torch.device(dev)
        return t if dev == t.device else t.to(dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise DeviceError(f"cannot place the tensor on device {str(dev)!r} (saved on {saved_device!r}): {e}; "
                          "pass map_location", file=file, tensor=name) from None


def lost_tensors_error(rep: Report) -> IntegrityError | None:
    """The error for a report with lost tensors (every name listed), or None when nothing was lost."""
    lost = [t.name for t in rep.tensors if t.status == LOST]
    if not lost:
        return None
    shown = ", ".join(repr(n) for n in lost[:20]) + (f", ... ({len(lost) - 20} more)" if len(lost) > 20 else "")
    cls = TruncatedError if rep.truncated else IntegrityError
    return cls(f"{len(lost)} tensor(s) are lost: {shown}; pass partial=True to get the rest with None in "
               "their place", file=rep.file, tensor=lost[0])


def load_from_reader(reader: ContainerReader, map_location, errors: str, workers: int | None = None,
                      partial: bool = False, progress: bool = False) -> tuple[Any, Report]:
    """Decode every tensor (``workers`` at a time, so reading, checking and
    decoding overlap, while a prefetch downloads ahead from remote stores), then
    rebuild the object around them. A lost tensor raises IntegrityError naming
    every lost tensor, unless ``partial`` (then it is None in the object).
    ``progress=True`` shows a bar of the stored bytes decoded (on a terminal only)."""
    n = len(reader.tensors)
    workers = workers or DEFAULT_WORKERS
    # several tensors: one thread per tensor; a lone tensor: its segments on the threads
    dec = Decoder(reader, errors, workers=workers if n == 1 else 1)
    sizes = [stored_bytes(t) for t in reader.tensors]
    tables = devices = None

    def check_tree() -> None:
        nonlocal tables, devices
        tables = tree.check(reader.index.tree, n)
        devices = tree.entry_devices(reader.index.tree, n, tables)

    def placed(i: int, t: torch.Tensor | None):
        return None if t is None else place(t, map_location, devices[i], reader.name, reader.tensors[i].name)

    with reader.prefetch(rec for t in reader.tensors for rec in t.records) as plan:
        pooled = [i for i in range(n) if sizes[i] >= INLINE_BYTES] if workers > 1 and n > 1 else []
        if len(pooled) > 1 or (pooled and len(pooled) < n):
            inline = [i for i in range(n) if sizes[i] < INLINE_BYTES]
            order = inline + pooled
            loaded: list = [None] * n
            with ThreadPoolExecutor(workers, thread_name_prefix="dtdr-decode") as pool:
                # largest first, so that no big tensor starts last and leaves one core idle at the end;
                # in file order while a prefetch downloads the file in that order (a remote store)
                starts = pooled if plan.active else sorted(pooled, key=sizes.__getitem__, reverse=True)
                futures = {i: pool.submit(dec.tensor, i) for i in starts}
                try:
                    # the tree is checked, and the small tensors decoded, here while the workers
                    # run the big ones' GIL-free kernels; a malformed tree still fails the load
                    check_tree()
                    done = (placed(i, futures[i].result() if i in futures else dec.tensor(i)) for i in order)
                    for i, t in zip(order, byte_progress(done, [sizes[i] for i in order], progress, "load")):
                        loaded[i] = t
                except BaseException:  # a failure or Ctrl-C: do not decode the rest first
                    for future in futures.values():
                        future.cancel()
                    raise
        else:
            check_tree()  # before any data is read
            loaded = list(byte_progress((placed(i, dec.tensor(i)) for i in range(n)), sizes, progress, "load"))
    rep = dec.finish()
    error = None if partial else lost_tensors_error(rep)
    if error is not None:
        raise error
    obj = tree.unflatten(reader.index.tree, loaded.__getitem__, tables)
    return obj, rep


def load_file(f, map_location=None, *, errors: str = "recover", storage_options: Mapping | None = None,
              report: bool = False, max_workers: int | None = None, partial: bool = False,
              workers: int | None = None, progress: bool = False):
    """Load an object from a DTDR file (what :func:`torch_dtdr.api.load` does for one).

    ``map_location`` takes torch.load's forms (a device string or
    ``torch.device``, a dict remapping saved device tags, or a callable
    ``(storage, location)``). ``errors="recover"`` (the default) repairs what
    parity can, degrades damaged float regions gracefully and warns with a
    :class:`~torch_dtdr.errors.DamageWarning`; ``"strict"`` raises
    :class:`~torch_dtdr.errors.IntegrityError` unless every tensor is bit-exact.
    A tensor that cannot be recovered at all (lost: a truncated file, say)
    raises :class:`~torch_dtdr.errors.IntegrityError` (``TruncatedError``
    for a truncated file) naming every lost tensor, whatever ``errors`` is;
    ``partial=True`` (with ``errors="recover"``) returns the rest instead,
    with ``None`` in place of each lost tensor, and the report and the
    DamageWarning list the lost ones.
    With ``report=True`` returns ``(obj, Report)``. ``max_workers`` bounds the
    concurrent range requests to a remote store (default
    :data:`torch_dtdr.storage.DEFAULT_MAX_WORKERS`).
    """
    check_errors(errors, partial)
    with open_source(f, storage_options, max_workers=max_workers) as src:
        obj, rep = load_from_reader(ContainerReader(src), map_location, errors, workers=workers, partial=partial,
                                    progress=progress)
    return (obj, rep) if report else obj


def byte_progress(items, sizes, enabled: bool, desc: str):
    """``items`` behind a tqdm bar counting bytes (``sizes[i]`` once item ``i`` is done): rate and ETA in
    bytes, shown only on a terminal (``disable=None``); ``items`` as they are when not ``enabled``."""
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    sizes = list(sizes)
    with tqdm(total=sum(sizes), desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              disable=None) as bar:
        for i, item in enumerate(items):  # every item, whatever ``sizes`` holds
            yield item
            bar.update(sizes[i] if i < len(sizes) else 0)


def byte_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar of ``total`` bytes (rate and ETA in bytes), shown only on a terminal (``disable=None``);
    one that shows nothing when not ``enabled``. ``update(n)`` as ``n`` more bytes are done; close it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled else True)


def stored_bytes(t: TensorInfo) -> int:
    """The bytes tensor ``t``'s records take in the file (what a byte progress bar counts)."""
    return sum(r.end - r.offset for r in t.records)
