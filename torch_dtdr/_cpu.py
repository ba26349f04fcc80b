"""How many threads pay off for CPU-bound encode and decode work."""

from __future__ import annotations

import os


def compute_cores() -> int:
    """An estimate of the cores this process can compute on: half its usable
    logical CPUs (on most machines two logical CPUs are the hyper-threads of
    one core, which share its arithmetic units), at least 1.

    On a 2-vCPU machine, decoding on 2 threads measured slower than on one
    (the second vCPU adds about 25 % of a core to numpy work, less than the
    threads cost), so thread pools are sized from this, not from the logical
    count."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    return max(1, logical // 2)
