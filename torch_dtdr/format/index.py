"""The index: what the file holds and where.

Stored as UTF-8 JSON (a manifest at the head of the stream, the full index in
the footer). This module turns the untrusted JSON into checked dataclasses:
every field is type- and range-checked before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import zstandard

from .._json import canonical_dumps, cycle_collection_paused, strict_loads
from ..errors import FormatError
from . import constants
from .records import SectionEntry
from ..dtypes import DTYPE_NAMES, DTYPES, dtype_name  # noqa: F401 - re-exported: the format's dtype field

class _RecordFields(NamedTuple):
    offset: int
    header_size: int
    elem_start: int
    elem_count: int
    sections: tuple[SectionEntry, ...]
    #: where the record's bytes end: body_start plus every section's stored bytes
    end: int


class RecordInfo(_RecordFields):
    """Where one segment record lies and what it holds. A tuple (built from the first five fields;
    ``end`` is derived): an index holds one per segment, built and dropped per load."""

    __slots__ = ()

    def __new__(cls, offset: int, header_size: int, elem_start: int, elem_count: int,
                sections: tuple[SectionEntry, ...]):
        end = offset + header_size
        for s in sections:
            end += s.copies * s.length
        return tuple.__new__(cls, (offset, header_size, elem_start, elem_count, sections, end))

    def __getnewargs__(self):
        return tuple(self[:5])

    def _replace(self, **changes) -> "RecordInfo":
        fields = dict(zip(self._fields[:5], self[:5]), **changes)
        return RecordInfo(**fields)

    @property
    def body_start(self) -> int:
        return self.offset + self.header_size

    def to_json(self) -> list:
        return [self.offset, self.header_size, self.elem_start, self.elem_count,
                [[s.name, s.copies, s.length, s.digest] for s in self.sections]]


@dataclass
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: dict
    segment_elems: int
    records: list[RecordInfo] = field(default_factory=list)
    #: Set by ``repair`` when it wrote this tensor from data it could not
    #: restore exactly: ``{"status": "degraded" | "lost", "source": ...}``
    #: (format.md section 5). None for a tensor written from exact data.
    provenance: dict | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_json(self, with_records: bool = True) -> dict:
        d = {"name": self.name, "dtype": DTYPE_NAMES[self.dtype], "shape": list(self.shape),
             "codec": self.codec, "segment_elems": self.segment_elems}
        if self.provenance is not None:
            d["provenance"] = self.provenance
        if with_records:
            d["records"] = [r.to_json() for r in self.records]
        return d


@dataclass
class Index:
    tree: dict
    tensors: list[TensorInfo]
    metadata: dict[str, str]
    geometry: dict
    stream_length: int | None = None

    @property
    def format_version(self) -> list[int]:
        """``[major, minor]``: the provenance minor when any tensor carries a provenance marker."""
        minor = constants.PROVENANCE_MINOR if any(t.provenance is not None for t in self.tensors) else constants.FORMAT_MINOR
        return [constants.FORMAT_MAJOR, minor]

    def to_json(self, with_records: bool = True) -> dict:
        d = {"format": self.format_version, "geometry": self.geometry, "tree": self.tree,
             "tensors": [t.to_json(with_records) for t in self.tensors], "metadata": self.metadata}
        return d


def encode_index(index: dict) -> bytes:
    """The canonical UTF-8 JSON encoding of an index or manifest."""
    return canonical_dumps(index)


class IndexText:
    """The canonical JSON of one save's manifest and of its full index, which
    share their tree and every tensor's description: each is encoded once.

    A save calls :meth:`manifest` before its records are written (the tree and
    the tensors without records), then :meth:`full` after (the same, plus
    every tensor's records and the stream length). The bytes are exactly
    ``encode_index(index.to_json(with_records=False))`` and
    ``encode_index(dict(index.to_json(), stream_length=n))``: canonical JSON of
    an object is ``{`` + the members' ``"key":value`` texts joined by ``,`` +
    ``}``, so it can be put together from the members' own encodings."""

    def __init__(self, index: Index):
        self.index = index
        self._tree: bytes | None = None
        self._heads: list[bytes] | None = None

    def _parts(self) -> tuple[bytes, list[bytes]]:
        if self._tree is None:
            self._tree = canonical_dumps(self.index.tree)
            self._heads = [canonical_dumps(t.to_json(with_records=False)) for t in self.index.tensors]
        return self._tree, self._heads

    def _document(self, tensors: bytes, extra: bytes = b"") -> bytes:
        index = self.index
        return b"".join((b'{"format":', canonical_dumps(index.format_version),
                         b',"geometry":', canonical_dumps(index.geometry), b',"tree":', self._parts()[0],
                         b',"tensors":[', tensors, b'],"metadata":', canonical_dumps(index.metadata), extra, b"}"))

    def manifest(self) -> bytes:
        """``encode_index(index.to_json(with_records=False))``."""
        return self._document(b",".join(self._parts()[1]))

    def full(self, stream_length: int) -> bytes:
        """``encode_index(dict(index.to_json(), stream_length=stream_length))``."""
        heads = self._parts()[1]
        if len(heads) != len(self.index.tensors):
            raise ValueError("the index's tensors changed after its manifest was encoded")
        tensors = b",".join(head[:-1] + b',"records":' + canonical_dumps([r.to_json() for r in t.records]) + b"}"
                            for head, t in zip(heads, self.index.tensors))
        return self._document(tensors, b',"stream_length":' + canonical_dumps(stream_length))


def compress_index(raw: bytes) -> bytes:
    """Footer index payload: one zstd frame (with its content size) of the JSON.
    Smaller copies vote better: fewer bits must survive."""
    return zstandard.ZstdCompressor(level=9, write_content_size=True).compress(raw)


def decompress_index(payload: bytes, file=None, file_size: int | None = None) -> bytes:
    """Inverse of :func:`compress_index`, refusing frames that would expand past
    the limits (a zstd bomb) before anything is decompressed. With
    ``file_size``, the index may also not exceed MAX_INDEX_PER_FILE_BYTE x the
    file size + MAX_INDEX_SLACK: a writer's index is smaller than its file
    (the head manifest, inside the stream, holds everything but the record
    locations, which are smaller than the records), so the parsed index, up
    to ~25 x its JSON, stays a fixed multiple of the file size."""
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise FormatError(f"index is not a zstd frame: {e}", file=file, field="index") from None
    limit = min(constants.MAX_INDEX_BYTES, max(constants.MAX_INDEX_FLOOR, constants.MAX_INDEX_RATIO * len(payload)))
    if file_size is not None:
        limit = min(limit, constants.MAX_INDEX_PER_FILE_BYTE * file_size + constants.MAX_INDEX_SLACK)
    if size < 0 or size > limit:
        raise FormatError(f"index declares {size} decompressed bytes from {len(payload)} (limit {limit})",
                          file=file, field="index")
    try:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as e:
        raise FormatError(f"index does not decompress: {e}", file=file, field="index") from None


def _int(v, what, lo=0, hi=(1 << 63) - 1, file=None) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"index field {what} must be an integer in [{lo}, {hi}], got {v!r}", file=file, field=what)
    return v


