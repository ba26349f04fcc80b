"""Peak memory of loading weights into an existing model: ``torch_dtdr.load_model``
(decodes each tensor into the parameter's own memory) against
``torch_dtdr.load`` + ``load_state_dict``, safetensors' ``load_model`` and
``torch.load`` (no mmap) + ``load_state_dict``, all in the same run.

The bar (issue 16): on a 1 GB model, peak RSS above the model's own size is at
most 128 MiB. Each load runs in a fresh subprocess: the model is built and its
memory touched, the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``),
the load runs, and the peak above the RSS before the load is reported (for the
meta-device model, whose weights the load itself allocates, above the model's
size). Median of --repeat runs; Linux only.

    python benchmarks/load_model.py                 # ~1 GB float32 model
    python benchmarks/load_model.py --size-mb 128   # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MIB = 1 << 20
WIDTH = 4096
METHODS = ["dtdr load_model", "dtdr load_model (meta model)", "dtdr load + load_state_dict",
           "safetensors load_model", "torch.load + load_state_dict"]


def build(size_mb: int, device: str = "cpu"):
    import torch

    layers = max(1, size_mb * MIB // (WIDTH * WIDTH * 4))
    with torch.device(device):
        return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=True) for _ in range(layers)])


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(method: str, size_mb: int, path: str) -> None:
    import torch

    import torch_dtdr

    model = build(size_mb, "meta" if "meta" in method else "cpu")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if "meta" not in method:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # touch every page: the model's memory is resident before the load
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    before = _status("VmRSS")
    start = time.perf_counter()
    if method.startswith("dtdr load_model"):
        torch_dtdr.load_model(model, path + ".dtdr")
    elif method == "dtdr load + load_state_dict":
        model.load_state_dict(torch_dtdr.load(path + ".dtdr"))
    elif method == "safetensors load_model":
        from safetensors.torch import load_model

        load_model(model, path + ".safetensors")
    else:
        model.load_state_dict(torch.load(path + ".pt", mmap=False, weights_only=True))
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    if "meta" in method:
        peak -= model_bytes
    print(json.dumps({"peak_above_model": peak, "seconds": seconds, "model_bytes": model_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    import torch
    from safetensors.torch import save_model

    import torch_dtdr

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        torch.manual_seed(0)
        model = build(args.size_mb)
        torch_dtdr.save_model(model, path + ".dtdr")
        save_model(model, path + ".safetensors")
        torch.save(model.state_dict(), path + ".pt")
        model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
        del model
        print(f"model: {model_mib:.0f} MiB float32; median of {args.repeat} fresh processes")
        results = {}
        for method in METHODS:
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, __file__, "--child", method, str(args.size_mb), path],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            peak = statistics.median(r["peak_above_model"] for r in runs) / MIB
            seconds = statistics.median(r["seconds"] for r in runs)
            results[method] = peak
            print(f"  {method:32s} peak RSS above the model {peak:8.1f} MiB   {seconds:6.2f} s")
    ok = max(results["dtdr load_model"], results["dtdr load_model (meta model)"]) <= 128
    print(f"torch_dtdr.load_model peak above model <= 128 MiB: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
