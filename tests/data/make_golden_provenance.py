"""Writes the golden file of format 1.1's ``provenance`` marker: a file that
``repair --salvage`` wrote from a damaged one, with one tensor degraded
(``w``: three chunks of its residual zeroed in one stripe), one lost (``gone``:
the damaged file was truncated inside it) and one exact (``b``). Run ONCE;
never regenerate (later versions must keep decoding these bytes).

    python tests/data/make_golden_provenance.py   # writes golden_v1_repaired_degraded.dtdr and its .json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections import OrderedDict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch_dtdr.api as api  # noqa: E402
from torch_dtdr.format.reader import regions  # noqa: E402
from tests.helpers import pseudo, zero_range  # noqa: E402

NAME = "golden_v1_repaired_degraded.dtdr"


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    path = os.path.join(HERE, NAME)
    if os.path.exists(path):
        raise SystemExit(f"{NAME} exists: golden files are never regenerated")
    obj = OrderedDict(b=pseudo(1000, seed=41), w=pseudo(1 << 15, seed=42), gone=pseudo(4000, seed=43))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "golden_damaged.dtdr")
        api.save(obj, src, metadata={"golden": NAME})
        res = regions(src)["tensor:w:residual"]
        start = (res[0][0] // 4096 + 1) * 4096
        for i in range(3):
            zero_range(src, start + i * 4096, 4096)
        cut = regions(src)["tensor:gone"][0][0] + 10
        with open(src, "r+b") as f:
            f.truncate(cut)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api.repair(src, path, salvage=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back, rep = api.load(path, report=True)
    expected = {"tensors": {k: {"status": t.status, "provenance": t.provenance,
                                "sha256": None if back[k] is None else digest(back[k])}
                            for k, t in zip(obj, rep.tensors)}}
    with open(os.path.join(HERE, NAME.replace(".dtdr", ".json")), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
