"""Exact training resume with DTDR checkpoints.

Trains a small model N steps straight through, then trains it again with a
checkpoint at N/2, resumes from that checkpoint in a *new Python process*,
and checks that both runs produced bit-identical losses and final states.

A checkpoint holds everything that decides the next step: model, optimizer,
LR scheduler, GradScaler, the step counter and every RNG the loop draws from
(torch CPU, CUDA when present, numpy, Python's random).

    python examples/train_checkpoint.py            # N = 200
    python examples/train_checkpoint.py --small    # N = 20 (CI); or DTDR_EXAMPLE_SMALL=1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch

import torch_dtdr

# ----------------------------------------------------------------------------- the recipe


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path, step, model, optimizer, scheduler, scaler) -> None:
    torch_dtdr.save({
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }, path)  # default codec "dtdr" is lossless: resuming is bit-exact


def load_checkpoint(path, model, optimizer, scheduler, scaler) -> int:
    # errors="strict": a resume must be exact; a damaged file raises instead of degrading
    ckpt = torch_dtdr.load(path, map_location="cpu", errors="strict")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])  # last: nothing may draw random numbers after it
    return ckpt["step"]


# ----------------------------------------------------------------------------- a training loop that uses all of it


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(width: int):
    """Model, optimizer, scheduler, scaler. Fresh random init: what a restarted job does."""
    dev = device()
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(width, 1),
    ).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=10_000)
    scaler = torch.amp.GradScaler(dev, init_scale=2.0**10, growth_interval=3)
    return model, optimizer, scheduler, scaler


def batch(step: int):
    """Data drawn from all three CPU RNGs, as augmentation pipelines do."""
    x = torch.randn(32, 16)
    x = x + torch.from_numpy(np.random.normal(0, 0.01, size=(32, 16)).astype(np.float32))
    if random.random() < 0.5:
        x = x.flip(0)
    y = x[:, :4].sum(1, keepdim=True).sin()
    return x.to(device()), y.to(device())


def train(model, optimizer, scheduler, scaler, start: int, stop: int) -> list[float]:
    losses = []
    model.train()
    for step in range(start, stop):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
    return losses


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def final_state(model, optimizer, scheduler, scaler) -> str:
    """A fingerprint of everything that must match at the end."""
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [v for s in optimizer.state_dict()["state"].values()
                                                   for v in s.values()]:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return json.dumps({"sha256": h.hexdigest(), "lr": scheduler.get_last_lr(), "scaler": scaler.state_dict(),
                       "adam_steps": [float(s["step"]) for s in optimizer.state_dict()["state"].values()]},
                      sort_keys=True)


def bits(xs: list[float]) -> list[str]:
    return [struct.pack("<d", x).hex() for x in xs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", default=bool(os.environ.get("DTDR_EXAMPLE_SMALL")))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--resume", metavar="CKPT", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (20 if args.small else 200)
    width = 32 if args.small else 256

    if args.resume:  # ---- child: a new process resumes from the checkpoint
        seed_everything(12345)  # deliberately different: the checkpoint must restore everything
        model, optimizer, scheduler, scaler = build(width)
        start = load_checkpoint(args.resume, model, optimizer, scheduler, scaler)
        losses = train(model, optimizer, scheduler, scaler, start, args.stop)
        print(json.dumps({"losses": losses, "final": final_state(model, optimizer, scheduler, scaler)}))
        return 0

    half = steps // 2
    # run A: straight through
    seed_everything(0)
    model, optimizer, scheduler, scaler = build(width)
    straight = train(model, optimizer, scheduler, scaler, 0, steps)
    final_a = final_state(model, optimizer, scheduler, scaler)

    # run B: save at N/2, resume in a new process
    seed_everything(0)
    model, optimizer, scheduler, scaler = build(width)
    first = train(model, optimizer, scheduler, scaler, 0, half)
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "step.dtdr")
        save_checkpoint(ckpt, half, model, optimizer, scheduler, scaler)
        print(f"checkpoint at step {half}: {os.path.getsize(ckpt)} bytes")
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--resume", ckpt, "--stop", str(steps),
                              "--steps", str(steps)] + (["--small"] if args.small else []),
                             check=True, capture_output=True, text=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    resumed = first + child["losses"]

    same_losses = bits(straight) == bits(resumed)
    same_state = final_a == child["final"]
    print(f"device: {device()}, steps: {steps}, resumed at: {half}")
    print(f"straight loss[-1] = {straight[-1]!r}, resumed loss[-1] = {resumed[-1]!r}")
    print(f"loss sequences bit-identical: {same_losses}")
    print(f"final model/optimizer/scheduler/scaler state identical: {same_state}")
    return 0 if (same_losses and same_state) else 1


if __name__ == "__main__":
    sys.exit(main())
