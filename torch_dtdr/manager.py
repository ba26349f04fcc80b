"""``CheckpointManager``: numbered training checkpoints in one directory (local
or an fsspec URL such as ``s3://bucket/run``), with a resume that never starts
from a damaged file.

Layout::

    DIR/step-0000000100.dtdr    one DTDR file per step, each committed atomically
    DIR/step-0000000200.dtdr
    DIR/latest                  {"format": "torch_dtdr.checkpoints", "version": 1,
                                 "step": 200, "file": "step-0000000200.dtdr"}

A save writes the step file atomically, reads it back to verify every
checksum, then commits the ``latest`` pointer atomically, and only then
deletes the steps beyond ``keep``. Saves run one after the other (an
asynchronous save waits for the previous one), so every step older than the
one the pointer names was itself completed; a step newer than the pointer, or
the newest step when the pointer is missing, may be the leftover of a save
that was interrupted before its pointer was written, and is not trusted.

``restore()`` loads the newest trusted step strictly (bit-exact after any
parity repair); a step that is damaged beyond repair, torn, unreadable or
untrusted is skipped with a :class:`~torch_dtdr.errors.CheckpointFallbackWarning`
naming the file and what was wrong, and the next older step is tried. When no
step loads, :class:`~torch_dtdr.errors.NoIntactCheckpointError` lists each step
and why.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Mapping

from . import storage
from .api import load, save, verify
from .checkpointing import SaveFuture, run_in_background, snapshot, wait_for_room
from .errors import (CheckpointFallbackWarning, CheckpointNotFoundError, DTDRError, IntegrityError,
                     NoIntactCheckpointError, UnregisteredTypeError)

__all__ = ["CheckpointManager"]

POINTER_NAME = "latest"
POINTER_FORMAT = "torch_dtdr.checkpoints"
_MAX_POINTER_BYTES = 4096
_STEP_RE = re.compile(r"step-([0-9]{1,18})\.dtdr")
_STEP_DIR_RE = re.compile(r"step-([0-9]{1,18})")


class CheckpointManager:
    """Numbered checkpoints in ``directory`` with atomic commits, retention and
    a fallback resume.

    ``keep``: how many of the newest steps to keep (``None``: all).
    ``every``: :meth:`save` only saves steps that are a multiple of it
    (``force=True`` overrides). ``codec``, ``parity``, ``metadata`` and
    ``save_kwargs`` go to :func:`torch_dtdr.save`. ``asynchronous=True`` makes
    :meth:`save` return once the tensors are staged (see
    :func:`torch_dtdr.async_save`). ``verify=False`` skips reading each new step
    back before its pointer is committed.

    ``distributed=True``: each step is a ``torch.distributed.checkpoint``
    folder (``step-0000000100/``) written by every rank through
    :class:`~torch_dtdr.dcp.DTDRWriter`; every rank calls :meth:`save` and
    :meth:`restore` (collectives), rank 0 verifies, moves the pointer and
    prunes, and all ranks agree on the step a restore falls back to.
    """

    def __init__(self, directory, *, keep: int | None = 3, every: int | None = None, codec="dtdr",
                 parity="default", storage_options: Mapping | None = None, asynchronous: bool = False,
                 verify: bool = True, metadata: Mapping[str, str] | None = None, distributed: bool = False,
                 **save_kwargs):
        if keep is not None and (type(keep) is not int or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        if every is not None and (type(every) is not int or every < 1):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        self.directory = os.fspath(directory)
        self.keep = keep
        self.every = every
        self.storage_options = dict(storage_options) if storage_options else None
        self.asynchronous = asynchronous
        self.verify = verify
        self.save_kwargs = dict(save_kwargs, codec=codec, parity=parity, metadata=metadata)
        self.restored_step: int | None = None
        self.distributed = distributed
        if distributed and (asynchronous or metadata or save_kwargs):
            raise ValueError("distributed steps are saved synchronously with codec and parity only")
        self._is_url = "://" in self.directory
        storage.makedirs(self.directory, self.storage_options)

    # ------------------------------------------------------------------ paths
    def _join(self, name: str) -> str:
        return f"{self.directory.rstrip('/')}/{name}" if self._is_url else os.path.join(self.directory, name)

    def file_name(self, step: int) -> str:
        """The file (or, distributed, folder) name of ``step`` (``step-0000000100.dtdr``)."""
        return f"step-{step:010d}" if self.distributed else f"step-{step:010d}.dtdr"

    def path(self, step: int) -> str:
        """Where ``step`` is (or would be) stored."""
        return self._join(self.file_name(step))

    # ------------------------------------------------------------------ listing
    def steps(self) -> list[int]:
        """The steps that have a file in the directory, oldest first (trusted or not)."""
        found = set()
        pattern = _STEP_DIR_RE if self.distributed else _STEP_RE
        for name in storage.listdir(self.directory, self.storage_options):
            match = pattern.fullmatch(name)
            if match:
                found.add(int(match.group(1)))
        return sorted(found)

    def _read_pointer(self) -> tuple[int | None, str | None]:
        """``(step, None)`` from the pointer, or ``(None, why)`` when it is missing or malformed."""
        where = self._join(POINTER_NAME)
        try:
            with storage.open_source(where, self.storage_options) as src:
                if src.size > _MAX_POINTER_BYTES:
                    return None, f"{where} is {src.size} bytes, not a pointer"
                data = src.read(0, src.size)
        except CheckpointNotFoundError:
            return None, f"the pointer {where} is missing"
        except DTDRError as e:
            return None, f"the pointer {where} cannot be read ({e})"
        try:
            doc = json.loads(data.decode("utf-8"))
            step = doc["step"] if doc.get("format") == POINTER_FORMAT and doc.get("version") == 1 else None
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            step = None
        if type(step) is not int or step < 0 or doc.get("file") != self.file_name(step):
            return None, f"the pointer {where} is malformed"
        return step, None

    def latest_step(self) -> int | None:
        """The step the ``latest`` pointer names (None when there is none or it is malformed)."""
        return self._read_pointer()[0]

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` saves ``step`` (``every`` divides it)."""
        return self.every is None or step % self.every == 0

    def save(self, step: int, obj: Any, *, force: bool = False, asynchronous: bool | None = None,
             copy: bool = True) -> SaveFuture | None:
        """Save ``obj`` as ``step``. Returns None when ``every`` skips the step;
        otherwise, asynchronously, a :class:`~torch_dtdr.checkpointing.SaveFuture`
        (its ``result()`` is the step, raising if the save failed), and
        synchronously the step itself after the step file, its verification,
        the pointer and the pruning are all done."""
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not force and not self.should_save(step):
            return None
        if self.distributed:
            return self._save_distributed(step, obj)
        asynchronous = self.asynchronous if asynchronous is None else asynchronous
        if not asynchronous:
            wait_for_room(1)  # an earlier asynchronous save of this process commits first
            return self._commit(step, obj)
        wait_for_room(1)
        staged = snapshot(obj, copy=copy)
        return run_in_background(self.path(step), lambda: self._commit(step, staged))

    def _commit(self, step: int, obj: Any) -> int:
        path = self.path(step)
        save(obj, path, storage_options=self.storage_options, **self.save_kwargs)
        if self.verify:
            report = verify(path, storage_options=self.storage_options)
            if not report.clean:
                raise IntegrityError(f"the new checkpoint does not verify: {report.summary()}", file=path)
        self._point_and_prune(step)
        return step

    def _point_and_prune(self, step: int) -> None:
        pointer = {"format": POINTER_FORMAT, "version": 1, "step": step, "file": self.file_name(step)}
        storage.write_bytes_atomic(self._join(POINTER_NAME), json.dumps(pointer).encode("utf-8"),
                                   self.storage_options)
        if self.keep is None:
            return
        older = [s for s in self.steps() if s <= step]
        for old in older[:-self.keep]:
            self._remove_step(old)

    def _remove_step(self, step: int) -> None:
        path = self.path(step)
        if not self.distributed:
            storage.remove(path, self.storage_options, missing_ok=True)
            return
        names = storage.listdir(path, self.storage_options)
        # the metadata first: a half-deleted folder then no longer loads as a checkpoint
        for name in sorted(names, key=lambda n: not n.startswith("metadata")):
            storage.remove(self._join(f"{self.file_name(step)}/{name}") if self._is_url
                           else os.path.join(path, name), self.storage_options, missing_ok=True)
        if not self._is_url:
            try:
                os.rmdir(path)
            except OSError:
                pass

    def _save_distributed(self, step: int, state: Any) -> int:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from .dcp import DTDRWriter, verify_checkpoint

        path = self.path(step)
        dcp.save(state, storage_writer=DTDRWriter(path, codec=self.save_kwargs["codec"],
                                                  parity=self.save_kwargs["parity"],
                                                  storage_options=self.storage_options))
        failure = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                if self.verify:
                    report = verify_checkpoint(path, storage_options=self.storage_options)
                    if not report.clean:
                        raise IntegrityError(f"the new checkpoint does not verify: {report.summary()}", file=path)
                self._point_and_prune(step)
            except DTDRError as e:
                failure = f"{type(e).__name__}: {e}"
        if dist.is_initialized():
            shared = [failure]
            dist.broadcast_object_list(shared, src=0)
            failure = shared[0]
        if failure is not None:
            raise IntegrityError(f"saving step {step} failed on rank 0: {failure}", file=path)
        return step

    # ------------------------------------------------------------------ restoring
    def restore(self, step: int | None = None, *, map_location=None, state: Any = None) -> Any:
        """Load a checkpoint strictly (bit-exact, after any parity repair).

        With ``step``, exactly that step (its errors are raised). Without, the
        newest trusted step that loads: damaged, torn, unreadable or untrusted
        steps are skipped with a :class:`~torch_dtdr.errors.CheckpointFallbackWarning`;
        :class:`~torch_dtdr.errors.NoIntactCheckpointError` when none loads,
        :class:`~torch_dtdr.errors.CheckpointNotFoundError` when there are no
        steps. The step restored is kept in ``restored_step``.

        Distributed: every rank passes its ``state`` (the state dict to load
        into, as for ``dcp.load``); a step is used only when it loads exactly
        on every rank. Returns ``state``."""
        if self.distributed and state is None:
            raise ValueError("a distributed restore loads into the state dict given as state=")
        if step is not None:
            obj = self._load_step(step, map_location, state)
            self.restored_step = step
            return obj
        steps = self.steps()
        if not steps:
            raise CheckpointNotFoundError("no checkpoints in this directory", file=self.directory)
        pointer, pointer_problem = self._read_pointer()
        problems: dict[int, str] = {}
        if pointer is not None and pointer not in steps:
            problems[pointer] = f"the pointer names step {pointer}, but {self.path(pointer)} is missing"
            warnings.warn(CheckpointFallbackWarning(problems[pointer]), stacklevel=2)
        for candidate in reversed(steps):
            path = self.path(candidate)
            if pointer is not None and candidate > pointer:
                why = f"newer than the step the pointer names ({pointer}): its save did not complete"
            elif pointer is None and candidate == steps[-1]:
                why = f"{pointer_problem}, so the newest step's save may not have completed"
            else:
                obj, why = None, None
                try:
                    obj = self._load_step(candidate, map_location, state)
                except UnregisteredTypeError:
                    raise  # not damage: the loading program must register its types
                except DTDRError as e:
                    why = f"{type(e).__name__}: {e}"
                why = self._agree(why)  # distributed: a step counts only when every rank loaded it
                if why is None:
                    self.restored_step = candidate
                    return obj
            problems[candidate] = why
            warnings.warn(CheckpointFallbackWarning(f"skipping checkpoint {path}: {why}"), stacklevel=2)
        listing = "; ".join(f"step {s} ({self.path(s)}): {why}" for s, why in problems.items())
        raise NoIntactCheckpointError(f"no checkpoint loads exactly: {listing}", file=self.directory,
                                      problems=problems)

    def _load_step(self, step: int, map_location, state):
        if not self.distributed:
            return load(self.path(step), map_location, errors="strict", storage_options=self.storage_options)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from .dcp import DTDRReader

        try:
            dcp.load(state, storage_reader=DTDRReader(self.path(step), errors="strict",
                                                      storage_options=self.storage_options))
        except CheckpointException as e:  # DCP wraps each rank's error; report the first
            failures = getattr(e, "failures", {}) or {}
            first = next(iter(failures.values()), e)
            first = first[0] if isinstance(first, tuple) else first
            raise IntegrityError(f"{type(first).__name__}: {first}", file=self.path(step)) from None
        return state

    def _agree(self, why: str | None) -> str | None:
        """Distributed: the first rank's reason to reject a step, if any rank has one."""
        if not self.distributed:
            return why
        import torch.distributed as dist

        if not dist.is_initialized():
            return why
        reasons = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, why)
        return next((f"rank {rank}: {r}" for rank, r in enumerate(reasons) if r is not None), None)

    def wait(self) -> None:
        """Wait for this process's background saves to finish."""
        from .checkpointing import wait_for_saves

        wait_for_saves()
