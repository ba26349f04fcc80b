"""Build valid and hostile DTDR files byte by byte, for the hostile-input tests
(tests/test_hostile.py, tests/test_properties.py) and the fuzz harness.

Every checksum a hostile file needs is recomputed here, so the reader's
structural checks (not its checksums) are what the files exercise:

* :func:`reseal` replaces the footer index (or any trailer field) of a valid
  file and rewrites the footer and trailer with valid hashes;
* :func:`restream` rewrites the whole striped region from a modified logical
  stream (chunk checksums and parity recomputed), for record-level changes;
* :func:`build` writes a container from raw record headers and bodies;
* :func:`mutate` applies one random structural or byte-level mutation
  (used by the property tests and the fuzzers).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import random
import struct
from typing import Any, Callable

import numpy as np
import zstandard

from torch_dtdr import api, decoding
from torch_dtdr.format import constants as C
from torch_dtdr.format.index import compress_index
from torch_dtdr.format.reader import ContainerReader
from torch_dtdr.format.records import BlobHeader, RecordHeader, SectionEntry, Trailer, footer_plan, padded
from torch_dtdr.format.writer import ContainerWriter
from torch_dtdr.integrity.checksum import hash64
from torch_dtdr.storage import open_source

__all__ = ["save_bytes", "parse", "reseal", "restream", "build", "finish_raw", "mutate", "small_objects",
           "seed_files", "MUTATIONS"]


# --------------------------------------------------------------------------- valid files


def encode_index(doc) -> bytes:
    """JSON as the writer spells it, except that non-ASCII is escaped (so lone
    surrogates and other hostile strings can be written)."""
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def save_bytes(obj, **kw) -> bytes:
    """``torch_dtdr.api.save`` into memory."""
    buf = io.BytesIO()
    api.save(obj, buf, **kw)
    return buf.getvalue()


def small_objects():
    """A few small objects covering every codec, dtype family and tree node kind."""
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 20, generator=g)
    return [
        ({"w": w, "tied": w, "view": w[:3], "b": torch.randn(7, generator=g).half()}, {}),
        ({"ids": torch.arange(40, dtype=torch.int64), "mask": torch.arange(9) % 2 == 0,
          "meta": {"step": 3, "lr": 1e-3, "name": "x", "blob": b"\x00\xff", 5: None, "t": (1.5, float("nan"))}},
         {"parity": (4, 1)}),
        ({"a": torch.randn(3000, generator=g), "c": torch.randn(500, generator=g).double()},
         {"codec": {"a": "dtdr8", "c": "dtdr16"}, "segment_elems": 1000, "parity": "off"}),
        ([torch.randn(2000, generator=g).bfloat16(), torch.zeros(0, 3), torch.tensor(2.5)],
         {"parity": "archive", "segment_elems": 512}),
    ]


def seed_files() -> list[bytes]:
    """Small valid files, one per :func:`small_objects` entry."""
    return [save_bytes(obj, **kw) for obj, kw in small_objects()]


@dataclasses.dataclass
class Parsed:
    trailer: Trailer
    striped: bytes  # the file up to the footer
    index: dict  # the footer index, decoded
    sums: bytes  # the chunk-checksum table


def parse(data: bytes) -> Parsed:
    """Split a valid file (with an intact trailer and first index copy)."""
    t = Trailer.parse(data[-C.PAGE:])
    assert t is not None, "no valid trailer"
    plan = t.blob_offsets()
    blobs = {}
    for kind, copy_no, off in plan:
        if copy_no == 0:
            n = t.index_length if kind == C.BLOB_KIND_INDEX else t.chunksums_length
            blobs[kind] = data[off + C.BLOB_HEAD_SIZE: off + C.BLOB_HEAD_SIZE + n]
    raw = zstandard.ZstdDecompressor().decompress(blobs[C.BLOB_KIND_INDEX])
    return Parsed(t, data[: t.footer_offset], json.loads(raw), blobs[C.BLOB_KIND_CHUNKSUMS])


def zstd_frame(raw: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(raw)


def _footer(footer_offset: int, index_payload: bytes, sums: bytes, n_index: int, n_sums: int) -> bytes:
    out = bytearray()
    blobs = {C.BLOB_KIND_INDEX: index_payload, C.BLOB_KIND_CHUNKSUMS: sums}
    ncopies = {C.BLOB_KIND_INDEX: n_index, C.BLOB_KIND_CHUNKSUMS: n_sums}
    for kind, copy_no, _off in footer_plan(footer_offset, len(index_payload), len(sums), n_index, n_sums):
        payload = blobs[kind]
        head = BlobHeader(kind, copy_no, ncopies[kind], len(payload), hash64(payload)).pack()
        out += head + payload
        out += bytes(padded(len(head) + len(payload)) - len(head) - len(payload))
    return bytes(out)


def reseal(data: bytes, index: dict | None = None, *, index_raw: bytes | None = None,
           index_payload: bytes | None = None, trailer: dict | None = None, n_index: int = 2,
           n_sums: int = 1) -> bytes:
    """``data`` with its footer index replaced (a dict, raw JSON bytes, or a
    ready zstd payload) and trailer fields overridden; every hash is valid."""
    p = parse(data)
    if index_payload is None:
        if index_raw is None:
            index_raw = encode_index(p.index if index is None else index)
        index_payload = compress_index(index_raw)
    t = dataclasses.replace(p.trailer, index_length=len(index_payload), index_digest=hash64(index_payload),
                            n_index_copies=n_index, n_chunksum_copies=n_sums)
    if trailer:
        t = dataclasses.replace(t, **trailer)
    footer = _footer(p.trailer.footer_offset, index_payload, p.sums, n_index, n_sums)
    tail = t.pack()
    return p.striped + footer + bytes(C.PAGE - len(tail)) + tail


def logical_stream(data: bytes) -> bytes:
    with open_source(io.BytesIO(data)) as src:
        r = ContainerReader(src)
        return bytes(r.read_logical(0, r.stream_length).data)


def restream(data: bytes, stream: bytes, index: dict | None = None) -> bytes:
    """Rewrite a valid file around a new logical ``stream`` (same geometry):
    chunk checksums, parity and footer are recomputed. ``index`` defaults to
    the file's own (its ``stream_length`` is replaced)."""
    p = parse(data)
    t = p.trailer
    idx = dict(p.index if index is None else index)
    idx.pop("stream_length", None)
    sink = io.BytesIO()
    w = ContainerWriter(sink, chunk_size=t.chunk_size, k=t.k, m=t.m, algorithm=t.parity_algorithm,
                        inner_nsym=t.flags & 0xFF)
    w.append(stream[C.SUPERBLOCK.size:])
    w.finish(idx)
    return sink.getvalue()


