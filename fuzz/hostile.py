"""The hand-written hostile corpus (issue 8): one crafted file per attack, and
the typed error a reader must answer with.

``python tests/data/hostile/make_hostile.py`` writes these into
``tests/data/hostile/`` (with ``expected.json``); ``tests/test_hostile.py``
loads each one in a subprocess under a CPU-time and memory budget.
Every checksum is valid, so each file reaches the check it is aimed at.
"""

from __future__ import annotations

import copy
import json
import random
import struct

import torch

from torch_dtdr.format import constants as C
from torch_dtdr.integrity.checksum import hash64

from . import craft

GIB = 1 << 30


def rle_zstd_frame(total: int, declared: int | None = None, byte: int = 0) -> bytes:
    """A zstd frame of ``total`` equal bytes, written by hand as RLE blocks
    (4 bytes per 128 KiB: the densest zstd gets), declaring ``declared``."""
    declared = total if declared is None else declared
    out = bytearray(b"\x28\xb5\x2f\xfd") + bytes([0xC0, 0x38]) + struct.pack("<Q", declared)
    block = 1 << 17
    n = max(1, -(-total // block))
    for i in range(n):
        size = min(block, total - i * block)
        head = (1 if i == n - 1 else 0) | (1 << 1) | (size << 3)
        out += head.to_bytes(3, "little") + bytes([byte])
    return bytes(out)


def _base():
    data = craft.save_bytes({"x": torch.arange(16, dtype=torch.float32), "y": torch.arange(8, dtype=torch.float32)},
                            codec="raw", parity=(4, 1))
    return data, craft.parse(data).index


def _with(doc, fn):
    d = copy.deepcopy(doc)
    fn(d)
    return d


def _scan_file(tensor: dict, pieces: list[bytes]) -> bytes:
    """A footer-less (truncated) file: superblock, manifest, ``pieces``."""
    idx = craft.manifest_doc([tensor])
    return craft.build(pieces, manifest=idx, footer=False)


def corpus() -> dict[str, tuple[bytes, dict]]:
    """``name -> (file bytes, expectation)``. An expectation names the error
    class (``error``), optionally the ``field`` it must carry, and ``why``."""
    data, idx = _base()
    out: dict[str, tuple[bytes, dict]] = {}

    def index_case(name, fn, error, field, why):
        out[name] = (craft.reseal(data, _with(idx, fn)), {"error": error, "field": field, "why": why})

    def raw_case(name, raw, error, field, why):
        out[name] = (craft.reseal(data, index_raw=raw), {"error": error, "field": field, "why": why})

    def t(d, i=0):
        return d["tensors"][i]

    # --- sizes -----------------------------------------------------------------------------
    index_case("numel_2p62", lambda d: t(d).update(shape=[1 << 31, 1 << 31]), "FormatError", "shape",
               "declared numel 2^62: 2^64 bytes, over the memory cap")
    index_case("numel_overflow", lambda d: t(d).update(shape=[1 << 40, 1 << 40, 1 << 40]), "FormatError", "shape",
               "numel past 2^62 (2^120): refused while multiplying, before any use")
    index_case("numel_1gib_in_tiny_record",
               lambda d: (t(d).update(shape=[1 << 28], segment_elems=1 << 28), t(d)["records"][0].__setitem__(3, 1 << 28)),
               "FormatError", "record.elem_count", "a 64-byte record declaring 2^28 float32 elements (1 GiB)")
    index_case("offset_past_end", lambda d: t(d)["records"][0].__setitem__(0, d["stream_length"] + 10 ** 9),
               "FormatError", "records", "record offset 1 GB past the end of the stream")
    index_case("length_past_end", lambda d: t(d)["records"][0][4][0].__setitem__(2, 1 << 62),
               "FormatError", "records", "section length 2^62")
    index_case("negative_length", lambda d: t(d)["records"][0][4][0].__setitem__(2, -1),
               "FormatError", "section.length", "section length -1")
    index_case("negative_elem_count", lambda d: t(d)["records"][0].__setitem__(3, -16),
               "FormatError", "record.elem_count", "elem_count -16")
    index_case("negative_offset", lambda d: t(d)["records"][0].__setitem__(0, -4096),
               "FormatError", "record.offset", "record offset -4096")
    index_case("negative_dim", lambda d: t(d).update(shape=[-1, -16]), "FormatError", "x.shape", "shape [-1, -16]")
    index_case("too_many_dims", lambda d: t(d).update(shape=[1] * 65), "FormatError", "shape", "65 dimensions")
    index_case("header_size_mismatch", lambda d: t(d)["records"][0].__setitem__(1, 4000),
               "FormatError", "record.header_size", "header_size not 40 + 32 * sections")
    index_case("sections_17", lambda d: t(d)["records"][0].__setitem__(4, [[f"s{i}", 1, 1, 0] for i in range(17)]),
               "FormatError", "record.sections", "17 sections (the limit is 16)")
    index_case("copies_16", lambda d: t(d)["records"][0][4][0].__setitem__(1, 16),
               "FormatError", "section.copies", "16 copies of a section (the limit is 15)")
    index_case("overlapping_records", lambda d: t(d, 1)["records"][0].__setitem__(0, t(d)["records"][0][0]),
               "FormatError", "records", "two tensors' records over the same bytes")
    index_case("records_gap_in_tiling", lambda d: t(d)["records"][0].__setitem__(2, 1),
               "FormatError", "records", "records starting at element 1")
    index_case("stream_length_mismatch", lambda d: d.update(stream_length=d["stream_length"] + 1),
               "FormatError", "stream_length", "index and trailer disagree on the stream length")
    index_case("stream_length_missing", lambda d: d.pop("stream_length"),
               "FormatError", "stream_length", "footer index without stream_length")
    index_case("index_not_object", lambda d: d.clear(), "FormatError", "format", "an empty index object")

    # --- names and strings -----------------------------------------------------------------
    index_case("duplicate_tensor_names", lambda d: t(d, 1).update(name="x"), "FormatError", "tensors[1].name",
               "two tensors named 'x'")
    index_case("duplicate_entry_names", lambda d: d["tree"]["entries"][1].update(name="x"), "FormatError",
               "entries[1].name", "two tree entries named 'x'")
    index_case("duplicate_dict_keys",
               lambda d: d["tree"].update(root=["dict", "x", ["tensor", 0], "x", ["tensor", 1]]),
               "FormatError", None, "a dict node with the key 'x' twice")
    index_case("dict_key_list", lambda d: d["tree"].update(root=["dict", ["tensor", 0], 1]),
               "FormatError", None, "a dict key that is a tensor node")
    index_case("dict_key_bytes", lambda d: d["tree"].update(root=["dict", ["bytes", "AAAA"], 1]),
               "FormatError", None, "a dict key that is a bytes node")
    index_case("long_name", lambda d: t(d).update(name="n" * 70000), "FormatError", "tensors[0].name",
               "a 70000-character tensor name")
    index_case("unknown_dtype", lambda d: t(d).update(dtype="object"), "FormatError", "dtype", "dtype 'object'")
    index_case("metadata_not_string", lambda d: d.update(metadata={"k": 5}), "FormatError", "metadata['k']",
               "a metadata value that is an integer")
    raw = craft.encode_index(idx).replace(b'"name":"x"', b'"name":"\xff\xfe"', 1)
    raw_case("non_utf8_name", raw, "FormatError", "index", "a tensor name that is not UTF-8")
    raw = craft.encode_index(idx)
    raw_case("duplicate_json_members", raw[:-1] + b',"tensors":[]}', "FormatError", "index",
             "the index object has two 'tensors' members")
    raw_case("nan_literal", raw.replace(b'"metadata":{}', b'"metadata":{"a":NaN}', 1), "FormatError", "index",
             "a NaN literal")
    raw_case("int_5000_digits", raw.replace(b'"metadata":{}', b'"metadata":{"a":' + b"9" * 5000 + b"}", 1),
             "FormatError", "index", "a 5000-digit integer literal")
    index_case("tree_int_5000_digits", lambda d: d["tree"].update(root=["int", "9" * 5000]), "FormatError", "root",
               "a 5000-digit int node")

    # --- nesting ---------------------------------------------------------------------------
    nest = b"[" * 10 ** 6 + b"]" * 10 ** 6
    raw_case("nested_lists_1e6", raw.replace(b'"metadata":{}', b'"metadata":{},"x":' + nest, 1), "FormatError",
             "index", "10^6 nested JSON lists in the index")
    deep = [0]
    for _ in range(600):
        deep = ["list", deep]
    index_case("tree_depth_600", lambda d: d["tree"].update(root=deep), "FormatError", None,
               "tree containers nested 600 deep (the limit is 500)")

    # --- zstd bombs --------------------------------------------------------------------------
    bomb = rle_zstd_frame(10 ** 3, declared=10 * GIB)
    out["zstd_bomb_10g_in_1k"] = (craft.reseal(data, index_payload=bomb),
                                  {"error": "FormatError", "field": "index",
                                   "why": f"a {len(bomb)}-byte zstd frame declaring 10 GiB as the index"})
    real = rle_zstd_frame(32 << 20)
    out["zstd_bomb_32m_real"] = (craft.reseal(data, index_payload=real),
                                 {"error": "FormatError", "field": "index",
                                  "why": f"a {len(real)}-byte zstd frame that really expands to 32 MiB"})
    nosize = craft.zstd_frame(craft.encode_index(idx), content_size=False)
    out["zstd_no_content_size"] = (craft.reseal(data, index_payload=nosize),
                                   {"error": "FormatError", "field": "index",
                                    "why": "an index frame without a declared size"})
    out["zstd_lying_size"] = (craft.reseal(data, index_payload=rle_zstd_frame(1 << 22, declared=100)),
                              {"error": "FormatError", "field": "index",
                               "why": "a frame declaring 100 bytes that holds 4 MiB"})
    out["zstd_residual_bomb"] = (_residual_bomb(), {"error": "IntegrityError", "field": None,
                                                    "why": "a dtdr residual frame declaring 10 GiB: the residual "
                                                           "is lost (degraded in recover mode), never expanded"})

    # --- codecs ------------------------------------------------------------------------------
    index_case("unknown_codec", lambda d: t(d).update(codec={"name": "pickle"}), "CodecError", None,
               "codec 'pickle'")
    index_case("codec_extra_param", lambda d: t(d).update(codec={"name": "raw", "__class__": "os.system"}),
               "CodecError", None, "a codec parameter that is not a field")
    index_case("codec_block_huge", lambda d: t(d).update(codec={"name": "dtdr", "block_size": 1 << 40}),
               "CodecError", None, "dtdr block_size 2^40")

    # --- the object tree ----------------------------------------------------------------------
    def view_oob(d):
        d["tree"]["tensors"][0].update(shape=[1 << 20], stride=[1])

    index_case("tree_view_out_of_bounds", view_oob, "FormatError", "tensors[0]",
               "a view reaching past its entry's bytes")
    index_case("tree_ndarray_view_2p64",
               lambda d: d["tree"]["tensors"][0].update(shape=[1 << 31, 1 << 31], stride=[0, 0], kind="ndarray",
                                                        np_dtype="float32"),
               "FormatError", "tensors[0].shape", "a broadcast ndarray view of 2^64 bytes (numpy cannot make it)")
    index_case("tree_dtype_mismatch", lambda d: d["tree"]["entries"][0].update(dtype="float64"),
               "FormatError", None, "the tree and the index disagree on a dtype")
    index_case("tree_entry_count", lambda d: d["tree"]["entries"].pop(), "FormatError", "entries",
               "the tree lists fewer entries than the container holds")
    index_case("tree_unknown_tag", lambda d: d["tree"].update(root=["eval", "__import__('os')"]),
               "FormatError", "root", "an unknown node tag")
    index_case("tree_format_v2", lambda d: d["tree"].update(version=2), "UnsupportedVersionError", "version",
               "a newer tree version")
    index_case("format_v2", lambda d: d.update(format=[2, 0]), "UnsupportedVersionError", "major",
               "format major version 2")

    # --- the record scan of a truncated file ---------------------------------------------------
    huge = {"name": "x", "dtype": "float32", "shape": [1 << 31, 1 << 31], "codec": {"name": "raw"},
            "segment_elems": 1 << 20}
    out["scan_numel_2p62"] = (_scan_file(huge, []), {"error": "FormatError", "field": "shape",
                                                     "why": "a truncated file whose manifest declares 2^62 elements"})
    big = {"name": "x", "dtype": "float32", "shape": [1 << 28], "codec": {"name": "raw"}, "segment_elems": 1 << 28}
    rec = craft.record(C.RECORD_KIND_SEGMENT, 0, 0, 1 << 28, [("data", 1, b"\0" * 64, 1 << 30)])
    out["scan_cut_record_1gib"] = (_scan_file(big, [rec]),
                                   {"error": "TruncatedError", "field": None,
                                    "why": "a truncated file whose last record declares 1 GiB of which 64 bytes exist"})
    small = {"name": "x", "dtype": "float32", "shape": [16], "codec": {"name": "raw"}, "segment_elems": 16}
    recs = [craft.record(C.RECORD_KIND_SEGMENT, 0, 0, 16, [("data", 1, bytes(64))]),
            craft.record(C.RECORD_KIND_SEGMENT, 0, 16, 16, [("data", 1, bytes(64))])]
    out["scan_records_past_numel"] = (_scan_file(dict(small, shape=[8]), recs),
                                      {"error": "TruncatedError", "field": None,
                                       "why": "scanned records covering more elements than the tensor has"})
    flood = b"DREC" * (1 << 16)
    out["scan_record_magic_flood"] = (_scan_file(small, [flood]),
                                      {"error": "TruncatedError", "field": None,
                                       "why": "256 KiB of record magic with no valid header: the scan resyncs linearly"})
    out["blob_header_flood"] = (_blob_flood(), {"error": "FormatError", "field": None,
                                                "why": "512 pages of valid index blob headers, each claiming the rest of the file"})

    # --- trivia --------------------------------------------------------------------------------
    out["empty_file"] = (b"", {"error": "TruncatedError", "field": None, "why": "zero bytes"})
    rng = random.Random(8)
    out["garbage_1k"] = (bytes(rng.randrange(256) for _ in range(1024)),
                         {"error": "FormatError", "field": None, "why": "1 KiB of random bytes"})
    out["magic_only"] = (C.MAGIC, {"error": "FormatError", "field": None, "why": "the 8-byte magic alone"})
    return out


def _residual_bomb() -> bytes:
    """A lossless-dtdr file whose first residual zstd frame declares 10 GiB
    (every checksum valid, so only the codec's own cap stands in the way)."""
    import numpy as np

    x = torch.from_numpy(np.random.default_rng(0).standard_normal(2048).astype("float32"))
    data = craft.save_bytes({"w": x}, codec="dtdr", parity=(4, 1))
    p = craft.parse(data)
    stream = bytearray(craft.logical_stream(data))
    idx = copy.deepcopy(p.index)
    off, hs, _s, _c, secs = idx["tensors"][0]["records"][0]
    pos = off + hs
    for si, (name, copies, length, _d) in enumerate(secs):
        if name == "residual":
            body = bytearray(stream[pos: pos + length])
            (magic,) = struct.unpack_from("<I", body, 0)
            assert magic == 0xFD2FB528
            # frame header: descriptor byte, then the window/size fields; rewrite as an 8-byte content size
            hdr = bytes([0xC0, 0x38]) + struct.pack("<Q", 10 * GIB)
            body = bytearray(body[:4] + hdr + body[4 + len(hdr):])
            stream[pos: pos + length] = body
            secs[si][3] = hash64(bytes(body))
            from torch_dtdr.format.records import RecordHeader

            head = RecordHeader.parse(bytes(stream), off)
            new = list(head.sections)
            new[si] = new[si]._replace(digest=hash64(bytes(body)))
            stream[off: off + hs] = head._replace(sections=tuple(new)).pack()
            break
        pos += copies * length
    return craft.restream(data, bytes(stream), idx)


def _blob_flood(n: int = 512) -> bytes:
    """``n`` pages, each starting with a valid index blob header whose payload
    runs to the end of the file (and never matches its digest)."""
    from torch_dtdr.format.records import BlobHeader

    page = C.PAGE
    out = bytearray(n * page)
    for i in range(n):
        head = BlobHeader(C.BLOB_KIND_INDEX, 0, 1, (n - i - 1) * page, i).pack()
        out[i * page: i * page + len(head)] = head
    return bytes(out)


def write(folder: str) -> None:
    import os

    exp = {}
    for name, (blob, e) in sorted(corpus().items()):
        with open(os.path.join(folder, name + ".dtdr"), "wb") as f:
            f.write(blob)
        exp[name] = dict(e, size=len(blob))
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1, sort_keys=True)
        f.write("\n")


__all__ = ["corpus", "rle_zstd_frame", "write"]
