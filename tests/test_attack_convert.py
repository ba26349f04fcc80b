"""Issue 12, items 1, 2 and 11: converters stay inside their source and
destination, and every deliberate error is a typed DTDRError."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import torch_dtdr
from torch_dtdr.convert import METADATA_KEY
from torch_dtdr.errors import ArgumentError, DTDRError, FormatError, StorageError

from .helpers import pseudo


def _sd():
    return {"a": pseudo(64, seed=1), "b": pseudo(32, seed=2)}


def _crafted_dtdr(path, layout) -> None:
    torch_dtdr.save(_sd(), path, metadata={METADATA_KEY: json.dumps(layout)})


def _folder_layout(name_a, name_b="model-00002-of-00002.safetensors", index="model.safetensors.index.json"):
    return {"version": 1, "source": "safetensors", "folder": True, "index": index, "index_metadata": None,
            "promoted": {}, "files": [{"name": name_a, "tensors": ["a"], "metadata": None},
                                      {"name": name_b, "tensors": ["b"], "metadata": None}]}


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("bad", ["../victim/model.safetensors", "/ABS/model.safetensors", "sub/../../x.safetensors",
                                 "..", ".", "", "a\x00b.safetensors", "sub/model.safetensors",
                                 "..\\victim.safetensors"])
def test_convert_never_writes_outside_its_destination(tmp_path, bad):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(b"precious")
    bad = bad.replace("/ABS", str(tmp_path / "victim"))
    src = tmp_path / "crafted.dtdr"
    _crafted_dtdr(src, _folder_layout(bad))
    before = _tree(tmp_path)
    with pytest.raises(FormatError) as ei:
        torch_dtdr.convert(src, tmp_path / "out", to="safetensors")
    assert ei.value.field and "files[0].name" in ei.value.field
    assert str(src) in str(ei.value)
    assert (victim / "model.safetensors").read_bytes() == b"precious"
    assert _tree(tmp_path) == before  # nothing was written, not even the destination folder


@pytest.mark.parametrize("bad_index", ["../evil.safetensors.index.json", "/tmp/evil.index.json", "x/../../y.json"])
def test_convert_index_name_from_the_file_must_be_plain(tmp_path, bad_index):
    src = tmp_path / "crafted.dtdr"
    _crafted_dtdr(src, _folder_layout("model-00001-of-00002.safetensors", index=bad_index))
    before = _tree(tmp_path)
    with pytest.raises(FormatError) as ei:
        torch_dtdr.convert(src, tmp_path / "out", to="safetensors")
    assert "index" in ei.value.field
    assert _tree(tmp_path) == before


def test_convert_plain_names_still_rebuild_the_folder(tmp_path):
    src = tmp_path / "ok.dtdr"
    _crafted_dtdr(src, _folder_layout("model-00001-of-00002.safetensors"))
    torch_dtdr.convert(src, tmp_path / "out", to="safetensors")
    assert sorted(os.listdir(tmp_path / "out")) == ["model-00001-of-00002.safetensors",
                                                    "model-00002-of-00002.safetensors",
                                                    "model.safetensors.index.json"]


def _hf_folder(root, weight_map, shards):
    root.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, str(root / name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked-index-target"])
def test_convert_never_reads_outside_its_source(tmp_path, how):
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.full((4,), 42.0)}, str(outside))
    folder = tmp_path / "model"
    _hf_folder(folder, {}, {"model-00001-of-00002.safetensors": {"a": pseudo(8)}})
    target = {"dotdot": "../outside.safetensors", "absolute": str(outside)}.get(how, "model-00002-of-00002.safetensors")
    if how in ("symlink", "symlinked-index-target"):
        os.symlink(outside, folder / "model-00002-of-00002.safetensors")
    wm = {"a": "model-00001-of-00002.safetensors", "secret": target}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(FormatError) as ei:
        torch_dtdr.convert(folder, tmp_path / "out.dtdr")
    assert "weight_map" in (ei.value.field or "")
    assert not (tmp_path / "out.dtdr").exists()


def test_convert_single_weights_file_symlinked_outside_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    save_file({"secret": torch.ones(2)}, str(outside))
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside, folder / "model.safetensors")
    with pytest.raises(FormatError):
        torch_dtdr.convert(folder, tmp_path / "out.dtdr")


def test_convert_hf_cache_snapshot_symlinks_into_blobs_still_work(tmp_path):
    """The Hugging Face hub cache links snapshot files to ../../blobs: that layout stays convertible."""
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(_sd(), str(repo / "blobs" / "deadbeef"))
    os.symlink("../../blobs/deadbeef", snap / "model.safetensors")
    torch_dtdr.convert(snap, tmp_path / "out.dtdr")
    assert sorted(torch_dtdr.load(tmp_path / "out.dtdr")) == ["a", "b"]


@pytest.mark.parametrize("index_text, field", [
    ("{not json", "index"),
    ("[1, 2]", "index"),
    ('{"weight_map": {"a": 3}}', "weight_map"),
    ('{"weight_map": {"a": ["x"]}}', "weight_map"),
    ('{"weight_map": []}', "weight_map"),
])
def test_convert_malformed_hf_index_is_a_format_error(tmp_path, index_text, field):
    folder = tmp_path / "m"
    _hf_folder(folder, {}, {"model-00001-of-00001.safetensors": {"a": pseudo(8)}})
    (folder / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(FormatError) as ei:
        torch_dtdr.convert(folder, tmp_path / "out.dtdr")
    assert field in (ei.value.field or "")
    assert "model.safetensors.index.json" in str(ei.value)


@pytest.mark.parametrize("layout", [
    [1, 2],
    {"files": "nope", "folder": True},
    {"files": [3], "folder": True},
    {"files": [{"name": 5, "tensors": ["a", "b"]}], "folder": True},
    {"files": [{"name": "x.safetensors", "tensors": "ab"}], "folder": True},
    {"files": [{"name": "x.safetensors", "tensors": ["a", "b"], "metadata": [1]}], "folder": True, "source": "safetensors"},
    {"files": [{"name": "x.safetensors", "tensors": ["a", "b"]}], "folder": True, "index": 7},
])
def test_convert_malformed_layout_metadata_is_a_format_error(tmp_path, layout):
    src = tmp_path / "m.dtdr"
    _crafted_dtdr(src, layout)
    with pytest.raises(FormatError) as ei:
        torch_dtdr.convert(src, tmp_path / "out", to="safetensors")
    assert METADATA_KEY in (ei.value.field or "")
    assert not (tmp_path / "out").exists()


def test_convert_folder_without_weights_and_ambiguous_folders_are_typed(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError):
        torch_dtdr.convert(empty, tmp_path / "o.dtdr")
    two = tmp_path / "two"
    two.mkdir()
    save_file({"a": torch.ones(1)}, str(two / "x.safetensors"))
    save_file({"a": torch.ones(1)}, str(two / "y.safetensors"))
    with pytest.raises(ArgumentError):
        torch_dtdr.convert(two, tmp_path / "o.dtdr")
    src = tmp_path / "s.dtdr"
    torch_dtdr.save(_sd(), src)
    with pytest.raises(ArgumentError):
        torch_dtdr.convert(src, tmp_path / "o.weird")
    with pytest.raises(ArgumentError):
        torch_dtdr.convert(src, tmp_path / "o.dtdr", to="onnx")


def test_convert_non_mapping_dtdr_to_safetensors_is_typed(tmp_path):
    src = tmp_path / "list.dtdr"
    torch_dtdr.save([torch.ones(2)], src)
    with pytest.raises(DTDRError) as ei:
        torch_dtdr.convert(src, tmp_path / "o.safetensors")
    assert isinstance(ei.value, TypeError) and str(src) in str(ei.value)


def test_convert_safetensors_write_failure_is_typed_and_names_the_target(tmp_path):
    """safetensors' own write error (a missing folder here) is a typed StorageError naming the
    destination, not a raw SafetensorError naming a temp file."""
    src = tmp_path / "c.dtdr"
    torch_dtdr.save(_sd(), src)
    target = tmp_path / "no" / "such" / "m.safetensors"
    with pytest.raises(StorageError) as ei:
        torch_dtdr.convert(src, target)
    assert str(target) in str(ei.value) and ".tmp" not in str(ei.value)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("kwargs", [dict(parity="high"), dict(parity=(0, 2)), dict(parity=(4, 99)),
                                    dict(parity=(1, 2, 3, 4)), dict(parity="default", codec=3),
                                    dict(parity=("a", "b"))])
def test_save_argument_validation_is_typed(tmp_path, kwargs):
    with pytest.raises(ArgumentError if "codec" not in kwargs else DTDRError) as ei:
        torch_dtdr.save(_sd(), tmp_path / "x.dtdr", **kwargs)
    assert isinstance(ei.value, ValueError)
    assert not (tmp_path / "x.dtdr").exists()


def test_load_errors_argument_is_typed(tmp_path):
    torch_dtdr.save(_sd(), tmp_path / "x.dtdr")
    for call in (lambda: torch_dtdr.load(tmp_path / "x.dtdr", errors="ignore"),
                 lambda: torch_dtdr.api.load(tmp_path / "x.dtdr", errors="ignore"),
                 lambda: torch_dtdr.open(tmp_path / "x.dtdr", errors="ignore")):
        with pytest.raises(ArgumentError) as ei:
            call()
        assert ei.value.field == "errors"


def test_convert_from_a_fifo_is_a_typed_error_not_a_hang(tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    code = ("import sys, torch_dtdr\nfrom torch_dtdr.errors import DTDRError\n"
            "try:\n    torch_dtdr.convert(sys.argv[1], sys.argv[2])\n"
            "except DTDRError as e:\n    print('TYPED', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, str(fifo), str(tmp_path / "o.dtdr")], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=root))
    assert "TYPED" in proc.stdout and "not a regular file" in proc.stdout, proc.stdout + proc.stderr
