"""The random-sign Hadamard transform of blocks (part of the on-disk format).

Definitions (see ``docs/codecs.md``, which is normative):

* ``H_n`` is the Sylvester Hadamard matrix of order ``n`` (a power of two):
  ``H_n[i, j] = (-1) ** popcount(i & j)``. It is symmetric and ``H_n @ H_n = n I``.
* The sign vector ``d`` of a tensor is drawn from SplitMix64 seeded with the
  tensor's 64-bit ``seed``: output word ``w`` (``w = 0, 1, ...``) gives the signs
  of indices ``64 w .. 64 w + 63``; bit ``j`` (least significant first) set means
  ``d[64 w + j] = -1``, clear means ``+1``. A transform of size ``m`` uses
  ``d[:m]``.
* The forward transform of a block ``x`` of size ``m`` is
  ``y = H_m (d[:m] * x) / sqrt(m)`` (orthonormal); the inverse is
  ``x = d[:m] * (H_m y) / sqrt(m)``.

Implementation: dense matrix products for ``m <= 64`` and a Kronecker
factorisation ``H_m = H_a (x) H_b`` (Sylvester ordering makes this exact) applied
as two batched matrix products on a ``(B, a, b)`` view for larger ``m``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = [
    "MAX_BLOCK",
    "splitmix64",
    "sign_bits",
    "sign_vector",
    "hadamard_matrix",
    "hadamard_rows",
    "hadamard_rows_int8",
    "fwht_rows_f32",
    "is_pow2",
    "next_pow2",
]

#: The largest transform size supported (256 x 256).
MAX_BLOCK = 1 << 16
_DENSE_MAX = 64

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def splitmix64(seed: int, count: int) -> np.ndarray:
    """The first ``count`` outputs of SplitMix64 seeded with ``seed`` (uint64).

    ``state_k = seed + (k + 1) * 0x9E3779B97F4A7C15 (mod 2**64)``; the output is
    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
    z ^= z >> 31`` applied to ``z = state_k`` (all arithmetic modulo 2**64).
    """
    seed = int(seed) & _MASK64
    k = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + k * np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z = z ^ (z >> np.uint64(31))
    return z


@functools.lru_cache(maxsize=64)
def _sign_bits_np(seed: int, n: int) -> np.ndarray:
    words = splitmix64(seed, (n + 63) // 64)
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:n]
    bits.setflags(write=False)
    return bits


def sign_bits(seed: int, n: int) -> np.ndarray:
    """uint8 array of length ``n``: 1 where the sign is negative."""
    return _sign_bits_np(int(seed) & _MASK64, int(n))


@functools.lru_cache(maxsize=64)
def _sign_vector(seed: int, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    bits = torch.from_numpy(sign_bits(seed, n).astype(np.int8))
    return (1 - 2 * bits).to(dtype=dtype, device=device)


def sign_vector(seed: int, n: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """The sign vector ``d[:n]`` as +-1 values (cached; do not modify)."""
    return _sign_vector(int(seed) & _MASK64, int(n), dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _hadamard(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    i = np.arange(n, dtype=np.uint32)
    a = i[:, None] & i[None, :]
    parity = np.zeros_like(a)
    while a.any():
        parity ^= a & 1
        a >>= 1
    h = 1.0 - 2.0 * parity.astype(np.float64)
    return torch.from_numpy(h).to(dtype=dtype, device=device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """The Sylvester Hadamard matrix ``H_n`` (entries +-1; cached; do not modify)."""
    if not is_pow2(n) or n > MAX_BLOCK:
        raise ValueError(f"Hadamard size must be a power of two <= {MAX_BLOCK}, got {n}")
    return _hadamard(int(n), dtype, str(torch.device(device)))


def _factor(n: int) -> tuple[int, int]:
    k = n.bit_length() - 1
    a = 1 << (k // 2)
    return a, n // a


_INT_MM_OK: bool | None = None


def _int_mm_ok() -> bool:
    """Whether ``torch._int_mm`` (int8 x int8 -> int32) works on the CPU and is
    exact here (checked once against an int64 reference)."""
    global _INT_MM_OK
    if _INT_MM_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            a = torch.randint(-127, 128, (64, 32), dtype=torch.int8, generator=g)
            h = hadamard_matrix(32, torch.float32).to(torch.int8)
            got = torch._int_mm(a, h)
            _INT_MM_OK = bool(got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ h.long()))
        except Exception:  # private API: absent or unsupported here
            _INT_MM_OK = False
    return _INT_MM_OK


def hadamard_rows_int8(q: torch.Tensor) -> torch.Tensor:
    """``q @ H_n`` for a 2-D int8 ``(B, n)`` CPU tensor, as exact float32.

    The first Kronecker factor runs as an int8 x int8 -> int32 matrix product
    (about three times faster than float32 on CPUs with VNNI); its sums are at
    most 127 * b in magnitude, so converting them to float32 is exact and the
    result equals :func:`hadamard_rows` of ``q.float()`` bit for bit.
    """
    B, n = q.shape
    if n > _DENSE_MAX and q.device.type == "cpu" and _int_mm_ok():
        a, b = _factor(n)
        if B * a > 16 and b % 8 == 0:
            hb = _hadamard(b, torch.int8, "cpu")
            w = torch._int_mm(q.reshape(B * a, b), hb).to(torch.float32).view(B, a, b)
            return torch.matmul(hadamard_matrix(a, torch.float32), w).view(B, n)
    return hadamard_rows(q.to(torch.float32))


def hadamard_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ H_n`` for a 2-D ``(B, n)`` tensor (unnormalised; ``H_n`` is symmetric,
    so this applies ``H_n`` to every row). Floating dtypes only.

    When every entry of ``x`` is an integer and every partial sum is exactly
    representable (``|sum| < 2**24`` in float32, ``< 2**53`` in float64), the
    result is exact whatever order the BLAS sums in, hence identical on every
    device.
    """
    B, n = x.shape
    if n <= _DENSE_MAX:
        h = hadamard_matrix(n, x.dtype, x.device)
        if out is None:
            return x @ h
        return torch.matmul(x, h, out=out)
    a, b = _factor(n)
    ha = hadamard_matrix(a, x.dtype, x.device)
    hb = hadamard_matrix(b, x.dtype, x.device)
    w = (x.reshape(B * a, b) @ hb).view(B, a, b)
    if out is None:
        return torch.matmul(ha, w).view(B, n)
    torch.matmul(ha, w, out=out.view(B, a, b))
    return out


