"""``open().get_slice(name)[...]`` of the transform codecs reads and decodes only the units that hold the
selected elements (blocks for dtdr8/dtdr16, residual frames for dtdr) and gives, bit for bit, the elements a
whole load gives: every codec and float dtype, odd sizes and tail blocks, several segments, and damaged
files, whose degraded values must be the whole decode's."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr.codecs import from_dict
from torch_dtdr.codecs.dtdr import DTDR
from torch_dtdr.codecs.dtdr8 import DTDR8
from torch_dtdr.codecs.dtdr16 import DTDR16
from torch_dtdr.faults import corrupt

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


# small blocks, frames and segments: many units, tail blocks and segment boundaries in a small tensor
SMALL_CODECS = [DTDR(block_size=64, frame_elements=256), DTDR8(block_size=64), DTDR16(block_size=32)]
KEYS = [
    (slice(0, 1),), (slice(7, 10),), (slice(-2, None),), (5,), (slice(None), 3), (slice(2, 60, 7), slice(1, None, 4)),
    (slice(30, 33), slice(20, 50)), (Ellipsis, -1), (slice(0, 0),),
]


@pytest.mark.parametrize("codec", SMALL_CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_slices_are_the_whole_loads_elements(tmp_path, codec, dtype):
    torch.manual_seed(0)
    t = (torch.randn(61, 37) * 3).to(dtype)  # 2257 elements: segments of 700 (not a multiple of 64) + a tail
    t[4, 5] = float("nan") if codec.name == "dtdr" else 0.0
    path = tmp_path / "m.dtdr"
    torch_dtdr.save({"w": t}, path, codec=codec, segment_elems=704)
    full = torch_dtdr.load(path)["w"]
    with torch_dtdr.open(path) as f:
        for key in KEYS:
            assert _same_bits(f.get_slice("w")[key], full[key]), key


@pytest.mark.parametrize("name", ["dtdr", "dtdr8", "dtdr16"])
def test_a_few_rows_of_a_large_tensor_read_a_small_fraction(tmp_path, name):
    torch.manual_seed(1)
    t = torch.randn(3001, 1027)  # 3 segments of 2**20 elements and a short one; the last block a tail
    path = tmp_path / "m.dtdr"
    torch_dtdr.save({"w": t}, path, codec=name)
    size = os.path.getsize(path)
    full = torch_dtdr.load(path)["w"]
    with torch_dtdr.open(path) as f:
        for key in [(slice(1500, 1503),), (slice(2998, None),), (slice(1020, 1022), slice(100, 900))]:
            before = f.bytes_read
            got = f.get_slice("w")[key]
            read = f.bytes_read - before
            assert _same_bits(got, full[key]), key
            # a segment is over a quarter of the file; a slice needs a frame (dtdr) or a few blocks of each
            # segment it touches (the third key: two), plus their meta
            assert read < size * (0.05 if name == "dtdr" else 0.02), (key, read, size)


def _damaged_copy(tmp_path, codec, region, seed):
    torch.manual_seed(2)
    t = torch.randn(96, 80) * 2
    path = tmp_path / f"{codec.name}-{region}-{seed}.dtdr"
    torch_dtdr.save({"w": t}, path, codec=codec, parity="off", segment_elems=2048)
    # meta is stored 3 times: damage enough of it that votes cannot restore every factor (the rest, replaced
    # by the median of the segment's good ones, decode as the whole decode decodes them)
    how = {"fraction": 0.3} if region == "meta" else {"count": 12}
    corrupt(str(path), mode="replace", seed=seed, region=f"tensor:w:{region}", **how)
    return t, path


DAMAGED = [(codec, region) for codec in SMALL_CODECS
           for region in (["base", "residual", "meta"] if codec.name == "dtdr" else ["base", "meta"])]


@pytest.mark.parametrize("codec, region", DAMAGED, ids=lambda v: v if isinstance(v, str) else v.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_damaged_slices_are_the_whole_decodes_degraded_values(tmp_path, codec, region, seed):
    saved, path = _damaged_copy(tmp_path, codec, region, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, rep = torch_dtdr.load(path, report=True)
        assert rep.tensors[0].status == "degraded"
        full = full["w"]
        keys = [(slice(r, r + 3),) for r in range(0, 96, 3)] + [
            (slice(40, 43), slice(5, 70)), (slice(None), 7), (slice(90, None),), (slice(None),)]
        degraded_slices = 0
        with torch_dtdr.open(path) as f:
            for key in keys:
                got = f.get_slice("w")[key]
                assert _same_bits(got, full[key]), key
                exact = codec.decode(codec.encode(saved.reshape(-1)), saved.dtype, saved.numel()).values
                degraded_slices += not _same_bits(got, exact.view(saved.shape)[key])
    assert degraded_slices >= 2  # the damage reached the slices: they carry the whole decode's degraded values


def test_codec_units_api_matches_decode_on_every_unit():
    """decode_units of every unit range, from the byte ranges unit_reads names, is decode's slice."""
    torch.manual_seed(3)
    x = torch.randn(1000) * 5
    for codec in SMALL_CODECS:
        sections = codec.encode(x)
        whole = codec.decode(sections, x.dtype, x.numel()).values
        unit = codec.unit_elements()
        n_units = -(-x.numel() // unit)
        lengths = {k: len(v) for k, v in sections.items()}
        for u0, u1 in [(0, 1), (1, 3), (n_units - 1, n_units), (0, n_units)]:
            reads = codec.unit_reads(x.dtype, x.numel(), (u0, u1), sections["meta"], None, lengths)
            assert set(reads) | {"meta"} == set(sections)
            data = {"meta": sections["meta"], **{k: sections[k][a:b] for k, (a, b) in reads.items()}}
            got = codec.decode_units(data, x.dtype, x.numel(), (u0, u1), None, lengths).values
            assert _same_bits(got, whole[u0 * unit: u1 * unit]), (codec.name, u0, u1)
        assert from_dict({"name": "raw"}).unit_elements() is None
