"""Checksums, erasure-code parity and bitwise voting (torch_dtdr.integrity)."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest
import xxhash

from torch_dtdr.errors import CodecError, IntegrityError
from torch_dtdr.integrity import backends, checksum, parity, vote
from torch_dtdr.integrity.checksum import chunk_hashes, hash64, verify_chunks
from torch_dtdr.integrity.parity import ErasureCode
from torch_dtdr.integrity.vote import bitwise_majority, majority_with_hash

NATIVE_ISAL = [i for i in ("isal", "pyeclib") if backends.usable(i, "isa_l_rs_cauchy")]


def rand_chunks(rng: np.random.Generator, k: int, c: int) -> list[bytes]:
    return [rng.integers(0, 256, c, dtype=np.uint8).tobytes() for _ in range(k)]


def det_chunks(k: int, c: int = 4096) -> list[bytes]:
    """Deterministic data that does not depend on any RNG implementation."""
    x = np.arange(k * c, dtype=np.uint64)
    x = (x * np.uint64(0x9E3779B97F4A7C15)) ^ (x >> np.uint64(7))
    b = ((x >> np.uint64(29)) & np.uint64(0xFF)).astype(np.uint8).tobytes()
    return [b[i * c : (i + 1) * c] for i in range(k)]


def all_patterns(n: int, m: int):
    for r in range(1, m + 1):
        yield from itertools.combinations(range(n), r)


def erase(full: list, pattern) -> list:
    return [None if i in pattern else full[i] for i in range(len(full))]


# --------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size,chunk", [(0, 4096), (1, 4096), (4096, 4096), (4097, 4096), (3 * 65536 + 5, 65536), (10000, 7)])
def test_chunk_hashes_match_independent_xxhash(size, chunk):
    buf = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = [xxhash.xxh3_64(buf[i : i + chunk], seed=0).intdigest() for i in range(0, size, chunk)]
    got = chunk_hashes(buf, chunk)
    assert got.dtype == np.uint64
    assert got.tolist() == expected
    # any buffer type, no copy needed
    assert chunk_hashes(bytearray(buf), chunk).tolist() == expected
    assert chunk_hashes(memoryview(buf), chunk).tolist() == expected
    if size % 4 == 0 and size:
        assert chunk_hashes(np.frombuffer(buf, dtype=np.float32), chunk).tolist() == expected


def test_hash64_and_verify_chunks():
    buf = bytearray(np.random.default_rng(1).integers(0, 256, 5 * 4096 + 100, dtype=np.uint8).tobytes())
    assert hash64(buf) == xxhash.xxh3_64_intdigest(bytes(buf))
    assert checksum.HASH_ALGORITHM == "xxh3_64"
    ref = chunk_hashes(buf, 4096)
    assert verify_chunks(buf, 4096, ref).size == 0
    buf[2 * 4096 + 17] ^= 0x10
    buf[5 * 4096 + 3] ^= 0x01  # the short last chunk
    assert verify_chunks(buf, 4096, ref).tolist() == [2, 5]
    with pytest.raises(ValueError):
        chunk_hashes(buf, 0)
    with pytest.raises(ValueError):
        verify_chunks(buf, 4096, ref[:-1])


# --------------------------------------------------------------------------
# erasure code: correctness
# --------------------------------------------------------------------------


def test_default_algorithm_is_recorded_and_stable():
    ec = ErasureCode(16, 2)
    assert ec.algorithm == parity.DEFAULT_ALGORITHM
    assert ec.algorithm in parity.ALGORITHMS
    if NATIVE_ISAL:
        assert ec.algorithm == "isa_l_rs_cauchy"
    assert ErasureCode(16, 2, ec.algorithm).algorithm == ec.algorithm


@pytest.mark.parametrize("k", range(4, 17))
def test_every_erasure_pattern_default(k):
    rng = np.random.default_rng(k)
    for m in (1, 2, 3):
        ec = ErasureCode(k, m)
        data = rand_chunks(rng, k, 128)
        par = ec.encode(data)
        assert len(par) == m and all(type(p) is bytes and len(p) == 128 for p in par)
        full = data + par
        for pattern in all_patterns(k + m, m):
            assert ec.reconstruct(erase(full, pattern)) == data, (k, m, pattern)


@pytest.mark.parametrize(
    "algorithm,impl",
    [(a, i) for a in parity.ALGORITHMS for i in backends.CHAIN[a] if backends.usable(i, a)],
)
def test_every_erasure_pattern_each_implementation(algorithm, impl):
    rng = np.random.default_rng(7)
    ks = (1, 4, 6) if impl == "reference" else (1, 4, 9, 16)
    for k in ks:
        for m in (1, 2, 3):
            ec = ErasureCode(k, m, algorithm, impl=impl)
            assert ec.impl == impl
            data = rand_chunks(rng, k, 64)
            full = data + ec.encode(data)
            for pattern in all_patterns(k + m, m):
                assert ec.reconstruct(erase(full, pattern)) == data, (algorithm, impl, k, m, pattern)


@pytest.mark.parametrize("algorithm", [a for a in ("isa_l_rs_cauchy", "zfec") if a in parity.available_algorithms()])
def test_large_geometry_random_patterns(algorithm):
    k, m, c = 64, 8, 4096
    rng = np.random.default_rng(64)
    ec = ErasureCode(k, m, algorithm)
    data = rand_chunks(rng, k, c)
    full = data + ec.encode(data)
    prng = random.Random(0)
    for r in (1, 3, 8):
        for _ in range(10):
            pattern = set(prng.sample(range(k + m), r))
            assert ec.reconstruct(erase(full, pattern)) == data


def test_too_many_erasures_raise_integrity_error():
    rng = np.random.default_rng(3)
    for algorithm in parity.available_algorithms():
        ec = ErasureCode(6, 2, algorithm)
        data = rand_chunks(rng, 6, 64)
        full = data + ec.encode(data)
        for pattern in [(0, 1, 2), (0, 6, 7), (1, 3, 5, 7)]:
            with pytest.raises(IntegrityError):
                ec.reconstruct(erase(full, pattern))
        # only parity lost beyond m still counts
        with pytest.raises(IntegrityError):
            ErasureCode(6, 1, algorithm).reconstruct(data[:5] + [None, None])


def test_systematic_property_and_raw_parity_matches_pyeclib_payloads():
    rng = np.random.default_rng(11)
    for k, m, c in [(4, 2, 4096), (16, 4, 4096), (10, 3, 65536)]:
        data = rand_chunks(rng, k, c)
        before = [bytes(d) for d in data]
        ec = ErasureCode(k, m)
        par = ec.encode(data)
        assert data == before  # encode does not touch its input
        assert ec.reconstruct(data + par) == data  # nothing erased: data unchanged
        assert ec.reconstruct(data + [None] * m) == data  # parity lost: data unchanged
        if ec.algorithm == "isa_l_rs_cauchy" and backends.usable("pyeclib", "isa_l_rs_cauchy"):
            from pyeclib.ec_iface import ECDriver

            frags = ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy").encode(b"".join(data))
            assert [f[80:] for f in frags[:k]] == data  # pyeclib is systematic
            assert [f[80:] for f in frags[k:]] == par  # our raw parity is its payload


def test_parity_is_deterministic_across_instances_and_implementations():
    data = det_chunks(16)
    for algorithm in parity.available_algorithms():
        impls = [i for i in backends.CHAIN[algorithm] if backends.usable(i, algorithm)]
        results = {impl: ErasureCode(16, 4, algorithm, impl=impl).encode(data) for impl in impls}
        results["again"] = ErasureCode(16, 4, algorithm).encode(data)
        first = next(iter(results.values()))
        assert all(r == first for r in results.values()), (algorithm, list(results))


# Parity of det_chunks(k) pinned: the on-disk format must never change.
GOLDEN = {
    ("isa_l_rs_cauchy", 16, 4): 0x6CE6170E0836D7AE,
    ("isa_l_rs_cauchy", 64, 8): 0x61B896E2C4E28C84,
    ("zfec", 16, 4): 0x29B92C521F8B6B01,
    ("isa_l_rs_vand", 8, 4): 0x1ACC630F02509260,
    ("liberasurecode_rs_vand", 8, 2): 0x13A298F4E0A33E04,
}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_parity(key):
    algorithm, k, m = key
    if algorithm not in parity.available_algorithms():
        pytest.skip(f"{algorithm} not available")
    par = ErasureCode(k, m, algorithm).encode(det_chunks(k))
    assert xxhash.xxh3_64_intdigest(b"".join(par)) == GOLDEN[key]


def test_reference_matches_native_on_large_chunks():
    if not NATIVE_ISAL:
        pytest.skip("no native ISA-L")
    data = rand_chunks(np.random.default_rng(5), 8, 4096)
    ref = ErasureCode(8, 3, "isa_l_rs_cauchy", impl="reference")
    nat = ErasureCode(8, 3, "isa_l_rs_cauchy", impl=NATIVE_ISAL[0])
    par = nat.encode(data)
    assert ref.encode(data) == par
    assert ref.reconstruct([None, None] + data[2:7] + [None] + par) == data


def test_inputs_unchanged_after_reconstruct():
    """zfec's decode writes into the buffers it gets; ours must not leak that."""
    rng = np.random.default_rng(9)
    for algorithm in parity.available_algorithms():
        for impl in [i for i in backends.CHAIN[algorithm] if backends.usable(i, algorithm)]:
            ec = ErasureCode(5, 3, algorithm, impl=impl)
            data = rand_chunks(rng, 5, 256)
            par = ec.encode(data)
            full = data + par
            snapshot = [bytes(bytearray(x)) for x in full]  # real copies
            for pattern in [(0,), (1, 3), (0, 2, 4), (0, 5, 7), (6,)]:
                slots = erase(full, pattern)
                assert ec.reconstruct(slots) == snapshot[:5]
                assert [bytes(bytearray(x)) for x in full] == snapshot, (algorithm, impl, pattern)
            # mutable inputs too
            slots = [bytearray(x) for x in full]
            slots[1] = slots[2] = None
            assert ec.reconstruct(slots) == snapshot[:5]
            assert [bytes(s) for s in slots if s is not None] == [snapshot[i] for i in (0, 3, 4, 5, 6, 7)]


