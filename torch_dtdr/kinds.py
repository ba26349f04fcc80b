"""What a path holds: the one place that tells a DTDR file from a DCP folder, safetensors or torch.

:func:`kind_of` answers for a path or fsspec URL (``"dtdr"``, ``"dcp"``,
``"torch-dcp"``, ``"safetensors"``, ``"torch"``, ``"hf-folder"`` or None);
:func:`head_kind` judges the first bytes of a file, :func:`folder_kind` the
names in a folder. The load, verify and convert front doors and the sweep
route by these answers instead of each sniffing files its own way. The
DTDR-specific judgement of a damaged file (its trailer or footer, when the
magic is gone) stays with the container, in
:func:`torch_dtdr.format.reader.looks_like_dtdr`. Imports no torch.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Mapping

from .format.constants import MAGIC
from .storage import isdir, listdir

#: File names of the two copies of a DTDR DCP checkpoint's metadata, primary first.
DCP_METADATA_NAMES = ("metadata.dtdr", "metadata.copy.dtdr")
#: A DTDR DCP shard file: ``__RANK_N.dtdr``.
DCP_SHARD_RE = re.compile(r"__(\d+)_(\d+)\.dtdr")
#: The per-rank metadata of a DTDR DCP save without collectives.
DCP_RANK_METADATA_RE = re.compile(r"__(\d+)\.metadata(?:\.copy)?\.dtdr")
#: Largest safetensors header accepted as one (the format's own limit).
MAX_SAFETENSORS_HEADER = 100 * 2**20

_TORCH_DCP_METADATA_RE = re.compile(r"__\d+\.metadata")
_HF_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def as_str(path) -> str:
    """A path-like (str, bytes or ``os.PathLike``) as a str."""
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def head_kind(head: bytes, size: int | None = None) -> str | None:
    """``"dtdr"``, ``"safetensors"`` or ``"torch"`` judged from a file's first
    bytes (a safetensors header length is checked against ``size`` when
    given), or None when they look like none of them."""
    if head[: len(MAGIC)] == MAGIC:
        return "dtdr"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_SAFETENSORS_HEADER and (size is None or 8 + n <= size):
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # a torch.save zip, or a legacy pickle
        return "torch"
    return None


def folder_kind_from_names(names) -> str | None:
    """What a folder holding ``names`` is: ``"dcp"`` (written by
    :class:`torch_dtdr.dcp.DTDRWriter`, complete or not), ``"torch-dcp"``
    (DCP's own writers: a pickled ``.metadata``), ``"hf-folder"`` (weight
    files by Hugging Face's names and suffixes) or None."""
    names = list(names)
    if any(n in DCP_METADATA_NAMES or DCP_SHARD_RE.fullmatch(n) or DCP_RANK_METADATA_RE.fullmatch(n)
           for n in names):
        return "dcp"
    if ".metadata" in names or any(_TORCH_DCP_METADATA_RE.fullmatch(n) for n in names):
        return "torch-dcp"
    if any(n.endswith(_HF_WEIGHT_SUFFIXES) for n in names):
        return "hf-folder"
    return None


def folder_kind(path, storage_options: Mapping | None = None) -> str | None:
    """:func:`folder_kind_from_names` of the folder at ``path``; None when
    ``path`` is not a path, not a folder, or a store that cannot list it."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = as_str(path)
    try:
        if not isdir(p, storage_options):
            return None
        names = listdir(p, storage_options)
    except Exception:  # noqa: BLE001 - a store that cannot list is not a checkpoint folder
        return None
    return folder_kind_from_names(names)


def kind_of(path, storage_options: Mapping | None = None) -> str | None:
    """What ``path`` (a local path or fsspec URL) holds: a folder kind
    (:func:`folder_kind`), else a file kind from its first bytes
    (:func:`head_kind`; a damaged DTDR file is still ``"dtdr"`` when its
    trailer or footer says so), else None (missing or unrecognised)."""
    from .format.reader import looks_like_dtdr
    from .storage import open_source

    found = folder_kind(path, storage_options)
    if found is not None or not isinstance(path, (str, os.PathLike)):
        return found
    try:
        with open_source(as_str(path), storage_options) as src:
            head = src.read(0, min(src.size, 16))
            kind = head_kind(head, src.size)
            if kind is None and looks_like_dtdr(src):
                kind = "dtdr"
            return kind
    except (OSError, ValueError):
        return None
