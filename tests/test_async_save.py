"""torch_dtdr.async_save (issue 16, item 1): staged snapshot, background
encode and atomic commit, bounded saves in flight, failures never lost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import torch_dtdr
from torch_dtdr.checkpointing import snapshot, wait_for_saves
from torch_dtdr.errors import DTDRWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(300, 200, generator=gen))
    return {"model": {"w": w, "w_t": w.data.t(), "b": torch.arange(7)}, "step": 3, "tags": {"a", "b"}}


def test_returns_before_the_save_and_snapshots_the_tensors(tmp_path):
    state = _state()
    expected = state["model"]["w"].detach().clone()
    future = torch_dtdr.async_save(state, tmp_path / "c.dtdr", parity="strong")
    with torch.no_grad():
        state["model"]["w"].zero_()  # the loop goes on changing its weights at once
    assert future.result(timeout=60) is None and future.done() and future.path == tmp_path / "c.dtdr"
    back = torch_dtdr.load(tmp_path / "c.dtdr", errors="strict")
    assert torch.equal(back["model"]["w"], expected) and type(back["model"]["w"]) is torch.nn.Parameter
    assert back["model"]["w_t"].untyped_storage().data_ptr() == back["model"]["w"].untyped_storage().data_ptr()
    assert torch.equal(back["model"]["w_t"], expected.t()) and back["tags"] == {"a", "b"}
    assert torch_dtdr.info(tmp_path / "c.dtdr")["geometry"]["m"] == 4  # save options reach the save


def test_snapshot_copies_once_and_copy_false_does_not():
    state = _state()
    staged = snapshot(state)
    assert staged["model"]["w"].data_ptr() != state["model"]["w"].data_ptr()
    assert torch.equal(staged["model"]["w"], state["model"]["w"])
    shared = snapshot(state, copy=False)
    assert shared["model"]["w"].data_ptr() == state["model"]["w"].data_ptr()


def test_a_failed_save_raises_from_result_and_leaves_nothing(tmp_path):
    def codec(name, tensor):
        if name == "model.b":
            raise RuntimeError("disk on fire")
        return "dtdr"

    future = torch_dtdr.async_save(_state(), tmp_path / "bad.dtdr", codec=codec)
    with pytest.raises(RuntimeError, match="disk on fire"):
        future.result(timeout=60)
    assert isinstance(future.exception(), RuntimeError)
    assert os.listdir(tmp_path) == []


def test_at_most_max_in_flight_saves_the_next_call_waits(tmp_path):
    release = threading.Event()

    def slow_codec(name, tensor):
        release.wait(30)
        return "dtdr"

    first = torch_dtdr.async_save({"x": torch.ones(3)}, tmp_path / "1.dtdr", codec=slow_codec)
    second = []
    caller = threading.Thread(target=lambda: second.append(torch_dtdr.async_save({"x": torch.zeros(3)},
                                                                                   tmp_path / "2.dtdr")))
    caller.start()
    time.sleep(0.5)
    assert not first.done() and not second, "the second call must wait for the first save"
    release.set()
    caller.join(30)
    assert second and first.result(timeout=30) is None and second[0].result(timeout=30) is None
    assert torch.equal(torch_dtdr.load(tmp_path / "2.dtdr")["x"], torch.zeros(3))
    both = [torch_dtdr.async_save({"x": torch.ones(2)}, tmp_path / f"p{i}.dtdr", max_in_flight=2) for i in range(2)]
    assert wait_for_saves(60) and all(f.done() for f in both)


def test_file_objects_are_refused(tmp_path):
    with open(tmp_path / "x", "wb") as fh, pytest.raises(TypeError, match="path or URL"):
        torch_dtdr.async_save({"x": torch.ones(1)}, fh)


def _run(script: str, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_interpreter_exit_waits_for_a_pending_save(tmp_path):
    proc = _run("""
        import torch, torch_dtdr
        torch_dtdr.async_save({"w": torch.arange(2_000_000.0)}, "late.dtdr")
    """, tmp_path)  # exits right after the call returns
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch_dtdr.load(tmp_path / "late.dtdr", errors="strict")["w"], torch.arange(2_000_000.0))


def test_a_failure_nobody_looked_at_is_reported_at_exit(tmp_path):
    proc = _run("""
        import torch, torch_dtdr
        def codec(name, tensor):
            raise RuntimeError("encoder exploded")
        torch_dtdr.async_save({"w": torch.ones(4)}, "lost.dtdr", codec=codec)
    """, tmp_path)
    assert "lost.dtdr" in proc.stderr and "encoder exploded" in proc.stderr and DTDRWarning.__name__ in proc.stderr
    assert not (tmp_path / "lost.dtdr").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_staged_once_into_pinned_memory(tmp_path):
    w = torch.randn(256, 256, device="cuda")
    state = {"w": w, "w_t": w.t(), "cpu": torch.arange(4)}
    staged = snapshot(state)
    assert staged["w"].device.type == "cpu" and staged["w"].is_pinned()
    assert staged["w_t"].untyped_storage().data_ptr() == staged["w"].untyped_storage().data_ptr()
    expected = w.cpu()
    future = torch_dtdr.async_save(state, tmp_path / "cuda.dtdr")
    w.zero_()
    future.result(timeout=60)
    back = torch_dtdr.load(tmp_path / "cuda.dtdr", map_location="cpu", errors="strict")
    assert torch.equal(back["w"], expected) and torch.equal(back["w_t"], expected.t())
