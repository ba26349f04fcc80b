"""Packing and parsing of the fixed binary structures: superblock, record
headers, footer blob headers and the trailer. Every structure ends in an
xxh3_64 of its own bytes, so a parser can tell a damaged header from a valid one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import FormatError, UnsupportedVersionError
from ..integrity.checksum import hash64
from . import constants


def _ascii(field: bytes) -> str:
    return field.rstrip(b"\0").decode("ascii", "replace")


def _pad_ascii(text: str, n: int, what: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > n:
        raise FormatError(f"{what} {text!r} is longer than {n} bytes")
    return raw.ljust(n, b"\0")


@dataclass(frozen=True)
class Superblock:
    chunk_size: int
    k: int
    m: int
    parity_algorithm: str
    major: int = constants.FORMAT_MAJOR
    minor: int = constants.FORMAT_MINOR
    flags: int = 0

    def pack(self) -> bytes:
        body = constants.SUPERBLOCK.pack(
            constants.MAGIC, self.major, self.minor, self.flags, self.chunk_size, self.k, self.m,
            _pad_ascii(self.parity_algorithm, 16, "parity algorithm"), b"\0" * 16, 0,
        )[:-8]
        return body + hash64(body).to_bytes(8, "little")

    @classmethod
    def parse(cls, raw: bytes, file=None) -> "Superblock":
        if len(raw) < constants.SUPERBLOCK.size:
            raise FormatError("file is shorter than the superblock", file=file, byte_range=(0, len(raw)))
        magic, major, minor, flags, chunk, k, m, algo, _res, digest = constants.SUPERBLOCK.unpack_from(raw)
        if magic != constants.MAGIC:
            raise FormatError("not a DTDR file (bad magic)", file=file, byte_range=(0, 8))
        if digest != hash64(raw[: constants.SUPERBLOCK.size - 8]):
            raise FormatError("superblock checksum mismatch", file=file, byte_range=(0, constants.SUPERBLOCK.size))
        check_version(major, file)
        sb = cls(chunk, k, m, _ascii(algo), major, minor, flags)
        check_geometry(chunk, k, m, file)
        check_flags(flags, file)
        return sb


def check_version(major: int, file=None) -> None:
    if major != constants.FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"format major version {major} is not supported (this reader reads {constants.FORMAT_MAJOR})",
            file=file, field="major",
        )


def check_flags(flags: int, file=None) -> int:
    """The inner-code symbol count carried in the low byte of ``flags``; other bits must be zero."""
    if flags >> 8:
        raise FormatError(f"unknown flags {flags:#x}", file=file, field="flags")
    nsym = flags & 0xFF
    if nsym and (nsym % 2 or not 2 <= nsym <= 128):
        raise FormatError(f"inner code with {nsym} parity symbols is not valid", file=file, field="flags")
    return nsym


def check_geometry(chunk_size: int, k: int, m: int, file=None) -> None:
    if chunk_size <= 0 or chunk_size % constants.PAGE or chunk_size > constants.MAX_CHUNK_SIZE:
        raise FormatError(f"chunk size {chunk_size} is not a positive multiple of {constants.PAGE}", file=file, field="chunk_size")
    if not 1 <= k <= constants.MAX_K or not 0 <= m <= constants.MAX_M:
        raise FormatError(f"stripe geometry k={k}, m={m} out of range", file=file, field="k/m")


class SectionEntry(NamedTuple):
    """One section of a record: its name, how many copies are stored back to back, each copy's length,
    and the xxh3-64 digest of one copy. A tuple: an index holds thousands, built and dropped per load."""

    name: str
    copies: int
    length: int
    digest: int

    @property
    def stored_length(self) -> int:
        return self.copies * self.length


#: Section names as the header stores them (8 bytes, NUL-padded), by name: a save packs a few names thousands of times.
_SECTION_NAMES: dict[str, bytes] = {}


class RecordHeader(NamedTuple):
    """A record's header: what the record holds and its sections. A tuple: a save builds one per segment."""

    kind: int
    tensor_id: int
    segment: int
    elem_start: int
    elem_count: int
    sections: tuple[SectionEntry, ...]

    @property
    def size(self) -> int:
        return constants.RECORD_HEAD.size + len(self.sections) * constants.RECORD_SECTION.size + constants.RECORD_HASH.size

    @property
    def body_length(self) -> int:
        return sum(s.stored_length for s in self.sections)

    def pack(self) -> bytes:
        parts = [constants.RECORD_HEAD.pack(constants.RECORD_MAGIC, self.kind, len(self.sections), 0, self.tensor_id,
                                            self.segment, self.elem_start, self.elem_count)]
        for name, copies, length, digest in self.sections:
            stored_name = _SECTION_NAMES.get(name)
            if stored_name is None:
                stored_name = _pad_ascii(name, 8, "section name")
                if len(_SECTION_NAMES) < 64:
                    _SECTION_NAMES[name] = stored_name
            parts.append(constants.RECORD_SECTION.pack(stored_name, copies, length, digest))
        body = b"".join(parts)
        return body + constants.RECORD_HASH.pack(hash64(body))

    @classmethod
    def parse(cls, raw: bytes, offset: int = 0, file=None) -> "RecordHeader":
        """Parse a header at ``raw[offset:]``; FormatError when it is not a valid header."""
        head = constants.RECORD_HEAD
        if len(raw) - offset < head.size:
            raise FormatError("record header cut short", file=file, byte_range=(offset, len(raw)))
        magic, kind, nsec, _res, tid, seg, start, count = head.unpack_from(raw, offset)
        if magic != constants.RECORD_MAGIC:
            raise FormatError("no record header here", file=file, byte_range=(offset, offset + 4))
        if nsec > constants.MAX_SECTIONS:
            raise FormatError(f"record declares {nsec} sections", file=file, field="nsections")
        size = head.size + nsec * constants.RECORD_SECTION.size + constants.RECORD_HASH.size
        if len(raw) - offset < size:
            raise FormatError("record header cut short", file=file, byte_range=(offset, len(raw)))
        (digest,) = constants.RECORD_HASH.unpack_from(raw, offset + size - 8)
        if digest != hash64(raw[offset: offset + size - 8]):
            raise FormatError("record header checksum mismatch", file=file, byte_range=(offset, offset + size))
        sections = []
        for i in range(nsec):
            name, copies, length, sdig = constants.RECORD_SECTION.unpack_from(raw, offset + head.size + i * constants.RECORD_SECTION.size)
            if not 1 <= copies <= constants.MAX_COPIES:
                raise FormatError(f"section declares {copies} copies", file=file, field="copies")
            sections.append(SectionEntry(_ascii(name), copies, length, sdig))
        return cls(kind, tid, seg, start, count, tuple(sections))


