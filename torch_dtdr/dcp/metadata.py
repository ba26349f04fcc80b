"""The DCP checkpoint's metadata: its schema, its JSON form, and its two copies on disk.

DCP's ``Metadata`` is written field by field as JSON (never pickled; the
schema is in the :mod:`torch_dtdr.dcp` docs), validated strictly when read
back (:func:`parse_json`), stored as a ``uint8`` tensor in a DTDR container
whose metadata carries the xxh3 of the JSON, and written twice. Also the
folder's naming rules (shard and metadata file names, paths that may not
leave the folder) and :class:`StorageInfo`, where one DCP item lives.
Importing DCP is left to the functions that build its objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from ..dtypes import ALL_DTYPES
from .._json import strict_loads
from .. import tree
from ..errors import (CheckpointNotFoundError, FormatError, IncompleteCheckpointError, IntegrityError,
                      UnsupportedVersionError)
from ..integrity.checksum import hash64
from ..kinds import DCP_METADATA_NAMES, DCP_RANK_METADATA_RE, DCP_SHARD_RE, folder_kind
from ..report import Report
from ..storage import child_inside, isdir, join, listdir, remove_symlink

#: File names of the two metadata copies, the primary one first.
METADATA_NAME = "metadata.dtdr"
METADATA_COPY_NAME = "metadata.copy.dtdr"
METADATA_NAMES = DCP_METADATA_NAMES
#: Torch versions whose DCP interfaces this module is written against
#: (differences between them are detected at run time, not pinned).
SUPPORTED_TORCH = ">=2.3,<2.15"

FORMAT_NAME = "torch_dtdr.dcp"
FORMAT_VERSION = 1
SUFFIX = ".dtdr"
#: The tensor holding the JSON in a metadata container.
META_KEY = "dcp_metadata"
#: The key of a shard's container metadata naming the save that wrote it.
SAVE_ID_KEY = "torch_dtdr.dcp.save_id"
#: A shard file name, ``__RANK_N.dtdr``.
SHARD_RE = DCP_SHARD_RE
#: A rank's own metadata file name (a save without collectives).
RANK_METADATA_RE = DCP_RANK_METADATA_RE
#: Longest item key (below torch_dtdr.tree.MAX_NAME_LEN, so a key is its own tensor name).
MAX_KEY_LEN = 900


@dataclass(frozen=True)
class StorageInfo:
    """Where one DCP item lives: a shard file of the checkpoint and the tensor name inside it."""

    file: str
    key: str
    save_id: str = ""


@dataclass(frozen=True)
class FilePrefix:
    """The shard-name prefix (``__RANK_``) a rank's plan carries to its ``write_data``."""

    prefix: str


def norm_path(path) -> str:
    """A path-like as a str (bytes decoded)."""
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def read_path(base: str, name: str, storage_options=None) -> str:
    """The path of a file to read from the checkpoint folder; a symlink that
    resolves outside the folder is refused (FormatError)."""
    if not child_inside(base, name, storage_options):
        raise FormatError(f"{name!r} resolves outside the checkpoint folder (a symlink?); refusing to read it",
                          file=join(base, name))
    return join(base, name)


def write_path(base: str, name: str, storage_options=None) -> str:
    """The path of a file to write into the checkpoint folder. A symlink
    planted there is removed first, so the save replaces the link and never
    writes through it to its target."""
    path = join(base, name)
    remove_symlink(path, storage_options)
    return path


_DTYPES: dict[str, torch.dtype] = ALL_DTYPES
_LAYOUTS = {n: getattr(torch, n) for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                                           "sparse_bsc", "_mkldnn", "jagged") if hasattr(torch, n)}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "channels_last_3d",
                                                  "preserve_format") if hasattr(torch, n)}


def _name_of(value, table: dict, what: str) -> str:
    for n, v in table.items():
        if v == value:
            return n
    raise TypeError(f"cannot store {what} {value!r} in DTDR checkpoint metadata")


def _fail(msg: str, where: str):
    raise FormatError(f"malformed DCP metadata: {msg}", field=where)


def _want(x, types, where: str, what: str):
    # bool is an int subclass: accept it only where asked for
    if isinstance(x, bool) and bool not in types:
        _fail(f"{what} must be {' or '.join(t.__name__ for t in types)}", where)
    if not isinstance(x, types):
        _fail(f"{what} must be {' or '.join(t.__name__ for t in types)}, not {type(x).__name__}", where)
    return x


def _ints(x, where: str, what: str, *, nonneg=True) -> list[int]:
    _want(x, (list,), where, what)
    for v in x:
        _want(v, (int,), where, what)
        if nonneg and v < 0:
            _fail(f"{what} must not be negative", where)
    return x


