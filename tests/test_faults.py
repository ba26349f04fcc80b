"""Tests of torch_dtdr.faults: deterministic, undoable fault injection."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import types
import uuid

import fsspec
import numpy as np
import pytest

from torch_dtdr import faults
from torch_dtdr.errors import CheckpointNotFoundError, DTDRError, IntegrityError
from torch_dtdr.faults import FaultArgumentError, FaultRecord, corrupt, undo

MiB = 1 << 20
SIZE = MiB + 1000  # not a multiple of 4 KiB: exercises the partial last sector

# every mode with a small, exact amount of damage
MODE_ARGS = {
    "replace": dict(count=300),
    "bitflip": dict(count=300),
    "burst": dict(count=4, burst_length=64),
    "zero-sectors": dict(count=3),
    "truncate": dict(count=5000),
    "region": dict(region=(1000, 3000)),
}


def _data(size=SIZE, seed=0) -> bytes:
    # no zero bytes, so zeroed sectors are visible byte by byte
    return np.random.default_rng(seed).integers(1, 256, size, dtype=np.uint8).tobytes()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Backend:
    def __init__(self, kind, tmp_path):
        self.kind = kind
        self.tmp_path = tmp_path
        self.prefix = f"memory://faults-{uuid.uuid4().hex}" if kind == "memory" else None

    def url(self, name):
        return f"{self.prefix}/{name}" if self.kind == "memory" else str(self.tmp_path / name)

    def write(self, name, data):
        url = self.url(name)
        fs, p = fsspec.core.url_to_fs(url)
        fs.pipe_file(p, data)
        return url

    def read(self, url):
        fs, p = fsspec.core.url_to_fs(url)
        return fs.cat_file(p)

    def cleanup(self):
        if self.prefix:
            fs, p = fsspec.core.url_to_fs(self.prefix)
            if fs.exists(p):
                fs.rm(p, recursive=True)


@pytest.fixture(params=["local", "memory"])
def backend(request, tmp_path):
    b = Backend(request.param, tmp_path)
    yield b
    b.cleanup()


def _diff_positions(a: bytes, b: bytes) -> np.ndarray:
    n = min(len(a), len(b))
    x, y = np.frombuffer(a[:n], np.uint8), np.frombuffer(b[:n], np.uint8)
    return np.flatnonzero(x != y)


def _check_record_matches(rec: FaultRecord, before: bytes, after: bytes):
    """The record's changes describe exactly the difference before -> after."""
    assert rec.original_size == len(before) and rec.new_size == len(after)
    assert rec.original_sha256 == _sha(before) and rec.damaged_sha256 == _sha(after)
    rebuilt = bytearray(before)
    prev_end = -1
    for off, old, new in rec.changes:
        assert off > prev_end  # sorted, non-overlapping, adjacent runs merged
        assert before[off : off + len(old)] == old
        if len(new) == len(old):
            rebuilt[off : off + len(new)] = new
        else:
            assert new == b"" and off == len(after) and off + len(old) == len(before)
            del rebuilt[off:]
        prev_end = off + len(old)
    assert bytes(rebuilt) == after


# --------------------------------------------------------------------------- every mode, both back-ends


