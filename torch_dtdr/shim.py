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

import builtins
import functools
import io
import os
import threading
import warnings
from typing import Any, Mapping

import torch
import torch.serialization

from . import tree
from .errors import CheckpointNotFoundError, DTDRError, DTDRWarning, FormatError
from .format.constants import MAGIC

__all__ = ["load", "is_dtdr", "patch", "unpatch", "is_patched", "original_load", "original_save"]

# --------------------------------------------------------------------------- originals

# The state lives on torch.serialization, not in this module, so that it
# survives importlib.reload(torch_dtdr.shim) and a second copy of the package
# (two sys.path entries): every copy shares one lock and one set of originals,
# and none of them mistakes a patched torch.load for the original.
_STATE_ATTR = "_torch_dtdr_shim_state"
_WRAPPER_FLAG = "__torch_dtdr_wrapper__"  # set on our wrappers; value: the function they replaced


def _unwrap(fn):
    seen = 0
    while getattr(fn, _WRAPPER_FLAG, None) is not None and seen < 100:
        fn = getattr(fn, _WRAPPER_FLAG)
        seen += 1
    return fn


def _shared_state() -> dict:
    st = torch.serialization.__dict__.get(_STATE_ATTR)
    if st is None:
        # dict.setdefault is atomic under the GIL: two racing first imports agree on one state
        st = torch.serialization.__dict__.setdefault(_STATE_ATTR, {
            "lock": threading.RLock(),
            "load": _unwrap(torch.load),  # the real torch.load, even if imported while patched
            "save": _unwrap(torch.save),
            "patched": None,  # None, or a dict describing the active patch
        })
    return st


_STATE = _shared_state()


def original_load():
    """The :func:`torch.load` this package found at import (never a patched one)."""
    return _STATE["load"]


def original_save():
    """The :func:`torch.save` this package found at import (never a patched one)."""
    return _STATE["save"]


# --------------------------------------------------------------------------- detection

def _is_url(s: str) -> bool:
    return "://" in s


class _Window(io.RawIOBase):
    """A read-only view of ``f`` from ``start`` on: a DTDR file that begins at a
    file object's current position rather than at 0."""

    def __init__(self, f, start: int):
        self._f = f
        self._start = start
        self.name = getattr(f, "name", f"<{type(f).__name__}>")

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._f.tell() - self._start

    def seek(self, offset, whence=os.SEEK_SET):
        if whence == os.SEEK_SET:
            return self._f.seek(self._start + offset) - self._start
        return self._f.seek(offset, whence) - self._start

    def read(self, n=-1):
        return self._f.read(n)

    def readinto(self, b):
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _judge(src, partial: bool) -> bool:
    """Whether a storage Source holds a DTDR file: its superblock magic, or -- when the
    first page is damaged -- its trailer or footer blobs (``looks_like_dtdr``)."""
    from .format.reader import looks_like_dtdr

    if src.size < len(MAGIC):
        # Shorter than the magic and beginning like it (an empty file included): a truncated
        # DTDR file to torch_dtdr.load; the patched torch.load leaves such files to torch.
        return partial and MAGIC.startswith(src.read(0, src.size))
    return looks_like_dtdr(src)


def _fileobj_is_dtdr(f, partial: bool):
    """(is DTDR, what to load from) for a file object, read from its current position;
    the position is put back. (False, None) when it cannot be peeked."""
    try:
        seekable = getattr(f, "seekable", None)
        if (callable(seekable) and not seekable()) or isinstance(f, io.TextIOBase):
            return False, None
        pos = f.tell()
    except (OSError, ValueError, AttributeError):
        return False, None
    view = f if pos == 0 else _Window(f, pos)
    from .storage import open_source

    try:
        with open_source(view) as src:
            found = _judge(src, partial)
    except (OSError, ValueError, TypeError, AttributeError):
        found = False
    finally:
        try:
            f.seek(pos)
        except (OSError, ValueError):  # pragma: no cover - a tell()-able file that cannot seek back
            pass
    return found, view


def is_dtdr(f, storage_options: Mapping | None = None) -> bool:
    """Whether ``f`` (path, fsspec URL or binary file object) holds a DTDR file:
    by the magic of its first 8 bytes or, when the first page is damaged, by
    its trailer or footer blobs at the end. A file object is read from its
    current position and put back there. Missing or unreadable inputs give False."""
    try:
        return _sniff(f, storage_options)[0] == "dtdr"
    except DTDRError:
        return False


