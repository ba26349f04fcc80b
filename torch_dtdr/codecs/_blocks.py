"""The transform-domain base layer shared by ``dtdr8``, ``dtdr16`` and ``dtdr``.

A segment of ``numel`` elements is cut into ``nfull = numel // block_size`` full
blocks and, when ``numel % block_size != 0``, one tail block of
``tail = numel % block_size`` elements that is zero-padded to
``m = next_pow2(tail)``. Every block of size ``m`` is transformed with the
random-sign Hadamard transform of :mod:`.hadamard` and quantised to integer
coefficients with one float32 factor ``f`` per block. See ``docs/codecs.md``.

Decode arithmetic (normative, identical on every device):

* ``qbits == 8``: ``S = H_m q`` is computed exactly (an integer of magnitude
  <= 127 * m; float32 is exact, so is an int8 x int8 -> int32 product),
  ``v = fl32(fl32(d * S) * f)`` (``d * S`` is exact), then ``v`` is clamped to
  ``[-M, M]`` with ``M`` the largest finite value of the target dtype (or of
  float32 if smaller), ``v + 0.0`` makes every zero +0.0, and the result is cast
  to the target dtype with round-to-nearest-even.
* ``qbits == 16``: ``S = H_m q`` is computed exactly in float64, ``v = d * S * f``
  is computed in float64 (exact: <= 25 + 24 significant bits), clamped, +0.0,
  then rounded to float32 and to the target dtype (round-to-nearest-even each).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .. import _memory as memory
from . import native
from .hadamard import (
    MAX_BLOCK,
    fwht_rows_f32,
    hadamard_rows,
    hadamard_rows_int8,
    is_pow2,
    next_pow2,
    sign_bits,
    sign_vector,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_F32_MAX = float(torch.finfo(torch.float32).max)
#: Blocks processed per vectorised step: keeps the working set in L2 cache.
_CHUNK_ELEMS = 1 << 18

_QMAX = {8: 127, 16: 32767}
_QDTYPE = {8: torch.int8, 16: torch.int16}
_QDTYPE_NP = {8: np.dtype(np.int8), 16: np.dtype("<i2")}
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Layout:
    """How a segment of ``numel`` elements is cut into blocks."""

    numel: int
    block_size: int
    nfull: int  # number of full blocks
    tail: int  # elements in the tail block (0: none)
    tail_m: int  # transform size of the tail block (0: none)

    @property
    def nblocks(self) -> int:
        return self.nfull + (1 if self.tail else 0)

    @property
    def ncoef(self) -> int:
        """Number of stored coefficients (the tail is stored padded)."""
        return self.nfull * self.block_size + self.tail_m

    def block_of_coef(self, i: np.ndarray | int):
        return np.minimum(np.asarray(i) // self.block_size, self.nblocks - 1)

    def block_elems(self, b: int) -> tuple[int, int]:
        """Element range ``[start, end)`` of block ``b`` within the segment."""
        start = b * self.block_size
        return start, min(start + self.block_size, self.numel)

    def block_m(self, b: int) -> int:
        return self.block_size if b < self.nfull else self.tail_m


@functools.lru_cache(maxsize=4096)  # a save asks for the same few layouts once per segment
def layout(numel: int, block_size: int) -> Layout:
    nfull, tail = divmod(int(numel), int(block_size))
    return Layout(int(numel), int(block_size), nfull, tail, next_pow2(tail) if tail else 0)


def check_block_size(block_size) -> None:
    from ..errors import CodecError

    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise CodecError(f"block_size must be an int, got {block_size!r}")
    if not is_pow2(block_size) or not (16 <= block_size <= MAX_BLOCK):
        raise CodecError(f"block_size must be a power of two in [16, {MAX_BLOCK}], got {block_size}")


def check_seed(seed) -> None:
    from ..errors import CodecError

    if not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 1 << 64):
        raise CodecError(f"seed must be an int in [0, 2**64), got {seed!r}")


@functools.lru_cache(maxsize=None)
def dtype_max(dtype: torch.dtype) -> float:
    """The clamp bound M of the decode arithmetic for ``dtype``."""
    return min(float(torch.finfo(dtype).max), _F32_MAX)


@functools.lru_cache(maxsize=None)
def dtype_code(dtype: torch.dtype) -> int:
    """The compiled core's code for a float ``dtype`` (:data:`native.DTYPE_CODES`)."""
    return native.DTYPE_CODES[str(dtype).removeprefix("torch.")]