@pytest.mark.parametrize("mode", list(MODE_ARGS))
def test_mode_deterministic_record_and_undo(backend, mode):
    data = _data()
    kw = MODE_ARGS[mode]
    a, b, c = (backend.write(n, data) for n in ("a.bin", "b.bin", "c.bin"))
    ra = corrupt(a, mode=mode, seed=11, **kw)
    rb = corrupt(b, mode=mode, seed=11, **kw)
    rc = corrupt(c, mode=mode, seed=12, **kw)
    da, db, dc = backend.read(a), backend.read(b), backend.read(c)
    # same file + same arguments -> byte-identical damage and identical records
    assert da == db and ra.changes == rb.changes and ra.parameters == rb.parameters
    assert da != data
    if mode != "truncate":  # truncation is not random
        assert da != dc
    _check_record_matches(ra, data, da)
    assert ra.n_bytes_changed == sum(max(len(o), len(n)) for _, o, n in ra.changes) > 0
    assert ra.mode == mode and ra.seed == 11 and ra.out is None and ra.target == a

    # JSON round trip, and through a file
    assert FaultRecord.from_json(ra.to_json()) == ra
    rec_file = backend.tmp_path / f"{mode}.json"
    ra.save(rec_file)
    loaded = FaultRecord.load(rec_file)
    assert loaded == ra and isinstance(json.loads(rec_file.read_text()), dict)
    assert mode in ra.summary() and "\n" not in ra.summary()

    # undo restores the original exactly
    assert undo(loaded) == a
    assert backend.read(a) == data
    undo(rc)
    assert backend.read(c) == data


@pytest.mark.parametrize("mode", list(MODE_ARGS))
def test_out_copy_leaves_source_untouched(backend, tmp_path, mode):
    data = _data()
    src = backend.write("src.bin", data)
    # the copy goes to the other back-end (local <-> memory)
    other = Backend("local" if backend.kind == "memory" else "memory", tmp_path / "other")
    try:
        dst = other.url("sub/dst.bin")
        rec = corrupt(src, mode=mode, seed=3, out=dst, **MODE_ARGS[mode])
        assert backend.read(src) == data
        damaged = other.read(dst)
        _check_record_matches(rec, data, damaged)
        assert rec.path == src and rec.out == dst and rec.target == dst
        # the same damage as in place
        inplace = backend.write("inplace.bin", data)
        corrupt(inplace, mode=mode, seed=3, **MODE_ARGS[mode])
        assert backend.read(inplace) == damaged
        undo(rec)  # restores the copy
        assert other.read(dst) == data
        with pytest.raises(IntegrityError):  # the source is not in the damaged state
            undo(rec, path=src)
    finally:
        other.cleanup()


@pytest.mark.parametrize("mode", list(MODE_ARGS))
def test_fraction_zero_changes_nothing(backend, mode):
    data = _data(50_000)
    url = backend.write("f.bin", data)
    kw = {"fraction": 0.0}
    if mode == "region":
        kw["region"] = (0, 1000)
    rec = corrupt(url, mode=mode, seed=1, **kw)
    assert rec.changes == [] and rec.n_bytes_changed == 0
    assert rec.original_sha256 == rec.damaged_sha256 == _sha(data)
    assert backend.read(url) == data
    undo(rec)
    assert backend.read(url) == data


# --------------------------------------------------------------------------- per-mode semantics


@pytest.mark.parametrize("mode", ["replace", "burst", "region"])
def test_replaced_bytes_always_differ(tmp_path, mode):
    # a file of one repeated value: a "replacement" by the same value would show
    data = b"\x5a" * 200_000
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    kw = {"replace": dict(fraction=0.05), "burst": dict(count=50, burst_length=100), "region": dict(region=(0, 100_000))}[mode]
    rec = corrupt(str(p), mode=mode, seed=5, **kw)
    after = p.read_bytes()
    for off, old, new in rec.changes:
        o, n = np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)
        assert (o != n).all()
    assert rec.n_bytes_differing == rec.n_bytes_changed == len(_diff_positions(data, after))
    # new values are spread over the 255 other values
    vals = np.frombuffer(b"".join(n for _, _, n in rec.changes), np.uint8)
    assert 0x5A not in vals and len(np.unique(vals)) > 200


def test_bitflip_flips_exactly_one_bit(tmp_path):
    data = _data()
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    rec = corrupt(str(p), mode="bitflip", count=2000, seed=2)
    after = p.read_bytes()
    pos = _diff_positions(data, after)
    assert len(pos) == 2000 == rec.n_bytes_changed
    x = np.frombuffer(data, np.uint8)[pos] ^ np.frombuffer(after, np.uint8)[pos]
    assert (np.unpackbits(x[:, None], axis=1).sum(axis=1) == 1).all()
    assert len(np.unique(x)) == 8  # all bit positions occur


