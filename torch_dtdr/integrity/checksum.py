"""Chunk checksums: xxh3_64 (seed 0) over fixed-size pieces of a buffer.

Every chunk of the container carries an xxh3_64 in the index, so damage on
disk becomes an erasure at a known position that parity can repair.

The functions here never copy the input. :func:`chunk_hashes` hashes every
chunk in one GIL-free call of the compiled ``_xxh`` module (the official xxHash
code) when it is built, else it slices a :class:`memoryview` and hands the
slices to the ``xxhash`` package (the reference; ``TORCH_DTDR_NATIVE=0``
forces it), which hashes any C-contiguous buffer.
"""

from __future__ import annotations

import numpy as np
import xxhash

from . import native

__all__ = ["HASH_ALGORITHM", "hash64", "chunk_hashes", "verify_chunks"]

#: Name recorded in the file for the checksum in use.
HASH_ALGORITHM = "xxh3_64"

_xxh3_64 = xxhash.xxh3_64_intdigest


def _byte_view(buf) -> memoryview:
    """A flat, read-only, byte-format view of any C-contiguous buffer, no copy."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c") or mv.itemsize != 1:
        if not mv.c_contiguous:
            raise ValueError("chunk_hashes needs a C-contiguous buffer")
        mv = mv.cast("B")
    return mv


def hash64(buf) -> int:
    """xxh3_64 (seed 0) of a bytes-like object, as an unsigned int < 2**64."""
    return _xxh3_64(buf)


def chunk_hashes(buf, chunk_size: int) -> np.ndarray:
    """xxh3_64 of each ``chunk_size`` piece of ``buf`` (the last may be short).

    Returns a ``uint64`` array of ``ceil(len(buf) / chunk_size)`` entries; an
    empty buffer gives an empty array.
    """
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mv = _byte_view(buf)
    n = len(mv)
    count = -(-n // chunk_size)
    compiled = native.hashes_module()
    if compiled is not None:  # every chunk in one call, without the GIL
        out = np.empty(count, np.uint64)
        compiled.chunk_hashes(mv, chunk_size, out)
        return out
    # Zero-copy memoryview slices fed through map(): the per-chunk Python
    # overhead (~0.2 us) is what limits small chunks; xxh3 itself runs at
    # memory speed.
    slices = map(slice, range(0, n, chunk_size), range(chunk_size, n + chunk_size, chunk_size))
    return np.fromiter(map(_xxh3_64, map(mv.__getitem__, slices)), dtype=np.uint64, count=count)


def verify_chunks(buf, chunk_size: int, expected) -> np.ndarray:
    """Indices of the chunks of ``buf`` whose xxh3_64 differs from ``expected``.

    ``expected`` is a sequence or array of ``ceil(len(buf) / chunk_size)``
    unsigned 64-bit hashes. Returns a sorted ``int64`` array (empty when all
    chunks match).
    """
    got = chunk_hashes(buf, chunk_size)
    exp = np.asarray(expected, dtype=np.uint64)
    if exp.shape != got.shape:
        raise ValueError(f"expected {got.shape[0]} hashes, got {exp.shape[0] if exp.ndim else 0}")
    return np.flatnonzero(got != exp)
