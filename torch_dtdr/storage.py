"""Byte storage for torch_dtdr: the only module that touches files, URLs and fsspec.

Two primitives cover everything the container needs:

* :func:`open_source` gives a random-access, read-only :class:`Source` over a
  local path, an fsspec URL (``file://``, ``memory://``, ``s3://``, ``gs://``,
  anything fsspec knows) or a seekable binary file object. It reads byte ranges,
  concurrently for remote stores (:meth:`Source.read_ranges`), fetches a whole
  plan of reads ahead in large concurrent parts (:meth:`Source.prefetch`: how a
  remote load overlaps download and decode), and counts the bytes it fetched
  (:attr:`Source.bytes_read`) so callers can prove laziness.

* :func:`open_sink` gives a streaming, write-only :class:`Sink` that commits
  **atomically**: until :meth:`Sink.commit` nothing is visible at the
  destination, and an aborted or failed write leaves the previous file there
  untouched, with no partial object and no pending multipart upload. Used as a
  context manager it commits on normal exit and aborts on an exception.

How a sink commits, by destination:

======================  ==========================================================
local path, ``file://``  temp file ``.<name>.<random>.dtdr-tmp`` in the same
                         directory; flush, fsync, :func:`os.replace`, fsync the
                         directory.
``memory://``            buffered in memory, stored in one step at commit.
``s3://``, ``gs://``     the store's own buffered file object, fed by a
                         background thread so that producing bytes overlaps
                         uploading them: parts go up as they fill (memory stays
                         bounded by about two block sizes) and the object
                         appears only when the upload is completed at commit;
                         abort calls ``discard()``, which aborts the multipart
                         (S3) or resumable (GCS) upload.
other fsspec stores      a temporary key beside the target, moved onto it at
                         commit (opening an arbitrary store's target in ``"wb"``
                         mode may truncate the old file at once, e.g. SFTP).
file object              written straight through; ``commit`` only flushes. No
                         atomicity is possible and ``abort`` cannot undo what was
                         written. The object is never closed by the sink.
======================  ==========================================================

A process killed mid-write can leave a ``*.dtdr-tmp`` file (local) or an
incomplete multipart upload (S3; use a bucket lifecycle rule) behind, never a
partial file at the destination.

Errors are typed: a missing path is a
:class:`~torch_dtdr.errors.CheckpointNotFoundError` (also a
``FileNotFoundError``); a back-end failure is a
:class:`~torch_dtdr.errors.StorageError` (also an ``OSError``).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import io
import os
import posixpath
import re
import secrets
import socket
import stat
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, BinaryIO, Iterable, Sequence, Union

from .errors import CheckpointNotFoundError, DTDRError, StorageError

__all__ = [
    "Source",
    "Prefetch",
    "Sink",
    "open_source",
    "open_sink",
    "exists",
    "isdir",
    "listdir",
    "makedirs",
    "remove",
    "read_bytes",
    "write_bytes_atomic",
    "DEFAULT_MAX_WORKERS",
    "DEFAULT_PART_SIZE",
    "DEFAULT_PREFETCH_WINDOW",
    "TEMP_SUFFIX",
    "is_plain_name",
    "child_inside",
    "check_regular_file",
    "local_temp_path",
    "atomic_local_path",
    "remove_stale_temps",
    "remove_symlink",
    "is_url",
    "known_protocol",
    "open_fsspec_file",
    "read_head",
    "join",
    "url_to_fs",
    "is_local_fs",
    "Location",
]

PathOrURL = Union[str, "os.PathLike[str]"]
FileLike = Union[PathOrURL, BinaryIO]

#: Concurrent range requests issued by :meth:`Source.read_ranges` on remote stores.
DEFAULT_MAX_WORKERS = 16
#: Remote ranges longer than this are split into parts fetched concurrently.
DEFAULT_PART_SIZE = 16 * 2**20
#: Bytes a :meth:`Source.prefetch` may hold or have in flight ahead of the reads it serves.
DEFAULT_PREFETCH_WINDOW = 128 * 2**20
_MIN_PREFETCH_PART = 2**20
#: Suffix of the temporary files a local sink writes before its atomic rename.
TEMP_SUFFIX = ".dtdr-tmp"

# Stores whose fsspec file objects buffer writes, upload parts that stay invisible
# until the upload is completed on close, and implement a real ``discard()``.
_DISCARD_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})

_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MAX_PREAD = 0x7FFFF000  # Linux caps a single read at this many bytes
_LOCAL_WRITE_BUFFER = 1 << 20


# --------------------------------------------------------------------------- resolving


def is_url(s: str) -> bool:
    """Whether ``s`` names an fsspec URL (``scheme://...``) rather than a local path."""
    return "://" in s


def _fspath(f) -> str:
    p = os.fspath(f)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def _resolve(f, storage_options, *, allow_fileobj: bool):
    """Return ("local", path) | ("fsspec", fs, path) | ("fileobj", f)."""
    if isinstance(f, (bytes, bytearray, memoryview)):
        raise TypeError(
            "expected a path, a URL or a binary file object, got bytes; "
            "wrap in-memory data in io.BytesIO"
        )
    if isinstance(f, (str, os.PathLike)):
        s = _fspath(f)
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


def _protocols(fs) -> set:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def _is_memory_fs(fs) -> bool:
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(fs, MemoryFileSystem)


def _fileobj_name(f) -> str:
    name = getattr(f, "name", None)
    if isinstance(name, (str, bytes, os.PathLike)):
        return _fspath(name)
    path = getattr(f, "path", None)  # fsspec file objects
    if isinstance(path, str):
        return path
    return f"<{type(f).__name__}>"


def _byte_view(b) -> memoryview:
    mv = b if isinstance(b, memoryview) else memoryview(b)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")  # raises for non-contiguous buffers
    return mv


def _storage_error(msg: str, exc: BaseException, *, file, byte_range=None) -> DTDRError:
    if isinstance(exc, DTDRError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"no such file: {exc}", file=file, byte_range=byte_range)
    return StorageError(f"{msg}: {type(exc).__name__}: {exc}", file=file, byte_range=byte_range)


# --------------------------------------------------------------------------- sources


class Source:
    """Random-access, read-only bytes of one stored file. Thread-safe.

    ``read(offset, length)`` returns exactly ``length`` bytes, or fewer only when
    the range passes the end of the file (then it returns what exists, ``b""``
    past the end). A store that returns fewer bytes than the file holds raises
    :class:`~torch_dtdr.errors.StorageError`.
    """

    name: str
    size: int

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = int(size)
        self.bytes_read = 0
        self.closed = False
        self.max_workers = DEFAULT_MAX_WORKERS
        self.part_size = DEFAULT_PART_SIZE
        self._count_lock = threading.Lock()
        self._prefetches: list[Prefetch] = []
        self._prefetch_pool: ThreadPoolExecutor | None = None

    # -- subclass hooks -----------------------------------------------------
    def _read_exact(self, offset: int, length: int) -> bytes:  # pragma: no cover
        """Read ``length`` bytes at ``offset``; the range lies inside the file."""
        raise NotImplementedError

    _concurrent = False  # whether read_ranges should use threads

    # -- public API ---------------------------------------------------------
    def _clamp(self, offset, length) -> tuple:
        offset, length = int(offset), int(length)
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: ({offset}, {length})")
        return offset, max(0, min(length, self.size - offset))

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_read += n

    def _checked_read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        try:
            data = self._read_exact(offset, length)
        except Exception as e:
            raise _storage_error("read failed", e, file=self.name, byte_range=(offset, offset + length)) from e
        if len(data) != length:
            raise StorageError(
                f"short read: got {len(data)} of {length} bytes (file changed or store failed?)",
                file=self.name,
                byte_range=(offset, offset + length),
            )
        self._count(length)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)``, cut short only at end of file.

        Served from an active :meth:`prefetch` when one planned the range."""
        self._check_open()
        offset, length = self._clamp(offset, length)
        planned = self._from_prefetch(offset, length)
        return self._checked_read(offset, length) if planned is None else planned

    def _from_prefetch(self, offset: int, length: int):
        for pf in tuple(self._prefetches):
            data = pf._serve(offset, length)
            if data is not None:
                return data
        return None

    def read_ranges(
        self,
        ranges: Iterable[Sequence[int]],
        max_workers: int | None = None,
        part_size: int | None = None,
    ) -> list:
        """Read many ``(offset, length)`` ranges; results come back in order.

        Remote stores issue the requests concurrently on up to ``max_workers``
        threads (default: the source's :attr:`max_workers`), splitting ranges
        longer than ``part_size`` (default: the source's :attr:`part_size`) into
        parts. Local files and file objects are read sequentially. Ranges an
        active :meth:`prefetch` planned are served from it. EOF rules are those
        of :meth:`read`.
        """
        self._check_open()
        clamped = [self._clamp(o, n) for o, n in ranges]
        out: list = [None] * len(clamped)
        if self._prefetches:
            for i, (o, n) in enumerate(clamped):
                out[i] = self._from_prefetch(o, n)
        todo = [i for i, d in enumerate(out) if d is None]
        workers = self.max_workers if max_workers is None else int(max_workers)
        if not self._concurrent or workers <= 1 or not todo:
            for i in todo:
                out[i] = self._checked_read(*clamped[i])
            return out
        part = self.part_size if part_size is None else int(part_size)
        if part <= 0:
            raise ValueError("part_size must be positive")
        parts = []  # (range index, offset, length)
        for i in todo:
            o, n = clamped[i]
            if n == 0:
                parts.append((i, o, 0))
            for p in range(o, o + n, part):
                parts.append((i, p, min(part, o + n - p)))
        if len(parts) == 1:
            i = parts[0][0]
            out[i] = self._checked_read(*clamped[i])
            return out
        pool = ThreadPoolExecutor(max_workers=min(workers, len(parts)), thread_name_prefix="dtdr-read")
        try:
            datas = list(pool.map(lambda p: self._checked_read(p[1], p[2]), parts))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        pieces: dict[int, list] = {i: [] for i in todo}
        for (i, _, _), d in zip(parts, datas):
            pieces[i].append(d)
        for i, ps in pieces.items():
            out[i] = ps[0] if len(ps) == 1 else b"".join(ps)
        return out

    def prefetch(
        self,
        ranges: Iterable[Sequence[int]],
        *,
        max_workers: int | None = None,
        part_size: int | None = None,
        window: int | None = None,
        gap: int = 1 << 16,
    ) -> "Prefetch":
        """Start fetching the ``(offset, length)`` ranges a caller is about to
        read, in that order, and serve those reads from memory.

        On remote stores this is what makes a full load fast: the ranges are
        merged across gaps up to ``gap`` bytes, cut into ``part_size`` parts and
        fetched on ``max_workers`` threads, at most ``window`` bytes ahead of
        what has been served (default :data:`DEFAULT_PREFETCH_WINDOW`), so the caller
        decodes one part while later parts download and memory stays bounded.
        A part is dropped once every planned byte of it has been served; a read
        the plan does not cover (or covers only with dropped parts) goes to the
        store as usual. Local files, memory and file objects gain nothing from
        this and get an inactive plan.

        Use as a context manager; leaving it cancels what is still queued.
        """
        if not self._concurrent:
            return Prefetch(self, [], active=False)
        workers = self.max_workers if max_workers is None else int(max_workers)
        part = self.part_size if part_size is None else int(part_size)
        if workers < 1 or part <= 0:
            raise ValueError("max_workers and part_size must be positive")
        clamped = [r for r in (self._clamp(o, n) for o, n in ranges) if r[1] > 0]
        total = sum(n for _o, n in clamped)
        # small plans (one tensor) still keep every worker busy
        part = min(part, max(_MIN_PREFETCH_PART, -(-total // workers)))
        window_bytes = DEFAULT_PREFETCH_WINDOW if window is None else int(window)
        pf = Prefetch(self, clamped, active=bool(clamped),
                      part_size=part, window=max(1, window_bytes // part), gap=gap)
        if pf.active:
            with self._count_lock:
                if self._prefetch_pool is None:
                    self._prefetch_pool = ThreadPoolExecutor(workers, thread_name_prefix="dtdr-prefetch")
                pf._pool = self._prefetch_pool
                self._prefetches.append(pf)
            pf._start()
        return pf

    def _end_prefetch(self, pf: "Prefetch") -> None:
        with self._count_lock:
            if pf in self._prefetches:
                self._prefetches.remove(pf)

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer if the file is shorter)."""
        return self.read(0, n)

    def tail(self, n: int) -> bytes:
        """The last ``n`` bytes (the whole file if it is shorter)."""
        n = min(int(n), self.size)
        return self.read(self.size - n, n)

    def _check_open(self):
        if self.closed:
            raise ValueError(f"read from a closed source: {self.name}")

    def close(self) -> None:
        self.closed = True
        self._shutdown_prefetch()

    def _shutdown_prefetch(self) -> None:
        for pf in tuple(self._prefetches):
            pf.close()
        pool, self._prefetch_pool = self._prefetch_pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r} size={self.size}>"


class Prefetch:
    """A plan of reads being fetched ahead; see :meth:`Source.prefetch`.

    Thread-safe: the decoding threads of a load read from it concurrently.
    Parts are scheduled in plan order; only parts ahead of every pending read
    count against the window, so a read larger than the window cannot stall.
    """

    def __init__(self, source: Source, ranges, *, active: bool, part_size: int = 1,
                 window: int = 1, gap: int = 0):
        self.source = source
        self.active = active
        self.parts: list[tuple[int, int]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._futures: dict[int, Any] = {}
        self._dropped: set[int] = set()
        self._next = 0
        self._window = window
        if not active:
            return
        spans: list[list[int]] = []
        for o, n in sorted(ranges):
            if spans and o - spans[-1][1] <= gap:
                spans[-1][1] = max(spans[-1][1], o + n)
            else:
                spans.append([o, o + n])
        for s, e in spans:
            self.parts += [(p, min(part_size, e - p)) for p in range(s, e, part_size)]
        self._starts = [p for p, _ in self.parts]
        self._planned = [0] * len(self.parts)
        self._served = [0] * len(self.parts)
        for o, n in ranges:
            for i, lo, hi in self._overlaps(o, n):
                self._planned[i] += hi - lo

    # -- scheduling ----------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            self._fill(-1)

    def _fill(self, demanded: int) -> None:
        """Submit parts in order: up to ``demanded`` unconditionally, then while
        fewer than ``window`` parts are held or in flight."""
        while self._next < len(self.parts) and (self._next <= demanded or len(self._futures) < self._window):
            p, n = self.parts[self._next]
            self._futures[self._next] = self._pool.submit(self.source._checked_read, p, n)
            self._next += 1

    def _overlaps(self, o: int, n: int) -> list[tuple[int, int, int]]:
        i = max(0, bisect.bisect_right(self._starts, o) - 1)
        out = []
        while i < len(self.parts) and self.parts[i][0] < o + n:
            p, m = self.parts[i]
            lo, hi = max(o, p), min(o + n, p + m)
            if lo < hi:
                out.append((i, lo, hi))
            i += 1
        return out

    # -- serving -------------------------------------------------------------
    def _serve(self, offset: int, length: int):
        """The bytes of a read the plan covers, or None (read it directly)."""
        if not self.active or length <= 0 or not self.parts:
            return None
        ov = self._overlaps(offset, length)
        if sum(hi - lo for _i, lo, hi in ov) != length:
            return None
        with self._lock:
            if not self.active or any(i in self._dropped for i, _lo, _hi in ov):
                return None
            self._fill(ov[-1][0])
            futures = [self._futures[i] for i, _lo, _hi in ov]
        pieces = []
        for (i, lo, hi), fut in zip(ov, futures):
            try:
                data = fut.result()
            except CancelledError:  # the plan was closed under this read
                return None
            p = self.parts[i][0]
            pieces.append(memoryview(data)[lo - p: hi - p])
        with self._lock:
            for i, lo, hi in ov:
                self._served[i] += hi - lo
                if self._served[i] >= self._planned[i] and i in self._futures:
                    del self._futures[i]
                    self._dropped.add(i)
            self._fill(-1)
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    @property
    def held(self) -> int:
        """Parts fetched or in flight and not yet dropped (for tests and tuning)."""
        with self._lock:
            return len(self._futures)

    def close(self) -> None:
        """Stop: cancel queued parts, drop what is held; later reads go direct."""
        with self._lock:
            self.active = False
            futures, self._futures = self._futures, {}
        for fut in futures.values():
            fut.cancel()
        self.source._end_prefetch(self)

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


def check_regular_file(path: str) -> None:
    """Raise CheckpointNotFoundError unless ``path`` (symlinks followed) is a
    regular file: a directory, FIFO, socket or device is refused at once,
    before anything opens it (opening a FIFO blocks until a writer comes)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("no such file", file=path) from e
    except OSError as e:
        raise _storage_error("cannot stat", e, file=path) from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointNotFoundError(f"is {_file_kind(st.st_mode)}, not a regular file", file=path)


class _LocalSource(Source):
    def __init__(self, path: str):
        check_regular_file(path)
        try:
            # O_NONBLOCK: should the path have become a FIFO since the check, open does not block
            fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError("no such file", file=path) from e
        except IsADirectoryError as e:  # Windows
            raise CheckpointNotFoundError("is a directory, not a regular file", file=path) from e
        except OSError as e:
            raise _storage_error("cannot open", e, file=path) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointNotFoundError(f"is {_file_kind(st.st_mode)}, not a regular file", file=path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._lock = None if hasattr(os, "pread") else threading.Lock()
        super().__init__(path, st.st_size)

    def _read_exact(self, offset, length):
        if self._lock is not None:  # no pread (Windows): seek + read under a lock
            with self._lock:
                os.lseek(self._fd, offset, os.SEEK_SET)
                first = os.read(self._fd, min(length, _MAX_PREAD))
        else:
            first = os.pread(self._fd, min(length, _MAX_PREAD), offset)
        if len(first) == length or not first:
            return first
        chunks, got = [first], len(first)
        while got < length:
            if self._lock is not None:
                with self._lock:
                    os.lseek(self._fd, offset + got, os.SEEK_SET)
                    b = os.read(self._fd, min(length - got, _MAX_PREAD))
            else:
                b = os.pread(self._fd, min(length - got, _MAX_PREAD), offset + got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def close(self):
        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _FileObjSource(Source):
    def __init__(self, f):
        name = _fileobj_name(f)
        seekable = getattr(f, "seekable", None)
        if not callable(getattr(f, "read", None)) or (callable(seekable) and not seekable()):
            raise TypeError(f"a source file object must be readable and seekable: {name}")
        if isinstance(f, io.TextIOBase):
            raise TypeError(f"a source file object must be binary, not text: {name}")
        self._f = f
        self._lock = threading.Lock()
        with self._lock:
            size = f.seek(0, os.SEEK_END)
            if size is None:  # some file objects return None from seek
                size = f.tell()
        super().__init__(name, size)

    def _read_exact(self, offset, length):
        with self._lock:
            self._f.seek(offset)
            first = self._f.read(length)
            if first is None:
                raise StorageError("non-blocking file object returned no data", file=self.name)
            if len(first) == length or not first:
                return bytes(first)
            chunks, got = [first], len(first)
            while got < length:
                b = self._f.read(length - got)
                if not b:
                    break
                chunks.append(b)
                got += len(b)
            return b"".join(chunks)

    def close(self):
        self.closed = True  # the caller owns the file object


class _FsspecSource(Source):
    def __init__(self, fs, path: str, name: str):
        self._fs = fs
        self._path = path
        try:
            fs.invalidate_cache(path)  # a stale listing must not fake the size
        except Exception:
            pass
        try:
            info = fs.info(path)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError("no such file", file=name) from e
        except Exception as e:
            raise _storage_error("cannot stat", e, file=name) from e
        if info.get("type") == "directory":
            raise CheckpointNotFoundError("is a directory, not a file", file=name)
        size = info.get("size")
        if size is None:
            raise StorageError("the store reports no size for this file", file=name)
        self._concurrent = not _is_memory_fs(fs)
        super().__init__(name, size)

    def _read_exact(self, offset, length):
        # keywords: s3fs takes a positional third argument as the VersionId
        return self._fs.cat_file(self._path, start=offset, end=offset + length)


def open_source(f: FileLike, storage_options: dict | None = None, *, max_workers: int | None = None,
                part_size: int | None = None) -> Source:
    """Open ``f`` for random-access reading.

    ``f`` is a local path (``str`` or ``os.PathLike``), an fsspec URL or a
    readable, seekable binary file object (which stays open after ``close``).
    ``storage_options`` go to the fsspec filesystem of a URL. ``max_workers``
    (default :data:`DEFAULT_MAX_WORKERS`) bounds the concurrent range requests
    to a remote store and ``part_size`` (default :data:`DEFAULT_PART_SIZE`) the
    size of each; both are ignored for local files.

    Raises :class:`~torch_dtdr.errors.CheckpointNotFoundError` when the path
    names no file.
    """
    if max_workers is not None and int(max_workers) < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    if part_size is not None and int(part_size) < 1:
        raise ValueError(f"part_size must be positive, got {part_size}")
    r = _resolve(f, storage_options, allow_fileobj=True)
    if r[0] == "local":
        src: Source = _LocalSource(r[1])
    elif r[0] == "fileobj":
        src = _FileObjSource(r[1])
    else:
        src = _FsspecSource(r[1], r[2], _fspath(f))
    if max_workers is not None:
        src.max_workers = int(max_workers)
    if part_size is not None:
        src.part_size = int(part_size)
    return src


# --------------------------------------------------------------------------- sinks


class Sink:
    """A write-only destination that appears at its path only on :meth:`commit`.

    Use as a context manager: it commits on normal exit and aborts when an
    exception escapes. A sink dropped without either is aborted, never committed.
    """

    name: str

    def __init__(self, name: str):
        self.name = name
        self._written = 0
        self._state = "open"  # -> "committed" | "aborted"

    # -- subclass hooks -----------------------------------------------------
    def _write(self, mv: memoryview) -> None:  # pragma: no cover
        raise NotImplementedError

    def _commit(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def _abort(self) -> None:  # pragma: no cover
        raise NotImplementedError

    # -- public API ---------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._state != "open"

    @property
    def committed(self) -> bool:
        return self._state == "committed"

    def write(self, b) -> int:
        """Append the bytes-like ``b``; returns the number of bytes written."""
        if self._state != "open":
            raise ValueError(f"write to a {self._state} sink: {self.name}")
        mv = _byte_view(b)
        n = mv.nbytes
        if n:
            try:
                self._write(mv)
            except Exception as e:
                raise _storage_error("write failed", e, file=self.name) from e
            self._written += n
        return n

    def tell(self) -> int:
        """Bytes written so far."""
        return self._written

    def commit(self) -> None:
        """Make the written bytes visible at the destination, atomically.

        On failure the sink is aborted and :class:`StorageError` raised; the
        previous file at the destination, if any, is left as it was.
        """
        if self._state == "committed":
            return
        if self._state == "aborted":
            raise StorageError("cannot commit an aborted sink", file=self.name)
        try:
            self._commit()
        except BaseException as e:
            self._state = "aborted"
            try:
                self._abort()
            except Exception:
                pass
            if isinstance(e, Exception):
                raise _storage_error("commit failed", e, file=self.name) from e
            raise
        self._state = "committed"

    def abort(self) -> None:
        """Throw the written bytes away; the destination is left untouched.

        A no-op after :meth:`commit` or a previous abort.
        """
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._abort()
        except Exception as e:
            raise _storage_error("abort failed", e, file=self.name) from e

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            try:
                self.abort()
            except Exception:
                pass  # never mask the original exception

    def __del__(self):
        # Never commit implicitly (fsspec's buffered files would on garbage
        # collection): an unfinished sink is thrown away.
        try:
            if getattr(self, "_state", None) == "open":
                self.abort()
        except Exception:
            pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r} {self._state} written={self._written}>"


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:64] or "host"


_TEMP_RE = re.compile(r"\..+\.[0-9a-f]{12}\.(\d{1,10})@([A-Za-z0-9_-]{1,64})" + re.escape(TEMP_SUFFIX))


def local_temp_path(dest: str) -> str:
    """A fresh temporary path beside ``dest``: ``.<name>.<random>.<pid>@<host>.dtdr-tmp``.
    The writer's pid and host in the name let a later save tell a temp file
    left by a killed writer from one a live writer is still filling."""
    d, base = os.path.split(dest)
    return os.path.join(d, f".{base}.{secrets.token_hex(6)}.{os.getpid()}@{_host_tag()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_local_path(dest: str):
    """A temporary path beside the local file ``dest`` for a writer that needs a
    real path (safetensors' ``save_file``, say): the body writes it, and on a
    clean exit it is fsynced and renamed over ``dest`` (then the folder is
    fsynced); on an exception it is removed and ``dest`` is untouched. Stale
    temp files of dead writers in the folder are removed first. A missing
    folder is a :class:`~torch_dtdr.errors.StorageError`."""
    target = os.path.abspath(dest)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise StorageError("the destination's directory does not exist", file=dest)
    tmp = local_temp_path(target)
    remove_stale_temps(folder)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can reason about: keep its file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(directory: str) -> list[str]:
    """Delete the temp files in ``directory`` whose writer is no longer running:
    written on this host (by name) by a pid that does not exist. A live writer's
    file, one from another host (a shared file system) and temp files of older
    versions (no pid in the name) are left alone. Best effort; returns the
    removed paths."""
    removed = []
    host, me = _host_tag(), os.getpid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.fullmatch(entry.name)
        if m is None or m.group(2) != host or int(m.group(1)) == me or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            pass
    return removed


def _fsync_dir(d: str) -> None:
    if os.name == "nt":
        return
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse to fsync a directory
    finally:
        os.close(fd)


class _LocalSink(Sink):
    def __init__(self, path: str, fsync: bool = True):
        # write through symlinks, as open(path, "wb") would
        path = os.path.realpath(path)
        super().__init__(path)
        self._fsync = fsync
        self._dest = path
        d, base = os.path.split(path)
        self._dir = d
        if os.path.isdir(path):
            raise StorageError("destination is a directory", file=path)
        try:
            dest_mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            dest_mode = None
        for _ in range(64):
            tmp = local_temp_path(path)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_CLOEXEC, 0o666)
                break
            except FileExistsError:
                continue
            except FileNotFoundError as e:
                raise StorageError("the destination's directory does not exist", file=path) from e
            except OSError as e:
                raise _storage_error("cannot create a temporary file", e, file=path) from e
        else:  # pragma: no cover
            raise StorageError("cannot pick a free temporary file name", file=path)
        self._tmp = tmp
        remove_stale_temps(d)  # what killed saves into this directory left behind
        try:
            if dest_mode is not None and hasattr(os, "fchmod"):
                os.fchmod(fd, dest_mode)  # replacing a file keeps its permissions
            self._f = os.fdopen(fd, "wb", buffering=_LOCAL_WRITE_BUFFER)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise

    def _write(self, mv):
        self._f.write(mv)

    def _commit(self):
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._dest)
        self._tmp = None
        if self._fsync:
            _fsync_dir(self._dir)

    def _abort(self):
        try:
            self._f.close()
        except Exception:
            pass
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None


class _BufferedFsspecSink(Sink):
    """Buffers in memory and stores the object in one call at commit (memory://)."""

    def __init__(self, fs, path, name):
        super().__init__(name)
        self._fs, self._path = fs, path
        self._buf = io.BytesIO()

    def _write(self, mv):
        self._buf.write(mv)

    def _commit(self):
        data = self._buf.getvalue()
        self._buf = None
        self._fs.pipe_file(self._path, data)

    def _abort(self):
        self._buf = None


def _real_discard(fobj) -> bool:
    from fsspec.spec import AbstractBufferedFile

    d = getattr(type(fobj), "discard", None)
    return callable(d) and d is not AbstractBufferedFile.discard


def _drop_file(fobj) -> None:
    """Abort an fsspec write-mode file without committing it."""
    try:
        if _real_discard(fobj):
            fobj.discard()
    finally:
        # AbstractBufferedFile.close()/__del__ would upload what is buffered
        try:
            fobj.closed = True
        except Exception:
            pass


class _Uploader:
    """Feeds a write-mode fsspec file from a background thread, so that the
    caller produces the next bytes while the store uploads the last ones.

    Bytes are handed over in pieces of ``piece`` bytes; at most ``limit`` bytes
    wait between the caller and the thread (the memory this adds). A failed
    upload is raised by the next :meth:`write` or by :meth:`finish`.
    """

    def __init__(self, fobj, *, limit: int, piece: int = 1 << 20):
        self._fobj = fobj
        self._limit = max(int(limit), piece)
        self._piece = piece
        self._buf = bytearray()
        self._cv = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dtdr-upload", daemon=True)
        self._thread.start()

    def write(self, mv) -> None:
        self._buf += mv
        if len(self._buf) >= self._piece:
            self._hand_over()

    def _hand_over(self) -> None:
        data, self._buf = self._buf, bytearray()
        with self._cv:
            while self._error is None and self._pending and self._pending_bytes + len(data) > self._limit:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return
                data = self._pending[0]
            try:
                self._fobj.write(data)
            except BaseException as e:
                with self._cv:
                    self._error = e
                    self._pending.clear()
                    self._pending_bytes = 0
                    self._cv.notify_all()
                return
            with self._cv:
                if self._pending and self._pending[0] is data:  # (cancel() may have dropped it)
                    self._pending.popleft()
                    self._pending_bytes -= len(data)
                self._cv.notify_all()

    def finish(self) -> None:
        """Wait until every byte written so far is in the file object."""
        if self._buf:
            self._hand_over()
        self._stop(drop=False)
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Drop what waits and stop the thread (after its current write)."""
        self._buf = bytearray()
        self._stop(drop=True)

    def _stop(self, drop: bool) -> None:
        with self._cv:
            if drop:
                self._pending.clear()
                self._pending_bytes = 0
            self._closing = True
            self._cv.notify_all()
        self._thread.join()


class _DiscardFsspecSink(Sink):
    """Streams to the store's buffered file object, from a background thread;
    ``discard()`` aborts (S3, GCS)."""

    def __init__(self, fs, path, name, open_kwargs):
        super().__init__(name)
        self._fs, self._path = fs, path
        try:
            self._fobj = fs.open(path, "wb", **open_kwargs)
        except Exception as e:
            raise _storage_error("cannot open for writing", e, file=name) from e
        self._uploader = _Uploader(self._fobj, limit=getattr(self._fobj, "blocksize", DEFAULT_REMOTE_PART))

    def _write(self, mv):
        self._uploader.write(mv)

    def _commit(self):
        self._uploader.finish()
        self._fobj.close()  # completes the multipart / resumable upload

    def _abort(self):
        self._uploader.cancel()
        _drop_file(self._fobj)


class _TempKeyFsspecSink(Sink):
    """Writes a temporary key beside the target and moves it there at commit."""

    def __init__(self, fs, path, name, open_kwargs):
        super().__init__(name)
        self._fs, self._path = fs, path
        parent = fs._parent(path)
        base = path.rstrip("/").rsplit("/", 1)[-1]
        tmp = f".{base}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        self._tmp = f"{parent.rstrip('/')}/{tmp}" if parent else tmp
        try:
            self._fobj = fs.open(self._tmp, "wb", **open_kwargs)
        except Exception as e:
            raise _storage_error("cannot open a temporary object for writing", e, file=name) from e

    def _write(self, mv):
        self._fobj.write(mv)

    def _commit(self):
        self._fobj.close()
        self._fs.mv(self._tmp, self._path)

    def _abort(self):
        try:
            _drop_file(self._fobj)
        finally:
            try:
                self._fs.rm_file(self._tmp)
            except FileNotFoundError:
                pass
            except Exception:
                if self._fs.exists(self._tmp):
                    raise


class _FileObjSink(Sink):
    """Writes straight through to a caller's file object: not atomic."""

    def __init__(self, f):
        if not callable(getattr(f, "write", None)):
            raise TypeError(f"a sink file object must be writable: {_fileobj_name(f)}")
        if isinstance(f, io.TextIOBase):
            raise TypeError(f"a sink file object must be binary, not text: {_fileobj_name(f)}")
        super().__init__(_fileobj_name(f))
        self._f = f

    def _write(self, mv):
        n = self._f.write(mv)
        if n is not None and n != mv.nbytes:  # raw files may write partially
            rest = mv[n:]
            while rest.nbytes:
                k = self._f.write(rest)
                if not k:
                    raise StorageError("file object accepted no bytes", file=self.name)
                rest = rest[k:]

    def _commit(self):
        flush = getattr(self._f, "flush", None)
        if callable(flush):
            flush()

    def _abort(self):
        pass  # written bytes cannot be taken back


#: Upload part size for S3 / GCS writes unless the caller sets one: the
#: back-ends hold about 3 parts in memory (s3fs's own default is 50 MiB), and
#: 16 MiB parts still allow 160 GB objects within S3's 10,000 parts.
DEFAULT_REMOTE_PART = 16 << 20


def open_sink(
    f: FileLike,
    storage_options: dict | None = None,
    *,
    block_size: int | None = None,
    fsync: bool = True,
) -> Sink:
    """Open ``f`` for an atomic, streaming write (see the module docs).

    ``block_size`` sets the upload part size of remote stores (it bounds the
    memory a remote write holds; S3 needs at least 5 MiB). ``fsync=False`` skips
    the fsyncs of a local write (faster, not durable across a power loss).
    """
    r = _resolve(f, storage_options, allow_fileobj=True)
    if r[0] == "local":
        return _LocalSink(r[1], fsync=fsync)
    if r[0] == "fileobj":
        return _FileObjSink(r[1])
    fs, path, name = r[1], r[2], _fspath(f)
    if _is_memory_fs(fs):
        return _BufferedFsspecSink(fs, path, name)
    if block_size is None and _protocols(fs) & _DISCARD_PROTOCOLS and "default_block_size" not in (storage_options or {}):
        block_size = DEFAULT_REMOTE_PART
    open_kwargs = {} if block_size is None else {"block_size": int(block_size)}
    if _protocols(fs) & _DISCARD_PROTOCOLS:
        return _DiscardFsspecSink(fs, path, name, open_kwargs)
    return _TempKeyFsspecSink(fs, path, name, open_kwargs)


# --------------------------------------------------------------------------- helpers


def _uncached(fs, path: str) -> None:
    """Drop fsspec's listing cache for ``path``: another process may have changed it."""
    try:
        fs.invalidate_cache(path)
    except Exception:
        pass


def exists(f: PathOrURL, storage_options: dict | None = None) -> bool:
    """Whether the path or URL names an existing file or directory."""
    r = _resolve(f, storage_options, allow_fileobj=False)
    if r[0] == "local":
        return os.path.exists(r[1])
    fs, path = r[1], r[2]
    _uncached(fs, path)
    try:
        return bool(fs.exists(path))
    except Exception as e:
        raise _storage_error("exists failed", e, file=_fspath(f)) from e


def isdir(f: PathOrURL, storage_options: dict | None = None) -> bool:
    """Whether the path or URL names a directory (a prefix with objects under it,
    on object stores). A store that fails to answer counts as "no"."""
    r = _resolve(f, storage_options, allow_fileobj=False)
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
    r = _resolve(f, storage_options, allow_fileobj=False)
    try:
        if r[0] == "local":
            return sorted(os.listdir(r[1]))
        fs, path = r[1], r[2]
        _uncached(fs, path)
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})


def makedirs(f: PathOrURL, storage_options: dict | None = None) -> None:
    """Create a directory and its parents (object stores need none: the first
    write creates the prefix)."""
    r = _resolve(f, storage_options, allow_fileobj=False)
    if r[0] == "local":
        os.makedirs(r[1], exist_ok=True)
        return
    try:
        r[1].makedirs(r[2], exist_ok=True)
    except Exception:
        pass


def remove(f: PathOrURL, storage_options: dict | None = None, *, missing_ok: bool = False) -> None:
    """Delete one file. A missing file raises CheckpointNotFoundError unless ``missing_ok``."""
    r = _resolve(f, storage_options, allow_fileobj=False)
    name = _fspath(f)
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
        raise _storage_error("remove failed", e, file=name) from e


def is_plain_name(name) -> bool:
    """Whether ``name`` (read from a file) is a plain file name: a non-empty
    string naming an entry directly inside a folder, with no separator, no
    ``.``/``..``, no drive or NUL. Names taken from files are joined to a
    folder only after passing this test."""
    if not isinstance(name, str) or not name or name in (".", "..") or len(name) > 255:
        return False
    return not any(c in name for c in ("/", "\\", "\x00", ":")) and name == name.strip()


def child_inside(folder: PathOrURL, name: str, storage_options: dict | None = None, *,
                 also_under: Sequence[str] = ()) -> bool:
    """Whether ``folder``/``name`` stays inside ``folder`` once symlinks are
    resolved (local paths; or inside one of the folders ``also_under``, relative
    to ``folder``). Object stores have no symlinks: a plain name stays inside."""
    if not is_plain_name(name):
        return False
    r = _resolve(folder, storage_options, allow_fileobj=False)
    if r[0] != "local":
        return True
    base = os.path.realpath(r[1])
    target = os.path.realpath(os.path.join(base, name))
    roots = [base] + [os.path.realpath(os.path.join(base, extra)) for extra in also_under]
    return any(os.path.commonpath([root, target]) == root and target != root for root in roots)


def remove_symlink(f: PathOrURL, storage_options: dict | None = None) -> bool:
    """Delete ``f`` if it is a local symbolic link (not its target); True when one was removed.
    Object stores have no links."""
    r = _resolve(f, storage_options, allow_fileobj=False)
    if r[0] != "local" or not os.path.islink(r[1]):
        return False
    try:
        os.unlink(r[1])
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _storage_error("cannot remove a symlink", e, file=_fspath(f)) from e
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


def open_fsspec_file(url: str, storage_options: dict | None = None) -> BinaryIO:
    """A binary file object reading ``url`` through fsspec (for readers that need one, such as torch.load)."""
    import fsspec

    return fsspec.open(url, "rb", **(storage_options or {})).open()


def read_head(path: PathOrURL, n: int) -> bytes:
    """The first ``n`` bytes of a local file (fewer when it is shorter)."""
    with open(_fspath(path), "rb") as fh:
        return fh.read(n)


def url_to_fs(path: PathOrURL, storage_options: dict | None = None):
    """``(file system, path inside it)`` for a local path or fsspec URL, for
    code that walks a store with fsspec's file-system interface."""
    import fsspec

    return fsspec.core.url_to_fs(_fspath(path), **(storage_options or {}))


def is_local_fs(fs) -> bool:
    """Whether an fsspec file system is the local one."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


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

    def cat(self, path: str) -> bytes:
        """All bytes of ``path`` (inside :attr:`fs`)."""
        return self.fs.cat_file(path)

    def makedirs(self) -> None:
        """Create the folder (and its parents)."""
        self.fs.makedirs(self.path, exist_ok=True)
