"""How many threads pay off for CPU-bound encode and decode work."""

from __future__ import annotations

import os

SYSFS_CPU = "/sys/devices/system/cpu"


def usable_cpus() -> set[int]:
    """The logical CPUs this process may run on (its affinity mask)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs of a kernel CPU list such as ``"0-3,8,10-11"``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def physical_cores(cpus: set[int], sysfs: str = SYSFS_CPU) -> int | None:
    """How many physical cores the logical CPUs ``cpus`` belong to, from the
    kernel's topology (each CPU's ``core_cpus_list``, or the older
    ``thread_siblings_list``: the hyper-threads sharing its core); None when
    the topology cannot be read (not Linux, sysfs hidden in a container)."""
    cores: set[frozenset[int]] = set()
    for cpu in cpus:
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                with open(os.path.join(sysfs, f"cpu{cpu}", "topology", name)) as f:
                    siblings = parse_cpu_list(f.read())
                break
            except (OSError, ValueError):
                continue
        else:
            return None
        cores.add(frozenset(siblings & cpus) or frozenset({cpu}))
    return len(cores) or None


def compute_cores() -> int:
    """The physical cores this process can compute on, at least 1.

    Two hyper-threads of one core share its arithmetic units, so thread pools
    for encode and decode work are sized by physical cores, counted from the
    kernel's CPU topology within the affinity mask. Where the topology cannot
    be read, half the usable logical CPUs is the estimate (on most machines
    two logical CPUs are the hyper-threads of one core). A machine with two
    real cores (one thread each) counts 2, and with the compiled codec core
    (which releases the GIL) 2 threads measured faster than 1 there for the
    lossless codec (see :data:`torch_dtdr.decoding.DEFAULT_WORKERS`)."""
    cpus = usable_cpus()
    cores = physical_cores(cpus)
    if cores is None:
        return max(1, len(cpus) // 2)
    return max(1, cores)
