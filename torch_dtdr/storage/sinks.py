"""Sinks: streaming writes that commit atomically, to a local path, any fsspec store or a file object.

:func:`open_sink` picks the :class:`Sink` for a destination (the table in
:mod:`torch_dtdr.storage` says how each commits); :func:`local_temp_path`,
:func:`remove_stale_temps` and :func:`atomic_local_path` serve writers that
need a real local path. Nothing is visible at the destination before commit.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import os
import re
import secrets
import socket
import stat
import sys
import threading

from ..errors import StorageError
from .paths import (byte_view, FileLike, fileobj_name, fspath, is_memory_fs, O_CLOEXEC, protocols, resolve,
                    storage_error, TEMP_SUFFIX)


_DISCARD_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})


_LOCAL_WRITE_BUFFER = 1 << 20
#: A local sink starts the kernel's write-back of what it has written every
#: this many bytes (without waiting for it), and a background fdatasync of it
#: (one at a time), so that the fsync at commit finds little left to write or
#: to flush from the device's cache. On this project's disk the closing fsync
#: of a 98 MB dtdr8 save waited 72 ms with 32 MiB here and 12-30 ms with 8 MiB
#: (the save: 0.205 -> 0.186 s); slower saves (lossless) lost nothing.
WRITEBACK_BYTES = 8 << 20


def _writeback_starter():
    """``start(fd, offset, nbytes)``: begin writing a file range to disk
    without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), or
    None where there is no such call. Best effort: durability comes from the
    fsync at commit, whatever this does."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    sync_file_range_write = 2

    def start(fd: int, offset: int, nbytes: int) -> None:
        call(fd, offset, nbytes, sync_file_range_write)

    return start


_start_writeback = _writeback_starter()


_writev = getattr(os, "writev", None)
try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16


