"""The index parser's allocation discipline: records as tuples, the cycle
collector paused while an index is turned into objects (and always restored)."""

from __future__ import annotations

import gc
import json
import pickle
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_dtdr
from torch_dtdr._json import cycle_collection_paused
from torch_dtdr.errors import FormatError
from torch_dtdr.format.index import RecordInfo, SectionEntry, encode_index, parse_index
from torch_dtdr.format.reader import ContainerReader
from torch_dtdr.storage import open_source


@pytest.fixture
def gc_state():
    was = gc.isenabled()
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    (gc.enable if was else gc.disable)()


def test_record_end_is_derived_from_its_sections_and_survives_pickle_and_replace():
    rec = RecordInfo(4096, 100, 0, 10, (SectionEntry("meta", 1, 16, 7), SectionEntry("base", 3, 50, 9)))
    assert rec.body_start == 4196
    assert rec.end == 4196 + 16 + 150
    assert rec.sections[1].stored_length == 150
    assert pickle.loads(pickle.dumps(rec)) == rec
    moved = rec._replace(offset=8192)
    assert moved.end == 8192 + 100 + 166 and moved.sections == rec.sections
    assert RecordInfo(*rec[:5]) == rec


def test_the_collector_is_restored_after_a_pause(gc_state):
    gc.enable()
    with cycle_collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with cycle_collection_paused():
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()  # a caller that turned it off keeps it off
    with cycle_collection_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_overlapping_pauses_on_two_threads_restore_the_collector_once_both_end(gc_state):
    gc.enable()
    inside, release = threading.Event(), threading.Event()

    def other():
        with cycle_collection_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with cycle_collection_paused():
        pass
    assert not gc.isenabled(), "the other thread's pause is still running"
    release.set()
    t.join(10)
    assert gc.isenabled()


def _index_bytes(tmp_path) -> bytes:
    sd = {f"layer{i}.bias": torch.full((3,), float(i)) for i in range(600)}
    path = tmp_path / "many.dtdr"
    torch_dtdr.save(sd, path)
    with open_source(str(path), None) as src:
        index = ContainerReader(src).index
    return encode_index(dict(index.to_json(), stream_length=index.stream_length))


def test_parsing_a_large_index_starts_no_cycle_collection(tmp_path, gc_state):
    raw = _index_bytes(tmp_path)
    started = []

    def count(phase, info):  # a collection started from inside the parser, with the parser's frame on the stack
        frame = sys._getframe()
        while frame is not None and phase == "start":
            if frame.f_code.co_name == "_parse_index":
                started.append(info["generation"])
                break
            frame = frame.f_back

    gc.enable()
    gc.set_threshold(50, 2, 2)  # without the pause, thousands of containers set off many collections
    gc.callbacks.append(count)
    try:
        index = parse_index(raw)
    finally:
        gc.callbacks.remove(count)
    assert len(index.tensors) == 600 and all(t.records for t in index.tensors)
    assert started == []
    assert gc.isenabled()


def test_a_malformed_index_still_restores_the_collector(tmp_path, gc_state):
    gc.enable()
    raw = _index_bytes(tmp_path).replace(b'"segment_elems":', b'"segment_elems":-', 1)
    with pytest.raises(FormatError, match="segment_elems"):
        parse_index(raw)
    assert gc.isenabled()


