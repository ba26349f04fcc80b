"""Reading a few rows of a large tensor: ``torch_dtdr.open(...).get_slice(name)[rows]`` against
safetensors' ``safe_open(...).get_slice(name)[rows]``, in the same run.

For each transform codec the slice is read twice: decoding only the units that hold it (blocks for
``dtdr8``/``dtdr16``, residual frames for ``dtdr``: the default), and decoding the whole segments that
hold it (the former behaviour, forced with ``torch_dtdr.lazy.MAX_UNIT_SPANS = -1``). Prints the bytes read
(DTDR: counted by the storage source) and the median time of --repeat fresh opens, and the ratio to
safetensors.

    python benchmarks/slice_read.py                   # 4096 x 4096 float32, rows 2000:2004
    python benchmarks/slice_read.py --rows 64 --repeat 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _median_time(read, repeat: int) -> tuple[float, int]:
    times, read_bytes = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        read_bytes = read()
        times.append(time.perf_counter() - started)
    return statistics.median(times), read_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the tensor is SIZE x SIZE float32")
    parser.add_argument("--rows", type=int, default=4, help="rows read, from the middle")
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    import torch_dtdr
    from torch_dtdr import lazy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tensor = torch.randn(args.size, args.size)
    first = args.size // 2
    rows = slice(first, first + args.rows)
    with tempfile.TemporaryDirectory() as folder:
        st_path = os.path.join(folder, "m.safetensors")
        save_file({"w": tensor}, st_path)

        def read_safetensors() -> int:
            with safe_open(st_path, "pt") as f:
                f.get_slice("w")[rows]
            return args.rows * args.size * 4

        st_time, _ = _median_time(read_safetensors, args.repeat)
        print(f"{args.size} x {args.size} float32, rows {rows.start}:{rows.stop}, median of {args.repeat}")
        print(f"{'reader':<32}{'bytes read':>14}{'of file':>10}{'median ms':>11}{'x safetensors':>15}")
        print(f"{'safetensors':<32}{args.rows * args.size * 4:>14}{'':>10}{1000 * st_time:>11.2f}{1.0:>15.2f}")
        default_spans = lazy.MAX_UNIT_SPANS
        for codec in ("dtdr", "dtdr8", "dtdr16"):
            path = os.path.join(folder, f"{codec}.dtdr")
            torch_dtdr.save({"w": tensor}, path, codec=codec)
            size = os.path.getsize(path)

            def read_dtdr() -> int:
                with torch_dtdr.open(path) as f:
                    before = f.bytes_read
                    f.get_slice("w")[rows]
                    return f.bytes_read - before

            for label, spans in (("units", default_spans), ("whole segments", -1)):
                lazy.MAX_UNIT_SPANS = spans
                try:
                    seconds, read_bytes = _median_time(read_dtdr, args.repeat)
                finally:
                    lazy.MAX_UNIT_SPANS = default_spans
                print(f"{codec + ', ' + label:<32}{read_bytes:>14}{100 * read_bytes / size:>9.2f}%"
                      f"{1000 * seconds:>11.2f}{seconds / st_time:>15.2f}")


if __name__ == "__main__":
    main()
