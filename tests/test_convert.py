"""Converters: safetensors / HF folders / torch files <-> DTDR."""

from __future__ import annotations

import json
import os
import struct
import uuid

import fsspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torch_dtdr
from torch_dtdr.cli import main as cli_main
from torch_dtdr.convert import METADATA_KEY
from torch_dtdr.errors import IntegrityError

from .helpers import assert_same, pseudo


def _tensors():
    return {
        "embed.weight": pseudo(64 * 32, seed=1).view(64, 32),
        "layer.0.attn.weight": pseudo(32 * 32, torch.bfloat16, seed=2).view(32, 32),
        "layer.0.attn.bias": pseudo(32, torch.float16, seed=3),
        "layer.0.ln.weight": (1 + pseudo(32, seed=4)).to(torch.float64),
        "position_ids": torch.arange(16).view(1, 16),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.tensor([-3, 7, 127], dtype=torch.int8),
        "scalar": torch.tensor(0.5),
        "empty": torch.empty(0, 4),
    }


def _same_set(a: dict, b: dict) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert_same(a[k], b[k])


def _meta(path) -> dict | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_safetensors_file_round_trip_is_identical(tmp_path):
    t = _tensors()
    src = tmp_path / "model.safetensors"
    save_file(t, src, metadata={"format": "pt", "origin": "unit-test"})
    s = torch_dtdr.convert(src, tmp_path / "model.dtdr")
    assert s["from"] == "safetensors" and s["to"] == "dtdr" and s["tensors"] == len(t)
    assert torch_dtdr.api.info(tmp_path / "model.dtdr")["metadata"]["origin"] == "unit-test"
    _same_set(torch_dtdr.load(tmp_path / "model.dtdr"), t)
    torch_dtdr.convert(tmp_path / "model.dtdr", tmp_path / "back.safetensors")
    _same_set(load_file(tmp_path / "back.safetensors"), t)
    assert _meta(tmp_path / "back.safetensors") == {"format": "pt", "origin": "unit-test"}
    # one metadata key: the safetensors writer is deterministic, so the file is byte-identical too
    save_file(t, src, metadata={"format": "pt"})
    torch_dtdr.convert(src, tmp_path / "model.dtdr")
    torch_dtdr.convert(tmp_path / "model.dtdr", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


def _hf_folder(root, tensors, shards=3, index_name="model.safetensors.index.json"):
    names = list(tensors)
    os.makedirs(root, exist_ok=True)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(root, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": 12345}, "weight_map": weight_map}
    with open(os.path.join(root, index_name), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write("{}")
    return weight_map


def test_sharded_hf_folder_round_trip_rebuilds_shards_and_index(tmp_path):
    t = _tensors()
    src = tmp_path / "hf"
    weight_map = _hf_folder(src, t)
    torch_dtdr.convert(src, tmp_path / "m.dtdr")
    layout = json.loads(torch_dtdr.api.info(tmp_path / "m.dtdr")["metadata"][METADATA_KEY])
    assert [f["name"] for f in layout["files"]] == sorted(set(weight_map.values()))
    out = tmp_path / "served"
    s = torch_dtdr.convert(tmp_path / "m.dtdr", str(out) + "/")
    assert sorted(os.listdir(out)) == sorted(n for n in os.listdir(src) if n != "config.json")
    assert len(s["files"]) == 4
    for shard in set(weight_map.values()):
        _same_set(load_file(out / shard), load_file(src / shard))
        assert (out / shard).read_bytes() == (src / shard).read_bytes()
        assert _meta(out / shard) == {"format": "pt"}
    assert (out / "model.safetensors.index.json").read_text() == (src / "model.safetensors.index.json").read_text()
    # into an existing folder, inferred without the trailing slash
    torch_dtdr.convert(tmp_path / "m.dtdr", out)
    # or merged into one file
    torch_dtdr.convert(tmp_path / "m.dtdr", tmp_path / "merged.safetensors")
    _same_set(load_file(tmp_path / "merged.safetensors"), t)
    assert _meta(tmp_path / "merged.safetensors") == {"format": "pt"}


def test_single_file_folder_and_non_tensor_files_ignored(tmp_path):
    t = _tensors()
    t["big"] = pseudo(512 * 512, seed=9).view(512, 512)
    src = tmp_path / "hf"
    src.mkdir()
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    (src / "tokenizer.json").write_text("{}")
    torch_dtdr.convert(src, tmp_path / "m.dtdr", codec="dtdr8", parity="strong")
    info = torch_dtdr.api.info(tmp_path / "m.dtdr")
    assert info["geometry"]["m"] == 4
    assert {x["codec"] for x in info["tensors"] if x["dtype"] in ("float32", "bfloat16")} == {"dtdr8"}
    assert os.path.getsize(tmp_path / "m.dtdr") < 0.5 * os.path.getsize(src / "model.safetensors")
    torch_dtdr.convert(tmp_path / "m.dtdr", str(tmp_path / "out") + "/")
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(back) == sorted(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
        if t[k].is_floating_point() and t[k].numel() > 1:
            rel = ((back[k].double() - t[k].double()).norm() / t[k].double().norm()).item()
            assert 0 < rel < 0.02, k  # 8-bit: close, not identical
        else:
            assert_same(back[k], t[k])


def test_torch_files_are_read_weights_only(tmp_path):
    t = _tensors()
    torch.save(t, tmp_path / "pytorch_model.bin")
    torch_dtdr.convert(tmp_path / "pytorch_model.bin", tmp_path / "m.dtdr")
    _same_set(torch_dtdr.load(tmp_path / "m.dtdr"), t)
    torch_dtdr.convert(tmp_path / "m.dtdr", tmp_path / "st")  # no extension: a folder
    _same_set(load_file(tmp_path / "st" / "model.safetensors"), t)
    assert _meta(tmp_path / "st" / "model.safetensors") == {"format": "pt"}  # what transformers expects

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        torch_dtdr.convert(tmp_path / "evil.pt", tmp_path / "evil.dtdr")
    assert not marker.exists() and not (tmp_path / "evil.dtdr").exists()


def test_torch_checkpoint_of_any_shape_converts_to_dtdr_only(tmp_path):
    ck = {"model": {"w": pseudo(100)}, "step": 7, "lrs": [0.1, 0.01], "opt": {"state": {0: {"m": pseudo(100, seed=5)}}}}
    torch.save(ck, tmp_path / "ck.pt")
    torch_dtdr.convert(tmp_path / "ck.pt", tmp_path / "ck.dtdr")
    back = torch_dtdr.load(tmp_path / "ck.dtdr")
    assert back["step"] == 7 and back["lrs"] == [0.1, 0.01]
    assert_same(back["opt"]["state"][0]["m"], ck["opt"]["state"][0]["m"])
    with pytest.raises(TypeError, match="flat"):
        torch_dtdr.convert(tmp_path / "ck.dtdr", tmp_path / "ck.safetensors")
    assert not (tmp_path / "ck.safetensors").exists()


def test_sharded_torch_folder_becomes_a_sharded_safetensors_folder(tmp_path):
    t = _tensors()
    names = list(t)
    src = tmp_path / "legacy"
    src.mkdir()
    wm = {}
    for i, part_names in enumerate([names[:4], names[4:]]):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: t[n] for n in part_names}, src / fname)
        wm.update({n: fname for n in part_names})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    torch_dtdr.convert(src, tmp_path / "m.dtdr")
    out = tmp_path / "st"
    torch_dtdr.convert(tmp_path / "m.dtdr", out, to="safetensors")
    assert sorted(os.listdir(out)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                       "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                                   for n, f in wm.items()}
    merged = {}
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        merged.update(load_file(out / f))
    _same_set(merged, t)


def test_tied_tensors_become_separate_copies_in_safetensors(tmp_path):
    w = pseudo(64).view(8, 8)
    torch_dtdr.save({"embed.weight": w, "head.weight": w, "view": w[2:4]}, tmp_path / "tied.dtdr")
    torch_dtdr.convert(tmp_path / "tied.dtdr", tmp_path / "tied.safetensors")
    back = load_file(tmp_path / "tied.safetensors")
    assert_same(back["embed.weight"], w)
    assert_same(back["head.weight"], w)
    assert_same(back["view"], w[2:4].contiguous())


def test_dtdr_to_dtdr_reencodes_and_keeps_metadata(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "a.safetensors", metadata={"format": "pt"})
    torch_dtdr.convert(tmp_path / "a.safetensors", tmp_path / "a.dtdr")
    torch_dtdr.convert(tmp_path / "a.dtdr", tmp_path / "b.dtdr", codec="dtdr16", parity="off",
                       metadata={"note": "re-encoded"})
    info = torch_dtdr.api.info(tmp_path / "b.dtdr")
    assert info["geometry"]["m"] == 0 and info["metadata"]["note"] == "re-encoded"
    assert "dtdr16" in {x["codec"] for x in info["tensors"]}
    torch_dtdr.convert(tmp_path / "b.dtdr", tmp_path / "b.safetensors")
    back = load_file(tmp_path / "b.safetensors")
    assert _meta(tmp_path / "b.safetensors") == {"format": "pt", "note": "re-encoded"}
    assert sorted(back) == sorted(t)


def test_direction_inference_and_errors(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "a.safetensors")
    torch_dtdr.convert(tmp_path / "a.safetensors", tmp_path / "a.dtdr")
    with pytest.raises(ValueError, match="cannot tell"):
        torch_dtdr.convert(tmp_path / "a.dtdr", tmp_path / "model.bin")
    with pytest.raises(ValueError):
        torch_dtdr.convert(tmp_path / "a.dtdr", tmp_path / "x", to="onnx")
    with pytest.raises(FileNotFoundError):
        torch_dtdr.convert(tmp_path / "missing.safetensors", tmp_path / "m.dtdr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        torch_dtdr.convert(tmp_path / "empty", tmp_path / "m.dtdr")
    with pytest.raises(IsADirectoryError):
        torch_dtdr.convert(tmp_path / "a.safetensors", tmp_path / "empty")


def test_damaged_dtdr_source_strict_by_default(tmp_path):
    from torch_dtdr import faults

    t = {"w": pseudo(200_000).view(400, 500)}
    torch_dtdr.save(t, tmp_path / "a.dtdr", parity="off")
    faults.corrupt(tmp_path / "a.dtdr", mode="region", region="tensor:w:residual", count=20, seed=1)
    with pytest.raises(IntegrityError):
        torch_dtdr.convert(tmp_path / "a.dtdr", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    with pytest.warns(torch_dtdr.errors.DamageWarning):
        torch_dtdr.convert(tmp_path / "a.dtdr", tmp_path / "a.safetensors", errors="recover")
    back = load_file(tmp_path / "a.safetensors")["w"]
    assert ((back - t["w"]).norm() / t["w"].norm()).item() < 0.05


def test_fsspec_urls_both_ways(tmp_path):
    t = _tensors()
    root = f"memory://convert-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    save_file(t, tmp_path / "a.safetensors", metadata={"format": "pt"})
    fs.pipe(f"{root}/hf/model.safetensors", (tmp_path / "a.safetensors").read_bytes())
    torch_dtdr.convert(f"{root}/hf", f"{root}/m.dtdr")
    torch_dtdr.convert(f"{root}/m.dtdr", f"{root}/out/", to="safetensors")
    data = fs.cat(f"{root}/out/model.safetensors")
    assert data == (tmp_path / "a.safetensors").read_bytes()


def test_cli_convert(tmp_path, capsys):
    t = _tensors()
    save_file(t, tmp_path / "a.safetensors", metadata={"format": "pt"})
    assert cli_main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "a.dtdr"), "--codec", "dtdr8",
                     "--parity", "16,4"]) == 0
    assert "converted" in capsys.readouterr().out
    info = torch_dtdr.api.info(tmp_path / "a.dtdr")
    assert (info["geometry"]["k"], info["geometry"]["m"]) == (16, 4)
    assert "dtdr8" in {x["codec"] for x in info["tensors"]}
    assert cli_main(["convert", str(tmp_path / "a.dtdr"), str(tmp_path / "b.safetensors"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["to"] == "safetensors" and out["files"] == [str(tmp_path / "b.safetensors")]
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "c.dtdr")]) == 3


def test_safetensors_header_order_preserved_in_dtdr(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    file_order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    torch_dtdr.convert(tmp_path / "a.safetensors", tmp_path / "a.dtdr")
    with torch_dtdr.open(tmp_path / "a.dtdr") as f:
        assert f.keys() == file_order


def test_dtdr_source_with_a_destroyed_first_page(tmp_path):
    from .helpers import zero_range

    t = _tensors()
    save_file(t, tmp_path / "a.safetensors")
    torch_dtdr.convert(tmp_path / "a.safetensors", tmp_path / "a.dtdr")
    zero_range(str(tmp_path / "a.dtdr"), 0, 4096)
    with pytest.warns(torch_dtdr.errors.DamageWarning):  # repaired: the output is still exact
        torch_dtdr.convert(tmp_path / "a.dtdr", tmp_path / "b.safetensors")
    _same_set(load_file(tmp_path / "b.safetensors"), t)