def test_buffer_types_and_encode_stripes():
    rng = np.random.default_rng(2)
    k, m, c, stripes = 8, 2, 4096, 5
    buf = rng.integers(0, 256, k * c * stripes, dtype=np.uint8).tobytes()
    mv = memoryview(buf)
    for algorithm in parity.available_algorithms():
        ec = ErasureCode(k, m, algorithm)
        per = [ec.encode([mv[s * k * c + j * c : s * k * c + (j + 1) * c] for j in range(k)]) for s in range(stripes)]
        batched = ec.encode_stripes(buf, c)
        assert batched.shape == (stripes, m, c) and batched.dtype == np.uint8
        for s in range(stripes):
            assert [batched[s, j].tobytes() for j in range(m)] == per[s]
        assert np.array_equal(ec.encode_stripes(bytearray(buf), c), batched)
        assert np.array_equal(ec.encode_stripes(np.frombuffer(buf, dtype=np.int32), c), batched)
        # numpy / bytearray / memoryview chunks give the same parity
        chunks = [buf[j * c : (j + 1) * c] for j in range(k)]
        assert ec.encode([np.frombuffer(ch, dtype=np.uint8) for ch in chunks]) == per[0]
        assert ec.encode([bytearray(ch) for ch in chunks]) == per[0]
        rec = ec.reconstruct([None] + [memoryview(ch) for ch in chunks[1:]] + [None, memoryview(per[0][1])])
        assert rec == chunks and all(type(x) is bytes for x in rec)
        with pytest.raises(ValueError):
            ec.encode_stripes(buf[:-1], c)


