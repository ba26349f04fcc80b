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
                         directory. A replaced file is unlinked by a
                         background thread (:func:`sinks.replace_file`).
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

The package: :mod:`.paths` (paths, URLs, file systems), :mod:`.sources`
and :mod:`.prefetch` (reading), :mod:`.sinks` (atomic writing),
:mod:`.files` (folders and whole files), :mod:`.streams` (file objects,
text files, appending and in-place edits). The names below are its public
face; ``from torch_dtdr.storage import open_source`` is how the rest of the
package reaches a file.
"""

from __future__ import annotations

from .files import (child_inside, exists, isdir, listdir, Location, makedirs, open_fsspec_file, read_bytes,
                    read_head, remove, remove_symlink, total_size, write_bytes_atomic)
from .paths import (DEFAULT_MAX_WORKERS, DEFAULT_PART_SIZE, DEFAULT_PREFETCH_WINDOW, is_local_fs, is_plain_name,
                    is_url, join, known_protocol, TEMP_SUFFIX, url_to_fs)
from .prefetch import Prefetch
from .sinks import atomic_local_path, local_temp_path, open_sink, remove_stale_temps, Sink
from .sources import check_regular_file, open_source, Source
from .streams import map_for_update, open_read, open_text_append, patch_bytes, read_text, write_text_atomic

__all__ = [
    "Source",
    "Prefetch",
    "Sink",
    "open_source",
    "open_sink",
    "exists",
    "total_size",
    "isdir",
    "listdir",
    "makedirs",
    "remove",
    "read_bytes",
    "write_bytes_atomic",
    "open_read",
    "read_text",
    "write_text_atomic",
    "open_text_append",
    "map_for_update",
    "patch_bytes",
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
