"""A training loop that checkpoints asynchronously every N steps.

Runs the same loop three times: without checkpoints, with a blocking
``torch_dtdr.save`` every N steps, and with ``torch_dtdr.async_save`` every N
steps, and prints the step times of each (the checkpoint steps separately).
With ``async_save`` the loop only waits for the one staging copy of the
weights and optimizer state; encoding, checksums, parity and the atomic
commit overlap the following steps. The last checkpoint is then loaded and
checked bit for bit against the state it was taken from.

    python examples/async_checkpointing.py            # ~50 MB of state, 60 steps, checkpoint every 10
    python examples/async_checkpointing.py --small    # a few MB, 12 steps (CI); or DTDR_EXAMPLE_SMALL=1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import torch_dtdr


def build(width: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                                torch.nn.GELU(), torch.nn.Linear(width, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(mode: str, steps: int, every: int, width: int, directory: str):
    """Step times (checkpoint steps, other steps), the last checkpoint's path and the state saved there."""
    model, optim = build(width)
    gen = torch.Generator().manual_seed(1)
    ckpt_times, plain_times, last, pending = [], [], None, None
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x = torch.randn(64, width, generator=gen)
        loss = (model(x) - x.mean(dim=1, keepdim=True)).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        if mode != "none" and step % every == 0:
            state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": step}
            path = os.path.join(directory, f"{mode}-step-{step}.dtdr")
            if mode == "sync":
                torch_dtdr.save(state, path)
            else:
                pending = torch_dtdr.async_save(state, path)  # waits only if the previous save is still running
            last = (path, {k: v.clone() for k, v in model.state_dict().items()})
            ckpt_times.append(time.perf_counter() - start)
        else:
            plain_times.append(time.perf_counter() - start)
    if pending is not None:
        pending.result()  # raises if the background save failed
    return ckpt_times, plain_times, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=bool(os.environ.get("DTDR_EXAMPLE_SMALL")))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--every", type=int)
    args = parser.parse_args()
    width = 384 if args.small else 1536
    steps = args.steps or (12 if args.small else 60)
    every = args.every or (4 if args.small else 10)
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for mode in ("none", "sync", "async"):
            ckpt, plain, last = train(mode, steps, every, width, tmp)
            results[mode] = (ckpt, plain)
            line = f"{mode:>5}: median step {med(plain) * 1e3:7.1f} ms"
            if ckpt:
                line += f", checkpoint steps median {med(ckpt) * 1e3:7.1f} ms, max {max(ckpt) * 1e3:7.1f} ms"
            print(line)
            if last is not None:
                back = torch_dtdr.load(last[0], errors="strict")
                exact = all(torch.equal(back["model"][k], v) for k, v in last[1].items())
                print(f"       last checkpoint {os.path.basename(last[0])} loads bit-exact: {exact}")
                if not exact:
                    raise SystemExit(1)
        sync_ckpt, async_ckpt = med(results["sync"][0]), med(results["async"][0])
        print(f"checkpoint step: async {async_ckpt * 1e3:.1f} ms vs sync {sync_ckpt * 1e3:.1f} ms "
              f"({async_ckpt / sync_ckpt:.2f}x)")


if __name__ == "__main__":
    main()