def _sums_dtype(qbits: int, device: torch.device) -> torch.dtype:
    """The float dtype in which ``H q`` is summed.

    Any exact method is conforming; float32 is exact for int8 coefficients but a
    GPU may run float32 matmuls in TF32, so other devices sum in float64.
    """
    if qbits == 16 or device.type != "cpu":
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------- encode


def _to_work(x: torch.Tensor) -> np.ndarray:
    """float32 working copy: non-finite -> 0, float64 clamped to the float32 range."""
    if x.dtype == torch.float64:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-_F32_MAX, _F32_MAX)
        return x.to(torch.float32).numpy()
    xf = x.to(torch.float32)
    if xf.data_ptr() == x.data_ptr():
        xf = xf.clone()
    return torch.nan_to_num_(xf, nan=0.0, posinf=0.0, neginf=0.0).numpy()


def _encode_blocks(xb: np.ndarray, d: np.ndarray, qbits: int):
    """Quantise the rows of ``xb`` (B, m) float32 (finite) with signs ``d``
    (float32 +-1). Returns (q, f) as numpy arrays. This is the reference for the
    compiled core's ``encode_block``: every operation is one IEEE operation in
    the order docs/codecs.md 2.6 gives, so both produce the same bytes."""
    qmax = _QMAX[qbits]
    m = xb.shape[1]
    amax = np.abs(xb).max(axis=1)
    # Normalise every block by a power of two so that the transform can neither
    # overflow nor lose precision to subnormals: xs = RNE32(d x 2**-e).
    _, e = np.frexp(amax)
    e = e.astype(np.int64)
    small = e < -126  # 2**-e is not a float32: the same rounded product via float64
    pw = np.ldexp(np.ones(len(e), np.float32), np.where(small, 0, -e)).astype(np.float32)
    xs = xb * d
    xs *= pw[:, None]
    if small.any():
        xs[small] = (xs[small].astype(np.float64) * np.ldexp(1.0, -e[small])[:, None]).astype(np.float32)
    z = fwht_rows_f32(xs)  # unnormalised: z = H (d x 2**-e), |z| <= m
    zmax = np.abs(z).max(axis=1).astype(np.float64)
    two_e = np.ldexp(1.0, e)
    # f = s / sqrt(m) where s = max|y| / qmax is the step in the orthonormal domain.
    f = ((zmax * two_e) / float(qmax * m)).astype(np.float32)
    f64 = f.astype(np.float64)
    positive = f64 > 0
    inv = np.where(positive, two_e / (m * np.where(positive, f64, 1.0)), 0.0)
    inv = np.minimum(inv, _F32_MAX).astype(np.float32)
    z *= inv[:, None]
    np.rint(z, out=z)
    np.clip(z, -qmax, qmax, out=z)
    return z.astype(_QDTYPE_NP[qbits]), f


def bits_view(x: torch.Tensor) -> np.ndarray:
    """The bit patterns of a contiguous 1-D float CPU tensor as a numpy integer array (no copy)."""
    return x.view(_INT_OF_WIDTH[x.element_size()]).numpy()


