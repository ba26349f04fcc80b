"""torch_dtdr.CheckpointManager (issue 16, item 3): atomic steps and pointer,
retention after verification, and a restore that falls back past damaged,
torn or uncommitted steps, locally and on S3 / GCS emulators."""

from __future__ import annotations

import warnings

import fsspec
import pytest
import torch

import torch_dtdr
from torch_dtdr.errors import CheckpointFallbackWarning, CheckpointNotFoundError, NoIntactCheckpointError

from .helpers import assert_same

MIB = 1 << 20


def _state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(1024, 1024, generator=gen), "b": torch.randn(16, generator=gen)},
            "step": step, "done": {step}}


def _assert_state(obj, step):
    want = _state(step)
    assert obj["step"] == step and obj["done"] == {step}
    for k in want["model"]:
        assert_same(obj["model"][k], want["model"][k])


def _fs(url, options):
    return fsspec.core.url_to_fs(url, **(options or {}))[0]


def _damage(manager, step, how, options=None):
    """Zero a MiB inside the step's tensor data, truncate the file, or delete the pointer."""
    path = manager.path(step)
    fs = _fs(manager.directory, options) if "://" in manager.directory else fsspec.filesystem("file")
    if how == "pointer":
        fs.rm_file(manager._join("latest"))
        return
    data = bytearray(fs.cat_file(path))
    if how == "zeroed":
        start = len(data) // 2 - MIB // 2
        data[start:start + MIB] = bytes(MIB)
    else:  # torn
        data = data[: len(data) // 2]
    fs.pipe_file(path, bytes(data))


def _three_steps(directory, options=None, **kw):
    manager = torch_dtdr.CheckpointManager(directory, keep=3, parity="off", storage_options=options, **kw)
    for step in (100, 200, 300):
        assert manager.save(step, _state(step)) == step
    assert manager.steps() == [100, 200, 300] and manager.latest_step() == 300
    return manager


@pytest.mark.parametrize("how", ["zeroed", "torn", "pointer"])
def test_restore_falls_back_past_a_bad_newest_step(tmp_path, how):
    manager = _three_steps(tmp_path)
    _assert_state(manager.restore(), 300)
    _damage(manager, 300, how)
    with pytest.warns(CheckpointFallbackWarning, match=r"step-0000000300\.dtdr"):
        obj = manager.restore()
    _assert_state(obj, 200)
    assert manager.restored_step == 200


def test_every_step_damaged_is_a_typed_error_listing_each(tmp_path):
    manager = _three_steps(tmp_path)
    _damage(manager, 300, "zeroed")
    _damage(manager, 200, "torn")
    _damage(manager, 100, "zeroed")
    with pytest.warns(CheckpointFallbackWarning), pytest.raises(NoIntactCheckpointError) as info:
        manager.restore()
    assert set(info.value.problems) == {100, 200, 300}
    assert "Truncated" in info.value.problems[200] and "Integrity" in info.value.problems[300]
    for step in (100, 200, 300):
        assert manager.file_name(step) in str(info.value)


def test_retention_and_every(tmp_path):
    manager = torch_dtdr.CheckpointManager(tmp_path, keep=2, every=10)
    assert manager.save(5, {"x": 1}) is None and manager.steps() == []
    for step in (10, 20, 30):
        manager.save(step, {"x": step})
    assert manager.steps() == [20, 30] and manager.latest_step() == 30
    manager.save(35, {"x": 35}, force=True)
    assert manager.steps() == [30, 35]
    assert manager.restore(step=30) == {"x": 30}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000000030.dtdr", "step-0000000035.dtdr"]


def test_a_step_newer_than_the_pointer_is_not_trusted(tmp_path):
    manager = _three_steps(tmp_path)
    torch_dtdr.save(_state(400), manager.path(400))  # the file of a save interrupted before its pointer
    with pytest.warns(CheckpointFallbackWarning, match="did not complete"):
        _assert_state(manager.restore(), 300)


def test_empty_directory_and_explicit_step_errors(tmp_path):
    manager = torch_dtdr.CheckpointManager(tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError):
        manager.restore()
    manager.save(1, {"x": torch.ones(2)})
    with pytest.raises(CheckpointNotFoundError):
        manager.restore(step=7)


def test_asynchronous_saves_commit_in_order_and_prune_after(tmp_path):
    manager = torch_dtdr.CheckpointManager(tmp_path, keep=2, asynchronous=True)
    futures = []
    for step in (1, 2, 3):
        state = _state(step)
        futures.append(manager.save(step, state))
        state["model"]["w"].zero_()  # the snapshot was taken: changes do not reach the checkpoint
    assert [f.result(timeout=120) for f in futures] == [1, 2, 3]
    assert manager.steps() == [2, 3] and manager.latest_step() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_state(manager.restore(), 3)


def test_fallback_on_s3(s3_bucket):
    url, options = s3_bucket
    manager = _three_steps(f"{url}/run", options)
    for how in ("zeroed", "pointer"):
        _damage(manager, 300, how, options)
        with pytest.warns(CheckpointFallbackWarning, match="step-0000000300"):
            _assert_state(manager.restore(), 200)
    _damage(manager, 200, "torn", options)
    _damage(manager, 100, "zeroed", options)
    with pytest.warns(CheckpointFallbackWarning), pytest.raises(NoIntactCheckpointError) as info:
        manager.restore()
    assert set(info.value.problems) == {100, 200, 300}


def test_retention_and_restore_on_gcs(gcs_bucket):
    url, options = gcs_bucket
    manager = torch_dtdr.CheckpointManager(f"{url}/run", keep=2, parity="off", storage_options=options)
    for step in (1, 2, 3):
        manager.save(step, _state(step))
    assert manager.steps() == [2, 3]
    _damage(manager, 3, "torn", options)
    with pytest.warns(CheckpointFallbackWarning, match="step-0000000003"):
        _assert_state(manager.restore(), 2)
