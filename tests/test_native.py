"""The compiled codec core against the numpy/torch reference, on the same inputs.

Both cores must write byte-identical sections and decode to bit-identical
tensors, with the same exactness, degraded counts and error bounds, for every
float dtype, odd sizes, 0-d and tiny tensors, special values, every block size
and damaged or hostile input. When the reference core is forced for the whole
run (``TORCH_DTDR_NATIVE=0``) the comparisons have nothing to compare and skip
with that reason; CI runs the suite once with each core.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_dtdr
from torch_dtdr import codecs
from torch_dtdr.codecs import _blocks as B
from torch_dtdr.codecs import native
from torch_dtdr.codecs.base import Damage
from torch_dtdr.errors import CodecError

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DATA = os.path.join(os.path.dirname(__file__), "data")

needs_native = pytest.mark.skipif(
    native.core() != "native",
    reason="the compiled core is not in use (TORCH_DTDR_NATIVE=0 or not built): nothing to compare",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def both(fn):
    """``fn()`` with the compiled core, then with the reference core."""
    got = fn()
    with native.forced("reference"):
        want = fn()
    return got, want


def same_result(a, b):
    assert a.values.dtype == b.values.dtype and a.values.shape == b.values.shape
    assert raw_bytes(a.values) == raw_bytes(b.values)
    assert (a.exact, a.degraded_elements) == (b.exact, b.degraded_elements)
    assert a.error_bound == b.error_bound


@st.composite
def float_tensors(draw, max_n=3000):
    """1-D tensors of every float dtype: scaled Gaussians, random bit patterns
    (NaN payloads, infinities, subnormals), and special values sprinkled in."""
    dtype = draw(st.sampled_from(FLOATS))
    n = draw(st.one_of(st.integers(0, 40), st.integers(0, max_n)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["gauss", "bits", "mixed", "tiny", "huge"]))
    if kind == "bits":
        width = torch.finfo(dtype).bits
        hi = 1 << min(width - 1, 62)
        x = torch.randint(-hi, hi, (n,), generator=g, dtype=torch.int64).to(INTS[dtype]).view(dtype)
    else:
        scale = {"gauss": 10.0 ** draw(st.integers(-6, 3)), "mixed": 1.0, "tiny": float(torch.finfo(dtype).tiny),
                 "huge": float(torch.finfo(dtype).max) / 4}[kind]
        x = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
        if kind == "mixed" and n:
            fi = torch.finfo(dtype)
            specials = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, fi.max, -fi.max, fi.tiny,
                        fi.tiny * fi.eps, -fi.tiny * fi.eps * 3, fi.eps]
            for _ in range(draw(st.integers(1, 8))):
                x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(specials))
            if draw(st.booleans()):  # a NaN with a payload
                bits = x.view(INTS[dtype])
                nan_bits = torch.tensor(float("nan"), dtype=dtype).view(INTS[dtype]) | 5
                bits[draw(st.integers(0, n - 1))] = nan_bits
    return x


CODECS = st.one_of(
    st.builds(lambda bs, seed, fm, lvl: codecs.get("dtdr", block_size=bs, seed=seed, frame_elements=bs * fm, level=lvl),
              st.sampled_from([16, 32, 64, 256, 1024]), st.integers(0, 2**64 - 1), st.sampled_from([1, 2, 3, 64]),
              st.sampled_from([1, 3])),
    st.builds(lambda name, bs, seed: codecs.get(name, block_size=bs, seed=seed), st.sampled_from(["dtdr8", "dtdr16"]),
              st.sampled_from([16, 64, 128, 1024, 4096]), st.integers(0, 2**64 - 1)),
)


@needs_native
@settings(max_examples=300, **SETTINGS)
@given(x=float_tensors(), codec=CODECS)
def test_same_bytes_and_bits(x, codec):
    enc, enc_ref = both(lambda: codec.encode(x))
    assert enc.keys() == enc_ref.keys()
    for k in enc:
        assert bytes(enc[k]) == bytes(enc_ref[k]), k
    got, want = both(lambda: codec.decode(enc, x.dtype, x.numel()))
    same_result(got, want)
    if codec.lossless:
        assert got.exact and raw_bytes(got.values) == raw_bytes(x)


@needs_native
@settings(max_examples=300, **SETTINGS)
@given(x=float_tensors(max_n=1500), codec=CODECS, seed=st.integers(0, 2**32 - 1), reported=st.booleans())
def test_same_results_on_damaged_input(x, codec, seed, reported):
    """Every degraded path: damaged bytes (reported or not), short and missing sections."""
    enc = codec.encode(x)
    rnd = random.Random(seed)
    data, ranges, missing = dict(enc), {}, set()
    for sec in rnd.sample(sorted(enc), rnd.randint(1, len(enc))):
        buf = bytearray(enc[sec])
        action = rnd.choice(["flip", "flip", "flip", "truncate", "missing", "garbage"])
        if action == "missing":
            missing.add(sec)
            data.pop(sec)
            continue
        if action == "truncate":
            data[sec] = bytes(buf[: rnd.randrange(len(buf) + 1)])
            continue
        if action == "garbage":
            data[sec] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(2 * len(buf) + 9)))
            ranges[sec] = [(0, len(data[sec]))]
            continue
        if not buf:
            continue
        spans = []
        for _ in range(rnd.randint(1, 3)):
            a = rnd.randrange(len(buf))
            b = min(len(buf), a + rnd.choice([1, 2, 5, 40, len(buf)]))
            for i in range(a, b):
                buf[i] = rnd.randrange(256)
            spans.append((a, b))
        spans.sort()
        merged = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        data[sec] = bytes(buf)
        ranges[sec] = merged
    damage = Damage(ranges=ranges, missing=frozenset(missing)) if reported else None
    got, want = both(lambda: codec.decode(data, x.dtype, x.numel(), damage))
    same_result(got, want)
    if bool(torch.isfinite(x).all()):
        assert bool(torch.isfinite(got.values).all())  # never a NaN or Inf that was not saved


@needs_native
@pytest.mark.parametrize("block_size", [1 << k for k in range(4, 17)])
def test_every_block_size(block_size):
    g = torch.Generator().manual_seed(block_size)
    n = 2 * block_size + block_size // 2 + 1  # two full blocks and a tail
    for dtype in FLOATS:
        x = (torch.randn(n, generator=g) * 3).to(dtype)
        for name in ("dtdr", "dtdr8", "dtdr16"):
            c = codecs.get(name, block_size=block_size, seed=block_size)
            enc, enc_ref = both(lambda: c.encode(x))
            assert all(bytes(enc[k]) == bytes(enc_ref[k]) for k in enc), (name, dtype)
            got, want = both(lambda: c.decode(enc, dtype, n))
            same_result(got, want)


@needs_native
@pytest.mark.parametrize("block_size", [16, 256, 1024])
def test_sections_the_compiled_encoder_allocates_unfilled_are_written_in_full(block_size):
    """The compiled encoders write their sections into bytearrays whose memory is not
    zeroed first: with the heap just filled with 0xA5 bytes of the same sizes, every
    section still equals the reference's (a byte left unwritten would show the fill)."""
    g = torch.Generator().manual_seed(block_size)
    for n in (1, 5, block_size - 3, block_size, 3 * block_size + 7, 70_000):
        for dtype in FLOATS:
            x = (torch.randn(n, generator=g) * 3).to(dtype)
            for name in ("dtdr", "dtdr8", "dtdr16"):
                c = codecs.get(name, block_size=block_size)
                want = None
                with native.forced("reference"):
                    want = c.encode(x)
                sizes = [len(v) for v in want.values()] * 4
                dirty = [bytearray(b"\xa5" * size) for size in sizes]
                del dirty
                got = c.encode(x)
                assert {k: bytes(v) for k, v in got.items()} == {k: bytes(v) for k, v in want.items()}, (n, dtype, name)