def encode_base(x: torch.Tensor, block_size: int, seed: int, qbits: int = 8):
    """Quantise a 1-D float tensor. Returns ``(q, f)``: ``q`` int8/int16 of length
    ``layout.ncoef`` and ``f`` float32 of length ``layout.nblocks`` (CPU tensors)."""
    lay = layout(x.numel(), block_size)
    q = np.empty(lay.ncoef, dtype=_QDTYPE_NP[qbits])
    f = np.empty(lay.nblocks, dtype=np.float32)
    compiled = native.module()
    if compiled is not None:
        x = x.contiguous()
        code = dtype_code(x.dtype)
        compiled.encode_base(bits_view(x), code, lay.numel, block_size, sign_bits(seed, block_size), qbits, q, f)
        return torch.from_numpy(q), torch.from_numpy(f)
    if lay.nfull:
        d = sign_vector(seed, block_size).numpy()
        step = max(1, _CHUNK_ELEMS // block_size)
        for b0 in range(0, lay.nfull, step):
            b1 = min(b0 + step, lay.nfull)
            xb = _to_work(x[b0 * block_size : b1 * block_size]).reshape(b1 - b0, block_size)
            qb, fb = _encode_blocks(xb, d, qbits)
            q[b0 * block_size : b1 * block_size] = qb.reshape(-1)
            f[b0:b1] = fb
    if lay.tail:
        xt = np.zeros((1, lay.tail_m), dtype=np.float32)
        xt[0, : lay.tail] = _to_work(x[lay.nfull * block_size :])
        qb, fb = _encode_blocks(xt, sign_vector(seed, lay.tail_m).numpy(), qbits)
        q[lay.nfull * block_size :] = qb.reshape(-1)
        f[lay.nfull] = fb[0]
    return torch.from_numpy(q), torch.from_numpy(f)


# --------------------------------------------------------------------------- decode


def _decode_blocks(qb: torch.Tensor, fb: torch.Tensor, d: torch.Tensor, qbits: int, out: torch.Tensor, M: float, need_clamp: bool):
    """Decode rows of ``qb`` (B, m) into ``out`` (B, m) of the target dtype."""
    sdt = _sums_dtype(qbits, qb.device)
    if sdt == torch.float32 and qb.dtype == torch.int8:
        s = hadamard_rows_int8(qb)
    else:
        s = hadamard_rows(qb.to(sdt))
    s.mul_(d if d.dtype == sdt else d.to(sdt))
    if qbits == 8:
        if s.dtype != torch.float32:
            s = s.to(torch.float32)  # exact: integers < 2**24
        fb = fb.to(torch.float32)
    else:
        fb = fb.to(torch.float64)
    s.mul_(fb[:, None])
    if need_clamp:
        s.clamp_(-M, M)
    # The sign of a zero sum depends on the summation order (-0.0 + -0.0 is
    # -0.0, but 0.0 + -0.0 is 0.0): adding +0.0 turns every zero into +0.0 and
    # leaves every other value unchanged, so the result is the same everywhere.
    if out.dtype == s.dtype:
        torch.add(s, 0.0, out=out)
        return
    s.add_(0.0)
    if s.dtype == torch.float64:
        s = s.to(torch.float32)  # defined as two roundings: float64 -> float32 -> target
    out.copy_(s)


def decode_base(
    q: torch.Tensor,
    f: torch.Tensor,
    dtype: torch.dtype,
    numel: int,
    block_size: int,
    seed: int,
    qbits: int = 8,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode coefficients ``q`` (int8/int16, length ``ncoef``) and factors ``f``
    (float32, finite, length ``nblocks``) into a 1-D tensor of ``dtype``.

    Runs on whatever device ``q`` is on; the result is bit-identical everywhere.
    """
    lay = layout(numel, block_size)
    dev = q.device
    if out is None:
        out = memory.empty(numel, dtype) if dev.type == "cpu" else torch.empty(numel, dtype=dtype, device=dev)
    if numel == 0:
        return out
    M = dtype_max(dtype)
    compiled = native.module()
    if compiled is not None and dev.type == "cpu" and out.is_contiguous():
        code = dtype_code(dtype)
        qn = q.contiguous().numpy()
        fn = f.to(torch.float32).contiguous().numpy()
        compiled.decode_base(qn, qbits, fn, code, numel, block_size, sign_bits(seed, block_size), M, bits_view(out))
        return out
    qmax = _QMAX[qbits]
    fmax = float(f.abs().max()) if f.numel() else 0.0
    # The clamp is a no-op when no value can exceed M; skip it then.
    need_clamp = fmax * qmax * block_size > M * 0.5
    sdt = _sums_dtype(qbits, dev)
    if lay.nfull:
        d = sign_vector(seed, block_size, sdt, dev)
        # CPU: chunks that stay in cache; accelerators: the whole segment at once
        step = max(1, _CHUNK_ELEMS // block_size) if dev.type == "cpu" else lay.nfull
        for b0 in range(0, lay.nfull, step):
            b1 = min(b0 + step, lay.nfull)
            sl = slice(b0 * block_size, b1 * block_size)
            _decode_blocks(q[sl].view(b1 - b0, block_size), f[b0:b1], d, qbits, out[sl].view(b1 - b0, block_size), M, need_clamp)
    if lay.tail:
        d = sign_vector(seed, lay.tail_m, sdt, dev)
        tmp = torch.empty(1, lay.tail_m, dtype=dtype, device=dev)
        c0 = lay.nfull * block_size
        _decode_blocks(q[c0:].view(1, lay.tail_m), f[lay.nfull :], d, qbits, tmp, M, need_clamp)
        out[c0:] = tmp[0, : lay.tail]
    return out


# --------------------------------------------------------------------------- damage helpers


def damaged_mask(ranges, nbytes: int) -> np.ndarray | None:
    """Boolean byte mask of the damaged ``(start, end)`` ranges (None if none)."""
    if not ranges:
        return None
    mask = np.zeros(nbytes, dtype=bool)
    hit = False
    for a, b in ranges:
        a, b = max(0, int(a)), min(nbytes, int(b))
        if b > a:
            mask[a:b] = True
            hit = True
    return mask if hit else None


def item_mask(byte_mask: np.ndarray | None, itemsize: int, count: int) -> np.ndarray | None:
    """Which of ``count`` items of ``itemsize`` bytes overlap a damaged byte."""
    if byte_mask is None:
        return None
    bm = byte_mask[: count * itemsize]
    if len(bm) < count * itemsize:
        bm = np.concatenate([bm, np.ones(count * itemsize - len(bm), dtype=bool)])
    return bm.reshape(count, itemsize).any(axis=1)


def as_bytes(buf) -> memoryview:
    """A flat, read-only byte view of ``buf`` (bytes, bytearray, memoryview)."""
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def np_view(buf, dtype, count: int | None = None, offset: int = 0) -> np.ndarray:
    """Zero-copy numpy view of little-endian items in ``buf`` (read-only)."""
    mv = as_bytes(buf)
    dt = np.dtype(dtype).newbyteorder("<")
    if count is None:
        count = (len(mv) - offset) // dt.itemsize
    return np.frombuffer(mv, dtype=dt, count=count, offset=offset)


def coef_bytes(qbits: int) -> int:
    return qbits // 8


def fix_factors(f: np.ndarray, bad: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Replace damaged or implausible per-block factors by a safe fallback.

    A factor is implausible when it is not finite, negative, or larger than any
    value an encoder can produce (it writes ``f < 2 * float32_max / 127``; the
    check is ``f <= float32_max / 63``). The fallback is
    the median of the plausible undamaged factors of the segment (0 if none).
    Returns ``(factors, replaced_mask)``.
    """
    f = np.asarray(f, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(f) & (f >= 0) & (f <= np.float32(_F32_MAX / 63))
    if bad is not None:
        ok &= ~bad
    replaced = ~ok
    if not replaced.any():
        return f, replaced
    good = f[ok]
    fallback = np.float32(np.median(good)) if good.size else np.float32(0)
    f = f.copy()
    f[replaced] = fallback
    return f, replaced


def mant_bits(dtype: torch.dtype) -> int:
    return {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]


def tiny_abs(dtype: torch.dtype) -> float:
    """An absolute rounding allowance: the smallest subnormal of ``dtype`` plus
    the float32 one (arithmetic is float32 for the base layer)."""
    return float(torch.finfo(dtype).smallest_normal) * 2.0 ** -mant_bits(dtype) + 2.0**-126


def block_sizes_m(lay: Layout) -> np.ndarray:
    """Transform size of every block (float64)."""
    m = np.full(lay.nblocks, float(lay.block_size))
    if lay.tail:
        m[-1] = float(lay.tail_m)
    return m


def block_maxabs(values: torch.Tensor, lay: Layout) -> np.ndarray:
    """max |value| per block (float64) of a decoded 1-D tensor."""
    out = np.zeros(lay.nblocks)
    if lay.nfull:
        full = values[: lay.nfull * lay.block_size].view(lay.nfull, lay.block_size)
        out[: lay.nfull] = full.abs().amax(dim=1).double().cpu().numpy()
    if lay.tail:
        out[-1] = float(values[lay.nfull * lay.block_size :].abs().max().double())
    return out


def elements_of_blocks(blocks: np.ndarray, lay: Layout) -> int:
    """Number of elements in the given (boolean-masked) blocks."""
    n = int(blocks.sum()) * lay.block_size
    if lay.tail and blocks[-1]:
        n -= lay.block_size - lay.tail
    return n
