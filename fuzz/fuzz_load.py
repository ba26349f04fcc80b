"""Fuzz the DTDR decoder (``torch_dtdr.decoding.load_file``, what ``torch_dtdr.api.load`` runs for a DTDR file) and ``torch_dtdr.open`` with arbitrary bytes.

With atheris (coverage-guided, libFuzzer flags)::

    python fuzz/fuzz_load.py -max_total_time=60 -timeout=10 CORPUS_DIR [SEED_DIR...]

Without it, or with ``--pure``, a pure-Python mutation loop over the same
seeds and mutators runs for ``--seconds`` (default 60)::

    python fuzz/fuzz_load.py --pure --seconds 60 [SEED_FILE_OR_DIR...]

An input is either a file as it is, or, when it starts with ``MAGIC_MUTATE``,
a recipe: the rest of the input picks a seed file and one of
``fuzz/craft.py``'s structural mutations (index fields changed, sizes
swapped, records rewritten, section bytes replaced with valid checksums...),
which reach far deeper than byte flips behind the container's checksums.

Every :class:`torch_dtdr.errors.DTDRError` is an expected answer to a hostile
file; any other exception is a finding (atheris saves it as ``crash-*``; the
pure loop writes ``fuzz/crashes/crash-<sha1>``). See fuzz/README.md.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Heavy dependencies first, outside atheris' instrumentation.
import numpy  # noqa: E402,F401
import torch  # noqa: E402
import zstandard  # noqa: E402,F401

torch.set_num_threads(1)

try:
    import atheris
except ImportError:  # the pure-Python loop below still works
    atheris = None

PURE = atheris is None or any(a in sys.argv for a in ("--pure", "--make-seeds", "--replay"))

if atheris is not None and not PURE:
    with atheris.instrument_imports(include=["torch_dtdr", "fuzz"]):
        import torch_dtdr  # noqa: F401 - instrumented here, exercised through craft
        from torch_dtdr.errors import DamageWarning, DTDRError
        from fuzz import craft
else:
    import torch_dtdr  # noqa: F401
    from torch_dtdr.errors import DamageWarning, DTDRError
    from fuzz import craft

MAGIC_MUTATE = b"\x00MUTATE\x00"

#: Findings already reported and awaiting a fix, as (exception type name, message
#: substring). Skipped only when DTDR_FUZZ_SKIP_KNOWN=1 (to look for *other*
#: findings meanwhile); CI never sets it. Remove an entry once it is fixed.
KNOWN_ISSUES: list[tuple[str, str]] = [
    # e.g. ("RuntimeError", "device string"): the unknown-device finding, fixed by DeviceError
]
_SKIP_KNOWN = os.environ.get("DTDR_FUZZ_SKIP_KNOWN") == "1"


def _known(e: BaseException) -> bool:
    return _SKIP_KNOWN and any(type(e).__name__ == n and m in str(e) for n, m in KNOWN_ISSUES)
_SEEDS: list[bytes] = []


def _seeds() -> list[bytes]:
    """Valid files the structural mutations start from (built once)."""
    if not _SEEDS:
        _SEEDS.extend(craft.seed_files())
    return _SEEDS


def run_one(data: bytes) -> None:
    """Load ``data`` both ways; typed errors are fine, anything else propagates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        for fn in craft.ENTRY_POINTS:
            try:
                fn(data)
            except DTDRError:
                pass
            except Exception as e:  # noqa: BLE001
                if not _known(e):
                    raise


def decode_input(data: bytes) -> bytes:
    """The file an input stands for (itself, or a structural mutation recipe)."""
    if not data.startswith(MAGIC_MUTATE):
        return data
    rest = data[len(MAGIC_MUTATE):]
    seeds = _seeds()
    seed = seeds[rest[0] % len(seeds)] if rest else seeds[0]
    names = sorted(craft.MUTATIONS)
    name = names[rest[1] % len(names)] if len(rest) > 1 else names[0]
    rng = random.Random(int.from_bytes(hashlib.sha1(rest[2:]).digest()[:8], "little"))
    try:
        return craft.MUTATIONS[name](seed, rng)
    except Exception:  # noqa: BLE001 - a mutator that does not apply to this seed: not a finding
        return seed


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    run_one(decode_input(data))


def seed_inputs() -> list[bytes]:
    """Recipes for the structured mode, one per (seed, mutation)."""
    out = []
    for s in range(len(_seeds())):
        for m in range(len(craft.MUTATIONS)):
            out.append(MAGIC_MUTATE + bytes([s, m]) + b"seed")
    return out


