"""Partial decoding of the lossless ``dtdr`` codec: a few residual frames of a segment.

A unit of ``dtdr`` is one residual frame (``frame_elements`` elements, 64 blocks by default,
docs/codecs.md section 4.6): its blocks' coefficients are a contiguous range of ``base`` and its zstd part
and bit stream a contiguous range of ``residual``, located through the frame table in ``meta``. Decoding
frames ``[u0, u1)`` from those ranges gives, bit for bit, what the whole segment's decode gives for their
elements, damage included: factors are replaced with the whole segment's median and frames located with
the whole frame table, as the whole decode does.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from . import _blocks as B
from . import _residual as R
from ._transform import block_coefficients, read_coefs, read_factors, rounding_allowance
from .base import Damage, SegmentResult


def frame_table(meta, meta_mask, nblocks: int, nframes: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame table in ``meta`` (after the flags and ``nblocks`` factors): ``(table, table_bad)``,
    entries that are damaged (``meta_mask``) or absent marked bad."""
    toff = 4 + 4 * nblocks
    table = np.zeros((nframes, 2), np.uint32)
    table_bad = np.ones(nframes, bool)
    avail = max(0, min(nframes, (len(meta) - toff) // 8))
    if avail:
        table[:avail] = B.np_view(meta, np.uint32, 2 * avail, toff).reshape(avail, 2)
        table_bad[:avail] = False
        if meta_mask is not None:
            part = meta_mask[toff: toff + 8 * avail]
            table_bad[:avail] |= part.reshape(avail, 8).any(axis=1)
    return table, table_bad


def _meta_of(data, damage: Damage | None):
    meta = B.as_bytes(data["meta"]) if "meta" in data else memoryview(b"")
    mask = B.damaged_mask(damage.ranges.get("meta"), len(meta)) if damage is not None else None
    return meta, mask


def _frames(codec, numel: int, units: tuple[int, int]):
    """``(layout, frames per segment, first frame, end frame, first block, end block)``, clipped."""
    lay = B.layout(numel, codec.block_size)
    fblocks = codec.frame_elements // codec.block_size
    nframes = -(-lay.nblocks // fblocks)
    u0, u1 = max(0, units[0]), min(nframes, units[1])
    return lay, fblocks, nframes, u0, u1, u0 * fblocks, min(u1 * fblocks, lay.nblocks)


def unit_reads(codec, numel: int, units: tuple[int, int], meta, damage: Damage | None,
               lengths) -> dict[str, tuple[int, int]]:
    """The ``base`` and ``residual`` byte ranges frames ``[u0, u1)`` of a ``dtdr`` segment need."""
    lay, _fblocks, nframes, u0, u1, b0, b1 = _frames(codec, numel, units)
    first, end = block_coefficients(lay, b0, b1)
    reads = {"base": (first, end)}
    meta, mask = _meta_of({"meta": meta}, damage)
    table, table_bad = frame_table(meta, mask, lay.nblocks, nframes)
    length = int(lengths.get("residual", 0))
    starts, ends = R.locate_frames(table, table_bad, length)
    known = [(s, e) for s, e in zip(starts[u0:u1], ends[u0:u1]) if s is not None and e is not None]
    lo = min(max(0, min((s for s, _e in known), default=0)), length)
    hi = min(length, max((e for _s, e in known), default=lo))
    reads["residual"] = (lo, max(lo, hi))
    return reads


def decode_units(codec, data, dtype: torch.dtype, numel: int, units: tuple[int, int], damage: Damage | None,
                 lengths) -> SegmentResult:
    """Frames ``[u0, u1)`` of a ``dtdr`` segment, as :meth:`DTDR.decode` decodes them (see the module
    docstring), from the whole ``meta`` and the ranges of ``base`` and ``residual`` that :func:`unit_reads`
    gives."""
    lay, fblocks, nframes, u0, u1, b0, b1 = _frames(codec, numel, units)
    bs = codec.block_size
    part = B.layout(max(0, min(b1 * bs, numel) - b0 * bs), bs)
    if part.numel == 0:
        return SegmentResult(torch.empty(0, dtype=dtype))
    meta_missing = "meta" not in data or (damage is not None and "meta" in damage.missing)
    meta, mask = _meta_of(data, damage) if not meta_missing else (memoryview(b""), None)
    if len(meta) >= 4 and (mask is None or not mask[:4].any()):
        flags = struct.unpack_from("<I", meta, 0)[0]
    else:
        flags = R.FLAG_UNBOUNDED
    f_all, bad_f_all = read_factors(data, lay, damage, offset=4)
    f, bad_f = f_all[b0:b1], bad_f_all[b0:b1]
    table, table_bad = frame_table(meta, mask, lay.nblocks, nframes)
    q, counts, base_missing = read_coefs(data, part, 8, damage)
    values = B.decode_base(q, torch.from_numpy(f), dtype, part.numel, bs, codec.seed, 8)
    bad_base = np.ones(part.nblocks, bool) if base_missing else (
        counts > 0 if counts is not None else np.zeros(part.nblocks, bool))
    block_ok = ~bad_f & ~bad_base
    resid_missing = "residual" not in data or (damage is not None and "residual" in damage.missing)
    info = R.INFO[dtype]
    if resid_missing or meta_missing or base_missing:
        lost = np.ones(part.numel, bool)
    else:
        bits = values.view(info.tint).numpy()
        residual_start = unit_reads(codec, numel, units, meta, damage, lengths)["residual"][0]
        resid_damage = damage.ranges.get("residual") if damage is not None else None
        lost = R.decode_residual_frames(bits, f, block_ok, data["residual"], residual_start,
                                        resid_damage, table, table_bad, int(lengths.get("residual", 0)), u0, part,
                                        dtype, fblocks)
        if not flags & R.FLAG_UNBOUNDED and R.nonfinite_any(bits, info):
            # as the whole decode: a non-finite value in a segment that saved none falls back to the base layer
            idx = torch.nonzero(~torch.isfinite(values)).flatten()
            fallback = B.decode_base(q, torch.from_numpy(f), dtype, part.numel, bs, codec.seed, 8)
            values[idx] = fallback[idx]
            lost[idx.numpy()] = True
    if not lost.any():
        return SegmentResult(values)
    lost_blocks = np.zeros(part.nblocks, bool)
    lost_blocks[np.unique(np.flatnonzero(lost) // bs)] = True
    if base_missing or (lost_blocks & bad_f).any() or (flags & R.FLAG_UNBOUNDED):
        bound = None
    else:
        m = B.block_sizes_m(part)
        step = f.astype(np.float64) * np.sqrt(m)
        err = step * np.sqrt(m) / 2.0
        if counts is not None:
            err = err + step * 254.0 * np.sqrt(counts)
        err = err * 1.02
        per = err + rounding_allowance(B.block_maxabs(values, part) + err, dtype)
        bound = float(per[lost_blocks].max())
    return SegmentResult(values, exact=False, degraded_elements=int(lost.sum()), error_bound=bound)
