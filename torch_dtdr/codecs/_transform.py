"""Shared implementation of the lossy transform codecs ``dtdr8`` and ``dtdr16``.

Sections (see ``docs/codecs.md``):

* ``meta`` (3 copies): ``nblocks`` float32 little-endian block factors ``f``.
* ``base``: ``ncoef`` int8 (dtdr8) or int16 little-endian (dtdr16) coefficients,
  block after block, the tail block stored padded to its transform size.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np
import torch

from .. import _memory as memory
from ..errors import CodecError
from . import _blocks as B, native
from .base import Codec, Damage, SectionSpec, SegmentResult, flat_contiguous, usable_out

_CPU = torch.device("cpu")
_QDT_NP = {8: np.dtype("<i1"), 16: np.dtype("<i2")}
_LITTLE_ENDIAN = sys.byteorder == "little"
_QDT_T = {8: torch.int8, 16: torch.int16}
_QRANGE = {8: 254.0, 16: 65534.0}  # the largest possible change of a damaged coefficient


def tensor_view(arr: np.ndarray) -> torch.Tensor:
    """torch view of a (possibly read-only) numpy array; never written to."""
    if arr.size == 0:
        return torch.from_numpy(np.array(arr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def check_input(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"codec {codec.name!r} encodes torch tensors, got {type(x).__name__}")
    if not codec.accepts(x.dtype):
        raise CodecError(f"codec {codec.name!r} cannot store dtype {x.dtype}")
    if x.requires_grad:
        x = x.detach()
    if not x.is_cpu:
        x = x.cpu()
    return x if x.dim() == 1 and x.is_contiguous() else flat_contiguous(x)


def read_factors(data: Mapping, lay: B.Layout, damage: Damage | None, offset: int = 0):
    """Block factors from ``meta`` (at ``offset``). Returns ``(f, bad)`` where
    ``bad`` marks factors that are damaged, missing or implausible (replaced)."""
    nb = lay.nblocks
    if damage is not None and "meta" in damage.missing or "meta" not in data:
        return np.zeros(nb, np.float32), np.ones(nb, bool)
    meta = B.as_bytes(data["meta"])
    avail = max(0, min(nb, (len(meta) - offset) // 4))
    f = np.zeros(nb, np.float32)
    if avail:
        f[:avail] = B.np_view(meta, np.float32, avail, offset)
    bad = np.zeros(nb, bool)
    bad[avail:] = True
    if damage is not None and damage.ranges.get("meta"):
        bm = B.damaged_mask(damage.ranges["meta"], len(meta))
        if bm is not None:
            part = bm[offset : offset + 4 * nb]
            im = B.item_mask(np.pad(part, (0, 4 * nb - len(part)), constant_values=True), 4, nb)
            bad |= im
    f, replaced = B.fix_factors(f, bad)
    return f, replaced


def read_coefs(data: Mapping, lay: B.Layout, qbits: int, damage: Damage | None):
    """Coefficients from ``base``. Returns ``(q tensor, damaged_per_block counts or
    None, missing)``; missing or short bytes read as zero coefficients."""
    isz = qbits // 8
    nbytes = lay.ncoef * isz
    if (damage is not None and "base" in damage.missing) or "base" not in data:
        return torch.zeros(lay.ncoef, dtype=_QDT_T[qbits]), None, True
    raw = B.as_bytes(data["base"])
    if len(raw) >= nbytes:
        arr = B.np_view(raw, _QDT_NP[qbits], lay.ncoef)
        short = 0
    else:
        arr = np.zeros(lay.ncoef, _QDT_NP[qbits])
        have = len(raw) // isz
        arr[:have] = B.np_view(raw, _QDT_NP[qbits], have)
        short = lay.ncoef - have
    counts = None
    bm = B.damaged_mask(damage.ranges.get("base"), nbytes) if damage is not None else None
    if bm is not None or short:
        cm = B.item_mask(bm, isz, lay.ncoef) if bm is not None else np.zeros(lay.ncoef, bool)
        if short:
            cm[lay.ncoef - short :] = True
        blk = lay.block_of_coef(np.flatnonzero(cm))
        counts = np.bincount(blk, minlength=lay.nblocks).astype(np.float64)
        if not counts.any():
            counts = None
    q = tensor_view(arr) if arr.flags.writeable is False or short == 0 else torch.from_numpy(arr)
    return q, counts, False


def rounding_allowance(maxabs: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Allowance for float32 arithmetic and the cast to ``dtype`` at magnitude ``maxabs``."""
    return maxabs * (2.0**-22 + 2.0 ** -B.mant_bits(dtype)) + B.tiny_abs(dtype)