def write_seeds(folder: str) -> int:
    """Fill ``folder`` with the starting corpus: the golden files, the hostile
    corpus, fuzz regressions, small files saved here and mutation recipes."""
    import glob
    import shutil

    os.makedirs(folder, exist_ok=True)
    n = 0
    data_dir = os.path.join(ROOT, "tests", "data")
    for pattern in ("golden_v1_*.dtdr", os.path.join("hostile", "*.dtdr"), os.path.join("hostile", "fuzz-*")):
        for path in sorted(glob.glob(os.path.join(data_dir, pattern))):
            if os.path.getsize(path) <= 1 << 20:
                shutil.copy(path, os.path.join(folder, "seed-" + os.path.basename(path)))
                n += 1
    for i, blob in enumerate(_seeds() + seed_inputs()):
        with open(os.path.join(folder, f"seed-made-{i:03d}"), "wb") as f:
            f.write(blob)
        n += 1
    return n


def _report(data: bytes, exc: BaseException, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "crash-" + hashlib.sha1(data).hexdigest())
    with open(path, "wb") as f:
        f.write(data)
    return path


def pure_main(argv: list[str]) -> int:
    """The fallback fuzzer: random structural and byte mutations of the seeds
    for a bounded time; exits 1 on the first finding."""
    import argparse
    import glob
    import traceback

    ap = argparse.ArgumentParser()
    ap.add_argument("--pure", action="store_true")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--crash-dir", default=os.path.join(ROOT, "fuzz", "crashes"))
    ap.add_argument("inputs", nargs="*")
    args = ap.parse_args(argv)
    files: list[bytes] = []
    for p in args.inputs:
        for path in sorted(glob.glob(os.path.join(p, "*"))) if os.path.isdir(p) else [p]:
            with open(path, "rb") as f:
                files.append(f.read())
    rng = random.Random(args.seed)
    valid = _seeds() + [f for f in files if f.startswith(b"\x89DTDR") and len(f) <= 1 << 20]
    pool = files + valid
    deadline = time.monotonic() + args.seconds
    runs = 0
    print(f"pure-Python fuzzing for {args.seconds:.0f} s, seed {args.seed}, {len(pool)} inputs", flush=True)
    while time.monotonic() < deadline:
        r = rng.random()
        try:
            if r < 0.6 and valid:
                _name, data = craft.mutate(rng.choice(valid), rng)
            elif pool:
                data = craft.m_flip(rng.choice(pool), rng) if rng.random() < 0.5 else craft.m_smash(
                    rng.choice(pool) or b"\0", rng)
            else:
                data = rng.randbytes(rng.randrange(1, 4096))
        except Exception:  # noqa: BLE001 - a mutator may not apply to this seed
            continue
        runs += 1
        try:
            run_one(data)
        except Exception as e:  # noqa: BLE001 - a finding
            path = _report(data, e, args.crash_dir)
            traceback.print_exc()
            print(f"FINDING after {runs} runs: {type(e).__name__}: {e} -> {path}", flush=True)
            return 1
    print(f"done: {runs} runs, no finding", flush=True)
    return 0


def replay(paths: list[str]) -> int:
    """Run every input (files, or every file of folders) once; for the sanitizer run."""
    files = []
    for p in paths:
        files += [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
    for path in files:
        with open(path, "rb") as f:
            run_one(decode_input(f.read()))
    print(f"replayed {len(files)} inputs: no finding", flush=True)
    return 0


def main() -> int:
    if "--replay" in sys.argv:
        return replay(sys.argv[sys.argv.index("--replay") + 1 :])
    if "--make-seeds" in sys.argv:
        folder = sys.argv[sys.argv.index("--make-seeds") + 1]
        print(f"{write_seeds(folder)} seed inputs in {folder}")
        return 0
    if PURE:
        if atheris is None and "--pure" not in sys.argv:
            print("atheris is not importable: running the pure-Python mutation loop", file=sys.stderr)
        argv = []
        for a in sys.argv[1:]:
            if a.startswith("-max_total_time="):  # accept the libFuzzer spelling too
                argv += ["--seconds", a.split("=", 1)[1]]
            elif not (a.startswith("-") and not a.startswith("--") and "=" in a):  # other libFuzzer flags
                argv.append(a)
        return pure_main(argv)
    _seeds()  # build the mutation seeds before fuzzing starts
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