@dataclass(frozen=True)
class BlobHeader:
    kind: int
    copy: int
    ncopies: int
    length: int
    digest: int

    def pack(self) -> bytes:
        body = constants.BLOB_HEAD.pack(constants.BLOB_MAGIC, self.kind, self.copy, self.ncopies, 0, self.length, self.digest, 0)[:-8]
        raw = body + hash64(body).to_bytes(8, "little")
        return raw.ljust(constants.BLOB_HEAD_SIZE, b"\0")

    @classmethod
    def parse(cls, raw: bytes, offset: int = 0) -> "BlobHeader | None":
        """The header at ``raw[offset:]``, or None if there is no valid one."""
        if len(raw) - offset < constants.BLOB_HEAD.size:
            return None
        magic, kind, copy, ncopies, _res, length, digest, hdig = constants.BLOB_HEAD.unpack_from(raw, offset)
        if magic != constants.BLOB_MAGIC or hdig != hash64(raw[offset: offset + constants.BLOB_HEAD.size - 8]):
            return None
        return cls(kind, copy, ncopies, length, digest)


def padded(n: int) -> int:
    """``n`` rounded up to a whole number of pages."""
    return -(-n // constants.PAGE) * constants.PAGE


@dataclass(frozen=True)
class Trailer:
    chunk_size: int
    k: int
    m: int
    parity_algorithm: str
    stream_length: int
    n_data_chunks: int
    footer_offset: int
    index_length: int
    index_digest: int
    chunksums_length: int
    chunksums_digest: int
    n_index_copies: int
    n_chunksum_copies: int
    major: int = constants.FORMAT_MAJOR
    minor: int = constants.FORMAT_MINOR
    flags: int = 0

    def pack(self) -> bytes:
        body = constants.TRAILER.pack(
            constants.TRAILER_MAGIC, self.major, self.minor, self.flags, self.chunk_size, self.k, self.m,
            _pad_ascii(self.parity_algorithm, 16, "parity algorithm"), self.stream_length, self.n_data_chunks,
            self.footer_offset, self.index_length, self.index_digest, self.chunksums_length,
            self.chunksums_digest, self.n_index_copies, self.n_chunksum_copies, 0, 0, 0,
        )[:-8]
        return body + hash64(body).to_bytes(8, "little")

    @classmethod
    def parse(cls, raw: bytes, file=None, file_size: int | None = None) -> "Trailer | None":
        """The trailer in the last bytes of ``raw``, or None if it is damaged."""
        if len(raw) < constants.TRAILER.size:
            return None
        raw = raw[-constants.TRAILER.size:]
        f = constants.TRAILER.unpack(raw)
        if f[0] != constants.TRAILER_MAGIC or f[-1] != hash64(raw[:-8]):
            return None
        check_version(f[1], file)
        t = cls(f[4], f[5], f[6], _ascii(f[7]), f[8], f[9], f[10], f[11], f[12], f[13], f[14], f[15], f[16],
                f[1], f[2], f[3])
        check_geometry(t.chunk_size, t.k, t.m, file)
        check_flags(t.flags, file)
        return t

    def blob_offsets(self) -> list[tuple[int, int, int]]:
        """``(kind, copy, physical offset)`` of every footer blob, in file order."""
        return footer_plan(self.footer_offset, self.index_length, self.chunksums_length,
                           self.n_index_copies, self.n_chunksum_copies)


def footer_plan(footer_offset: int, index_len: int, sums_len: int, n_index: int, n_sums: int):
    """Blob placement: the index copies, then the chunk-sum copies, each copy
    on its own pages so that a damaged sector touches at most one copy."""
    out = []
    pos = footer_offset
    for kind, n, length in ((constants.BLOB_KIND_INDEX, n_index, index_len), (constants.BLOB_KIND_CHUNKSUMS, n_sums, sums_len)):
        for copy in range(n):
            out.append((kind, copy, pos))
            pos += padded(constants.BLOB_HEAD_SIZE + length)
    return out