def test_an_unfilled_bytearray_has_the_size_asked_and_refuses_a_negative_one():
    compiled = native.module()
    if compiled is None:
        pytest.skip("the compiled core is not in use (TORCH_DTDR_NATIVE=0 or not built)")
    for n in (0, 1, 4096, 1 << 20):
        b = compiled.unfilled_bytearray(n)
        assert type(b) is bytearray and len(b) == n
        b[-1:] = b"x" if n else b""
    with pytest.raises(ValueError):
        compiled.unfilled_bytearray(-1)


@needs_native
@pytest.mark.parametrize("dtype", FLOATS)
def test_residual_fields_of_every_width_decode_exactly_through_the_vector_path(dtype):
    """Whole frames of 1024-element blocks whose elements span many binades, so
    that a block's residual fields take every width from 0 to the dtype's cap,
    escapes included: the AVX2 field reads (used wherever 16 bytes of the
    stream follow a block) must agree with the reference bit for bit."""
    g = torch.Generator().manual_seed(7)
    n = 3 * 65536 + 1000
    spread = 14 if dtype == torch.float16 else 40
    x = (torch.randn(n, generator=g, dtype=torch.float64)
         * torch.exp2(-torch.randint(0, spread, (n,), generator=g).double())).to(dtype)
    x[::997] = 0.0
    codec = codecs.get("dtdr")
    enc = codec.encode(x)
    got, want = both(lambda: codec.decode(enc, dtype, n))
    same_result(got, want)
    assert got.exact and raw_bytes(got.values) == raw_bytes(x)


