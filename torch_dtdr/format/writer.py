"""The one-pass container writer.

It never seeks back: records are appended to the logical stream, full stripes
are hashed, parity-encoded and written as soon as they fill, and the index
goes into the footer at the end. Memory held is one stripe plus the record
being written, whatever the size of the checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..integrity.checksum import chunk_hashes, hash64
from ..integrity.inner import InnerCode
from ..integrity.parity import ErasureCode
from . import constants
from .index import IndexText, compress_index, encode_index
from .records import BlobHeader, RecordHeader, SectionEntry, Superblock, Trailer, check_geometry, footer_plan, padded

#: A record whose sections' copies hold at most this many bytes is joined to its header and appended in one piece.
SMALL_RECORD_BYTES = 16 << 10


class _HashTable:
    """The chunk checksums, in one growing buffer: many small long-lived arrays
    between large temporary buffers keep the allocator from returning memory."""

    def __init__(self):
        self._buf = np.empty(1 << 12, dtype=np.uint64)
        self._n = 0

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.uint64).reshape(-1)
        if self._n + len(values) > len(self._buf):
            grown = np.empty(max(2 * len(self._buf), self._n + len(values)), dtype=np.uint64)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: self._n + len(values)] = values
        self._n += len(values)

    def array(self) -> np.ndarray:
        return self._buf[: self._n]


class ContainerWriter:
    """Streams a DTDR container into ``sink`` (anything with ``write(bytes)``; a
    :class:`~torch_dtdr.storage.Sink`'s ``write_all`` takes many stripes at once)."""

    def __init__(self, sink, *, chunk_size: int = constants.DEFAULT_CHUNK_SIZE, k: int = 32, m: int = 2,
                 index_copies: int = 7, chunksum_copies: int | None = None, algorithm: str | None = None,
                 inner_nsym: int = 0):
        check_geometry(chunk_size, k, m)
        self.sink = sink
        self._write_many = getattr(sink, "write_all", None)  # a storage Sink's; plain files write piece by piece
        self.chunk_size = chunk_size
        self.k = k
        self.m = m
        self.code = ErasureCode(k, m, algorithm) if algorithm else ErasureCode(k, m)
        self.inner_nsym = inner_nsym
        self.inner = InnerCode(chunk_size, inner_nsym) if inner_nsym else None
        self.index_copies = index_copies
        # With an inner code chunks survive dense damage, so their checksums must too: 3 voted copies.
        self.chunksum_copies = chunksum_copies or (3 if inner_nsym else 2)
        self._buf = bytearray()
        self._logical = 0
        self._hashes = _HashTable()
        self._physical = 0
        self._finished = False
        self.append(Superblock(chunk_size, k, m, self.code.algorithm, flags=inner_nsym).pack())

    @property
    def logical_offset(self) -> int:
        return self._logical

    @property
    def bytes_written(self) -> int:
        """Physical bytes handed to the sink so far."""
        return self._physical

    def append(self, data) -> int:
        """Append bytes to the logical stream; returns their logical offset."""
        start = self._logical
        stripe = self.k * self.chunk_size
        if type(data) is bytes and len(self._buf) + len(data) < stripe:  # the common small append
            self._buf += data
            self._logical += len(data)
            return start
        mv = memoryview(data).cast("B")
        self._logical += len(mv)
        if self._buf:
            take = min(len(mv), stripe - len(self._buf))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) == stripe:
                self._emit_stripes(memoryview(self._buf))
                self._buf = bytearray()
        full = len(mv) // stripe * stripe
        if full:
            self._emit_stripes(mv[:full])
            mv = mv[full:]
        if len(mv):
            self._buf += mv
        return start

    def _write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.sink.write(mv)
        self._physical += mv.nbytes

    def _write_all(self, pieces) -> None:
        if self._write_many is None:
            for piece in pieces:
                self._write(piece)
        else:
            self._physical += self._write_many(pieces)

    def _emit_stripes(self, mv: memoryview) -> None:
        """Write whole stripes (``len(mv)`` a multiple of k * chunk_size) with their parity."""
        c, k, m = self.chunk_size, self.k, self.m
        span = k * c
        stripes = len(mv) // span
        if m:
            parity, hashes = self.code.encode_stripes_hashed(mv, c)
        else:
            parity, hashes = None, chunk_hashes(mv, c)
        pieces = []  # each stripe's data, then its parity chunks, then (archive level) its inner block
        for s in range(stripes):
            pieces.append(mv[s * span:(s + 1) * span])
            if m:
                pieces.append(parity[s].reshape(-1).data)
            if self.inner is not None:
                pieces.extend(self._inner_block(pieces[-1 - bool(m):]))
        self._write_all(pieces)  # one call: no copy into a buffer, one system call for many stripes
        self._hashes.append(hashes.reshape(-1))

    def _emit_last_stripe(self, mv: memoryview) -> None:
        """The final, possibly short stripe: parity as if the missing data chunks were zeros."""
        c = self.chunk_size
        n_chunks = len(mv) // c
        self._hashes.append(chunk_hashes(mv, c))
        self._write(mv)
        parity = []
        if self.m:
            chunks = [mv[i * c:(i + 1) * c] for i in range(n_chunks)]
            parity = self.code.encode(chunks + [bytes(c)] * (self.k - n_chunks))
            for p in parity:
                self._write(p)
            self._hashes.append(np.array([hash64(p) for p in parity], dtype=np.uint64))
        if self.inner is not None:
            self._write_inner([mv, *parity])

    def _write_inner(self, pieces) -> None:
        self._write_all(self._inner_block(pieces))

    def _inner_block(self, pieces) -> tuple[bytes, bytes]:
        """The inner block of one stripe (RS parity of each of its chunks) and its page padding."""
        raw = self.inner.encode(b"".join(bytes(p) for p in pieces)).tobytes()
        return raw, bytes(-len(raw) % constants.PAGE)

    def write_record(self, kind: int, tensor_id: int, segment: int, elem_start: int, elem_count: int,
                     sections: Sequence[tuple[str, int, bytes]]) -> tuple[int, RecordHeader]:
        """Append a record; ``sections`` are ``(name, copies, data)``. Returns the
        record's logical offset and its header."""
        entries = tuple(SectionEntry(name, copies, len(data), hash64(data)) for name, copies, data in sections)
        header = RecordHeader(kind, tensor_id, segment, elem_start, elem_count, entries)
        if header.body_length <= SMALL_RECORD_BYTES:  # one append: a small record's appends cost more than its copy
            return self.append(b"".join([header.pack(), *(data for _, copies, data in sections
                                                          for _ in range(copies))])), header
        offset = self.append(header.pack())
        for name, copies, data in sections:
            for _ in range(copies):
                self.append(data)
        return offset, header

    def finish(self, index: dict | IndexText, index_copies: int | None = None) -> int:
        """Flush the last stripe, write the footer (index and chunk-sum copies)
        and the trailer. ``index`` (a JSON-able dict, or the :class:`IndexText`
        whose manifest began the stream) gets ``stream_length`` added. Returns the file size."""
        if self._finished:
            raise RuntimeError("writer already finished")
        self._finished = True
        c = self.chunk_size
        stream_length = self._logical
        if self._buf:
            n = -(-len(self._buf) // c)
            self._buf += bytes(n * c - len(self._buf))
            self._emit_last_stripe(memoryview(self._buf))
            self._buf = bytearray()
        n_data_chunks = -(-stream_length // c)
        footer_offset = self._physical

        if isinstance(index, IndexText):
            index_raw = compress_index(index.full(stream_length))
        else:
            index_raw = compress_index(encode_index(dict(index, stream_length=stream_length)))
        sums_raw = self._hashes.array().astype("<u8").tobytes()
        n_index = index_copies or self.index_copies
        blobs = {constants.BLOB_KIND_INDEX: index_raw, constants.BLOB_KIND_CHUNKSUMS: sums_raw}
        ncopies = {constants.BLOB_KIND_INDEX: n_index, constants.BLOB_KIND_CHUNKSUMS: self.chunksum_copies}
        for kind, copy, offset in footer_plan(footer_offset, len(index_raw), len(sums_raw), n_index,
                                              self.chunksum_copies):
            payload = blobs[kind]
            assert offset == self._physical
            head = BlobHeader(kind, copy, ncopies[kind], len(payload), hash64(payload)).pack()
            self._write(head)
            self._write(payload)
            self._write(bytes(padded(len(head) + len(payload)) - len(head) - len(payload)))
        trailer = Trailer(c, self.k, self.m, self.code.algorithm, stream_length, n_data_chunks, footer_offset,
                          len(index_raw), hash64(index_raw), len(sums_raw), hash64(sums_raw),
                          n_index, self.chunksum_copies, flags=self.inner_nsym).pack()
        self._write(bytes(constants.PAGE - len(trailer)))
        self._write(trailer)
        return self._physical
