"""Checkpoints on S3: streaming-save memory and load speed against safetensors.

Two measurements, both against a moto S3 server that runs in a **separate
process** (moto keeps the objects it stores; in-process they would count
against the memory measured here):

(a) Streaming save. A synthetic LLM-shaped state dict (bf16 attention and
    embeddings, fp16 MLP, fp32 norms; ``--size`` GB) is saved with
    ``torch_dtdr.save`` to a local file and to ``s3://``, with each codec in
    ``--codecs``. Every (target, codec) runs in a fresh child process: it builds
    the state dict, warms the S3 client up, resets the kernel's peak-RSS mark
    (``/proc/self/clear_refs``), saves, and reads ``VmHWM``. The figure is the
    peak RSS above the RSS just before the save, i.e. above the state dict
    itself. Bar: <= 256 MiB.

(b) Load. A ``--load-size`` GB fp16 state dict is stored on S3 twice: as DTDR
    ``dtdr8`` (about half the bytes) and as fp16 safetensors. Each run loads
    both (``torch_dtdr.load`` of the URL; ``fs.cat_file`` through s3fs then
    ``safetensors.torch.load``), alternating which goes first; medians of
    ``--repeat``. Printed: the ratio safetensors / dtdr8 (> 1: dtdr8 faster).
    s3fs's ``cat_file`` of a whole object is itself concurrent: ranged GETs of
    ``default_block_size`` (50 MiB), ``max_concurrency`` at a time. Also
    printed: each load's peak RSS above the loaded state dict (medians).
    Diagnostics, once each: the ``cat_file`` download time of each object (no
    decoding), the same dtdr8 file decoded from local disk (decode cost without
    the network), and safetensors fetched with torch_dtdr's ``read_ranges``.

    python benchmarks/remote.py                       # full size: 2 GB save, 1 GB load
    python benchmarks/remote.py --size 0.25 --load-size 0.125 --repeat 1   # quick
    python benchmarks/remote.py --only load --threads 1
    python benchmarks/remote.py --only load --stock-moto --load-size 0.1   # moto's O(object) ranges

About ``--stock-moto``: moto 5.x serves ``Range: bytes=a-b`` by reading the
whole object under a per-object lock and slicing it, so each ranged GET costs
O(object size) and ranged readers pay quadratically; real S3 does not. By
default the moto process is patched (``_moto_main``) to read only the range.
Both contenders use ranged GETs (s3fs's ``cat_file`` splits a whole-object
read into 50 MiB ranges), so the patch helps both; responses are identical.

The machine matters: run it once on a quiet machine; it needs about
3 x --size GB of free RAM (the state dict, moto's copy of the object, page cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 2**20
BAR_MIB = 256
BUCKET = "dtdr-bench"
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# --------------------------------------------------------------------------- memory


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", s, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _malloc_trim() -> None:
    """Give free heap memory back to the kernel (glibc); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------- moto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_main(argv) -> None:
    """Run moto's server here; with ``--fast-ranges`` first make its ranged GETs
    read only the requested bytes.

    Stock moto (5.x) answers ``Range: bytes=a-b`` by reading the *whole* object
    (``FakeKey.value``, under the key's lock) and slicing it
    (``S3Response._handle_range_header``): every range request costs O(object
    size) and they are serialised per object. Real S3 serves a range in time
    proportional to the range. The patch hands ``_handle_range_header`` a view
    that reads just the slice asked for, so the emulator's cost model matches
    S3's; responses are byte-identical."""
    fast = "--fast-ranges" in argv
    argv = [a for a in argv if a != "--fast-ranges"]
    if fast:
        import threading

        from moto.s3.models import FakeKey
        from moto.s3.responses import S3Response

        tl = threading.local()

        class _RangeView:
            def __init__(self, key):
                self.key = key

            def __len__(self):
                return self.key.size

            def __getitem__(self, sl):
                start, stop, _ = sl.indices(self.key.size)
                with self.key.lock:
                    self.key._value_buffer.seek(start)
                    return self.key._value_buffer.read(max(0, stop - start))

        value = FakeKey.value

        def _value(self):
            return _RangeView(self) if getattr(tl, "lazy", False) else value.fget(self)

        FakeKey.value = property(_value, value.fset)
        get_object = S3Response.get_object

        def _get_object(self):
            rng = self.headers.get("range") or ""
            tl.lazy = rng.startswith("bytes=") and "," not in rng and not rng.startswith("bytes=-")
            try:
                return get_object(self)
            finally:
                tl.lazy = False

        S3Response.get_object = _get_object
    from moto.server import main as moto_main

    moto_main(argv)