def _reference_bad_chunks(reader, first_chunk: int, hashes) -> list[int]:
    """The chunk check spelled out: chunk j's entry sits at (j // k) * (k + m) + j % k of each table."""
    g = reader.geometry
    bad = []
    for i, digest in enumerate(hashes):
        j = first_chunk + i
        idx = (j // g.k) * (g.k + g.m) + j % g.k
        if not any(idx < len(table) and int(table[idx]) == int(digest) for table in reader._sums):
            bad.append(i)
    return bad


@pytest.mark.parametrize("tables", ["one", "three copies, one short"])
def test_the_chunk_check_by_slices_agrees_with_the_spelled_out_one(tmp_path, tables):
    import numpy as np

    from torch_dtdr.integrity.checksum import chunk_hashes

    path = tmp_path / "big.dtdr"
    torch_dtdr.save({"w": torch.randn(300_000), "b": torch.randn(5)}, path, parity=(4, 2))
    rng = np.random.default_rng(7)
    with open_source(str(path), None) as src:
        reader = ContainerReader(src)
        sums = reader._sums[0].copy()
        if tables != "one":
            short = sums[: len(sums) * 2 // 3].copy()
            other = sums.copy()
            other[rng.choice(len(other), 20, replace=False)] ^= 1
            reader._sums = [sums, other, short]
        c = reader.geometry.chunk_size
        n_chunks = reader.geometry.n_data_chunks
        for trial in range(40):
            first = int(rng.integers(0, n_chunks - 1))
            count = int(rng.integers(1, min(60, n_chunks - first) + 1))
            buf = bytearray(reader.read_logical(first * c, (first + count) * c, verify=False).data)
            for pos in rng.choice(len(buf), int(rng.integers(0, 6)), replace=False):
                buf[pos] ^= 0x40
            want = _reference_bad_chunks(reader, first, chunk_hashes(buf, c))
            assert reader._bad_chunks(first, memoryview(buf)) == want, (trial, first, count)


def _index_for_text(provenance: bool):
    from torch_dtdr.format.index import Index, TensorInfo

    tensors = [
        TensorInfo("w\u00e9ight \"q\"\n", torch.float32, (3, 4), {"name": "dtdr", "block_size": 256, "seed": 0,
                                                             "level": 3}, 1 << 20),
        TensorInfo("b", torch.bfloat16, (), {"name": "raw", "copies": 3}, 7),
        TensorInfo("empty", torch.int64, (0,), {"name": "raw", "copies": 5}, 1 << 20),
    ]
    if provenance:
        tensors[1].provenance = {"status": "degraded", "source": "x.dtdr", "degraded_elements": 2,
                                 "error_bound": 0.5}
    tree = {"format": "torch_dtdr.tree", "version": 1, "root": ["dict", "a\u2603", ["tensor", 0], "n", 1.5e300]}
    return Index(tree, tensors, {"k\u00fc": "v\\"}, {"chunk_size": 4096, "k": 32, "m": 2, "inner_nsym": 0,
                                                    "algorithm": "isa_l_rs_cauchy"})


@pytest.mark.parametrize("provenance", [False, True])
def test_the_spliced_index_text_is_the_canonical_encoding_of_the_index(provenance):
    from torch_dtdr.format.index import IndexText

    index = _index_for_text(provenance)
    text = IndexText(index)
    assert text.manifest() == encode_index(index.to_json(with_records=False))
    index.tensors[0].records.append(RecordInfo(4096, 104, 0, 12, (SectionEntry("meta", 3, 4, 2**64 - 1),
                                                                    SectionEntry("base", 1, 12, 5))))
    index.tensors[0].records.append(RecordInfo(8192, 80, 12, 0, ()))
    index.geometry["n_data_chunks"] = 3
    assert text.full(12345) == encode_index(dict(index.to_json(), stream_length=12345))
    index.tensors.append(index.tensors[0])
    with pytest.raises(ValueError, match="changed after its manifest"):
        text.full(1)


def test_a_saved_file_holds_the_canonical_encoding_of_its_index(tmp_path):
    """The footer's index (read back raw) is the dict encoding of the index parsed from it."""
    from torch_dtdr.format import constants
    from torch_dtdr.format.index import decompress_index
    from torch_dtdr.format.records import BlobHeader, Trailer

    path = tmp_path / "x.dtdr"
    torch_dtdr.save({"a": torch.randn(300), "b": [torch.arange(5), {"c\u00e9": torch.zeros(2, 3, dtype=torch.bfloat16)}]},
                    path, codec={"a": "dtdr8"}, metadata={"who": "\u2603"})
    raw = path.read_bytes()
    trailer = Trailer.parse(raw)
    head = BlobHeader.parse(raw, trailer.footer_offset)
    assert head.kind == constants.BLOB_KIND_INDEX
    start = trailer.footer_offset + constants.BLOB_HEAD_SIZE
    stored = decompress_index(raw[start:start + trailer.index_length])
    with open_source(str(path)) as src:
        index = ContainerReader(src).index
    assert stored == encode_index(dict(index.to_json(), stream_length=index.stream_length))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_the_canonical_encoder_writes_what_json_dumps_writes(value):
    from torch_dtdr._json import canonical_dumps

    assert canonical_dumps(value) == json.dumps(value, allow_nan=False, separators=(",", ":"),
                                                ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (float("-inf"), ValueError),
                                        (object(), TypeError), ({(1, 2): 2}, TypeError)])
def test_the_canonical_encoder_refuses_what_the_format_cannot_hold(bad, error):
    from torch_dtdr._json import canonical_dumps

    with pytest.raises(error):
        canonical_dumps({"x": [bad]})
