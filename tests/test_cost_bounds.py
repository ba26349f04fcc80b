"""Damage never costs more than a bounded multiple of a clean load
(docs/security.md, "Time and memory as functions of the file size").

* Any file the writer produces, damaged any way, loads, opens and verifies in
  at most 10 x the CPU time of a clean load of the same geometry plus a
  constant, and a file of about 2 MB never takes more than a second of CPU.
* ``open``/``load`` of a file under 1 MB uses at most 100 MB above baseline.
* Each damaged stripe is repaired once per open file (the repair outcome is
  cached, shared between record reads and the scrub of ``verify``).

CPU time and peak RSS are measured in a subprocess (``fuzz/cost.py``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr import api
from torch_dtdr.format.reader import ContainerReader
from torch_dtdr.integrity import native as rs_native
from torch_dtdr.storage import open_source

from .helpers import assert_same, pseudo, zero_range

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fuzz import craft  # noqa: E402

COST = os.path.join(ROOT, "fuzz", "cost.py")
#: The bars of issue 12; the constant absorbs interpreter noise on a shared machine.
RATIO, CONSTANT_S = 10.0, 0.5
TWO_MB_CPU_S = 1.0
SMALL_FILE_MB = 100.0
#: The archive level's inner Reed-Solomon decoding of damaged chunks, on top of
#: the ratio, when the numpy reference decodes it (TORCH_DTDR_NATIVE=0 or no
#: compiled decoder: about 0.2 s per MB of damaged chunks; see security.md). The
#: compiled decoder (under 0.01 s per MB) meets the bar of the other geometries.
INNER_S_PER_MB = 0.0 if rs_native.core() == "native" else 0.4


def _cost(files, ops="load,open,verify,repair") -> dict:
    cmd = [sys.executable, COST, "--ops", ops, "--as-limit-mb", "3072", *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def _striped_end(data: bytes) -> int:
    with open_source(io.BytesIO(data)) as src:
        return ContainerReader(src).geometry.physical_end


#: (name, save keyword arguments, elements of the one float32 tensor): files of about 2 MB
GEOMETRIES = [
    ("default", {}, 1 << 19),
    ("strong", {"parity": "strong"}, 400_000),
    ("archive", {"parity": "archive"}, 400_000),
    ("k1m31-32k", {"parity": (1, 31), "chunk_size": 32768}, 16384),
    # under 1 MB: also held to 100 MB of memory
    ("default-small", {}, 1 << 17),
    ("strong-small", {"parity": "strong"}, 100_000),
    ("k1m31-16k-small", {"parity": (1, 31), "chunk_size": 16384}, 3000),
]


def _damaged_variants(data: bytes, rng: random.Random) -> dict[str, bytes]:
    end = _striped_end(data)
    out = {}
    d = bytearray(data)
    d[:end] = rng.randbytes(end)
    out["overwritten"] = bytes(d)  # every stripe beyond repair
    d = bytearray(data)
    for pos in rng.sample(range(end), end // 100):  # 1 % of the bytes: every chunk damaged
        d[pos] ^= rng.randrange(1, 256)
    out["replace-1e-2"] = bytes(d)
    d = bytearray(data)
    for pos in rng.sample(range(end), end // 3000):
        d[pos] ^= rng.randrange(1, 256)
    out["replace-3e-4"] = bytes(d)
    d = bytearray(data[:end + 100])  # cut inside the footer, no checksums, and damaged
    for pos in rng.sample(range(len(d)), len(d) // 100):
        d[pos] ^= rng.randrange(1, 256)
    out["cut-and-damaged"] = bytes(d)
    return out


@pytest.fixture(scope="module")
def cost_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cost")
    rng = random.Random(12)
    clean, damaged = {}, {}
    for name, kwargs, n in GEOMETRIES:
        buf = io.BytesIO()
        api.save({"w": pseudo(n, seed=7), "b": pseudo(3000, seed=8), "step": torch.arange(3)}, buf, **kwargs)
        data = buf.getvalue()
        clean[name] = str(folder / f"{name}-clean.dtdr")
        open(clean[name], "wb").write(data)
        for kind, bad in _damaged_variants(data, rng).items():
            path = str(folder / f"{name}-{kind}.dtdr")
            open(path, "wb").write(bad)
            damaged[path] = name
    return clean, damaged


def test_damage_costs_at_most_ten_clean_loads_and_a_second_per_2mb(cost_files):
    clean, damaged = cost_files
    base = _cost(list(clean.values()), ops="load")
    results = _cost(list(damaged))
    failures = []
    for path, geometry in damaged.items():
        size_mb = os.path.getsize(path) / 1e6
        clean_s = base[clean[geometry]]["load"]["cpu_s"]
        for op, rec in results[path].items():
            assert rec["outcome"] != "crash", (path, op, rec)
            limit = RATIO * clean_s + CONSTANT_S
            # the reference decoder of the inner code (security.md): its allowance holds under every bar
            inner_s = INNER_S_PER_MB * size_mb if geometry == "archive" else 0.0
            limit += inner_s
            if op == "repair":  # a repair of damage it cannot undo reads twice and writes once
                limit = 2 * limit + RATIO * base[clean[geometry]]["load"]["cpu_s"]
            elif size_mb <= 2.2:
                limit = min(limit, TWO_MB_CPU_S + inner_s)
            if rec["cpu_s"] > limit:
                failures.append(f"{os.path.basename(path)} {op}: {rec['cpu_s']:.2f} s CPU > {limit:.2f} s "
                                f"(clean load {clean_s:.3f} s, {size_mb:.1f} MB)")
            if size_mb < 1.0 and op in ("load", "open") and rec["peak_mb"] > SMALL_FILE_MB:
                failures.append(f"{os.path.basename(path)} {op}: {rec['peak_mb']:.0f} MB")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(rs_native.core() != "native", reason="the reference inner decoder (TORCH_DTDR_NATIVE=0 or not "
                    "built) holds only its allowance, checked above")
def test_archive_damage_costs_at_most_ten_clean_loads_where_the_constant_is_small(tmp_path):
    """About 9 MB at the archive level, every chunk damaged: the constant no longer
    covers the inner decoding (the numpy reference decoder fails this by far)."""
    buf = io.BytesIO()
    api.save({"w": pseudo(2_000_000, seed=7), "step": torch.arange(3)}, buf, parity="archive")
    data = buf.getvalue()
    clean = str(tmp_path / "clean.dtdr")
    open(clean, "wb").write(data)
    variants = _damaged_variants(data, random.Random(13))
    paths = []
    for kind in ("overwritten", "replace-1e-2", "replace-3e-4"):
        paths.append(str(tmp_path / f"{kind}.dtdr"))
        open(paths[-1], "wb").write(variants[kind])
    clean_s = sorted(_cost([clean], ops="load")[clean]["load"]["cpu_s"] for _ in range(3))[1]
    results = _cost(paths, ops="load,open,verify")
    limit = RATIO * clean_s + CONSTANT_S
    over = [f"{os.path.basename(p)} {op}: {rec['cpu_s']:.2f} s CPU > {limit:.2f} s (clean load {clean_s:.3f} s)"
            for p in paths for op, rec in results[p].items() if rec["outcome"] == "crash" or rec["cpu_s"] > limit]
    assert not over, "\n".join(over)


def _expanding_index_file() -> bytes:
    """77 KB: an index blob whose incompressible filler lifts a compressed-size
    based cap, and whose JSON is empty arrays (about 25 x when parsed)."""
    data = craft.save_bytes({"w": pseudo(100)})
    filler = base64.b64encode(random.Random(6).randbytes(40_000)).decode()
    arrays = ",".join(["[]"] * 10_000_000)
    raw = ('{"pad":"' + filler + '","x":[' + arrays + "]}").encode()
    return craft.reseal(data, index_payload=craft.zstd_frame(raw))


def test_small_file_with_expanding_index_stays_under_100_mb(tmp_path):
    data = _expanding_index_file()
    assert len(data) < 1 << 20
    path = str(tmp_path / "expanding.dtdr")
    open(path, "wb").write(data)
    rec = _cost([path], ops="load,open,verify")[path]
    for op, r in rec.items():
        assert r["outcome"] != "crash", (op, r)
        assert r["peak_mb"] < SMALL_FILE_MB, (op, r)
        assert r["cpu_s"] < TWO_MB_CPU_S, (op, r)


def _round_robin_file(tmp_path):
    """400 small tensors, four per stripe, one zeroed chunk in each of 100 stripes."""
    sd = {f"t{i:03d}": pseudo(960, seed=i) for i in range(400)}
    path = str(tmp_path / "rr.dtdr")
    api.save(sd, path, codec="raw", parity=(4, 2))
    with open_source(path) as src:
        g = ContainerReader(src).geometry
    for stripe in range(g.n_stripes - 1):
        zero_range(path, stripe * g.stripe_span + (stripe % 4) * g.chunk_size, g.chunk_size)
    return sd, path, g.n_stripes - 1


@pytest.fixture()
def count_stripe_repairs(monkeypatch):
    calls = []
    original = ContainerReader._repair_stripe

    def counted(self, stripe):
        calls.append(stripe)
        return original(self, stripe)

    monkeypatch.setattr(ContainerReader, "_repair_stripe", counted)
    return calls


def test_open_repairs_each_stripe_once_whatever_the_order(tmp_path, count_stripe_repairs):
    sd, path, damaged = _round_robin_file(tmp_path)
    order = sorted(sd, key=lambda k: (int(k[1:]) % 4, int(k[1:])))  # round robin over the stripes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch_dtdr.open(path, errors="strict") as f:
            for k in order:
                assert_same(f.get_tensor(k), sd[k])
    assert len(count_stripe_repairs) == len(set(count_stripe_repairs)) <= damaged


def test_verify_repairs_each_stripe_once(tmp_path, count_stripe_repairs):
    sd, path, damaged = _round_robin_file(tmp_path)
    rep = torch_dtdr.verify(path)
    assert rep.status == "repaired" and rep.exact
    assert len(count_stripe_repairs) == len(set(count_stripe_repairs)) == damaged


def test_threads_share_each_stripe_repair(tmp_path, count_stripe_repairs):
    sd, path, damaged = _round_robin_file(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = api.load(path, errors="strict", max_workers=4)
        with torch_dtdr.open(path) as f:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(4) as pool:
                got = dict(zip(sd, pool.map(f.get_tensor, list(sd))))
    for k in sd:
        assert_same(obj[k], sd[k])
        assert_same(got[k], sd[k])
    assert len(count_stripe_repairs) <= 2 * damaged  # once for the load, once for the open file
