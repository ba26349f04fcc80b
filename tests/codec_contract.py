"""The contract every codec keeps, as a reusable test class (in the spirit of zarr's StoreTests).

Subclass :class:`CodecContract` and set :attr:`CodecContract.make` (tests/test_codec_contract.py does it
for every registered codec, so a new codec gets these tests for free): a round trip is bit-exact for a
lossless codec and exact-as-meant for a lossy one, encoding is deterministic, the sections ``encode``
returns are the ones ``sections`` declares, ``decode`` never raises on damaged or missing sections and
never returns a NaN or Inf that was not saved, and ``to_dict`` / ``from_dict`` rebuild the codec.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from torch_dtdr import codecs
from torch_dtdr.codecs import Damage

CANDIDATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
                    torch.uint8, torch.bool)


def sample(dtype: torch.dtype, n: int = 3000, seed: int = 0) -> torch.Tensor:
    """A deterministic 1-D tensor of ``dtype``: smooth floats with outliers, or spread integers."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_floating_point:
        x = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
        x[::97] *= 40  # outliers
        return x.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), (n,), generator=g, dtype=torch.int64
                         ).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(torch.uint8).numpy()) == bytes(
        b.contiguous().view(torch.uint8).numpy())


class CodecContract:
    """Tests every codec passes. ``make`` builds the codec under test."""

    make = None  # () -> Codec

    def codec(self):
        return type(self).make()

    def dtypes(self):
        c = self.codec()
        found = [d for d in CANDIDATE_DTYPES if c.accepts(d)]
        assert found, f"{c.name} accepts none of {CANDIDATE_DTYPES}"
        return found

    def test_round_trip(self):
        c = self.codec()
        for dtype in self.dtypes():
            x = sample(dtype)
            enc = c.encode(x)
            r = c.decode(enc, dtype, x.numel())
            assert r.exact and r.degraded_elements == 0, (c.name, dtype)
            assert r.values.dtype == dtype and r.values.shape == x.shape
            if c.lossless:
                assert same_bits(r.values, x), (c.name, dtype)
            elif dtype.is_floating_point:
                assert torch.isfinite(r.values).all()
                err = (r.values.double() - x.double()).abs().max().item()
                assert err <= x.double().abs().max().item(), (c.name, dtype, err)

    def test_encoding_is_deterministic(self):
        c = self.codec()
        for dtype in self.dtypes():
            x = sample(dtype, seed=3)
            assert c.encode(x) == c.encode(x.clone())

    def test_declared_sections_match_what_encode_returns(self):
        c = self.codec()
        for dtype in self.dtypes():
            enc = c.encode(sample(dtype))
            declared = [s.name for s in c.sections(dtype)]
            assert len(set(declared)) == len(declared)
            assert set(enc) == set(declared), (c.name, dtype, sorted(enc), declared)
            assert all(isinstance(v, (bytes, bytearray)) for v in enc.values())
            assert all(s.copies >= 1 for s in c.sections(dtype))

    def test_empty_segment(self):
        c = self.codec()
        for dtype in self.dtypes():
            x = torch.empty(0, dtype=dtype)
            r = c.decode(c.encode(x), dtype, 0)
            assert r.values.numel() == 0 and r.values.dtype == dtype

    def test_decode_never_raises_on_damage_and_adds_no_nan_or_inf(self):
        c = self.codec()
        rng = np.random.default_rng(7)
        for dtype in self.dtypes():
            x = sample(dtype, seed=5)
            enc = c.encode(x)
            cases = []
            for name, data in enc.items():
                if not data:
                    continue
                for _ in range(3):  # random bytes over a random range, reported as damaged
                    a = int(rng.integers(0, len(data)))
                    e = int(min(len(data), a + rng.integers(1, 64)))
                    bad = bytearray(data)
                    bad[a:e] = rng.integers(0, 256, e - a, dtype=np.uint8).tobytes()
                    cases.append(({**enc, name: bytes(bad)}, Damage(ranges={name: [(a, e)]})))
                bad = bytes(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())  # all of it
                cases.append(({**enc, name: bad}, Damage(ranges={name: [(0, len(data))]})))
                rest = {k: v for k, v in enc.items() if k != name}  # missing altogether
                cases.append((rest, Damage(missing=frozenset({name}))))
            for data, damage in cases:
                r = c.decode(data, dtype, x.numel(), damage)
                assert r.values.dtype == dtype and r.values.numel() == x.numel()
                if dtype.is_floating_point:
                    assert torch.isfinite(r.values).all(), (c.name, dtype, damage)
                if not r.exact:
                    assert r.degraded_elements > 0
                    assert r.error_bound is None or (r.error_bound >= 0 and not math.isnan(r.error_bound))

    def test_decode_into_out_gives_the_same_result_in_place(self):
        """A codec that declares ``decodes_into`` writes into the ``out`` slice it is given
        (no copy for the caller) and returns what it returns without ``out``, damaged input
        included; bytes of the surrounding tensor are left alone."""
        c = self.codec()
        if not c.decodes_into:
            return
        rng = np.random.default_rng(11)
        for dtype in self.dtypes():
            x = sample(dtype, seed=9)
            enc = c.encode(x)
            cases = [(enc, None)]
            for name, data in enc.items():
                if data:
                    a = int(rng.integers(0, len(data)))
                    bad = bytearray(data)
                    bad[a] ^= 0x5A
                    cases.append(({**enc, name: bytes(bad)}, Damage(ranges={name: [(a, a + 1)]})))
            for data, damage in cases:
                want = c.decode(data, dtype, x.numel(), damage)
                whole = torch.full((x.numel() + 10,), 7, dtype=dtype) if dtype != torch.bool else \
                    torch.ones(x.numel() + 10, dtype=dtype)
                target = whole[5: 5 + x.numel()]
                got = c.decode(data, dtype, x.numel(), damage, out=target)
                assert got.values.data_ptr() == target.data_ptr(), (c.name, dtype)
                assert same_bits(got.values, want.values) and same_bits(target, want.values), (c.name, dtype)
                assert (got.exact, got.degraded_elements, got.error_bound) == \
                    (want.exact, want.degraded_elements, want.error_bound)
                assert same_bits(whole[:5], torch.full((5,), 7, dtype=dtype) if dtype != torch.bool
                                 else torch.ones(5, dtype=dtype))

    def test_to_dict_and_from_dict(self):
        c = self.codec()
        d = c.to_dict()
        assert d["name"] == c.name
        assert json.loads(json.dumps(d)) == d
        assert codecs.from_dict(d) == c
        assert codecs.from_dict(json.loads(json.dumps(d))).to_dict() == d

    def test_unknown_parameters_are_refused(self):
        from torch_dtdr.errors import CodecError

        with pytest.raises(CodecError):
            codecs.from_dict({**self.codec().to_dict(), "no_such_parameter": 1})