@pytest.mark.parametrize("algorithm,impl", [(a, i) for a in parity.ALGORITHMS for i in backends.CHAIN[a]
                                             if backends.usable(i, a)])
def test_stripes_with_their_checksums_in_one_pass_equal_parity_then_checksums(algorithm, impl):
    """encode_stripes_hashed (one compiled pass with ISA-L: the parity of a stripe, then the checksums
    of its k + m chunks while it is in cache) gives the parity of encode_stripes and the chunk checksums
    of the data then the parity, stripe by stripe, for every implementation; with the fused pass
    present where ISA-L and the compiled checksums are."""
    from torch_dtdr.integrity import native

    rng = np.random.default_rng(3)
    for k, m, c, stripes in ((32, 2, 4096, 9), (5, 3, 512, 4), (1, 1, 64, 3), (8, 2, 4096, 0)):
        if algorithm == "isa_l_rs_vand" and m > 4 or algorithm == "liberasurecode_rs_vand" and c % 2:
            continue
        ec = ErasureCode(k, m, algorithm, impl=impl)
        buf = rng.integers(0, 256, k * c * stripes, dtype=np.uint8).tobytes()
        par, hashes = ec.encode_stripes_hashed(memoryview(buf), c)
        expected = ec.encode_stripes(buf, c)
        assert np.array_equal(par, expected)
        assert hashes.shape == (stripes, k + m) and hashes.dtype == np.uint64
        for s in range(stripes):
            chunks = [buf[s * k * c + j * c : s * k * c + (j + 1) * c] for j in range(k)]
            chunks += [expected[s, j].tobytes() for j in range(m)]
            assert hashes[s].tolist() == [xxhash.xxh3_64_intdigest(ch) for ch in chunks]
        with pytest.raises(ValueError):
            ec.encode_stripes_hashed(buf[:-1] if buf else b"x", c)
    par, hashes = ErasureCode(4, 0).encode_stripes_hashed(bytes(4 * 64 * 2), 64)  # no parity: data checksums
    assert par.shape == (2, 0, 64) and hashes.tolist() == [[xxhash.xxh3_64_intdigest(bytes(64))] * 4] * 2
    if impl == "isal" and os.environ.get("TORCH_DTDR_NATIVE", "").strip() != "0":
        assert native.hashes_module() is not None and hasattr(ec._backend, "encode_address")