class MotoProcess:
    """``moto_server`` in its own process on 127.0.0.1, with one bucket."""

    def __init__(self, fast_ranges: bool = False):
        os.environ.update(_AWS_ENV)
        self.port = _free_port()
        self.fast_ranges = fast_ranges
        self.endpoint = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, os.path.abspath(__file__), "_moto"] + (["--fast-ranges"] if fast_ranges else [])
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)

    def options(self, block_size: int | None = None) -> dict:
        opts = {"key": "testing", "secret": "testing", "use_listings_cache": False,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}
        if block_size:
            opts["default_block_size"] = block_size  # s3fs's multipart part size
        return opts

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
        except OSError:
            return 0

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- data


def llm_state_dict(size_gb: float, mixed: bool = True, seed: int = 0) -> dict:
    """A synthetic decoder-only state dict of about ``size_gb`` GB (1e9 bytes).

    LLaMA-like shapes: hidden h, MLP 2.75 h, vocab 32000, tied nothing. With
    ``mixed``: embeddings and attention in bf16, MLP in fp16, norms in fp32;
    otherwise everything fp16. Values ~ N(0, 0.02)."""
    import torch

    target = size_gb * 1e9
    hidden = 2048 if target >= 1e9 else 1024 if target >= 1.5e8 else 512
    inter = int(hidden * 2.75) // 64 * 64
    vocab = 32000 if target >= 1.5e8 else 8000
    layer_bytes = 2 * (4 * hidden * hidden + 3 * hidden * inter)
    layers = max(1, round((target - 2 * 2 * vocab * hidden) / layer_bytes))
    g = torch.Generator().manual_seed(seed)
    half_a = torch.bfloat16 if mixed else torch.float16
    norm = torch.float32 if mixed else torch.float16

    def rnd(shape, dtype):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    sd = {"model.embed_tokens.weight": rnd((vocab, hidden), half_a)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{n}_proj.weight"] = rnd((hidden, hidden), half_a)
        sd[p + "mlp.gate_proj.weight"] = rnd((inter, hidden), torch.float16)
        sd[p + "mlp.up_proj.weight"] = rnd((inter, hidden), torch.float16)
        sd[p + "mlp.down_proj.weight"] = rnd((hidden, inter), torch.float16)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=norm)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=norm)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=norm)
    sd["lm_head.weight"] = rnd((vocab, hidden), half_a)
    return sd


def nbytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


# --------------------------------------------------------------------------- (a) save


