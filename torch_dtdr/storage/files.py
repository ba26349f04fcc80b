"""Whole-file and folder helpers over any store: exists, listing, removal, small reads and atomic writes.

:func:`exists`, :func:`isdir`, :func:`listdir`, :func:`makedirs`,
:func:`remove`, :func:`child_inside` and :func:`remove_symlink` for folders;
:func:`read_bytes`, :func:`read_head`, :func:`write_bytes_atomic` and
:func:`open_fsspec_file` for files; :class:`Location` for code that walks a
folder of any store (conversion). Built on the sources and sinks.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, BinaryIO, Sequence

from ..errors import CheckpointNotFoundError
from .paths import FileLike, fspath, is_plain_name, PathOrURL, resolve, storage_error
from .sinks import open_sink
from .sources import open_source


def _uncached(fs, path: str) -> None:
    """Drop fsspec's listing cache for ``path``: another process may have changed it."""
    try:
        fs.invalidate_cache(path)
    except Exception:
        pass


def exists(f: PathOrURL, storage_options: dict | None = None) -> bool:
    """Whether the path or URL names an existing file or directory."""
    r = resolve(f, storage_options, allow_fileobj=False)
    if r[0] == "local":
        return os.path.exists(r[1])
    fs, path = r[1], r[2]
    _uncached(fs, path)
    try:
        return bool(fs.exists(path))
    except Exception as e:
        raise storage_error("exists failed", e, file=fspath(f)) from e


def isdir(f: PathOrURL, storage_options: dict | None = None) -> bool:
    """Whether the path or URL names a directory (a prefix with objects under it,
    on object stores). A store that fails to answer counts as "no"."""
    r = resolve(f, storage_options, allow_fileobj=False)
    if r[0] == "local":
        return os.path.isdir(r[1])
    fs, path = r[1], r[2]
    _uncached(fs, path)
    try:
        return bool(fs.isdir(path))
    except Exception:
        return False


def listdir(f: PathOrURL, storage_options: dict | None = None) -> list[str]:
    """Sorted names of the entries directly in a directory ([] when it does not exist)."""
    r = resolve(f, storage_options, allow_fileobj=False)
    try:
        if r[0] == "local":
            return sorted(os.listdir(r[1]))
        fs, path = r[1], r[2]
        _uncached(fs, path)
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})


def total_size(f: PathOrURL, storage_options: dict | None = None) -> int:
    """The size in bytes of a file, or of every file directly in a folder (a DCP checkpoint);
    a missing path is a :class:`~torch_dtdr.errors.CheckpointNotFoundError`."""
    r = resolve(f, storage_options, allow_fileobj=False)
    try:
        if r[0] == "local":
            if os.path.isdir(r[1]):
                return sum(e.stat().st_size for e in os.scandir(r[1]) if e.is_file())
            return os.stat(r[1]).st_size
        fs, path = r[1], r[2]
        _uncached(fs, path)
        if fs.isdir(path):
            return sum(int(e.get("size") or 0) for e in fs.ls(path, detail=True) if e.get("type") == "file")
        return int(fs.size(path))
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("no such file or folder", file=fspath(f)) from e
    except Exception as e:
        raise storage_error("cannot read the size", e, file=fspath(f)) from e


def makedirs(f: PathOrURL, storage_options: dict | None = None) -> None:
    """Create a directory and its parents (object stores need none: the first
    write creates the prefix)."""
    r = resolve(f, storage_options, allow_fileobj=False)
    if r[0] == "local":
        os.makedirs(r[1], exist_ok=True)
        return
    try:
        r[1].makedirs(r[2], exist_ok=True)
    except Exception:
        pass


def remove(f: PathOrURL, storage_options: dict | None = None, *, missing_ok: bool = False) -> None:
    """Delete one file. A missing file raises CheckpointNotFoundError unless ``missing_ok``."""
    r = resolve(f, storage_options, allow_fileobj=False)
    name = fspath(f)
    try:
        if r[0] == "local":
            os.unlink(r[1])
        else:
            fs, path = r[1], r[2]
            fs.invalidate_cache(path)
            if not fs.isfile(path):
                raise FileNotFoundError(path)
            fs.rm_file(path)
    except FileNotFoundError as e:
        if not missing_ok:
            raise CheckpointNotFoundError("no such file", file=name) from e
    except Exception as e:
        raise storage_error("remove failed", e, file=name) from e


