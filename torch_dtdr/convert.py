"""Converters between DTDR and the formats models already ship in.

To DTDR, from:

* a ``.safetensors`` file (its ``__metadata__`` becomes DTDR metadata);
* a Hugging Face folder: sharded (``*.safetensors.index.json``, or
  ``pytorch_model.bin.index.json``) or holding one weights file
  (``model.safetensors``, ``pytorch_model.bin``); all shards go into one DTDR file;
* a torch ``.pt`` / ``.bin`` file, read with ``torch.load(weights_only=True)``
  (never unsafe unpickling); it may hold any weights-only object (a state
  dict, a training checkpoint), not only a flat state dict;
* a DTDR file (re-encoded, e.g. with another codec or parity level).

From DTDR to safetensors: one ``.safetensors`` file, or a folder. The shard
layout of a converted folder is recorded in the DTDR metadata (key
``"torch_dtdr.convert"``), so converting back into a folder rebuilds the same
shard files and ``model.safetensors.index.json``, and each file gets its
original ``__metadata__`` back. Tensors come back with the same names, dtypes,
shapes and (with the lossless ``"dtdr"`` codec) bytes. Tensors that share
memory in the DTDR file (tied weights) are written as separate copies, since
safetensors cannot share.

Only tensors travel: configs, tokenizers and other files of a folder are not
copied.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import struct
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import (ArgumentError, CheckpointNotFoundError, DamageWarning, DTDRError, FormatError, IntegrityError,
                     ObjectTypeError, StorageError, warn_caller)
from .kinds import folder_kind, head_kind
from .storage import Location, atomic_local_path, check_regular_file, child_inside, is_plain_name, is_url

if TYPE_CHECKING:  # torch is imported where a conversion needs it, so `import torch_dtdr` stays light
    import torch

__all__ = ["convert", "METADATA_KEY"]

#: DTDR metadata key holding the source layout (JSON).
METADATA_KEY = "torch_dtdr.convert"
_LAYOUT_VERSION = 1
_ST_SUFFIX = ".safetensors"
_ST_INDEX_SUFFIX = ".safetensors.index.json"
_TORCH_INDEX_SUFFIXES = (".bin.index.json", ".pt.index.json", ".pth.index.json")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DEFAULT_ST_NAME = "model.safetensors"
_DEFAULT_ST_INDEX = "model.safetensors.index.json"
_MAX_ST_HEADER = 100 * 2**20


def _sniff_bytes(head: bytes, size: int | None = None) -> str:
    return head_kind(head, size) or "torch"


# --------------------------------------------------------------------------- reading


def _st_header(raw: bytes) -> tuple[list[str], dict | None]:
    """Tensor names in file order and ``__metadata__`` from a safetensors header."""
    header = json.loads(raw)
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda k: (header[k]["data_offsets"][0], k))
    return names, meta


def _read_safetensors(fsx: Location, path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and ``__metadata__`` of a safetensors file; a malformed file is a FormatError."""
    try:
        return _read_safetensors_unchecked(fsx, path)
    except DTDRError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors and json raise many types for hostile headers
        raise FormatError(f"not a valid safetensors file: {type(e).__name__}: {e}", file=path) from None