@needs_native
@pytest.mark.parametrize("block_size", [1 << k for k in range(4, 17)])
def test_extreme_int8_coefficients_decode_as_the_reference_does(block_size):
    """The compiled int8 transform runs its first stages in 16-bit lanes; a
    stranger's file may hold -128 (which the encoder never writes) and signs
    that pile every coefficient into one sum. Every such block must decode as
    the reference decodes it, whatever the block size."""
    codec = codecs.get("dtdr8", block_size=block_size)
    n = 2 * block_size
    x = torch.randn(n, generator=torch.Generator().manual_seed(block_size))
    sections = dict(codec.encode(x))
    j = np.arange(block_size)
    rng = np.random.default_rng(block_size)
    patterns = [np.ones(block_size, bool), np.zeros(block_size, bool)]
    for row in (block_size - 1, block_size // 2 + 1, 5):
        parity = np.array([bin(v).count("1") & 1 for v in (j & row)], bool)
        patterns += [parity, ~parity]
    patterns.append(rng.random(block_size) < 0.5)
    meta = np.ones(n // block_size, "<f4").tobytes()
    for first, second in zip(patterns[0::2], patterns[1::2]):
        coefs = np.concatenate([np.where(first, 127, -128), np.where(second, -128, 127)]).astype(np.int8)
        hostile = {**sections, "meta": meta, "base": coefs.tobytes()}
        got, want = both(lambda: codec.decode(hostile, torch.float32, n))
        same_result(got, want)


@needs_native
@pytest.mark.parametrize("dtype", FLOATS)
def test_zero_dim_and_tiny(dtype):
    for x in (torch.tensor(1.5, dtype=dtype), torch.tensor(float("nan"), dtype=dtype), torch.zeros(0, dtype=dtype),
              torch.tensor([-0.0], dtype=dtype), torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype)):
        for name in ("dtdr", "dtdr8", "dtdr16"):
            c = codecs.get(name)
            enc, enc_ref = both(lambda: c.encode(x))
            assert all(bytes(enc[k]) == bytes(enc_ref[k]) for k in enc)
            got, want = both(lambda: c.decode(enc, dtype, x.numel()))
            same_result(got, want)


@needs_native
def test_decoder_casts_match_torch_on_every_float16_boundary():
    """float32 -> float16/bfloat16 rounding in C against torch's, on values
    around every representable 16-bit value (ties, subnormals, overflow)."""
    compiled = native.module()
    for dtype, code in ((torch.float16, 0), (torch.bfloat16, 1)):
        every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).float()
        every = every[torch.isfinite(every)]
        base = every.view(torch.int32)
        probes = torch.cat([base + d for d in (-4097, -4096, -4095, -1, 0, 1, 4095, 4096, 4097, 32767, 32768, 32769)])
        probes = probes.view(torch.float32)
        probes = probes[torch.isfinite(probes) & (probes.abs() < 65504 if dtype == torch.float16 else True)]
        for scalar in (False, True):  # F16C where the CPU has it, and the portable conversion
            out = np.empty(probes.numel(), np.int16)
            compiled.f32_convert(probes.numpy(), code, out, scalar)
            assert np.array_equal(out, probes.to(dtype).view(torch.int16).numpy()), (dtype, scalar)


