"""``raw``: the tensor's bytes as they are.

One section, ``data``: the segment's elements in order, each in the tensor's
own dtype, little-endian (``bool`` as one byte, 0 or 1; complex as real then
imaginary part). Non-floating dtypes (integers, bool) are stored with 3 copies
so that the container can vote; floating and complex dtypes with 1.

Damage: for floating and complex dtypes every element overlapping a damaged
byte is set to zero (all-zero bytes; never a NaN or Inf that was not saved);
for integer dtypes the bytes are kept as given (bool bytes are normalised to
0/1). Either way the result is marked inexact with no error bound.
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
from . import _blocks as B
from . import register
from .base import Codec, Damage, SectionSpec, SegmentResult, flat_contiguous, usable_out

_NAMES = [
    "float16", "bfloat16", "float32", "float64",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "bool", "complex32", "complex64", "complex128",
]  # fmt: skip
RAW_DTYPES = frozenset(getattr(torch, n) for n in _NAMES if isinstance(getattr(torch, n, None), torch.dtype))

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
    raise ImportError("torch_dtdr's raw codec assumes a little-endian host")


def is_floating(dtype: torch.dtype) -> bool:
    """Floating and complex dtypes: damaged elements are zeroed."""
    return dtype.is_floating_point or dtype.is_complex


@register
@dataclass(frozen=True)
class Raw(Codec):
    """Stores the bytes verbatim; accepts every dtype of a fixed size.

    Non-floating data cannot degrade gracefully, so it is stored in
    ``copies`` copies (voted bitwise when all are damaged); floating data once.
    """

    name: ClassVar[str] = "raw"
    lossless: ClassVar[bool] = True
    decodes_into: ClassVar[bool] = True
    copies: int = 3

    def accepts(self, dtype: torch.dtype) -> bool:
        return dtype in RAW_DTYPES

    def sections(self, dtype: torch.dtype) -> tuple[SectionSpec, ...]:
        return (SectionSpec("data", copies=1 if is_floating(dtype) else self.copies),)

    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        if not isinstance(x, torch.Tensor):
            raise CodecError(f"codec 'raw' encodes torch tensors, got {type(x).__name__}")
        if not self.accepts(x.dtype):
            raise CodecError(f"codec 'raw' cannot store dtype {x.dtype}")
        x = flat_contiguous(x.detach().cpu())
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        if x.numel() == 0:
            return {"data": b""}
        return {"data": x.view(torch.uint8).numpy().tobytes()}

    def decode(
        self,
        data: Mapping[str, bytes | memoryview],
        dtype: torch.dtype,
        numel: int,
        damage: Damage | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> SegmentResult:
        if not self.accepts(dtype):
            raise CodecError(f"codec 'raw' cannot decode dtype {dtype}")
        isz = dtype.itemsize
        nbytes = numel * isz
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
            values = usable_out(out, dtype, numel)
            if values is None:
                values = memory.empty(nbytes, torch.uint8).view(dtype) if nbytes else torch.empty(0, dtype=dtype)
        buf = values.view(torch.uint8).numpy()
        missing = "data" not in data or (damage is not None and "data" in damage.missing)
        bad = None
        if missing:
            buf[:] = 0
            bad = np.ones(numel, bool)
        else:
            mv = B.as_bytes(data["data"])
            have = min(len(mv), nbytes)
            buf[have:] = 0
            if have:
                buf[:have] = np.frombuffer(mv, np.uint8, have)
            bm = B.damaged_mask(damage.ranges.get("data"), nbytes) if damage is not None else None
            if bm is not None or have < nbytes:
                bad = B.item_mask(bm, isz, numel) if bm is not None else np.zeros(numel, bool)
                if have < nbytes:
                    bad[have // isz :] = True
                if not bad.any():
                    bad = None
        if bad is not None and is_floating(dtype):
            buf.reshape(numel, isz)[bad] = 0
        if dtype == torch.bool:
            np.not_equal(buf, 0, out=buf.view(bool))
        if bad is None:
            return SegmentResult(values)
        return SegmentResult(values, exact=False, degraded_elements=int(bad.sum()), error_bound=None)
