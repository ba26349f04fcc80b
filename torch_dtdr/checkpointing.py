"""Asynchronous saves: :func:`async_save` returns as soon as the tensors are
staged, and encoding, checksums, parity and the atomic commit run on a
background thread.

Staging copies every stored tensor once into CPU memory (pinned where CUDA is
available, so device-to-host copies run at full speed), keeping views and
shared storage as they are, so the training loop may change its tensors the
moment the call returns. At most ``max_in_flight`` saves run at once; a
further call waits for the oldest to finish before staging, which bounds the
memory held by snapshots. A failed save leaves nothing at its destination
and raises from ``result()``; at interpreter exit, pending saves are waited
for and a failure nobody looked at is reported with a warning naming the file.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours
import sys
import threading
import warnings
from concurrent.futures import Future
from typing import Any, Callable

import torch

from . import tree
from .api import save
from .errors import DTDRWarning

__all__ = ["SaveFuture", "async_save", "snapshot", "run_in_background", "wait_for_room", "wait_for_saves"]

_cond = threading.Condition()
_in_flight: list["SaveFuture"] = []
_unobserved_failures: list["SaveFuture"] = []


class SaveFuture(Future):
    """The handle of a background save: a :class:`concurrent.futures.Future`
    (``result()``, ``done()``, ``exception()``, ``add_done_callback``) that
    also knows its ``path``. ``result()`` re-raises the save's error."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.observed = False

    def result(self, timeout=None):
        try:
            return super().result(timeout)
        finally:
            self._observe()

    def exception(self, timeout=None):
        error = super().exception(timeout)
        self._observe()
        return error

    def _observe(self) -> None:
        if self.done():
            self.observed = True
            with _cond:  # drop the reference: the error's traceback holds the snapshot
                if self in _unobserved_failures:
                    _unobserved_failures.remove(self)


def _stager(copy: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[bool]]:
    """A function making the one CPU copy of a stored tensor, and a flag list
    telling whether any device copy is still in flight."""
    pin = torch.cuda.is_available()
    pending_device_copy = [False]

    def stage(data: torch.Tensor) -> torch.Tensor:
        if not copy and data.device.type == "cpu":
            return data
        out = torch.empty(data.shape, dtype=data.dtype, pin_memory=pin)
        from_device = data.device.type != "cpu"
        out.copy_(data, non_blocking=pin and from_device)
        pending_device_copy[0] |= pin and from_device
        return out

    return stage, pending_device_copy


def snapshot(obj: Any, *, copy: bool = True) -> Any:
    """``obj`` rebuilt around CPU copies of its tensors (one copy each, pinned
    where CUDA exists; views and shared storage preserved; GPU tensors come
    back on the CPU). With ``copy=False``, CPU tensors are used as they are
    (the caller promises not to change them until the save is done)."""
    stage, pending = _stager(copy)
    skeleton, entries = tree.flatten(obj, stage=stage)
    if pending[0]:
        torch.cuda.synchronize()
    staged = [e.tensor for e in entries]
    return tree.unflatten(skeleton, staged.__getitem__)


def wait_for_room(max_in_flight: int) -> None:
    """Block until fewer than ``max_in_flight`` background saves are running."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    with _cond:
        while len(_in_flight) >= max_in_flight:
            _cond.wait()


def run_in_background(path, work: Callable[[], Any]) -> SaveFuture:
    """Run ``work()`` on a background (non-daemon) thread and return its
    :class:`SaveFuture`; it counts towards the saves in flight. Callers wait
    for room first (see :func:`async_save`)."""
    future = SaveFuture(path)
    with _cond:
        _in_flight.append(future)

    def body():
        try:
            result = work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller through result()
            future.set_exception(e)
            with _cond:
                _unobserved_failures.append(future)
        else:
            future.set_result(result)
        finally:
            with _cond:
                _in_flight.remove(future)
                _cond.notify_all()

    threading.Thread(target=body, name=f"dtdr-async-save:{path}", daemon=False).start()
    return future


def async_save(obj: Any, f, *, copy: bool = True, max_in_flight: int = 1, **save_kwargs) -> SaveFuture:
    """Save ``obj`` to ``f`` in the background; returns once its tensors are staged.

    ``save_kwargs`` are those of :func:`torch_dtdr.save` (``codec``,
    ``parity``, ``metadata``, ``storage_options``, ...). ``copy=False`` skips
    the staging copy of CPU tensors (pass tensors nobody changes until
    ``result()`` returns). When ``max_in_flight`` saves are already running,
    the call first waits for one to finish. The returned
    :class:`SaveFuture`'s ``result()`` waits and re-raises a failure; a failed
    save leaves nothing at ``f``. ``f`` must be a path or URL (a file object
    could be closed by the caller meanwhile).
    """
    if not isinstance(f, (str, bytes)) and not hasattr(f, "__fspath__"):
        raise TypeError(f"async_save writes to a path or URL, not {type(f).__name__}")
    wait_for_room(max_in_flight)
    staged = snapshot(obj, copy=copy)
    return run_in_background(f, lambda: save(staged, f, **save_kwargs))


def wait_for_saves(timeout: float | None = None) -> bool:
    """Wait until no background save is running; False if ``timeout`` ran out."""
    with _cond:
        return _cond.wait_for(lambda: not _in_flight, timeout)


def _at_exit() -> None:
    wait_for_saves()
    with _cond:
        failures = [fut for fut in _unobserved_failures if not fut.observed]
        _unobserved_failures.clear()
    for fut in failures:
        error = Future.exception(fut)
        message = (f"torch_dtdr: the background save to {fut.path!s} failed and nothing was written there: "
                   f"{type(error).__name__}: {error}")
        warnings.warn(DTDRWarning(message), stacklevel=1)
        sys.stderr.flush()


atexit.register(_at_exit)
# A save still running at exit needs its encode and upload thread pools, which concurrent.futures stops
# accepting work in threading's own exit hooks, before `atexit` handlers run. Waiting from a threading exit
# hook registered after concurrent.futures' (they run last-registered first) lets pending saves finish.
_register_threading_exit = getattr(threading, "_register_atexit", None)
if _register_threading_exit is not None:
    _register_threading_exit(wait_for_saves)
