"""DTDR storage for ``torch.distributed.checkpoint`` (DCP).

:class:`DTDRWriter` and :class:`DTDRReader` implement DCP's ``StorageWriter``
and ``StorageReader``, so a sharded, multi-rank checkpoint gets DTDR's
checksums, parity and codecs without a distributed layer of its own: DCP plans
who writes and reads what (deduplication, resharding), DTDR stores the bytes::

    import torch.distributed.checkpoint as dcp
    from torch_dtdr.dcp import DTDRReader, DTDRWriter

    dcp.save(state_dict, storage_writer=DTDRWriter("ckpt/step-1000"))
    dcp.load(state_dict, storage_reader=DTDRReader("ckpt/step-1000"))

Layout of a checkpoint folder (a local directory or an fsspec URL prefix)::

    __0_0.dtdr          rank 0's items: one DTDR container, one tensor per item
    __1_0.dtdr          rank 1's items
    ...
    metadata.dtdr       DCP's global metadata (see below), written last
    metadata.copy.dtdr  a second, independent copy of it

Each rank writes one container with :func:`torch_dtdr.save` (checksummed,
parity-protected, committed atomically). Tensor items use the chosen codec
(lossless ``"dtdr"`` by default); DCP's byte items (``BYTE_IO``: every
non-tensor value, which DCP serialises with ``torch.save``) are stored as
``uint8`` tensors with the ``raw`` codec, i.e. three voted copies plus parity.

The metadata is never pickled. DCP's ``Metadata`` is written field by field as
UTF-8 JSON (schema ``torch_dtdr.dcp`` version 1, below; ``planner_data`` goes
through :mod:`torch_dtdr.tree`'s pickle-free skeleton), stored as a ``uint8``
tensor inside a DTDR container whose string metadata carries the xxh3 of the
JSON, and written twice. The coordinator writes both copies in ``finish()``,
after every rank has committed its shard, each atomically; before any shard
is written it deletes the metadata of a checkpoint being overwritten. So a
folder without metadata is an interrupted save, and :class:`DTDRReader` refuses
it with :class:`IncompleteCheckpointError`. Every shard also records the id of
the save that wrote it, and the metadata records which id each file must
carry, so a shard left over from another save is never mixed in.

Metadata JSON (schema version 1)::

    {"format": "torch_dtdr.dcp", "version": 1,
     "dcp_version": STR | null,                  # Metadata.version
     "state_dict": [[FQN, ITEM], ...],           # Metadata.state_dict_metadata, in order
     "files": [[NAME, SAVE_ID], ...],            # shard files and the save that wrote them
     "storage": [[FQN, OFFSETS | null, INDEX | null, FILE_NO, KEY], ...],
                                                 # Metadata.storage_data: item -> file, key
     "planner_data": SKELETON,                   # torch_dtdr.tree skeleton (no tensors)
     "storage_meta": {"checkpoint_id": STR|null, "save_id": STR|null,
                      "load_id": STR|null, "modules": [STR, ...]} | null}
    ITEM = {"type": "bytes"}
         | {"type": "tensor", "dtype": NAME, "size": [INT, ...],
            "layout": NAME, "memory_format": NAME, "requires_grad": BOOL,
            "pin_memory": BOOL, "chunks": [[[OFFSET, ...], [SIZE, ...]], ...]}

Also here: :func:`verify_checkpoint` (per shard, per tensor), and the
converters :func:`dcp_to_dtdr` / :func:`dtdr_to_dcp` between a DCP checkpoint
and a single DTDR file (``dtdr dcp-convert IN OUT``).

Importing ``torch.distributed.checkpoint`` takes seconds, so this module only
does it when :class:`DTDRWriter`, :class:`DTDRReader` or a converter is used;
:func:`verify_checkpoint` and the command-line registration never need it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

import torch

from ._json import strict_loads
from . import tree
from .dtypes import ALL_DTYPES
from .errors import (CheckpointNotFoundError, DamageWarning, FormatError, IncompleteCheckpointError, IntegrityError,
                     UnsupportedVersionError)
from .integrity.checksum import hash64
from .kinds import DCP_METADATA_NAMES, DCP_RANK_METADATA_RE, DCP_SHARD_RE, folder_kind
from .report import DEGRADED, EXACT, LOST, REPAIRED, Report, TensorReport, exit_code, worst
from .storage import child_inside, exists, is_url, isdir, join, listdir, makedirs, remove, remove_symlink

__all__ = [
    "DTDRWriter",
    "DTDRReader",
    "CheckpointReport",
    "IncompleteCheckpointError",
    "verify_checkpoint",
    "is_checkpoint",
    "dcp_kind",
    "read_metadata",
    "dcp_to_dtdr",
    "dtdr_to_dcp",
    "METADATA_NAME",
    "METADATA_COPY_NAME",
    "SUPPORTED_TORCH",
]

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
_META_KEY = "dcp_metadata"  # the tensor holding the JSON in a metadata container
_SAVE_ID_KEY = "torch_dtdr.dcp.save_id"  # a shard's container metadata
_SHARD_RE = DCP_SHARD_RE
_RANK_META_RE = DCP_RANK_METADATA_RE
_MAX_KEY_LEN = 900  # below torch_dtdr.tree.MAX_NAME_LEN, so a key is its own tensor name


# --------------------------------------------------------------------------- plan / storage data


@dataclass(frozen=True)
class _DTDRStorageInfo:
    """Where one DCP item lives: a shard file of the checkpoint and the tensor name inside it."""

    file: str
    key: str
    save_id: str = ""


@dataclass(frozen=True)
class _FilePrefix:
    prefix: str


# --------------------------------------------------------------------------- paths


def _norm(path) -> str:
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def _read_path(base: str, name: str, storage_options=None) -> str:
    """The path of a file to read from the checkpoint folder; a symlink that
    resolves outside the folder is refused (FormatError)."""
    if not child_inside(base, name, storage_options):
        raise FormatError(f"{name!r} resolves outside the checkpoint folder (a symlink?); refusing to read it",
                          file=join(base, name))
    return join(base, name)


def _write_path(base: str, name: str, storage_options=None) -> str:
    """The path of a file to write into the checkpoint folder. A symlink
    planted there is removed first, so the save replaces the link and never
    writes through it to its target."""
    path = join(base, name)
    remove_symlink(path, storage_options)
    return path


# --------------------------------------------------------------------------- metadata <-> JSON


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


def _metadata_to_plain(md, files: dict[str, str]) -> dict:
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
        if not isinstance(info, _DTDRStorageInfo):
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
            "checkpoint_id": None if cid is None else _norm(cid),
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


def _check_plain(doc) -> dict:
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
        if not _SHARD_RE.fullmatch(name):
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


def _plain_to_metadata(doc):
    """The JSON document -> DCP ``Metadata`` (imports DCP)."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from .format import constants

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
        storage[MetadataIndex(fqn, off, index)] = _DTDRStorageInfo(files[fno][0], key, files[fno][1])
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



