"""Codecs: one module per codec, looked up by name through a registry."""

from __future__ import annotations

from typing import Mapping

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
    """Rebuild a codec from :meth:`Codec.to_dict` output."""
    if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
        raise CodecError(f"malformed codec description {d!r}")
    params = dict(d)
    return get(params.pop("name"), **params)


def names() -> list[str]:
    return sorted(_REGISTRY)


# Importing the modules registers them.
from . import raw, dtdr, dtdr8, dtdr16  # noqa: E402,F401
from ._residual import release_thread_buffers  # noqa: E402

__all__ = ["Codec", "Damage", "SectionSpec", "SegmentResult", "register", "get", "from_dict", "names",
           "release_thread_buffers"]
