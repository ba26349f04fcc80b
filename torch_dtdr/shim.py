"""torch.load-compatible loading, and patching torch.load / torch.save.

:func:`load` takes everything :func:`torch.load` takes. It reads the first 8
bytes of ``f`` (a local path, an fsspec URL or a binary file object): a DTDR
file is loaded by :func:`torch_dtdr.api.load` (nothing is unpickled, so
``pickle_module``, ``weights_only`` and extra pickle arguments do not apply);
anything else is handed to the original :func:`torch.load` with the arguments
as given, so one call site loads old ``.pt`` checkpoints and new DTDR ones.

:func:`patch` makes :func:`torch.load` itself do that, for code that cannot be
edited (training frameworks, ``transformers``' ``.bin`` loading, ...)::

    with torch_dtdr.patch():
        sd = torch.load("model.dtdr")      # DTDR, decoded
        old = torch.load("model.pt")       # exactly what torch.load did before

``patch(save=True)`` also routes :func:`torch.save` to :func:`torch_dtdr.save`
(see :func:`patch` for what falls back to the original).
"""


from __future__ import annotations

import functools
import os
import warnings

import torch

from . import api, tree
from .api import load, load_dtdr_source
from .errors import DTDRError, DTDRWarning
from .torchfiles import STATE, WRAPPER_FLAG as _WRAPPER_FLAG, is_dtdr, open_url, original_load, original_save, sniff

__all__ = ["load", "is_dtdr", "patch", "unpatch", "is_patched", "original_load", "original_save"]


def _bind(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, errors="recover",
          storage_options=None, report=False, max_workers=None, partial=False, workers=None, progress=False,
          **pickle_load_args):
    """torch.load's signature plus torch_dtdr's keywords, as a dict."""
    return {"pickle_load_args": pickle_load_args, "map_location": map_location, "errors": errors, "storage_options": storage_options,
            "report": report, "max_workers": max_workers, "partial": partial, "workers": workers,
            "progress": progress}


# --------------------------------------------------------------------------- patching


def _make_load_wrapper(prev):
    @functools.wraps(prev)
    def load(f, *args, **kwargs):
        patched = STATE["patched"]
        if patched is None or patched["load_wrapper"] is not load:  # unpatched while someone else sat on top
            return prev(f, *args, **kwargs)
        try:
            kind, src = sniff(f, kwargs.get("storage_options"))
        except DTDRError:
            return prev(f, *args, **kwargs)  # torch.load reports a missing / unreadable input its own way
        if kind == "dtdr":
            try:
                b = _bind(f, *args, **kwargs)
            except TypeError:
                return prev(f, *args, **kwargs)  # the same TypeError torch.load gives
            api.check_pickle_load_args(b["pickle_load_args"])  # a keyword neither load takes: TypeError
            return load_dtdr_source(src, f, b["map_location"], errors=b["errors"],
                                    storage_options=b["storage_options"], report=b["report"],
                                    max_workers=b["max_workers"], partial=b["partial"], workers=b["workers"],
                                    progress=b["progress"])
        if not {"report", "storage_options", "max_workers", "partial", "workers", "progress"} & kwargs.keys():
            if kind == "url":
                with open_url(src, None) as fh:
                    return prev(fh, *args, **kwargs)
            return prev(f, *args, **kwargs)  # exactly as before
        # torch_dtdr's own keywords, which torch.load would reject: dropped, as torch_dtdr.load does
        kw = dict(kwargs)
        so = kw.pop("storage_options", None)
        report = kw.pop("report", False)
        kw.pop("max_workers", None)
        kw.pop("partial", None)
        kw.pop("workers", None)
        if kind == "url":
            with open_url(src, so) as fh:
                obj = prev(fh, *args, **kw)
        else:
            obj = prev(f, *args, **kw)
        return (obj, None) if report else obj

    setattr(load, _WRAPPER_FLAG, prev)
    return load


def _dtdr_storable(obj) -> bool:
    try:
        tree.flatten(obj)
    except (TypeError, ValueError):
        return False
    return True


_save_fallback_warned = False


def _make_save_wrapper(prev):
    @functools.wraps(prev)
    def save(obj, f, *args, **kwargs):
        global _save_fallback_warned
        patched = STATE["patched"]
        if patched is None or patched.get("save_wrapper") is not save:
            return prev(obj, f, *args, **kwargs)
        why = None
        if args or kwargs:
            why = "pickle arguments were given"
        elif not (isinstance(f, (str, os.PathLike)) or hasattr(f, "write")):
            why = f"the destination is a {type(f).__name__}"
        elif not _dtdr_storable(obj):
            why = f"a {type(obj).__name__} holding types DTDR cannot store (it never pickles)"
        if why is None:
            return api.save(obj, f, **patched["save_kwargs"])
        if not _save_fallback_warned:
            _save_fallback_warned = True
            warnings.warn(DTDRWarning(f"torch_dtdr.patch(save=True): torch.save wrote a pickle file, not DTDR, "
                                      f"because {why} (warned once)"), stacklevel=2)
        return prev(obj, f, *args, **kwargs)

    setattr(save, _WRAPPER_FLAG, prev)
    return save


