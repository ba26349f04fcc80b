"""The compiled inner Reed-Solomon decoder (``integrity/_rs.c``) against the numpy reference.

Both decoders must make the same corrections and the same failure decisions,
codeword by codeword: random chunks with 0 to 20 errors per codeword (beyond
the capacity of nsym // 2 too), erased parity bytes, chunk sizes whose last
row is shortened, every nsym the format allows; the compiled decoder with its
AVX2 syndrome kernel and with the portable one. Damaged archive files load to
the same bits with either decoder. The compiled decoder checks every size it
is given (the chunk size and nsym come from the file). When the reference is
forced for the whole run (``TORCH_DTDR_NATIVE=0``) the comparisons skip with
that reason; CI runs the suite once each way.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_dtdr
from torch_dtdr.errors import DamageWarning, DTDRError
from torch_dtdr.integrity import native
from torch_dtdr.integrity.gf256 import EXP_LOG, MUL
from torch_dtdr.integrity.inner import InnerCode

from .helpers import assert_same, pseudo

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

needs_native = pytest.mark.skipif(
    native.core() != "native",
    reason="the compiled decoder is not in use (TORCH_DTDR_NATIVE=0 or not built): nothing to compare",
)


def compiled():
    return native.module()


def kernels():
    """The syndrome kernels of the compiled decoder to run: AVX2 where the CPU has it, and the portable one."""
    mod = compiled()
    out = [False]
    if mod.set_simd(True):
        out.append(True)
    mod.set_simd(True)
    return out


def decode_all_ways(ic: InnerCode, data: np.ndarray, parity: np.ndarray):
    """The reference's (data, status, codeword status), after checking every compiled kernel gives the same."""
    with native.forced("reference"):
        want = ic.decode_codewords(data, parity)
    mod = compiled()
    try:
        for simd in kernels():
            mod.set_simd(simd)
            got = ic.decode_codewords(data, parity)
            for name, g, w in zip(("data", "status", "codeword status"), got, want):
                assert np.array_equal(g, w), (f"{name} differs (simd={simd})", ic, g, w)
    finally:
        mod.set_simd(True)
    return want


def damage(ic: InnerCode, data: np.ndarray, parity: np.ndarray, errors_per_codeword, rng, erase_parity=0):
    """Copies of ``data`` and ``parity`` with ``errors_per_codeword[b][j]`` symbol errors in codeword j of
    chunk b (positions the codeword stores, data or parity), then ``erase_parity`` parity bytes zeroed."""
    bad, badp = data.copy(), parity.copy().reshape(-1)
    c, ncw = ic.chunk_size, ic.ncw
    for b, per_cw in enumerate(errors_per_codeword):
        for j, n_err in enumerate(per_cw):
            stored = ic.npos - (1 if ic.pad and j >= ncw - ic.pad else 0)
            for pos in rng.choice(stored, size=min(n_err, stored), replace=False):
                flip = int(rng.integers(1, 256))
                if pos < ic.nsym:
                    badp[b * ic.parity_size + pos * ncw + j] ^= flip
                else:
                    bad[b * c + (pos - ic.nsym) * ncw + j] ^= flip
    if erase_parity:
        start = int(rng.integers(0, badp.size - erase_parity + 1))
        badp[start:start + erase_parity] = 0
    return bad, badp