def _parse_json(data: bytes) -> dict:
    try:
        text = data.decode("utf-8")
        doc = strict_loads(text)
    except RecursionError:
        raise FormatError("DCP metadata JSON is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, our hooks
        raise FormatError(f"DCP metadata is not valid JSON ({e})") from None
    return _check_plain(doc)


def _write_metadata(base: str, names, doc: dict, storage_options, parity) -> None:
    from .api import save

    data = json.dumps(doc, allow_nan=False, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "xxh3": f"{hash64(data):016x}",
            "bytes": str(len(data))}
    for name in names:  # each copy committed atomically, one after the other
        save({_META_KEY: payload}, _write_path(base, name, storage_options), codec="raw", parity=parity, metadata=meta,
             storage_options=storage_options)


def _read_metadata_file(path: str, storage_options) -> tuple[dict, Report]:
    """Decode one metadata copy; raises on anything short of a bit-exact JSON document."""
    from .lazy import open as dtdr_open

    with dtdr_open(path, errors="recover", storage_options=storage_options) as f:
        meta = f.metadata()
        if meta.get("format") != FORMAT_NAME:
            raise FormatError("not a DTDR DCP metadata file", file=path, field="format")
        t = f.get_tensor(_META_KEY)
        rep = f.report()
    if t is None or not rep.exact:
        raise IntegrityError(f"metadata copy is {rep.status}", file=path, tensor=_META_KEY)
    data = t.numpy().tobytes()
    if f"{hash64(data):016x}" != meta.get("xxh3") or str(len(data)) != meta.get("bytes"):
        raise IntegrityError("metadata JSON does not match its checksum", file=path, tensor=_META_KEY)
    try:
        doc = _parse_json(data)
    except FormatError as e:
        raise FormatError(e.message, file=path, field=e.field) from None
    return doc, rep


def _metadata_names(rank: int | None) -> tuple[str, str]:
    if rank is None:
        return METADATA_NAMES
    return (f"__{rank}.metadata.dtdr", f"__{rank}.metadata.copy.dtdr")


def _load_plain_metadata(base: str, storage_options, rank: int | None = None) -> tuple[dict, list[Report]]:
    """The first good metadata copy of the checkpoint at ``base`` and the reports of the copies tried."""
    reports: list[Report] = []
    errors: list[str] = []
    missing = 0
    for name in _metadata_names(rank):
        path = join(base, name)
        try:
            doc, rep = _read_metadata_file(_read_path(base, name, storage_options), storage_options)
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
        shards = [n for n in names if _SHARD_RE.fullmatch(n) or n.endswith(".dtdr-tmp")]
        what = (f"{len(shards)} shard file(s) but no {_metadata_names(rank)[0]}: the save was interrupted "
                "before its coordinator committed the checkpoint") if shards else \
            f"no {_metadata_names(rank)[0]} (not a DTDR DCP checkpoint, or its save never finished)"
        raise IncompleteCheckpointError(f"incomplete DCP checkpoint: {what}", file=base)
    raise IntegrityError("DCP metadata is unreadable in every copy: " + "; ".join(errors), file=base)


def read_metadata(path, *, storage_options: Mapping | None = None):
    """DCP ``Metadata`` of the DTDR checkpoint at ``path`` (raises
    :class:`IncompleteCheckpointError` when it was never committed)."""
    doc, _ = _load_plain_metadata(_norm(path), storage_options)
    return _plain_to_metadata(doc)


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


# --------------------------------------------------------------------------- writer / reader helpers


def _item_key(index, used: set) -> str:
    """A name for one DCP item inside a shard container: ``fqn`` for byte items,
    ``fqn@o0,o1,...`` for tensor chunks; unique and short enough to be its own
    tensor name in the container."""
    key = index.fqn if not index.offset else f"{index.fqn}@{','.join(str(int(o)) for o in index.offset)}"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        key = ""
    if not key or len(key) > _MAX_KEY_LEN:
        key = f"item{len(used)}"
    base, n = key, 2
    while key in used:
        key = f"{base}~{n}"
        n += 1
    used.add(key)
    return key


def _codec_chooser(codec, keys: dict):
    """A ``(name, tensor) -> codec`` callable for torch_dtdr.save: byte items raw,
    tensors by the user's spec (patterns and callables see the item's fqn)."""
    from .codecs.base import Codec

    def choose(name, tensor):
        kind, fqn = keys.get(name, ("tensor", name))
        if kind == "bytes":
            return "raw"
        if isinstance(codec, (str, Codec)):
            return codec
        if isinstance(codec, Mapping):
            return next((v for pat, v in codec.items() if fnmatchcase(fqn, pat)), "dtdr")
        return codec(fqn, tensor)

    return choose


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, int(o), int(n))
    return t