def _read_safetensors_unchecked(fsx: Location, path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    if fsx.local:
        from safetensors import safe_open

        with fsx.open_read(path) as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names, meta = _st_header(fh.read(n))
        out = {}
        with safe_open(path, framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name)
        return out, meta
    from safetensors.torch import load as st_load

    data = fsx.cat(path)
    (n,) = struct.unpack("<Q", data[:8])
    names, meta = _st_header(data[8: 8 + n])
    tensors = st_load(data)
    return {k: tensors[k] for k in names}, meta


def _read_torch(fsx: Location, path: str) -> Any:
    """A torch file, unpickled with ``weights_only=True`` only; anything that
    restricted unpickler refuses (or cannot parse) is a FormatError."""
    from .shim import original_load

    try:
        if fsx.local:
            return original_load()(path, map_location="cpu", weights_only=True)
        with fsx.open_read(path) as fh:
            return original_load()(fh, map_location="cpu", weights_only=True)
    except (CheckpointNotFoundError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - the restricted unpickler's refusals come in many types
        raise FormatError(f"not a torch file that loads with weights_only=True: {type(e).__name__}: {e}",
                          file=path) from None


def _read_source(src, storage_options) -> tuple[str, Any, dict]:
    """(kind, obj, layout) of a non-DTDR source, or ("dtdr", None, {}) for DTDR."""
    fsx = Location(src, storage_options)
    if not fsx.exists():
        from .errors import CheckpointNotFoundError

        raise CheckpointNotFoundError("no such file or folder", file=fsx.target)
    if not fsx.isdir():
        if fsx.local:
            check_regular_file(fsx.path)  # a FIFO would block the read below
        kind = _sniff_bytes(fsx.head(fsx.path, 16), fsx.fs.size(fsx.path))
        if kind == "torch":
            from .shim import is_dtdr

            if is_dtdr(src, storage_options):  # a DTDR file whose first page is damaged
                kind = "dtdr"
        name = posixpath.basename(fsx.path.replace(os.sep, "/"))
        if kind == "dtdr":
            return "dtdr", None, {}
        if kind == "safetensors":
            tensors, meta = _read_safetensors(fsx, fsx.path)
            return kind, tensors, {"source": kind, "folder": False, "index": None, "index_metadata": None,
                                   "files": [{"name": name, "tensors": list(tensors), "metadata": meta}]}
        obj = _read_torch(fsx, fsx.path)
        names = list(obj) if _is_tensor_dict(obj) else None
        return kind, obj, {"source": kind, "folder": False, "index": None, "index_metadata": None,
                           "files": [{"name": name, "tensors": names, "metadata": None}]}
    return _read_folder(fsx)


def _pick(names: list[str], preferred: str, what: str, where: str) -> str | None:
    if not names:
        return None
    if preferred in names:
        return preferred
    if len(names) == 1:
        return names[0]
    raise ArgumentError(f"the folder holds several {what} ({', '.join(names)}); convert one of them explicitly",
                        file=where)


def _read_folder(fsx: Location) -> tuple[str, Any, dict]:
    names = fsx.listdir()
    where = fsx.target
    index = _pick([n for n in names if n.endswith(_ST_INDEX_SUFFIX)], _DEFAULT_ST_INDEX, "safetensors indexes", where)
    kind = "safetensors"
    if index is None:
        single = _pick([n for n in names if n.endswith(_ST_SUFFIX)], _DEFAULT_ST_NAME, "safetensors files", where)
        if single is not None:
            _check_inside(fsx, single, single, "weights file")
            tensors, meta = _read_safetensors(fsx, fsx.child_path(single))
            return kind, tensors, {"source": kind, "folder": True, "index": None, "index_metadata": None,
                                   "files": [{"name": single, "tensors": list(tensors), "metadata": meta}]}
        kind = "torch"
        index = _pick([n for n in names if n.endswith(_TORCH_INDEX_SUFFIXES)], "pytorch_model.bin.index.json",
                      "torch indexes", where)
        if index is None:
            single = _pick([n for n in names if n.endswith(_TORCH_SUFFIXES)], "pytorch_model.bin",
                           "torch weight files", where)
            if single is None:
                raise FormatError("the folder holds no .safetensors, .bin or .pt weights", file=where)
            _check_inside(fsx, single, single, "weights file")
            obj = _read_torch(fsx, fsx.child_path(single))
            return kind, obj, {"source": kind, "folder": True, "index": None, "index_metadata": None,
                               "files": [{"name": single, "tensors": list(obj) if _is_tensor_dict(obj) else None,
                                          "metadata": None}]}
    _check_inside(fsx, index, index, "index file")
    idx, weight_map = _read_index(fsx, index)
    shards = sorted(set(weight_map.values()))  # "model-00001-of-00003..." sort in shard order
    for shard in shards:
        tensor = next(k for k, v in weight_map.items() if v == shard)
        _check_inside(fsx, shard, index, f"weight_map[{tensor!r}]")
    tensors: dict[str, torch.Tensor] = {}
    files = []
    for shard in shards:
        if kind == "safetensors":
            part, meta = _read_safetensors(fsx, fsx.child_path(shard))
        else:
            part, meta = _read_torch(fsx, fsx.child_path(shard)), None
            if not _is_tensor_dict(part):
                raise FormatError("a shard is not a flat {name: tensor} dict", file=fsx.join(shard))
        dup = set(part) & set(tensors)
        if dup:
            raise FormatError(f"tensor {sorted(dup)[0]!r} appears in two shards", file=fsx.join(shard))
        tensors.update(part)
        files.append({"name": shard, "tensors": list(part), "metadata": meta})
    missing = set(weight_map) - set(tensors)
    if missing:
        raise FormatError(f"the index names tensors no shard holds: {sorted(missing)[:5]}", file=fsx.join(index))
    return kind, tensors, {"source": kind, "folder": True, "index": index,
                           "index_metadata": idx.get("metadata"), "files": files}


def _hf_cache_extra(fsx: Location) -> tuple[str, ...]:
    """Where a Hugging Face hub cache snapshot's files may link (``snapshots/<rev>`` -> ``../../blobs``)."""
    if fsx.local and posixpath.basename(os.path.dirname(fsx.path.rstrip(os.sep))) == "snapshots":
        return (os.path.join("..", "..", "blobs"),)
    return ()


def _check_inside(fsx: Location, name, where: str, field: str) -> None:
    """A file name taken from a folder's listing or index must name a file inside
    that folder, symlinks resolved (or the hub cache's blobs, see ``_hf_cache_extra``)."""
    if not is_plain_name(name) or not child_inside(fsx.target, name, fsx.storage_options,
                                                    also_under=_hf_cache_extra(fsx)):
        raise FormatError(f"{name!r} is not a file inside the source folder; refusing to read it",
                          file=fsx.join(where) if isinstance(where, str) and is_plain_name(where) else fsx.target,
                          field=field)


def _read_index(fsx: Location, index: str) -> tuple[dict, dict[str, str]]:
    """The parsed HF index and its ``weight_map`` of tensor name -> shard file name."""
    where = fsx.join(index)
    try:
        idx = json.loads(fsx.cat(fsx.child_path(index)))
    except (ValueError, RecursionError) as e:
        raise FormatError(f"the index is not valid JSON: {e}", file=where, field="index") from None
    if not isinstance(idx, dict):
        raise FormatError(f"the index is a JSON {type(idx).__name__}, not an object", file=where, field="index")
    weight_map = idx.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError("index file has no weight_map object", file=where, field="weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FormatError(f"a shard name must be a string, got {type(shard).__name__}", file=where,
                              field=f"weight_map[{name!r}]")
    return idx, weight_map


def _is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items())


# --------------------------------------------------------------------------- writing DTDR


def _write_dtdr(obj, layout: dict, dst, *, codec, parity, block_size, metadata, storage_options,
                progress: bool = False) -> None:
    from .api import save

    files = layout.get("files") or []
    promoted: dict[str, str] = {}
    if files and all(f.get("metadata") == files[0].get("metadata") for f in files) and files[0].get("metadata"):
        promoted = dict(files[0]["metadata"])  # the source's __metadata__ stays visible as DTDR metadata
    meta = dict(promoted)
    meta.update(metadata or {})
    meta[METADATA_KEY] = json.dumps(dict(layout, promoted=promoted, version=_LAYOUT_VERSION), separators=(",", ":"))
    save(obj, dst, codec=codec, parity=parity, block_size=block_size, metadata=meta,
         storage_options=storage_options, progress=progress)


# --------------------------------------------------------------------------- writing safetensors


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no memory (what safetensors accepts)."""
    import torch

    seen: dict[tuple, int] = {}
    for t in tensors.values():
        if t.numel():
            key = (t.device, t.untyped_storage().data_ptr())
            seen[key] = seen.get(key, 0) + 1
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        whole = t.numel() * t.element_size() == t.untyped_storage().nbytes()
        shared = t.numel() and seen.get((t.device, t.untyped_storage().data_ptr()), 0) > 1
        if shared or not whole or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        out[name] = t
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], target: str, metadata, storage_options) -> None:
    from safetensors.torch import save, save_file

    tensors = _unshare(tensors)
    metadata = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    if not is_url(target):
        with atomic_local_path(target) as tmp:
            try:
                save_file(tensors, tmp, metadata=metadata)
            except Exception as e:  # noqa: BLE001 - safetensors' own error type names the temp file
                raise StorageError(f"safetensors could not write the file: {type(e).__name__}",
                                   file=target) from None
        return
    from .storage import write_bytes_atomic

    write_bytes_atomic(target, save(tensors, metadata=metadata), storage_options)


def _write_text_atomic(target: str, text: str, storage_options) -> None:
    from .storage import write_bytes_atomic

    write_bytes_atomic(target, text.encode("utf-8"), storage_options)


def _flat_tensor_names(handle) -> list[str] | None:
    """Keys of the DTDR object when it is a flat ``{str: tensor}`` mapping, else None (no data read)."""
    root = handle._reader.index.tree["root"]
    if not isinstance(root, list) or not root or root[0] not in ("dict", "odict"):
        return None
    items = root[1:]
    names = []
    for j in range(0, len(items) - 1, 2):
        key, node = items[j], items[j + 1]
        if not isinstance(key, str) or not (isinstance(node, list) and node and node[0] == "tensor"):
            return None
        names.append(key)
    return names


def _st_name(name: str) -> str:
    """The safetensors name of a recorded weights file (HF's renaming of torch shards)."""
    if name.endswith(_ST_SUFFIX):
        return name
    base = name
    for suf in _TORCH_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    if base.startswith("pytorch_model"):
        base = "model" + base[len("pytorch_model"):]
    return base + _ST_SUFFIX


def _st_index_name(name: str) -> str:
    if name.endswith(_ST_INDEX_SUFFIX):
        return name
    for suf in _TORCH_INDEX_SUFFIXES:
        if name.endswith(suf):
            return _st_name(name[: -len(".index.json")]) + ".index.json"
    return _DEFAULT_ST_INDEX


def _plan_files(names: list[str], layout, user_meta: dict, dst: str):
    """``([(file name or None for dst itself, tensor names, __metadata__)], index name or None)``."""
    layout = layout or {}
    files = layout.get("files") or []
    promoted = layout.get("promoted") or {}
    # DTDR metadata set after the conversion (or given to it): added to every output file
    extra = {k: v for k, v in (user_meta or {}).items() if promoted.get(k) != v}
    recorded = [n for f in files for n in (f.get("tensors") or [])]
    layout_ok = bool(files) and len(set(recorded)) == len(recorded) and sorted(recorded) == sorted(names)
    metas = [f.get("metadata") for f in files]
    default_meta = dict(user_meta or {})
    default_meta.setdefault("format", "pt")  # what transformers expects of a torch safetensors file
    if not layout:
        extra = {}
    from_st = layout.get("source") == "safetensors"

    def with_extra(m):
        return dict(m or {}, **extra) or None

    if dst.endswith(_ST_SUFFIX):
        if layout_ok and from_st and all(m == metas[0] for m in metas):
            meta = with_extra(metas[0])
        else:
            meta = default_meta
        return [(None, names, meta)], None
    if not layout_ok or not layout.get("folder"):
        return [(_DEFAULT_ST_NAME, names, default_meta)], None
    out = [(_st_name(f["name"]), list(f["tensors"]), with_extra(f.get("metadata") if from_st else {"format": "pt"}))
           for f in files]
    index = layout.get("index")
    return out, (_st_index_name(index) if index else None)


def _check_layout(layout, src: str) -> None:
    """The recorded shard layout is untrusted: its file names become paths in
    the destination, so each must be a plain name (no ``..``, separator or
    absolute path), and every member must have its type. Checked before
    anything is written."""
    base = f"metadata[{METADATA_KEY}]"

    def fail(message, field):
        raise FormatError(message, file=src, field=f"{base}{field}")

    if not isinstance(layout, dict):
        fail(f"the recorded layout is a JSON {type(layout).__name__}, not an object", "")
    files = layout.get("files")
    if files is not None and not isinstance(files, list):
        fail("files must be a list", ".files")
    for i, f in enumerate(files or []):
        if not isinstance(f, dict):
            fail("each file must be an object", f".files[{i}]")
        if not is_plain_name(f.get("name")):
            fail(f"file name {f.get('name')!r} is not a plain name inside the destination", f".files[{i}].name")
        tensors = f.get("tensors")
        if tensors is not None and not (isinstance(tensors, list) and all(isinstance(t, str) for t in tensors)):
            fail("tensors must be a list of names", f".files[{i}].tensors")
        meta = f.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            fail("metadata must be an object", f".files[{i}].metadata")
    for key in ("index_metadata", "promoted"):
        if layout.get(key) is not None and not isinstance(layout[key], dict):
            fail(f"{key} must be an object", f".{key}")
    index = layout.get("index")
    if index is not None and not (is_plain_name(index) and is_plain_name(_st_index_name(index))):
        fail(f"index name {index!r} is not a plain name inside the destination", ".index")


def _write_safetensors(names: list[str], get: Callable[[str], torch.Tensor | None], layout, user_meta: dict,
                       dst: str, metadata, storage_options, src_name: str) -> list[str]:
    files, index = _plan_files(names, layout, user_meta, dst)
    dfs = Location(dst, storage_options)
    if files[0][0] is not None:
        dfs.makedirs()
    written = []
    for fname, fnames, fmeta in files:
        part = {}
        for n in fnames:
            t = get(n)
            if t is None:
                raise IntegrityError("tensor is lost; nothing to write", file=src_name, tensor=n)
            part[n] = t
        if metadata:
            fmeta = dict(fmeta or {}, **metadata)
        target = dst if fname is None else dfs.join(fname)
        _save_safetensors(part, target, fmeta, storage_options)
        del part
        written.append(target)
    if index is not None:
        weight_map = {n: fname for fname, fnames, _ in files for n in fnames}
        doc = {"metadata": layout.get("index_metadata") or {}, "weight_map": weight_map}
        target = dfs.join(index)
        _write_text_atomic(target, json.dumps(doc, indent=2, sort_keys=True) + "\n", storage_options)
        written.append(target)
    return written


def _dtdr_to_safetensors(src: str, dst: str, *, errors, metadata, storage_options,
                         progress: bool = False) -> tuple[list[str], int]:
    """Write the tensors of DTDR file ``src`` as safetensors; ``progress``: a bar of the tensor bytes decoded
    (what the safetensors output holds), on a terminal only."""
    from .decoding import byte_bar
    from .lazy import open as dtdr_open

    with dtdr_open(src, errors=errors, storage_options=storage_options, warn_damage=False) as h:
        names = _flat_tensor_names(h)
        if names is not None:
            get = h.get_tensor
            total = sum(math.prod(h.get_slice(n).shape) * h.get_slice(n).dtype.itemsize for n in names)
        else:
            obj = h.load()
            if not _is_tensor_dict(obj):
                raise ObjectTypeError(f"the file holds a {type(obj).__name__} that is not a flat {{name: tensor}} "
                                      "mapping; only state dicts convert to safetensors", file=src)
            names, get = list(obj), obj.__getitem__
            total = sum(t.numel() * t.element_size() for t in obj.values())
        bar = byte_bar(total, "convert", progress)
        decode = get

        def get(name):
            tensor = decode(name)
            if tensor is not None:
                bar.update(tensor.numel() * tensor.element_size())
            return tensor
        dmeta = h.metadata()
        layout = None
        if METADATA_KEY in dmeta:
            try:
                layout = json.loads(dmeta[METADATA_KEY])
            except (ValueError, RecursionError):
                layout = None
            else:
                _check_layout(layout, src)
        user_meta = {k: v for k, v in dmeta.items() if k != METADATA_KEY}
        try:
            written = _write_safetensors(names, get, layout, user_meta, dst, metadata, storage_options, src)
        finally:
            bar.close()
        rep = h.report()
        if rep.status != "exact":  # as torch_dtdr.load does
            warn_caller(DamageWarning(rep.summary()))
    return written, len(names)


# --------------------------------------------------------------------------- entry point


def _infer_to(src_kind: str, dst: str, storage_options) -> str:
    if src_kind != "dtdr":
        return "dtdr"
    if dst.endswith(_ST_SUFFIX):
        return "safetensors"
    if dst.endswith(".dtdr"):
        return "dtdr"
    if dst.endswith(("/", os.sep)):
        return "safetensors"
    try:
        fsx = Location(dst, storage_options)
        if fsx.isdir() or (not fsx.exists() and "." not in posixpath.basename(dst.replace(os.sep, "/"))):
            return "safetensors"  # a folder, or a new name without extension (as HF folders are)
    except Exception:
        pass
    raise ArgumentError(f"cannot tell what to write to {dst!r} from a DTDR file: name it *.safetensors or *.dtdr, "
                     "use an existing folder (or end it with '/'), or pass to='safetensors' / to='dtdr'")


def convert(src, dst, *, to: str | None = None, codec="dtdr", parity="default", block_size: int | None = None,
            metadata: Mapping[str, str] | None = None, errors: str = "strict",
            storage_options: Mapping | None = None, out_storage_options: Mapping | None = None,
            allow_pickle: bool = False, progress: bool = False) -> dict:
    """Convert ``src`` to ``dst`` (local paths or fsspec URLs).

    A distributed (DCP) checkpoint folder as ``src`` is gathered into one DTDR
    file; ``to="dcp"`` writes a DTDR file's state dict as a single-rank DCP
    checkpoint folder (see :mod:`torch_dtdr.dcp`).

    ``to`` is ``"dtdr"``, ``"safetensors"`` or ``"dcp"``; by default it is ``"dtdr"``
    for a non-DTDR source, and for a DTDR source ``"safetensors"`` when
    ``dst`` ends in ``.safetensors``, ends in ``/``, is an existing folder or
    a new name without an extension (a folder: the original shard files and index are rebuilt when the DTDR
    file came from a folder, else ``model.safetensors``), ``"dtdr"`` when it
    ends in ``.dtdr`` (re-encoding).

    ``codec``, ``parity``, ``block_size`` are those of :func:`torch_dtdr.save`
    (DTDR output only); the lossless default ``"dtdr"`` makes a round trip
    safetensors -> DTDR -> safetensors give the same tensors bit for bit.
    ``metadata`` adds string pairs to the output's metadata (safetensors
    output: the source's ``__metadata__`` recorded at conversion, plus DTDR
    metadata added or changed since). ``errors``
    applies to reading a DTDR source: ``"strict"`` (default) refuses to
    convert a file that is not bit-exact after parity repair, ``"recover"``
    converts what :func:`torch_dtdr.load` recovers (a lost tensor always
    fails). ``storage_options`` go to fsspec for both ends, unless
    ``out_storage_options`` are given for ``dst`` (DCP conversions).
    ``allow_pickle`` accepts a standard DCP checkpoint folder as ``src`` (see
    :func:`torch_dtdr.dcp.dcp_to_dtdr`); only for checkpoints you trust.

    ``progress=True`` shows bars of bytes, with rate and ETA, on a terminal only: writing DTDR, the bytes
    encoded; DTDR to safetensors, the tensor bytes decoded (what the output holds); DTDR to DCP, the
    stored bytes decoded, then the bytes encoded. Returns a summary: ``{"from", "to", "files", "tensors"}``.
    """
    if to not in (None, "dtdr", "safetensors", "dcp"):
        raise ArgumentError(f"to must be 'dtdr', 'safetensors' or 'dcp', got {to!r}", field="to")
    src_s = os.fsdecode(os.fspath(src))
    dst_s = os.fsdecode(os.fspath(dst))
    if folder_kind(src_s, storage_options) in ("dcp", "torch-dcp"):
        from . import dcp

        dcp.dcp_to_dtdr(src_s, dst_s, codec=codec, block_size=block_size, parity=parity, errors=errors,
                        allow_pickle=allow_pickle, storage_options=storage_options,
                        out_storage_options=out_storage_options or storage_options, progress=progress)
        return {"from": "dcp", "to": "dtdr", "files": [dst_s]}
    if to == "dcp":
        from . import dcp

        dcp.dtdr_to_dcp(src_s, dst_s, codec=codec, block_size=block_size, parity=parity, errors=errors,
                        storage_options=storage_options, out_storage_options=out_storage_options or storage_options,
                        progress=progress)
        return {"from": "dtdr", "to": "dcp", "files": [dst_s]}
    kind, obj, layout = _read_source(src_s, storage_options)
    to = to or _infer_to(kind, dst_s, storage_options)
    if to == "dtdr":
        if Location(dst_s, storage_options).isdir():
            raise IsADirectoryError(f"{dst_s} is a folder; DTDR output is one file (e.g. {dst_s.rstrip('/')}/model.dtdr)")
        if kind == "dtdr":
            from .decoding import load_file as api_load
            from .lazy import open as dtdr_open

            with dtdr_open(src_s, storage_options=storage_options) as h:
                dmeta = h.metadata()
            obj = api_load(src_s, errors=errors, storage_options=storage_options, progress=progress)
            meta = {k: v for k, v in dmeta.items()}
            meta.update(metadata or {})
            from .api import save

            save(obj, dst_s, codec=codec, parity=parity, block_size=block_size, metadata=meta,
                 storage_options=storage_options, progress=progress)
        else:
            _write_dtdr(obj, layout, dst_s, codec=codec, parity=parity, block_size=block_size, metadata=metadata,
                        storage_options=storage_options, progress=progress)
        n = len(obj) if isinstance(obj, Mapping) else None
        return {"from": kind, "to": "dtdr", "files": [dst_s], "tensors": n}
    # to safetensors
    if kind == "dtdr":
        written, n = _dtdr_to_safetensors(src_s, dst_s, errors=errors, metadata=metadata,
                                          storage_options=storage_options, progress=progress)
    else:
        if not _is_tensor_dict(obj):
            raise ObjectTypeError(f"the file holds a {type(obj).__name__}, not a flat {{name: tensor}} mapping",
                                  file=src_s)
        written = _write_safetensors(list(obj), obj.__getitem__, layout, {}, dst_s, metadata, storage_options, src_s)
        n = len(obj)
    return {"from": kind, "to": "safetensors", "files": written, "tensors": n}