@pytest.mark.parametrize("mode", ["replace", "bitflip"])
def test_count_and_fraction_semantics(tmp_path, mode):
    data = _data(MiB)
    p = tmp_path / "x.bin"
    for count in (0, 1, 777):
        p.write_bytes(data)
        rec = corrupt(str(p), mode=mode, count=count, seed=9)
        assert len(_diff_positions(data, p.read_bytes())) == count == rec.n_bytes_changed
        assert rec.parameters["n_selected"] == count
    # fraction: Binomial(n, p) damaged bytes, n p = 1048.6, sd = 32.4
    counts = []
    for seed in range(4):
        p.write_bytes(data)
        rec = corrupt(str(p), mode=mode, fraction=1e-3, seed=seed)
        k = len(_diff_positions(data, p.read_bytes()))
        assert k == rec.n_bytes_changed == rec.parameters["n_selected"]
        assert abs(k - MiB * 1e-3) < 5 * math.sqrt(MiB * 1e-3)
        counts.append(k)
    assert len(set(counts)) > 1
    # nearly everything: drawn as the complement, still exact
    p.write_bytes(data)
    rec = corrupt(str(p), mode=mode, count=MiB - 10, seed=1)
    assert len(_diff_positions(data, p.read_bytes())) == MiB - 10
    undo(rec)
    assert p.read_bytes() == data
    p.write_bytes(data)
    corrupt(str(p), mode=mode, fraction=1.0, seed=1)
    assert len(_diff_positions(data, p.read_bytes())) == MiB


