"""Throughput of the erasure-code backends, called per stripe as the container does.

For every backend and geometry (chunk size C, k data chunks, m parity chunks)
the script encodes a ~256 MiB buffer stripe by stripe, then reconstructs every
stripe with m data chunks erased (the worst case), and prints the median GB/s
of data bytes over ``--repeats`` runs. Every configuration is checked for
correctness (parity identical between the per-stripe and the batched encoder,
reconstructed data bit-exact) before it is timed.

    python benchmarks/parity.py [--mib 256] [--repeats 3] [--chunk 4096 65536]
                                [--k 16 32] [--m 1 2 4] [--backends ...] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_dtdr.integrity.backends import CHAIN  # noqa: E402
from torch_dtdr.integrity.parity import ErasureCode, available_algorithms  # noqa: E402

# (algorithm, implementation) pairs worth timing; "reference" is far too slow.
def _pairs(algs):
    return [(a, i) for a in algs for i in CHAIN[a] if i != "reference"]


_CLOCK = time.perf_counter


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = _CLOCK()
        fn()
        times.append(_CLOCK() - t0)
    return statistics.median(times)


def bench(alg: str, impl: str, c: int, k: int, m: int, buf: bytes, repeats: int) -> dict:
    ec = ErasureCode(k, m, alg, impl=impl)
    sb = k * c
    nstripes = len(buf) // sb
    data = memoryview(buf)[: nstripes * sb]
    nbytes = len(data)
    # The container holds the stripe as k chunk views of the stream.
    stripes = [[data[s + j * c : s + (j + 1) * c] for j in range(k)] for s in range(0, nbytes, sb)]

    parity = [ec.encode(st) for st in stripes]
    batched = ec.encode_stripes(data, c)
    assert all(batched[i].tobytes() == b"".join(p) for i, p in enumerate(parity)), "encode_stripes differs"

    erase = list(range(m))  # m data chunks lost in every stripe
    slots = []
    for st, par in zip(stripes, parity):
        s = list(st) + list(par)
        for i in erase:
            s[i] = None
        slots.append(s)
    # correctness on a few stripes
    for idx in (0, nstripes // 2, nstripes - 1):
        rec = ec.reconstruct(slots[idx])
        assert all(bytes(a) == b for a, b in zip(stripes[idx], rec)), "reconstruct is not bit-exact"

    t_enc = _median_time(lambda: [ec.encode(st) for st in stripes], repeats)
    t_batch = _median_time(lambda: ec.encode_stripes(data, c), repeats)
    t_dec = _median_time(lambda: [ec.reconstruct(s) for s in slots], repeats)
    return {
        "enc": nbytes / t_enc / 1e9,
        "enc_stripes": nbytes / t_batch / 1e9,
        "dec": nbytes / t_dec / 1e9,
        "us_per_stripe_enc": t_enc / nstripes * 1e6,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="buffer size in MiB (default 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--backends", nargs="+", default=None, help="default: every importable algorithm")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, steadier on a shared machine (single-threaded code)")
    args = ap.parse_args(argv)
    global _CLOCK
    _CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    pairs = _pairs(args.backends or available_algorithms())
    buf = np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8).tobytes()
    print(f"buffer {args.mib} MiB, median of {args.repeats}, {args.clock} clock; GB/s of data bytes "
          f"(decode: m data chunks erased in every stripe)")
    print(f"{'algorithm/impl':32s} {'C':>6s} {'k':>3s} {'m':>2s} {'encode':>8s} {'enc_strp':>8s} {'decode':>8s} {'us/stripe':>9s}")
    for c in args.chunk:
        for k in args.k:
            for m in args.m:
                for alg, impl in pairs:
                    name = f"{alg}/{impl}"
                    try:
                        r = bench(alg, impl, c, k, m, buf, args.repeats)
                    except Exception as exc:  # report and go on
                        print(f"{name:32s} {c:6d} {k:3d} {m:2d}  FAILED: {exc}")
                        continue
                    print(f"{name:32s} {c:6d} {k:3d} {m:2d} {r['enc']:8.2f} {r['enc_stripes']:8.2f} "
                          f"{r['dec']:8.2f} {r['us_per_stripe_enc']:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
