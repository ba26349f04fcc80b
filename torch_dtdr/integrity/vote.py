"""Bitwise majority voting between N stored copies of a small critical section.

Sections too small to deserve their own parity (per-block scales, frame
tables, small integer tensors) are stored N times. When every copy fails its
checksum, a bitwise vote still recovers the data as long as, at every bit
position, fewer than half of the copies are flipped there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .checksum import hash64

__all__ = ["bitwise_majority", "majority_with_hash"]

# Bytes per block for the general N-copy vote (bounds the unpacked temporaries
# to N * 8 * _BLOCK bytes).
_BLOCK = 1 << 18


def _views(copies: Sequence) -> list[np.ndarray]:
    if len(copies) == 0:
        raise ValueError("bitwise_majority needs at least one copy")
    arrs = []
    for c in copies:
        mv = c if isinstance(c, memoryview) else memoryview(c)
        if not mv.c_contiguous:
            raise ValueError("copies must be C-contiguous buffers")
        arrs.append(np.frombuffer(mv.cast("B") if mv.ndim != 1 or mv.itemsize != 1 else mv, dtype=np.uint8))
    n = arrs[0].size
    for i, a in enumerate(arrs):
        if a.size != n:
            raise ValueError(f"copies differ in length: copy 0 has {n} bytes, copy {i} has {a.size}")
    return arrs


def bitwise_majority(copies: Sequence) -> bytes:
    """The bitwise majority of N >= 1 equal-length bytes-like copies.

    At every bit the value held by more than half of the copies wins; a tie
    (possible for even N) takes the bit of the first copy. So N == 1 and
    N == 2 return the first copy.
    """
    arrs = _views(copies)
    n = len(arrs)
    if n <= 2:
        return arrs[0].tobytes()
    if n == 3:
        a, b, c = arrs
        if a.size % 8 == 0:  # same bits, 8x fewer elements
            a, b, c = (x.view(np.uint64) for x in (a, b, c))
        # (a & b) | (a & c) | (b & c) in four in-place operations
        out = b | c
        out &= a
        bc = b & c
        out |= bc
        return out.tobytes()
    size = arrs[0].size
    out = np.empty(size, dtype=np.uint8)
    for start in range(0, size, _BLOCK):
        end = min(size, start + _BLOCK)
        stack = np.stack([a[start:end] for a in arrs])
        # Bytes where every copy agrees need no vote.
        differ = np.flatnonzero((stack != stack[0]).any(axis=0))
        block = stack[0].copy()
        if differ.size:
            bits = np.unpackbits(stack[:, differ], axis=1)
            count = bits.sum(axis=0, dtype=np.uint32) * 2
            first = bits[0].astype(bool)
            win = (count > n) | ((count == n) & first)
            block[differ] = np.packbits(win)
        out[start:end] = block
    return out.tobytes()


def majority_with_hash(copies: Sequence, expected_hash: int) -> tuple[bytes, bool]:
    """Recover a section from its copies and its stored xxh3_64.

    Returns ``(data, True)`` for the first copy whose xxh3_64 equals
    ``expected_hash``. When no copy matches, returns the bitwise vote and
    whether the vote's own hash matches (``False``: the data is the best
    guess, not guaranteed exact).
    """
    expected = int(expected_hash)
    arrs = _views(copies)
    for a in arrs:
        if hash64(a) == expected:
            return a.tobytes(), True
    voted = bitwise_majority(arrs)
    return voted, hash64(voted) == expected
