"""``DTDRReader``: DCP's ``StorageReader`` for checkpoints written by ``DTDRWriter``.

Reads each shard lazily (only the items the plan asks for, by range),
refuses a shard written by another save, and checks that byte items load
under ``torch.load(weights_only=True)`` before DCP unpickles them. Imports
``torch.distributed.checkpoint`` (seconds), so :mod:`torch_dtdr.dcp` imports
this module only when ``DTDRReader`` is first used.
"""

from __future__ import annotations

import io
import os
import uuid
import warnings
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.storage import StorageReader

from ..errors import DamageWarning, FormatError, IntegrityError
from ..report import EXACT, Report
from ..storage import exists, join
from .metadata import (METADATA_NAMES, SAVE_ID_KEY, StorageInfo, load_plain_metadata, norm_path, plain_to_metadata,
                       read_path)
from .verify import CheckpointReport
from .writer import completed

__all__ = ["DTDRReader"]


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
        self.path = norm_path(path)
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
            self.path = norm_path(checkpoint_id)
        self.load_id = uuid.uuid4().hex
        self._reports = []
        self.bytes_read = 0

    def read_metadata(self, *args: Any, **kwargs: Any):
        doc, self._metadata_reports = load_plain_metadata(self.path, self.storage_options, kwargs.get("rank"))
        md = plain_to_metadata(doc)
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
        from ..lazy import open as dtdr_open

        per_file: dict[str, list] = {}
        for req in plan.items:
            info = self.storage_data.get(req.storage_index)
            if not isinstance(info, StorageInfo):
                raise FormatError(f"no storage entry for {req.storage_index.fqn!r}", file=self.path,
                                  tensor=req.storage_index.fqn)
            per_file.setdefault(info.file, []).append((info, req))
        for file, reqs in per_file.items():
            path = read_path(self.path, file, self.storage_options)
            reqs.sort(key=lambda x: x[0].key)
            with dtdr_open(path, errors=self.errors, storage_options=self.storage_options) as f:
                got = f.metadata().get(SAVE_ID_KEY)
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
        return completed(None)

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

    def report(self) -> CheckpointReport:
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
            return any(exists(join(norm_path(checkpoint_id), n), None) for n in METADATA_NAMES)
        except Exception:  # noqa: BLE001
            return False