def write_vectored(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` to ``fd`` in order with ``writev``: at most IOV_MAX
    buffers a call, the rest of a partly written one taken up again."""
    i = 0
    while i < len(views):
        group = views[i : i + _IOV_MAX]
        done = _writev(fd, group)
        if done <= 0:
            raise OSError(f"writev wrote {done} of {sum(mv.nbytes for mv in group)} bytes")
        for mv in group:
            if done < mv.nbytes:
                views[i] = mv[done:]
                break
            done -= mv.nbytes
            i += 1


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
        self._check_writable()
        mv = byte_view(b)
        return self._appended(mv.nbytes, self._write, mv)

    def write_all(self, pieces) -> int:
        """Append every bytes-like of ``pieces``, in order; returns the number
        of bytes written. A local file takes them in as few system calls as it
        can (``writev``), without copying them into a buffer first."""
        self._check_writable()
        views = [mv for mv in map(byte_view, pieces) if mv.nbytes]
        return self._appended(sum(mv.nbytes for mv in views), self._write_many, views)

    def _check_writable(self) -> None:
        if self._state != "open":
            raise ValueError(f"write to a {self._state} sink: {self.name}")

    def _appended(self, n: int, write, data) -> int:
        """``write(data)`` for ``n`` bytes (nothing when ``n`` is 0), its failure a StorageError; returns ``n``."""
        if n:
            try:
                write(data)
            except Exception as e:
                raise storage_error("write failed", e, file=self.name) from e
            self._written += n
        return n

    def _write_many(self, views: list[memoryview]) -> None:
        """Subclass hook of :meth:`write_all`: by default one :meth:`_write` each."""
        for mv in views:
            self._write(mv)

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
                raise storage_error("commit failed", e, file=self.name) from e
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
            raise storage_error("abort failed", e, file=self.name) from e

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
        dest_mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        dest_mode = None
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
            if hasattr(os, "fchmod"):
                # a writer may create its file 0600; the result gets what open(dest, "wb")
                # would give it: the replaced file's mode, else 0666 less the umask
                os.fchmod(fh.fileno(), dest_mode if dest_mode is not None else 0o666 & ~current_umask())
        replace_file(tmp, target)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def replace_file(tmp: str, dest: str) -> None:
    """``os.replace(tmp, dest)``, leaving the freeing of the file it replaces to
    a background thread: on this project's ext4 disk, dropping the last link of
    a 340 MB checkpoint took 0.14 s, inside every save that overwrites one. The
    old file gets a second name first (a temp name of this process, so that
    :func:`remove_stale_temps` deletes it should the process die before the
    thread does), the replace drops only its other link, and a non-daemon
    thread (the interpreter waits for it at exit) unlinks the temp name. Where
    that cannot be done (no hard links on the file system, not a regular file)
    it is a plain replace."""
    old = None
    try:
        if stat.S_ISREG(os.lstat(dest).st_mode):
            old = local_temp_path(dest)
            os.link(dest, old, follow_symlinks=False)
    except OSError:
        old = None
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.unlink(old)
        raise
    if old is not None:
        _unlink_later(old)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _unlink_later(path: str) -> None:
    try:
        threading.Thread(target=_unlink_quietly, args=(path,), name="dtdr-unlink-replaced").start()
    except RuntimeError:  # no new threads (interpreter shutdown): now, then
        _unlink_quietly(path)


def current_umask() -> int:
    """The process umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | O_CLOEXEC)
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
        # The file object owns the descriptor from the moment it exists (open() is one C call), so a
        # KeyboardInterrupt between any two lines here closes it exactly once and removes the temp file.
        tmp = f = None
        try:
            for _ in range(64):
                tmp = local_temp_path(path)
                try:
                    f = open(tmp, "xb", buffering=_LOCAL_WRITE_BUFFER)  # O_EXCL, 0o666, close-on-exec
                    break
                except FileExistsError:
                    continue
                except FileNotFoundError as e:
                    raise StorageError("the destination's directory does not exist", file=path) from e
                except OSError as e:
                    raise storage_error("cannot create a temporary file", e, file=path) from e
            else:  # pragma: no cover
                raise StorageError("cannot pick a free temporary file name", file=path)
            remove_stale_temps(d)  # what killed saves into this directory left behind
            if dest_mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), dest_mode)  # replacing a file keeps its permissions
            self._writeback_from = 0  # where the write-back not yet started begins
            self._syncer = None  # a thread flushing what was written so far to the disk
            self._sync_error: OSError | None = None
            self._tmp = tmp
            self._f = f  # from here on, abort() (or __del__ on a sink that is dropped) cleans up
        except BaseException:
            if f is not None:
                f.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise

    def _write(self, mv):
        self._f.write(mv)
        self._written_up_to(self._written + mv.nbytes)

    def _write_many(self, views):
        if _writev is None:
            return super()._write_many(views)
        self._f.flush()
        write_vectored(self._f.fileno(), views)
        self._written_up_to(self._written + sum(mv.nbytes for mv in views))

    def _written_up_to(self, end: int) -> None:
        """Start the write-back of what was written before ``end`` (see :data:`WRITEBACK_BYTES`)."""
        if self._fsync and _start_writeback is not None:
            if end - self._writeback_from >= WRITEBACK_BYTES:
                self._f.flush()
                _start_writeback(self._f.fileno(), self._writeback_from, end - self._writeback_from)
                self._writeback_from = end
                if self._syncer is None or not self._syncer.is_alive():
                    self._syncer = threading.Thread(target=self._sync_written, args=(self._f.fileno(),),
                                                    name="dtdr-fdatasync", daemon=True)
                    self._syncer.start()

    def _sync_written(self, fd: int) -> None:
        """fdatasync on a background thread while the save goes on: on this
        project's (virtual) disk the closing fsync waited 0.3 s for the device
        to flush a 340 MB save that the write-back had already sent it; flushing
        as it goes leaves it the last stretch. An error is kept for the commit:
        Linux reports a write-back error to one fsync of a file description
        only, so the closing fsync would not see it again."""
        try:
            os.fdatasync(fd)
        except OSError as e:
            self._sync_error = e

    def _join_syncer(self):
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None

    def _commit(self):
        self._f.flush()
        self._join_syncer()
        if self._sync_error is not None:
            raise self._sync_error
        if self._fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        replace_file(self._tmp, self._dest)
        self._tmp = None
        if self._fsync:
            _fsync_dir(self._dir)

    def _abort(self):
        try:
            self._join_syncer()
        finally:
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
            raise storage_error("cannot open for writing", e, file=name) from e
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
            raise storage_error("cannot open a temporary object for writing", e, file=name) from e

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
            raise TypeError(f"a sink file object must be writable: {fileobj_name(f)}")
        if isinstance(f, io.TextIOBase):
            raise TypeError(f"a sink file object must be binary, not text: {fileobj_name(f)}")
        super().__init__(fileobj_name(f))
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
    r = resolve(f, storage_options, allow_fileobj=True)
    if r[0] == "local":
        return _LocalSink(r[1], fsync=fsync)
    if r[0] == "fileobj":
        return _FileObjSink(r[1])
    fs, path, name = r[1], r[2], fspath(f)
    if is_memory_fs(fs):
        return _BufferedFsspecSink(fs, path, name)
    if block_size is None and protocols(fs) & _DISCARD_PROTOCOLS and "default_block_size" not in (storage_options or {}):
        block_size = DEFAULT_REMOTE_PART
    open_kwargs = {} if block_size is None else {"block_size": int(block_size)}
    if protocols(fs) & _DISCARD_PROTOCOLS:
        return _DiscardFsspecSink(fs, path, name, open_kwargs)
    return _TempKeyFsspecSink(fs, path, name, open_kwargs)
