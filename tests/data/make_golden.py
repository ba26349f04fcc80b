"""Writes the golden files of format 1.0. Run ONCE per format version; never
regenerate existing files (later versions must keep decoding these bytes).

    python tests/data/make_golden.py   # writes tests/data/golden_v1_*.dtdr and golden_v1.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import OrderedDict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch_dtdr.api as api  # noqa: E402
from tests.helpers import pseudo  # noqa: E402


def objects():
    w = pseudo(96 * 40, torch.float32, 11, 0.05).view(96, 40)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, 3.0e38, -2.5])
    lossless = OrderedDict(
        fp32=w, tied=w, head=w[:10], fp16=pseudo(2500, torch.float16, 12), bf16=pseudo(1100, torch.bfloat16, 13),
        fp64=pseudo(300, torch.float64, 14), special32=special, special16=special.half(),
        scalar=torch.tensor(3.5), empty=torch.zeros(0, 4), ints=torch.arange(-50, 50, dtype=torch.int64),
        mask=torch.arange(20) % 3 == 0, u8=torch.arange(256, dtype=torch.uint8),
        fp8=pseudo(64, torch.float32, 15, 1.0).to(torch.float8_e4m3fn), c64=torch.complex(pseudo(16), pseudo(16, seed=9)),
        extra={"step": 1234, "lr": 3e-4, "betas": (0.9, 0.999), "name": "golden", "blob": b"\x00\x01\xff",
               7: None, "dtype": torch.bfloat16, "size": torch.Size([2, 3])},
    )
    lossy = {"w8": pseudo(5000, torch.float32, 21), "w16": pseudo(5000, torch.float32, 22),
             "h8": pseudo(3000, torch.float16, 23)}
    big = {"big": pseudo(200_000, torch.bfloat16, 31), "ids": torch.arange(1000, dtype=torch.int32)}
    return lossless, lossy, big


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def main() -> None:
    lossless, lossy, big = objects()
    files = {
        "golden_v1_lossless.dtdr": (lossless, {}),
        "golden_v1_lossy.dtdr": (lossy, {"codec": {"w8": "dtdr8", "h8": "dtdr8", "w16": "dtdr16"}}),
        "golden_v1_archive.dtdr": (big, {"parity": "archive", "segment_elems": 65536}),
    }
    expected = {}
    for name, (obj, kwargs) in files.items():
        path = os.path.join(HERE, name)
        if os.path.exists(path):
            raise SystemExit(f"{name} exists: golden files are never regenerated")
        api.save(obj, path, metadata={"golden": name}, **kwargs)
        back = api.load(path, errors="strict")
        flat = {k: v for k, v in back.items() if isinstance(v, torch.Tensor)}
        expected[name] = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": digest(v)} for k, v in flat.items()}
    with open(os.path.join(HERE, "golden_v1.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
