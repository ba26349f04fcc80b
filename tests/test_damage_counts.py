"""What verify's damage counts mean: the bytes that were actually wrong and were restored are counted byte by
byte (stored against restored), through parity repair, the per-open-file stripe cache and votes between copies;
the bytes of chunks that could not be restored are counted in whole chunks, and labelled so."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr.errors import DamageWarning
from torch_dtdr.faults import corrupt
from torch_dtdr.format import constants
from torch_dtdr.format.reader import ContainerReader, regions
from torch_dtdr.storage import open_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = constants.DEFAULT_CHUNK_SIZE


def _dtdr(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "torch_dtdr.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def _one_chunk_of(path, region_name: str, index: int = 1) -> tuple[int, int]:
    """The physical byte range of the ``index``-th whole checksum chunk inside region ``region_name``."""
    start, end = regions(str(path))[region_name][0]
    first = -(-start // CHUNK) * CHUNK + index * CHUNK
    assert first + CHUNK <= end
    return first, first + CHUNK


def _row(stdout: str, name: str) -> list[str]:
    return next(line.split() for line in stdout.splitlines() if line.split()[:1] == [name])


def test_verify_counts_the_37_wrong_bytes_not_the_chunk(tmp_path):
    path = tmp_path / "m.dtdr"
    torch.manual_seed(0)
    torch_dtdr.save({"w": torch.randn(200_000), "b": torch.randn(16)}, path)
    lo, hi = _one_chunk_of(path, "tensor:w:base")
    corrupt(str(path), mode="replace", count=37, seed=3, region=(lo, hi))
    rep = torch_dtdr.verify(str(path))
    w = next(t for t in rep.tensors if t.name == "w")
    assert w.status == "repaired"
    assert w.wrong_bytes_repaired == 37 and w.unrepaired_bytes == 0
    assert sum(e - s for s, e in w.repaired_bytes) == CHUNK  # the chunk that failed its checksum
    proc = _dtdr("verify", "m.dtdr", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "wrong bytes repaired" in line)
    assert "unrepaired bytes (whole chunks)" in header and "chunk bytes" not in header.replace("(whole chunks)", "")
    row = _row(proc.stdout, "w")
    assert row[1] == "repaired" and int(row[3]) == 37 and int(row[4]) == 0
    doc = json.loads(_dtdr("verify", "--json", "m.dtdr", cwd=tmp_path).stdout)
    wj = next(t for t in doc["tensors"] if t["name"] == "w")
    assert wj["wrong_bytes_repaired"] == 37 and wj["unrepaired_bytes"] == 0
    assert wj["repaired_bytes"] == [list(r) for r in w.repaired_bytes]  # the old field still there


def test_unrepairable_damage_is_counted_in_whole_chunks(tmp_path):
    path = tmp_path / "m.dtdr"
    torch.manual_seed(0)
    torch_dtdr.save({"w": torch.randn(200_000)}, path, parity="off")
    lo, hi = _one_chunk_of(path, "tensor:w:base")
    corrupt(str(path), mode="replace", count=5, seed=4, region=(lo, hi))
    w = torch_dtdr.verify(str(path)).tensors[0]
    assert w.status == "degraded" and w.wrong_bytes_repaired == 0
    assert w.unrepaired_bytes == CHUNK == sum(e - s for s, e in w.damaged_bytes)
    proc = _dtdr("verify", "--json", "m.dtdr", cwd=tmp_path)
    wj = json.loads(proc.stdout)["tensors"][0]
    assert wj["unrepaired_bytes"] == CHUNK and wj["wrong_bytes_repaired"] == 0
    row = _row(_dtdr("verify", "m.dtdr", cwd=tmp_path).stdout, "w")
    assert int(row[3]) == 0 and int(row[4]) == CHUNK


def test_a_stripe_repaired_once_and_served_from_the_cache_counts_each_wrong_byte_once(tmp_path):
    """Two tensors whose records share one damaged chunk: the second read takes the stripe's repair from the
    open file's cache; each tensor counts the wrong bytes on its own side of the boundary, once."""
    path = tmp_path / "m.dtdr"
    torch.manual_seed(1)
    torch_dtdr.save({"a": torch.randn(3000), "b": torch.randn(3000)}, path, codec="raw")
    (a_start, a_end), = regions(str(path))["tensor:a:data"]
    (b_start, b_end), = regions(str(path))["tensor:b:data"]
    boundary = a_end // CHUNK * CHUNK
    assert a_start < boundary and b_start < boundary + CHUNK  # one chunk holds the end of a and the start of b
    flips_a = [(o, o + 1) for o in range(a_end - 20, a_end - 8)]  # 12 bytes of a's data
    flips_b = [(o, o + 1) for o in range(b_start + 4, b_start + 11)]  # 7 bytes of b's data
    corrupt(str(path), mode="region", region=flips_a + flips_b, seed=5)
    with torch_dtdr.open(str(path), warn_damage=False) as f:
        a = f.get_tensor("a")
        repairs = f._reader.stripe_repairs
        b = f.get_tensor("b")
        assert f._reader.stripe_repairs == repairs == 1  # b's read was served from the stripe cache
        rep = f.report()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    counts = {t.name: t.wrong_bytes_repaired for t in rep.tensors}
    assert counts == {"a": 12, "b": 7}
    assert all(t.status == "repaired" and t.unrepaired_bytes == 0 for t in rep.tensors)
    whole = torch_dtdr.verify(str(path))
    assert {t.name: t.wrong_bytes_repaired for t in whole.tensors} == {"a": 12, "b": 7}


