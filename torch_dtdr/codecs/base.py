"""The codec interface: how one segment of one tensor becomes named byte sections.

A codec never sees the container. The writer hands it a 1-D, contiguous CPU
tensor (one *segment* of a tensor) and stores the sections it returns; the
reader hands the sections back, together with the byte ranges that failed
their checksums and could not be repaired, and the codec decides how to
degrade gracefully.

Codecs are frozen dataclasses: their parameters are serialised into the index
with :meth:`Codec.to_dict` and restored with :func:`torch_dtdr.codecs.from_dict`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import numpy as np
import torch


# Copies on the hot paths of save and load run here, on the calling thread, as
# one memcpy through numpy views of the bytes (bfloat16 has no numpy dtype, so
# the views are of same-sized integers): a torch copy of a large tensor runs on
# torch's intra-op thread pool, which on a small shared machine measured 2-3x
# slower than one thread and competes with the encode and decode threads.

#: same-sized integer dtypes to view a tensor's elements as, by element size
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _numpy_of(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of ``t``'s elements (as same-sized integers), or None where there is none."""
    as_int = _SAME_SIZE_INT.get(t.element_size())
    if as_int is None or t.device.type != "cpu" or t.is_conj() or t.is_neg() or t.requires_grad:
        return None
    try:
        return t.view(as_int).numpy()
    except (RuntimeError, TypeError):
        return None


def copy_elements(out: torch.Tensor, start: int, values: torch.Tensor) -> None:
    """``out[start:start + values.numel()] = values`` for a 1-D contiguous
    ``out`` and ``values`` of its dtype, copied on the calling thread."""
    values = values.reshape(-1)
    n = values.numel()
    dst = _numpy_of(out) if n and out.is_contiguous() and out.dtype == values.dtype else None
    src = None if dst is None else _numpy_of(values)
    if src is None:
        out[start:start + n] = values
        return
    dst[start:start + n] = src


def usable_out(out: torch.Tensor | None, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
    """``out`` when a codec can decode straight into it (1-D, contiguous, CPU,
    ``dtype``, ``numel`` elements), else None."""
    if out is None or out.dtype != dtype or out.dim() != 1 or out.numel() != numel:
        return None
    return out if out.is_contiguous() and out.device.type == "cpu" else None


def flat_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1).contiguous()`` (``t`` itself, flattened, when it is
    already contiguous), copying a strided CPU tensor on the calling thread."""
    if t.is_contiguous() or t.numel() == 0 or not t.is_cpu:
        return t if t.dim() == 1 and t.is_contiguous() else t.reshape(-1).contiguous()
    src = _numpy_of(t)
    if src is None:
        return t.reshape(-1).contiguous()
    out = torch.empty(t.shape, dtype=t.dtype)
    np.copyto(_numpy_of(out), src)
    return out.reshape(-1)


@dataclass(frozen=True)
class SectionSpec:
    """A named byte section a codec produces for every segment.

    ``copies`` > 1 asks the container to store the section that many times and
    vote bitwise between the copies when all of them are damaged: for small,
    critical data (per-block scales, frame tables, integer tensors).
    """

    name: str
    copies: int = 1


@dataclass
class Damage:
    """What the container could not restore for one segment.

    ``ranges`` maps a section name to sorted, disjoint ``(start, end)`` byte
    ranges (relative to the section) whose content is unreliable; the bytes are
    still passed to :meth:`Codec.decode` (damaged, not zeroed). ``missing``
    names sections that are absent altogether (a truncated file).
    """

    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    missing: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.missing) or any(self.ranges.values())


@dataclass
class SegmentResult:
    """A decoded segment and how faithful it is.

    ``exact`` is True only when the values are the saved values bit for bit
    (for lossy codecs: the values the codec was meant to return).
    ``degraded_elements`` counts elements affected by damage; ``error_bound`` is
    an upper bound on ``max |saved - returned|`` over those elements, or None
    when the codec cannot bound it.
    """

    values: torch.Tensor
    exact: bool = True
    degraded_elements: int = 0
    error_bound: float | None = 0.0


class Codec(ABC):
    """A way to turn tensor segments into byte sections and back."""

    name: ClassVar[str]
    #: True when decode returns the saved bits exactly (absent damage).
    lossless: ClassVar[bool]
    #: True when :meth:`decode` takes the keyword ``out`` (codecs written before it existed do not).
    decodes_into: ClassVar[bool] = False

    @abstractmethod
    def accepts(self, dtype: torch.dtype) -> bool:
        """Whether this codec can store tensors of ``dtype``."""

    @abstractmethod
    def sections(self, dtype: torch.dtype) -> tuple[SectionSpec, ...]:
        """The sections :meth:`encode` returns for ``dtype``, in storage order."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        """Encode a 1-D contiguous CPU tensor; keys are the section names."""

    @abstractmethod
    def decode(
        self,
        data: Mapping[str, bytes | memoryview],
        dtype: torch.dtype,
        numel: int,
        damage: Damage | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> SegmentResult:
        """Decode one segment of ``numel`` elements of ``dtype``.

        Must never raise on damaged data that passed the container's structural
        checks, and must never return a NaN or Inf that was not saved.
        ``out``, when given, is a 1-D contiguous CPU tensor of ``dtype`` and
        ``numel`` elements (a slice of the whole tensor, say) that the codec
        may decode into, saving the caller a copy: the result's ``values`` is
        then ``out`` itself. A codec may ignore it; callers check.
        """

    # Partial decoding: a codec whose segments are made of independently decodable units lets a reader
    # decode a few of them (``get_slice``) from part of the sections, instead of the whole segment.

    def unit_elements(self) -> int | None:
        """Elements per unit of a segment that decodes on its own, or None (the default) when a segment only
        decodes whole. Unit ``u`` of a segment of ``numel`` elements covers elements
        ``[u * n, min((u + 1) * n, numel))``. A codec with units implements :meth:`unit_reads` and
        :meth:`decode_units`; its ``meta`` section is always read whole (it is small and stored in copies)."""
        return None

    def unit_reads(self, dtype: torch.dtype, numel: int, units: tuple[int, int], meta: bytes | memoryview,
                   damage: Damage | None, lengths: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """The byte ranges ``{section: (start, end)}`` of every section but ``meta`` that units
        ``[u0, u1)`` need, given the whole ``meta`` (``damage``: its damaged ranges) and the full length of
        every section (``lengths``). Ranges lie within the sections."""
        raise NotImplementedError(f"codec {self.name!r} decodes whole segments only")

    def decode_units(self, data: Mapping[str, bytes | memoryview], dtype: torch.dtype, numel: int,
                     units: tuple[int, int], damage: Damage | None, lengths: Mapping[str, int]) -> SegmentResult:
        """The elements of units ``[u0, u1)`` of a segment of ``numel`` elements, bit for bit what
        :meth:`decode` gives for them (damaged ones too). ``data["meta"]`` is the whole section; every
        other section holds only the range :meth:`unit_reads` gave, and its ``damage`` ranges are relative
        to that range. The error bound covers the decoded units only."""
        raise NotImplementedError(f"codec {self.name!r} decodes whole segments only")

    def to_dict(self) -> dict:
        """The codec's name and parameters, JSON-serialisable."""
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_params(cls, params: Mapping) -> "Codec":
        """Rebuild from :meth:`to_dict` output (``name`` already removed)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(params) - names
        if unknown:
            from ..errors import CodecError

            raise CodecError(f"codec {cls.name!r} got unknown parameters {sorted(unknown)}")
        return cls(**params)