def _lookup(name, table: dict, where: str, what: str):
    _want(name, (str,), where, what)
    try:
        return table[name]
    except KeyError:
        _fail(f"unknown {what} {name!r}", where)


def metadata_to_plain(md, files: dict[str, str]) -> dict:
    """DCP ``Metadata`` -> the JSON document described in the module docs."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    sd = []
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            p = m.properties
            sd.append([fqn, {
                "type": "tensor",
                "dtype": _name_of(p.dtype, _DTYPES, "dtype"),
                "size": [int(s) for s in m.size],
                "layout": _name_of(getattr(p, "layout", torch.strided), _LAYOUTS, "layout"),
                "memory_format": _name_of(getattr(p, "memory_format", torch.contiguous_format), _MEMORY_FORMATS,
                                          "memory format"),
                "requires_grad": bool(getattr(p, "requires_grad", False)),
                "pin_memory": bool(getattr(p, "pin_memory", False)),
                "chunks": [[[int(o) for o in c.offsets], [int(s) for s in c.sizes]] for c in m.chunks],
            }])
        elif isinstance(m, BytesStorageMetadata):
            sd.append([fqn, {"type": "bytes"}])
        else:
            raise TypeError(f"{fqn}: DCP storage metadata of type {type(m).__name__} is not supported")
    file_no: dict[str, int] = {}
    storage = []
    for idx, info in (md.storage_data or {}).items():
        if not isinstance(info, StorageInfo):
            raise TypeError(f"{idx.fqn}: storage data {type(info).__name__} was not written by DTDRWriter")
        n = file_no.setdefault(info.file, len(file_no))
        storage.append([idx.fqn, None if idx.offset is None else [int(o) for o in idx.offset],
                        None if idx.index is None else int(idx.index), n, info.key])
    skeleton, entries = tree.flatten(md.planner_data)
    if entries:
        raise TypeError("DCP planner_data holds tensors; DTDR checkpoint metadata stores plain values only")
    sm = getattr(md, "storage_meta", None)
    storage_meta = None
    if sm is not None:
        cid = getattr(sm, "checkpoint_id", None)
        storage_meta = {
            "checkpoint_id": None if cid is None else norm_path(cid),
            "save_id": getattr(sm, "save_id", None),
            "load_id": getattr(sm, "load_id", None),
            "modules": [str(m) for m in (getattr(sm, "modules", None) or [])],
        }
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dcp_version": getattr(md, "version", None),
        "state_dict": sd,
        "files": [[name, files.get(name, "")] for name in file_no],
        "storage": storage,
        "planner_data": skeleton,
        "storage_meta": storage_meta,
    }


def check_plain(doc) -> dict:
    """Validate the JSON document's structure (raises FormatError); returns it."""
    _want(doc, (dict,), "$", "the document")
    if doc.get("format") != FORMAT_NAME:
        _fail(f"format must be {FORMAT_NAME!r}", "format")
    v = _want(doc.get("version"), (int,), "version", "version")
    if v > FORMAT_VERSION:
        raise UnsupportedVersionError(f"DCP metadata version {v} is newer than this torch_dtdr ({FORMAT_VERSION})")
    known = {"format", "version", "dcp_version", "state_dict", "files", "storage", "planner_data", "storage_meta"}
    for k in ("state_dict", "files", "storage"):
        _want(doc.get(k), (list,), k, k)
    if doc.get("dcp_version") is not None:
        _want(doc["dcp_version"], (str,), "dcp_version", "dcp_version")
    seen = set()
    for i, pair in enumerate(doc["state_dict"]):
        where = f"state_dict[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            _fail("each entry must be [fqn, item]", where)
        fqn, item = pair
        _want(fqn, (str,), where, "fqn")
        if fqn in seen:
            _fail(f"duplicate fqn {fqn!r}", where)
        seen.add(fqn)
        _want(item, (dict,), where, "item")
        kind = item.get("type")
        if kind == "bytes":
            continue
        if kind != "tensor":
            _fail(f"item type must be 'tensor' or 'bytes', got {kind!r}", where)
        _lookup(item.get("dtype"), _DTYPES, where, "dtype")
        _lookup(item.get("layout"), _LAYOUTS, where, "layout")
        _lookup(item.get("memory_format"), _MEMORY_FORMATS, where, "memory format")
        _want(item.get("requires_grad"), (bool,), where, "requires_grad")
        _want(item.get("pin_memory"), (bool,), where, "pin_memory")
        size = _ints(item.get("size"), where, "size")
        for j, c in enumerate(_want(item.get("chunks"), (list,), where, "chunks")):
            if not isinstance(c, list) or len(c) != 2:
                _fail("a chunk must be [offsets, sizes]", f"{where}.chunks[{j}]")
            off, sz = _ints(c[0], where, "chunk offsets"), _ints(c[1], where, "chunk sizes")
            if len(off) != len(size) or len(sz) != len(size):
                _fail("a chunk's offsets and sizes must have the tensor's rank", f"{where}.chunks[{j}]")
            if any(o + s > n for o, s, n in zip(off, sz, size)):
                _fail("a chunk reaches past the tensor", f"{where}.chunks[{j}]")
    for i, f in enumerate(doc["files"]):
        where = f"files[{i}]"
        if not isinstance(f, list) or len(f) != 2:
            _fail("each entry must be [name, save_id]", where)
        _want(f[1], (str,), where, "save_id")
        name = _want(f[0], (str,), where, "file name")
        if not SHARD_RE.fullmatch(name):
            _fail(f"file name {name!r} is not a shard name (__RANK_N.dtdr)", where)
    for i, s in enumerate(doc["storage"]):
        where = f"storage[{i}]"
        if not isinstance(s, list) or len(s) != 5:
            _fail("each entry must be [fqn, offsets, index, file, key]", where)
        fqn, off, index, fno, key = s
        _want(fqn, (str,), where, "fqn")
        if off is not None:
            _ints(off, where, "offsets")
        if index is not None:
            _want(index, (int,), where, "index")
        _want(fno, (int,), where, "file number")
        if not 0 <= fno < len(doc["files"]):
            _fail("file number out of range", where)
        _want(key, (str,), where, "key")
    sm = doc.get("storage_meta")
    if sm is not None:
        _want(sm, (dict,), "storage_meta", "storage_meta")
        for k in ("checkpoint_id", "save_id", "load_id"):
            if sm.get(k) is not None:
                _want(sm[k], (str,), f"storage_meta.{k}", k)
        for m in _want(sm.get("modules", []), (list,), "storage_meta.modules", "modules"):
            _want(m, (str,), "storage_meta.modules", "module")
    if set(doc) - known:
        _fail(f"unknown members {sorted(set(doc) - known)}", "$")
    return doc


