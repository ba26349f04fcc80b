"""Writes golden_v1_tree_kinds.dtdr: the tree node kinds for training-loop values
(sets, Namespace, defaultdict, paths, datetimes, registered types). Run once;
the file is then frozen and must keep decoding to GOLDEN_TREE_KINDS."""

from __future__ import annotations

import argparse
import datetime
import enum
import os
import pathlib
from collections import defaultdict

import torch

import torch_dtdr


class Phase(enum.Enum):
    WARMUP = 1
    TRAIN = 2


PHASE_NAME = "golden.Phase"


def golden_object():
    return {
        "hparams": argparse.Namespace(lr=0.001, out=pathlib.PurePosixPath("/runs/a")),
        "seen": {1, 2},
        "frozen": frozenset({"x"}),
        "counts": defaultdict(int, {"a": 3}),
        "phase": Phase.TRAIN,
        "started": datetime.datetime(2026, 12, 2, 13, 0, 5, 123456, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2026, 2, 28),
        "at": datetime.time(1, 2, 3),
        "elapsed": datetime.timedelta(days=1, seconds=2, microseconds=3),
        "weights": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    }


if __name__ == "__main__":
    torch_dtdr.register_type(Phase, name=PHASE_NAME)
    out = os.path.join(os.path.dirname(__file__), "golden_v1_tree_kinds.dtdr")
    torch_dtdr.save(golden_object(), out, metadata={"golden": "golden_v1_tree_kinds.dtdr"})
    print("wrote", out)
