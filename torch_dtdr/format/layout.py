"""Where logical stream bytes live in the file.

The writer produces one *logical stream* (superblock, manifest record, tensor
records). It is cut into data chunks of ``chunk_size`` bytes (the last one
zero-padded); every ``k`` data chunks form a stripe, physically followed by
``m`` parity chunks and, at the archive level, by an *inner block*: a
byte-level Reed-Solomon parity of each of the stripe's chunks, padded to whole
pages. The final stripe may hold fewer than ``k`` data chunks; its parity is
computed as if the missing ones were zeros and follows its last data chunk
directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


PAGE = 4096


def inner_parity_size(chunk_size: int, nsym: int) -> int:
    """Bytes of inner Reed-Solomon parity per chunk (0 without an inner code)."""
    if not nsym:
        return 0
    codewords = -(-chunk_size // (255 - nsym))
    return nsym * codewords


@dataclass(frozen=True)
class Geometry:
    chunk_size: int
    k: int
    m: int
    n_data_chunks: int
    inner_nsym: int = 0

    @functools.cached_property
    def inner_size(self) -> int:
        return inner_parity_size(self.chunk_size, self.inner_nsym)

    def inner_block(self, n_chunks: int) -> int:
        """Physical bytes of the inner block of a stripe with ``n_chunks`` chunks."""
        return -(-n_chunks * self.inner_size // PAGE) * PAGE

    def inner_offset(self, stripe: int, slot: int) -> int:
        """Physical offset of the inner parity of slot ``slot`` of ``stripe``."""
        return stripe * self.stripe_span + (self.data_chunks_in(stripe) + self.m) * self.chunk_size \
            + slot * self.inner_size

    @property
    def n_stripes(self) -> int:
        return -(-self.n_data_chunks // self.k) if self.n_data_chunks else 0

    @functools.cached_property
    def stripe_span(self) -> int:
        """Physical bytes of a full stripe (data, parity, inner block)."""
        return (self.k + self.m) * self.chunk_size + self.inner_block(self.k + self.m)

    def data_chunks_in(self, stripe: int) -> int:
        if stripe < self.n_stripes - 1:
            return self.k
        return self.n_data_chunks - stripe * self.k

    def data_chunk_offset(self, j: int) -> int:
        """Physical offset of logical data chunk ``j``."""
        stripe, pos = divmod(j, self.k)
        return stripe * self.stripe_span + pos * self.chunk_size

    def parity_chunk_offset(self, stripe: int, p: int) -> int:
        return stripe * self.stripe_span + (self.data_chunks_in(stripe) + p) * self.chunk_size

    def chunk_index(self, stripe: int, slot: int) -> int:
        """Position in the chunk-checksum table of slot ``slot`` of ``stripe``
        (slots 0..d-1 are data chunks, d..d+m-1 parity chunks)."""
        return stripe * (self.k + self.m) + slot

    @property
    def physical_end(self) -> int:
        """Physical size of the striped region (where the footer starts)."""
        if not self.n_data_chunks:
            return 0
        last = self.n_stripes - 1
        n = self.data_chunks_in(last) + self.m
        return last * self.stripe_span + n * self.chunk_size + self.inner_block(n)

    @property
    def n_chunks_total(self) -> int:
        return self.n_data_chunks + self.n_stripes * self.m

    def physical_ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Split logical ``[start, end)`` into ``(logical_start, physical_start, length)``
        pieces, each contiguous on disk (runs of data chunks within one stripe)."""
        out = []
        pos = start
        c = self.chunk_size
        while pos < end:
            j = pos // c
            stripe = j // self.k
            stripe_logical_end = min((stripe + 1) * self.k * c, end)
            out.append((pos, self.data_chunk_offset(j) + pos % c, stripe_logical_end - pos))
            pos = stripe_logical_end
        return out

    def logical_of_physical(self, offset: int) -> tuple[str, int] | None:
        """Classify a physical offset inside the striped region: ``("data", logical
        offset)``, ``("parity", stripe)`` or ``("inner", stripe)``; None past it."""
        if offset >= self.physical_end or offset < 0:
            return None
        stripe, rest = divmod(offset, self.stripe_span)
        slot, within = divmod(rest, self.chunk_size)
        if slot < self.data_chunks_in(stripe):
            return ("data", (stripe * self.k + slot) * self.chunk_size + within)
        if slot < self.data_chunks_in(stripe) + self.m:
            return ("parity", stripe)
        return ("inner", stripe)