@pytest.mark.skipif(os.environ.get("TORCH_DTDR_NATIVE", "").strip() == "0",
                    reason="the compiled checksums are off (TORCH_DTDR_NATIVE=0): no compiled pass to check")
def test_the_compiled_stripe_pass_checks_its_buffers():
    """The compiled pass refuses buffers that do not hold whole stripes or are too small for the
    parity and checksums of the stripes it was given, before it touches anything."""
    from torch_dtdr.integrity import native

    compiled = native.hashes_module()
    ec = ErasureCode(4, 2, "isa_l_rs_cauchy", impl="isal")
    fn, tables = ec._backend.encode_address()
    data = bytes(4 * 64 * 3)
    good = (np.empty((3, 2, 64), np.uint8), np.empty((3, 6), np.uint64))
    assert compiled.stripe_parity_hashes(data, 64, 4, 2, fn, tables, *good) == 3
    for args in ((data[:-1], 64, 4, 2, fn, tables, *good),
                 (data, 64, 4, 2, fn, tables, np.empty((2, 2, 64), np.uint8), good[1]),
                 (data, 64, 4, 2, fn, tables, good[0], np.empty((3, 5), np.uint64)),
                 (data, 0, 4, 2, fn, tables, *good), (data, 64, 0, 2, fn, tables, *good),
                 (data, 64, 4, 0, fn, tables, *good), (data, 64, 200, 57, fn, tables, *good),
                 (data, 64, 4, 2, 0, tables, *good)):
        with pytest.raises(ValueError):
            compiled.stripe_parity_hashes(*args)


