"""Names of files and stores: paths, URLs, how one resolves to a file system, and the typed storage error.

:func:`is_url`, :func:`join`, :func:`resolve` (a path, URL or file object to
``("local", path)``, ``("fsspec", fs, path)`` or ``("fileobj", f)``),
:func:`url_to_fs`, :func:`is_local_fs`, :func:`known_protocol`,
:func:`is_plain_name`, :func:`storage_error` and the defaults the sources
and sinks share. The one place that says what a URL is.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Union

from ..errors import CheckpointNotFoundError, DTDRError, StorageError


PathOrURL = Union[str, "os.PathLike[str]"]


FileLike = Union[PathOrURL, BinaryIO]


#: Concurrent range requests issued by :meth:`Source.read_ranges` on remote stores.
DEFAULT_MAX_WORKERS = 16


#: Remote ranges longer than this are split into parts fetched concurrently.
DEFAULT_PART_SIZE = 16 * 2**20


#: Bytes a :meth:`Source.prefetch` may hold or have in flight ahead of the reads it serves.
DEFAULT_PREFETCH_WINDOW = 128 * 2**20


#: Suffix of the temporary files a local sink writes before its atomic rename.
TEMP_SUFFIX = ".dtdr-tmp"


O_BINARY = getattr(os, "O_BINARY", 0)


O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def is_url(s: str) -> bool:
    """Whether ``s`` names an fsspec URL (``scheme://...``) rather than a local path."""
    return "://" in s


def fspath(f) -> str:
    p = os.fspath(f)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def resolve(f, storage_options, *, allow_fileobj: bool):
    """Return ("local", path) | ("fsspec", fs, path) | ("fileobj", f)."""
    if isinstance(f, (bytes, bytearray, memoryview)):
        raise TypeError(
            "expected a path, a URL or a binary file object, got bytes; "
            "wrap in-memory data in io.BytesIO"
        )
    if isinstance(f, (str, os.PathLike)):
        s = fspath(f)
        if not s:
            raise ValueError("empty path")
        if is_url(s):
            import fsspec
            from fsspec.implementations.local import LocalFileSystem

            fs, path = fsspec.core.url_to_fs(s, **(storage_options or {}))
            if isinstance(fs, LocalFileSystem):
                return ("local", path)
            return ("fsspec", fs, path)
        return ("local", s)
    if allow_fileobj and (hasattr(f, "read") or hasattr(f, "write")):
        return ("fileobj", f)
    kind = "a path, a URL or a binary file object" if allow_fileobj else "a path or a URL"
    raise TypeError(f"expected {kind}, got {type(f).__name__}")


def protocols(fs) -> set:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def is_memory_fs(fs) -> bool:
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(fs, MemoryFileSystem)


def fileobj_name(f) -> str:
    name = getattr(f, "name", None)
    if isinstance(name, (str, bytes, os.PathLike)):
        return fspath(name)
    path = getattr(f, "path", None)  # fsspec file objects
    if isinstance(path, str):
        return path
    return f"<{type(f).__name__}>"


def byte_view(b) -> memoryview:
    mv = b if isinstance(b, memoryview) else memoryview(b)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")  # raises for non-contiguous buffers
    return mv


def storage_error(msg: str, exc: BaseException, *, file, byte_range=None) -> DTDRError:
    if isinstance(exc, DTDRError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"no such file: {exc}", file=file, byte_range=byte_range)
    return StorageError(f"{msg}: {type(exc).__name__}: {exc}", file=file, byte_range=byte_range)


def is_plain_name(name) -> bool:
    """Whether ``name`` (read from a file) is a plain file name: a non-empty
    string naming an entry directly inside a folder, with no separator, no
    ``.``/``..``, no drive or NUL. Names taken from files are joined to a
    folder only after passing this test."""
    if not isinstance(name, str) or not name or name in (".", "..") or len(name) > 255:
        return False
    return not any(c in name for c in ("/", "\\", "\x00", ":")) and name == name.strip()


def join(base: str, name: str) -> str:
    """``name`` inside the folder ``base``: ``base/name`` for a URL, :func:`os.path.join` for a local path."""
    if is_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def known_protocol(url: str, storage_options: dict | None = None) -> bool:
    """Whether fsspec can resolve ``url`` (its protocol is known and its options accepted)."""
    try:
        import fsspec

        fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError):
        return False
    return True


def url_to_fs(path: PathOrURL, storage_options: dict | None = None):
    """``(file system, path inside it)`` for a local path or fsspec URL, for
    code that walks a store with fsspec's file-system interface."""
    import fsspec

    return fsspec.core.url_to_fs(fspath(path), **(storage_options or {}))


def is_local_fs(fs) -> bool:
    """Whether an fsspec file system is the local one."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
