"""A torture test in the spirit of ZFS's ztest: random saves killed at random
moments, random damage of every mode :mod:`torch_dtdr.faults` offers, random
truncations, then load / open / verify / repair, checking the invariants the
project promises:

* a save killed with SIGKILL leaves the destination holding the old file or
  the new one, never a torn file, and the next save removes its temp file;
* no tensor reported ``exact`` or ``repaired`` (by ``load``, ``open`` or in a
  file written by ``repair``) differs from what a clean load of the undamaged
  file gives;
* every error raised is a ``torch_dtdr.errors.DTDRError``;
* each operation on a damaged file takes at most ``10 ×`` the CPU time of a
  clean load of the same file plus a constant, and the process's peak memory
  stays under a bound.

Usage::

    python fuzz/torture.py --seconds 30            # CI
    python fuzz/torture.py --seconds 3600 --seed 7 # by hand

Exit status 0: every invariant held. Otherwise each failure is printed with
its reproducer (seed, iteration, damage parameters) and the damaged file is
kept in ``--crash-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch

import torch_dtdr
from torch_dtdr import faults
from torch_dtdr.errors import DamageWarning, DTDRError
from torch_dtdr.storage import TEMP_SUFFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITIES = ["off", "default", "strong", "archive", (4, 2), (8, 3)]
CODECS = ["dtdr", "dtdr16", "dtdr8", "raw"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.float64]
#: The constant of the time bound (CPU seconds), generous for a loaded CI machine.
TIME_CONSTANT_S = 3.0
#: The memory bound above the harness's own peak after warm-up.
MEMORY_MARGIN_MB = 400

_SAVER = """
import sys, torch, torch_dtdr
sys.path.insert(0, sys.argv[3])
from torture import state_dict
torch_dtdr.save(state_dict(int(sys.argv[2]), big=True), sys.argv[1], parity="default")
"""


def state_dict(seed: int, big: bool = False) -> dict:
    """A random state dict: dtypes, shapes and sizes drawn from ``seed``."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(rnd.randint(1, 6)):
        numel = rnd.choice([0, 1, 7, 1000, 4096, 50_000, 200_000] + ([2_000_000] if big else []))
        dtype = rnd.choice(DTYPES)
        if dtype == torch.bool:
            t = torch.rand(numel, generator=gen) > 0.5
        elif dtype == torch.int64:
            t = torch.randint(-1000, 1000, (numel,), generator=gen)
        else:
            t = (torch.randn(numel, generator=gen) * 0.02).to(dtype)
        out[f"layer{i}.w"] = t
    return out


def _sha(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1).contiguous()
    return flat if flat.dtype == torch.bool else flat.view(torch.uint8)


def _same(a, b: torch.Tensor) -> bool:
    """Bit-identical (NaNs included)."""
    return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a),
                                                                                                     _bytes(b))


def _clean(path) -> tuple[dict, float]:
    start = time.process_time()
    obj = torch_dtdr.load(path, errors="strict")
    return obj, time.process_time() - start


