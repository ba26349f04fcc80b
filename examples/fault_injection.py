"""Damage a checkpoint, verify it, repair it, load it.

Saves the same LLM-shaped state dict as DTDR and with ``torch.save``, then
damages both files identically (deterministic faults from
``torch_dtdr.faults``) and compares what comes back:

1. two zeroed 4 KiB sectors (a bad disk block): DTDR's parity repairs the file
   bit-exactly; ``repair`` writes a healed copy that loads with
   ``errors="strict"``;
2. bit rot (random bit flips, 1 in 10,000 bytes): beyond what parity can
   repair, DTDR degrades gracefully (every tensor finite, small bounded
   error); the pickle file returns garbage values or fails to load;
3. ``faults.undo`` puts the original bytes back, and ``verify`` agrees.

    python examples/fault_injection.py            # 4 layers, hidden 512
    python examples/fault_injection.py --small    # 2 layers, hidden 128 (CI); or DTDR_EXAMPLE_SMALL=1

The same with the command line: ``dtdr corrupt``, ``dtdr verify``, ``dtdr repair``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

import torch_dtdr
from torch_dtdr import faults


def state_dict(layers: int, hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(1000, hidden, generator=g) * 0.02}
    for i in range(layers):
        for name, shape in [("attn.qkv.weight", (3 * hidden, hidden)), ("attn.o.weight", (hidden, hidden)),
                            ("mlp.up.weight", (4 * hidden, hidden)), ("mlp.down.weight", (hidden, 4 * hidden))]:
            sd[f"layers.{i}.{name}"] = torch.randn(*shape, generator=g) * 0.02
        sd[f"layers.{i}.norm.weight"] = torch.ones(hidden) + 0.1 * torch.randn(hidden, generator=g)
    return sd


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    n = a.norm().item()
    return (a - b).norm().item() / n if n else float((a - b).norm().item() != 0) * float("inf")


def compare(original: dict, loaded) -> tuple[float, int, int]:
    """(worst relative L2 error over tensors, tensors not finite, tensors missing)."""
    worst, bad, missing = 0.0, 0, 0
    for k, t in original.items():
        u = loaded.get(k) if isinstance(loaded, dict) else None
        if u is None:
            missing += 1
            continue
        if not torch.isfinite(u).all():
            bad += 1
            continue
        worst = max(worst, rel_l2(t, u))
    return worst, bad, missing


def load_pickle(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as e:  # what a damaged zip/pickle does
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def describe_pickle(original, path) -> str:
    obj, err = load_pickle(path)
    if err:
        return f"torch.load failed ({err})"
    worst, bad, missing = compare(original, obj)
    return f"torch.load: worst rel. L2 {worst:.3g}, {bad} tensors with inf/NaN"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", default=bool(os.environ.get("DTDR_EXAMPLE_SMALL")))
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    layers, hidden = (2, 128) if args.small else (4, 512)
    sd = state_dict(layers, hidden)
    ok = True
    with tempfile.TemporaryDirectory() as d:
        ckpt, pt = os.path.join(d, "ckpt.dtdr"), os.path.join(d, "ckpt.pt")
        torch_dtdr.save(sd, ckpt)  # lossless codec, default parity (2 of every 34 chunks)
        torch.save(sd, pt)
        print(f"{len(sd)} tensors; DTDR {os.path.getsize(ckpt)} bytes, torch.save {os.path.getsize(pt)} bytes")
        fresh = torch_dtdr.verify(ckpt)
        print(f"verify of the fresh file: {fresh.summary()}")

        # 1. a bad disk block ----------------------------------------------------
        print("\n== 1. two zeroed 4 KiB sectors ==")
        rec = faults.corrupt(ckpt, mode="zero-sectors", count=2, seed=args.seed)
        rec_pt = faults.corrupt(pt, mode="zero-sectors", count=2, seed=args.seed)
        rep = torch_dtdr.verify(ckpt)
        print(f"verify: {rep.summary()}")
        healed = os.path.join(d, "healed.dtdr")
        torch_dtdr.repair(ckpt, healed)
        rep2 = torch_dtdr.verify(healed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_dtdr.errors.DamageWarning)
            out = torch_dtdr.load(healed, errors="strict")
        exact = all(torch.equal(sd[k], out[k]) for k in sd)
        print(f"repair -> healed.dtdr; verify: {rep2.summary()}; strict load bit-exact: {exact}")
        print(f"same damage on the torch.save file -> {describe_pickle(sd, pt)}")
        n = len(sd)
        passed = (rep.counts()["degraded"] + rep.counts()["lost"] == 0 and rep.counts()["repaired"] > 0
                  and rep2.counts()["exact"] == n and exact)
        print("PASS" if passed else "FAIL")
        ok &= passed
        faults.undo(rec)
        faults.undo(rec_pt)

        # 2. bit rot ----------------------------------------------------------------
        print("\n== 2. bit rot: random bit flips in 1 of 10,000 bytes ==")
        rec = faults.corrupt(ckpt, mode="bitflip", fraction=1e-4, seed=args.seed)
        rec_pt = faults.corrupt(pt, mode="bitflip", fraction=1e-4, seed=args.seed)
        print(f"flipped {rec.n_bytes_changed} bytes in the DTDR file, {rec_pt.n_bytes_changed} in the torch.save file")
        rep = torch_dtdr.verify(ckpt)
        print(f"verify: {rep.summary()}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_dtdr.errors.DamageWarning)
            out, rep = torch_dtdr.load(ckpt, errors="recover", report=True)
        worst, bad, missing = compare(sd, out)
        print(f"torch_dtdr.load(errors='recover'): worst rel. L2 {worst:.3g}, {bad} tensors with inf/NaN, "
              f"{missing} lost; the report says: {rep.summary()}")
        print(f"same damage on the torch.save file -> {describe_pickle(sd, pt)}")
        passed = bad == 0 and missing == 0 and worst < 0.1
        print("PASS" if passed else "FAIL")
        ok &= passed

        # 3. undo ---------------------------------------------------------------------
        print("\n== 3. undo the damage ==")
        faults.undo(rec)
        faults.undo(rec_pt)
        rep = torch_dtdr.verify(ckpt)
        print(f"verify after undo: {rep.summary()}")
        passed = rep.counts() == fresh.counts() and rep.status == fresh.status and rep.counts()["exact"] == len(sd)
        print("PASS" if passed else "FAIL")
        ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
