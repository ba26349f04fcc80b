"""Byte-level constants of the DTDR container, version 1 (see docs/format.md)."""

from __future__ import annotations

import os
import struct
import warnings

#: First 8 bytes of every DTDR file (the superblock) and of its trailer's copy.
MAGIC = b"\x89DTDR\r\n\x1a"
TRAILER_MAGIC = b"DTDRTAIL"
BLOB_MAGIC = b"DTDRBLOB"
RECORD_MAGIC = b"DREC"

FORMAT_MAJOR = 1
FORMAT_MINOR = 0
#: The minor version written in the index of a file that carries a per-tensor
#: ``provenance`` marker (format.md section 5); other files keep FORMAT_MINOR.
PROVENANCE_MINOR = 1

#: Alignment unit: chunks, footer blobs and the trailer page start on PAGE boundaries,
#: so a damaged aligned sector touches exactly one of them.
PAGE = 4096

DEFAULT_CHUNK_SIZE = 4096
DEFAULT_SEGMENT_ELEMS = 1 << 20

#: Superblock: magic, major, minor, flags, chunk_size, k, m, parity algorithm, reserved, hash.
SUPERBLOCK = struct.Struct("<8sHHIIHH16s16sQ")
assert SUPERBLOCK.size == 64

#: Record header: magic, kind, nsections, reserved, tensor id, segment, elem_start, elem_count.
RECORD_HEAD = struct.Struct("<4sBBHIIQQ")
#: One section descriptor: name, copies, reserved, length of one copy, xxh3_64 of one copy.
RECORD_SECTION = struct.Struct("<8sB7xQQ")
RECORD_HASH = struct.Struct("<Q")
RECORD_KIND_MANIFEST = 1
RECORD_KIND_SEGMENT = 2
MANIFEST_TENSOR_ID = 0xFFFFFFFF

#: Footer blob header: magic, kind, copy, ncopies, reserved, payload length, payload hash, header hash.
BLOB_HEAD = struct.Struct("<8sBBBxIQQQ")
BLOB_HEAD_SIZE = 64
BLOB_KIND_INDEX = 1
BLOB_KIND_CHUNKSUMS = 2

#: Trailer, in the last TRAILER.size bytes of the file.
TRAILER = struct.Struct("<8sHHIIHH16sQQQQQQQBB6xQQQ")
assert TRAILER.size == 128

def _env_bytes(name: str, default: int) -> int:
    """A positive byte count from the environment (``int()`` syntax, ``0x`` allowed), else ``default``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if value <= 0:
        warnings.warn(f"ignoring {name}={text!r}: not a positive integer number of bytes", stacklevel=2)
        return default
    return value


#: Limits a reader enforces before allocating (see docs/security.md). They are
#: read at call time, so a program may also assign them (``constants.MAX_TENSOR_BYTES = ...``).
MAX_SECTIONS = 16
MAX_INDEX_BYTES = 1 << 30
#: The user-settable memory cap: the most tensor bytes (sum of numel * itemsize
#: over the tensors) a file may declare. Environment: ``TORCH_DTDR_MAX_BYTES``.
MAX_TENSOR_BYTES = _env_bytes("TORCH_DTDR_MAX_BYTES", 1 << 40)
#: A segment record decodes to at most this many bytes per stored byte of its
#: sections (every v1 codec stores at least one byte per element of <= 8 bytes,
#: or the element itself), so a small file cannot declare a huge tensor.
MAX_DECODE_RATIO = 8
#: A record cut by the end of a truncated file is decoded only when its elements
#: take at most MAX_DECODE_RATIO bytes per byte present plus this many bytes
#: (the default segment of 2**20 elements of up to 16 bytes always is).
MAX_TRUNCATED_RECORD = 16 << 20
#: The footer index (a zstd frame) may expand to at most
#: max(MAX_INDEX_FLOOR, MAX_INDEX_RATIO * compressed size) bytes: a zstd bomb is refused
#: before it is decompressed, and the JSON parser's memory stays a multiple of the file size.
MAX_INDEX_RATIO = 1024
MAX_INDEX_FLOOR = 4 << 20
#: ... and to at most MAX_INDEX_PER_FILE_BYTE x the file size + MAX_INDEX_SLACK
#: (a writer's index JSON is under 1 x its file: measured 0.47-0.90 on files of
#: tiny tensors, long names, large object trees), checked before decompressing.
MAX_INDEX_PER_FILE_BYTE = 2
MAX_INDEX_SLACK = 64 << 10
#: Column correction (locating wrong bytes with a stripe's own code) may spend
#: at most CORRECTION_WORK_PER_BYTE x stream length + CORRECTION_WORK_BASE work
#: units (bytes of stripes whose syndromes are computed, suspect pairs x
#: columns x m table lookups; each ~20-30 ns of CPU) per open file; past that,
#: damaged chunks go to the erasure code alone. The stream length is what a
#: clean load decodes, so correction costs at most a few clean loads.
CORRECTION_WORK_PER_BYTE = 4
CORRECTION_WORK_BASE = 1 << 22
#: Restored chunks a reader keeps per open file (each stripe is repaired once;
#: a stripe beyond repair is remembered at no cost).
STRIPE_CACHE_BYTES = 128 << 20
#: Characters in one metadata value or tensor name of the index.
MAX_INDEX_STR = 1 << 26
MAX_COPIES = 15
MAX_DIMS = 64
MAX_TENSORS = 1 << 24
MAX_K = 255
MAX_M = 32
MAX_CHUNK_SIZE = 1 << 24