def record(kind: int, tensor_id: int, elem_start: int, elem_count: int, sections, segment: int = 0) -> bytes:
    """A record header (valid hash) followed by its bodies. ``sections`` are
    ``(name, copies, body)`` or ``(name, copies, body, declared_length)``."""
    entries = []
    bodies = []
    for s in sections:
        name, copies, body = s[:3]
        length = s[3] if len(s) > 3 else len(body)
        entries.append(SectionEntry(name, copies, length, hash64(body)))
        bodies.append(body * copies)
    head = RecordHeader(kind, tensor_id, segment, elem_start, elem_count, tuple(entries)).pack()
    return head + b"".join(bodies)


def manifest_doc(tensors: list[dict], tree: dict | None = None, metadata: dict | None = None) -> dict:
    if tree is None:
        tree = {"format": "torch_dtdr.tree", "version": 1, "root": ["dict"] + sum(
            ([t["name"], ["tensor", i]] for i, t in enumerate(tensors)), []),
                "tensors": [{"entry": i, "dtype": t["dtype"], "offset": 0, "shape": t["shape"],
                             "stride": _strides(t["shape"]), "device": "cpu", "requires_grad": False,
                             "kind": "tensor"} for i, t in enumerate(tensors)],
                "entries": [{"name": t["name"], "dtype": t["dtype"], "shape": t["shape"]} for t in tensors]}
    return {"format": [1, 0], "geometry": {"chunk_size": 4096, "k": 4, "m": 1, "inner_nsym": 0,
                                           "algorithm": "isa_l_rs_cauchy"},
            "tree": tree, "tensors": tensors, "metadata": metadata or {}}


def _strides(shape):
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(int(s), 1) if isinstance(s, int) else 1
    return out[::-1]


