"""Load files one by one and report, per file, what happened and what it cost.

    python fuzz/measure.py [--mode strict|recover] [--as-limit-mb N] FILE...

Prints one JSON object: ``{"clear_refs": bool, "results": {FILE: {...}}}``
with, per file, ``outcome`` ("error" / "ok" / "crash"), the exception class
and field, ``cpu_s`` (process CPU time, torch limited to one thread) and
``peak_mb`` (VmHWM after resetting it through /proc/self/clear_refs, minus
the resident size before the load). Both ``torch_dtdr.api.load`` and
``torch_dtdr.open`` (every tensor) are run on each file.

Used by tests/test_hostile.py in a subprocess, so that an address-space
limit (RLIMIT_AS, ``--as-limit-mb`` above the baseline) turns any attempt to
allocate gigabytes into a failure instead of swapping the test machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="strict", choices=["strict", "recover"])
    ap.add_argument("--as-limit-mb", type=int, default=0)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import torch_dtdr
    from torch_dtdr import api, decoding
    from torch_dtdr.errors import DamageWarning, DTDRError

    # warm up every code path once (imports, codec tables), so baselines are fair
    buf = io.BytesIO()
    api.save({"w": torch.randn(100), "i": torch.arange(5)}, buf, codec={"w": "dtdr"})
    decoding.load_file(io.BytesIO(buf.getvalue()))

    if args.as_limit_mb:
        vm = _status("VmSize")
        lim = vm + args.as_limit_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    results = {}
    clear = _reset_peak()
    for path in args.files:
        with open(path, "rb") as f:
            data = f.read()
        rss0 = _status("VmRSS")
        clear = _reset_peak() and clear
        t0 = time.process_time()
        w0 = time.perf_counter()
        rec = {"outcome": "ok"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            for step in ("load", "open"):
                try:
                    if step == "load":
                        decoding.load_file(io.BytesIO(data), errors=args.mode)
                    else:
                        with torch_dtdr.open(io.BytesIO(data), errors=args.mode) as fh:
                            fh.metadata()
                            for k in fh.keys():
                                fh.get_tensor(k)
                except DTDRError as e:
                    if rec["outcome"] == "ok":
                        rec = {"outcome": "error", "error": type(e).__name__, "field": e.field,
                               "message": str(e)[:300], "step": step}
                except BaseException as e:  # noqa: BLE001 - reported, the test fails on it
                    rec = {"outcome": "crash", "error": type(e).__name__, "message": str(e)[:300], "step": step,
                           "traceback": traceback.format_exc()[-2000:]}
                    break
        rec["cpu_s"] = time.process_time() - t0
        rec["wall_s"] = time.perf_counter() - w0
        rec["peak_mb"] = (_status("VmHWM") - rss0) / (1 << 20)
        results[path] = rec
    print(json.dumps({"clear_refs": clear, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
