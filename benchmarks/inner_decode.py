"""CPU cost of the archive level's inner Reed-Solomon decoding, per MB of damaged chunks.

The reader decodes the inner code of each damaged 4 KiB chunk on its own
(``InnerCode.decode`` of one chunk and its parity), so the script does the
same over ``--chunks`` chunks with byte errors at several rates (and chunks of
random bytes, as an overwritten file has), for the compiled decoder with its
AVX2 and its portable kernels and for the numpy reference. Before timing, each
damaged set is checked to decode identically with all of them. It prints the
median process CPU time over ``--repeats`` runs in ms per MB of damaged chunks,
and the ratio to a clean ``load`` of an archive file (CPU ms per MB of file,
torch on one thread): the cost bounds of docs/security.md allow 10 x.

    python benchmarks/inner_decode.py [--chunks 300] [--repeats 5] [--nsym 32]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from torch_dtdr import api  # noqa: E402
from torch_dtdr.integrity import native  # noqa: E402
from torch_dtdr.integrity.inner import InnerCode  # noqa: E402

CHUNK = 4096
RATES = [("3e-4", 3e-4), ("1e-2", 1e-2), ("3e-2", 3e-2), ("random bytes", None)]


def damaged_chunks(ic: InnerCode, n: int, rate, rng) -> list[tuple[bytes, bytes]]:
    data = rng.integers(0, 256, n * CHUNK, dtype=np.uint8)
    parity = ic.encode(data).reshape(-1)
    if rate is None:
        data, parity = rng.integers(0, 256, data.size, dtype=np.uint8), rng.integers(0, 256, parity.size,
                                                                                       dtype=np.uint8)
    else:
        for arr in (data, parity):
            hit = rng.random(arr.size) < rate
            arr[hit] ^= rng.integers(1, 256, int(hit.sum()), dtype=np.uint8)
    return [(data[i * CHUNK:(i + 1) * CHUNK].tobytes(), parity[i * ic.parity_size:(i + 1) * ic.parity_size].tobytes())
            for i in range(n)]


def cpu_ms_per_mb(fn, nbytes: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3 / (nbytes / 1e6)


def clean_load_ms_per_mb(repeats: int) -> float:
    buf = io.BytesIO()
    torch.manual_seed(0)
    api.save({"w": torch.randn(2_000_000)}, buf, parity="archive")
    data = buf.getvalue()
    return cpu_ms_per_mb(lambda: api.load(io.BytesIO(data)), len(data), repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nsym", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ic = InnerCode(CHUNK, args.nsym)
    compiled = native.module()
    decoders = []
    if compiled is not None:
        if compiled.set_simd(True):
            decoders.append(("compiled, AVX2", True))
        decoders.append(("compiled, portable", False))
    decoders.append(("numpy reference", None))

    def run(chunks, simd):
        if simd is None:
            with native.forced("reference"):
                return [ic.decode(c, p) for c, p in chunks]
        compiled.set_simd(simd)
        return [ic.decode(c, p) for c, p in chunks]

    clean = clean_load_ms_per_mb(args.repeats)
    print(f"clean archive load: {clean:.1f} ms CPU per MB (torch on 1 thread)")
    print(f"inner decode, {args.chunks} chunks of {CHUNK} bytes, nsym {args.nsym}: ms CPU per MB of damaged chunks "
          f"(x clean load), median of {args.repeats}")
    print(f"{'byte errors':>14} " + " ".join(f"{name:>22}" for name, _ in decoders))
    rng = np.random.default_rng(1)
    for label, rate in RATES:
        chunks = damaged_chunks(ic, args.chunks, rate, rng)
        results = [run(chunks, simd) for _name, simd in decoders]
        for other in results[1:]:
            assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(results[0], other))
        cells = []
        for _name, simd in decoders:
            ms = cpu_ms_per_mb(lambda simd=simd: run(chunks, simd), args.chunks * CHUNK, args.repeats)
            cells.append(f"{ms:8.1f} ({ms / clean:5.1f} x)")
        print(f"{label:>14} " + " ".join(f"{c:>22}" for c in cells))
    if compiled is not None:
        compiled.set_simd(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
