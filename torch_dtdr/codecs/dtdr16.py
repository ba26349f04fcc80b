"""``dtdr16``: the lossy int16 transform-domain codec.

Like ``dtdr8`` with int16 coefficients (clamped to +-32767). The inverse
transform sums are computed exactly in float64 and multiplied by the block
factor in float64 (exact); see ``docs/codecs.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import register
from ._transform import TransformCodec


@register
@dataclass(frozen=True)
class DTDR16(TransformCodec):
    """Lossy int16 Hadamard codec (relative L2 error about 3e-5)."""

    block_size: int = 1024
    seed: int = 0

    name: ClassVar[str] = "dtdr16"
    qbits: ClassVar[int] = 16
    lossless: ClassVar[bool] = False