@needs_native
@pytest.mark.parametrize("name", ["dtdr", "dtdr8", "dtdr16"])
def test_every_float16_bit_pattern_encodes_as_the_reference_does(name):
    """The encoder reads float16 blocks with F16C where it can (infinities and NaNs
    read as 0, as the reference reads them): all 65536 patterns, shuffled into
    blocks, give the same bytes and decode to the same bits with both cores."""
    every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    x = every[torch.randperm(1 << 16, generator=torch.Generator().manual_seed(16))].view(torch.float16)
    codec = codecs.get(name, block_size=256)
    enc, enc_ref = both(lambda: codec.encode(x))
    assert all(bytes(enc[k]) == bytes(enc_ref[k]) for k in enc)
    got, want = both(lambda: codec.decode(enc, torch.float16, x.numel()))
    same_result(got, want)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [32, 64, 1024])
def test_residual_encode_of_16_bit_values_matches_the_reference(dtype, block_size):
    """The lossless encoder's first residual pass over 16-bit values runs 32 elements at a
    time on AVX2 (r >> k as a high multiply): every bit pattern, in order (long runs of one
    exponent: every split width) and shuffled (escapes everywhere), plus Gaussian weights with
    specials, give the reference's bytes."""
    every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    shuffled = every[torch.randperm(1 << 16, generator=torch.Generator().manual_seed(7))]
    weights = (torch.randn(50000, generator=torch.Generator().manual_seed(8)) * 0.02).to(dtype)
    weights[::997] = float("nan")
    weights[5::1999] = float("inf")
    weights[7::3001] = -0.0
    codec = codecs.get("dtdr", block_size=block_size, frame_elements=block_size * 16)
    for x in (every, shuffled, weights, weights[:1000 + 31]):
        enc, enc_ref = both(lambda: codec.encode(x))
        assert all(bytes(enc[k]) == bytes(enc_ref[k]) for k in enc)
        got = codec.decode(enc, dtype, x.numel())
        assert got.exact and torch.equal(got.values.view(torch.int16), x.view(torch.int16))


@needs_native
def test_hostile_sections_never_crash_and_match():
    """Random bytes as every section, any lengths: both cores agree, neither raises."""
    rnd = random.Random(7)
    for it in range(300):
        name = rnd.choice(["dtdr", "dtdr8", "dtdr16"])
        bs = rnd.choice([16, 64])
        c = codecs.get(name, block_size=bs, **({"frame_elements": bs * rnd.choice([1, 4])} if name == "dtdr" else {}))
        dtype = rnd.choice(FLOATS)
        n = rnd.randrange(1, 500)
        data = {s.name: bytes(rnd.randrange(256) for _ in range(rnd.randrange(3 * n + 40))) for s in c.sections(dtype)}
        got, want = both(lambda: c.decode(data, dtype, n, Damage() if it % 2 else None))
        same_result(got, want)


def _frames(enc, nframes):
    """The (payload, lo) pairs of a dtdr segment's residual section."""
    import zstandard

    meta, resid = enc["meta"], enc["residual"]
    table = np.frombuffer(meta, "<u4", 2 * nframes, len(meta) - 8 * nframes).reshape(nframes, 2)
    out, pos = [], 0
    for zlen, lolen in table.tolist():
        out.append((zstandard.ZstdDecompressor().decompress(resid[pos : pos + zlen]), resid[pos + zlen : pos + zlen + lolen]))
        pos += zlen + lolen
    return out