@st.composite
def cases(draw):
    nsym = draw(st.sampled_from([2, 4, 6, 16, 32, 48, 64, 100, 128]))
    kmax = 255 - nsym
    chunk = draw(st.one_of(st.sampled_from([4096, 8192, 1, kmax, kmax + 1, 2 * kmax - 1]), st.integers(1, 9000)))
    nchunks = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    max_err = draw(st.sampled_from([0, 1, 2, nsym // 2, nsym // 2 + 1, 20]))
    erase = draw(st.sampled_from([0, 0, 1, 7, 40]))
    return nsym, chunk, nchunks, seed, max_err, erase


@needs_native
@settings(max_examples=120, **SETTINGS)
@given(cases())
def test_compiled_decoder_matches_the_reference(case):
    nsym, chunk, nchunks, seed, max_err, erase = case
    ic = InnerCode(chunk, nsym)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, nchunks * chunk, dtype=np.uint8)
    parity = ic.encode(data)
    per_cw = rng.integers(0, max_err + 1, size=(nchunks, ic.ncw))
    bad, badp = damage(ic, data, parity, per_cw, rng, erase_parity=min(erase, parity.size))
    out, status, codewords = decode_all_ways(ic, bad, badp)
    # within capacity (and no erasure): every codeword is restored and its errors counted
    if not erase and max_err <= ic.t:
        assert np.array_equal(out.reshape(-1), data)
        assert (codewords == per_cw).all() and (status == per_cw.sum(axis=1)).all()
    assert ((status == -1) == (codewords == -1).any(axis=1)).all()


@needs_native
@pytest.mark.parametrize("chunk,nsym", [(4096, 32), (1000, 16), (4096 * 4, 128), (223, 32), (224, 32), (5, 2)])
def test_beyond_capacity_is_reported_identically(chunk, nsym):
    ic = InnerCode(chunk, nsym)
    rng = np.random.default_rng(chunk + nsym)
    data = rng.integers(0, 256, 6 * chunk, dtype=np.uint8)
    parity = ic.encode(data)
    for n_err in (ic.t, ic.t + 1, ic.t + 3, 20, 60):
        bad, badp = damage(ic, data, parity, np.full((6, ic.ncw), n_err), rng)
        out, status, codewords = decode_all_ways(ic, bad, badp)
        if n_err <= ic.t:
            assert (status == n_err * ic.ncw).all() and np.array_equal(out.reshape(-1), data)
    noisy = rng.integers(0, 256, 6 * chunk, dtype=np.uint8)  # every codeword far beyond capacity
    out, status, codewords = decode_all_ways(ic, noisy, parity)
    assert (status == -1).all()


def _locator_without_root_pattern(nsym: int) -> list[int]:
    """Coefficients of prod_{i=1}^{nsym-1} (x - alpha^i): an error pattern whose syndromes are
    (S_0 != 0, 0, ..., 0), on which Berlekamp-Massey ends with Lambda = 1 and length 1."""
    exp, _log = EXP_LOG
    g = [1]
    for i in range(1, nsym):
        a = int(exp[i])
        ng = [0] * (len(g) + 1)
        for d, coef in enumerate(g):
            ng[d + 1] ^= coef
            ng[d] ^= int(MUL[coef, a])
        g = ng
    return g


@pytest.mark.parametrize("shift", [0, 40])
def test_a_locator_without_roots_is_uncorrectable(shift):
    """Lambda = 1 (lambda_1 == 0) after Berlekamp-Massey has no root: the codeword is
    uncorrectable, never "one error at position log 0 = 0" (the reference did that)."""
    ic = InnerCode(4096, 32)
    data = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)
    parity = ic.encode(data).reshape(-1)
    bad, badp = data.copy(), parity.copy()
    j = 4
    for k, coef in enumerate(_locator_without_root_pattern(ic.nsym)):
        pos = k + shift
        if pos < ic.nsym:
            badp[pos * ic.ncw + j] ^= coef
        else:
            bad[(pos - ic.nsym) * ic.ncw + j] ^= coef
    syn = ic.syndromes(bad, badp)[j]
    assert syn[0] != 0 and not syn[1:].any()
    with native.forced("reference"):
        out, status, codewords = ic.decode_codewords(bad, badp)
    assert status[0] == -1 and codewords[0, j] == -1
    assert np.array_equal(out.reshape(-1), bad)  # left as received
    if native.core() == "native":
        got = ic.decode_codewords(bad, badp)
        assert all(np.array_equal(g, w) for g, w in zip(got, (out, status, codewords)))


def test_roots_on_the_padding_or_past_the_codeword_are_failures():
    """A single error "located" on the zero padding of a shortened codeword (or past its length)
    is a miscorrection: the codeword fails in both decoders."""
    ic = InnerCode(4096, 32)  # 19 codewords, pad 8: codewords 11..18 lack their last data row
    assert ic.pad == 8
    data = np.zeros(4096, dtype=np.uint8)
    parity = ic.encode(data).reshape(-1)
    exp, _log = EXP_LOG
    for j, pos in ((15, ic.npos - 1), (3, ic.npos), (3, 254)):
        # syndromes of one error of value 7 at position pos: S_i = 7 alpha^(i pos); realise them by
        # placing the error pattern's remainder in the parity: c(x) = 7 x^pos mod g(x)
        target = np.array([int(MUL[7, int(exp[(i * pos) % 255])]) for i in range(ic.nsym)], dtype=np.uint8)
        badp = parity.copy()
        col = _parity_with_syndromes(ic, target)
        badp[np.arange(ic.nsym) * ic.ncw + j] ^= col
        assert np.array_equal(ic.syndromes(data, badp)[j], target)
        with native.forced("reference"):
            want = ic.decode_codewords(data, badp)
        assert want[2][0, j] == -1, (j, pos)
        if native.core() == "native":
            got = ic.decode_codewords(data, badp)
            assert all(np.array_equal(g, w) for g, w in zip(got, want))


def _parity_with_syndromes(ic: InnerCode, target: np.ndarray) -> np.ndarray:
    """nsym parity symbols p_0..p_{nsym-1} with sum_p p_k alpha^(i k) == target_i (a Vandermonde solve)."""
    from torch_dtdr.integrity.gf256 import invert

    exp, _log = EXP_LOG
    vand = np.array([[int(exp[(i * k) % 255]) for k in range(ic.nsym)] for i in range(ic.nsym)], dtype=np.uint8)
    inv = invert(vand)
    out = np.zeros(ic.nsym, dtype=np.uint8)
    for k in range(ic.nsym):
        acc = 0
        for i in range(ic.nsym):
            acc ^= int(MUL[int(inv[k, i]), int(target[i])])
        out[k] = acc
    return out


@needs_native
def test_compiled_decoder_checks_every_size():
    mod = compiled()
    ic = InnerCode(4096, 32)
    data = np.zeros(2 * 4096, dtype=np.uint8)
    parity = ic.encode(data).reshape(-1)
    status, cws = np.zeros(2, np.int64), np.zeros(2 * ic.ncw, np.int32)
    mod.decode(data, parity, 4096, 32, status, cws)  # the valid call
    assert not status.any()
    bad_calls = [
        ((data, parity, 4096, 31, status, cws), ValueError),  # odd nsym
        ((data, parity, 4096, 130, status, cws), ValueError),  # nsym past 128
        ((data, parity, 4096, 0, status, cws), ValueError),
        ((data, parity, 0, 32, status, cws), ValueError),  # chunk size
        ((data, parity, -4096, 32, status, cws), ValueError),
        ((data, parity, 1 << 31, 32, status, cws), ValueError),
        ((data, parity, 3000, 32, status, cws), ValueError),  # not a whole number of chunks
        ((data, parity[:-1], 4096, 32, status, cws), ValueError),  # parity too short
        ((data, np.zeros(parity.size + 1, np.uint8), 4096, 32, status, cws), ValueError),
        ((data, parity, 4096, 32, np.zeros(3, np.int64), cws), ValueError),  # status count
        ((data, parity, 4096, 32, status, np.zeros(2 * ic.ncw - 1, np.int32)), ValueError),
        ((data, parity, 4096, 32, np.zeros(2, np.int32), cws), TypeError),  # status item type
        ((data, parity, 4096, 32, status, np.zeros(2 * ic.ncw, np.float32)), TypeError),
        ((data.tobytes(), parity, 4096, 32, status, cws), TypeError),  # read-only data
        ((data, parity, 4096, 32, status.tobytes(), cws), TypeError),
        ((data[::2], parity, 4096, 32, status, cws), TypeError),  # not contiguous
    ]
    for args, err in bad_calls:
        with pytest.raises(err):
            mod.decode(*args)
    empty = np.zeros(0, np.uint8)
    mod.decode(empty, empty, 4096, 32, np.zeros(0, np.int64), np.zeros(0, np.int32))  # no chunks: nothing to do


@needs_native
def test_compiled_decoder_runs_in_threads():
    """Threads decode at once (the GIL is released) and each gets its own correct result."""
    ic = InnerCode(4096, 32)
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, 64 * 4096, dtype=np.uint8)
    parity = ic.encode(data)
    bad, badp = damage(ic, data, parity, rng.integers(0, 17, size=(64, ic.ncw)), rng)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                out, status = ic.decode(bad, badp)
                results.append(np.array_equal(out.reshape(-1), data) and (status >= 0).all())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20 and all(results)


