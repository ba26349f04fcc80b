"""Planning the reads behind ``DTDRFile.get_slice(name)[key]``.

A key (ints, slices with a positive step, one Ellipsis, as in safetensors'
``get_slice``) selects elements of a tensor whose element ``(i0, i1, ...)``
lies at ``offset + i0 * stride0 + i1 * stride1 + ...`` of its stored, flat
data. :func:`plan` turns the key into a few *runs*: flat element ranges of
the stored data, each paired with the sizes and strides that pick the
selected elements out of it. Reading the runs (merged where they are closer
than a checksum chunk) and gathering them in order gives the slice, row-major.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass

from .errors import ArgumentError

#: the most runs a plan enumerates one by one (the rest of a selection is spanned)
MAX_RUNS = 4096


@dataclass(frozen=True)
class Axis:
    """What a key selects along one dimension: ``count`` indices from
    ``start`` by ``step``; ``keep`` is False for an integer index (the
    dimension is dropped from the result)."""

    start: int
    step: int
    count: int
    keep: bool


@dataclass(frozen=True)
class Run:
    """Stored elements ``[start, end)`` hold this part of the selection;
    ``sizes``/``strides`` (relative to ``start``) pick it out, row-major."""

    start: int
    end: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]


def axes(key, shape: tuple[int, ...]) -> list[Axis]:
    """The per-dimension selection of ``key`` on a tensor of ``shape``.

    Raises IndexError for an index out of range or too many indices (as
    torch does) and :class:`~torch_dtdr.errors.ArgumentError` for what
    ``get_slice`` does not take (a step below 1, a second Ellipsis, a tensor
    or list index)."""
    items = key if isinstance(key, tuple) else (key,)
    if sum(1 for k in items if k is Ellipsis) > 1:
        raise ArgumentError("an index can only have a single ellipsis ('...')", field="key")
    explicit = sum(1 for k in items if k is not Ellipsis)
    if explicit > len(shape):
        raise IndexError(f"too many indices for tensor of dimension {len(shape)}")
    expanded: list = []
    for k in items:
        if k is Ellipsis:
            expanded += [slice(None)] * (len(shape) - explicit)
        else:
            expanded.append(k)
    expanded += [slice(None)] * (len(shape) - len(expanded))
    out = []
    for dim, (k, n) in enumerate(zip(expanded, shape)):
        if isinstance(k, slice):
            if k.step is not None and operator.index(k.step) <= 0:
                raise ArgumentError(f"slice step must be greater than zero, got {k.step}", field="key")
            start, stop, step = k.indices(n)
            out.append(Axis(start, step, max(0, -(-(stop - start) // step)), True))
            continue
        if isinstance(k, bool):
            raise ArgumentError("boolean indices are not supported by get_slice", field="key")
        try:
            i = operator.index(k)
        except TypeError:
            raise ArgumentError(f"get_slice takes ints, slices and '...', got {type(k).__name__}",
                                field="key") from None
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for dimension {dim} with size {n}")
        out.append(Axis(i % n, 1, 1, False))
    return out


def result_shape(selection: list[Axis]) -> tuple[int, ...]:
    return tuple(a.count for a in selection if a.keep)


def plan(selection: list[Axis], offset: int, strides: tuple[int, ...]) -> list[Run]:
    """The runs of stored elements behind ``selection`` of a tensor at
    ``offset`` with ``strides``, in row-major order of the selection.

    The leading dimensions are enumerated (at most :data:`MAX_RUNS` runs), the
    trailing ones spanned; the split is the one that spans the fewest elements
    in total, so ``t[10:12]`` of a matrix is one run of two rows and
    ``t[:, 3]`` one run per row."""
    if any(a.count == 0 for a in selection):
        return []
    ndim = len(selection)
    best = None
    for split in range(ndim + 1):
        combos = math.prod(a.count for a in selection[:split])
        if combos > MAX_RUNS:
            break
        inner = selection[split:]
        span = 1 + sum((a.count - 1) * a.step * s for a, s in zip(inner, strides[split:]))
        if best is None or combos * span < best[0]:
            best = (combos * span, split)
    split = best[1]
    inner, inner_strides = selection[split:], strides[split:]
    first = sum(a.start * s for a, s in zip(inner, inner_strides))
    span = 1 + sum((a.count - 1) * a.step * s for a, s in zip(inner, inner_strides))
    sizes = tuple(a.count for a in inner)
    steps = tuple(a.step * s for a, s in zip(inner, inner_strides))
    runs = []
    outer = [range(a.start, a.start + a.count * a.step, a.step) for a in selection[:split]]
    for index in itertools.product(*outer):
        start = offset + first + sum(i * s for i, s in zip(index, strides[:split]))
        runs.append(Run(start, start + span, sizes, steps))
    return runs


def merge(runs: list[Run], gap: int) -> list[tuple[int, int]]:
    """The element ranges to read for ``runs``: overlapping ranges, and
    ranges less than ``gap`` elements apart, become one (a read costs a
    whole checksum chunk anyway)."""
    merged: list[list[int]] = []
    for start, end in sorted((r.start, r.end) for r in runs):
        if merged and start <= merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]