def _planner_data(doc):
    skel = doc.get("planner_data")
    try:
        tree.validate(skel, 0)

        def no_tensor(i):
            raise FormatError("planner_data may not refer to tensors", field="planner_data")

        return tree.unflatten(skel, no_tensor)
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else is a malformed skeleton too
        _fail(f"planner_data is not a valid tree skeleton ({e})", "planner_data")


def plain_to_metadata(doc):
    """The JSON document -> DCP ``Metadata`` (imports DCP)."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from ..format import constants

    sd = {}
    declared = 0
    for fqn, item in doc["state_dict"]:
        if item["type"] == "bytes":
            sd[fqn] = BytesStorageMetadata()
            continue
        props = TensorProperties(dtype=_DTYPES[item["dtype"]])
        for name, value in (("layout", _LAYOUTS[item["layout"]]),
                            ("memory_format", _MEMORY_FORMATS[item["memory_format"]]),
                            ("requires_grad", item["requires_grad"]), ("pin_memory", item["pin_memory"])):
            if hasattr(props, name):
                setattr(props, name, value)
        numel = 1
        for d in item["size"]:
            numel *= d
        declared += numel * props.dtype.itemsize
        if declared > constants.MAX_TENSOR_BYTES:
            _fail(f"the checkpoint declares more than {constants.MAX_TENSOR_BYTES} tensor bytes (TORCH_DTDR_MAX_BYTES)",
                  f"state_dict[{fqn!r}].size")
        chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in item["chunks"]]
        sd[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(item["size"]), chunks=chunks)
    files = doc["files"]
    storage = {}
    for fqn, off, index, fno, key in doc["storage"]:
        storage[MetadataIndex(fqn, off, index)] = StorageInfo(files[fno][0], key, files[fno][1])
    md = Metadata(state_dict_metadata=sd, planner_data=_planner_data(doc), storage_data=storage)
    if hasattr(md, "version"):
        md.version = doc.get("dcp_version")
    sm = doc.get("storage_meta")
    if hasattr(md, "storage_meta"):
        try:
            from torch.distributed.checkpoint.metadata import StorageMeta
        except ImportError:  # pragma: no cover - torch < 2.4
            StorageMeta = None
        if StorageMeta is not None:
            md.storage_meta = StorageMeta(checkpoint_id=sm.get("checkpoint_id"), save_id=sm.get("save_id"),
                                          load_id=sm.get("load_id"), modules=list(sm.get("modules", []))) \
                if sm is not None else StorageMeta()
    return md


def parse_json(data: bytes) -> dict:
    """Parse and validate the metadata JSON (FormatError for anything malformed)."""
    try:
        text = data.decode("utf-8")
        doc = strict_loads(text)
    except RecursionError:
        raise FormatError("DCP metadata JSON is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, our hooks
        raise FormatError(f"DCP metadata is not valid JSON ({e})") from None
    return check_plain(doc)


def write_metadata(base: str, names, doc: dict, storage_options, parity) -> None:
    """Write the metadata document into each of ``names`` (one after the other, each atomically)."""
    from ..api import save

    data = json.dumps(doc, allow_nan=False, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "xxh3": f"{hash64(data):016x}",
            "bytes": str(len(data))}
    for name in names:  # each copy committed atomically, one after the other
        save({META_KEY: payload}, write_path(base, name, storage_options), codec="raw", parity=parity, metadata=meta,
             storage_options=storage_options)


def read_metadata_file(path: str, storage_options) -> tuple[dict, Report]:
    """Decode one metadata copy; raises on anything short of a bit-exact JSON document."""
    from ..lazy import open as dtdr_open

    with dtdr_open(path, errors="recover", storage_options=storage_options) as f:
        meta = f.metadata()
        if meta.get("format") != FORMAT_NAME:
            raise FormatError("not a DTDR DCP metadata file", file=path, field="format")
        t = f.get_tensor(META_KEY)
        rep = f.report()
    if t is None or not rep.exact:
        raise IntegrityError(f"metadata copy is {rep.status}", file=path, tensor=META_KEY)
    data = t.numpy().tobytes()
    if f"{hash64(data):016x}" != meta.get("xxh3") or str(len(data)) != meta.get("bytes"):
        raise IntegrityError("metadata JSON does not match its checksum", file=path, tensor=META_KEY)
    try:
        doc = parse_json(data)
    except FormatError as e:
        raise FormatError(e.message, file=path, field=e.field) from None
    return doc, rep


def metadata_names(rank: int | None) -> tuple[str, str]:
    """The two metadata file names: the global ones, or those of ``rank`` (a save without collectives)."""
    if rank is None:
        return METADATA_NAMES
    return (f"__{rank}.metadata.dtdr", f"__{rank}.metadata.copy.dtdr")


def load_plain_metadata(base: str, storage_options, rank: int | None = None) -> tuple[dict, list[Report]]:
    """The first good metadata copy of the checkpoint at ``base`` and the reports of the copies tried."""
    reports: list[Report] = []
    errors: list[str] = []
    missing = 0
    for name in metadata_names(rank):
        path = join(base, name)
        try:
            doc, rep = read_metadata_file(read_path(base, name, storage_options), storage_options)
        except CheckpointNotFoundError:
            missing += 1
            continue
        except (FormatError, IntegrityError, OSError) as e:
            errors.append(f"{name}: {e}")
            reports.append(Report(path, unreadable=str(e)))
            continue
        reports.append(rep)
        return doc, reports
    if missing == 2:
        names = listdir(base, storage_options)
        if not names and not isdir(base, storage_options):
            raise IncompleteCheckpointError("no checkpoint here (no such directory)", file=base)
        shards = [n for n in names if SHARD_RE.fullmatch(n) or n.endswith(".dtdr-tmp")]
        what = (f"{len(shards)} shard file(s) but no {metadata_names(rank)[0]}: the save was interrupted "
                "before its coordinator committed the checkpoint") if shards else \
            f"no {metadata_names(rank)[0]} (not a DTDR DCP checkpoint, or its save never finished)"
        raise IncompleteCheckpointError(f"incomplete DCP checkpoint: {what}", file=base)
    raise IntegrityError("DCP metadata is unreadable in every copy: " + "; ".join(errors), file=base)


def read_metadata(path, *, storage_options: Mapping | None = None):
    """DCP ``Metadata`` of the DTDR checkpoint at ``path`` (raises
    :class:`IncompleteCheckpointError` when it was never committed)."""
    doc, _ = load_plain_metadata(norm_path(path), storage_options)
    return plain_to_metadata(doc)


def dcp_kind(path, storage_options: Mapping | None = None) -> str | None:
    """``"dtdr"`` for a folder written by :class:`DTDRWriter` (complete or
    not), ``"torch"`` for one written by DCP's own ``FileSystemWriter`` /
    ``FsspecWriter`` (a pickled ``.metadata``), else None
    (see :func:`torch_dtdr.kinds.folder_kind`)."""
    return {"dcp": "dtdr", "torch-dcp": "torch"}.get(folder_kind(path, storage_options))


def is_checkpoint(path, storage_options: Mapping | None = None) -> bool:
    """Whether ``path`` is a directory holding a DTDR DCP checkpoint, complete
    or not (its metadata, or shard files named ``__RANK_N.dtdr``)."""
    return dcp_kind(path, storage_options) == "dtdr"
