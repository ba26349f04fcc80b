"""``dtdr8``: the lossy int8 transform-domain base layer alone.

Each block of ``block_size`` elements (the tail block zero-padded to a power of
two) is multiplied by a random sign vector, Hadamard-transformed and quantised
to int8 with one float32 factor per block. Decoding is bit-identical on every
device. Sections: ``meta`` (3 copies: the float32 factors) and ``base`` (the
int8 coefficients). The byte layout is specified in ``docs/codecs.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import register
from ._transform import TransformCodec


@register
@dataclass(frozen=True)
class DTDR8(TransformCodec):
    """Lossy int8 Hadamard codec (about 25-50% of the raw size)."""

    block_size: int = 1024
    seed: int = 0

    name: ClassVar[str] = "dtdr8"
    qbits: ClassVar[int] = 8
    lossless: ClassVar[bool] = False