@needs_native
def test_hostile_residual_frames_are_bounds_checked():
    """Valid zstd frames around payloads that lie: extra or missing bytes, escape
    markers without escapes (and the reverse), wrong totals, short or long bit
    streams. Both cores give the same result and never read out of bounds."""
    import zstandard

    rnd = random.Random(11)
    for it in range(400):
        dtype = rnd.choice(FLOATS)
        c = codecs.get("dtdr", block_size=16, frame_elements=32)
        x = (torch.randn(70, generator=torch.Generator().manual_seed(it)) * 10.0 ** rnd.randint(-3, 3)).to(dtype)
        x[rnd.randrange(70)] = rnd.choice([float("nan"), 1e30, -0.0])
        enc = c.encode(x)
        nb = 5
        nframes = 3
        frames = []
        for payload, lo in _frames(enc, nframes):
            payload, lo = bytearray(payload), bytearray(lo)
            for _ in range(rnd.randint(0, 3)):
                what = rnd.choice(["append", "cut", "mark", "unmark", "total", "lo_short", "lo_long", "lo_flip"])
                if what == "append":
                    payload += bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 2, 4, 8])))
                elif what == "cut" and payload:
                    del payload[rnd.randrange(len(payload)) :]
                elif what == "mark" and payload:
                    payload[rnd.randrange(min(32, len(payload)))] = 255
                elif what == "unmark":
                    idx = [i for i in range(min(32, len(payload))) if payload[i] == 255]
                    if idx:
                        payload[rnd.choice(idx)] = rnd.randrange(255)
                elif what == "total" and len(payload) >= 40:
                    t = rnd.randrange(2)
                    payload[32 + 4 * t : 36 + 4 * t] = rnd.choice([0, 1, 2**31, 2**32 - 1]).to_bytes(4, "little")
                elif what == "lo_short" and lo:
                    del lo[rnd.randrange(len(lo)) :]
                elif what == "lo_long":
                    lo += bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 9])))
                elif what == "lo_flip" and lo:
                    lo[rnd.randrange(len(lo))] ^= 1 << rnd.randrange(8)
            frames.append((zstandard.ZstdCompressor().compress(bytes(payload)), bytes(lo)))
        m = bytearray(enc["meta"])
        off = 4 + 4 * nb
        for j, (z, lo) in enumerate(frames):
            m[off + 8 * j : off + 8 * j + 8] = len(z).to_bytes(4, "little") + len(lo).to_bytes(4, "little")
        data = dict(enc, meta=bytes(m), residual=b"".join(z + lo for z, lo in frames) + bytes(8))
        ranges = {}
        if it % 3 == 0:
            a = rnd.randrange(len(data["residual"]))
            ranges["residual"] = [(a, min(len(data["residual"]), a + rnd.choice([1, 3, 20])))]
        got, want = both(lambda: c.decode(data, dtype, 70, Damage(ranges=ranges)))
        same_result(got, want)


@needs_native
def test_compiled_kernels_reject_short_buffers():
    compiled = native.module()
    q = np.zeros(1024, np.int8)
    f = np.zeros(1, np.float32)
    out = np.zeros(1023, np.float32)  # one element short
    with pytest.raises(CodecError):
        compiled.decode_base(q, 8, f, 2, 1024, 1024, np.zeros(1024, np.uint8), 1.0, out)
    with pytest.raises(CodecError):
        compiled.residual_decode_frame(b"", b"", None, np.zeros(10, np.int32), np.zeros(1, np.int32),
                                       np.zeros(1, np.int32), np.ones(1, np.uint8), 16, 16, 32, 23, 8, 25,
                                       np.zeros(16, np.uint8))  # bits shorter than n elements
    with pytest.raises(CodecError):
        compiled.encode_base(np.zeros(1024, np.float32), 2, 1024, 1024, np.zeros(512, np.uint8), 8, q, f)
    with pytest.raises(TypeError):
        compiled.decode_base(q, 8, f, 2, 1, 1024, np.zeros(1024, np.uint8), 1.0, b"\0" * 4)  # read-only out


@pytest.mark.parametrize("core", ["default", "reference"])
def test_golden_files_decode_unchanged_with_each_core(core):
    expected = json.load(open(os.path.join(DATA, "golden_v1.json")))
    with native.forced(core):
        for name, tensors in expected.items():
            back = torch_dtdr.load(os.path.join(DATA, name), errors="strict")
            for k, want in tensors.items():
                t = back[k]
                assert hashlib.sha256(raw_bytes(t)).hexdigest() == want["sha256"], (core, name, k)


def test_tiny_subnormal_blocks_are_lossless():
    """A block whose largest magnitude is below 2**-127: the old encoder's
    normalising factor 2**-e overflowed float32 and wrote a NaN factor, so the
    lossless codec lost the block; the specified encoder scales exactly."""
    for core in ("default", "reference"):
        with native.forced(core):
            x = torch.full((1024,), 1e-45)
            x[3] = 3e-40
            c = codecs.get("dtdr")
            enc = c.encode(x)
            f = np.frombuffer(enc["meta"], np.float32, 1, 4)
            assert np.isfinite(f).all(), core
            r = c.decode(enc, torch.float32, 1024)
            assert r.exact and raw_bytes(r.values) == raw_bytes(x), core