def finish_raw(w: ContainerWriter, index_payload: bytes, *, n_index: int = 2) -> None:
    """Like ``ContainerWriter.finish`` but with a ready-made index payload (any bytes)."""
    c = w.chunk_size
    stream_length = w._logical
    if w._buf:
        n = -(-len(w._buf) // c)
        w._buf += bytes(n * c - len(w._buf))
        w._emit_last_stripe(memoryview(w._buf))
        w._buf = bytearray()
    n_data = -(-stream_length // c)
    footer_offset = w._physical
    sums = np.concatenate(w._hashes).astype("<u8").tobytes() if w._hashes else b""
    w._write(_footer(footer_offset, index_payload, sums, n_index, 1))
    tail = Trailer(c, w.k, w.m, w.code.algorithm, stream_length, n_data, footer_offset, len(index_payload),
                   hash64(index_payload), len(sums), hash64(sums), n_index, 1, flags=w.inner_nsym).pack()
    w._write(bytes(C.PAGE - len(tail)) + tail)


def build(pieces: list[bytes], index: dict | None = None, *, manifest: dict | bytes | None = None,
          index_raw: bytes | None = None, index_payload: bytes | None = None, footer: bool = True,
          k: int = 4, m: int = 1) -> bytes:
    """A container whose stream is the superblock, a manifest record (from
    ``manifest``, default: ``index`` without records) and ``pieces`` (raw record
    bytes from :func:`record`). ``footer=False`` stops after the striped region
    (a truncated file: the reader scans the records)."""
    sink = io.BytesIO()
    w = ContainerWriter(sink, chunk_size=4096, k=k, m=m)
    if manifest is None:
        manifest = {kk: v for kk, v in (index or {}).items() if kk != "stream_length"}
        manifest["tensors"] = [{kk: v for kk, v in t.items() if kk != "records"} for t in manifest.get("tensors", [])]
    mbytes = manifest if isinstance(manifest, bytes) else encode_index(manifest)
    w.append(record(C.RECORD_KIND_MANIFEST, C.MANIFEST_TENSOR_ID, 0, 0, [("manifest", 1, mbytes)]))
    for piece in pieces:
        w.append(piece)
    if not footer:
        c = w.chunk_size
        if w._buf:
            n = -(-len(w._buf) // c)
            w._buf += bytes(n * c - len(w._buf))
            w._emit_last_stripe(memoryview(w._buf))
        return sink.getvalue()
    if index_payload is None:
        if index_raw is None:
            index_raw = encode_index(dict(index or {}, stream_length=w._logical))
        index_payload = compress_index(index_raw)
    finish_raw(w, index_payload)
    return sink.getvalue()


def records_of(stream: bytes, index: dict) -> list[tuple[int, int]]:
    """``(offset, end)`` of every record the index lists."""
    out = []
    for t in index["tensors"]:
        for off, hsize, _s, _c, secs in t["records"]:
            out.append((off, off + hsize + sum(cp * ln for _n, cp, ln, _d in secs)))
    return out


# --------------------------------------------------------------------------- mutations

_HOSTILE_INTS = [-1, 0, 1, 2, 7, 63, 64, 4095, 4096, 1 << 16, 1 << 20, 1 << 31, 1 << 32, 1 << 53, 1 << 62,
                 (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63)]
_HOSTILE_VALUES: list[Any] = [None, True, False, 0.5, float("1e308"), "", "x" * 9, "\udc80", [], {}, [[]], [-1],
                              {"name": "raw"}, "raw", "float32", ["tensor", 0], ["list"] * 3]


def _paths(doc, prefix=()):
    """Every (path, value) of a JSON document."""
    stack = [(prefix, doc)]
    out = []
    while stack:
        path, v = stack.pop()
        out.append((path, v))
        if isinstance(v, dict):
            stack.extend((path + (k,), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((path + (i,), x) for i, x in enumerate(v))
    return out


def _set(doc, path, value):
    if not path:
        return value
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return doc


def _hostile_value(rng: random.Random, old):
    r = rng.random()
    if isinstance(old, int) and not isinstance(old, bool) and r < 0.5:
        choice = rng.choice(["delta", "scale", "const"])
        if choice == "delta":
            return old + rng.choice([-4096, -64, -8, -1, 1, 8, 64, 4096])
        if choice == "scale":
            return old * rng.choice([2, 1 << 20, 1 << 40, -1])
        return rng.choice(_HOSTILE_INTS)
    if r < 0.7:
        return rng.choice(_HOSTILE_INTS)
    return copy.deepcopy(rng.choice(_HOSTILE_VALUES))


def mutate_index_doc(doc: dict, rng: random.Random) -> dict:
    """Change, swap, delete or duplicate fields of an index document."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        op = rng.random()
        path, old = rng.choice(paths)
        if op < 0.55:
            doc = _set(doc, path, _hostile_value(rng, old))
        elif op < 0.75:
            # swap two values of the same JSON type (lengths with offsets, names with names, ...)
            same = [(p, v) for p, v in paths if type(v) is type(old) and p != path and p[:len(path)] != path
                    and path[:len(p)] != p]
            if same:
                p2, v2 = rng.choice(same)
                doc = _set(doc, path, copy.deepcopy(v2))
                try:
                    doc = _set(doc, p2, copy.deepcopy(old))
                except (IndexError, KeyError, TypeError):  # the first write reshaped p2's parent
                    pass
        elif op < 0.85 and path:
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                del parent[path[-1]]
            elif isinstance(parent, list):
                del parent[path[-1]]
        elif op < 0.95 and path:
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, list):
                parent.insert(path[-1], copy.deepcopy(old))
        else:
            doc = _set(doc, path, [copy.deepcopy(old)] * rng.choice([2, 100]))
    return doc


def m_flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 2, 8, 64])):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_smash(data: bytes, rng: random.Random) -> bytes:
    """Overwrite a run of bytes (a damaged sector or a hostile splice)."""
    b = bytearray(data)
    n = rng.choice([8, 64, 512, 4096])
    pos = rng.randrange(len(b))
    fill = rng.choice([b"\x00", b"\xff", b"DREC", b"DTDRBLOB", bytes([rng.randrange(256)])])
    b[pos:pos + n] = (fill * (n // len(fill) + 1))[:n]
    return bytes(b[: len(data)])


def m_truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def m_index(data: bytes, rng: random.Random) -> bytes:
    return reseal(data, mutate_index_doc(parse(data).index, rng))


def m_trailer(data: bytes, rng: random.Random) -> bytes:
    p = parse(data)
    fields = ["stream_length", "n_data_chunks", "footer_offset", "index_length", "chunksums_length", "k", "m",
              "chunk_size", "n_index_copies", "n_chunksum_copies", "flags"]
    f = rng.choice(fields)
    old = getattr(p.trailer, f)
    limits = {"k": 0xFFFF, "m": 0xFFFF, "chunk_size": 0xFFFFFFFF, "n_index_copies": 255, "n_chunksum_copies": 255,
              "flags": 0xFFFFFFFF}
    v = _hostile_value(rng, old)
    if type(v) is not int:
        v = 0
    v %= limits.get(f, 1 << 64)
    t = dataclasses.replace(p.trailer, **{f: v}).pack()
    return data[: -len(t)] + t


def m_record(data: bytes, rng: random.Random) -> bytes:
    """Rewrite one record header in the stream with a changed field (valid hash),
    keeping the index as it was (so the two disagree), then reseal everything."""
    p = parse(data)
    stream = bytearray(logical_stream(data))
    recs = [(off, hs) for t in p.index["tensors"] for off, hs, *_ in t["records"]]
    recs.append((C.SUPERBLOCK.size, None))
    off, _ = rng.choice(recs)
    head = RecordHeader.parse(bytes(stream), off)
    secs = list(head.sections)
    field = rng.choice(["tensor_id", "elem_start", "elem_count", "kind", "section"])
    if field == "section" and secs:
        i = rng.randrange(len(secs))
        s = secs[i]
        v = _hostile_value(rng, s.length)
        secs[i] = SectionEntry(s.name, s.copies, v % (1 << 64) if type(v) is int else 0, s.digest)
        new = head._replace(sections=tuple(secs))
    elif field == "kind":
        new = head._replace(kind=rng.randrange(256))
    else:
        v = _hostile_value(rng, getattr(head, field))
        bits = 32 if field == "tensor_id" else 64
        new = head._replace(**{field: (v if type(v) is int else 0) % (1 << bits)})
    packed = new.pack()
    if len(packed) == head.size:
        stream[off: off + len(packed)] = packed
    return restream(data, bytes(stream), p.index)


def m_section_bytes(data: bytes, rng: random.Random) -> bytes:
    """Replace the bytes of one section with other bytes of the same length and
    a valid checksum in both the stream and the index: what a codec receives
    is then hostile, but every container check passes."""
    p = parse(data)
    stream = bytearray(logical_stream(data))
    idx = copy.deepcopy(p.index)
    cands = []
    for ti, t in enumerate(idx["tensors"]):
        for ri, (off, hs, _s, _c, secs) in enumerate(t["records"]):
            pos = off + hs
            for si, (name, copies, length, _d) in enumerate(secs):
                cands.append((ti, ri, si, pos, copies, length))
                pos += copies * length
    if not cands:
        return data
    ti, ri, si, pos, copies, length = rng.choice(cands)
    if not length:
        return data
    body = bytearray(stream[pos: pos + length])
    how = rng.random()
    if how < 0.3:
        body = bytearray(rng.randrange(256) for _ in range(length))
    elif how < 0.6:
        for _ in range(rng.choice([1, 4, 16])):
            body[rng.randrange(length)] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    else:
        fill = rng.choice([b"\xff", b"\x00", b"\x7f\x7f\x7f\x7f", b"\xff\xff\xff\x7f"])
        start = rng.randrange(length)
        n = length - start
        body[start:] = (fill * (n // len(fill) + 1))[:n]
    for c in range(copies):
        stream[pos + c * length: pos + (c + 1) * length] = body
    idx["tensors"][ti]["records"][ri][4][si][3] = hash64(bytes(body))
    # keep the record header's own copy of the digest consistent too
    off, hs = idx["tensors"][ti]["records"][ri][:2]
    head = RecordHeader.parse(bytes(stream), off)
    secs = list(head.sections)
    secs[si] = secs[si]._replace(digest=hash64(bytes(body)))
    stream[off: off + hs] = head._replace(sections=tuple(secs)).pack()
    return restream(data, bytes(stream), idx)


def m_tree(data: bytes, rng: random.Random) -> bytes:
    p = parse(data)
    idx = copy.deepcopy(p.index)
    idx["tree"] = mutate_index_doc(idx["tree"], rng)
    return reseal(data, idx)


def m_no_footer(data: bytes, rng: random.Random) -> bytes:
    """Cut the footer off (the record scan takes over) and optionally damage the stream."""
    p = parse(data)
    out = p.striped[: rng.randrange(C.SUPERBLOCK.size, len(p.striped) + 1)]
    return m_smash(out, rng) if rng.random() < 0.5 and out else out


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": m_flip, "smash": m_smash, "truncate": m_truncate, "index": m_index, "trailer": m_trailer,
    "record": m_record, "section_bytes": m_section_bytes, "tree": m_tree, "no_footer": m_no_footer,
}


def mutate(data: bytes, rng: random.Random, name: str | None = None) -> tuple[str, bytes]:
    """One mutation of a valid file: ``(mutation name, new bytes)``."""
    name = name or rng.choice(sorted(MUTATIONS))
    return name, MUTATIONS[name](data, rng)


# --------------------------------------------------------------------------- running a load


def _load(data: bytes) -> None:
    decoding.load_file(io.BytesIO(data))  # the DTDR decoder (torch_dtdr.load hands non-DTDR bytes to torch.load)


def _open(data: bytes) -> None:
    import torch_dtdr

    with torch_dtdr.open(io.BytesIO(data)) as f:
        f.metadata()
        for k in f.keys():
            f.get_tensor(k)


#: What a user may do with untrusted bytes (shared with fuzz_load.py).
ENTRY_POINTS = (_load, _open)


def exercise(data: bytes) -> list:
    """Everything a user may do with untrusted bytes: the DTDR decoder (what ``api.load`` runs for a DTDR file), and
    ``open`` + every tensor + the metadata. Returns the typed errors
    (:class:`~torch_dtdr.errors.DTDRError`) raised; anything else propagates."""
    import warnings

    from torch_dtdr.errors import DamageWarning, DTDRError

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        for fn in ENTRY_POINTS:
            try:
                fn(data)
            except DTDRError as e:
                out.append(e)
    return out


def struct_u64(v: int) -> bytes:
    return struct.pack("<Q", v % (1 << 64))