@dataclass(frozen=True)
class TransformCodec(Codec):
    """Random-sign Hadamard blocks quantised to ``qbits``-bit integers (lossy)."""

    block_size: int = 1024
    seed: int = 0

    qbits: ClassVar[int] = 8
    lossless: ClassVar[bool] = False
    decodes_into: ClassVar[bool] = True

    def __post_init__(self):
        B.check_block_size(self.block_size)
        B.check_seed(self.seed)

    def accepts(self, dtype: torch.dtype) -> bool:
        return dtype in B.FLOAT_DTYPES

    def sections(self, dtype: torch.dtype) -> tuple[SectionSpec, ...]:
        return (SectionSpec("meta", copies=3), SectionSpec("base", copies=1))

    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        x = check_input(self, x)
        compiled = native.module()
        if compiled is not None and _LITTLE_ENDIAN:
            # the compiled core writes both sections' bytes in place: a small tensor's encode was
            # mostly the arrays, views and copies around this one call
            lay = B.layout(x.numel(), self.block_size)
            # (every byte of both is written by the call: no zeroing pass first)
            meta = compiled.unfilled_bytearray(4 * lay.nblocks)
            base = compiled.unfilled_bytearray(lay.ncoef * (self.qbits // 8))
            compiled.encode_base(B.bits_view(x), B.dtype_code(x.dtype), lay.numel, self.block_size,
                                 B.sign_bits(self.seed, self.block_size), self.qbits, base, meta)
            return {"meta": meta, "base": base}
        q, f = B.encode_base(x, self.block_size, self.seed, self.qbits)
        return {
            "meta": f.numpy().astype("<f4", copy=False).tobytes(),
            "base": q.numpy().astype(_QDT_NP[self.qbits], copy=False).tobytes(),
        }

    def decode(
        self,
        data: Mapping[str, bytes | memoryview],
        dtype: torch.dtype,
        numel: int,
        damage: Damage | None = None,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> SegmentResult:
        if not self.accepts(dtype):
            raise CodecError(f"codec {self.name!r} cannot decode dtype {dtype}")
        dev = torch.device(device) if device is not None else _CPU
        out = usable_out(out, dtype, numel) if dev.type == "cpu" else None
        if numel == 0:
            return SegmentResult(torch.empty(0, dtype=dtype, device=dev))
        if damage is None and dev.type == "cpu":
            intact = self._decode_intact(data, dtype, numel, out)
            if intact is not None:
                return SegmentResult(intact)
        lay = B.layout(numel, self.block_size)
        f, bad_f = read_factors(data, lay, damage)
        q, counts, missing = read_coefs(data, lay, self.qbits, damage)
        return self._decode_blocks(q, counts, missing, f, bad_f, lay, dtype, dev, out)

    def _decode_intact(self, data, dtype, numel, out) -> torch.Tensor | None:
        """The compiled core's one-call decode of a segment the container
        reported undamaged (the values :meth:`_decode_blocks` gives, bit for
        bit), or None when there is no compiled core, a section is short or a
        factor would be replaced: the general path then rates the damage."""
        compiled = native.module()
        if compiled is None or "meta" not in data or "base" not in data:
            return None
        values = out if out is not None else memory.empty(numel, dtype)
        status = compiled.decode_base_intact(
            data["meta"], data["base"], self.qbits, B.dtype_code(dtype), numel, self.block_size,
            B.sign_bits(self.seed, self.block_size), B.dtype_max(dtype), B.bits_view(values),
        )
        return values if status == 0 else None

    def _decode_blocks(self, q, counts, missing, f, bad_f, lay: B.Layout, dtype, dev, out=None) -> SegmentResult:
        """Decode the blocks of ``lay`` from their coefficients and factors (into ``out`` when given);
        rate the damage."""
        numel = lay.numel
        ft = torch.from_numpy(f)
        if dev.type != "cpu":
            q, ft = q.to(dev), ft.to(dev)
        values = B.decode_base(q, ft, dtype, numel, self.block_size, self.seed, self.qbits, out=out)
        bad_base = np.ones(lay.nblocks, bool) if missing else (counts > 0 if counts is not None else np.zeros(lay.nblocks, bool))
        degraded = bad_f | bad_base
        if not degraded.any():
            return SegmentResult(values)
        n_deg = B.elements_of_blocks(degraded, lay)
        if bad_f.any() or missing:
            bound = None
        else:
            # Relative to the undamaged decode: the coefficient error vector of a
            # block has L2 norm <= range * sqrt(#damaged coefficients), the
            # transform is orthonormal (max element error <= L2 norm), and the
            # step in the orthonormal domain is f * sqrt(m).
            m = B.block_sizes_m(lay)
            step = f.astype(np.float64) * np.sqrt(m)
            c = counts
            err = 1.01 * step * _QRANGE[self.qbits] * np.sqrt(c)
            A = B.block_maxabs(values, lay) + err
            per = err + 2 * rounding_allowance(A, dtype)
            bound = float(per[degraded].max())
        return SegmentResult(values, exact=False, degraded_elements=n_deg, error_bound=bound)

    # ------------------------------------------------------------------ partial decoding: a unit is a block

    def unit_elements(self) -> int:
        """One block: blocks are independent (docs/codecs.md section 2.1)."""
        return self.block_size

    def unit_reads(self, dtype, numel, units, meta, damage, lengths) -> dict[str, tuple[int, int]]:
        """The coefficients of blocks ``[u0, u1)`` in ``base``."""
        first, last = block_coefficients(B.layout(numel, self.block_size), *units)
        return {"base": (first * self.qbits // 8, last * self.qbits // 8)}

    def decode_units(self, data, dtype, numel, units, damage, lengths) -> SegmentResult:
        """Blocks ``[u0, u1)``: their coefficients from the ``base`` range, their factors from the whole
        ``meta`` (a damaged factor is replaced by the median of the whole segment's, as :meth:`decode` does)."""
        if not self.accepts(dtype):
            raise CodecError(f"codec {self.name!r} cannot decode dtype {dtype}")
        lay = B.layout(numel, self.block_size)
        u0, u1 = max(0, units[0]), min(lay.nblocks, units[1])
        part = B.layout(max(0, min(u1 * self.block_size, numel) - u0 * self.block_size), self.block_size)
        if part.numel == 0:
            return SegmentResult(torch.empty(0, dtype=dtype))
        f, bad_f = read_factors(data, lay, damage)
        q, counts, missing = read_coefs(data, part, self.qbits, damage)
        return self._decode_blocks(q, counts, missing, f[u0:u1], bad_f[u0:u1], part, dtype, torch.device("cpu"))


def block_coefficients(lay: B.Layout, first_block: int, end_block: int) -> tuple[int, int]:
    """The stored coefficients ``[first, end)`` of blocks ``[first_block, end_block)`` of ``lay`` (the
    tail block is stored padded to its transform size)."""
    first_block, end_block = max(0, first_block), min(lay.nblocks, end_block)
    if end_block <= first_block:
        return 0, 0
    return first_block * lay.block_size, (lay.ncoef if end_block == lay.nblocks else end_block * lay.block_size)