def test_forward_butterfly_is_the_specified_order():
    """The reference butterfly against a literal transcription of docs/codecs.md 2.6."""
    from torch_dtdr.codecs.hadamard import fwht_rows_f32

    rng = np.random.default_rng(3)
    for m in (1, 2, 4, 8, 32, 256, 1024, 4096):
        x = (rng.standard_normal((3, m)) * 10.0 ** rng.integers(-20, 20, (3, m))).astype(np.float32)
        v = x.copy()
        h = 1
        while h < m:
            for i in range(0, m, 2 * h):
                a, b = v[:, i : i + h].copy(), v[:, i + h : i + 2 * h].copy()
                v[:, i : i + h] = a + b
                v[:, i + h : i + 2 * h] = a - b
            h *= 2
        assert np.array_equal(fwht_rows_f32(x).view(np.int32), v.view(np.int32)), m


def test_environment_forces_the_reference_core():
    code = "from torch_dtdr.codecs import native; print(native.core())"
    env = dict(os.environ, TORCH_DTDR_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    assert "RuntimeWarning" not in out.stderr  # a deliberate choice is not warned about


def test_missing_compiled_core_warns_once_and_works(tmp_path):
    """Without the extension (simulated by hiding it from the import system) the
    package warns once at first use and round-trips with the reference core."""
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch_dtdr.codecs._native': raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, torch_dtdr\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    torch_dtdr.save({{'x': torch.arange(10.)}}, {str(tmp_path / 'a.dtdr')!r})\n"
        f"    y = torch_dtdr.load({str(tmp_path / 'a.dtdr')!r})['x']\n"
        "    from torch_dtdr.codecs import native\n"
        "    print(native.core(), sum('compiled codec core' in str(m.message) for m in w), bool((y == torch.arange(10.)).all()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DTDR_NATIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(env, PYTHONWARNINGS="default"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "1", "True"], (out.stdout, out.stderr)


def test_core_name_is_reported():
    assert native.core() in ("native", "reference")
    with native.forced("reference"):
        assert native.core() == "reference"


def test_version_names_the_core():
    for env_value, want in (("0", "reference"), (None, native.core() if "TORCH_DTDR_NATIVE" not in os.environ else None)):
        env = {k: v for k, v in os.environ.items() if k != "TORCH_DTDR_NATIVE"}
        if env_value is not None:
            env["TORCH_DTDR_NATIVE"] = env_value
        out = subprocess.run([sys.executable, "-m", "torch_dtdr.cli", "--version"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"torch-dtdr {torch_dtdr.__version__} (DTDR format ")
        assert "codec core: " in out.stdout
        if want is not None:
            assert f"codec core: {want})" in out.stdout


def _intact_case(dtype, n=5000, seed=0):
    codec = codecs.from_dict({"name": "dtdr", "frame_elements": 2048})
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 0.02).to(dtype)
    return codec, x, codec.encode(x)


def _with_factor(sections, block: int, value: float) -> dict:
    meta = bytearray(sections["meta"])
    meta[4 + 4 * block: 8 + 4 * block] = np.float32(value).tobytes()
    return {**sections, "meta": bytes(meta)}


@needs_native
@pytest.mark.parametrize("dtype", FLOATS)
def test_one_call_segment_decode_takes_clean_segments_and_matches_the_reference(dtype):
    codec, x, sections = _intact_case(dtype)
    fast = codec._decode_intact(sections, dtype, x.numel(), None)
    assert fast is not None and fast.exact and raw_bytes(fast.values) == raw_bytes(x)
    got, want = both(lambda: codec.decode(sections, dtype, x.numel()))
    same_result(got, want)


@needs_native
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["nan factor", "negative factor", "huge factor", "short residual", "short meta",
                                  "bad frame", "non-finite restored", "too many frames"])
