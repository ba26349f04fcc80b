"""The container reader: finds the index, reads byte ranges of the logical
stream, verifies every chunk, repairs with parity, and hands codecs their
sections together with what could not be restored.

Locating the index, most trusted first:
1. the trailer in the last page, pointing at the footer blobs;
2. without a valid trailer, a backward scan of page-aligned footer blobs;
3. without any footer (a truncated file), the superblock, the head manifest
   and a forward scan of the self-describing records.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..codecs.base import Damage
from ..errors import FormatError, TruncatedError
from ..integrity.checksum import chunk_hashes, hash64
from ..integrity.inner import InnerCode
from ..integrity.parity import ErasureCode, WorkBudget
from ..integrity.vote import bitwise_majority
from . import constants
from .index import Index, RecordInfo, check_record_size, decompress_index, parse_index
from .layout import Geometry
from .records import BlobHeader, RecordHeader, Superblock, Trailer, check_flags, check_geometry, padded

_SCAN_STEP = 1 << 20
#: Remote spans are fetched in parts of this size, concurrently.
_SPAN_PART = 1 << 19
_MAX_TAIL_SCAN = 1 << 28
#: Index candidates found by the blob scan are read and hashed until this many
#: bytes plus twice the file size have been spent (linear time on hostile files
#: that are full of valid-looking blob headers).
_MAX_TRY_BYTES = 1 << 26


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """``ranges`` sorted, with empty ones dropped and overlapping or touching ones joined."""
    if type(ranges) is list and len(ranges) < 2:  # the common case of a clean read: nothing to sort
        return [(s, e) for s, e in ranges if e > s] if ranges else []
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


@dataclass
class ReadResult:
    """Bytes of a logical range and what happened to them."""

    data: memoryview
    bad: list[tuple[int, int]] = field(default_factory=list)  # logical ranges left damaged
    repaired: list[tuple[int, int]] = field(default_factory=list)  # logical ranges restored by parity
    missing_from: int | None = None  # logical offset where the file ends, if inside the range
    #: bytes of the range that were wrong as stored and were restored (counted byte by byte, stored
    #: against restored, within ``repaired``)
    wrong_bytes: int = 0


@dataclass
class SegmentData:
    """The sections of one record, ready for a codec."""

    sections: dict[str, bytes | memoryview]
    damage: Damage
    repaired: list[tuple[int, int]]  # logical ranges restored (by parity, or by voting between copies)
    bad: list[tuple[int, int]]  # logical ranges left damaged: whole checksum chunks, clipped to the record
    #: bytes that were wrong as stored and were restored, counted byte by byte (never more than ``repaired`` spans)
    wrong_bytes: int = 0


@dataclass
class SectionData:
    """Bytes of (a range of) one section, read on their own."""

    data: bytes | memoryview
    damage: list[tuple[int, int]]  # ranges of ``data`` left damaged
    repaired: list[tuple[int, int]]  # logical ranges restored (by parity, or by voting between copies)
    bad: list[tuple[int, int]]  # logical ranges left damaged
    wrong_bytes: int = 0  # bytes restored by parity, counted byte by byte


class ContainerReader:
    """Random access to a DTDR container held by a storage ``Source``."""

    def __init__(self, source, *, max_workers: int | None = None):
        self.source = source
        self.name = source.name
        self.size = source.size
        self.max_workers = max_workers
        self.events: list[str] = []  # container-level damage found while opening
        self.truncated = False
        # outcomes of stripe repairs, so each stripe is repaired at most once per
        # open file: the restored data chunks ({slot: bytes}; evicted, least
        # recently used first, past STRIPE_CACHE_BYTES), and the stripes beyond
        # repair (kept for good: an int each)
        self._stripe_cache: OrderedDict[int, dict[int, bytes]] = OrderedDict()
        self._stripes_beyond_repair: set[int] = set()
        self._stripes_in_repair: dict[int, threading.Event] = {}
        self._stripe_cache_bytes = 0
        self.stripe_repairs = 0  # repairs run (not served from the cache)
        self._correction_budget: WorkBudget | None = None
        self._lock = threading.Lock()
        self._sums: list[np.ndarray] | None = None
        self._data_sums: tuple | None = None  # (the _sums it was made from, their data-chunk entries)
        self._footer_blobs: list[tuple[int, int, int]] = []
        self._patched: dict[int, bytes] = {}  # data chunk -> bytes corrected without checksums (no footer)
        self._try_budget = 2 * self.size + _MAX_TRY_BYTES
        if self.size == 0:
            raise TruncatedError("file is empty", file=self.name, byte_range=(0, 0))
        self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        tail_len = min(self.size, constants.PAGE)
        tail = self.source.read(self.size - tail_len, tail_len)
        trailer = Trailer.parse(tail, file=self.name)
        if trailer is not None and self._open_from_trailer(trailer):
            return
        if trailer is None:
            self.events.append("trailer damaged or missing")
        if self._open_from_blob_scan():
            return
        self._open_from_scan()

    def _set_geometry(self, chunk_size, k, m, algorithm, n_data_chunks, inner_nsym=0) -> None:
        check_geometry(chunk_size, k, m, self.name)
        check_flags(inner_nsym, self.name)
        self.geometry = Geometry(chunk_size, k, m, n_data_chunks, inner_nsym)
        self.algorithm = algorithm
        self._code = None
        self._inner = InnerCode(chunk_size, inner_nsym) if inner_nsym else None

    @property
    def verifies_chunks(self) -> bool:
        """Whether the file's chunk checksums were found, so that any byte
        range read with :meth:`read_logical` is checked (and repaired) chunk by
        chunk, without reading the rest of its record."""
        return self._sums is not None

    @property
    def correction_budget(self) -> WorkBudget:
        """What column correction may still spend on this open file: a multiple
        of the stream length (what a clean load decodes) plus a constant."""
        if self._correction_budget is None:
            self._correction_budget = WorkBudget(constants.CORRECTION_WORK_PER_BYTE * self.stream_length
                                                 + constants.CORRECTION_WORK_BASE)
        return self._correction_budget

    @property
    def code(self) -> ErasureCode:
        if self._code is None:
            self._code = ErasureCode(self.geometry.k, self.geometry.m, self.algorithm)
        return self._code

    def _read_blob_copies(self, plan, kind, length, digest) -> tuple[bytes | None, list[bytes]]:
        """Return (verified payload or None, all copies read)."""
        offsets = [off for k, _copy, off in plan if k == kind and off + constants.BLOB_HEAD_SIZE + length <= self.size]
        copies = []
        for i, off in enumerate(offsets):
            raw = self.source.read(off + constants.BLOB_HEAD_SIZE, length)
            copies.append(raw)
            if len(raw) == length and hash64(raw) == digest:
                if i:
                    self.events.append(f"{_KIND_NAMES[kind]} copies 0..{i - 1} damaged; copy {i} used")
                return bytes(raw), copies
        full = [c for c in copies if len(c) == length]
        if len(full) >= 2:
            voted = bitwise_majority(full)
            if hash64(voted) == digest:
                self.events.append(f"every {_KIND_NAMES[kind]} copy damaged; restored by bitwise vote")
                return voted, copies
        return None, copies

    def _open_from_trailer(self, t: Trailer) -> bool:
        self._set_geometry(t.chunk_size, t.k, t.m, t.parity_algorithm, t.n_data_chunks, t.flags & 0xFF)
        if self.geometry.physical_end != t.footer_offset or t.stream_length > t.n_data_chunks * t.chunk_size:
            self.events.append("trailer inconsistent with its geometry")
            return False
        if t.index_length > constants.MAX_INDEX_BYTES or t.chunksums_length != 8 * self.geometry.n_chunks_total:
            self.events.append("trailer declares impossible footer sizes")
            return False
        plan = t.blob_offsets()
        self._footer_blobs = [(kind, off, off + padded(constants.BLOB_HEAD_SIZE + (t.index_length if kind == constants.BLOB_KIND_INDEX
                                                                         else t.chunksums_length)))
                              for kind, _copy, off in plan]
        raw, _ = self._read_blob_copies(plan, constants.BLOB_KIND_INDEX, t.index_length, t.index_digest)
        if raw is None:
            self.events.append("every index copy damaged beyond voting")
            return False
        sums, sum_copies = self._read_blob_copies(plan, constants.BLOB_KIND_CHUNKSUMS, t.chunksums_length, t.chunksums_digest)
        index = parse_index(decompress_index(raw, self.name, self.size), file=self.name)
        if index.stream_length != t.stream_length:
            raise FormatError(f"the index says the stream has {index.stream_length} bytes, the trailer "
                              f"{t.stream_length}", file=self.name, field="stream_length")
        self._install_index(index)
        self._install_sums(sums, sum_copies, t.chunksums_length)
        self.stream_length = t.stream_length
        return True

    def _install_sums(self, verified, copies, length) -> None:
        if verified is not None:
            self._sums = [np.frombuffer(verified, dtype="<u8")]
        else:
            self.events.append("every chunk-checksum copy damaged; chunks match against any copy")
            full = [c for c in copies if len(c) == length]
            if len(full) >= 3:
                full.insert(0, bitwise_majority(full))
            self._sums = [np.frombuffer(c, dtype="<u8") for c in full] or None
            if self._sums is None:
                self.events.append("no chunk checksums: only section checksums are checked")

    def _install_index(self, index: Index) -> None:
        self.index = index
        self.tensors = index.tensors
        self.by_name = {t.name: i for i, t in enumerate(index.tensors)}

    def _open_from_blob_scan(self) -> bool:
        """Find the footer by its self-checking blob headers, scanning back from
        the end. One valid index header locates every copy (they are laid out
        back to back), so copies whose own header is damaged still vote."""
        end = self.size - self.size % constants.PAGE
        scanned = 0
        tried: set[tuple[int, int, int]] = set()
        while end > 0 and scanned < _MAX_TAIL_SCAN:
            start = max(0, end - _SCAN_STEP)
            buf = self.source.read(start, end - start)
            for off in range(len(buf) - len(buf) % constants.PAGE - constants.PAGE, -1, -constants.PAGE):
                if buf[off:off + 8] != constants.BLOB_MAGIC:
                    continue
                head = BlobHeader.parse(buf, off)
                if head is None or head.kind != constants.BLOB_KIND_INDEX or head.length > constants.MAX_INDEX_BYTES:
                    continue
                span = padded(constants.BLOB_HEAD_SIZE + head.length)
                first = start + off - head.copy * span
                if (first, head.length, head.digest) in tried or first < 0:
                    continue
                tried.add((first, head.length, head.digest))
                if self._try_budget <= 0:
                    self.events.append("blob scan gave up: too many candidate index headers")
                    return False
                if self._try_index_at(first, head, span):
                    return True
            scanned += end - start
            end = start
        return False

    def _try_index_at(self, first: int, head: BlobHeader, span: int) -> bool:
        plan = [(constants.BLOB_KIND_INDEX, i, first + i * span) for i in range(max(head.ncopies, head.copy + 1))]
        self._try_budget -= 2 * head.length * sum(1 for _k, _c, off in plan
                                                  if off + constants.BLOB_HEAD_SIZE + head.length <= self.size)
        raw, _ = self._read_blob_copies(plan, constants.BLOB_KIND_INDEX, head.length, head.digest)
        if raw is None:
            return False
        try:
            index = parse_index(decompress_index(raw, self.name, self.size), file=self.name)
            g = index.geometry
            self._set_geometry(_gi(g, "chunk_size"), _gi(g, "k"), _gi(g, "m"), str(g.get("algorithm")),
                               _gi(g, "n_data_chunks"), _gi(g, "inner_nsym", 0))
            geo = self.geometry
            # the footer starts right after the striped region, which holds the whole stream
            if geo.physical_end > first or index.stream_length > geo.n_data_chunks * geo.chunk_size:
                raise FormatError("index geometry does not fit the file", file=self.name, field="geometry")
        except FormatError:
            return False
        self.events.append("footer located by scanning for its blobs")
        self._install_index(index)
        self.stream_length = index.stream_length
        length = 8 * self.geometry.n_chunks_total
        sums_first = first + len(plan) * span
        sums_span = padded(constants.BLOB_HEAD_SIZE + length)
        digest = None
        for i in range(8):
            h = BlobHeader.parse(self.source.read(sums_first + i * sums_span, constants.BLOB_HEAD_SIZE))
            if h is None:
                continue
            if h.kind == constants.BLOB_KIND_CHUNKSUMS and h.length == length:
                digest = h.digest
                n = h.ncopies
                break
        if digest is None:
            self._install_sums(None, [], length)
            return True
        expected_end = sums_first + n * sums_span + constants.PAGE
        if self.size < expected_end:
            self.truncated = True
            self.events.append(f"file ends {expected_end - self.size} bytes early, inside its footer")
        plan = [(constants.BLOB_KIND_CHUNKSUMS, i, sums_first + i * sums_span) for i in range(n)]
        verified, copies = self._read_blob_copies(plan, constants.BLOB_KIND_CHUNKSUMS, length, digest)
        self._install_sums(verified, copies, length)
        return True

    def _open_from_scan(self) -> None:
        """No usable footer: rebuild the index from the head manifest and the records."""
        head = self.source.read(0, min(self.size, constants.PAGE))
        try:
            sb = Superblock.parse(head, file=self.name)
            c, k, m, algorithm, inner = sb.chunk_size, sb.k, sb.m, sb.parity_algorithm, sb.flags & 0xFF
        except FormatError as error:
            c, k, m, algorithm, inner = self._geometry_from_head_manifest(head, error)
        self.truncated = True
        self.events.append("no usable footer: the file is truncated or its end is destroyed; records scanned")
        stripe_span = Geometry(c, k, m, k, inner).stripe_span
        full, rest = divmod(self.size, stripe_span)
        n_data = full * k + min(k, -(-rest // c))
        self._set_geometry(c, k, m, algorithm, n_data, inner)
        self.stream_length = min(n_data * c, full * k * c + min(rest, k * c))
        self._correct_without_sums()
        stream = bytes(self.read_logical(0, self.stream_length, verify=False).data)
        pos = constants.SUPERBLOCK.size
        header = RecordHeader.parse(stream, pos, file=self.name)
        if header.kind != constants.RECORD_KIND_MANIFEST or len(header.sections) != 1:
            raise FormatError("the first record is not the manifest", file=self.name, byte_range=(pos, pos + header.size))
        body = bytes(stream[pos + header.size: pos + header.size + header.sections[0].length])
        if len(body) != header.sections[0].length or hash64(body) != header.sections[0].digest:
            raise TruncatedError("the file ends inside its manifest", file=self.name,
                                 byte_range=(pos, pos + header.size + header.sections[0].length))
        index = parse_index(body, file=self.name, require_records=False)
        covered = [0] * len(index.tensors)
        pos += header.size + header.body_length
        while pos < len(stream):
            rec = None
            if _header_hash_ok(stream, pos):  # cheap test first: a hostile stream may be all magic
                try:
                    rec = RecordHeader.parse(stream, pos, file=self.name)
                except FormatError:
                    pass
            if rec is None:
                pos = stream.find(constants.RECORD_MAGIC, pos + 1)
                if pos < 0:
                    break
                continue
            if rec.kind == constants.RECORD_KIND_SEGMENT and rec.tensor_id < len(index.tensors):
                t = index.tensors[rec.tensor_id]
                info = RecordInfo(pos, rec.size, rec.elem_start, rec.elem_count, rec.sections)
                if (rec.elem_start == covered[rec.tensor_id] and rec.elem_count <= t.segment_elems
                        and rec.elem_start + rec.elem_count <= t.numel and (rec.elem_count or not t.numel)
                        and len({x.name for x in rec.sections}) == len(rec.sections)
                        and self._plausible(info, t.dtype.itemsize)):
                    t.records.append(info)
                    covered[rec.tensor_id] += rec.elem_count
            pos += rec.size + rec.body_length
        self._install_index(index)
        self._sums = None

    def _geometry_from_head_manifest(self, head: bytes, error: FormatError) -> tuple[int, int, int, str, int]:
        """The geometry recorded in the head manifest, for a footer-less file
        whose superblock is damaged. The first stripe's data chunks lie back to
        back at the start of the file, so the manifest is read without knowing
        the chunk size; its own header hash and section digest must verify,
        else ``error`` (the superblock's) is raised."""
        try:
            header = RecordHeader.parse(head, constants.SUPERBLOCK.size, file=self.name)
        except FormatError:
            raise error from None
        if header.kind != constants.RECORD_KIND_MANIFEST or len(header.sections) != 1 \
                or header.sections[0].length > self.size:
            raise error
        start = constants.SUPERBLOCK.size + header.size
        body = bytes(self.source.read(start, header.sections[0].length))
        if len(body) != header.sections[0].length or hash64(body) != header.sections[0].digest:
            raise error
        g = parse_index(body, file=self.name, require_records=False).geometry
        geometry = (_gi(g, "chunk_size"), _gi(g, "k"), _gi(g, "m"), str(g.get("algorithm")), _gi(g, "inner_nsym", 0))
        check_geometry(*geometry[:3], self.name)
        check_flags(geometry[4], self.name)
        self.events.append("superblock damaged; geometry taken from the head manifest")
        return geometry

    def _correct_without_sums(self) -> None:
        """Without a footer there are no chunk checksums, but the stripes still
        carry parity: where a stripe's parity disagrees with its data, locate
        the wrong bytes column by column with the stripe's code (every chunk a
        suspect) and keep the corrected data chunks, which later reads of the
        stream see. Section and header hashes judge every record afterwards, so
        a miscorrection can only leave damage reported as damage."""
        g = self.geometry
        if g.m < 2:
            return
        c = g.chunk_size
        for stripe in range(g.n_stripes):
            d = g.data_chunks_in(stripe)
            n = d + g.m
            raw = self.source.read(stripe * g.stripe_span, n * c)
            if len(raw) < n * c:
                break  # the stripe is cut by the end of the file: its parity is gone
            chunks = [raw[i * c:(i + 1) * c] for i in range(n)]
            full = chunks[:d] + [bytes(c)] * (g.k - d) + chunks[d:]
            try:
                corrected = self.code.correct(full, [i for i in range(g.k + g.m) if i < d or i >= g.k],
                                              budget=self.correction_budget)
            except Exception:  # noqa: BLE001 - a failed correction leaves damage, reported by the section hashes
                continue
            for slot, data in corrected.items():
                if slot < d:
                    self._patched[stripe * g.k + slot] = data
        if self._patched:
            self.events.append(f"{len(self._patched)} chunks corrected by parity without chunk checksums")

    def _plausible(self, rec: RecordInfo, itemsize: int) -> bool:
        """Whether a record header found by the scan has sizes a writer could
        produce; one cut by the end of the file must decode to at most
        MAX_DECODE_RATIO bytes per byte present, plus MAX_TRUNCATED_RECORD."""
        try:
            check_record_size(rec, itemsize)
        except FormatError:
            return False
        if rec.end > self.stream_length:
            present = max(0, self.stream_length - rec.body_start)
            if rec.elem_count * itemsize > constants.MAX_DECODE_RATIO * present + constants.MAX_TRUNCATED_RECORD:
                self.events.append(f"record at {rec.offset} is cut by the end of the file and too large to decode")
                return False
        return True

    # ------------------------------------------------------------------ reading
    def _chunk_ok(self, table_index: int, data) -> bool:
        digest = hash64(data)
        return any(table_index < len(s) and int(s[table_index]) == digest for s in self._sums)

    def _bad_chunks(self, first_chunk: int, buf: memoryview) -> list[int]:
        """Positions in ``buf`` (chunks from ``first_chunk`` on) of the chunks that match no checksum table."""
        if 0 < len(buf) <= self.geometry.chunk_size:  # one chunk (a small tensor's record): no arrays
            digest = hash64(buf)
            return [] if any(first_chunk < len(table) and int(table[first_chunk]) == digest
                             for table in self._data_chunk_sums()) else [0]
        hashes = chunk_hashes(buf, self.geometry.chunk_size)
        n = len(hashes)
        if not n:
            return []
        tables = self._data_chunk_sums()
        if n <= 4:  # a small tensor's record: comparing plain lists beats numpy
            got = hashes.tolist()
            if any(table[first_chunk: first_chunk + n].tolist() == got for table in tables):
                return []
        elif len(tables) == 1 and len(tables[0]) >= first_chunk + n:
            differ = hashes != tables[0][first_chunk: first_chunk + n]
            return np.flatnonzero(differ).tolist() if differ.any() else []
        ok = np.zeros(n, dtype=bool)
        for table in tables:
            part = table[first_chunk: first_chunk + n]
            ok[: len(part)] |= part == hashes[: len(part)]
        return [] if ok.all() else np.flatnonzero(~ok).tolist()

    def _data_chunk_sums(self) -> list[np.ndarray]:
        """Each checksum table's entries for the data chunks, in data-chunk order (parity chunks' entries
        left out), cut where the table ends; made once per set of tables."""
        if self._data_sums is None or self._data_sums[0] is not self._sums:
            g = self.geometry
            span = g.k + g.m

            def covered(length: int) -> int:  # data chunks whose entries lie inside a table of this length
                return length // span * g.k + min(length % span, g.k)

            j = np.arange(max(covered(len(table)) for table in self._sums), dtype=np.int64)
            idx = (j // g.k) * span + j % g.k
            self._data_sums = (self._sums, [table[idx[: covered(len(table))]] for table in self._sums])
        return self._data_sums[1]

    def read_logical(self, start: int, end: int, verify: bool = True, patched: bool = True) -> ReadResult:
        """Bytes of logical ``[start, end)``, checked chunk by chunk and repaired
        by parity where possible. Damaged bytes that cannot be repaired are left
        in place and reported in ``bad``; bytes past the end of the file are zero
        and reported in ``bad`` and ``missing_from``. ``patched=False``: without
        the corrections made by parity syndromes in a footer-less file."""
        g = self.geometry
        c = g.chunk_size
        if end <= start:
            return ReadResult(memoryview(b""))
        a = start // c * c
        b = -(-end // c) * c
        pieces = g.physical_ranges(a, b)
        # uninitialised (no zero fill of what the read overwrites); past the end of the file: zeros
        buf = memoryview(np.empty(b - a, np.uint8))
        missing_from = self._read_pieces_into(pieces, buf, a)
        if missing_from is not None:
            buf[missing_from - a:] = bytes(b - missing_from)
        result = ReadResult(buf)
        for j in (range(a // c, b // c) if self._patched and patched else ()):
            if j in self._patched:
                # counted, though not reported as a repaired range: the file-level event reports these corrections
                result.wrong_bytes += _differing_bytes(buf, a, self._patched[j], j * c, start, end)
                buf[j * c - a: (j + 1) * c - a] = self._patched[j]
        if missing_from is not None:
            self.truncated = True
            result.missing_from = max(missing_from, start)
        if verify and self._sums is not None:
            avail = b if missing_from is None else missing_from // c * c
            if avail > a:
                for i in self._bad_chunks(a // c, memoryview(buf)[: avail - a]):
                    j = a // c + i
                    fixed = self._repair_chunk(j)
                    lo, hi = j * c, (j + 1) * c
                    if fixed is not None:
                        result.wrong_bytes += _differing_bytes(buf, a, fixed, lo, start, end)
                        buf[lo - a: hi - a] = fixed
                        result.repaired.append((max(lo, start), min(hi, end)))
                    else:
                        result.bad.append((max(lo, start), min(hi, end)))
        if missing_from is not None:
            result.bad.append((max(missing_from, start), end))
        result.bad = merge_ranges(result.bad)
        result.repaired = merge_ranges(result.repaired)
        result.data = memoryview(buf)[start - a: end - a]
        return result

    def _requests(self, pieces) -> list[tuple[int, int]]:
        """The physical reads behind ``(logical, physical, length)`` pieces. Pieces
        of one read are separated only by parity (m chunks per stripe), so they
        are fetched as one span and sliced: ~m/k more bytes, far fewer requests
        (what matters on object stores)."""
        if len(pieces) <= 1 or not self.geometry.m:
            return [(p, n) for _l, p, n in pieces]
        first = pieces[0][1]
        return [(first, pieces[-1][1] + pieces[-1][2] - first)]

    def _read_pieces_into(self, pieces, buf: memoryview, base: int) -> int | None:
        """Read ``(logical, physical, length)`` pieces into ``buf`` (logical
        offset ``base`` at index 0) with scatter reads: a span's parity gaps go
        to a scratch buffer, so the data lands in place without a gather copy.
        Returns the logical offset where the file's bytes end (None when every
        piece was read whole); the rest of ``buf`` is left as it was."""
        if len(pieces) == 1:  # within one stripe: one read straight into place
            lstart, phys, n = pieces[0]
            got = self.source.read_into(phys, [buf[lstart - base: lstart - base + n]], part_size=_SPAN_PART)
            return None if got >= n else lstart + max(0, got)
        requests = self._requests(pieces)
        groups = [pieces] if len(requests) < len(pieces) else [[p] for p in pieces]
        gap_scratch = None
        for (offset, _length), group in zip(requests, groups):
            views = []
            pos = offset
            for lstart, phys, n in group:
                if phys > pos:
                    if gap_scratch is None or len(gap_scratch) < phys - pos:
                        gap_scratch = bytearray(phys - pos)
                    views.append(memoryview(gap_scratch)[: phys - pos])
                views.append(buf[lstart - base: lstart - base + n])
                pos = phys + n
            got = self.source.read_into(offset, views, part_size=_SPAN_PART if len(requests) == 1 else None)
            for lstart, phys, n in group:
                filled = min(n, max(0, got - (phys - offset)))
                if filled < n:
                    return lstart + filled
        return None

    def record_reads(self, rec: RecordInfo) -> list[tuple[int, int]]:
        """The physical ``(offset, length)`` reads :meth:`read_record` makes for
        ``rec`` on an undamaged file (damage adds parity reads)."""
        c = self.geometry.chunk_size
        end = min(rec.end, self.stream_length)
        if end <= rec.body_start:
            return []
        return self._requests(self.geometry.physical_ranges(rec.body_start // c * c, -(-end // c) * c))

    def prefetch(self, records: Iterable[RecordInfo], also: Iterable[tuple[int, int]] = ()):
        """Fetch ahead what reading ``records`` (and the physical ranges
        ``also``) needs (a context manager; see
        :meth:`torch_dtdr.storage.Source.prefetch`). A part is dropped once
        every planned read of it has been served. The reads are worked out
        only if the source prefetches (local files do not)."""
        reads = itertools.chain((r for rec in records for r in self.record_reads(rec)), also)
        return self.source.prefetch(reads, max_workers=self.max_workers)

    def _repair_chunk(self, j: int) -> bytes | None:
        g = self.geometry
        if not g.m:
            return None
        stripe, slot = divmod(j, g.k)
        outcome = self._stripe_outcome(stripe)
        return None if outcome is None else outcome.get(slot)

    def _stripe_outcome(self, stripe: int) -> dict[int, bytes] | None:
        """The repaired data chunks of ``stripe`` (None: beyond repair), from the
        cache or from one :meth:`_repair_stripe`, whose outcome is then kept."""
        while True:
            with self._lock:
                if stripe in self._stripes_beyond_repair:
                    return None
                if stripe in self._stripe_cache:
                    self._stripe_cache.move_to_end(stripe)
                    return self._stripe_cache[stripe]
                running = self._stripes_in_repair.get(stripe)
                if running is None:
                    running = self._stripes_in_repair[stripe] = threading.Event()
                    break
            running.wait()  # another thread is repairing this stripe: take its outcome
        try:
            outcome = self._repair_stripe(stripe)
        except BaseException:
            with self._lock:
                del self._stripes_in_repair[stripe]
            running.set()
            raise
        with self._lock:
            del self._stripes_in_repair[stripe]
            self.stripe_repairs += 1
            if outcome is None:
                self._stripes_beyond_repair.add(stripe)
            elif stripe not in self._stripe_cache:
                self._stripe_cache[stripe] = outcome
                self._stripe_cache_bytes += sum(len(x) for x in outcome.values())
                while self._stripe_cache_bytes > constants.STRIPE_CACHE_BYTES and len(self._stripe_cache) > 1:
                    _old, chunks = self._stripe_cache.popitem(last=False)
                    self._stripe_cache_bytes -= sum(len(x) for x in chunks.values())
        running.set()
        return outcome

    def _repair_stripe(self, stripe: int) -> dict[int, bytes] | None:
        """Restore a stripe's damaged chunks: first each damaged chunk through its
        inner code (archive level); then, when more than m chunks are still
        damaged, byte errors located column by column by the stripe's own code
        (:meth:`ErasureCode.correct`, within the file's correction budget); then
        the erasure code across the stripe. Returns ``{slot: bytes}`` for the
        data chunks that were damaged and are restored (``{}`` when only parity
        chunks were), or None when the stripe is beyond repair."""
        g = self.geometry
        c = g.chunk_size
        d = g.data_chunks_in(stripe)
        n = d + g.m
        base = stripe * g.stripe_span
        raw = self.source.read(base, n * c + n * g.inner_size)
        if len(raw) < n * c:
            return None
        slots: list[bytes | None] = []
        damaged: dict[int, bytes] = {}
        was_bad = []
        for s in range(n):
            idx = g.chunk_index(stripe, s)
            piece = raw[s * c:(s + 1) * c]
            if not self._chunk_ok(idx, piece):
                if s < d:
                    was_bad.append(s)
                fixed, decoded = self._inner_fix(piece, raw, n * c + s * g.inner_size)
                if fixed is not None and (self._chunk_ok(idx, fixed) or (decoded and self._sum_disputed(idx))):
                    piece = fixed
                else:
                    damaged[s] = fixed if fixed is not None else piece
                    piece = None
            slots.append(piece)
        if len(damaged) > g.m:
            self._correct_columns(stripe, slots, damaged)
        if sum(x is None for x in slots) > g.m:
            return None
        full = slots[:d] + [bytes(c)] * (g.k - d) + slots[d:]
        try:
            rebuilt = self.code.rebuild(full)
        except Exception:  # noqa: BLE001 - a failed repair is reported as damage, never raised
            return None
        out = [rebuilt.get(s, slots[s]) for s in range(d)]
        if not all(self._chunk_ok(g.chunk_index(stripe, s), out[s]) or self._sum_disputed(g.chunk_index(stripe, s))
                   for s in rebuilt):
            return None
        return {s: bytes(out[s]) for s in was_bad}

    def _correct_columns(self, stripe: int, slots: list, damaged: dict[int, bytes]) -> None:
        """Fix, in ``slots``, the damaged chunks whose byte errors the stripe's
        code can locate; a chunk counts as fixed only when its checksum agrees."""
        g = self.geometry
        c = g.chunk_size
        d = g.data_chunks_in(stripe)
        stored = [damaged.get(s, slots[s]) for s in range(d + g.m)]
        full = stored[:d] + [bytes(c)] * (g.k - d) + stored[d:]  # a short stripe's missing chunks are zeros
        to_slot = {s if s < d else s + g.k - d: s for s in damaged}
        try:
            corrected = self.code.correct(full, list(to_slot), budget=self.correction_budget)
        except Exception:  # noqa: BLE001 - a failed repair is reported as damage, never raised
            return
        for pos, data in corrected.items():
            s = to_slot[pos]
            if self._chunk_ok(g.chunk_index(stripe, s), data):
                slots[s] = data

    def _sum_disputed(self, idx: int) -> bool:
        """Whether the checksum entry of chunk ``idx`` is itself damaged (its
        copies disagree), so it cannot judge the chunk: then a chunk restored by
        a code whose own check passed is trusted."""
        if self._sums is None or len(self._sums) < 2:
            return False
        values = {int(t[idx]) for t in self._sums if idx < len(t)}
        return len(values) > 1

    def _inner_fix(self, chunk: bytes, raw: bytes, offset: int) -> tuple[bytes | None, bool]:
        """The chunk corrected by its inner code, and whether every codeword decoded."""
        if self._inner is None:
            return None, False
        parity = raw[offset:offset + self.geometry.inner_size]
        if len(parity) < self.geometry.inner_size:
            return None, False
        data, status = self._inner.decode(chunk, parity)
        return data.tobytes(), bool(status[0] >= 0)

    def read_record(self, rec: RecordInfo) -> SegmentData:
        """Read and check the sections of one record (copies voted).

        Only bytes of the stream are read: a record cut by the end of a
        truncated file gets short sections, damaged past the cut (so a hostile
        record header cannot make the reader allocate what the file lacks)."""
        intact = self._read_intact_record(rec)
        if intact is not None:
            return intact
        base = rec.body_start
        end = max(base, min(rec.end, self.stream_length))
        res = self.read_logical(base, end)
        if end == rec.end and not res.bad and not self._patched and self._sums is not None:
            intact = self._intact_sections(rec, res)
            if intact is not None:
                return intact
        if end < rec.end:
            self.truncated = True
            res.bad = merge_ranges(res.bad + [(end, rec.end)])
            if res.missing_from is None:
                res.missing_from = end
        data = res.data
        sections: dict[str, bytes | memoryview] = {}
        damage = Damage()
        missing = set()
        pos = 0
        verified = self._sums is not None
        unpatched = None
        wrong_bytes = res.wrong_bytes
        voted: list[tuple[int, int]] = []
        for s in rec.sections:
            copies = []
            for i in range(s.copies):
                lo = pos + i * s.length
                copy_bad = [(0, s.length)] if not verified else [(max(x, base + lo) - base - lo, min(y, base + lo + s.length) - base - lo)
                            for x, y in res.bad if x < base + lo + s.length and y > base + lo]
                copies.append((data[lo: lo + s.length], copy_bad))
            if any(len(mv) < s.length for mv, _bad in copies):
                # the stream ends inside this section; copies lie back to back, so at most one is partial
                whole = [c for c in copies if len(c[0]) == s.length]
                copies = whole or [max(copies, key=lambda c: len(c[0]))]
            pos += s.stored_length
            value, bad = _combine_copies(copies, s.digest)
            if bad and self._patched:
                # a byte column can be miscorrected without chunk checksums: the file's own bytes may verify
                if unpatched is None:
                    unpatched = self.read_logical(base, end, patched=False).data
                lo = pos - s.stored_length
                plain = [(unpatched[lo + i * s.length: lo + (i + 1) * s.length], bad_copy)
                         for i, (_mv, bad_copy) in enumerate(copies)]
                plain_value, plain_bad = _combine_copies(plain, s.digest) if all(
                    len(mv) == len(c[0]) for (mv, _b), c in zip(plain, copies)) else (value, bad)
                if not plain_bad:
                    value, bad = plain_value, plain_bad
            sections[s.name] = value
            if bad:
                damage.ranges[s.name] = bad
                if res.missing_from is not None and res.missing_from <= base + pos - s.stored_length:
                    missing.add(s.name)
            elif verified and len(copies) > 1:
                # damaged chunks of some copies, restored by another copy or the vote: repaired bytes
                lo = pos - s.stored_length
                for i, (mv, copy_bad) in enumerate(copies):
                    for x, y in copy_bad:
                        wrong_bytes += _differing_bytes(mv, 0, value, 0, x, y)
                        voted.append((base + lo + i * s.length + x, base + lo + i * s.length + y))
        damage.missing = frozenset(missing)
        if voted:
            return SegmentData(sections, damage, merge_ranges(res.repaired + voted), subtract_ranges(res.bad, voted),
                               wrong_bytes)
        return SegmentData(sections, damage, res.repaired, res.bad, wrong_bytes)

    def _read_intact_record(self, rec: RecordInfo) -> SegmentData | None:
        """What :meth:`read_record` returns for a record that lies inside the stream and whose
        chunks and section digests all verify (the first copy of each section), read and checked
        in one pass without the bookkeeping for damage; a load spends most of a small tensor's
        time here. None for anything else (a file with parity corrections, no chunk checksums, a
        short read, a chunk or digest that differs): :meth:`read_record` then reads the record
        again and works out what is wrong and what can be restored."""
        if self._patched or self._sums is None or rec.end > self.stream_length or rec.end <= rec.body_start:
            return None
        c = self.geometry.chunk_size
        a = rec.body_start // c * c
        b = -(-rec.end // c) * c
        buf = memoryview(np.empty(b - a, np.uint8))
        if self._read_pieces_into(self.geometry.physical_ranges(a, b), buf, a) is not None \
                or self._bad_chunks(a // c, buf):
            return None
        sections = _first_copies(rec, buf[rec.body_start - a:])
        return None if sections is None else SegmentData(sections, Damage(), [], [], 0)

    def _intact_sections(self, rec: RecordInfo, res: ReadResult) -> SegmentData | None:
        """What :meth:`read_record` returns for a record whose chunks all verify and whose
        sections' first copies match their digests, without its per-copy bookkeeping (the
        common case, and most of a small tensor's load). None when any first copy differs:
        the general path votes the copies."""
        sections = _first_copies(rec, res.data)
        return None if sections is None else SegmentData(sections, Damage(), res.repaired, [], res.wrong_bytes)

    def read_section(self, rec: RecordInfo, name: str, start: int = 0, end: int | None = None) -> SectionData:
        """Bytes ``[start, end)`` (default: all) of section ``name`` of ``rec``, checked and repaired chunk by
        chunk, without reading the rest of the record. A section stored in copies is read whole, its copies
        voted as :meth:`read_record` does. Needs the file's chunk checksums (:attr:`verifies_chunks`) and a
        record within the stream; otherwise (and for an unknown name or range) FormatError."""
        pos = rec.body_start
        for spec in rec.sections:
            if spec.name == name:
                break
            pos += spec.stored_length
        else:
            raise FormatError(f"record has no section {name!r}", file=self.name, byte_range=(rec.offset, rec.end))
        end = spec.length if end is None else end
        whole = (start, end) == (0, spec.length)
        if (not self.verifies_chunks or rec.end > self.stream_length or not 0 <= start <= end <= spec.length
                or (spec.copies > 1 and not whole)):
            raise FormatError(f"cannot read bytes [{start}, {end}) of section {name!r} on their own",
                              file=self.name, byte_range=(pos, pos + spec.stored_length))
        if spec.copies == 1:
            res = self.read_logical(pos + start, pos + end)
            first = pos + start
            damage = [(x - first, y - first) for x, y in res.bad]
            if damage:
                # a chunk that fails its checksum may hold other bytes' damage: when the whole section
                # matches its digest, none of its bytes are damaged (as read_record judges it)
                whole_section = res.data if whole else self.read_logical(pos, pos + spec.length).data
                if hash64(whole_section) == spec.digest:
                    damage = []
            return SectionData(res.data, damage, res.repaired, res.bad, res.wrong_bytes)
        res = self.read_logical(pos, pos + spec.stored_length)
        copies = []
        for i in range(spec.copies):
            lo = pos + i * spec.length
            copies.append((res.data[i * spec.length:(i + 1) * spec.length],
                           [(max(x, lo) - lo, min(y, lo + spec.length) - lo) for x, y in res.bad
                            if x < lo + spec.length and y > lo]))
        value, bad = _combine_copies(copies, spec.digest)
        if bad:
            return SectionData(value, bad, res.repaired, res.bad, res.wrong_bytes)
        return SectionData(value, [], merge_ranges(res.repaired + res.bad), [], res.wrong_bytes)

    def scrub(self, batch_stripes: int = 64) -> list[str]:
        """Check every chunk of the striped region (data and parity, including
        the superblock and manifest, which a load never reads) and try parity
        on damaged stripes. Returns findings as readable lines (empty: clean)."""
        scrubber = self.scrubber(batch_stripes)
        with self.prefetch((), also=scrubber.reads()):
            return scrubber.finish()

    def scrubber(self, batch_stripes: int = 64) -> "Scrubber":
        """A :class:`Scrubber` that can run interleaved with tensor reads."""
        return Scrubber(self, batch_stripes)

    def _scrub_batch(self, first: int, last: int, start: int, end: int) -> tuple[int, int]:
        g = self.geometry
        c = g.chunk_size
        damaged = unrepairable = 0
        raw = self.source.read(start, end - start)
        for stripe in range(first, last):
            n = g.data_chunks_in(stripe) + g.m
            off = stripe * g.stripe_span - start
            piece = memoryview(raw)[off: off + n * c]
            if len(piece) < n * c:
                damaged += 1
                unrepairable += 1
                continue
            hashes = chunk_hashes(piece, c)
            idx = stripe * (g.k + g.m) + np.arange(n)
            ok = np.zeros(n, dtype=bool)
            for sums in self._sums:
                ok |= sums[idx] == hashes
            bad = int((~ok).sum())
            if bad:
                damaged += bad
                if self._stripe_outcome(stripe) is None:
                    unrepairable += 1
        return damaged, unrepairable

    # ------------------------------------------------------------------ mapping
    def physical(self, logical_ranges) -> list[tuple[int, int]]:
        """Physical byte ranges of logical ranges (for reports and errors)."""
        out = []
        for s, e in logical_ranges:
            for _l, p, n in self.geometry.physical_ranges(s, e):
                out.append((p, p + n))
        return merge_ranges(out)

    def regions(self) -> dict[str, list[tuple[int, int]]]:
        """Named physical regions of the file, for targeted fault injection."""
        g = self.geometry
        out: dict[str, list[tuple[int, int]]] = {"superblock": self.physical([(0, constants.SUPERBLOCK.size)])}
        parity = [(g.parity_chunk_offset(s, 0), g.parity_chunk_offset(s, 0) + g.m * g.chunk_size)
                  for s in range(g.n_stripes)] if g.m else []
        out["parity"] = merge_ranges(parity)
        for t in self.tensors:
            key = f"tensor:{t.name}"
            out[key] = self.physical([(r.offset, r.end) for r in t.records])
            spans: dict[str, list] = {}
            for r in t.records:
                pos = r.body_start
                for s in r.sections:
                    spans.setdefault(s.name, []).append((pos, pos + s.stored_length))
                    pos += s.stored_length
            for name, rs in spans.items():
                out[f"{key}:{name}"] = self.physical(rs)
        if not self.truncated:
            footer = g.physical_end
            out["footer"] = [(footer, self.size)]
            out["trailer"] = [(self.size - constants.TRAILER.size, self.size)]
        for kind, s, e in self._footer_blobs:
            out.setdefault("index" if kind == constants.BLOB_KIND_INDEX else "chunksums", []).append((s, e))
        return out


_KIND_NAMES = {constants.BLOB_KIND_INDEX: "index", constants.BLOB_KIND_CHUNKSUMS: "chunk-checksum table"}


_HEAD_FIXED = constants.RECORD_HEAD.size + constants.RECORD_HASH.size


class Scrubber:
    """Checks every chunk of a reader's striped region, batch by batch in file
    order, repairing what parity can in memory. :meth:`run_until` lets a
    caller interleave it with tensor reads, so that one prefetch serves both
    and the file is downloaded once (``verify``)."""

    def __init__(self, reader: ContainerReader, batch_stripes: int = 64):
        self.reader = reader
        self.damaged = self.unrepairable = 0
        g = reader.geometry
        self._batches: list[tuple[int, int, int, int]] = []
        if reader._sums is not None:
            for first in range(0, g.n_stripes, batch_stripes):
                last = min(g.n_stripes, first + batch_stripes)
                end = g.physical_end if last == g.n_stripes else last * g.stripe_span
                self._batches.append((first, last, first * g.stripe_span, end))
        self._next = 0

    def reads(self) -> list[tuple[int, int]]:
        """The physical ``(offset, length)`` reads the scrub makes, in order."""
        return [(start, end - start) for _f, _l, start, end in self._batches]

    def run_until(self, offset: int) -> None:
        """Scrub every remaining batch that ends at or before physical ``offset``."""
        while self._next < len(self._batches) and self._batches[self._next][3] <= offset:
            d, u = self.reader._scrub_batch(*self._batches[self._next])
            self.damaged += d
            self.unrepairable += u
            self._next += 1

    def finish(self) -> list[str]:
        """Scrub what remains; the findings as readable lines (empty: clean)."""
        self.run_until(self.reader.size)
        if not self.damaged:
            return []
        line = f"scrub: {self.damaged} damaged chunks"
        line += f", {self.unrepairable} stripes beyond repair" if self.unrepairable else ", all repairable by parity"
        return [line]


def _first_copies(rec: RecordInfo, body: memoryview) -> dict[str, memoryview] | None:
    """The first copy of each section of ``rec`` in ``body`` (the record's bytes after its
    header), or None when any of them differs from its digest."""
    sections: dict[str, memoryview] = {}
    pos = 0
    for spec in rec.sections:
        value = body[pos: pos + spec.length]
        if hash64(value) != spec.digest:
            return None
        sections[spec.name] = value
        pos += spec.stored_length
    return sections


def _header_hash_ok(stream: bytes, pos: int) -> bool:
    """Whether a self-consistent record header (magic, section count, hash) starts at ``pos``."""
    if stream[pos:pos + 4] != constants.RECORD_MAGIC or len(stream) < pos + _HEAD_FIXED:
        return False
    nsec = stream[pos + 5]
    size = _HEAD_FIXED + nsec * constants.RECORD_SECTION.size
    if nsec > constants.MAX_SECTIONS or len(stream) < pos + size:
        return False
    return int.from_bytes(stream[pos + size - 8:pos + size], "little") == hash64(stream[pos:pos + size - 8])


def _differing_bytes(buf, buf_start: int, chunk, chunk_start: int, start: int, end: int) -> int:
    """How many bytes of ``chunk`` (logical offset ``chunk_start``) differ from those of ``buf`` (logical
    offset ``buf_start``) inside ``[start, end)``: the wrong bytes a repair restores there."""
    lo, hi = max(chunk_start, start), min(chunk_start + len(chunk), end)
    if hi <= lo:
        return 0
    stored = np.frombuffer(bytes(buf[lo - buf_start: hi - buf_start]), dtype=np.uint8)
    restored = np.frombuffer(bytes(chunk[lo - chunk_start: hi - chunk_start]), dtype=np.uint8)
    return int(np.count_nonzero(stored != restored))


def subtract_ranges(ranges, cut) -> list[tuple[int, int]]:
    """``ranges`` without the bytes of ``cut`` (both lists of ``(start, end)``), merged."""
    out = []
    cut = merge_ranges(cut)
    for s, e in merge_ranges(ranges):
        for x, y in cut:
            if y <= s or x >= e:
                continue
            if x > s:
                out.append((s, x))
            s = max(s, y)
            if s >= e:
                break
        if s < e:
            out.append((s, e))
    return out


def _gi(d: dict, key: str, default=None) -> int:
    v = d.get(key, default)
    if type(v) is not int or not 0 <= v < 1 << 63:
        raise FormatError(f"geometry field {key} is missing or invalid", field=f"geometry.{key}")
    return v


def _combine_copies(copies, digest) -> tuple[bytes | memoryview, list[tuple[int, int]]]:
    """Pick or vote the content of a section stored in one or more copies.

    Returns the bytes and the byte ranges that remain unreliable (empty when
    the result matches the section's checksum)."""
    for mv, _bad in copies:
        if hash64(mv) == digest:
            return mv, []
    if len(copies) == 1:
        mv, bad = copies[0]
        value = bytes(mv)
        if hash64(value) == digest:
            return value, []
        return value, bad or [(0, len(value))]
    n = len(copies[0][0])
    arrays = [np.frombuffer(mv, dtype=np.uint8) for mv, _ in copies]
    voted = np.frombuffer(bitwise_majority([a.tobytes() for a in arrays]), dtype=np.uint8).copy()
    trusted = np.zeros(n, dtype=bool)
    for a, (_mv, bad) in zip(arrays, copies):
        good = np.ones(n, dtype=bool)
        for s, e in bad:
            good[s:e] = False
        take = good & ~trusted
        voted[take] = a[take]
        trusted |= good
    value = voted.tobytes()
    if hash64(value) == digest:
        return value, []
    agree = np.ones(n, dtype=bool)
    for a in arrays[1:]:
        agree &= a == arrays[0]
    uncertain = ~trusted & ~agree
    if not uncertain.any():
        uncertain[:] = ~trusted
        if not uncertain.any():
            uncertain[:] = True
    idx = np.flatnonzero(np.diff(np.concatenate(([0], uncertain.view(np.int8), [0]))))
    return value, [(int(s), int(e)) for s, e in zip(idx[::2], idx[1::2])]


def regions(path, storage_options=None) -> dict[str, list[tuple[int, int]]]:
    """Named physical byte ranges of a DTDR file (``index``, ``trailer``,
    ``parity``, ``tensor:<name>``, ``tensor:<name>:<section>``, ...)."""
    from ..storage import open_source

    with open_source(path, storage_options) as src:
        reader = ContainerReader(src)
        return reader.regions()


def looks_like_dtdr(source) -> bool:
    """Whether a storage ``Source`` holds a DTDR file, judged by its superblock
    magic, its trailer magic, or a footer blob header in its last pages (so a
    file whose first page is destroyed is still recognised)."""
    if source.size < 8:
        return False
    if source.read(0, 8) == constants.MAGIC:
        return True
    tail_len = min(source.size, 16 * constants.PAGE)
    tail = source.read(source.size - tail_len, tail_len)
    if tail[-constants.TRAILER.size:][:8] == constants.TRAILER_MAGIC:
        return True
    start = len(tail) % constants.PAGE
    return any(tail[off:off + 8] == constants.BLOB_MAGIC for off in range(start, len(tail), constants.PAGE))
