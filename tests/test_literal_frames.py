"""The residual's entropy stage: zstd frames of Huffman-coded literal blocks (docs/codecs.md 4.6).

The reference writer (``_literal_frames.py``) must make frames that zstd itself decodes to the
payload, whatever the payload (one byte, all equal, incompressible, more than 128 distinct bytes,
codes that need length limiting, chunks past 128 KiB); the compiled writer must make the same
bytes. zstd here is the real decoder of the ``zstandard`` package, not a model of it.
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_dtdr.codecs import _literal_frames as literal_frames
from torch_dtdr.codecs import native

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

needs_native = pytest.mark.skipif(
    native.core() != "native",
    reason="the compiled core is not in use (TORCH_DTDR_NATIVE=0 or not built): nothing to compare",
)


def payload_of(kind: str, n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        a = rng.integers(0, 256, n, dtype=np.uint8)
    elif kind == "geometric":
        a = np.minimum(rng.geometric(0.4, n) - 1, 255).astype(np.uint8)
    elif kind == "wide":  # many distinct bytes, some past 128 (escapes): FSE-compressed weights
        a = np.minimum(rng.geometric(0.03, n), 255).astype(np.uint8)
    elif kind == "two":
        a = rng.integers(0, 2, n, dtype=np.uint8) * 7
    elif kind == "equal":
        a = np.full(n, 3, np.uint8)
    elif kind == "rare":  # one byte dominant, a few rare ones: the longest codes need limiting
        a = np.full(n, 1, np.uint8)
        a[rng.integers(0, n, max(1, n // 5000))] = rng.integers(2, 250, max(1, n // 5000), dtype=np.uint8)
        a[rng.integers(0, n, max(1, n // 7))] = 0
    else:  # zipf
        a = np.minimum(rng.zipf(1.4, n), 255).astype(np.uint8)
    return a.tobytes()


KINDS = ["uniform", "geometric", "wide", "two", "equal", "rare", "zipf"]
SIZES = [1, 2, 5, 6, 7, 1023, 1024, 16383, 16384, 65536, 131072, 131073, 300001]


def decoded(frame: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(frame)


def blocks(frame: bytes) -> list[tuple[int, int]]:
    """(block type, literals type or -1) of each block of one of our frames."""
    out, at = [], 10
    while True:
        header = int.from_bytes(frame[at : at + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        out.append((kind, frame[at + 3] & 3 if kind == 2 else -1))
        at += 3 + (1 if kind == 1 else size)
        if header & 1:
            assert at == len(frame)
            return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_zstd_decodes_every_frame_to_its_payload(kind, n):
    data = payload_of(kind, n, seed=n)
    third = n // 3
    for parts in ((n, 0, 0), (third, third, n - 2 * third), (0, n, 0)):
        frame = literal_frames.frame(data, parts)
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == n and not params.has_checksum
        assert decoded(frame) == data
        assert len(frame) <= literal_frames.frame_bound(*parts)


def test_block_choices():
    """All-equal chunks are RLE blocks, incompressible ones raw, skewed ones compressed literals;
    every part starts its own block, and chunks are at most 128 KiB."""
    equal = payload_of("equal", 1000, 0)
    assert blocks(literal_frames.frame(equal, (1000, 0, 0))) == [(1, -1)]
    uniform = payload_of("uniform", 5000, 0)
    assert blocks(literal_frames.frame(uniform, (5000, 0, 0))) == [(0, -1)]
    skewed = payload_of("geometric", 300000, 0)
    assert blocks(literal_frames.frame(skewed, (300000, 0, 0))) == [(2, 2)] * 3
    mixed = equal + skewed[:70000] + uniform
    assert blocks(literal_frames.frame(mixed, (1000, 70000, 5000))) == [(1, -1), (2, 2), (0, -1)]
    empty = literal_frames.frame(b"", (0, 0, 0))
    assert decoded(empty) == b"" and blocks(empty) == [(0, -1)]


def test_table_descriptions_direct_and_fse():
    """Weights are written as 4-bit values when every byte is at most 128 and that is shorter,
    and FSE-compressed otherwise; zstd reads both."""
    def description_header(data):
        frame = literal_frames.frame(data, (len(data), 0, 0))
        assert blocks(frame) == [(2, 2)]
        header_len = {0: 3, 1: 3, 2: 4, 3: 5}[(frame[13] >> 2) & 3]
        return frame[13 + header_len]

    few = np.random.default_rng(1).integers(0, 4, 60000, dtype=np.uint8).tobytes()
    assert description_header(few) == 127 + 3  # direct: 127 + number of weights given (the last is implied)
    wide = payload_of("wide", 60000, 1)
    assert max(wide) > 128 and description_header(wide) < 128  # FSE: its length


def kraft(lengths):
    return sum(2.0 ** -d for d in lengths if d)


def huffman_cost(hist):
    heap = [(c, [s]) for s, c in enumerate(hist) if c]
    heapq.heapify(heap)
    depth = [0] * 256
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for s in a[1] + b[1]:
            depth[s] += 1
        heapq.heappush(heap, (a[0] + b[0], a[1] + b[1]))
    return sum(c * d for c, d in zip(hist, depth))


@settings(max_examples=300, **SETTINGS)
@given(counts=st.lists(st.integers(0, 1 << 17), min_size=2, max_size=256))
def test_code_lengths_form_a_complete_limited_code(counts):
    hist = (counts + [0] * 256)[:256]
    if sum(1 for c in hist if c) < 2:
        hist[0], hist[1] = hist[0] or 1, hist[1] or 1
    lengths = literal_frames.code_lengths(hist)
    assert all((d > 0) == (c > 0) for c, d in zip(hist, lengths))
    assert max(lengths) <= literal_frames.HUFFMAN_MAX_BITS
    assert kraft(lengths) == 1.0
    cost = sum(c * d for c, d in zip(hist, lengths))
    optimal = huffman_cost(hist)
    assert cost >= optimal
    if max(literal_frames._huffman(hist)) <= literal_frames.HUFFMAN_MAX_BITS:
        assert cost == optimal  # no limiting needed: plain Huffman


def test_parts_must_cover_the_payload():
    with pytest.raises(ValueError):
        literal_frames.frame(b"abc", (1, 1, 0))


def compiled_frames(payload: bytes, specs: list[tuple[int, int, int, int]]) -> list[bytes]:
    spec = np.array(specs, np.uint64).reshape(-1, 4)
    out = bytearray(sum(literal_frames.frame_bound(*map(int, s[1:])) for s in spec))
    lengths = np.zeros(len(spec), np.uint64)
    native.module().literal_frames(payload, spec, out, lengths)
    frames, at = [], 0
    for n in lengths.tolist():
        frames.append(bytes(out[at : at + n]))
        at += n
    assert at <= len(out)
    return frames


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_compiled_writer_writes_the_reference_bytes(kind, n):
    data = payload_of(kind, n, seed=n + 1)
    third = n // 3
    specs = [(0, n, 0, 0), (0, third, third, n - 2 * third), (third, n - third, 0, 0)]
    got = compiled_frames(data, specs)
    for (offset, *parts), frame in zip(specs, got):
        assert frame == literal_frames.frame(data[offset : offset + sum(parts)], parts)


@needs_native
@settings(max_examples=200, **SETTINGS)
@given(data=st.binary(min_size=0, max_size=3000), alphabet=st.integers(1, 256), cut=st.integers(0, 3000),
       seed=st.integers(0, 2**32 - 1))
def test_compiled_writer_matches_the_reference_on_any_bytes(data, alphabet, cut, seed):
    rng = np.random.default_rng(seed)
    skewed = np.minimum(rng.geometric(1 / alphabet, len(data)) - 1, 255).astype(np.uint8)
    for payload in (data, skewed.tobytes()):
        a = min(cut, len(payload))
        parts = (a, (len(payload) - a) // 2, len(payload) - a - (len(payload) - a) // 2)
        frame = compiled_frames(payload, [(0, *parts)])[0]
        assert frame == literal_frames.frame(payload, parts)
        assert decoded(frame) == payload


@needs_native
def test_compiled_writer_checks_its_buffers():
    from torch_dtdr.errors import CodecError

    data = bytes(100)
    with pytest.raises(CodecError):  # a frame reaching past the payload
        native.module().literal_frames(data, np.array([[50, 60, 0, 0]], np.uint64), bytearray(1000), np.zeros(1, np.uint64))
    with pytest.raises(CodecError):  # an output buffer below the bound
        native.module().literal_frames(data, np.array([[0, 100, 0, 0]], np.uint64), bytearray(50), np.zeros(1, np.uint64))
    with pytest.raises(CodecError):  # no room for the lengths
        native.module().literal_frames(data, np.array([[0, 100, 0, 0]], np.uint64), bytearray(1000), np.zeros(0, np.uint64))


@needs_native
def test_compiled_writer_interleaves_lo_streams():
    """With lo streams given, each frame is followed by its lo bytes (a dtdr residual's layout)."""
    data = payload_of("geometric", 200000, 3)
    lo = bytes(range(256)) * 40
    specs = [(0, 70000, 0, 0), (70000, 65536, 256, 64208)]
    lo_specs = np.array([[5, 1000], [2000, 0]], np.uint64)
    out = bytearray(sum(literal_frames.frame_bound(*s[1:]) for s in specs) + 1000)
    lengths = np.zeros(2, np.uint64)
    native.module().literal_frames(data, np.array(specs, np.uint64), out, lengths, lo, lo_specs)
    first = literal_frames.frame(data[:70000], (70000, 0, 0))
    second = literal_frames.frame(data[70000:], (65536, 256, 64208))
    assert lengths.tolist() == [len(first), len(second)]
    assert bytes(out[: len(first) + 1000 + len(second)]) == first + lo[5:1005] + second
    from torch_dtdr.errors import CodecError

    with pytest.raises(CodecError):  # lo bytes outside lo
        native.module().literal_frames(data, np.array(specs, np.uint64), out, lengths, lo,
                                       np.array([[5, 1000], [len(lo) - 10, 11]], np.uint64))
    with pytest.raises(TypeError):
        native.module().literal_frames(data, np.array(specs, np.uint64), out, lengths, lo)
