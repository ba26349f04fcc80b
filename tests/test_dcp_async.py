"""torch.distributed.checkpoint.async_save with DTDRWriter (issue 16, item 2),
with both executors torch offers (thread and process), in real two-rank gloo
jobs; the checkpoints load bit-exactly and verify clean."""

from __future__ import annotations

import os
import sys

import pytest

import torch_dtdr
from torch_dtdr import dcp as tdcp

from .test_dcp import WORLD, _free_port, _init, check_state, dist_state, empty_like_state, full_state

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard  # noqa: E402


def _worker(rank: int, port: int, root: str) -> None:
    _init(rank, port)
    ok = False
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
            path = os.path.join(root, kind.value)
            state = dist_state(mesh, [Shard(0)])
            future = dcp.async_save(state, storage_writer=tdcp.DTDRWriter(path, parity="strong"),
                                    async_checkpointer_type=kind)
            future = getattr(future, "upload_completion", future)
            future.result(timeout=300)
            dist.barrier()
            target = dist_state(mesh, [Shard(0)])
            for key in ("w", "e", "h"):
                target[key].to_local().zero_()
            target["r"].zero_()
            dcp.load(target, storage_reader=tdcp.DTDRReader(path, errors="strict"))
            check_state(target)
            dist.barrier()
        ok = True
    finally:
        dist.destroy_process_group()
    if ok:  # as in test_dcp: leave without C++ static destructors (a gloo thread may abort them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_with_thread_and_process_executors(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for kind in ("thread", "process"):
        report = torch_dtdr.verify(str(tmp_path / kind))
        assert report.status == "exact", report.summary()
        target = empty_like_state(full_state())
        dcp.load(target, storage_reader=tdcp.DTDRReader(str(tmp_path / kind)), no_dist=True)
        check_state(target)
