"""Codecs: one module per codec, looked up by name through a registry."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from ..errors import CodecError
from .base import Codec, Damage, SectionSpec, SegmentResult

_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str, **params) -> Codec:
    """The codec called ``name`` with ``params`` (defaults for the rest)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls.from_params(params)


def from_dict(d: Mapping) -> Codec:
    """Rebuild a codec from :meth:`Codec.to_dict` output. Codecs are frozen,
    so equal descriptions share one instance (a load builds one per tensor)."""
    if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
        raise CodecError(f"malformed codec description {d!r}")
    values = tuple(d.values())
    seen_as = (tuple(d), tuple(map(type, values)), values)  # types too: True == 1, 1.0 == 1
    try:
        codec = _described.get(seen_as)
        if codec is None:
            codec = _from_items(tuple((k, type(v), v) for k, v in sorted(d.items())))
            if len(_described) < 256:
                _described[seen_as] = codec
        return codec
    except TypeError:  # unhashable or unorderable parameters: the codec's own checks will say what is wrong
        params = dict(d)
        return get(params.pop("name"), **params)


#: Codecs by their description as given (members in the order given): most of a load's
#: descriptions are the same few, and this finds them without sorting.
_described: dict[tuple, Codec] = {}


@functools.lru_cache(maxsize=256)
def _from_items(items: tuple) -> Codec:
    params = {k: v for k, _type, v in items}
    return get(params.pop("name"), **params)


def names() -> list[str]:
    return sorted(_REGISTRY)


# Importing the modules registers them.
from . import raw, dtdr, dtdr8, dtdr16  # noqa: E402,F401
from ._residual import release_thread_buffers  # noqa: E402

__all__ = ["Codec", "Damage", "SectionSpec", "SegmentResult", "register", "get", "from_dict", "names",
           "release_thread_buffers"]