def child_inside(folder: PathOrURL, name: str, storage_options: dict | None = None, *,
                 also_under: Sequence[str] = ()) -> bool:
    """Whether ``folder``/``name`` stays inside ``folder`` once symlinks are
    resolved (local paths; or inside one of the folders ``also_under``, relative
    to ``folder``). Object stores have no symlinks: a plain name stays inside."""
    if not is_plain_name(name):
        return False
    r = resolve(folder, storage_options, allow_fileobj=False)
    if r[0] != "local":
        return True
    base = os.path.realpath(r[1])
    target = os.path.realpath(os.path.join(base, name))
    roots = [base] + [os.path.realpath(os.path.join(base, extra)) for extra in also_under]
    return any(os.path.commonpath([root, target]) == root and target != root for root in roots)


def remove_symlink(f: PathOrURL, storage_options: dict | None = None) -> bool:
    """Delete ``f`` if it is a local symbolic link (not its target); True when one was removed.
    Object stores have no links."""
    r = resolve(f, storage_options, allow_fileobj=False)
    if r[0] != "local" or not os.path.islink(r[1]):
        return False
    try:
        os.unlink(r[1])
    except FileNotFoundError:
        return False
    except OSError as e:
        raise storage_error("cannot remove a symlink", e, file=fspath(f)) from e
    return True


def read_bytes(f: FileLike, storage_options: dict | None = None) -> bytes:
    """The whole content of ``f``."""
    with open_source(f, storage_options) as src:
        return src.read(0, src.size)


def write_bytes_atomic(f: FileLike, data, storage_options: dict | None = None, **sink_kwargs: Any) -> int:
    """Write ``data`` to ``f`` atomically; returns the number of bytes written."""
    with open_sink(f, storage_options, **sink_kwargs) as sink:
        sink.write(data)
    return sink.tell()


def open_fsspec_file(url: str, storage_options: dict | None = None) -> BinaryIO:
    """A binary file object reading ``url`` through fsspec (for readers that need one, such as torch.load)."""
    import fsspec

    return fsspec.open(url, "rb", **(storage_options or {})).open()


def read_head(path: PathOrURL, n: int) -> bytes:
    """The first ``n`` bytes of a local file (fewer when it is shorter)."""
    with open(fspath(path), "rb") as fh:
        return fh.read(n)


class Location:
    """A path or URL resolved to an fsspec file system (local paths included), for
    readers that walk folders and files of any store (:mod:`torch_dtdr.convert`)."""

    def __init__(self, target, storage_options):
        import fsspec

        s = os.fsdecode(os.fspath(target))
        self.target = s
        self.storage_options = storage_options
        if "://" in s:
            self.fs, self.path = fsspec.core.url_to_fs(s, **(storage_options or {}))
        else:
            from fsspec.implementations.local import LocalFileSystem

            self.fs, self.path = LocalFileSystem(), os.path.abspath(s)
        from fsspec.implementations.local import LocalFileSystem

        self.local = isinstance(self.fs, LocalFileSystem)
        self._url_prefix = s[: s.index("://") + 3] if "://" in s and not self.local else ""

    def join(self, name: str) -> str:
        """A child's path or URL, in the form the rest of the package accepts."""
        if self.local:
            return os.path.join(self.path, name)
        return self.target.rstrip("/") + "/" + name

    def child_path(self, name: str) -> str:
        """A child's path inside :attr:`fs`."""
        return os.path.join(self.path, name) if self.local else posixpath.join(self.path, name)

    def isdir(self) -> bool:
        """Whether the location is a folder."""
        return self.fs.isdir(self.path)

    def exists(self) -> bool:
        """Whether something is at the location."""
        return self.fs.exists(self.path)

    def listdir(self) -> list[str]:
        """Names in the folder, sorted."""
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False))

    def head(self, path: str, n: int) -> bytes:
        """The first ``n`` bytes of ``path`` (inside :attr:`fs`)."""
        with self.fs.open(path, "rb") as fh:
            return fh.read(n)

    def open_read(self, path: str) -> BinaryIO:
        """A binary file object reading ``path`` (inside :attr:`fs`); use it in a ``with``."""
        return open(path, "rb") if self.local else self.fs.open(path, "rb")

    def cat(self, path: str) -> bytes:
        """All bytes of ``path`` (inside :attr:`fs`)."""
        return self.fs.cat_file(path)

    def makedirs(self) -> None:
        """Create the folder (and its parents)."""
        self.fs.makedirs(self.path, exist_ok=True)