class Torture:
    def __init__(self, seed: int, workdir: str, crash_dir: str):
        self.rnd = random.Random(seed)
        self.seed = seed
        self.dir = workdir
        self.crash_dir = crash_dir
        self.failures: list[str] = []
        self.counts = {"kills": 0, "damaged": 0, "typed errors": 0}
        self.memory_bound_kb = None

    # ------------------------------------------------------------------ reporting
    def fail(self, what: str, repro: str, keep: str | None = None) -> None:
        if keep is not None and os.path.exists(keep):
            os.makedirs(self.crash_dir, exist_ok=True)
            kept = os.path.join(self.crash_dir, f"torture-{self.seed}-{len(self.failures)}.dtdr")
            shutil.copyfile(keep, kept)
            repro += f"; file kept as {kept}"
        self.failures.append(f"{what} [{repro}]")
        print(f"FAIL: {what} [{repro}]", flush=True)

    def timed(self, label, repro, bound, call, path):
        """Run ``call``; a non-DTDR exception or a run over ``bound`` CPU seconds is a failure."""
        start = time.process_time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DamageWarning)
                result = call()
        except DTDRError:
            self.counts["typed errors"] += 1
            result = None
        except Exception as e:  # noqa: BLE001 - the invariant is that nothing else escapes
            self.fail(f"{label} raised {type(e).__name__}: {e}", repro, path)
            result = None
        spent = time.process_time() - start
        if spent > bound:
            self.fail(f"{label} took {spent:.2f} s of CPU, bound {bound:.2f} s", repro, path)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.memory_bound_kb is not None and peak > self.memory_bound_kb:
            self.fail(f"{label}: peak RSS {peak // 1024} MB over the bound {self.memory_bound_kb // 1024} MB",
                      repro, path)
            self.memory_bound_kb = peak  # report each growth once
        return result

    # ------------------------------------------------------------------ kill -9 during a save
    def kill_round(self, i: int) -> None:
        dest = os.path.join(self.dir, "kill.dtdr")
        old_seed, new_seed = self.rnd.randrange(2**31), self.rnd.randrange(2**31)
        torch_dtdr.save(state_dict(old_seed, big=True), dest)
        old_sha = _sha(dest)
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, dest, str(new_seed), os.path.dirname(__file__)],
                                env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(self.rnd.uniform(0.5, 4.0))  # import takes ~1-2 s: kills land before, during and after writing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.counts["kills"] += 1
        repro = f"kill round {i}: old seed {old_seed}, new seed {new_seed}"
        if _sha(dest) != old_sha:
            try:
                got = torch_dtdr.load(dest, errors="strict")
            except Exception as e:  # noqa: BLE001
                self.fail(f"torn destination after SIGKILL: {type(e).__name__}: {e}", repro, dest)
                return
            want = state_dict(new_seed, big=True)
            if sorted(got) != sorted(want) or not all(_same(got[k], want[k]) for k in want):
                self.fail("destination after SIGKILL is neither the old nor the new file", repro, dest)
        torch_dtdr.save({"x": torch.ones(1)}, os.path.join(self.dir, "after-kill.dtdr"))
        stale = [n for n in os.listdir(self.dir) if n.endswith(TEMP_SUFFIX) and f".{proc.pid}@" in n]
        if stale:
            self.fail(f"the killed writer's temp files survived the next save: {stale}", repro)

    # ------------------------------------------------------------------ damage, then every reader
    def damage_round(self, i: int) -> None:
        sd_seed = self.rnd.randrange(2**31)
        parity = self.rnd.choice(PARITIES)
        codec = self.rnd.choice(CODECS)
        path = os.path.join(self.dir, "orig.dtdr")
        torch_dtdr.save(state_dict(sd_seed), path, parity=parity, codec=codec)
        reference, clean_s = _clean(path)
        bound = 10 * clean_s + TIME_CONSTANT_S
        size = os.path.getsize(path)
        mode = self.rnd.choice(faults.MODES)
        kwargs = {"mode": mode, "seed": self.rnd.randrange(2**31)}
        if mode == "truncate":
            kwargs["count"] = self.rnd.randrange(1, size)
        elif mode == "region":
            start = self.rnd.randrange(size)
            kwargs["region"] = [(start, min(size, start + self.rnd.choice([1, 64, 4096, 65536, size])))]
        else:
            kwargs["fraction"] = self.rnd.choice([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1])
            if self.rnd.random() < 0.4:  # aim at one part of the container (index, trailer, a tensor's residual...)
                kwargs["region"] = self.rnd.choice(["superblock", "index", "trailer", "footer", "chunksums",
                                                    "parity", "tensor:*:base", "tensor:*:residual", "tensor:*"])
        bad = os.path.join(self.dir, "bad.dtdr")
        try:
            faults.corrupt(path, out=bad, **kwargs)
        except faults.FaultArgumentError:  # a named part this file lacks (no parity, no residual...)
            kwargs.pop("region")
            faults.corrupt(path, out=bad, **kwargs)
        self.counts["damaged"] += 1
        repro = (f"damage round {i}: state_dict({sd_seed}), parity={parity!r}, codec={codec!r}, "
                 f"corrupt({kwargs})")

        def check_statuses(label, obj, rep):
            if obj is None or rep is None:
                return
            status = {t.name: t.status for t in rep.tensors}
            for name, want in reference.items():
                if status.get(name) in ("exact", "repaired") and not _same(obj[name], want):
                    self.fail(f"{label}: tensor {name!r} reported {status[name]} but its bytes differ", repro, bad)

        out = self.timed("load", repro, bound, lambda: torch_dtdr.load(bad, partial=True, report=True), bad)
        if out is not None:
            check_statuses("load", *out)

        def read_all():
            with torch_dtdr.open(bad) as f:
                got = {k: f.get_tensor(k) for k in f.keys()}
                return got, f.report()

        out = self.timed("open", repro, bound, read_all, bad)
        if out is not None:
            check_statuses("open", *out)
        self.timed("verify", repro, bound, lambda: torch_dtdr.verify(bad), bad)
        healed = os.path.join(self.dir, "healed.dtdr")
        if os.path.exists(healed):
            os.unlink(healed)
        self.timed("repair", repro, 2 * bound, lambda: torch_dtdr.repair(bad, healed), bad)
        if os.path.exists(healed):
            out = self.timed("load after repair", repro, bound,
                             lambda: torch_dtdr.load(healed, partial=True, report=True), healed)
            if out is not None:
                check_statuses("file written by repair", *out)

    def run(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        self.damage_round(-1)  # warm-up: imports and first allocations before the memory baseline
        self.memory_bound_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + MEMORY_MARGIN_MB * 1024
        i = 0
        while time.monotonic() < deadline:
            if i % 5 == 4:
                self.kill_round(i)
            else:
                self.damage_round(i)
            i += 1
        print(f"torture: seed {self.seed}, {i} rounds, {self.counts}, {len(self.failures)} failure(s)", flush=True)
        return 1 if self.failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="time budget (default 30)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--crash-dir", default=os.path.join(ROOT, "fuzz", "crashes"),
                    help="where failing files are kept (default fuzz/crashes)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"torture: seed {seed}, {args.seconds:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="dtdr-torture-") as d:
        return Torture(seed, d, args.crash_dir).run(args.seconds)


if __name__ == "__main__":
    sys.exit(main())