def _sniff(f, storage_options, partial: bool = False):
    """("dtdr", source) | ("url", url) | ("missing", path) | ("other", f): what ``f`` is."""
    from .storage import open_source

    if isinstance(f, (str, os.PathLike)):
        try:
            s = os.fspath(f)
            s = os.fsdecode(s) if isinstance(s, bytes) else s
        except TypeError:
            return ("other", f)
        if _is_url(s) and not os.path.exists(s):
            try:
                import fsspec

                fsspec.core.url_to_fs(s, **(storage_options or {}))
            except (ImportError, ValueError):
                return ("other", f)  # a protocol fsspec does not know: torch.load says what it thinks
            with open_source(s, storage_options) as src:  # a missing object: CheckpointNotFoundError
                return ("dtdr", f) if _judge(src, partial) else ("url", s)
        if not s or not os.path.lexists(s):
            return ("missing", s)
        from .storage import check_regular_file

        check_regular_file(s)  # a directory, FIFO or device: a typed error now (a FIFO would block open)
        try:
            src = open_source(s)
        except (OSError, ValueError):
            return ("other", f)  # a directory, unreadable: torch.load says why
        with src:
            return ("dtdr", f) if _judge(src, partial) else ("other", f)
    if hasattr(f, "read"):
        found, view = _fileobj_is_dtdr(f, partial)
        return ("dtdr", view) if found else ("other", f)
    return ("other", f)


# --------------------------------------------------------------------------- loading


def _bind(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, errors="recover",
          storage_options=None, report=False, max_workers=None, partial=False, **pickle_load_args):
    """torch.load's signature plus torch_dtdr's keywords, as a dict."""
    return {"map_location": map_location, "errors": errors, "storage_options": storage_options,
            "report": report, "max_workers": max_workers, "partial": partial}


def _load_dtdr(src, orig_f, map_location, errors, storage_options, report, max_workers=None, partial=False):
    from .api import load as _api_load

    out = _api_load(src, map_location, errors=errors, storage_options=storage_options, report=report,
                    max_workers=max_workers, partial=partial)
    if hasattr(orig_f, "read"):
        try:  # leave a file object after the data, as a reader that consumed it would
            orig_f.seek(0, os.SEEK_END)
        except Exception:
            pass
    return out


def _open_url(url: str, storage_options):
    import fsspec

    return fsspec.open(url, "rb", **(storage_options or {})).open()


def load(f, map_location=None, pickle_module=None, *, weights_only: bool | None = None, mmap: bool | None = None,
         errors: str = "recover", storage_options: Mapping | None = None, report: bool = False,
         max_workers: int | None = None, partial: bool = False, **pickle_load_args) -> Any:
    """Load a DTDR file, or hand anything else to :func:`torch.load`.

    ``f`` is a local path, an fsspec URL (``s3://``, ``gs://``, ``memory://``,
    ...) or a binary file object; what it holds is told by its first 8 bytes,
    or, when those are damaged, by the DTDR trailer or footer at its end (a
    file object is peeked from its current position and, when it is not DTDR,
    left exactly there). A file shorter than the magic that begins like it
    (an empty file, say) counts as a truncated DTDR file; a missing path
    raises :class:`~torch_dtdr.errors.CheckpointNotFoundError` (a
    ``FileNotFoundError``).

    **DTDR files** are decoded by :func:`torch_dtdr.api.load`: ``map_location``
    takes all of torch.load's forms (device string, :class:`torch.device`, a
    dict of saved-location remaps, a callable ``(storage, location)``);
    ``errors="recover"`` (default) repairs and degrades gracefully with a
    :class:`~torch_dtdr.errors.DamageWarning`, ``"strict"`` raises unless
    every tensor is bit-exact; a lost tensor raises
    :class:`~torch_dtdr.errors.IntegrityError` naming every lost tensor unless
    ``partial=True``, which returns ``None`` in its place; ``report=True`` returns ``(obj, Report)``;
    ``max_workers`` bounds the concurrent range requests to a remote store
    (default :data:`torch_dtdr.storage.DEFAULT_MAX_WORKERS`). Nothing is unpickled, so ``pickle_module``, ``weights_only`` and extra
    pickle arguments have no effect; ``mmap=True`` is accepted and has no
    effect yet (the data is read and verified in full).

    **Anything else** goes to the original :func:`torch.load` with
    ``map_location``, ``pickle_module``, ``weights_only``, ``mmap`` and the
    extra pickle arguments exactly as given. ``weights_only=None`` (default)
    means torch's own default: ``True`` since torch 2.6 (this function passes
    ``True`` on older torch, unless a ``pickle_module`` is given). An fsspec
    URL, which torch.load cannot open, is opened with ``storage_options`` and
    passed as a file object. ``errors`` and ``max_workers`` do not apply (torch.load repairs
    nothing) and ``report=True`` returns ``(obj, None)``.
    """
    kind, src = _sniff(f, storage_options, partial=True)
    if kind == "dtdr":
        return _load_dtdr(src, f, map_location, errors, storage_options, report, max_workers, partial)
    if kind == "missing":
        raise CheckpointNotFoundError("no such file", file=src)
    kwargs = dict(pickle_load_args)
    if mmap is not None:
        kwargs["mmap"] = mmap
    if weights_only is not None:
        kwargs["weights_only"] = weights_only
    elif pickle_module is None and not _TORCH_SAFE_DEFAULT:
        kwargs["weights_only"] = True
    if pickle_module is not None:
        kwargs["pickle_module"] = pickle_module
    if kind == "url":
        with _open_url(src, storage_options) as fh:
            obj = _STATE["load"](fh, map_location, **kwargs)
    else:
        head = _peek(f)
        try:
            obj = _STATE["load"](f, map_location, **kwargs)
        except Exception as e:
            looked = None if head is None else _not_torch(head)
            if looked is None:
                raise  # a torch file (or one we cannot peek): torch's own error, unchanged
            _strip_unsafe_advice(e)
            raise FormatError(f"neither a DTDR file nor a torch file: it looks like {looked}; torch.load "
                              f"says {type(e).__name__}", file=_display_name(f)) from e
    return (obj, None) if report else obj


