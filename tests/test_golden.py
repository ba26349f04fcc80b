"""Golden files written by format 1.0 must decode unchanged in every later version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

import torch_dtdr
from torch_dtdr.format.reader import regions

from .helpers import assert_same, zero_range

DATA = os.path.join(os.path.dirname(__file__), "data")
EXPECTED = json.load(open(os.path.join(DATA, "golden_v1.json")))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_file_decodes_bit_exactly(name):
    back, rep = torch_dtdr.load(os.path.join(DATA, name), errors="strict", report=True)
    assert rep.clean, str(rep)
    tensors = {k: v for k, v in back.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == set(EXPECTED[name])
    for k, want in EXPECTED[name].items():
        t = tensors[k]
        assert str(t.dtype) == want["dtype"] and list(t.shape) == want["shape"], k
        assert digest(t) == want["sha256"], f"{name}:{k} decodes differently from format 1.0"
    with torch_dtdr.open(os.path.join(DATA, name)) as f:
        assert f.metadata() == {"golden": name}


def test_golden_object_tree():
    back = torch_dtdr.load(os.path.join(DATA, "golden_v1_lossless.dtdr"))
    assert list(back)[:3] == ["fp32", "tied", "head"]
    assert back["tied"].data_ptr() == back["fp32"].data_ptr()
    assert back["head"].untyped_storage().data_ptr() == back["fp32"].untyped_storage().data_ptr()
    assert back["extra"] == {"step": 1234, "lr": 3e-4, "betas": (0.9, 0.999), "name": "golden",
                             "blob": b"\x00\x01\xff", 7: None, "dtype": torch.bfloat16, "size": torch.Size([2, 3])}
    assert torch.isnan(back["special32"][2]) and str(back["special32"][1].item()) == "-0.0"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_file_repairs_a_zeroed_sector(tmp_path, name):
    path = tmp_path / name
    shutil.copy(os.path.join(DATA, name), path)
    start, _end = regions(str(path))["superblock"][0]
    zero_range(str(path), start, 4096)
    back = torch_dtdr.api.load(path, errors="strict")
    for k, want in EXPECTED[name].items():
        assert digest(back[k]) == want["sha256"]