def test_copies_restored_by_the_vote_count_their_wrong_bytes(tmp_path):
    """An integer tensor is stored in 3 copies; without parity, damage to one copy is restored by the others."""
    path = tmp_path / "m.dtdr"
    torch_dtdr.save({"i": torch.arange(5000, dtype=torch.int64)}, path, parity="off")
    (start, end), = regions(str(path))["tensor:i:data"]
    lo = -(-start // CHUNK) * CHUNK
    corrupt(str(path), mode="replace", count=9, seed=6, region=(lo, lo + CHUNK))
    t = torch_dtdr.verify(str(path)).tensors[0]
    assert t.status == "repaired" and t.wrong_bytes_repaired == 9
    assert t.unrepaired_bytes == 0 and t.damaged_bytes == []
    assert torch.equal(torch_dtdr.load(str(path))["i"], torch.arange(5000, dtype=torch.int64))


def test_a_footerless_file_counts_the_bytes_parity_corrected_without_checksums(tmp_path):
    """Cut inside its footer, a file has no chunk checksums; parity still locates and corrects wrong bytes,
    and they are counted (the tensors stay exact: the file-level event reports the correction)."""
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch_dtdr.save({f"t{i}": torch.randn(20000) for i in range(4)}, buf)
    data = buf.getvalue()
    with open_source(io.BytesIO(data)) as src:
        footer = ContainerReader(src).geometry.physical_end
    damaged = bytearray(data[:footer + 100])
    flipped = list(range(8192 + 5, 8192 + 4096 * 6, 997))  # scattered single bytes in tensor data
    for pos in flipped:
        damaged[pos] ^= 0x5A
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _obj, rep = torch_dtdr.load(io.BytesIO(bytes(damaged)), report=True)
    assert any("corrected by parity without chunk checksums" in e for e in rep.events)
    assert sum(t.wrong_bytes_repaired for t in rep.tensors) == len(flipped)
    assert all(t.status == "exact" for t in rep.tensors)


def test_a_clean_record_read_in_one_pass_equals_the_general_read_and_damage_takes_the_general_path(tmp_path):
    """The reader's one-pass read of an intact record gives what the general path gives; a record
    with a damaged byte is refused by it, and read_record reports and repairs it as before."""
    torch.manual_seed(0)
    state = {f"t{i}": torch.randn(n) for i, n in enumerate((3, 40, 5000, 70000, 1))}
    path = tmp_path / "m.dtdr"
    torch_dtdr.save(state, path, chunk_size=4096)
    with open_source(str(path)) as src:
        reader = ContainerReader(src)
        records = [rec for t in reader.tensors for rec in t.records]
        for rec in records:
            fast = reader._read_intact_record(rec)
            assert fast is not None and not fast.bad and not fast.repaired and not fast.damage.ranges
            general = reader.read_logical(rec.body_start, rec.end)
            pos = 0
            for spec in rec.sections:
                assert bytes(fast.sections[spec.name]) == bytes(general.data[pos: pos + spec.length])
                pos += spec.stored_length
        target = records[3]
        physical = reader.physical([(target.body_start, target.body_start + 1)])[0][0]
    with open(path, "r+b") as f:
        f.seek(physical)
        byte = f.read(1)
        f.seek(physical)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_source(str(path)) as src:
        reader = ContainerReader(src)
        rec = [r for t in reader.tensors for r in t.records][3]
        assert reader._read_intact_record(rec) is None
        seg = reader.read_record(rec)
        assert seg.repaired and not seg.bad and seg.wrong_bytes == 1
    with pytest.warns(DamageWarning, match="1 repaired"):
        loaded = torch_dtdr.load(path, errors="recover")
    for name, values in state.items():
        assert torch.equal(loaded[name], values)
