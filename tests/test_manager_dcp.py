"""CheckpointManager(distributed=True): one DCP folder per step, written by two
gloo ranks; restore() agrees across ranks and falls back past a shard damaged
beyond repair that only one rank reads."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr.errors import CheckpointFallbackWarning

from .test_dcp import WORLD, _free_port, _init, check_state, full_state

import torch.distributed as dist  # noqa: E402  (after the test_dcp import, which checks availability)
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402


def _state(mesh, step: int) -> dict:
    full = full_state()
    return {"w": distribute_tensor(full["w"] + step, mesh, [Shard(0)]), "r": full["r"] + step, "step": step}


def _worker(rank: int, port: int, root: str) -> None:
    _init(rank, port)
    ok = False
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        manager = torch_dtdr.CheckpointManager(root, keep=2, parity="off", distributed=True)
        for step in (1, 2, 3):
            assert manager.save(step, _state(mesh, step)) == step
        assert manager.steps() == [2, 3] and manager.latest_step() == 3
        target = _state(mesh, 0)
        manager.restore(state=target)
        check_state({"w": target["w"], "r": target["r"]}, {"w": full_state()["w"] + 3, "r": full_state()["r"] + 3})
        assert target["step"] == 3 and manager.restored_step == 3
        dist.barrier()
        if rank == 1:  # zero rank 1's shard of the newest step (parity off: beyond repair); only rank 1 reads it
            shard = os.path.join(manager.path(3), "__1_0.dtdr")
            size = os.path.getsize(shard)
            with open(shard, "r+b") as f:
                f.write(bytes(size))
        dist.barrier()
        target = _state(mesh, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manager.restore(state=target)
        assert manager.restored_step == 2, manager.restored_step
        assert any(issubclass(w.category, CheckpointFallbackWarning) and "step-0000000003" in str(w.message)
                   for w in caught)
        check_state({"w": target["w"], "r": target["r"]}, {"w": full_state()["w"] + 2, "r": full_state()["r"] + 2})
        dist.barrier()
        ok = True
    finally:
        dist.destroy_process_group()
    if ok:  # as in test_dcp: leave without C++ static destructors (a gloo thread may abort them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_steps_fall_back_together(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-0000000002", "step-0000000003"]
    assert torch_dtdr.verify(str(tmp_path / "step-0000000002")).status == "exact"
