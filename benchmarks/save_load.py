"""Save / load speed and peak memory of DTDR against safetensors and torch.save.

Every figure is a median over --repeat runs, all measured in the same run, and
reported as a ratio against safetensors (and torch.save). Loads are compared
fully materialised (safetensors' ``load(bytes)`` of the whole file,
``torch.load`` without mmap), since DTDR verifies every byte; safetensors'
lazy ``load_file`` is shown for information. Peak memory is measured in a
fresh subprocess per operation (ru_maxrss above the process's baseline).

    python benchmarks/save_load.py                 # all-MiniLM-L6-v2 and a synthetic LLM-shaped dict
    python benchmarks/save_load.py --model llm --dtype float16 --repeat 5
    python benchmarks/save_load.py --model minilm4 --dtype float32,bfloat16,float16 --repeat 5

``--model minilm4`` is all-MiniLM-L6-v2 repeated four times (363 MB in fp32),
the size the codec-speed bars are stated for. ZipNN (``pip install
'torch-dtdr[bench]'``), the lossless weight compressor, is measured as a peer
on the same float bytes (all floating tensors concatenated): its size, and
one-thread compress and decompress times (no container, no checksums, no
file), next to ``dtdr``'s save and load with its checksums and parity. The
``core`` line says which codec core ran (``TORCH_DTDR_NATIVE=0`` forces the
reference).

DTDR saves to a local path are durable (temp file, fsync, rename, fsync of
the folder), torch.save and safetensors are not: the ``torch.save + fsync``
line gives the durable reference on the same disk, and ``--dir /dev/shm`` (a
tmpfs) takes the disk out of every save time.

``--workers 1,2`` measures every DTDR codec once per value of ``workers=``
(save and load), in the same run, as rows ``dtdr@1``, ``dtdr@2``...;
without it the library's default is used. ``--formats dtdr,dtdr8`` limits the
DTDR codecs measured (safetensors and torch always run: they are the
reference).
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

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.helpers import llm_state_dict, minilm_state_dict  # noqa: E402

import torch_dtdr  # noqa: E402

FORMATS = ["safetensors", "torch", "dtdr", "dtdr8", "dtdr16", "raw"]


def state_dict(model: str, dtype: str) -> dict:
    dt = getattr(torch, dtype)
    if model == "minilm4":
        base = minilm_state_dict()
        return {f"copy{r}.{k}": (v.to(dt) if v.is_floating_point() else v).clone()
                for r in range(4) for k, v in base.items()}
    sd = minilm_state_dict() if model == "minilm" else llm_state_dict(8, 512)
    return {k: (v.to(dt) if v.is_floating_point() else v) for k, v in sd.items()}


def zipnn_row(sd: dict, dtype: str, repeat: int) -> dict | None:
    """ZipNN on the concatenated float bytes, one thread: size, compress, decompress."""
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    floats = [v.contiguous().reshape(-1).view(torch.uint8) for v in sd.values() if v.is_floating_point()]
    raw = torch.cat(floats).numpy().tobytes()
    zpn = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1)
    # ZipNN 0.5.4's compress rewrites its input buffer in place (even a bytes
    # object), so every run gets a fresh copy, made outside the timed region.
    packed = zpn.compress(bytearray(raw))
    if bytes(zpn.decompress(packed)) != raw:
        raise AssertionError("ZipNN did not round-trip")
    times = []
    for _ in range(repeat):
        scratch = bytearray(raw)
        t0 = time.perf_counter()
        zpn.compress(scratch)
        times.append(time.perf_counter() - t0)
    return {"format": "zipnn", "size": len(packed), "float_bytes": len(raw),
            "save_s": statistics.median(times),
            "load_s": timed(lambda: zpn.decompress(packed), repeat)}


def dtdr_options(fmt: str) -> tuple[str, dict]:
    """``("dtdr", {"workers": 2})`` for a row label ``"dtdr@2"``."""
    codec, _, workers = fmt.partition("@")
    return codec, ({"workers": int(workers)} if workers else {})


def save(fmt: str, sd: dict, path: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    elif fmt == "torch":
        torch.save(sd, path)
    else:
        codec, options = dtdr_options(fmt)
        torch_dtdr.save(sd, path, codec=codec, **options)


def durable_torch_save(sd: dict, path: str) -> None:
    """torch.save, then fsync of the file and its folder: the durability every
    DTDR save to a local path pays for (torch.save alone leaves the bytes in
    the page cache)."""
    torch.save(sd, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(fmt: str, path: str, lazy: bool = False):
    if fmt == "safetensors":
        from safetensors.torch import load, load_file

        if lazy:
            return load_file(path)
        with open(path, "rb") as f:
            return load(f.read())
    if fmt == "torch":
        return torch.load(path, weights_only=True, mmap=lazy)
    return torch_dtdr.load(path, **dtdr_options(fmt)[1])


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(op: str, fmt: str, model: str, dtype: str, path: str) -> float:
    """Peak RSS (bytes) above the baseline of a fresh process doing one op
    (Linux: the high-water mark is reset through /proc/self/clear_refs)."""
    code = f"""
import sys, os
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from benchmarks.save_load import state_dict, save, load
import torch_dtdr, safetensors.torch
sd = state_dict({model!r}, {dtype!r}) if {op!r} == "save" else None
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import gc; gc.collect()
base = status('VmRSS:')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset the peak-RSS high-water mark (VmHWM) to the current RSS
if {op!r} == "save":
    save({fmt!r}, sd, {path!r})