def _archive_file(tmp_path) -> tuple[dict, bytes]:
    sd = {"w": pseudo(150_000, seed=3), "ids": torch.arange(3000), "h": pseudo(5000, torch.float16, seed=4)}
    buf = io.BytesIO()
    torch_dtdr.save(sd, buf, parity="archive")
    return sd, buf.getvalue()


def _load_both_ways(data: bytes):
    def one():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DamageWarning)
            try:
                obj, rep = torch_dtdr.load(io.BytesIO(data), report=True)
            except DTDRError as exc:
                return ("error", type(exc).__name__, str(exc)), [str(w.message) for w in caught]
            verified = torch_dtdr.verify(io.BytesIO(data))
            return (obj, rep.status, rep.exact, verified.status, verified.exact), [str(w.message) for w in caught]

    got = one()
    with native.forced("reference"):
        want = one()
    return got, want


@needs_native
@pytest.mark.parametrize("rate", [3e-4, 3e-3, 1e-2, 3e-2])
def test_damaged_archive_files_load_identically_with_both_decoders(tmp_path, rate):
    sd, clean = _archive_file(tmp_path)
    rng = np.random.default_rng(int(rate * 1e6))
    raw = bytearray(clean)
    for i in rng.choice(len(raw), int(len(raw) * rate), replace=False):
        raw[i] ^= 1 + int(rng.integers(0, 255))
    (got, got_warnings), (want, want_warnings) = _load_both_ways(bytes(raw))
    assert got_warnings == want_warnings
    if want[0] == "error":
        assert got == want
        return
    for k in sd:
        assert_same(got[0][k], want[0][k])
    assert got[1:] == want[1:]
    if rate <= 3e-3:  # well within the inner code's capacity: exact
        assert got[2] and got[4]
        for k in sd:
            assert_same(got[0][k], sd[k])