def _release(f) -> None:
    """Let a lazy DTDR file forget the tensors it decoded (keeps memory per
    read bounded by one item rather than the whole shard)."""
    f.release()


def _check_bytes_safe(data: bytes, fqn: str, file: str) -> None:
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the restricted unpickler refuses
        raise FormatError(
            f"byte item {fqn!r} needs full unpickling to load ({type(e).__name__}: {str(e)[:200]}); DCP would "
            "torch.load it with weights_only=False. Pass allow_pickle=True to DTDRReader if you trust this "
            "checkpoint, or register its types with torch.serialization.add_safe_globals",
            file=file, tensor=fqn) from None


def _rank_default() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover
        pass
    return 0


# --------------------------------------------------------------------------- the DCP classes (built lazily)


def _build_classes():
    """Define DTDRWriter / DTDRReader; importing DCP costs seconds, so only on first use."""
    from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
    from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
    from torch.futures import Future

    try:
        from torch.distributed.checkpoint.metadata import StorageMeta
    except ImportError:  # pragma: no cover - torch < 2.4
        StorageMeta = None
    try:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
    except ImportError:  # pragma: no cover - torch < 2.5
        CURRENT_DCP_VERSION = None

    def _done(value):
        fut = Future()
        fut.set_result(value)
        return fut

    class DTDRWriter(StorageWriter):
        """DCP ``StorageWriter`` that stores every rank's items as one DTDR container.

        ``path`` is a directory or fsspec URL (``"s3://bucket/ckpt/step-100"``).
        ``codec``, ``block_size`` and ``parity`` are those of
        :func:`torch_dtdr.save`; a dict of patterns or a callable ``codec`` sees
        each item's DCP fully qualified name. Byte items always use ``raw``.
        ``metadata_parity`` protects the two metadata copies. An existing
        checkpoint in ``path`` is replaced (``overwrite=False`` refuses): its
        metadata is deleted before any shard is written, so an interrupted save
        leaves an incomplete folder, never a mix of old and new. ``storage_options``
        go to fsspec.
        """

        def __init__(self, path, *, codec="dtdr", block_size: int | None = None, parity="default",
                     metadata_parity="strong", overwrite: bool = True,
                     storage_options: Mapping | None = None) -> None:
            super().__init__()
            self.path = _norm(path)
            self.codec = codec
            self.block_size = block_size
            self.parity = parity
            self.metadata_parity = metadata_parity
            self.overwrite = overwrite
            self.storage_options = dict(storage_options) if storage_options else None
            self.save_id = uuid.uuid4().hex
            self.is_coordinator = False
            self.rank: int | None = None
            self.use_collectives = True

        # -- StorageWriter -------------------------------------------------
        def reset(self, checkpoint_id=None) -> None:
            if checkpoint_id:
                self.path = _norm(checkpoint_id)
            self.save_id = uuid.uuid4().hex

        def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
            self.is_coordinator = is_coordinator
            rank = kwargs.get("rank")
            self.rank = _rank_default() if rank is None else int(rank)
            self.use_collectives = kwargs.get("use_collectives", True)

        def prepare_local_plan(self, plan):
            makedirs(self.path, self.storage_options)
            if not self.use_collectives:
                plan = dataclasses.replace(plan, storage_data=_FilePrefix(f"__{self.rank}_"))
            return plan

        def prepare_global_plan(self, plans):
            # Runs before any rank writes: an older checkpoint in this folder stops
            # being loadable now, not after its shards were half overwritten.
            rank = None if self.use_collectives else self.rank
            names = [join(self.path, n) for n in _metadata_names(rank)]
            if not self.overwrite and any(exists(n, self.storage_options) for n in names):
                raise FileExistsError(f"a checkpoint already exists at {self.path} and overwrite=False")
            for name in names:
                remove(name, self.storage_options, missing_ok=True)
            return [p if p.storage_data is not None else dataclasses.replace(p, storage_data=_FilePrefix(f"__{i}_"))
                    for i, p in enumerate(plans)]

        def write_data(self, plan, planner):
            from .api import save

            prefix = plan.storage_data.prefix if isinstance(plan.storage_data, _FilePrefix) else \
                f"__{self.rank if self.rank is not None else _rank_default()}_"
            file = f"{prefix}0{SUFFIX}"
            used: set = set()
            items: dict[str, torch.Tensor] = {}
            keys: dict[str, tuple[str, str]] = {}
            results = []
            for item in plan.items:
                key = _item_key(item.index, used)
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    buf = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
                    t = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else \
                        torch.empty(0, dtype=torch.uint8)
                    keys[key] = ("bytes", item.index.fqn)
                else:
                    t = data.detach()
                    if t.device.type != "cpu":
                        t = t.cpu()
                    keys[key] = ("tensor", item.index.fqn)
                items[key] = t
                results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(),
                                           storage_data=_DTDRStorageInfo(file, key, self.save_id)))
            if items:
                save(items, _write_path(self.path, file, self.storage_options), codec=_codec_chooser(self.codec, keys),
                     block_size=self.block_size, parity=self.parity,
                     metadata={_SAVE_ID_KEY: self.save_id, "torch_dtdr.dcp.format": FORMAT_NAME},
                     storage_options=self.storage_options)
            return _done(results)

        def finish(self, metadata, results) -> None:
            storage = {}
            files: dict[str, str] = {}
            for rank_results in results:
                for wr in rank_results:
                    storage[wr.index] = wr.storage_data
                    files[wr.storage_data.file] = wr.storage_data.save_id
            metadata.storage_data = storage
            if hasattr(metadata, "version") and CURRENT_DCP_VERSION is not None:
                metadata.version = CURRENT_DCP_VERSION
            if hasattr(metadata, "storage_meta"):
                metadata.storage_meta = self.storage_meta()
            doc = _metadata_to_plain(metadata, files)
            rank = None if self.use_collectives else self.rank
            _write_metadata(self.path, _metadata_names(rank), doc, self.storage_options, self.metadata_parity)

        def storage_meta(self):
            if StorageMeta is None:  # pragma: no cover - torch < 2.4
                return None
            return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

        @property
        def checkpoint_id(self):
            return self.path

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return isinstance(checkpoint_id, (str, os.PathLike))

    class DTDRReader(StorageReader):
        """DCP ``StorageReader`` for checkpoints written by :class:`DTDRWriter`.

        ``errors="recover"`` (default) repairs what parity can and delivers
        degraded float values with a :class:`~torch_dtdr.errors.DamageWarning`;
        ``"strict"`` raises :class:`~torch_dtdr.errors.IntegrityError` unless
        every item read is bit-exact. A tensor that is lost outright raises
        IntegrityError in both modes (DCP has no way to leave a hole).

        Byte items must load under ``torch.load(weights_only=True)`` before
        they are handed to DCP's planner (which unpickles them with
        ``weights_only=False``); ``allow_pickle=True`` skips that check.
        After a load, :meth:`report` says what this rank read and
        :attr:`bytes_read` how many shard bytes it fetched.
        """

        def __init__(self, path, *, errors: str = "recover", storage_options: Mapping | None = None,
                     allow_pickle: bool = False) -> None:
            super().__init__()
            if errors not in ("recover", "strict"):
                raise ValueError(f"errors must be 'recover' or 'strict', got {errors!r}")
            self.path = _norm(path)
            self.errors = errors
            self.storage_options = dict(storage_options) if storage_options else None
            self.allow_pickle = allow_pickle
            self.storage_data: dict = {}
            self.load_id = uuid.uuid4().hex
            self.rank: int | None = None
            self._reports: list[Report] = []
            self._metadata_reports: list[Report] = []
            #: bytes fetched from shard files by read_data since the last reset (proof of range reads)
            self.bytes_read = 0

        def reset(self, checkpoint_id=None) -> None:
            self.storage_data = {}
            if checkpoint_id:
                self.path = _norm(checkpoint_id)
            self.load_id = uuid.uuid4().hex
            self._reports = []
            self.bytes_read = 0

        def read_metadata(self, *args: Any, **kwargs: Any):
            doc, self._metadata_reports = _load_plain_metadata(self.path, self.storage_options, kwargs.get("rank"))
            md = _plain_to_metadata(doc)
            sm = getattr(md, "storage_meta", None)
            if sm is not None and hasattr(sm, "load_id"):
                sm.load_id = self.load_id
            return md

        def set_up_storage_reader(self, metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
            self.storage_data = metadata.storage_data
            self.rank = kwargs.get("rank")
            if self.storage_data is None:
                raise FormatError("checkpoint metadata has no storage data", file=self.path)

        def prepare_local_plan(self, plan):
            return plan

        def prepare_global_plan(self, plans):
            return plans

        def read_data(self, plan, planner):
            from .lazy import open as dtdr_open

            per_file: dict[str, list] = {}
            for req in plan.items:
                info = self.storage_data.get(req.storage_index)
                if not isinstance(info, _DTDRStorageInfo):
                    raise FormatError(f"no storage entry for {req.storage_index.fqn!r}", file=self.path,
                                      tensor=req.storage_index.fqn)
                per_file.setdefault(info.file, []).append((info, req))
            for file, reqs in per_file.items():
                path = _read_path(self.path, file, self.storage_options)
                reqs.sort(key=lambda x: x[0].key)
                with dtdr_open(path, errors=self.errors, storage_options=self.storage_options) as f:
                    got = f.metadata().get(_SAVE_ID_KEY)
                    want = reqs[0][0].save_id
                    if want and got != want:
                        raise IntegrityError(
                            f"shard was written by another save (id {got}, the metadata expects {want}): "
                            "the checkpoint folder mixes two saves", file=path)
                    current_key, current = None, None
                    with f.prefetch(dict.fromkeys(info.key for info, _req in reqs)):
                        for info, req in reqs:
                            if info.key != current_key:
                                _release(f)
                                current_key, current = info.key, f.get_tensor(info.key)
                                if current is None:
                                    raise IntegrityError("item is lost (damage beyond parity and copies)",
                                                         file=path, tensor=info.key)
                            self._deliver(planner, req, current, path, info)
                    _release(f)
                    rep = f.report()
                    self.bytes_read += f.bytes_read
                self._reports.append(rep)
                if rep.status != EXACT:
                    warnings.warn(DamageWarning(rep.summary()), stacklevel=2)
            return _done(None)

        def _deliver(self, planner, req, stored: torch.Tensor, path: str, info) -> None:
            if req.type == LoadItemType.BYTE_IO:
                if stored.dtype != torch.uint8 or stored.dim() != 1:
                    raise FormatError("byte item is not stored as 1-D uint8", file=path, tensor=info.key)
                data = stored.numpy().tobytes()
                if not self.allow_pickle:
                    _check_bytes_safe(data, req.storage_index.fqn, path)
                planner.load_bytes(req, io.BytesIO(data))
                return
            t = _narrow(stored, req.storage_offsets, req.lengths)
            target = planner.resolve_tensor(req).detach()
            if target.size() != t.size():
                raise FormatError(f"stored item has size {tuple(t.size())} where DCP expects "
                                  f"{tuple(target.size())}", file=path, tensor=info.key)
            if target.dtype != t.dtype:
                t = t.to(target.dtype)  # DCP's own reader converts through copy_ as well
            target.copy_(t)
            planner.commit_tensor(req, target)

        def report(self) -> "CheckpointReport":
            """What this rank's last load read: per shard file, per tensor."""
            return CheckpointReport(self.path, files=list(self._reports), metadata=list(self._metadata_reports))

        @property
        def checkpoint_id(self):
            return self.path

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            if not isinstance(checkpoint_id, (str, os.PathLike)):
                return False
            try:
                return any(exists(join(_norm(checkpoint_id), n), None) for n in METADATA_NAMES)
            except Exception:  # noqa: BLE001
                return False

    for cls in (DTDRWriter, DTDRReader):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return DTDRWriter, DTDRReader


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    if name in ("DTDRWriter", "DTDRReader"):
        if not _CLASSES:
            w, r = _build_classes()
            _CLASSES.update(DTDRWriter=w, DTDRReader=r)
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"DTDRWriter", "DTDRReader"})