def test_one_call_segment_decode_hands_unusual_segments_to_the_general_path(dtype, case):
    """Checksums pass on a file a stranger wrote, so "undamaged" sections can still be
    implausible: the one-call decode must step aside and the general path must give
    exactly what the reference gives."""
    codec, x, sections = _intact_case(dtype)
    if case == "nan factor":
        data = _with_factor(sections, 2, float("nan"))
    elif case == "negative factor":
        data = _with_factor(sections, 1, -1.0)
    elif case == "huge factor":
        data = _with_factor(sections, 0, 3e38)
    elif case == "short residual":
        data = {**sections, "residual": sections["residual"][:-9]}
    elif case == "short meta":
        data = {**sections, "meta": sections["meta"][:-1]}
    elif case == "bad frame":
        resid = bytearray(sections["residual"])
        resid[0] ^= 0xFF  # the first zstd frame's magic number
        data = {**sections, "residual": bytes(resid)}
    elif case == "too many frames":
        data = sections
        codec = codecs.from_dict({"name": "dtdr", "frame_elements": 1024})  # reads a table of twice as many frames
    else:  # a restored NaN in a segment whose flags say it saved none
        y = x.clone()
        y[7] = float("nan")
        enc = codec.encode(y)
        meta = bytearray(enc["meta"])
        meta[0:4] = bytes(4)  # clear UNBOUNDED
        data = {**enc, "meta": bytes(meta)}
    assert codec._decode_intact(data, dtype, x.numel(), None) is None
    got, want = both(lambda: codec.decode(data, dtype, x.numel()))
    same_result(got, want)
    assert torch.isfinite(got.values).all() or case == "non-finite restored" and not got.exact


def _transform_case(name, dtype, n=5000, seed=0):
    codec = codecs.from_dict({"name": name, "block_size": 1024})
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 0.02).to(dtype)
    return codec, x, codec.encode(x)


@needs_native
@pytest.mark.parametrize("name", ["dtdr8", "dtdr16"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 17, 1024, 5000, 40000])
def test_transform_one_call_decode_takes_clean_segments_and_matches_the_reference(name, dtype, n):
    codec, x, sections = _transform_case(name, dtype, n)
    fast = codec._decode_intact(sections, dtype, n, None)
    assert fast is not None
    got, want = both(lambda: codec.decode(sections, dtype, n))
    same_result(got, want)
    assert got.exact and raw_bytes(fast) == raw_bytes(want.values)


@needs_native
@pytest.mark.parametrize("name", ["dtdr8", "dtdr16"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["nan factor", "inf factor", "negative factor", "huge factor", "short meta",
                                  "short base"])
def test_transform_one_call_decode_hands_unusual_segments_to_the_general_path(name, dtype, case):
    """Sections that pass their checksums can still hold factors the general path
    replaces, or be short: the one-call decode answers None without writing, and
    decode() gives exactly what the reference gives (degraded, with its bound)."""
    codec, x, sections = _transform_case(name, dtype)
    meta = bytearray(sections["meta"])
    value = {"nan factor": float("nan"), "inf factor": float("inf"), "negative factor": -1.0,
             "huge factor": 3e38}.get(case)
    if value is not None:
        meta[4:8] = np.float32(value).tobytes()
        data = {**sections, "meta": bytes(meta)}
    elif case == "short meta":
        data = {**sections, "meta": bytes(meta[:-1])}
    else:
        data = {**sections, "base": sections["base"][:-1]}
    out = torch.full((x.numel(),), 7.0, dtype=dtype)
    assert codec._decode_intact(data, dtype, x.numel(), out) is None
    assert bool((out == 7.0).all())  # nothing written before stepping aside
    got, want = both(lambda: codec.decode(data, dtype, x.numel()))
    same_result(got, want)
    assert not got.exact


@needs_native
def test_transform_one_call_decode_rejects_a_short_output():
    codec, x, sections = _transform_case("dtdr8", torch.float32)
    compiled = native.module()
    with pytest.raises(CodecError):
        compiled.decode_base_intact(sections["meta"], sections["base"], 8, 2, x.numel(), 1024,
                                    np.zeros(1024, np.uint8), 1.0, np.zeros(x.numel() - 1, np.float32))
    with pytest.raises(CodecError):
        compiled.decode_base_intact(sections["meta"], sections["base"], 8, 2, 0, 1024,
                                    np.zeros(1024, np.uint8), 1.0, np.zeros(1, np.float32))