def test_environment_forces_the_reference_decoder():
    code = ("from torch_dtdr.integrity import native; import warnings; warnings.simplefilter('error'); "
            "print(native.core())")
    env = dict(os.environ, TORCH_DTDR_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_missing_compiled_decoder_warns_once_and_decodes(tmp_path):
    """Without the extension (hidden from the import system) the first decode warns once and
    the reference corrects the damage."""
    code = (
        "import sys, warnings\n"
        "import numpy as np\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch_dtdr.integrity._rs': raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from torch_dtdr.integrity.inner import InnerCode\n"
        "from torch_dtdr.integrity import native\n"
        "ic = InnerCode()\n"
        "data = np.arange(2 * 4096, dtype=np.uint32).astype(np.uint8)\n"
        "par = ic.encode(data)\n"
        "bad = data.copy(); bad[::97] ^= 0x55\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    ok = [bool(np.array_equal(ic.decode(bad, par)[0].reshape(-1), data)) for _ in range(3)]\n"
        "print(native.core(), sum('compiled Reed-Solomon decoder' in str(m.message) for m in w), all(ok))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DTDR_NATIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "1", "True"], (out.stdout, out.stderr)


def test_decoder_name_is_reported():
    assert native.core() in ("native", "reference")
    with native.forced("reference"):
        assert native.core() == "reference"
    with pytest.raises(ValueError):
        with native.forced("fast"):
            pass
