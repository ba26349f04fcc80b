"""Write tests/data/codecs/*.json: golden section bytes per codec configuration.

Each file holds a codec's parameters, a deterministic input, the sections the encoder wrote for it and
the values the decoder returned. tests/test_codec_golden.py decodes the stored sections and compares
with the stored values, in every later version. Run once per new configuration (never to rewrite an
existing file): ``python tests/data/make_codec_golden.py``.
"""

from __future__ import annotations

import base64
import json
import os
import sys

import torch

from torch_dtdr import codecs
from torch_dtdr.dtypes import dtype_name

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "codecs")

#: (file stem, codec name, codec parameters, dtype)
CONFIGURATIONS = [
    ("raw-float32", "raw", {}, torch.float32),
    ("raw-bfloat16", "raw", {}, torch.bfloat16),
    ("raw-int64", "raw", {}, torch.int64),
    ("dtdr-float32", "dtdr", {}, torch.float32),
    ("dtdr-bfloat16", "dtdr", {}, torch.bfloat16),
    ("dtdr-float16", "dtdr", {}, torch.float16),
    ("dtdr-float32-block256", "dtdr", {"block_size": 256}, torch.float32),
    ("dtdr8-float32", "dtdr8", {}, torch.float32),
    ("dtdr16-bfloat16", "dtdr16", {}, torch.bfloat16),
]
NUMEL = 1500


def golden_input(dtype: torch.dtype, n: int = NUMEL) -> torch.Tensor:
    """A deterministic input from arithmetic alone (no PRNG whose stream could change)."""
    i = torch.arange(n, dtype=torch.float64)
    x = torch.sin(i * 0.37) * 0.05 + torch.cos(i * 0.011) * 0.01
    x[::101] *= 30
    if dtype.is_floating_point:
        return x.to(dtype)
    return (x * 1e6).round().to(dtype)


def b64(data) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def main() -> int:
    os.makedirs(HERE, exist_ok=True)
    for stem, name, params, dtype in CONFIGURATIONS:
        path = os.path.join(HERE, stem + ".json")
        if os.path.exists(path):
            continue  # golden files are added, never rewritten
        codec = codecs.get(name, **params)
        x = golden_input(dtype)
        sections = codec.encode(x)
        decoded = codec.decode(sections, dtype, x.numel()).values
        doc = {"codec": codec.to_dict(), "dtype": dtype_name(dtype), "numel": x.numel(),
               "input": b64(x.view(torch.uint8).numpy()),
               "sections": {k: b64(v) for k, v in sections.items()},
               "decoded": b64(decoded.contiguous().view(torch.uint8).numpy())}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
