"""Byte-level constants of the DTDR container, version 1 (see docs/format.md)."""

from __future__ import annotations

import struct

#: First 8 bytes of every DTDR file (the superblock) and of its trailer's copy.
MAGIC = b"\x89DTDR\r\n\x1a"
TRAILER_MAGIC = b"DTDRTAIL"
BLOB_MAGIC = b"DTDRBLOB"
RECORD_MAGIC = b"DREC"

FORMAT_MAJOR = 1
FORMAT_MINOR = 0

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

#: Limits a reader enforces before allocating (see docs/security.md).
MAX_SECTIONS = 16
MAX_INDEX_BYTES = 1 << 30
MAX_COPIES = 15
MAX_DIMS = 64
MAX_TENSORS = 1 << 24
MAX_K = 255
MAX_M = 32
MAX_CHUNK_SIZE = 1 << 24
