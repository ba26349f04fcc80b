"""Sources: random-access, read-only byte ranges from a local file, a file object or any fsspec store.

:func:`open_source` picks the :class:`Source` for a path, URL or file object;
local files are read with ``pread`` (a FIFO or device is refused before it
could block, :func:`check_regular_file`), remote ones by concurrent range
requests. Every source counts the bytes it fetched.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

from ..errors import CheckpointNotFoundError, StorageError
from .paths import (DEFAULT_MAX_WORKERS, DEFAULT_PART_SIZE, DEFAULT_PREFETCH_WINDOW, FileLike, fileobj_name, fspath,
                    is_memory_fs, O_BINARY, O_CLOEXEC, resolve, storage_error)
from .prefetch import MIN_PREFETCH_PART, Prefetch


_MAX_PREAD = 0x7FFFF000  # Linux caps a single read at this many bytes
try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))  # buffers per vectored read
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 1024


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
            raise storage_error("read failed", e, file=self.name, byte_range=(offset, offset + length)) from e
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

    def read_into(self, offset: int, buffers: Sequence, part_size: int | None = None) -> int:
        """Fill the writable byte views ``buffers``, in order, with the bytes
        from ``offset`` on (a scatter read); returns how many bytes were filled,
        fewer only when the range passes the end of the file. Local files read
        straight into the buffers (one vectored read, no intermediate copy);
        other stores read as :meth:`read_ranges` does (``part_size``) and copy."""
        self._check_open()
        total = sum(len(b) for b in buffers)
        data = memoryview(self.read_ranges([(offset, total)], part_size=part_size)[0])
        pos = 0
        for b in buffers:
            n = min(len(b), len(data) - pos)
            if n <= 0:
                break
            b[:n] = data[pos:pos + n]
            pos += n
        return pos

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
        part = min(part, max(MIN_PREFETCH_PART, -(-total // workers)))
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
        raise storage_error("cannot stat", e, file=path) from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointNotFoundError(f"is {_file_kind(st.st_mode)}, not a regular file", file=path)


class _LocalSource(Source):
    def __init__(self, path: str):
        check_regular_file(path)
        try:
            # O_NONBLOCK: should the path have become a FIFO since the check, open does not block
            fd = os.open(path, os.O_RDONLY | O_BINARY | O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError("no such file", file=path) from e
        except IsADirectoryError as e:  # Windows
            raise CheckpointNotFoundError("is a directory, not a regular file", file=path) from e
        except OSError as e:
            raise storage_error("cannot open", e, file=path) from e
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

    def read_into(self, offset, buffers, part_size=None):
        if self._lock is not None or not hasattr(os, "preadv"):
            return super().read_into(offset, buffers, part_size)
        if len(buffers) == 1 and not self.closed and 0 <= offset and offset + len(buffers[0]) <= self.size:
            # one buffer inside the file (a small record's read): one pread, no bookkeeping
            try:
                n = os.preadv(self._fd, buffers, offset)
            except OSError:
                n = -1  # the general path below reports it
            if n == len(buffers[0]):
                self._count(n)
                return n
        self._check_open()
        offset, want = self._clamp(offset, sum(len(b) for b in buffers))
        views, left = [], want
        for b in buffers:
            if left <= 0:
                break
            view = memoryview(b)[:left]
            views.append(view)
            left -= len(view)
        done = first = 0
        try:
            while first < len(views):
                n = os.preadv(self._fd, views[first:first + _IOV_MAX], offset + done)
                if n <= 0:
                    break
                done += n
                while first < len(views) and n >= len(views[first]):
                    n -= len(views[first])
                    first += 1
                if n:
                    views[first] = views[first][n:]
        except OSError as e:
            raise storage_error("read failed", e, file=self.name, byte_range=(offset, offset + want)) from e
        if done != want:
            raise StorageError(f"short read: got {done} of {want} bytes (file changed or store failed?)",
                               file=self.name, byte_range=(offset, offset + want))
        self._count(done)
        return done

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
        name = fileobj_name(f)
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
            raise storage_error("cannot stat", e, file=name) from e
        if info.get("type") == "directory":
            raise CheckpointNotFoundError("is a directory, not a file", file=name)
        size = info.get("size")
        if size is None:
            raise StorageError("the store reports no size for this file", file=name)
        self._concurrent = not is_memory_fs(fs)
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
    r = resolve(f, storage_options, allow_fileobj=True)
    if r[0] == "local":
        src: Source = _LocalSource(r[1])
    elif r[0] == "fileobj":
        src = _FileObjSource(r[1])
    else:
        src = _FsspecSource(r[1], r[2], fspath(f))
    if max_workers is not None:
        src.max_workers = int(max_workers)
    if part_size is not None:
        src.part_size = int(part_size)
    return src