@pytest.mark.parametrize("algorithm,k,m", [("isa_l_rs_cauchy", 32, 2), ("isa_l_rs_cauchy", 16, 4),
                                            ("isa_l_rs_vand", 7, 3), ("zfec", 32, 2)])
def test_correct_fixes_scattered_byte_errors_beyond_m_chunks(algorithm, k, m):
    """Byte errors in more chunks than parity can erase, each byte column hit
    at most once (wherever: data or parity): all corrected, bit-exact."""
    if algorithm not in parity.available_algorithms():
        pytest.fail(f"{algorithm} should be available in the test environment")
    code = ErasureCode(k, m, algorithm)
    rng = np.random.default_rng(k * 10 + m)
    c = 4096
    stripe = [rng.integers(0, 256, c, dtype=np.uint8).tobytes() for _ in range(k)]
    full = stripe + code.encode(stripe)
    victims = [int(v) for v in rng.choice(k + m, min(k + m, 3 * m + 2), replace=False)]
    cols = rng.choice(c, 8 * len(victims), replace=False).reshape(len(victims), 8)
    damaged = [bytearray(x) for x in full]
    for v, cs in zip(victims, cols):
        for col in cs:
            damaged[v][col] ^= int(rng.integers(1, 256))
    fixed = code.correct([bytes(x) for x in damaged], victims)
    assert sorted(fixed) == sorted(victims)
    for v in victims:
        assert fixed[v] == full[v]


@pytest.mark.parametrize("algorithm,k,m", [("isa_l_rs_cauchy", 16, 4), ("isa_l_rs_cauchy", 10, 6), ("zfec", 16, 4)])
def test_correct_with_four_or_more_parity_chunks_fixes_two_errors_per_column(algorithm, k, m):
    """Distance >= 5: columns holding two wrong bytes (data and parity chunks
    alike) are located as well, next to single-error columns."""
    code = ErasureCode(k, m, algorithm)
    rng = np.random.default_rng(k + m)
    c = 4096
    stripe = [rng.integers(0, 256, c, dtype=np.uint8).tobytes() for _ in range(k)]
    full = stripe + code.encode(stripe)
    damaged = [bytearray(x) for x in full]
    victims = [int(v) for v in rng.choice(k + m, 10, replace=False)] + [k, k + m - 1]  # two parity chunks
    cols = rng.choice(c, 60, replace=False)
    for col in cols[:25]:
        a, b = rng.choice(victims, 2, replace=False)
        damaged[a][col] ^= int(rng.integers(1, 256))
        damaged[b][col] ^= int(rng.integers(1, 256))
    for col in cols[25:]:
        damaged[rng.choice(victims)][col] ^= int(rng.integers(1, 256))
    suspects = [i for i in range(k + m) if bytes(damaged[i]) != full[i]]
    assert len(suspects) > m  # beyond erasure decoding
    fixed = code.correct([bytes(x) for x in damaged], suspects)
    assert all(fixed.get(i) == full[i] for i in suspects)
    # with m = 2 the same two-error columns stay uncorrected
    two = ErasureCode(k, 2, algorithm)
    full2 = stripe + two.encode(stripe)
    damaged2 = [bytearray(x) for x in full2]
    damaged2[0][5] ^= 1
    damaged2[1][5] ^= 2
    assert all(two.correct([bytes(x) for x in damaged2], [0, 1]).get(i) != full2[i] for i in (0, 1))