def _install(name: str, wrapper, prev) -> None:
    setattr(torch, name, wrapper)
    if getattr(torch.serialization, name) is prev:
        setattr(torch.serialization, name, wrapper)


def _restore(name: str, wrapper, prev) -> bool:
    ok = True
    for mod in (torch, torch.serialization):
        cur = getattr(mod, name)
        if cur is wrapper:
            setattr(mod, name, prev)
        elif mod is torch:
            ok = False  # someone patched on top of us: leave theirs; our wrapper now passes through
    return ok


def _apply(state: dict | None) -> None:
    """Bring torch.load / torch.save to ``state`` (None: unpatched). Call with the lock held."""
    if state is not None:
        state = {"save": bool(state.get("save")), "save_kwargs": dict(state.get("save_kwargs") or {})}
    if _describe() == state:
        return
    cur = STATE["patched"]
    if cur is not None:
        if state is not None and cur.get("save_wrapper") and state["save"]:
            cur["save_kwargs"] = dict(state["save_kwargs"])  # keep the installed wrappers
            return
        STATE["patched"] = None
        clean = _restore("load", cur["load_wrapper"], cur["load_prev"])
        if cur.get("save_wrapper") is not None:
            clean = _restore("save", cur["save_wrapper"], cur["save_prev"]) and clean
        if not clean:
            warnings.warn(DTDRWarning("torch.load/torch.save were replaced by someone else after torch_dtdr.patch(); "
                                      "leaving their function in place (ours now passes every call through)"),
                          stacklevel=4)
    if state is None:
        return
    prev_load = torch.load
    new = {"load_prev": prev_load, "load_wrapper": _make_load_wrapper(prev_load),
           "save": bool(state.get("save")), "save_kwargs": dict(state.get("save_kwargs") or {}),
           "save_prev": None, "save_wrapper": None}
    _install("load", new["load_wrapper"], prev_load)
    if new["save"]:
        prev_save = torch.save
        new["save_prev"] = prev_save
        new["save_wrapper"] = _make_save_wrapper(prev_save)
        _install("save", new["save_wrapper"], prev_save)
    STATE["patched"] = new


def _describe() -> dict | None:
    cur = STATE["patched"]
    if cur is None:
        return None
    return {"save": cur["save"], "save_kwargs": dict(cur["save_kwargs"])}


class _Patch:
    """Returned by :func:`patch`; as a context manager it restores, on exit,
    whatever was in effect before the ``patch()`` call."""

    def __init__(self, before):
        self._before = before

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with STATE["lock"]:
            _apply(self._before)
        return False

    def __repr__(self):
        return f"<torch_dtdr.patch active={is_patched()}>"


def patch(save: bool = False, **save_kwargs) -> _Patch:
    """Make :func:`torch.load` read DTDR files transparently (and, with
    ``save=True``, :func:`torch.save` write them).

    While patched, ``torch.load`` (also ``torch.serialization.load``) sniffs
    its input: DTDR files are decoded as by :func:`torch_dtdr.load` (its
    ``errors=``, ``report=`` and ``storage_options=`` keywords work through
    ``torch.load`` too); everything else reaches the previous ``torch.load``
    with the very same arguments (``report=`` and ``storage_options=``, which
    torch.load would reject, are taken out: ``report=True`` gives
    ``(obj, None)``). fsspec URLs of non-DTDR files are opened
    and passed as file objects.

    ``save=True`` opts in to ``torch.save(obj, f)`` writing DTDR through
    :func:`torch_dtdr.save` (``save_kwargs``: ``codec``, ``parity``, ...;
    default lossless). It falls back to the original ``torch.save`` (with a
    :class:`~torch_dtdr.errors.DTDRWarning`, once per process) when ``obj``
    holds something DTDR cannot store without pickling (arbitrary classes,
    sets, ...), when pickle arguments (``pickle_module``,
    ``_use_new_zipfile_serialization``, ...) are given, or when ``f`` is
    neither a path nor a writable file object.

    Idempotent (patching twice installs one wrapper; a later call's ``save``
    settings replace earlier ones) and thread-safe. :func:`unpatch` restores
    the original function objects. Used as a context manager, the exit
    restores the state from before this call, so ``with patch():`` blocks
    nest.
    """
    with STATE["lock"]:
        if not save and save_kwargs:
            raise TypeError("save options were given without save=True")
        before = _describe()
        _apply({"save": bool(save), "save_kwargs": save_kwargs})
        return _Patch(before)


def unpatch() -> None:
    """Undo :func:`patch`: ``torch.load`` (and ``torch.save``) are the original
    function objects again. A no-op when not patched."""
    with STATE["lock"]:
        _apply(None)


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return STATE["patched"] is not None