def _save_child(args) -> None:
    """Runs in a fresh process: build, warm up, reset the peak, save, report JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_dtdr

    sd = llm_state_dict(args.size)
    opts = None
    if args.target == "s3":
        import fsspec

        opts = json.loads(args.options)
        dest = f"s3://{BUCKET}/save-{args.codec}.dtdr"
        # import and connect the client before measuring: its fixed footprint is
        # not what streaming is about (reported separately)
        before_client = _status()["VmRSS"]
        fs, _ = fsspec.core.url_to_fs(dest, **opts)
        fs.pipe_file(f"{BUCKET}/warmup", b"x" * 1024)
        fs.rm_file(f"{BUCKET}/warmup")
        client_rss = _status()["VmRSS"] - before_client
    else:
        dest = os.path.join(args.workdir, f"save-{args.codec}.dtdr")
        client_rss = 0
    # exercise the codec once so that its one-time allocations (tables, thread pools) are in the baseline
    torch_dtdr.save({"w": torch.zeros(4096, dtype=torch.float16)}, os.path.join(args.workdir, "warm.dtdr"),
                    codec=args.codec)
    gc.collect()
    _malloc_trim()  # freed build temporaries must not hide in the baseline (they would be reused unseen)
    rss0 = _status()["VmRSS"]
    _reset_peak()
    t0 = time.perf_counter()
    torch_dtdr.save(sd, dest, codec=args.codec, storage_options=opts)
    dt = time.perf_counter() - t0
    st = _status()
    _malloc_trim()
    after_trim = _status()["VmRSS"] - rss0  # what of the growth was free heap memory kept by malloc
    if args.target == "s3":
        size = fs.size(dest)
        fs.rm_file(dest)
    else:
        size = os.path.getsize(dest)
        os.unlink(dest)
    print(json.dumps({"target": args.target, "codec": args.codec, "state_dict_bytes": nbytes(sd),
                      "file_bytes": size, "seconds": dt, "rss_before": rss0, "peak": st["VmHWM"],
                      "above": st["VmHWM"] - rss0, "end_above": st["VmRSS"] - rss0,
                      "end_above_after_trim": after_trim, "client_rss": client_rss}))


def bench_save(args, moto: MotoProcess, workdir: str) -> list[dict]:
    rows = []
    for target in args.targets.split(","):
        for codec in args.codecs.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "_save_child", "--size", str(args.size),
                   "--target", target, "--codec", codec, "--workdir", workdir,
                   "--options", json.dumps(moto.options(args.s3_block_mib * MiB if args.s3_block_mib else None)),
                   "--threads", str(args.threads or 0)]
            moto_rss0 = moto.rss()
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"save child failed: {target} {codec}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["moto_rss_growth"] = moto.rss() - moto_rss0
            rows.append(row)
            ok = row["above"] <= BAR_MIB * MiB
            print(f"  save {target:5s} {codec:6s}: {row['state_dict_bytes'] / 1e9:.2f} GB state dict -> "
                  f"{row['file_bytes'] / 1e9:.2f} GB file in {row['seconds']:.1f} s "
                  f"({row['state_dict_bytes'] / row['seconds'] / 1e6:.0f} MB/s); peak RSS above the state dict "
                  f"{row['above'] / MiB:.0f} MiB [{'PASS' if ok else 'FAIL'} <= {BAR_MIB} MiB] (at the end "
                  f"{row['end_above'] / MiB:.0f} MiB, {row['end_above_after_trim'] / MiB:.0f} MiB after malloc_trim)"
                  + (f"; S3 client warm-up {row['client_rss'] / MiB:.0f} MiB (not counted)" if target == "s3" else ""),
                  flush=True)
    return rows


# --------------------------------------------------------------------------- (b) load


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_load(args, moto: MotoProcess, workdir: str) -> dict:
    import fsspec
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    import torch_dtdr
    from torch_dtdr import api
    from torch_dtdr.storage import open_source

    opts = moto.options()
    fs = fsspec.filesystem("s3", **opts)
    sd = llm_state_dict(args.load_size, mixed=False, seed=1)
    raw = nbytes(sd)
    d_url, s_url = f"s3://{BUCKET}/load.dtdr", f"s3://{BUCKET}/load.safetensors"
    local = os.path.join(workdir, "load.dtdr")
    t0 = time.perf_counter()
    torch_dtdr.save(sd, d_url, codec="dtdr8", storage_options=opts)
    t_save = time.perf_counter() - t0
    blob = st_save(sd)
    fs.pipe_file(s_url, blob)
    del blob
    fs.get_file(d_url, local)
    d_size, s_size = fs.size(d_url), fs.size(s_url)
    print(f"  load: {raw / 1e9:.2f} GB fp16 state dict ({len(sd)} tensors); dtdr8 object {d_size / 1e9:.3f} GB "
          f"(saved in {t_save:.1f} s), safetensors object {s_size / 1e9:.3f} GB", flush=True)
    probe = {k: sd[k] for k in list(sd)[:3]}
    del sd
    gc.collect()

    def load_dtdr():
        return api.load(d_url, storage_options=opts)

    def load_st():
        return st_load(fs.cat_file(s_url))

    t_d, t_s = [], []
    peak: dict[str, list] = {"dtdr8": [], "safetensors": []}
    for r in range(args.repeat):
        order = [("dtdr8", load_dtdr, t_d), ("safetensors", load_st, t_s)]
        if r % 2:
            order.reverse()
        for name, fn, acc in order:
            gc.collect()
            _malloc_trim()
            before = _status()["VmRSS"]
            _reset_peak()
            t0 = time.perf_counter()
            obj = fn()
            acc.append(time.perf_counter() - t0)
            peak[name].append(_status()["VmHWM"] - before - raw)
            if r == 0:
                for k, v in probe.items():
                    err = ((obj[k].double() - v.double()).norm() / v.double().norm()).item()
                    assert err < (0.02 if fn is load_dtdr else 1e-12), (k, err)
            del obj
    md, ms = _median(t_d), _median(t_s)
    ratio = ms / md
    print(f"  load dtdr8 from S3:       median {md:.2f} s  {[round(x, 2) for x in t_d]}  "
          f"({raw / md / 1e6:.0f} MB/s of fp16 output)")
    print(f"  load safetensors from S3: median {ms:.2f} s  {[round(x, 2) for x in t_s]}  "
          f"({raw / ms / 1e6:.0f} MB/s)")
    print(f"  ratio safetensors / dtdr8 = {ratio:.2f}x  [{'PASS' if ratio > 1 else 'FAIL'}: dtdr8 "
          f"{'faster' if ratio > 1 else 'slower'}]", flush=True)
    pd, ps = _median(peak["dtdr8"]), _median(peak["safetensors"])
    print(f"  peak RSS above the loaded state dict (median): dtdr8 {pd / MiB:.0f} MiB, "
          f"safetensors {ps / MiB:.0f} MiB", flush=True)

    # diagnostics, one run each
    diag = {}
    gc.collect()
    t0 = time.perf_counter()
    n = len(fs.cat_file(d_url))
    diag["s3fs_cat_file_dtdr8_object_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n2 = len(fs.cat_file(s_url))
    diag["s3fs_cat_file_safetensors_object_s"] = time.perf_counter() - t0
    assert n == d_size and n2 == s_size
    gc.collect()
    with open_source(s_url, opts) as src:
        t0 = time.perf_counter()
        data = src.read_ranges([(0, src.size)])[0]
        obj = st_load(data)
        diag["safetensors_via_dtdr_read_ranges_s"] = time.perf_counter() - t0
        del data, obj
    gc.collect()
    t0 = time.perf_counter()
    obj = api.load(local)
    diag["dtdr8_local_decode_s"] = time.perf_counter() - t0
    del obj
    for k, v in diag.items():
        print(f"    {k:38s} {v:.2f} s")
    fs.rm_file(d_url)
    fs.rm_file(s_url)
    return {"raw_bytes": raw, "dtdr8_bytes": d_size, "safetensors_bytes": s_size, "dtdr8_s": t_d,
            "safetensors_s": t_s, "ratio": ratio, "dtdr8_peak_above_bytes": peak["dtdr8"],
            "safetensors_peak_above_bytes": peak["safetensors"], **diag}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=2.0, help="streaming-save state dict, GB (default 2)")
    p.add_argument("--load-size", type=float, default=1.0, help="load benchmark fp16 state dict, GB (default 1)")
    p.add_argument("--codecs", default="dtdr8,dtdr", help="codecs of the save benchmark (default dtdr8,dtdr)")
    p.add_argument("--targets", default="local,s3", help="save targets (default local,s3)")
    p.add_argument("--repeat", type=int, default=3, help="load runs per format (median; default 3)")
    p.add_argument("--only", choices=("save", "load"), help="run one half only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--s3-block-mib", type=int, default=0,
                   help="s3fs part size for the save benchmark, MiB (default: s3fs's own, 50 MiB)")
    p.add_argument("--stock-moto", action="store_true",
                   help="serve ranged GETs with stock moto, which reads the whole object for every range "
                        "(default: patched to read only the range, as S3 does; see _moto_main)")
    p.add_argument("--json", help="write all figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="dtdr-remote-bench-")
    moto = MotoProcess(fast_ranges=not args.stock_moto)
    results: dict = {"args": vars(args)}
    try:
        import torch

        print(f"moto_server pid {moto.proc.pid} at {moto.endpoint} "
              f"({'stock: every ranged GET reads the whole object' if args.stock_moto else 'ranged GETs read only the range'}); "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; workdir {workdir}", flush=True)
        if args.only in (None, "save"):
            print("(a) streaming save: peak RSS above the state dict", flush=True)
            results["save"] = bench_save(args, moto, workdir)
        if args.only in (None, "load"):
            print("(b) load from S3: dtdr8 vs fp16 safetensors (same run)", flush=True)
            results["load"] = bench_load(args, moto, workdir)
    finally:
        moto.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    fails = [r for r in results.get("save", []) if r["above"] > BAR_MIB * MiB]
    if "load" in results and results["load"]["ratio"] <= 1:
        fails.append("load")
    return 1 if fails else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_moto":
        _moto_main(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_save_child":
        cp = argparse.ArgumentParser()
        cp.add_argument("_cmd")
        for a in ("--size", "--threads"):
            cp.add_argument(a, type=float if a == "--size" else int)
        for a in ("--target", "--codec", "--workdir", "--options"):
            cp.add_argument(a)
        _save_child(cp.parse_args())
        sys.exit(0)
    sys.exit(main())