def test_correct_never_touches_chunks_that_passed_and_leaves_multi_error_columns():
    code = ErasureCode(32, 2, "isa_l_rs_cauchy")
    rng = np.random.default_rng(3)
    stripe = [rng.integers(0, 256, 512, dtype=np.uint8).tobytes() for _ in range(32)]
    full = stripe + code.encode(stripe)
    damaged = [bytearray(x) for x in full]
    damaged[3][100] ^= 0x41
    damaged[9][100] ^= 0x17  # the same column: two errors, distance 3 cannot locate them
    damaged[20][7] ^= 0x80  # a column of its own: correctable
    got = code.correct([bytes(x) for x in damaged], [3, 9, 20])
    assert got[20] == full[20]
    for s in (3, 9):
        assert got.get(s, bytes(damaged[s])) != full[s]  # not silently "fixed"
    # the error in chunk 20 is not a suspect: nothing may change chunk 20
    got = code.correct([bytes(x) for x in damaged], [3, 9])
    assert 20 not in got
    # m < 2 (distance 2) cannot locate anything; clean stripes need nothing
    one = ErasureCode(8, 1)
    data = [bytes([i]) * 64 for i in range(8)]
    assert one.correct(data + one.encode(data), [0]) == {}
    assert code.correct(full, [0]) == {}


def test_m_zero_and_argument_errors():
    data = det_chunks(4, 64)
    ec = ErasureCode(4, 0)
    assert ec.encode(data) == []
    assert ec.reconstruct(data) == data
    assert ec.encode_stripes(b"".join(data), 64).shape == (1, 0, 64)
    with pytest.raises(IntegrityError):
        ec.reconstruct(data[:3] + [None])
    with pytest.raises(CodecError):
        ErasureCode(4, 2, "no_such_code")
    with pytest.raises(CodecError):
        ErasureCode(4, 5, "isa_l_rs_vand")  # not MDS for m > 4
    with pytest.raises(CodecError):
        ErasureCode(0, 2)
    with pytest.raises(CodecError):
        ErasureCode(250, 8)
    ec = ErasureCode(4, 2)
    with pytest.raises(ValueError):
        ec.encode(data[:3])
    with pytest.raises(ValueError):
        ec.encode(data[:3] + [data[3][:-1]])
    with pytest.raises(ValueError):
        ec.reconstruct(data + [None])


# --------------------------------------------------------------------------
# voting
# --------------------------------------------------------------------------