else:
    out = load({fmt!r}, {path!r})
print(status('VmHWM:') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["minilm", "minilm4", "llm", "both"], default="both")
    ap.add_argument("--dtype", default="float32", help="one dtype or a comma-separated list")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--workers", help="workers= of the DTDR codecs, one value or a comma-separated list "
                    "(one row per value); default: the library's default")
    ap.add_argument("--dir", help="folder for the files (default: the system's temp folder); a tmpfs such as "
                    "/dev/shm takes the disk, and so the fsync of DTDR's durable saves, out of the save times")
    ap.add_argument("--formats", help="the DTDR codecs to measure, comma-separated (default: "
                    + ",".join(FORMATS[2:]) + "); safetensors and torch always run")
    args = ap.parse_args()
    from torch_dtdr.codecs import native

    print(f"core: {native.core()}")
    print(f"default workers: {torch_dtdr.api.DEFAULT_WORKERS}")
    codecs_measured = args.formats.split(",") if args.formats else FORMATS[2:]
    worker_values = args.workers.split(",") if args.workers else [""]
    formats = FORMATS[:2] + [f"{c}@{w}" if w else c for c in codecs_measured for w in worker_values]
    results = []
    runs = [(m, d) for m in (["minilm", "llm"] if args.model == "both" else [args.model])
            for d in args.dtype.split(",")]
    for model, dtype in runs:
        args.dtype = dtype
        sd = state_dict(model, args.dtype)
        nbytes = sum(v.numel() * v.element_size() for v in sd.values())
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            rows = {}
            for fmt in formats:
                path = os.path.join(d, f"ckpt.{fmt}")
                save(fmt, sd, path)
                row = {
                    "format": fmt,
                    "size": os.path.getsize(path),
                    "save_s": timed(lambda: save(fmt, sd, path), args.repeat),
                    "load_s": timed(lambda: load(fmt, path), args.repeat),
                }
                if fmt in ("safetensors", "torch"):
                    row["lazy_load_s"] = timed(lambda: load(fmt, path, lazy=True), args.repeat)
                if fmt == "torch":
                    row["durable_save_s"] = timed(lambda: durable_torch_save(sd, path), args.repeat)
                if not args.no_memory:
                    row["save_peak"] = peak_memory("save", fmt, model, args.dtype, path)
                    row["load_peak"] = peak_memory("load", fmt, model, args.dtype, path)
                rows[fmt] = row
            st, tt = rows["safetensors"], rows["torch"]
            zrow = zipnn_row(sd, args.dtype, args.repeat)
            print(f"\n{model} ({args.dtype}): {len(sd)} tensors, {nbytes / 1e6:.1f} MB; medians of {args.repeat} runs")
            print(f"{'format':<12}{'size':>8}{'size/st':>8}{'save s':>9}{'load s':>9}{'save/st':>9}{'load/st':>9}"
                  f"{'save/pt':>9}{'load/pt':>9}{'save mem':>10}{'load mem':>10}")
            for fmt, r in rows.items():
                mem = ("" if args.no_memory else
                       f"{r['save_peak'] / nbytes:>9.2f}x{r['load_peak'] / nbytes:>9.2f}x")
                print(f"{fmt:<12}{r['size'] / nbytes:>7.1%}{r['size'] / st['size']:>8.3f}{r['save_s']:>9.3f}{r['load_s']:>9.3f}"
                      f"{r['save_s'] / st['save_s']:>9.2f}{r['load_s'] / st['load_s']:>9.2f}"
                      f"{r['save_s'] / tt['save_s']:>9.2f}{r['load_s'] / tt['load_s']:>9.2f}{mem}")
            if zrow is None:
                print("zipnn: not installed (pip install 'torch-dtdr[bench]')")
            else:
                raw_floats = zrow["float_bytes"]
                print(f"{'zipnn':<12}{zrow['size'] / raw_floats:>7.1%}{'':>8}{zrow['save_s']:>9.3f}{zrow['load_s']:>9.3f}"
                      f"   (1 thread, float bytes only: {zrow['size'] / raw_floats:.3f} of them)")
                for label in (f for f in rows if dtdr_options(f)[0] == "dtdr"):
                    dt_row = rows[label]
                    print(f"{'':<12}{label}: size {dt_row['size'] / nbytes:.3f} of the state dict; save / zipnn "
                          f"compress {dt_row['save_s'] / zrow['save_s']:.2f}, load / zipnn decompress "
                          f"{dt_row['load_s'] / zrow['load_s']:.2f}")
                rows["zipnn"] = zrow
            durable = tt["durable_save_s"]
            print(f"torch.save + fsync (durable, as every DTDR save to a local path): {durable:.3f} s; "
                  + ", ".join(f"{f} save / it {r['save_s'] / durable:.2f}" for f, r in rows.items()
                              if f not in ("safetensors", "torch", "zipnn")))
            print(f"(lazy, for information: safetensors load_file {st['lazy_load_s'] * 1e3:.1f} ms, "
                  f"torch.load(mmap=True) {tt['lazy_load_s'] * 1e3:.1f} ms; "
                  "memory columns are peak RSS above baseline / state-dict bytes)")
            results.append({"model": model, "dtype": args.dtype, "bytes": nbytes, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
