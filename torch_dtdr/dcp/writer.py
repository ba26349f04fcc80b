"""``DTDRWriter``: DCP's ``StorageWriter`` that stores every rank's items as one DTDR container.

Imports ``torch.distributed.checkpoint`` (seconds), so :mod:`torch_dtdr.dcp`
imports this module only when ``DTDRWriter`` is first used.
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
from fnmatch import fnmatchcase
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..storage import exists, join, makedirs, remove
from .metadata import (FORMAT_NAME, MAX_KEY_LEN, SAVE_ID_KEY, SUFFIX, FilePrefix, StorageInfo, metadata_names,
                       metadata_to_plain, norm_path, write_metadata, write_path)

try:
    from torch.distributed.checkpoint.metadata import StorageMeta
except ImportError:  # pragma: no cover - torch < 2.4
    StorageMeta = None
try:
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
except ImportError:  # pragma: no cover - torch < 2.5
    CURRENT_DCP_VERSION = None

__all__ = ["DTDRWriter"]


def completed(value) -> Future:
    """A DCP future that is already done with ``value``."""
    fut = Future()
    fut.set_result(value)
    return fut


def _item_key(index, used: set) -> str:
    """A name for one DCP item inside a shard container: ``fqn`` for byte items,
    ``fqn@o0,o1,...`` for tensor chunks; unique and short enough to be its own
    tensor name in the container."""
    key = index.fqn if not index.offset else f"{index.fqn}@{','.join(str(int(o)) for o in index.offset)}"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        key = ""
    if not key or len(key) > MAX_KEY_LEN:
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
    from ..codecs.base import Codec

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


def _rank_default() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover
        pass
    return 0


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
                 storage_options: Mapping | None = None, progress: bool = False) -> None:
        super().__init__()
        #: each shard file's save shows a bar of the bytes encoded (on a terminal only)
        self.progress = progress
        self.path = norm_path(path)
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
            self.path = norm_path(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        self.rank = _rank_default() if rank is None else int(rank)
        self.use_collectives = kwargs.get("use_collectives", True)

    def prepare_local_plan(self, plan):
        makedirs(self.path, self.storage_options)
        if not self.use_collectives:
            plan = dataclasses.replace(plan, storage_data=FilePrefix(f"__{self.rank}_"))
        return plan

    def prepare_global_plan(self, plans):
        # Runs before any rank writes: an older checkpoint in this folder stops
        # being loadable now, not after its shards were half overwritten.
        rank = None if self.use_collectives else self.rank
        names = [join(self.path, n) for n in metadata_names(rank)]
        if not self.overwrite and any(exists(n, self.storage_options) for n in names):
            raise FileExistsError(f"a checkpoint already exists at {self.path} and overwrite=False")
        for name in names:
            remove(name, self.storage_options, missing_ok=True)
        return [p if p.storage_data is not None else dataclasses.replace(p, storage_data=FilePrefix(f"__{i}_"))
                for i, p in enumerate(plans)]

    def write_data(self, plan, planner):
        from ..api import save

        prefix = plan.storage_data.prefix if isinstance(plan.storage_data, FilePrefix) else \
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
                                       storage_data=StorageInfo(file, key, self.save_id)))
        if items:
            save(items, write_path(self.path, file, self.storage_options), codec=_codec_chooser(self.codec, keys),
                 block_size=self.block_size, parity=self.parity,
                 metadata={SAVE_ID_KEY: self.save_id, "torch_dtdr.dcp.format": FORMAT_NAME},
                 storage_options=self.storage_options, progress=self.progress)
        return completed(results)

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
        doc = metadata_to_plain(metadata, files)
        rank = None if self.use_collectives else self.rank
        write_metadata(self.path, metadata_names(rank), doc, self.storage_options, self.metadata_parity)

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
