"""`dtdr corrupt` and `dtdr undo`: deterministic damage, bit-exact undo."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import fsspec
import numpy as np
import pytest

from torch_dtdr.cli import main
from torch_dtdr.faults import FaultRecord

SIZE = (1 << 20) + 777


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def blob(tmp_path):
    data = np.random.default_rng(11).integers(1, 256, SIZE, dtype=np.uint8).tobytes()
    path = tmp_path / "ckpt.bin"
    path.write_bytes(data)
    return path, data


def test_corrupt_in_place_then_undo_restores_sha256(blob, tmp_path, capsys):
    path, data = blob
    rec_path = tmp_path / "rec.json"
    assert main(["corrupt", str(path), "--mode", "replace", "--fraction", "1e-3", "--seed", "7",
                 "--record", str(rec_path)]) == 0
    out = capsys.readouterr().out
    rec = FaultRecord.load(rec_path)
    assert rec.summary() in out
    damaged = _read(path)
    assert len(damaged) == SIZE and damaged != data
    assert rec.n_bytes_changed == sum(a != b for a, b in zip(damaged, data)) > 0
    assert rec.damaged_sha256 == _sha(damaged)

    assert main(["undo", str(rec_path)]) == 0
    assert _sha(_read(path)) == _sha(data) == rec.original_sha256


def test_same_seed_same_file_gives_byte_identical_damage(blob, tmp_path):
    path, data = blob
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / f"{name}.bin"
        assert main(["corrupt", str(path), "--mode", "replace", "--fraction", "1e-4", "--seed", str(seed),
                     "-o", str(out)]) == 0
        outs.append(_read(out))
    assert _read(path) == data  # -o leaves the source untouched
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    assert outs[0] != data


def test_undo_of_a_copy_restores_the_copy(blob, tmp_path):
    path, data = blob
    out, rec_path = tmp_path / "copy.bin", tmp_path / "rec.json"
    assert main(["corrupt", str(path), "--mode", "burst", "--count", "3", "--seed", "1", "-o", str(out),
                 "--record", str(rec_path)]) == 0
    assert _read(out) != data
    assert main(["undo", str(rec_path)]) == 0
    assert _read(out) == data


def test_memory_url_round_trip(capsys):
    data = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    url = f"memory://dtdr-cli-{uuid.uuid4().hex}/ckpt.bin"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(url, data)
    rec_file = f"/tmp/dtdr-cli-{uuid.uuid4().hex}.json"
    try:
        assert main(["corrupt", url, "--mode", "bitflip", "--count", "50", "--seed", "2", "--record", rec_file]) == 0
        damaged = fs.cat_file(url)
        assert damaged != data and len(damaged) == len(data)
        assert main(["undo", rec_file]) == 0
        assert _sha(fs.cat_file(url)) == _sha(data)
    finally:
        fs.rm(url)
        if os.path.exists(rec_file):
            os.remove(rec_file)


def test_truncate_and_undo(blob, tmp_path):
    path, data = blob
    rec_path = tmp_path / "rec.json"
    assert main(["corrupt", str(path), "--mode", "truncate", "--count", "1000", "--seed", "0",
                 "--record", str(rec_path)]) == 0
    assert os.path.getsize(path) == SIZE - 1000
    assert main(["undo", str(rec_path)]) == 0
    assert _read(path) == data


def test_region_option_limits_damage(blob, tmp_path):
    path, data = blob
    out = tmp_path / "r.bin"
    assert main(["corrupt", str(path), "--mode", "replace", "--fraction", "0.5", "--seed", "4",
                 "--region", "1000:3000", "-o", str(out)]) == 0
    d = np.frombuffer(_read(out), np.uint8) != np.frombuffer(data, np.uint8)
    changed = np.flatnonzero(d)
    assert changed.size > 0 and changed.min() >= 1000 and changed.max() < 3000


def test_json_output(blob, tmp_path, capsys):
    path, _ = blob
    assert main(["corrupt", str(path), "--mode", "zero-sectors", "--count", "2", "--seed", "9",
                 "-o", str(tmp_path / "z.bin"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "zero-sectors" and d["n_bytes_changed"] == 2 * 4096 and "changes" not in d


def test_undo_refuses_a_file_that_changed_since(blob, tmp_path, capsys):
    path, data = blob
    rec_path = tmp_path / "rec.json"
    assert main(["corrupt", str(path), "--mode", "replace", "--count", "10", "--seed", "1",
                 "--record", str(rec_path)]) == 0
    with open(path, "r+b") as f:  # someone else touches the file
        f.seek(SIZE // 2)
        f.write(b"\x00\x01\x02")
    before = _read(path)
    assert main(["undo", str(rec_path)]) == 3
    assert "IntegrityError" in capsys.readouterr().err
    assert _read(path) == before  # nothing written


def test_bad_arguments(blob, tmp_path, capsys):
    path, data = blob
    with pytest.raises(SystemExit) as e:  # argparse: fraction and count are exclusive
        main(["corrupt", str(path), "--mode", "replace", "--fraction", "0.1", "--count", "3", "--seed", "1"])
    assert e.value.code == 2
    assert main(["corrupt", str(path), "--mode", "replace", "--fraction", "2", "--seed", "1"]) == 3
    assert main(["corrupt", str(tmp_path / "missing.bin"), "--mode", "replace", "--fraction", "0.1",
                 "--seed", "1"]) == 3
    assert _read(path) == data
