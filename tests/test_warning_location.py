"""A DamageWarning names the line of the caller's code, not a line inside torch_dtdr."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr import faults
from torch_dtdr.errors import DamageWarning

HERE = os.path.abspath(__file__)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A file without parity whose float tensor is degraded by replaced bytes."""
    path = str(tmp_path_factory.mktemp("warn") / "model.dtdr")
    torch.manual_seed(0)
    torch_dtdr.save({"weight": torch.randn(64, 256), "bias": torch.randn(64)}, path, parity="off")
    faults.corrupt(path, mode="replace", fraction=2e-3, seed=3)
    return path


def damage_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    found = [w for w in caught if issubclass(w.category, DamageWarning)]
    assert found, f"no DamageWarning; got {[str(w.message) for w in caught]}"
    return found


def assert_points_here(found):
    for w in found:
        assert os.path.abspath(w.filename) == HERE, f"warning points at {w.filename}:{w.lineno}"


def test_load_warning_points_at_the_caller(damaged):
    assert_points_here(damage_warnings(lambda: torch_dtdr.load(damaged)))


def test_open_get_tensor_warning_points_at_the_caller(damaged):
    def read():
        with torch_dtdr.open(damaged) as f:
            assert f.get_tensor("weight") is not None

    assert_points_here(damage_warnings(read))


def test_load_model_warning_points_at_the_caller(damaged):
    module = torch.nn.Linear(256, 64)
    assert_points_here(damage_warnings(lambda: torch_dtdr.load_model(module, damaged)))


def test_patched_torch_load_warning_points_at_the_caller(damaged):
    with torch_dtdr.patch():
        assert_points_here(damage_warnings(lambda: torch.load(damaged)))


def test_a_clean_file_warns_nothing(tmp_path):
    path = str(tmp_path / "clean.dtdr")
    torch_dtdr.save({"w": torch.ones(8)}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch_dtdr.load(path)
        with torch_dtdr.open(path) as f:
            f.get_tensor("w")
    assert not [w for w in caught if issubclass(w.category, DamageWarning)]


def test_open_without_damage_warnings_leaves_them_to_the_caller(damaged):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch_dtdr.open(damaged, warn_damage=False) as f:
            assert f.get_tensor("weight") is not None
            assert f.get_slice("weight")[3:5] is not None
            assert f.report().status == "degraded"
    assert not [w for w in caught if issubclass(w.category, DamageWarning)]


def test_convert_warns_once_at_the_caller(damaged, tmp_path):
    found = damage_warnings(lambda: torch_dtdr.convert(damaged, str(tmp_path / "out.safetensors"), errors="recover"))
    assert len(found) == 1, [str(w.message) for w in found]
    assert_points_here(found)
