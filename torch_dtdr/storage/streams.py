"""Streams and small text files: reading as a file object, text in and out, appending, editing in place.

:func:`open_read` gives a binary file object over a local path or fsspec URL,
for readers that stream (hashing, sniffing a header, unpickling);
:func:`read_text` and :func:`write_text_atomic` move small text files (JSON,
CSV, Markdown) whole, the write committing atomically through a sink;
:func:`open_text_append` streams rows onto the end of a local file;
:func:`map_for_update` and :func:`patch_bytes` change bytes of a local file in
place (fault injection and its undo), without copying the file. Failures of
the back end become :class:`~torch_dtdr.errors.StorageError` (a missing file
:class:`~torch_dtdr.errors.CheckpointNotFoundError`), naming the file.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, BinaryIO, Iterable, Iterator, TextIO

from .paths import fspath, PathOrURL, resolve, storage_error
from .sinks import open_sink
from .sources import open_source


@contextlib.contextmanager
def open_read(f: PathOrURL, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """A read-only binary file object over a local path or fsspec URL, closed on exit.

    Only opening is translated into storage errors; what the caller raises
    while reading passes through unchanged.
    """
    r = resolve(f, storage_options, allow_fileobj=False)
    try:
        fh = open(r[1], "rb") if r[0] == "local" else r[1].open(r[2], "rb")
    except Exception as e:
        raise storage_error("cannot open for reading", e, file=fspath(f)) from e
    with fh:
        yield fh


def read_text(f: PathOrURL, storage_options: dict | None = None, *, encoding: str = "utf-8") -> str:
    """The whole content of a text file, decoded (newlines kept as stored)."""
    with open_source(f, storage_options) as src:
        data = src.read(0, src.size)
    return data.decode(encoding)


def write_text_atomic(f: PathOrURL, text: str, storage_options: dict | None = None, *,
                      encoding: str = "utf-8", **sink_kwargs: Any) -> int:
    """Write ``text`` to ``f`` atomically (nothing partial is ever visible); returns the bytes written."""
    with open_sink(f, storage_options, **sink_kwargs) as sink:
        sink.write(text.encode(encoding))
    return sink.tell()


@contextlib.contextmanager
def open_text_append(path: PathOrURL, *, encoding: str = "utf-8", newline: str | None = "") -> Iterator[TextIO]:
    """A local text file opened for appending (created when missing), closed on exit.

    Appends are not atomic: a process killed mid-write can leave a partial last
    line, which readers of such logs must drop (as :func:`torch_dtdr.sweep.read_csv` does).
    """
    name = fspath(path)
    try:
        fh = open(name, "a", encoding=encoding, newline=newline)
    except OSError as e:
        raise storage_error("cannot open for appending", e, file=name) from e
    with fh:
        yield fh


@contextlib.contextmanager
def map_for_update(path: PathOrURL):
    """A writable numpy ``uint8`` memory map of a whole local file, flushed on a normal exit.

    For in-place edits of many scattered bytes: assignments touch only the
    pages they change, with no system call per run.
    """
    import numpy as np

    name = fspath(path)
    try:
        mapped = np.memmap(name, dtype=np.uint8, mode="r+")
    except OSError as e:
        raise storage_error("cannot map for update", e, file=name) from e
    try:
        yield mapped
        mapped.flush()
    finally:
        del mapped


def patch_bytes(path: PathOrURL, patches: Iterable[tuple[int, bytes]] = (), *,
                truncate_to: int | None = None, append: bytes | None = None) -> None:
    """Edit a local file in place: write each ``(offset, bytes)`` patch, then cut
    the file to ``truncate_to`` bytes (when given), then add ``append`` at its end.

    Not atomic: callers that need to undo keep a record of the old bytes.
    """
    name = fspath(path)
    try:
        with open(name, "r+b") as fh:
            for offset, data in patches:
                if offset < 0:
                    raise ValueError(f"negative patch offset {offset}")
                fh.seek(offset)
                fh.write(data)
            if truncate_to is not None:
                fh.truncate(truncate_to)
            if append:
                fh.seek(0, os.SEEK_END)
                fh.write(append)
    except OSError as e:
        raise storage_error("cannot edit in place", e, file=name) from e