def _display_name(f) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fsdecode(os.fspath(f))
    return str(getattr(f, "name", f"<{type(f).__name__}>"))


def _peek(f, n: int = 512) -> bytes | None:
    """The first ``n`` bytes of a local path, or of a seekable file object from
    its current position (put back); None when they cannot be read."""
    try:
        if isinstance(f, (str, os.PathLike)):
            with builtins.open(os.fspath(f), "rb") as fh:
                return fh.read(n)
        if hasattr(f, "read") and callable(getattr(f, "seekable", None)) and f.seekable():
            pos = f.tell()
            try:
                head = f.read(n)
            finally:
                f.seek(pos)
            return head if isinstance(head, bytes) else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def _not_torch(head: bytes) -> str | None:
    """None when ``head`` begins like a file torch.save writes (a zip archive, a
    protocol-2+ pickle, a legacy tar); else what it looks like, in words."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or head[257:262] == b"ustar":
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return None
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2**27:
        return "a safetensors file (convert it with torch_dtdr.convert, or load it with safetensors)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
        try:
            text = head[:-3].decode("utf-8") if len(head) >= 512 else None  # a character cut at the end
        except UnicodeDecodeError:
            text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"text ({text[:40]!r}...)"
    return f"unrecognised binary data (first bytes {head[:8].hex()})"


def _strip_unsafe_advice(e: BaseException) -> None:
    """Drop torch's suggestion to retry with ``weights_only=False`` from ``e``'s
    text: for a file that is not a torch file, that advice only runs a pickle."""
    text = str(e)
    if "weights_only" not in text:
        return
    detail = text[text.find("WeightsUnpickler error:"):].splitlines()[0] if "WeightsUnpickler error:" in text \
        else "the weights-only unpickler refused the data"
    try:
        e.args = (detail,)
    except (AttributeError, TypeError):  # pragma: no cover - exceptions with read-only args
        pass


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):  # pragma: no cover
        return (99, 0)


#: torch.load defaults to weights_only=True from torch 2.6 on.
_TORCH_SAFE_DEFAULT = _version_tuple(torch.__version__) >= (2, 6)


# --------------------------------------------------------------------------- patching


def _make_load_wrapper(prev):
    @functools.wraps(prev)
    def load(f, *args, **kwargs):
        patched = _STATE["patched"]
        if patched is None or patched["load_wrapper"] is not load:  # unpatched while someone else sat on top
            return prev(f, *args, **kwargs)
        try:
            kind, src = _sniff(f, kwargs.get("storage_options"))
        except DTDRError:
            return prev(f, *args, **kwargs)  # torch.load reports a missing / unreadable input its own way
        if kind == "dtdr":
            try:
                b = _bind(f, *args, **kwargs)
            except TypeError:
                return prev(f, *args, **kwargs)  # the same TypeError torch.load gives
            return _load_dtdr(src, f, b["map_location"], b["errors"], b["storage_options"], b["report"],
                              b["max_workers"], b["partial"])
        if not {"report", "storage_options", "max_workers", "partial"} & kwargs.keys():
            if kind == "url":
                with _open_url(src, None) as fh:
                    return prev(fh, *args, **kwargs)
            return prev(f, *args, **kwargs)  # exactly as before
        # torch_dtdr's own keywords, which torch.load would reject: dropped, as torch_dtdr.load does
        kw = dict(kwargs)
        so = kw.pop("storage_options", None)
        report = kw.pop("report", False)
        kw.pop("max_workers", None)
        kw.pop("partial", None)
        if kind == "url":
            with _open_url(src, so) as fh:
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
        patched = _STATE["patched"]
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
            from .api import save as _api_save

            return _api_save(obj, f, **patched["save_kwargs"])
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
    cur = _STATE["patched"]
    if cur is not None:
        if state is not None and cur.get("save_wrapper") and state["save"]:
            cur["save_kwargs"] = dict(state["save_kwargs"])  # keep the installed wrappers
            return
        _STATE["patched"] = None
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
    _STATE["patched"] = new


def _describe() -> dict | None:
    cur = _STATE["patched"]
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
        with _STATE["lock"]:
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
    with _STATE["lock"]:
        if not save and save_kwargs:
            raise TypeError("save options were given without save=True")
        before = _describe()
        _apply({"save": bool(save), "save_kwargs": save_kwargs})
        return _Patch(before)


def unpatch() -> None:
    """Undo :func:`patch`: ``torch.load`` (and ``torch.save``) are the original
    function objects again. A no-op when not patched."""
    with _STATE["lock"]:
        _apply(None)


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _STATE["patched"] is not None
