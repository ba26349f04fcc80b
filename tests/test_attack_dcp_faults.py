"""Issue 12, item 12: DCP stays inside its checkpoint folder (symlinks
included), and ``dtdr corrupt --record`` writes its undo record first."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import torch_dtdr
from torch_dtdr import dcp as tdcp
from torch_dtdr.cli import main as cli_main
from torch_dtdr.errors import DTDRError

from .test_dcp import _one_process_load, _plain_state, _save, full_state



def _shards(path):
    return sorted(n for n in os.listdir(path) if n.startswith("__") and n.endswith(".dtdr")
                  and "metadata" not in n)


def test_reader_refuses_a_symlinked_shard_that_leaves_the_folder(tmp_path):
    path = str(tmp_path / "ck")
    _save(_plain_state(), path)
    (shard,) = _shards(path)
    outside = tmp_path / "elsewhere.dtdr"
    shutil.move(os.path.join(path, shard), outside)
    os.symlink(outside, os.path.join(path, shard))
    with pytest.raises(BaseException) as ei:
        _one_process_load(path)
    assert "outside the checkpoint folder" in str(ei.value)
    rep = torch_dtdr.verify(path)
    assert rep.exit_code != 0 and "outside the checkpoint folder" in str(rep)


def test_reader_refuses_symlinked_metadata_that_leaves_the_folder(tmp_path):
    path = str(tmp_path / "ck")
    _save(_plain_state(), path)
    for name in tdcp.METADATA_NAMES:
        shutil.move(os.path.join(path, name), tmp_path / name)
        os.symlink(tmp_path / name, os.path.join(path, name))
    with pytest.raises(DTDRError) as ei:
        tdcp.read_metadata(path)
    assert "outside the checkpoint folder" in str(ei.value)


def test_a_symlink_inside_the_folder_still_loads(tmp_path):
    path = str(tmp_path / "ck")
    _save(_plain_state(), path)
    (shard,) = _shards(path)
    os.rename(os.path.join(path, shard), os.path.join(path, "real-" + shard))
    os.symlink("real-" + shard, os.path.join(path, shard))
    got = _one_process_load(path)
    assert torch.equal(got["w"], full_state()["w"])


def test_writer_never_replaces_a_planted_symlinks_target(tmp_path):
    path = tmp_path / "ck"
    path.mkdir()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    for name in ["__0_0.dtdr", *tdcp.METADATA_NAMES]:
        os.symlink(victim, path / name)
    _save(_plain_state(), str(path))
    assert victim.read_bytes() == b"precious"
    assert not any(os.path.islink(path / n) for n in os.listdir(path))
    got = _one_process_load(str(path))
    assert torch.equal(got["w"], full_state()["w"])


def test_corrupt_record_is_written_before_the_damage(tmp_path):
    p = tmp_path / "m.dtdr"
    torch_dtdr.save({"a": torch.arange(1000.0)}, p)
    before = p.read_bytes()
    bad_record = tmp_path / "no-such-dir" / "rec.json"
    assert cli_main(["corrupt", str(p), "--mode", "bitflip", "--count", "10", "--seed", "1",
                     "--record", str(bad_record)]) != 0
    assert p.read_bytes() == before  # the record could not be written: nothing was damaged
    good = tmp_path / "rec.json"
    assert cli_main(["corrupt", str(p), "--mode", "bitflip", "--count", "10", "--seed", "1",
                     "--record", str(good)]) == 0
    assert p.read_bytes() != before and good.exists()
    assert cli_main(["undo", str(good)]) == 0
    assert p.read_bytes() == before


def test_format_md_states_the_index_copies_the_writer_writes():
    """docs/format.md said 4 index copies in section 4 and 7 in section 7; the writer writes 7."""
    import inspect
    import re

    from torch_dtdr.format.writer import ContainerWriter

    default = inspect.signature(ContainerWriter.__init__).parameters["index_copies"].default
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "format.md"), encoding="utf-8").read()
    stated = re.findall(r"(\d+) index copies", text) + re.findall(r"`n_index` times in the footer \((\d+) by default",
                                                                  text)
    assert len(stated) >= 2, stated
    assert set(stated) == {str(default)}, stated