def _str(v, what, file=None, max_len=1 << 16) -> str:
    if type(v) is not str or len(v) > max_len:
        raise FormatError(f"index field {what} must be a string of at most {max_len} characters",
                          file=file, field=what)
    return v


def _short(v, n=60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


_RECORD_FIXED = constants.RECORD_HEAD.size + constants.RECORD_HASH.size
_SUPERBLOCK_END = constants.SUPERBLOCK.size


def _dict(v, what, file=None) -> dict:
    if type(v) is not dict:
        raise FormatError(f"index field {what} must be an object", file=file, field=what)
    return v


def _list(v, what, file=None, max_len=None) -> list:
    if type(v) is not list or (max_len is not None and len(v) > max_len):
        raise FormatError(f"index field {what} must be a list", file=file, field=what)
    return v



def parse_index(raw: bytes, file=None, require_records: bool = True) -> Index:
    """Decode and check an index (or, with ``require_records=False``, a manifest).
    The cycle collector is paused meanwhile (see :func:`cycle_collection_paused`)."""
    with cycle_collection_paused():
        return _parse_index(raw, file, require_records)


def _parse_index(raw: bytes, file, require_records: bool) -> Index:
    if len(raw) > constants.MAX_INDEX_BYTES:
        raise FormatError(f"index of {len(raw)} bytes exceeds the limit", file=file, field="index")
    try:
        doc = strict_loads(raw.decode("utf-8"))
    except RecursionError:
        raise FormatError("index JSON is nested too deeply", file=file, field="index") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, the int digit limit, our hooks
        raise FormatError(f"index is not valid JSON: {str(e)[:200]}", file=file, field="index") from None
    doc = _dict(doc, "index", file)
    fmt = _list(doc.get("format"), "format", file, 2)
    if len(fmt) != 2 or _int(fmt[0], "format.major", file=file) != constants.FORMAT_MAJOR:
        from .records import check_version

        check_version(fmt[0] if fmt and type(fmt[0]) is int else -1, file)
    geometry = _dict(doc.get("geometry"), "geometry", file)
    metadata = _dict(doc.get("metadata", {}), "metadata", file)
    for k, v in metadata.items():
        _str(v, f"metadata[{_short(k)}]", file, constants.MAX_INDEX_STR)
    tree = _dict(doc.get("tree"), "tree", file)
    tensors = []
    names: set[str] = set()
    total_bytes = 0
    # (the checks below spell out their field names only when they fail: most of an index is its tensors)
    for i, t in enumerate(_list(doc.get("tensors"), "tensors", file, constants.MAX_TENSORS)):
        if type(t) is not dict:
            _dict(t, f"tensors[{i}]", file)
        name = t.get("name")
        if type(name) is not str or len(name) > 1 << 16:
            _str(name, f"tensors[{i}].name", file)
        if name in names:
            raise FormatError(f"duplicate tensor name {_short(name)}", file=file, tensor=name, field=f"tensors[{i}].name")
        names.add(name)
        dname = t.get("dtype")
        dtype = DTYPES.get(dname) if type(dname) is str else None
        if dtype is None:
            _str(dname, f"tensors[{i}].dtype", file)
            raise FormatError(f"unknown dtype {_short(dname)}", file=file, tensor=name, field="dtype")
        shape = tuple(d if type(d) is int and 0 <= d < 1 << 63 else _int(d, f"{name}.shape", file=file)
                      for d in _list(t.get("shape"), "shape", file, constants.MAX_DIMS))
        numel = 1
        for d in shape:
            numel *= d
            if numel > 1 << 62:
                raise FormatError("tensor declares more than 2^62 elements", file=file, tensor=name, field="shape")
        itemsize = dtype.itemsize
        total_bytes += numel * itemsize
        if total_bytes > constants.MAX_TENSOR_BYTES:
            raise FormatError(f"the tensors declare more than {constants.MAX_TENSOR_BYTES} bytes (TORCH_DTDR_MAX_BYTES)",
                              file=file, tensor=name, field="shape")
        codec = t.get("codec")
        if type(codec) is not dict:
            _dict(codec, f"{name}.codec", file)
        seg = t.get("segment_elems")
        if type(seg) is not int or not 1 <= seg <= (1 << 63) - 1:
            _int(seg, f"{name}.segment_elems", lo=1, file=file)
        info = TensorInfo(name, dtype, shape, codec, seg, provenance=parse_provenance(t, name, file))
        lost = info.provenance is not None and info.provenance["status"] == PROVENANCE_LOST
        records = t.get("records")
        if require_records and type(records) is not list:
            _list(records, f"{name}.records", file)
        if require_records and lost:
            if records:
                raise FormatError("a tensor marked lost has records", file=file, tensor=name, field="records")
        elif require_records:
            expected = 0
            for r in records:
                rec = _record(r, name, file)
                start, count = rec.elem_start, rec.elem_count
                if start != expected or count > seg or (count == 0 and numel != 0) or start + count > numel:
                    raise FormatError("records do not tile the tensor", file=file, tensor=name, field="records")
                expected += count
                check_record_size(rec, itemsize, file=file, tensor=name)
                info.records.append(rec)
            if expected != numel and not (numel == 0 and expected == 0):
                raise FormatError(f"records cover {expected} of {numel} elements", file=file, tensor=name, field="records")
        tensors.append(info)
    stream_length = doc.get("stream_length")
    if stream_length is None and require_records:
        raise FormatError("index field stream_length is missing", file=file, field="stream_length")
    if stream_length is not None:
        _int(stream_length, "stream_length", file=file)
        prev_end = constants.SUPERBLOCK.size
        for t in tensors:  # the writer appends records in index order: they never overlap
            for r in t.records:
                if r.offset < prev_end:
                    raise FormatError("record overlaps the record before it", file=file, tensor=t.name,
                                      byte_range=(r.offset, r.end), field="records")
                if r.end > stream_length:
                    raise FormatError("record reaches past the end of the stream", file=file, tensor=t.name,
                                      byte_range=(r.offset, r.end), field="records")
                prev_end = r.end
    return Index(tree, tensors, metadata, geometry, stream_length)


def _is_section(s) -> bool:
    """Whether ``s`` is a well-formed section entry (the common case, checked without a call per field)."""
    return (type(s) is list and len(s) == 4 and type(s[0]) is str and len(s[0]) <= 8
            and type(s[1]) is int and 1 <= s[1] <= constants.MAX_COPIES
            and type(s[2]) is int and 0 <= s[2] < 1 << 63 and type(s[3]) is int and 0 <= s[3] < 1 << 64)


def _section(s, name: str, file) -> SectionEntry:
    if _is_section(s):
        return SectionEntry(*s)
    s = _list(s, "section", file, 4)
    if len(s) != 4:
        raise FormatError("section entry must have 4 fields", file=file, tensor=name, field="sections")
    return SectionEntry(_str(s[0], "section.name", file, 8), _int(s[1], "section.copies", 1, constants.MAX_COPIES, file),
                        _int(s[2], "section.length", file=file), _int(s[3], "section.digest", 0, (1 << 64) - 1, file))


def _record(r, name: str, file) -> RecordInfo:
    """One checked ``[offset, header_size, elem_start, elem_count, sections]`` entry of ``name``'s records."""
    if type(r) is not list:
        r = _list(r, f"{name}.records[]", file, 5)
    if len(r) != 5:
        raise FormatError("record entry must have 5 fields", file=file, tensor=name, field="records")
    off, hsize, start, count, raw_secs = r
    if not (type(off) is int and type(hsize) is int and type(start) is int and type(count) is int
            and _SUPERBLOCK_END <= off < 1 << 63 and 1 <= hsize <= 1 << 16 and 0 <= start < 1 << 63
            and 0 <= count < 1 << 63):  # the messages name the first bad field
        _int(off, "record.offset", lo=_SUPERBLOCK_END, file=file)
        _int(hsize, "record.header_size", lo=1, hi=1 << 16, file=file)
        _int(start, "record.elem_start", file=file)
        _int(count, "record.elem_count", file=file)
    secs = tuple(_section(s, name, file) for s in _list(raw_secs, "record.sections", file, constants.MAX_SECTIONS))
    if len(secs) > 1 and len({s.name for s in secs}) != len(secs):
        raise FormatError("duplicate section name in a record", file=file, tensor=name, field="record.sections")
    if hsize != _RECORD_FIXED + len(secs) * constants.RECORD_SECTION.size:
        raise FormatError(f"record header size {hsize} does not match its {len(secs)} sections",
                          file=file, tensor=name, field="record.header_size")
    return RecordInfo(off, hsize, start, count, secs)


PROVENANCE_DEGRADED, PROVENANCE_LOST = "degraded", "lost"
_MAX_SOURCE_CHARS = 1024


def parse_provenance(t: dict, name: str, file=None) -> dict | None:
    """The checked ``provenance`` marker of a tensor entry (format.md section 5),
    or None. Unknown members are dropped (a later minor version may add some)."""
    if "provenance" not in t:
        return None
    what = f"tensors[{_short(name)}].provenance"
    p = _dict(t["provenance"], what, file)
    status = p.get("status")
    if status not in (PROVENANCE_DEGRADED, PROVENANCE_LOST):
        raise FormatError(f"provenance status must be 'degraded' or 'lost', got {_short(status)}", file=file,
                          tensor=name, field=f"{what}.status")
    out = {"status": status, "source": _str(p.get("source", ""), f"{what}.source", file, _MAX_SOURCE_CHARS)}
    if status == PROVENANCE_DEGRADED:
        out["degraded_elements"] = _int(p.get("degraded_elements", 0), f"{what}.degraded_elements", file=file)
        bound = p.get("error_bound")
        if bound is not None and (type(bound) not in (int, float) or not 0 <= bound < float("inf")):
            raise FormatError("provenance error_bound must be a finite number >= 0 or null", file=file,
                              tensor=name, field=f"{what}.error_bound")
        out["error_bound"] = None if bound is None else float(bound)
    return out


def check_record_size(rec: "RecordInfo", itemsize: int, *, file=None, tensor=None) -> None:
    """Refuse a segment record whose elements could not come from its stored
    bytes: ``elem_count * itemsize > MAX_DECODE_RATIO * stored``."""
    stored = rec.end - rec.body_start
    decoded = rec.elem_count * itemsize
    if decoded > constants.MAX_DECODE_RATIO * stored:
        raise FormatError(f"record of {stored} stored bytes declares {decoded} bytes of elements", file=file,
                          tensor=tensor, byte_range=(rec.offset, rec.offset + rec.header_size + stored),
                          field="record.elem_count")
