"""Blocking time of ``torch_dtdr.async_save`` against a synchronous save.

The bar (issue 16): the time ``async_save`` blocks the caller is at most 25 %
of a synchronous ``torch_dtdr.save`` of the same state dict, or at most 1.5x
the time of copying its tensors once, whichever is larger. Also shown, from
the same run: ``torch.save`` and safetensors' ``save_file`` of the same dict.
Every figure is a median over --repeat runs. The synchronous save is also
timed with ``torch.set_num_threads(1)``: on a small, busy machine torch's
intra-op threads can make a save from the main thread several times slower
(the background save runs its torch ops on one thread); the ratio uses the
faster of the two (the stricter comparison).

    python benchmarks/async_save.py                # ~1 GB (float32), 3 repeats
    python benchmarks/async_save.py --size-mb 64   # quick run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch_dtdr  # noqa: E402
from torch_dtdr.checkpointing import wait_for_saves  # noqa: E402


def state_dict(size_mb: int, tensor_mb: int = 64) -> dict:
    """Float32 tensors of ``tensor_mb`` MiB each, ``size_mb`` MiB in all (LLM-layer-like shapes)."""
    gen = torch.Generator().manual_seed(0)
    n = max(1, size_mb // tensor_mb)
    cols = 4096
    rows = tensor_mb * (1 << 20) // 4 // cols
    return {f"layers.{i}.weight": torch.randn(rows, cols, generator=gen) for i in range(n)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--codec", default="dtdr")
    args = parser.parse_args()
    sd = state_dict(args.size_mb)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    print(f"state dict: {len(sd)} float32 tensors, {nbytes / 2**20:.0f} MiB; codec={args.codec}; "
          f"median of {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.dtdr")
        copy_s, sync_s, sync1_s, block_s, total_s, torch_s, st_s = [], [], [], [], [], [], []
        threads = torch.get_num_threads()
        for _ in range(args.repeat):
            copy_s.append(timed(lambda: [t.clone() for t in sd.values()]))
            sync_s.append(timed(lambda: torch_dtdr.save(sd, path, codec=args.codec)))
            os.remove(path)
            torch.set_num_threads(1)
            sync1_s.append(timed(lambda: torch_dtdr.save(sd, path, codec=args.codec)))
            torch.set_num_threads(threads)
            os.remove(path)
            start = time.perf_counter()
            future = torch_dtdr.async_save(sd, path, codec=args.codec)
            block_s.append(time.perf_counter() - start)
            future.result()
            total_s.append(time.perf_counter() - start)
            os.remove(path)
            torch_s.append(timed(lambda: torch.save(sd, path)))
            os.remove(path)
            try:
                from safetensors.torch import save_file
            except ImportError:  # pragma: no cover - an optional peer
                pass
            else:
                st_s.append(timed(lambda: save_file(sd, path)))
                os.remove(path)
        wait_for_saves()
    med = statistics.median
    rows = [("copy tensors once (clone)", copy_s), ("torch_dtdr.save (sync)", sync_s),
            ("torch_dtdr.save (sync, 1 torch thread)", sync1_s),
            ("async_save: blocking", block_s), ("async_save: until result()", total_s),
            ("torch.save", torch_s), ("safetensors save_file", st_s)]
    for name, values in rows:
        if values:
            print(f"  {name:40s} {med(values):8.3f} s")
    fastest_sync = min(med(sync_s), med(sync1_s))
    ratio_sync = med(block_s) / fastest_sync
    ratio_copy = med(block_s) / med(copy_s)
    bar = max(0.25 * fastest_sync, 1.5 * med(copy_s))
    print(f"blocking / faster sync save = {ratio_sync:.3f} (bar 0.25); blocking / one copy = {ratio_copy:.2f} (bar 1.5)")
    print(f"blocking time {med(block_s):.3f} s vs bar max(25 % sync, 1.5x copy) = {bar:.3f} s: "
          f"{'PASS' if med(block_s) <= bar else 'FAIL'}")
    if torch_s:
        print(f"blocking / torch.save = {med(block_s) / med(torch_s):.3f}")


if __name__ == "__main__":
    main()