# --------------------------------------------------------------------------- verify


@dataclass
class CheckpointReport:
    """What :func:`verify_checkpoint` (or a :class:`DTDRReader` load) found in a
    DCP checkpoint folder: one :class:`~torch_dtdr.Report` per metadata copy
    and per shard file, plus cross-checks between them (``problems``: a shard
    or an item the metadata names but that is missing, a shape that does not
    match, a shard left by another save).

    It answers like a :class:`~torch_dtdr.Report`: ``status``, ``exact``,
    ``clean``, ``counts()``, ``exit_code``, ``summary()``, ``to_dict()``,
    ``to_json()``, ``tensors`` (every shard's tensors, named ``FILE:NAME``).
    """

    file: str
    files: list[Report] = field(default_factory=list)
    metadata: list[Report] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unreadable: str | None = None
    #: shard files in the folder that the metadata does not name (left by an
    #: earlier save into the same folder); informational only
    unreferenced: list[str] = field(default_factory=list)
    format_version: str = f"{FORMAT_NAME}/{FORMAT_VERSION}"

    @property
    def events(self) -> list[str]:
        return [f"{os.path.basename(r.file)}: {e}" for r in self.metadata for e in r.events]

    @property
    def truncated(self) -> bool:
        return any(r.truncated for r in self.files)

    @property
    def tensors(self) -> list[TensorReport]:
        return [dataclasses.replace(t, name=f"{_basename(r.file)}:{t.name}") for r in self.files for t in r.tensors]

    @property
    def status(self) -> str:
        if self.unreadable:
            return LOST
        s = worst(*(r.status for r in self.files))
        if self.problems:
            s = LOST
        # one good metadata copy is enough; a bad one is a repair to make
        meta = [r.status for r in self.metadata]
        if meta and s == EXACT and any(m != EXACT for m in meta):
            s = REPAIRED
        return s

    @property
    def clean(self) -> bool:
        return self.status == EXACT

    @property
    def exact(self) -> bool:
        return not self.unreadable and not self.problems and all(r.exact for r in self.files)

    def counts(self) -> dict[str, int]:
        out = {EXACT: 0, REPAIRED: 0, DEGRADED: 0, LOST: 0}
        for r in self.files:
            for k, n in r.counts().items():
                out[k] += n
        return out

    @property
    def exit_code(self) -> int:
        """0 clean, 1 damaged but recovered exactly, 2 degraded or lost, 3 unreadable (incomplete)."""
        return exit_code(self.status, self.unreadable)

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{n} {k}" for k, n in c.items() if n]
        text = f"{self.file}: DCP checkpoint, {len(self.files)} shard file(s), " + (", ".join(parts) or "no tensors")
        if self.unreadable:
            text += f"; unreadable: {self.unreadable}"
        bad_meta = [r for r in self.metadata if r.status != EXACT]
        if bad_meta:
            text += "; metadata: " + ", ".join(f"{_basename(r.file)} {r.status}" for r in bad_meta)
        if self.problems:
            text += "; " + "; ".join(self.problems[:5]) + (f"; ... ({len(self.problems)} problems)"
                                                           if len(self.problems) > 5 else "")
        return text

    def to_dict(self) -> dict:
        return {"file": self.file, "kind": "dcp", "format_version": self.format_version, "status": self.status,
                "counts": self.counts(), "unreadable": self.unreadable, "problems": list(self.problems),
                "unreferenced": list(self.unreferenced),
                "metadata": [r.to_dict() for r in self.metadata], "files": [r.to_dict() for r in self.files]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        lines = [f"DTDR DCP checkpoint {self.file} ({self.format_version}): {self.status}"]
        if self.unreadable:
            lines.append(f"  unreadable: {self.unreadable}")
        for r in self.metadata:
            lines.append(f"  metadata {_basename(r.file)}: {r.status}" + (f" ({r.unreadable})" if r.unreadable else ""))
        for p in self.problems:
            lines.append(f"  problem: {p}")
        if self.unreferenced:
            lines.append(f"  not part of this checkpoint: {', '.join(self.unreferenced)}")
        for r in self.files:
            lines.extend("  " + line for line in str(r).splitlines())
        lines.append("  " + ", ".join(f"{n} {k}" for k, n in self.counts().items()))
        return "\n".join(lines)


def _basename(p: str) -> str:
    return p.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def _expected_items(doc) -> dict[str, list[tuple[str, str, tuple | None, str]]]:
    """file -> [(key, kind, expected shape or None, fqn)] from a metadata document."""
    items: dict[str, dict] = {}
    for fqn, item in doc["state_dict"]:
        items[fqn] = item
    out: dict[str, list] = {name: [] for name, _ in doc["files"]}
    for fqn, off, _index, fno, key in doc["storage"]:
        item = items.get(fqn)
        name = doc["files"][fno][0]
        if item is None:
            out[name].append((key, "missing", None, fqn))
        elif item["type"] == "bytes":
            out[name].append((key, "bytes", None, fqn))
        else:
            shape = None
            for o, s in item["chunks"]:
                if off is not None and o == off:
                    shape = (item["dtype"], tuple(s))
                    break
            out[name].append((key, "tensor", shape, fqn))
    return out


def _shard_contents(path: str, storage_options) -> tuple[dict, dict[str, dict]]:
    """A shard's string metadata and, for every tensor name in it (tied
    tensors under each of their names), ``{"dtype": NAME, "shape": [...]}``;
    from the index alone."""
    from .format.reader import ContainerReader
    from .storage import open_source

    with open_source(path, storage_options) as src:
        r = ContainerReader(src)
        skeleton = r.index.tree
        refs = tree.tensor_refs(skeleton, len(r.tensors))
        meta = dict(r.index.metadata)
    return meta, {name: skeleton["tensors"][i] for name, i in refs.items()}


def verify_checkpoint(path, *, storage_options: Mapping | None = None, progress: bool = False,
                      max_workers: int | None = None) -> CheckpointReport:
    """Check a DTDR DCP checkpoint folder: both metadata copies, every checksum
    of every shard (parity repair tried in memory, nothing written), and that
    every item the metadata names is in its shard with the right dtype and
    shape. Never raises for damage; a folder without committed metadata gives a
    report with ``unreadable`` set (exit code 3) that still verifies the shard
    files it finds. Raises :class:`IncompleteCheckpointError` (a
    ``FileNotFoundError``) only when the folder does not exist."""
    from .api import verify
    from .errors import DTDRError

    base = _norm(path)
    rep = CheckpointReport(base)
    names = listdir(base, storage_options)
    if not names and not isdir(base, storage_options):
        raise IncompleteCheckpointError("no checkpoint here (no such directory)", file=base)
    # the global metadata; without it, the per-rank metadata of a save with use_collectives=False
    sets: list[int | None] = [None]
    if not any(n in names for n in METADATA_NAMES):
        ranks = sorted({int(m.group(1)) for n in names if (m := _RANK_META_RE.fullmatch(n))})
        sets = ranks or sets
    docs = []
    for rank in sets:
        good = None
        for name in _metadata_names(rank):
            if name not in names:
                rep.metadata.append(Report(join(base, name), unreadable="missing"))
                continue
            try:
                d, r = _read_metadata_file(_read_path(base, name, storage_options), storage_options)
            except (DTDRError, OSError) as e:
                rep.metadata.append(Report(join(base, name), unreadable=str(e)))
                continue
            rep.metadata.append(r)
            good = d if good is None else good
        if good is not None:
            docs.append(good)
    expected: dict[str, list] = {}
    save_ids: dict[str, str] = {}
    if not docs:
        if all(r.unreadable == "missing" for r in rep.metadata):
            rep.unreadable = (f"incomplete DCP checkpoint: no {METADATA_NAME} (the save was interrupted before "
                              "its coordinator committed it, or this is not a DTDR DCP checkpoint)")
        else:
            rep.unreadable = "every copy of the DCP metadata is unreadable"
        expected = {n: [] for n in names if _SHARD_RE.fullmatch(n)}
    else:
        for d in docs:
            for name, items in _expected_items(d).items():
                expected.setdefault(name, []).extend(items)
            save_ids.update({name: sid for name, sid in d["files"]})
        rep.unreferenced = [n for n in names if _SHARD_RE.fullmatch(n) and n not in expected]
    doc = docs[0] if docs else None
    files = list(expected)
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="verify", unit="file", leave=False, disable=None)
    for name in files:
        fpath = join(base, name)
        if name not in names:
            rep.files.append(Report(fpath, unreadable="missing"))
            rep.problems.append(f"{name}: shard file is missing")
            continue
        try:
            _read_path(base, name, storage_options)
        except FormatError as e:
            rep.files.append(Report(fpath, unreadable=str(e)))
            rep.problems.append(f"{name}: {e.message}")
            continue
        r = verify(fpath, storage_options=storage_options, max_workers=max_workers)
        rep.files.append(r)
        if r.unreadable or doc is None:
            continue
        try:
            file_meta, stored = _shard_contents(fpath, storage_options)
        except (DTDRError, OSError) as e:  # pragma: no cover - verify already read this index
            rep.problems.append(f"{name}: {e}")
            continue
        want_id = save_ids.get(name)
        if want_id and file_meta.get(_SAVE_ID_KEY) != want_id:
            rep.problems.append(f"{name}: written by another save (id {file_meta.get(_SAVE_ID_KEY)}, "
                                f"the metadata expects {want_id})")
        for key, kind, shape, fqn in expected[name]:
            t = stored.get(key)
            if kind == "missing":
                rep.problems.append(f"{name}: storage entry {fqn!r} has no state_dict metadata")
            elif t is None:
                rep.problems.append(f"{name}: item {fqn!r} (key {key!r}) is not in the shard")
            elif kind == "bytes" and (t["dtype"] != "uint8" or len(t["shape"]) != 1):
                rep.problems.append(f"{name}: byte item {fqn!r} is stored as {t['dtype']} {t['shape']}")
            elif kind == "tensor" and shape is not None and (t["dtype"], tuple(t["shape"])) != shape:
                rep.problems.append(f"{name}: item {key!r} is {t['dtype']} {t['shape']}, the metadata says "
                                    f"{shape[0]} {list(shape[1])}")
    return rep