def _butterfly_stages(v: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Butterfly stages with pair distances ``first, 2 first, ... < stop`` on the
    rows of ``v`` (B, n), in that order; each sum and difference rounded to
    float32. Ping-pongs between ``v`` and one scratch array."""
    rows, n = v.shape
    scratch = np.empty_like(v)
    h = first
    while h < stop:
        src = v.reshape(rows, n // (2 * h), 2, h)
        dst = scratch.reshape(rows, n // (2 * h), 2, h)
        np.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        np.subtract(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        v, scratch = scratch, v
        h *= 2
    return v


def fwht_rows_f32(x: np.ndarray) -> np.ndarray:
    """The encoder's forward transform ``H_m`` of every row of ``x`` (B, m),
    float32, as the specified butterfly (docs/codecs.md 2.6): stages
    ``h = 1, 2, 4, ..., m/2`` in that order, stage ``h`` mapping every pair
    ``(j, j + h)`` with bit ``h`` of ``j`` clear to ``(v_j + v_{j+h}, v_j - v_{j+h})``,
    each rounded to float32. The compiled core computes the same operations, so
    both give the same bits.

    Implementation: the stages with ``h < b`` (``m = a b``) run on the transposed
    ``(B, b, a)`` layout, where their pairs are ``h a`` apart (contiguous runs of
    ``a``); the layout changes which memory an operation touches, never its operands.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, m = x.shape
    if m == 1:
        return x.copy()
    a, b = _factor(m)
    t = np.ascontiguousarray(x.reshape(rows, a, b).transpose(0, 2, 1)).reshape(rows, m)
    t = _butterfly_stages(t, a, m)
    y = np.ascontiguousarray(t.reshape(rows, b, a).transpose(0, 2, 1)).reshape(rows, m)
    return _butterfly_stages(y, b, m)
