"""What each entry point costs on given files: CPU time and peak memory of
``load``, ``open`` (every tensor), ``verify`` and ``repair``, one at a time.

    python fuzz/cost.py [--ops load,open,verify,repair] [--as-limit-mb N] FILE...

Prints one JSON object: ``{"clear_refs": bool, "results": {FILE: {OP: {...}}}}``
with, per file and operation, ``outcome`` ("ok", "error" with the class, or
"crash" with a traceback), ``cpu_s`` (process CPU time; torch limited to one
thread) and ``peak_mb`` (VmHWM after a reset through /proc/self/clear_refs,
minus the resident size before the operation). ``repair`` writes to a
temporary file with ``salvage=True`` (the most work it can be asked to do).
Used by tests/test_cost_bounds.py in a subprocess, as ``measure.py`` is by
tests/test_hostile.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz.measure import _reset_peak, _status  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="load,open,verify,repair")
    ap.add_argument("--as-limit-mb", type=int, default=0)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import torch_dtdr
    from torch_dtdr import api, decoding
    from torch_dtdr.errors import DamageWarning, DTDRError

    buf = io.BytesIO()
    api.save({"w": torch.randn(100), "i": torch.arange(5)}, buf)
    decoding.load_file(io.BytesIO(buf.getvalue()))
    api.verify(io.BytesIO(buf.getvalue()))

    if args.as_limit_mb:
        lim = _status("VmSize") + args.as_limit_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    def run(op: str, data: bytes, tmp: str) -> None:
        if op == "load":
            decoding.load_file(io.BytesIO(data))
        elif op == "open":
            with torch_dtdr.open(io.BytesIO(data)) as fh:
                for k in fh.keys():
                    fh.get_tensor(k)
        elif op == "verify":
            api.verify(io.BytesIO(data))
        elif op == "repair":
            src = os.path.join(tmp, "in.dtdr")
            with open(src, "wb") as f:
                f.write(data)
            api.repair(src, os.path.join(tmp, "out.dtdr"), salvage=True)
        else:
            raise SystemExit(f"unknown operation {op}")

    results = {}
    clear = _reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.files:
            with open(path, "rb") as f:
                data = f.read()
            per_op = {}
            for op in args.ops.split(","):
                rss0 = _status("VmRSS")
                clear = _reset_peak() and clear
                t0 = time.process_time()
                rec = {"outcome": "ok"}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DamageWarning)
                    try:
                        run(op, data, tmp)
                    except DTDRError as e:
                        rec = {"outcome": "error", "error": type(e).__name__, "message": str(e)[:300]}
                    except BaseException as e:  # noqa: BLE001 - reported, the test fails on it
                        rec = {"outcome": "crash", "error": type(e).__name__, "message": str(e)[:300],
                               "traceback": traceback.format_exc()[-2000:]}
                rec["cpu_s"] = time.process_time() - t0
                rec["peak_mb"] = (_status("VmHWM") - rss0) / (1 << 20)
                per_op[op] = rec
            results[path] = per_op
    print(json.dumps({"clear_refs": clear, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