# --------------------------------------------------------------------------- converters


def _set_element(root: dict, path, value) -> None:
    """Put ``value`` at ``path`` (DCP's object path: str keys, int list indices)."""
    cur = root
    for i in range(1, len(path)):
        prev, key = path[i - 1], path[i]
        default = {} if type(key) is str else []
        if isinstance(cur, dict):
            cur = cur.setdefault(prev, default)
        else:
            while len(cur) <= prev:
                cur.append(None)
            if cur[prev] is None:
                cur[prev] = default
            cur = cur[prev]
    key = path[-1]
    if type(key) is int:
        while len(cur) <= key:
            cur.append(None)
    cur[key] = value


def _full_state_dict_planner(weights_only: bool):
    """A DCP load planner that rebuilds the whole saved state dict from the
    metadata (like DCP's ``_EmptyStateDictLoadPlanner``), unpickling byte items
    with ``torch.load(weights_only=weights_only)``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class _FullStateDictPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            if state_dict:
                raise ValueError("the state dict to fill must start empty")
            pd = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
            for k, v in metadata.state_dict_metadata.items():
                if isinstance(v, TensorStorageMetadata):
                    v = torch.empty(v.size, dtype=v.properties.dtype)
                if k in pd:
                    _set_element(state_dict, pd[k], v)
                else:
                    state_dict[k] = v
            super().set_up_planner(state_dict, metadata, is_coordinator)

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=weights_only)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                _set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _FullStateDictPlanner()


class _unwrapped:
    """Re-raise the one failure inside DCP's CheckpointException (a BaseException
    wrapping per-rank errors) as itself: a single-process conversion has one rank."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        failures = getattr(exc, "failures", None) if exc is not None else None
        if isinstance(failures, dict) and len(failures) == 1:
            inner = next(iter(failures.values()))
            inner = inner[0] if isinstance(inner, tuple) and inner else inner
            if isinstance(inner, Exception):
                raise inner from None
        return False


