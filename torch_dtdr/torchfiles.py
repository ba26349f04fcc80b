"""Files torch.save wrote, beside DTDR files: telling them apart and loading them with torch.load.

It owns the original :func:`torch.load` / :func:`torch.save` (kept on
``torch.serialization``, so that :mod:`torch_dtdr.shim`'s patching never
loses them and a reloaded or second copy of the package agrees on them),
:func:`sniff`, which tells a DTDR file from anything else behind a path, an
fsspec URL or a file object (a damaged DTDR file still counts, by its
trailer or footer), and :func:`load_torch`, which hands a non-DTDR input to
the original torch.load with torch.load's own arguments and turns "not a
torch file either" into a clear :class:`~torch_dtdr.errors.FormatError`.
:func:`torch_dtdr.api.load` routes through it; :mod:`torch_dtdr.shim`
patches torch with it.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any, Mapping

import torch
import torch.serialization

from .errors import DTDRError, FormatError
from .format.constants import MAGIC
from .storage import check_regular_file, is_url, known_protocol, open_fsspec_file, open_source, read_head

__all__ = ["original_load", "original_save", "is_dtdr", "sniff", "load_torch", "consume"]

# --------------------------------------------------------------------------- originals

# The state lives on torch.serialization, not in this module, so that it
# survives importlib.reload(torch_dtdr.shim) and a second copy of the package
# (two sys.path entries): every copy shares one lock and one set of originals,
# and none of them mistakes a patched torch.load for the original.
_STATE_ATTR = "_torch_dtdr_shim_state"
WRAPPER_FLAG = "__torch_dtdr_wrapper__"  # set on our wrappers; value: the function they replaced


def _unwrap(fn):
    seen = 0
    while getattr(fn, WRAPPER_FLAG, None) is not None and seen < 100:
        fn = getattr(fn, WRAPPER_FLAG)
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


STATE = _shared_state()


def original_load():
    """The :func:`torch.load` this package found at import (never a patched one)."""
    return STATE["load"]


def original_save():
    """The :func:`torch.save` this package found at import (never a patched one)."""
    return STATE["save"]


# --------------------------------------------------------------------------- detection


class WindowIO(io.RawIOBase):
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


def judge(src, partial: bool) -> bool:
    """Whether a storage Source holds a DTDR file: its superblock magic, or -- when the
    first page is damaged -- its trailer or footer blobs (``looks_like_dtdr``)."""
    from .format.reader import looks_like_dtdr

    if src.size < len(MAGIC):
        # Shorter than the magic and beginning like it (an empty file included): a truncated
        # DTDR file to torch_dtdr.load; the patched torch.load leaves such files to torch.
        return partial and MAGIC.startswith(src.read(0, src.size))
    return looks_like_dtdr(src)


def fileobj_is_dtdr(f, partial: bool):
    """(is DTDR, what to load from) for a file object, read from its current position;
    the position is put back. (False, None) when it cannot be peeked."""
    try:
        seekable = getattr(f, "seekable", None)
        if (callable(seekable) and not seekable()) or isinstance(f, io.TextIOBase):
            return False, None
        pos = f.tell()
    except (OSError, ValueError, AttributeError):
        return False, None
    view = f if pos == 0 else WindowIO(f, pos)
    try:
        with open_source(view) as src:
            found = judge(src, partial)
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
        return sniff(f, storage_options)[0] == "dtdr"
    except DTDRError:
        return False


def sniff(f, storage_options, partial: bool = False):
    """("dtdr", source) | ("url", url) | ("missing", path) | ("other", f): what ``f`` is."""
    if isinstance(f, (str, os.PathLike)):
        try:
            s = os.fspath(f)
            s = os.fsdecode(s) if isinstance(s, bytes) else s
        except TypeError:
            return ("other", f)
        if is_url(s) and not os.path.exists(s):
            if not known_protocol(s, storage_options):
                return ("other", f)  # a protocol fsspec does not know: torch.load says what it thinks
            with open_source(s, storage_options) as src:  # a missing object: CheckpointNotFoundError
                return ("dtdr", f) if judge(src, partial) else ("url", s)
        if not s or not os.path.lexists(s):
            return ("missing", s)
        check_regular_file(s)  # a directory, FIFO or device: a typed error now (a FIFO would block open)
        try:
            src = open_source(s)
        except (OSError, ValueError):
            return ("other", f)  # a directory, unreadable: torch.load says why
        with src:
            return ("dtdr", f) if judge(src, partial) else ("other", f)
    if hasattr(f, "read"):
        found, view = fileobj_is_dtdr(f, partial)
        return ("dtdr", view) if found else ("other", f)
    return ("other", f)


# --------------------------------------------------------------------------- loading


def open_url(url: str, storage_options):
    """A binary file object for ``url`` (what torch.load cannot open itself)."""
    return open_fsspec_file(url, storage_options)


def display_name(f) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fsdecode(os.fspath(f))
    return str(getattr(f, "name", f"<{type(f).__name__}>"))


def peek(f, n: int = 512) -> bytes | None:
    """The first ``n`` bytes of a local path, or of a seekable file object from
    its current position (put back); None when they cannot be read."""
    try:
        if isinstance(f, (str, os.PathLike)):
            return read_head(f, n)
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


def not_torch(head: bytes) -> str | None:
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


def strip_unsafe_advice(e: BaseException) -> None:
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
TORCH_SAFE_DEFAULT = _version_tuple(torch.__version__) >= (2, 6)


def load_torch(f, kind: str, src, map_location=None, pickle_module=None, *, weights_only: bool | None = None,
               mmap: bool | None = None, storage_options: Mapping | None = None, **pickle_load_args) -> Any:
    """Load a non-DTDR ``f`` (``kind`` and ``src`` as :func:`sniff` gave them)
    with the original :func:`torch.load` and its arguments as given
    (``weights_only=None``: torch's own default, ``True`` on older torch too
    unless a ``pickle_module`` is given); an fsspec URL is opened with
    ``storage_options``. A file that is not a torch file either raises
    :class:`~torch_dtdr.errors.FormatError` saying what it looks like."""
    kwargs = dict(pickle_load_args)
    if mmap is not None:
        kwargs["mmap"] = mmap
    if weights_only is not None:
        kwargs["weights_only"] = weights_only
    elif pickle_module is None and not TORCH_SAFE_DEFAULT:
        kwargs["weights_only"] = True
    if pickle_module is not None:
        kwargs["pickle_module"] = pickle_module
    if kind == "url":
        with open_url(src, storage_options) as fh:
            return STATE["load"](fh, map_location, **kwargs)
    head = peek(f)
    try:
        return STATE["load"](f, map_location, **kwargs)
    except Exception as e:
        looked = None if head is None else not_torch(head)
        if looked is None:
            raise  # a torch file (or one we cannot peek): torch's own error, unchanged
        strip_unsafe_advice(e)
        raise FormatError(f"neither a DTDR file nor a torch file: it looks like {looked}; torch.load "
                          f"says {type(e).__name__}", file=display_name(f)) from e


def consume(f) -> None:
    """Leave a file object after its data, as a reader that consumed it would."""
    if hasattr(f, "read"):
        try:
            f.seek(0, os.SEEK_END)
        except Exception:  # noqa: BLE001 - a position is a courtesy, never a failure
            pass