def test_zero_sectors_aligned_and_zero(tmp_path):
    data = _data()  # SIZE = 256 sectors + 1000 bytes
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    rec = corrupt(str(p), mode="zero-sectors", count=20, seed=4)
    after = p.read_bytes()
    assert len(after) == len(data)
    n_sectors = 0
    for off, old, new in rec.changes:
        assert off % 4096 == 0
        assert len(new) % 4096 == 0 or off + len(new) == SIZE  # whole sectors, or the partial last one
        assert new == bytes(len(new)) and after[off : off + len(new)] == new and old == data[off : off + len(old)]
        n_sectors += -(-len(new) // 4096)
    assert n_sectors == 20
    # outside the recorded sectors nothing changed
    changed = _diff_positions(data, after)
    inside = np.zeros(len(data), bool)
    for off, old, _ in rec.changes:
        inside[off : off + len(old)] = True
    assert inside[changed].all() and len(changed) == rec.n_bytes_differing
    # every sector, including the partial last one, is eligible; other sector sizes
    p.write_bytes(data)
    rec = corrupt(str(p), mode="zero-sectors", count=257, seed=4)
    assert p.read_bytes() == bytes(SIZE) and rec.parameters["n_selected"] == 257
    with pytest.raises(FaultArgumentError):
        corrupt(str(p), mode="zero-sectors", count=258, seed=4)
    p.write_bytes(data)
    rec = corrupt(str(p), mode="zero-sectors", count=5, seed=4, sector_size=512)
    assert all(off % 512 == 0 and len(new) % 512 == 0 for off, _, new in rec.changes)
    assert rec.n_bytes_changed == 5 * 512
    # fraction: probability per sector
    p.write_bytes(data)
    rec = corrupt(str(p), mode="zero-sectors", fraction=0.5, seed=4)
    assert 80 < rec.parameters["n_selected"] < 180


def test_bursts_contiguous(tmp_path):
    data = _data()
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    rec = corrupt(str(p), mode="burst", count=10, burst_length=100, seed=6)
    after = p.read_bytes()
    assert rec.parameters["n_selected"] == 10
    # each run is one burst or several overlapping/touching ones: >= 100 long, fully changed
    assert all(len(new) >= 100 for _, _, new in rec.changes)
    assert sum(len(new) for _, _, new in rec.changes) <= 1000
    changed = _diff_positions(data, after)
    assert len(changed) == rec.n_bytes_changed
    assert (len(rec.changes) == 10) == (rec.n_bytes_changed == 1000)
    # fraction: about `fraction` of the bytes, in bursts
    p.write_bytes(data)
    rec = corrupt(str(p), mode="burst", fraction=0.01, burst_length=64, seed=6)
    assert 0.006 * SIZE < rec.n_bytes_changed < 0.014 * SIZE
    assert all(len(new) >= 64 for _, _, new in rec.changes)


def test_truncate_sizes(backend):
    data = _data(10_000)
    url = backend.write("t.bin", data)
    rec = corrupt(url, mode="truncate", fraction=0.25, seed=0)
    assert rec.new_size == 10_000 - math.floor(10_000 * 0.25) == 7500
    assert backend.read(url) == data[:7500]
    assert rec.changes == [(7500, data[7500:], b"")] and rec.n_bytes_changed == 2500
    assert FaultRecord.from_json(rec.to_json()) == rec
    undo(rec)
    assert backend.read(url) == data
    for count, new_size in ((1, 9999), (10_000, 0), (0, 10_000)):
        rec = corrupt(url, mode="truncate", count=count, seed=0)
        assert rec.new_size == new_size and len(backend.read(url)) == new_size
        undo(rec)
        assert backend.read(url) == data
    rec = corrupt(url, mode="truncate", fraction=0.3333, seed=0)
    assert rec.new_size == 10_000 - 3333
    undo(rec)
    with pytest.raises(FaultArgumentError):
        corrupt(url, mode="truncate", count=10_001, seed=0)


# --------------------------------------------------------------------------- regions


REGION = [(1000, 5000), (300_000, 400_000), (4096 * 100 + 7, 4096 * 110 + 3)]


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("replace", dict(fraction=0.05)),
        ("bitflip", dict(count=2000)),
        ("burst", dict(count=200, burst_length=64)),
        ("zero-sectors", dict(fraction=1.0)),
        ("region", dict()),
        ("region", dict(count=10)),
    ],
)
def test_region_restriction(backend, mode, kw):
    data = _data()
    url = backend.write("r.bin", data)
    rec = corrupt(url, mode=mode, seed=8, region=REGION, **kw)
    after = backend.read(url)
    allowed = np.zeros(SIZE, bool)
    for s, e in REGION:
        allowed[s:e] = True
    changed = _diff_positions(data, after)
    assert len(changed) > 0 and allowed[changed].all()
    assert rec.parameters["region"] == [list(r) for r in REGION]
    if mode == "zero-sectors":
        # only sectors wholly inside a range: none in (1000, 5000); [300_000, 400_000) -> sectors 74..96; 101..109
        sectors = set((changed // 4096).tolist())
        assert sectors == set(range(74, 97)) | set(range(101, 110))
    if mode == "region" and not kw:
        assert len(changed) == sum(e - s for s, e in REGION)
    undo(rec)
    assert backend.read(url) == data


def test_region_single_range_and_burst_fit(tmp_path):
    data = _data(100_000)
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    rec = corrupt(str(p), mode="replace", count=50, seed=1, region=(10, 60))
    assert len(_diff_positions(data, p.read_bytes())) == 50 and rec.changes[0][0] == 10
    undo(rec)
    # a burst never straddles a range end: (10, 74) fits exactly one 64-byte burst
    rec = corrupt(str(p), mode="burst", count=1, burst_length=64, seed=1, region=[(10, 74), (80, 100)])
    assert [(off, len(new)) for off, _, new in rec.changes] == [(10, 64)]
    undo(rec)
    with pytest.raises(FaultArgumentError):
        corrupt(str(p), mode="burst", count=2, burst_length=64, seed=1, region=[(10, 74), (80, 100)])
    assert p.read_bytes() == data


def test_region_names(tmp_path, monkeypatch):
    # Stand-in for torch_dtdr.format.reader.regions, to test only the name
    # resolution logic (exact names, fnmatch globs, lists mixing names and
    # ranges); the real end-to-end test on a DTDR file lives with the format.
    table = {
        "trailer": [(99_000, 100_000)],
        "index": [(90_000, 91_000)],
        "tensor:w": [(1000, 3000), (5000, 6000)],
        "tensor:w:meta": [(1000, 1100)],
        "tensor:b": [(20_000, 21_000)],
        "tensor:b:meta": [(20_000, 20_050)],
    }
    calls = []

    def fake_regions(path, storage_options=None):
        calls.append((path, storage_options))
        return table

    monkeypatch.setitem(sys.modules, "torch_dtdr.format.reader", types.SimpleNamespace(regions=fake_regions))
    data = _data(100_000)
    p = tmp_path / "x.dtdr"
    p.write_bytes(data)

    def changed_with(region, **kw):
        p.write_bytes(data)
        rec = corrupt(str(p), seed=1, region=region, **kw)
        pos = _diff_positions(data, p.read_bytes())
        undo(rec)
        return rec, set(pos.tolist())

    rec, pos = changed_with("trailer", mode="region")
    assert pos == set(range(99_000, 100_000)) and rec.parameters["region"] == ["trailer"]
    assert calls[-1] == (str(p), None)
    _, pos = changed_with("tensor:*:meta", mode="region")
    assert pos == set(range(1000, 1100)) | set(range(20_000, 20_050))
    _, pos = changed_with("tensor:w", mode="region")  # exact name: not tensor:w:meta only
    assert pos == set(range(1000, 3000)) | set(range(5000, 6000))
    _, pos = changed_with(["index", (10, 20)], mode="region")
    assert pos == set(range(90_000, 91_000)) | set(range(10, 20))
    _, pos = changed_with("tensor:*", mode="bitflip", count=30)
    assert len(pos) == 30 and all(1000 <= x < 6000 or 20_000 <= x < 21_000 for x in pos)
    with pytest.raises(FaultArgumentError):
        corrupt(str(p), mode="region", seed=1, region="parity")
    table["bad"] = [(99_000, 100_001)]
    with pytest.raises(FaultArgumentError):
        corrupt(str(p), mode="region", seed=1, region="bad")
    assert p.read_bytes() == data


# --------------------------------------------------------------------------- the documented sampling procedure


def _reference_damage(data: bytes, mode: str, seed: int, fraction=None, count=None) -> bytes:
    """The module docstring's procedure for replace/bitflip without region,
    written out naively (a loop over draws)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(data)
    k = count if count is not None else int(rng.binomial(n, fraction))
    m = n - k if k > n - k else k
    accepted: list[int] = []
    seen: set[int] = set()
    while len(accepted) < m:
        for v in rng.integers(0, n, size=m - len(accepted), dtype=np.int64).tolist():
            if v not in seen:
                seen.add(v)
                accepted.append(v)
    chosen = sorted(set(range(n)) - seen) if k > n - k else sorted(accepted)
    old = np.frombuffer(data, np.uint8)[chosen]
    if mode == "replace":
        new = old + rng.integers(1, 256, size=len(chosen), dtype=np.uint8)
    else:
        new = old ^ np.left_shift(np.uint8(1), rng.integers(0, 8, size=len(chosen), dtype=np.uint8))
    out = np.frombuffer(data, np.uint8).copy()
    out[chosen] = new
    return out.tobytes()


@pytest.mark.parametrize(
    "mode,kw",
    [("replace", dict(count=500)), ("bitflip", dict(fraction=0.01)), ("replace", dict(count=15_000)), ("bitflip", dict(count=19_990))],
)
def test_sampling_procedure_matches_documentation(tmp_path, mode, kw):
    data = _data(20_000)
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    corrupt(str(p), mode=mode, seed=1234, **kw)
    assert p.read_bytes() == _reference_damage(data, mode, 1234, **kw)


# --------------------------------------------------------------------------- undo safety


def test_undo_refuses_when_file_changed(backend):
    data = _data(100_000)
    url = backend.write("u.bin", data)
    fs, p = fsspec.core.url_to_fs(url)
    rec = corrupt(url, mode="replace", count=100, seed=1)
    damaged = backend.read(url)

    # a damaged byte changed again
    off = rec.changes[0][0]
    edited = bytearray(damaged)
    edited[off] ^= 0xFF
    fs.pipe_file(p, bytes(edited))
    with pytest.raises(IntegrityError) as ei:
        undo(rec)
    assert ei.value.byte_range == (off, off + 1)
    assert backend.read(url) == bytes(edited)  # nothing written

    # a byte the fault did not touch changed
    untouched = next(i for i in range(len(data)) if all(not (o <= i < o + len(b)) for o, b, _ in rec.changes))
    edited = bytearray(damaged)
    edited[untouched] ^= 1
    fs.pipe_file(p, bytes(edited))
    with pytest.raises(IntegrityError):
        undo(rec)
    assert backend.read(url) == bytes(edited)

    # size changed
    fs.pipe_file(p, damaged + b"x")
    with pytest.raises(IntegrityError):
        undo(rec)

    # already undone: refuses a second time
    fs.pipe_file(p, damaged)
    undo(rec)
    with pytest.raises(IntegrityError):
        undo(rec)
    assert backend.read(url) == data

    # truncation undone onto a file that changed
    rec = corrupt(url, mode="truncate", count=10, seed=1)
    fs.pipe_file(p, data[:-11] + b"Z")
    with pytest.raises(IntegrityError):
        undo(rec)


def test_undo_without_damaged_sha_still_checks_bytes(tmp_path):
    data = _data(50_000)
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    rec = corrupt(str(p), mode="bitflip", count=10, seed=3)
    d = json.loads(rec.to_json())
    d["damaged_sha256"] = None
    rec2 = FaultRecord.from_dict(d)
    off = rec2.changes[3][0]
    b = bytearray(p.read_bytes())
    b[off] ^= 0x80
    p.write_bytes(bytes(b))
    with pytest.raises(IntegrityError):
        undo(rec2)
    b[off] ^= 0x80
    p.write_bytes(bytes(b))
    undo(rec2)
    assert p.read_bytes() == data


def test_malformed_records_rejected(tmp_path):
    data = _data(10_000)
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    rec = corrupt(str(p), mode="replace", count=10, seed=3)
    for text in ("not json", "[]", json.dumps({"format": "other"})):
        with pytest.raises(FaultArgumentError):
            FaultRecord.from_json(text)
    d = json.loads(rec.to_json())
    d["changes"] = d["changes"][::-1]  # unsorted
    with pytest.raises(FaultArgumentError):
        FaultRecord.from_dict(d)
    d = json.loads(rec.to_json())
    d["new_size"] = 9_000  # sizes inconsistent with the changes
    with pytest.raises(FaultArgumentError):
        FaultRecord.from_dict(d)
    with pytest.raises(CheckpointNotFoundError):
        FaultRecord.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_typed_value_errors(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(_data(10_000))
    path = str(p)
    bad = [
        dict(mode="replace", fraction=0.1, count=3),  # both
        dict(mode="replace"),  # neither
        dict(mode="shred", count=1),  # unknown mode
        dict(mode="replace", fraction=-0.1),
        dict(mode="replace", fraction=1.5),
        dict(mode="replace", fraction=float("nan")),
        dict(mode="replace", fraction="0.1"),
        dict(mode="replace", count=-1),
        dict(mode="replace", count=2.0),
        dict(mode="replace", count=True),
        dict(mode="replace", count=10_001),  # more than the file holds
        dict(mode="replace", count=11, region=(0, 10)),  # more than the region holds
        dict(mode="replace", count=1, region=(0, 10_001)),  # region beyond the file
        dict(mode="replace", count=1, region=[(0, 10), (9_000, 20_000)]),
        dict(mode="replace", count=1, region=(20, 10)),  # start > end
        dict(mode="replace", count=1, region=(-1, 10)),
        dict(mode="replace", count=1, region=[(1, 2, 3)]),
        dict(mode="replace", count=1, region=42),
        dict(mode="region"),  # region mode without region
        dict(mode="truncate", count=1, region=(0, 10)),
        dict(mode="burst", count=1, burst_length=0),
        dict(mode="zero-sectors", count=1, sector_size=0),
        dict(mode="burst", count=1, burst_length=100, region=(0, 99)),
        dict(mode="replace", count=1, storage_options="nope"),
    ]
    for kw in bad:
        with pytest.raises(FaultArgumentError) as ei:
            corrupt(path, seed=0, **kw)
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, DTDRError), kw
    for seed in (-1, 1.5, None):
        with pytest.raises(ValueError):
            corrupt(path, mode="replace", count=1, seed=seed)
    with pytest.raises(TypeError):
        corrupt(path, mode="replace", count=1)  # seed is required
    assert p.read_bytes() == _data(10_000)  # nothing was damaged by a rejected call


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        corrupt(str(tmp_path / "nope.bin"), mode="replace", count=1, seed=0)
    with pytest.raises(CheckpointNotFoundError):
        corrupt(f"memory://faults-{uuid.uuid4().hex}/nope.bin", mode="replace", count=1, seed=0)
    with pytest.raises(CheckpointNotFoundError):
        corrupt(str(tmp_path), mode="replace", count=1, seed=0)  # a directory


def test_empty_file_and_file_url(tmp_path):
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    rec = corrupt(str(p), mode="replace", fraction=0.5, seed=0)
    assert rec.changes == [] and rec.original_size == 0
    with pytest.raises(FaultArgumentError):
        corrupt(str(p), mode="replace", count=1, seed=0)
    data = _data(5000)
    q = tmp_path / "f.bin"
    q.write_bytes(data)
    rec = corrupt(f"file://{q}", mode="bitflip", count=5, seed=0)
    assert len(_diff_positions(data, q.read_bytes())) == 5
    undo(rec)
    assert q.read_bytes() == data
    # out= naming the same file damages in place
    rec = corrupt(str(q), mode="bitflip", count=5, seed=0, out=f"file://{q}")
    assert rec.out is None and len(_diff_positions(data, q.read_bytes())) == 5
    undo(rec)
    assert q.read_bytes() == data


def test_multi_block_file(tmp_path, monkeypatch):
    # a small streaming block exercises runs that cross block boundaries
    monkeypatch.setattr(faults, "_BLOCK", 1000)
    data = _data(20_000)
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    ref = tmp_path / "ref.bin"
    for mode, kw in [("burst", dict(count=50, burst_length=333)), ("region", dict(region=(999, 15_001))), ("truncate", dict(count=1500))]:
        p.write_bytes(data)
        rec = corrupt(str(p), mode=mode, seed=2, **kw)
        after = p.read_bytes()
        _check_record_matches(rec, data, after)
        monkeypatch.setattr(faults, "_BLOCK", 1 << 22)
        ref.write_bytes(data)
        corrupt(str(ref), mode=mode, seed=2, **kw)
        assert ref.read_bytes() == after  # the block size does not change the damage
        monkeypatch.setattr(faults, "_BLOCK", 1000)
        undo(rec)
        assert p.read_bytes() == data