def _dcp_reader_for(base: str, storage_options, errors: str, allow_pickle: bool):
    names = listdir(base, storage_options)
    if any(n in METADATA_NAMES for n in names) or not any(n == ".metadata" for n in names):
        return __getattr__("DTDRReader")(base, errors=errors, storage_options=storage_options,
                                         allow_pickle=allow_pickle)
    # a checkpoint of DCP's own FileSystemWriter: pickled metadata, torch.save shards
    if not allow_pickle:
        raise FormatError("this is a standard DCP checkpoint: its .metadata is a pickle, which can run code "
                          "when loaded. Pass allow_pickle=True (dtdr dcp-convert --allow-pickle) if you trust it",
                          file=base)
    if is_url(base):
        try:
            from torch.distributed.checkpoint import FsspecReader
        except ImportError:  # pragma: no cover - exported from the package only in some releases
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(base, **(storage_options or {}))
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(base)


def dcp_to_dtdr(dcp_dir, out, *, codec="dtdr", block_size: int | None = None, parity="default",
                errors: str = "strict", allow_pickle: bool = False, storage_options: Mapping | None = None,
                out_storage_options: Mapping | None = None) -> None:
    """Gather a DCP checkpoint (any number of ranks) into one DTDR file, e.g.
    for serving. Runs in one process and holds the whole state dict in memory.

    ``dcp_dir`` is a checkpoint written by :class:`DTDRWriter`, or, with
    ``allow_pickle=True``, one written by DCP's own ``FileSystemWriter`` /
    ``FsspecWriter`` (whose metadata is a pickle). Non-tensor values come back
    with ``torch.load(weights_only=True)`` unless ``allow_pickle``. The output
    holds the nested state dict as it was saved (``{"model": {...}, "optim":
    {...}}``), written by :func:`torch_dtdr.save` with ``codec`` and ``parity``.
    ``errors="strict"`` (default) refuses a checkpoint that is not bit-exact
    after repair; ``"recover"`` converts what can be recovered (with a
    DamageWarning; a lost tensor always fails).
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from .api import save

    reader = _dcp_reader_for(_norm(dcp_dir), storage_options, errors, allow_pickle)
    reader.read_metadata()  # fail early, with our own error, on an incomplete checkpoint
    sd: dict = {}
    with _unwrapped():
        _load_state_dict(sd, storage_reader=reader, planner=_full_state_dict_planner(not allow_pickle), no_dist=True)
    save(sd, out, codec=codec, block_size=block_size, parity=parity, storage_options=out_storage_options)


def dtdr_to_dcp(src, dcp_dir, *, codec="dtdr", block_size: int | None = None, parity="default",
                errors: str = "strict", storage_options: Mapping | None = None,
                out_storage_options: Mapping | None = None) -> None:
    """Write the state dict in DTDR file ``src`` as a (single-rank) DCP
    checkpoint in ``dcp_dir`` with :class:`DTDRWriter`; any number of ranks can
    then load it with :class:`DTDRReader`, resharded by DCP. The file must hold
    a dict with string keys (a state dict). ``errors`` as in
    :func:`dcp_to_dtdr`; lost tensors raise IntegrityError."""
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    from .decoding import load_file as load

    obj, rep = load(src, errors=errors, storage_options=storage_options, report=True)
    lost = [t.name for t in rep.tensors if t.status == LOST]
    if lost:
        raise IntegrityError(f"{len(lost)} tensor(s) are lost; cannot convert", file=str(src), tensor=lost[0])
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise TypeError(f"DCP saves a dict with str keys; {src} holds {type(obj).__name__}")
    writer = __getattr__("DTDRWriter")(dcp_dir, codec=codec, block_size=block_size, parity=parity,
                                       storage_options=out_storage_options)
    with _unwrapped():
        _save_state_dict(obj, storage_writer=writer, no_dist=True)