def _damage(buf: bytes, rng: np.random.Generator, nbits: int) -> bytes:
    a = np.frombuffer(buf, dtype=np.uint8).copy()
    pos = rng.choice(a.size * 8, nbits, replace=False)
    np.bitwise_xor.at(a, pos // 8, (1 << (pos % 8)).astype(np.uint8))
    return a.tobytes()


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_vote_recovers_minority_damage(n):
    rng = np.random.default_rng(n)
    orig = rng.integers(0, 256, 10000, dtype=np.uint8).tobytes()
    nbits = len(orig) * 8
    # 3000 random bit positions, each flipped in a random minority of the copies
    # (1 .. ceil(n/2) - 1 copies): every copy ends up damaged in many places.
    flips = np.zeros((n, nbits), dtype=np.uint8)
    for pos in rng.choice(nbits, 3000, replace=False):
        who = rng.choice(n, rng.integers(1, (n + 1) // 2, endpoint=False), replace=False)
        flips[who, pos] = 1
    base = np.frombuffer(orig, dtype=np.uint8)
    copies = [(base ^ np.packbits(f)).tobytes() for f in flips]
    assert all(c != orig for c in copies)
    assert bitwise_majority(copies) == orig
    assert majority_with_hash(copies, hash64(orig)) == (orig, True)
    # a minority of copies replaced by noise entirely
    bad = (n - 1) // 2
    copies = [rng.integers(0, 256, len(orig), dtype=np.uint8).tobytes() for _ in range(bad)]
    copies += [orig] * (n - bad)
    order = rng.permutation(n)
    assert bitwise_majority([copies[i] for i in order]) == orig


def test_vote_three_copies_matches_formula_and_ties_take_first(monkeypatch):
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 256, 4097, dtype=np.uint8) for _ in range(3))
    assert bitwise_majority([a, b, c]) == ((a & b) | (a & c) | (b & c)).tobytes()
    assert bitwise_majority([a.tobytes()]) == a.tobytes()
    assert bitwise_majority([a, b]) == a.tobytes()  # every disagreement is a tie
    # 4 copies: 2-2 ties take the first copy's bit, 3-1 takes the majority
    d = rng.integers(0, 256, 4097, dtype=np.uint8)
    bits = np.unpackbits(np.stack([a, b, c, d]), axis=1).astype(int)
    s = bits.sum(axis=0)
    want = np.where(s * 2 == 4, bits[0], s * 2 > 4).astype(np.uint8)
    assert bitwise_majority([a, b, c, d]) == np.packbits(want).tobytes()
    # 6 copies through the general path, over several blocks
    monkeypatch.setattr(vote, "_BLOCK", 1000)
    big = [rng.integers(0, 256, 3011, dtype=np.uint8) for _ in range(6)]
    bits = np.unpackbits(np.stack(big), axis=1).astype(int)
    s = bits.sum(axis=0)
    want = np.where(s * 2 == 6, bits[0], s * 2 > 6).astype(np.uint8)
    assert bitwise_majority(big) == np.packbits(want).tobytes()


def test_majority_with_hash():
    rng = np.random.default_rng(4)
    orig = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    h = hash64(orig)
    bad = _damage(orig, rng, 5)
    assert majority_with_hash([bad, orig, bad], h) == (orig, True)  # first intact copy
    assert majority_with_hash([bytearray(orig)], h) == (orig, True)
    # all damaged at different places: the vote repairs, the hash confirms
    copies = [_damage(orig, rng, 3) for _ in range(3)]
    assert majority_with_hash(copies, h) == (orig, True)
    # two copies damaged identically: the vote is wrong and says so
    data, ok = majority_with_hash([bad, bad, orig[:-1] + b"\0"], h)
    assert not ok and data != orig
    with pytest.raises(ValueError):
        bitwise_majority([orig, orig[:-1]])
    with pytest.raises(ValueError):
        bitwise_majority([])


def test_large_chunks_and_threads():
    """Stripes above the staging limit take the per-chunk-address path; the
    staging buffers are per thread."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(8)
    ec = ErasureCode(3, 2)
    c = 1 << 20  # chunks above backends.STAGE_LIMIT: no staging copy
    assert c > backends.STAGE_LIMIT
    buf = rng.integers(0, 256, 3 * c, dtype=np.uint8).tobytes()
    chunks = [memoryview(buf)[j * c : (j + 1) * c] for j in range(3)]
    par = ec.encode(chunks)
    assert par == ErasureCode(3, 2).encode([bytes(x) for x in chunks])
    assert [bytes(x) for x in ec.encode_stripes(buf, c)[0]] == par
    assert ec.reconstruct([None, chunks[1], None, par[0], par[1]]) == [bytes(x) for x in chunks]

    ec = ErasureCode(8, 2)
    stripes = [rand_chunks(rng, 8, 4096 * (1 + i % 3)) for i in range(24)]
    expected = [ec.encode(st) for st in stripes]

    def work(i):
        st = stripes[i]
        par = ec.encode(st)
        rec = ec.reconstruct([None] + st[1:7] + [None] + par)
        return par == expected[i] and rec == st

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, list(range(24)) * 4))


# --------------------------------------------------------------------------
# inner (archive) Reed-Solomon code
# --------------------------------------------------------------------------


def test_inner_code_geometry_and_reference():
    from torch_dtdr.integrity.inner import InnerCode

    ic = InnerCode(4096, 32)
    assert (ic.ncw, ic.rows, ic.pad, ic.parity_size) == (19, 216, 8, 608)
    assert ic.algorithm == "rs255_223_interleaved"
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096, dtype=np.uint8)
    par = ic.encode(data)
    assert par.shape == (3, 608)
    assert not ic.syndromes(data, par).any()
    slow = InnerCode(4096, 32)
    slow._lib = None  # numpy reference path
    assert np.array_equal(slow.encode(data), par)
    assert xxhash.xxh3_64_intdigest(ic.encode(np.frombuffer(b"".join(det_chunks(2)), np.uint8)).tobytes()) == (
        xxhash.xxh3_64_intdigest(slow.encode(np.frombuffer(b"".join(det_chunks(2)), np.uint8)).tobytes())
    )


@pytest.mark.parametrize("chunk_size,nsym", [(4096, 32), (1000, 16), (8192, 32)])
def test_inner_code_corrects_random_byte_errors(chunk_size, nsym):
    from torch_dtdr.integrity.inner import InnerCode

    ic = InnerCode(chunk_size, nsym)
    rng = np.random.default_rng(chunk_size)
    n = 32
    data = rng.integers(0, 256, n * chunk_size, dtype=np.uint8)
    par = ic.encode(data)
    bad, badp = data.copy(), par.copy().reshape(-1)
    for arr in (bad, badp):
        hit = rng.random(arr.size) < 1e-3 * (32 / nsym)
        arr[hit] ^= rng.integers(1, 256, hit.sum(), dtype=np.uint8)
    assert (bad != data).any()
    out, status = ic.decode(bad, badp)
    assert np.array_equal(out.reshape(-1), data)
    assert (status >= 0).all() and status.sum() == (bad != data).sum() + (badp != par.reshape(-1)).sum()
    assert ic.decode_chunk(bad[:chunk_size].tobytes(), badp[: ic.parity_size].tobytes()) == data[:chunk_size].tobytes()


def test_inner_code_limits():
    from torch_dtdr.integrity.inner import InnerCode

    ic = InnerCode()
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 4096, dtype=np.uint8)
    par = ic.encode(data)
    # 16 errors in one codeword (codeword 3: bytes 3, 3 + 19, ...) plus 16 in
    # its parity row positions of another codeword: both at capacity.
    bad, badp = data.copy(), par.copy().reshape(-1)
    bad[3 + 19 * rng.choice(215, 16, replace=False)] ^= 0x5A
    badp[5 + 19 * rng.choice(32, 16, replace=False)] ^= 0xA5
    out, status = ic.decode(bad, badp)
    assert np.array_equal(out[0], data) and status[0] == 32
    # far beyond capacity: reported, never claimed as fixed
    noisy = rng.integers(0, 256, 4096, dtype=np.uint8)
    out, status = ic.decode(noisy, par)
    assert status[0] == -1
    with pytest.raises(IntegrityError):
        ic.decode_chunk(noisy.tobytes(), par.tobytes())
    with pytest.raises(ValueError):
        ic.encode(data[:-1])
    with pytest.raises(CodecError):
        InnerCode(4096, 31)


def test_rebuild_returns_only_erased_data():
    data = det_chunks(6, 512)
    for algorithm in parity.available_algorithms():
        ec = ErasureCode(6, 3, algorithm)
        full = data + ec.encode(data)
        assert ec.rebuild(full) == {}
        assert ec.rebuild(erase(full, (7,))) == {}
        assert ec.rebuild(erase(full, (1, 4, 6))) == {1: data[1], 4: data[4]}
        with pytest.raises(IntegrityError):
            ec.rebuild(erase(full, (0, 1, 2, 3)))


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 200_003])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536])
def test_chunk_hashes_compiled_and_package_agree(n, chunk):
    """The compiled one-call chunk checksums (the official xxHash code) give the digests
    the xxhash package gives chunk by chunk (the reference), on every buffer type."""
    from torch_dtdr.integrity import checksum, native

    data = np.random.default_rng(n + chunk).integers(0, 256, n, dtype=np.uint8)
    want = [xxhash.xxh3_64_intdigest(data[i: i + chunk].tobytes()) for i in range(0, n, chunk)]
    for buf in (data.tobytes(), bytearray(data.tobytes()), memoryview(data), data):
        got = checksum.chunk_hashes(buf, chunk)
        assert got.dtype == np.uint64 and got.tolist() == want
        with native.forced("reference"):
            assert checksum.chunk_hashes(buf, chunk).tolist() == want
    if native.hashes_module() is not None and want:
        with pytest.raises(ValueError):  # an output one digest short
            native.hashes_module().chunk_hashes(data, chunk, np.empty(len(want) - 1, np.uint64))
