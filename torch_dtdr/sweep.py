"""Robustness sweeps: how each checkpoint format survives random byte damage.

For every (format, corruption fraction, seed) the state dict is encoded once in
that format, a fresh copy is damaged with :func:`torch_dtdr.faults.corrupt`
(``mode="replace"``: each byte is replaced with probability ``fraction``),
loaded back, and every tensor is compared with the original::

    from torch_dtdr.sweep import sweep
    rows = sweep("model.safetensors", fractions=[0, 1e-6, 1e-4, 1e-2], seeds=5,
                 formats=["fp16-safetensors", "dtdr", "dtdr8"], out="sweep-out")

or ``dtdr sweep model.safetensors --out sweep-out``. The output folder gets
``sweep.csv`` (one row per run, appended as runs finish, so an interrupted
sweep resumes where it stopped), ``summary.md`` (one table per format) and
``sweep.png``.

Metrics (all computed in float64, against the ORIGINAL tensors):

* a tensor is *valid* (counted in ``tensors_finite``) when it came back, with
  the original shape, and every value is finite; integer tensors are valid
  when they came back with their shape (``tensors_float_finite`` counts the
  valid floating-point tensors alone);
* ``tensors_exact`` / ``tensors_repaired`` / ``tensors_degraded`` split the
  valid tensors: bit-identical to the format's own clean load (for lossy
  formats such as fp16 of an fp32 model, or ``dtdr8``, that clean load is the
  best the format can do) with no repair / bit-identical after a repair the
  DTDR report names / valid but not bit-identical;
* cosine similarity and relative L2 error per float tensor; a cosine is never
  above 1 (computed in float64, then clamped), two all-zero tensors have
  cosine 1 and relative L2 0;
* means are given twice: over ALL float tensors, where an invalid tensor
  counts as cosine 0 and relative L2 ``inf`` (``mean_cosine``,
  ``mean_rel_l2``, ``max_rel_l2``), and over the valid float tensors only
  (``*_finite``), so that dropping broken tensors can never look like
  recovery.

Any exception other than a :class:`~torch_dtdr.errors.DTDRError` from
``torch_dtdr.load`` is a bug in this library: it is recorded in the ``error``
column (never hidden), as is a DTDR report that calls a tensor exact or
repaired when its bytes differ. Failures of the other formats' loaders are
the formats' own (``container_ok=False``, ``container_error``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_FORMATS",
    "FORMATS",
    "COLUMNS",
    "sweep",
    "load_state_dict_any",
    "compare",
    "write_csv",
    "read_csv",
    "write_markdown",
    "plot",
    "model_name",
]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
DEFAULT_FORMATS: tuple[str, ...] = ("fp16-safetensors", "dtdr", "dtdr8", "dtdr16")

#: CSV columns, in order.
COLUMNS: tuple[str, ...] = (
    "format", "fraction", "seed",
    "container_ok", "tensors_total", "tensors_float", "tensors_finite", "tensors_float_finite",
    "tensors_exact", "tensors_repaired",
    "tensors_degraded", "tensors_lost",
    "mean_cosine", "mean_rel_l2", "max_rel_l2",
    "mean_cosine_finite", "mean_rel_l2_finite", "max_rel_l2_finite", "min_cosine_finite",
    "bytes_on_disk", "bytes_damaged", "load_seconds",
    "report_exact", "report_repaired", "report_degraded", "report_lost",
    "container_error", "error",
)
_INT_COLUMNS = {"seed", "tensors_total", "tensors_float", "tensors_finite", "tensors_float_finite",
                "tensors_exact", "tensors_repaired",
                "tensors_degraded", "tensors_lost", "bytes_on_disk", "bytes_damaged",
                "report_exact", "report_repaired", "report_degraded", "report_lost"}
_FLOAT_COLUMNS = {"fraction", "mean_cosine", "mean_rel_l2", "max_rel_l2", "mean_cosine_finite",
                  "mean_rel_l2_finite", "max_rel_l2_finite", "min_cosine_finite", "load_seconds"}
_BOOL_COLUMNS = {"container_ok"}

_META_FILE = "sweep.json"
_WORK_DIR = ".sweep-work"


# --------------------------------------------------------------------------- input


def _flatten_tensors(obj, prefix: str = "", out: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a (possibly nested) dict/list, named by their dotted path."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i), out)
    return out


def _kind_of(name: str, head: bytes) -> str:
    lower = name.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith(".dtdr"):
        return "dtdr"
    if lower.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return "torch"
    from .kinds import head_kind

    kind = head_kind(head)
    if kind is None:
        raise ValueError(f"cannot tell what kind of checkpoint {name!r} is (not safetensors, torch or DTDR)")
    return kind


def _load_one(fs, p: str, url: str, storage_options) -> dict[str, torch.Tensor]:
    from .storage import is_local_fs, open_read

    local = is_local_fs(fs)
    with open_read(url, storage_options) as f:
        head = f.read(16)
    kind = _kind_of(p, head)
    if kind == "dtdr":
        from .decoding import load_file

        return _flatten_tensors(load_file(url, errors="strict", storage_options=storage_options))
    if kind == "safetensors":
        if local:
            from safetensors.torch import load_file

            return dict(load_file(p))
        from safetensors.torch import load as st_load

        return dict(st_load(fs.cat_file(p)))
    # torch: weights_only=True only; never unpickle arbitrary objects
    src: Any = p if local else io.BytesIO(fs.cat_file(p))
    obj = torch.load(src, map_location="cpu", weights_only=True)
    sd = _flatten_tensors(obj)
    if not sd:
        raise ValueError(f"{url!r} holds no tensors")
    return sd


def load_state_dict_any(path, storage_options: Mapping | None = None) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a safetensors file, a torch ``.pt`` /
    ``.bin`` state dict (``torch.load(weights_only=True)`` only), a ``.dtdr``
    file, or a Hugging Face model folder (``model.safetensors``, sharded
    ``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded
    index). ``path`` may be an fsspec URL. Tensors are returned as separate,
    contiguous CPU tensors (tied weights become copies)."""
    from .storage import url_to_fs

    url = os.fspath(path)
    fs, p = url_to_fs(url, dict(storage_options or {}))
    if not fs.exists(p):
        from .errors import CheckpointNotFoundError

        raise CheckpointNotFoundError("no such checkpoint", file=url)
    sep = "/"
    if fs.isdir(p):
        p = p.rstrip("/")

        def child(n):
            return f"{p}{sep}{n}"

        def child_url(n):
            return url.rstrip("/") + "/" + n

        sd: dict[str, torch.Tensor] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if fs.exists(child(index_name)):
                index = json.loads(fs.cat_file(child(index_name)))
                shards = sorted(set(index["weight_map"].values()))
                for shard in shards:
                    sd.update(_load_one(fs, child(shard), child_url(shard), storage_options))
                missing = set(index["weight_map"]) - set(sd)
                if missing:
                    raise ValueError(f"{url!r}: index names tensors no shard holds: {sorted(missing)[:5]}")
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if fs.exists(child(single)):
                    sd = _load_one(fs, child(single), child_url(single), storage_options)
                    break
            else:
                names = sorted(fs.ls(p, detail=False))
                shards = [n for n in names if n.endswith(".safetensors")]
                if not shards:
                    raise ValueError(f"{url!r} is a folder without model.safetensors, pytorch_model.bin "
                                     "or an index of shards")
                for n in shards:
                    base = n.rsplit("/", 1)[-1]
                    sd.update(_load_one(fs, n, child_url(base), storage_options))
    else:
        sd = _load_one(fs, p, url, storage_options)
    # separate storages: safetensors refuses shared tensors, and the sweep must not alias
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


# --------------------------------------------------------------------------- metrics


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    # numpy on uint8 views: torch's uint8 comparisons crawl when its thread pool is contended
    av = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    bv = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return bool(np.array_equal(av, bv))


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


def tensor_metrics(original: torch.Tensor, loaded: torch.Tensor | None) -> dict:
    """Metrics of one tensor: ``valid``, ``cosine``, ``rel_l2`` (float tensors;
    ``None`` for others). Computed in float64; cosine clamped to [-1, 1]; two
    all-zero tensors have cosine 1 and rel. L2 0; an invalid tensor has cosine
    0 and rel. L2 inf."""
    floating = _is_float(original)
    if loaded is None or tuple(loaded.shape) != tuple(original.shape):
        return {"float": floating, "valid": False, "cosine": 0.0 if floating else None,
                "rel_l2": math.inf if floating else None}
    if not floating:
        return {"float": False, "valid": True, "cosine": None, "rel_l2": None}
    b = loaded.detach().to("cpu")
    if not _is_float(b) and not b.dtype.is_signed and b.dtype != torch.uint8:
        b = b.to(torch.int64)
    if original.dtype.is_complex or b.dtype.is_complex:
        a = torch.view_as_real(original.to(torch.complex128)).reshape(-1)
        b = torch.view_as_real(b.to(torch.complex128)).reshape(-1)
    else:
        a = original.reshape(-1).to(torch.float64)
        b = b.reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(b).all()):
        return {"float": True, "valid": False, "cosine": 0.0, "rel_l2": math.inf}
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    if na == 0.0 and nb == 0.0:
        cos = 1.0
    elif na == 0.0 or nb == 0.0:
        cos = 0.0
    else:
        # 1 - |u - v|^2 / 2 for the unit vectors: the same value as a.b / (|a| |b|), but exact for equal
        # vectors and accurate near 1, where a.b / (|a| |b|) rounds either side of 1
        d = float(torch.linalg.vector_norm(a / na - b / nb))
        cos = max(-1.0, min(1.0, 1.0 - 0.5 * d * d))
    if na == 0.0:
        rel = 0.0 if nb == 0.0 else math.inf
    else:
        rel = float(torch.linalg.vector_norm(a - b)) / na
    return {"float": True, "valid": True, "cosine": cos, "rel_l2": rel}


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else math.nan


def compare(original: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor | None] | None,
            reference: Mapping[str, torch.Tensor] | None = None,
            repaired: Iterable[str] = ()) -> dict:
    """Compare a loaded state dict with the original, tensor by tensor.

    ``loaded`` may miss names or hold ``None`` (lost tensors), or be ``None``
    altogether (the container did not open). ``reference`` is what a clean
    load of the same format gives (defaults to ``original``): bit-exactness is
    judged against it, accuracy (cosine, rel. L2) against ``original``.
    ``repaired`` names tensors a DTDR report says were repaired; bit-identical
    ones among them count as ``tensors_repaired`` rather than
    ``tensors_exact``. Returns the metric columns of :data:`COLUMNS`.
    """
    reference = original if reference is None else reference
    loaded = {} if loaded is None else loaded
    repaired = set(repaired)
    n_float = n_valid = n_float_valid = n_exact = n_rep = n_deg = 0
    cos_all, rel_all, cos_fin, rel_fin = [], [], [], []
    for name, orig in original.items():
        got = loaded.get(name)
        m = tensor_metrics(orig, got)
        if m["float"]:
            n_float += 1
            cos_all.append(m["cosine"])
            rel_all.append(m["rel_l2"])
        if not m["valid"]:
            continue
        n_valid += 1
        if m["float"]:
            n_float_valid += 1
            cos_fin.append(m["cosine"])
            rel_fin.append(m["rel_l2"])
        ref = reference.get(name)
        if ref is not None and _bits_equal(ref, got):
            if name in repaired:
                n_rep += 1
            else:
                n_exact += 1
        else:
            n_deg += 1
    total = len(original)
    return {
        "tensors_total": total,
        "tensors_float": n_float,
        "tensors_finite": n_valid,
        "tensors_float_finite": n_float_valid,
        "tensors_exact": n_exact,
        "tensors_repaired": n_rep,
        "tensors_degraded": n_deg,
        "tensors_lost": total - n_valid,
        "mean_cosine": _mean(cos_all),
        "mean_rel_l2": _mean(rel_all) if not any(math.isinf(r) for r in rel_all) else math.inf,
        "max_rel_l2": max(rel_all) if rel_all else math.nan,
        "mean_cosine_finite": _mean(cos_fin),
        "mean_rel_l2_finite": _mean(rel_fin),
        "max_rel_l2_finite": max(rel_fin) if rel_fin else math.nan,
        "min_cosine_finite": min(cos_fin) if cos_fin else math.nan,
    }


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """How to write a state dict in one format and read it back.

    ``load`` returns the loaded ``{name: tensor | None}`` and, for DTDR, the
    :class:`~torch_dtdr.report.Report`; it raises for a container that does
    not open. ``ours`` marks formats whose loader is this library: only a
    :class:`~torch_dtdr.errors.DTDRError` is an expected failure there.
    """

    name: str
    suffix: str
    save: Callable[[dict, str], None]
    load: Callable[[str], tuple[dict, Any]]
    ours: bool = False
    description: str = ""


def _cast(sd: Mapping[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(sd)
    return {k: (v.to(dtype) if v.dtype.is_floating_point else v).contiguous() for k, v in sd.items()}


def _st_format(name: str, dtype) -> Format:
    def save(sd, path):
        from safetensors.torch import save_file

        save_file(_cast(sd, dtype), path)

    def load(path):
        from safetensors.torch import load as st_load

        from .storage import read_bytes

        return dict(st_load(read_bytes(path))), None  # fully materialised, as a verifying format must be

    return Format(name, ".safetensors", save, load, description=f"safetensors, floats cast to {dtype}")


def _torch_format(name: str, dtype) -> Format:
    def save(sd, path):
        torch.save(_cast(sd, dtype), path)

    def load(path):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        return _flatten_tensors(obj), None

    what = "as saved" if dtype is None else f"floats cast to {dtype}"
    return Format(name, ".pt", save, load, description=f"torch.save, {what}; torch.load(weights_only=True)")


def _dtdr_format(name: str, codec: str, parity: str) -> Format:
    def save(sd, path):
        from .api import save as dtdr_save

        dtdr_save(sd, path, codec=codec, parity=parity)

    def load(path):
        from .decoding import load_file as dtdr_load
        from .errors import DamageWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            obj, rep = dtdr_load(path, report=True, partial=True)
        if not isinstance(obj, Mapping):
            raise TypeError(f"torch_dtdr.load returned {type(obj).__name__}, expected the saved dict")
        return dict(obj), rep

    return Format(name, ".dtdr", save, load, ours=True, description=f"torch_dtdr codec={codec!r}, parity={parity!r}")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        _st_format("fp16-safetensors", torch.float16),
        _st_format("bf16-safetensors", torch.bfloat16),
        _st_format("fp32-safetensors", torch.float32),
        _torch_format("torch", None),
        _torch_format("torch-fp16", torch.float16),
        _dtdr_format("dtdr", "dtdr", "default"),
        _dtdr_format("dtdr8", "dtdr8", "default"),
        _dtdr_format("dtdr16", "dtdr16", "default"),
        _dtdr_format("dtdr-noparity", "dtdr", "off"),
        _dtdr_format("dtdr8-noparity", "dtdr8", "off"),
        _dtdr_format("dtdr16-noparity", "dtdr16", "off"),
        _dtdr_format("dtdr-strong", "dtdr", "strong"),
        _dtdr_format("dtdr8-strong", "dtdr8", "strong"),
        _dtdr_format("dtdr16-strong", "dtdr16", "strong"),
        _dtdr_format("dtdr-archive", "dtdr", "archive"),
        _dtdr_format("dtdr8-archive", "dtdr8", "archive"),
        _dtdr_format("dtdr16-archive", "dtdr16", "archive"),
    ]
}


def _get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        from .errors import ArgumentError

        raise ArgumentError(f"unknown format {name!r}; known: {', '.join(FORMATS)}", field="formats") from None


# --------------------------------------------------------------------------- one run


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\r", " ")
    return text[:300]


_cache: dict[str, dict] = {}


def _cached_load(path: str) -> dict[str, torch.Tensor]:
    if path not in _cache:
        from safetensors.torch import load_file

        _cache[path] = load_file(path)
    return _cache[path]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def _run_task(task: dict) -> dict:
    """One (format, fraction, seed): damage a fresh copy, load it, measure."""
    from .errors import DTDRError
    from .faults import corrupt

    fmt = _get_format(task["format"])
    original = _cached_load(task["original"])
    reference = _cached_load(task["reference"])
    row: dict[str, Any] = {"format": fmt.name, "fraction": float(task["fraction"]), "seed": int(task["seed"]),
                           "bytes_on_disk": os.path.getsize(task["pristine"]), "container_error": "", "error": ""}
    tmpdir = tempfile.mkdtemp(prefix="run-", dir=task["tmp"])
    try:
        damaged = os.path.join(tmpdir, "damaged" + fmt.suffix)
        rec = corrupt(task["pristine"], mode="replace", fraction=float(task["fraction"]), seed=int(task["seed"]),
                      out=damaged)
        row["bytes_damaged"] = rec.n_bytes_differing
        loaded, report = None, None
        t0 = time.perf_counter()
        try:
            loaded, report = fmt.load(damaged)
            row["container_ok"] = True
        except Exception as exc:  # noqa: BLE001 - classified below, never hidden
            row["container_ok"] = False
            if fmt.ours and not isinstance(exc, DTDRError):
                row["error"] = "unexpected " + _short(exc)
            else:
                row["container_error"] = _short(exc)
        row["load_seconds"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    repaired: set[str] = set()
    row.update({"report_exact": "", "report_repaired": "", "report_degraded": "", "report_lost": ""})
    if report is not None:
        counts = report.counts()
        row.update({f"report_{k}": v for k, v in counts.items()})
        repaired = {t.name for t in report.tensors if t.status == "repaired"}
    row.update(compare(original, loaded, reference, repaired))
    if report is not None and loaded is not None:
        # a report that calls a tensor exact/repaired whose bytes differ is silent corruption: a bug
        liars = [t.name for t in report.tensors
                 if t.status in ("exact", "repaired")
                 and (loaded.get(t.name) is None or reference.get(t.name) is None
                      or not _bits_equal(reference[t.name], loaded[t.name]))]
        if liars:
            msg = f"report says exact/repaired but bytes differ: {len(liars)} tensor(s), e.g. {liars[0]!r}"
            row["error"] = (row["error"] + "; " if row["error"] else "") + msg
    return row


# --------------------------------------------------------------------------- CSV


def _fmt_value(col: str, v) -> str:
    if v is None or v == "":
        return ""
    if col in _BOOL_COLUMNS:
        return "true" if v else "false"
    if col in _FLOAT_COLUMNS:
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return str(v)


def _parse_value(col: str, s: str):
    if col in _BOOL_COLUMNS:
        return s.strip().lower() == "true"
    if s == "":
        return "" if col not in _FLOAT_COLUMNS else math.nan
    if col in _INT_COLUMNS:
        return int(s)
    if col in _FLOAT_COLUMNS:
        return float(s)
    return s


def write_csv(rows: Sequence[Mapping], path) -> None:
    """Write rows (atomically) with the columns of :data:`COLUMNS`."""
    from .storage import write_text_atomic

    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_fmt_value(c, r.get(c, "")) for c in COLUMNS])
    write_text_atomic(os.fspath(path), text.getvalue())


def read_csv(path) -> list[dict]:
    """Rows of a sweep CSV, typed (a truncated last line, from an interrupted
    run, is dropped)."""
    from .storage import read_text

    path = os.fspath(path)
    rows = []
    text = read_text(path)
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(complete))
    for raw in reader:
        if None in raw or any(raw.get(c) is None for c in COLUMNS):
            continue  # malformed / partial line
        try:
            rows.append({c: _parse_value(c, raw[c]) for c in COLUMNS})
        except ValueError:
            continue
    return rows


def _key(row: Mapping) -> tuple[str, float, int]:
    return (str(row["format"]), float(row["fraction"]), int(row["seed"]))


def _sort_rows(rows: list[dict], formats: Sequence[str]) -> list[dict]:
    order = {f: i for i, f in enumerate(formats)}
    return sorted(rows, key=lambda r: (order.get(r["format"], len(order)), r["format"], r["fraction"], r["seed"]))


# --------------------------------------------------------------------------- summary


def _groups(rows: Sequence[Mapping]) -> dict[str, dict[float, list[Mapping]]]:
    out: dict[str, dict[float, list[Mapping]]] = {}
    for r in rows:
        out.setdefault(r["format"], {}).setdefault(float(r["fraction"]), []).append(r)
    return out


def _cos(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "1" if x == 1.0 else ("0" if x == 0.0 else f"{x:.6f}")


def _g(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-4:
        return f"{x:.2g}"
    return f"{x:.4f}" if abs(x) < 1 else f"{x:.3g}"


def _range(xs: list[float], fmt=_g) -> str:
    xs = [float(x) for x in xs]
    real = [x for x in xs if not math.isnan(x)]
    if not real:
        return "—"
    lo, hi = min(real), max(real)
    text = fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} – {fmt(hi)}"
    if len(real) < len(xs):
        text += f" ({len(xs) - len(real)} n/a)"
    return text


def _int_range(xs: list[int]) -> str:
    lo, hi = min(xs), max(xs)
    return str(lo) if lo == hi else f"{lo} – {hi}"


def _frac_label(f: float) -> str:
    return "0" if f == 0 else f"{f:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def write_markdown(rows: Sequence[Mapping], path, *, title: str = "Robustness sweep",
                   formats: Sequence[str] | None = None, source: str | None = None) -> str:
    """Write (and return) a markdown summary: per format, one table with a line
    per corruption fraction, ranges over seeds (min – max)."""
    groups = _groups(rows)
    names = list(formats) if formats else list(groups)
    names = [n for n in names if n in groups] + [n for n in groups if n not in names]
    lines = [f"# {title}", ""]
    if source:
        lines += [f"Checkpoint: `{source}`", ""]
    if rows:
        r0 = rows[0]
        lines += [f"{r0['tensors_total']} tensors ({r0['tensors_float']} floating point). Each byte of the encoded "
                  "file replaced with probability f (`faults.corrupt(mode=\"replace\")`); ranges are min – max "
                  "over seeds.", "",
                  "*Valid*: came back with its shape and all values finite. *Bit-exact*: identical to the format's "
                  "own clean load. Means marked *all* count an invalid tensor as cosine 0 / rel. L2 inf; means "
                  "marked *valid* are over the valid float tensors only.", ""]
    for name in names:
        by_f = groups[name]
        sizes = sorted({int(r["bytes_on_disk"]) for fr in by_f.values() for r in fr})
        desc = FORMATS[name].description if name in FORMATS else ""
        lines += [f"## {name}", "", f"{desc}; {', '.join(f'{s:,}' for s in sizes)} bytes on disk.", ""]
        lines += ["| f | seeds | container opens | valid tensors | valid float tensors | bit-exact (repaired) "
                  "| mean cosine (all) | mean cosine (valid) | mean rel. L2 (all) | mean rel. L2 (valid) "
                  "| max rel. L2 (valid) | load s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in sorted(by_f):
            rs = by_f[f]
            n = len(rs)
            ok = sum(1 for r in rs if r["container_ok"])
            total = rs[0]["tensors_total"]
            exact = [int(r["tensors_exact"]) + int(r["tensors_repaired"]) for r in rs]
            rep = [int(r["tensors_repaired"]) for r in rs]
            exact_s = _int_range(exact) + (f" ({_int_range(rep)})" if any(rep) else "")
            n_float = rs[0]["tensors_float"]
            lines.append(
                f"| {_frac_label(f)} | {n} | {ok}/{n} | {_int_range([int(r['tensors_finite']) for r in rs])} / {total} "
                f"| {_int_range([int(r['tensors_float_finite']) for r in rs])} / {n_float} "
                f"| {exact_s} | {_range([r['mean_cosine'] for r in rs], _cos)} "
                f"| {_range([r['mean_cosine_finite'] for r in rs], _cos)} | {_range([r['mean_rel_l2'] for r in rs])} "
                f"| {_range([r['mean_rel_l2_finite'] for r in rs])} | {_range([r['max_rel_l2_finite'] for r in rs])} "
                f"| {_range([r['load_seconds'] for r in rs], lambda x: f'{x:.2f}')} |")
        errs = sorted({r["error"] for fr in by_f.values() for r in fr if r.get("error")})
        if errs:
            lines += ["", "**Library errors (bugs):**", ""] + [f"- `{e}`" for e in errs]
        lines.append("")
    text = "\n".join(lines)
    if path is not None:
        from .storage import write_text_atomic

        write_text_atomic(os.fspath(path), text)
    return text


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h")
_LINESTYLES = ("-", "--", "-.", ":")
_DODGE_DECADES = 0.05  # sideways nudge between formats, so lines that coincide stay visible


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _median_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the non-NaN ``values``; NaNs when there are none."""
    real = sorted(v for v in values if not math.isnan(v))
    if not real:
        return math.nan, math.nan, math.nan
    return real[len(real) // 2], real[0], real[-1]


def plot(rows: Sequence[Mapping], path, *, formats: Sequence[str] | None = None, title: str | None = None,
         dpi: int = 110):
    """Draw the sweep picture and return its (closed) matplotlib Figure.

    Three panels against the corruption fraction (log axis), one line per
    format (median over seeds, min – max shaded): the mean relative L2 error
    of the float tensors that came back valid; the share of tensors that came
    back valid; the share that came back bit-exact (identical to the format's
    own clean load, repaired ones included). A lossless format's exact runs
    (relative L2 = 0) are drawn as stars on a row of their own, labelled
    "exact", below the smallest real error; a cross on the top edge marks a
    fraction where some seed had an invalid float tensor or a file that did
    not open. Formats differ in colour, marker and line style and are nudged
    sideways a little, so lines that coincide (every format at 100 %) stay
    visible. The legend gives each format's file size."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = _groups(rows)
    names = list(formats) if formats else list(groups)
    names = [n for n in names if n in groups] + [n for n in groups if n not in names]
    fracs = sorted({float(r["fraction"]) for r in rows})
    nonzero = [f for f in fracs if f > 0]
    zero_x = (min(nonzero) / 10) if nonzero else 1e-8

    def xpos(f: float, i: int) -> float:
        return (zero_x if f == 0 else f) * 10 ** ((i - (len(names) - 1) / 2) * _DODGE_DECADES)

    fig, (ax_err, ax_valid, ax_exact) = plt.subplots(1, 3, figsize=(15, 4.9))
    cmap = plt.get_cmap("tab10")
    all_rel = [float(r["mean_rel_l2_finite"]) for r in rows if float(r["mean_rel_l2_finite"]) > 0]
    floor = max(min(all_rel) / 3, 1e-12) if all_rel else 1e-8
    top = max(max(all_rel) * 10, floor * 100) if all_rel else 1.0
    exact_y = floor / 10
    any_exact = False
    handles = []
    for i, name in enumerate(names):
        style = dict(color=cmap(i % 10), marker=_MARKERS[i % len(_MARKERS)],
                     linestyle=_LINESTYLES[i % len(_LINESTYLES)], ms=5)
        sizes = sorted({int(r["bytes_on_disk"]) for fr in groups[name].values() for r in fr
                        if str(r.get("bytes_on_disk", "")) != ""})
        label = name + (f" ({' / '.join(_human_bytes(n) for n in sizes)})" if sizes else "")
        xs, err, valid, exact, exact_x, bad_x = [], [], [], [], [], []
        for f in sorted(groups[name]):
            rs = groups[name][f]
            total = max(1, int(rs[0]["tensors_total"]))
            x = xpos(f, i)
            xs.append(x)
            med, lo, hi = _median_range([float(r["mean_rel_l2_finite"]) for r in rs])
            if med == 0:
                exact_x.append(x)
            err.append(tuple(exact_y if v == 0 else v for v in (med, lo, hi)))
            valid.append(_median_range([100.0 * int(r["tensors_finite"]) / total for r in rs]))
            exact.append(_median_range([100.0 * (int(r["tensors_exact"]) + int(r["tensors_repaired"])) / total
                                        for r in rs]))
            if any(not r["container_ok"] or int(r["tensors_float_finite"]) < int(r["tensors_float"]) for r in rs):
                bad_x.append(x)
        for ax, series in ((ax_err, err), (ax_valid, valid), (ax_exact, exact)):
            line, = ax.plot(xs, [m for m, _lo, _hi in series], label=label, **style)
            ax.fill_between(xs, [lo for _m, lo, _hi in series], [hi for _m, _lo, hi in series],
                            color=style["color"], alpha=0.15, lw=0)
        handles.append(line)
        if exact_x:
            any_exact = True
            ax_err.plot(exact_x, [exact_y] * len(exact_x), "*", color=style["color"], ms=12, mec="black",
                        mew=0.5, gid="exact", label="_exact", zorder=3)
        if bad_x:
            ax_err.plot(bad_x, [top] * len(bad_x), "x", color=style["color"], ms=8, mew=2, clip_on=False,
                        label="_invalid")
    ticks = [xpos(f, (len(names) - 1) / 2) for f in fracs]
    for ax in (ax_err, ax_valid, ax_exact):
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([_frac_label(f) for f in fracs], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("corruption fraction (bytes replaced)")
        ax.grid(True, which="major", alpha=0.3)
    ax_err.set_yscale("log")
    ax_err.set_ylim(exact_y / 3 if any_exact else floor, top * 1.5)
    decades = range(math.ceil(math.log10(floor)), math.floor(math.log10(top)) + 1)
    step = max(1, -(-len(decades) // 7))
    yticks = [10.0 ** k for k in decades][::-1][::step][::-1]
    ylabels = [f"$10^{{{round(math.log10(t))}}}$" for t in yticks]
    if any_exact:
        ax_err.axhline(math.sqrt(floor * exact_y), color="gray", lw=0.8, ls=":")
        yticks, ylabels = [exact_y] + yticks, ["exact"] + ylabels
    ax_err.set_yticks(yticks)
    ax_err.set_yticklabels(ylabels)
    ax_err.set_ylabel("mean rel. L2 error (valid float tensors)")
    ax_err.set_title("error of the float tensors that came back\n"
                     "star: bit-exact (error 0); x on top: a float tensor invalid or the file did not open",
                     fontsize=9)
    for ax, what in ((ax_valid, "valid tensors (%)"), (ax_exact, "bit-exact tensors (%)")):
        ax.set_ylim(-4, 104)
        ax.set_ylabel(what)
    ax_valid.set_title("tensors that came back valid (right shape, finite)", fontsize=9)
    ax_exact.set_title("tensors that came back bit-exact\n(identical to the format's own clean load; "
                       "repaired ones count)", fontsize=9)
    extra = [Line2D([], [], marker="*", ls="none", color="gray", mec="black", mew=0.5, ms=12,
                    label="bit-exact run (rel. L2 = 0)"),
             Line2D([], [], marker="x", ls="none", color="gray", mew=2, ms=8,
                    label="some tensor invalid / file unreadable")]
    fig.legend(handles=handles + extra, loc="lower center", ncol=min(len(handles) + 2, 6), fontsize=9,
               frameon=False)
    seeds = sorted({int(r["seed"]) for r in rows})
    detail = ""
    if rows:
        detail = (f"{rows[0]['tensors_total']} tensors ({rows[0]['tensors_float']} floating point); "
                  f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} per point: line = median, band = min – max")
    fig.suptitle("\n".join(t for t in (title or "Robustness sweep", detail) if t), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(os.fspath(path), dpi=dpi)
    plt.close(fig)
    return fig


_GENERIC_NAMES = {"model", "models", "weights", "checkpoint", "checkpoints", "snapshots", "main", "model.safetensors",
                  "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json", "model.pt",
                  "model.bin", "model.dtdr"}


def model_name(source: str) -> str:
    """A name for the model in ``source`` to title the sweep with: the last
    part of the path that is not a generic file or folder name
    (``.../all-MiniLM-L6-v2/model.safetensors`` -> ``all-MiniLM-L6-v2``)."""
    parts = [p for p in os.fspath(source).replace("\\", "/").split("/") if p and not p.endswith(":")]
    for part in reversed(parts):
        if part.lower() not in _GENERIC_NAMES and not part.lower().startswith("model-0"):
            return part
    return parts[-1] if parts else os.fspath(source)


# --------------------------------------------------------------------------- the sweep


def _fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def _seeds(seeds) -> list[int]:
    if isinstance(seeds, int):
        return list(range(seeds))
    return [int(s) for s in seeds]


_SPAWN_HINT = ("sweep() with workers > 1 starts worker processes with 'spawn', which re-imports the "
               "calling script: call it under `if __name__ == \"__main__\":`, or pass workers=1")


def _execute(tasks: list[dict], workers: int):
    """Yield the row of every task as it finishes (a pool of ``workers``
    processes; in-process when ``workers <= 1``)."""
    if not tasks:
        return
    if workers <= 1:
        for t in tasks:
            yield _run_task(t)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from concurrent.futures.process import BrokenProcessPool

    if getattr(mp.current_process(), "_inheriting", False):
        raise RuntimeError(_SPAWN_HINT)
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: the parent has run torch's thread pools, which are not fork-safe
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_run_task, t) for t in tasks]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BrokenProcessPool as exc:
            raise RuntimeError("a sweep worker process died (out of memory, a crash in a loader, or "
                               + _SPAWN_HINT + ")") from exc
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _prepare(sd, fmt: Format, work: str) -> tuple[str, str]:
    """Encode ``sd`` in ``fmt`` once (the pristine file every run copies) and
    keep the format's clean load as the bit-exactness reference."""
    from safetensors.torch import save_file

    pristine = os.path.join(work, fmt.name + fmt.suffix)
    reference = os.path.join(work, fmt.name + ".reference.safetensors")
    if os.path.exists(pristine) and os.path.exists(reference):
        return pristine, reference
    tmp = pristine + ".tmp"
    fmt.save(sd, tmp)
    loaded, report = fmt.load(tmp)
    if report is not None and not report.clean:
        raise RuntimeError(f"{fmt.name}: a clean file does not load clean: {report.summary()}")
    missing = [k for k in sd if loaded.get(k) is None]
    if missing:
        raise RuntimeError(f"{fmt.name}: a clean load misses tensors {missing[:5]}")
    save_file({k: loaded[k].contiguous() for k in sd}, reference + ".tmp")
    os.replace(reference + ".tmp", reference)
    os.replace(tmp, pristine)
    return pristine, reference


def sweep(checkpoint, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, seeds=5,
          formats: Sequence[str] = DEFAULT_FORMATS, out, workers: int = 2, progress: bool = True,
          storage_options: Mapping | None = None, keep_work: bool = False, title: str | None = None) -> list[dict]:
    """Run the robustness sweep of ``checkpoint`` and write ``out/sweep.csv``,
    ``out/summary.md`` and ``out/sweep.png``; returns every row (typed dicts
    with the keys of :data:`COLUMNS`), sorted by format, fraction, seed.

    ``checkpoint``: anything :func:`load_state_dict_any` reads (``storage_options``
    apply to it); ``seeds``: a count (seeds 0..n-1) or a list; ``out``: a local
    folder. Rows already in ``out/sweep.csv`` for the same checkpoint are kept and
    not recomputed, so an interrupted sweep resumes. Runs use ``workers``
    processes. The encoded files live in ``out/.sweep-work`` while the sweep
    runs and are removed at the end unless ``keep_work``. ``title`` heads
    ``summary.md`` and the plot (default: "Robustness sweep of <model>",
    see :func:`model_name`).

    ``out/sweep.json`` says which checkpoint the rows of ``sweep.csv``
    belong to, so that a resumed sweep never mixes two checkpoints::

        {"checkpoint": "model.safetensors",  # the path or URL given, as given
         "fingerprint": "9f2c...",           # sha256 over every tensor's name, dtype, shape and bytes,
                                             # in name order (independent of file format and path)
         "tensors": 104,                     # number of tensors
         "bytes": 90856960}                  # their raw size (numel * element size), in bytes

    A sweep into a folder whose ``sweep.json`` has another fingerprint is
    refused (ValueError), as is a ``sweep.csv`` without ``sweep.json``.
    """
    formats = list(formats)
    for name in formats:
        _get_format(name)
    fractions = [float(f) for f in fractions]
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fraction {f} outside [0, 1]")
    seed_list = _seeds(seeds)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "sweep.csv")
    meta_path = os.path.join(out, _META_FILE)
    work = os.path.join(out, _WORK_DIR)
    from .storage import open_text_append, read_text, write_text_atomic


    sd = load_state_dict_any(checkpoint, storage_options)
    if not sd:
        raise ValueError(f"{checkpoint!r} holds no tensors")
    fp = _fingerprint(sd)
    source = os.fspath(checkpoint)
    meta = {"checkpoint": source, "fingerprint": fp, "tensors": len(sd),
            "bytes": sum(t.numel() * t.element_size() for t in sd.values())}
    if os.path.exists(meta_path):
        old = json.loads(read_text(meta_path))
        if old.get("fingerprint") != fp:
            raise ValueError(f"{out!r} holds a sweep of another checkpoint ({old.get('checkpoint')!r}); "
                             "use another output folder")
    elif os.path.exists(csv_path):
        raise ValueError(f"{csv_path!r} exists without {_META_FILE}; cannot tell which checkpoint it is from")
    write_text_atomic(meta_path, json.dumps(meta, indent=2))

    rows = read_csv(csv_path) if os.path.exists(csv_path) else []
    done = {_key(r) for r in rows}
    wanted = [(fm, fr, s) for fm in formats for fr in fractions for s in seed_list]
    todo = [k for k in wanted if (k[0], k[1], k[2]) not in done]

    if todo:
        os.makedirs(work, exist_ok=True)
        tmp = os.path.join(work, "tmp")
        os.makedirs(tmp, exist_ok=True)
        original = os.path.join(work, "original.safetensors")
        if not os.path.exists(original):
            from safetensors.torch import save_file

            save_file(sd, original + ".tmp")
            os.replace(original + ".tmp", original)
        prepared = {fm: _prepare(sd, _get_format(fm), work) for fm in sorted({k[0] for k in todo})}
        tasks = [{"format": fm, "fraction": fr, "seed": s, "pristine": prepared[fm][0],
                  "reference": prepared[fm][1], "original": original, "tmp": tmp} for fm, fr, s in todo]
        del sd  # the workers read the tensors from disk
        write_csv(rows, csv_path)  # drops a partial last line of an interrupted run before appending
        bar = None
        if progress:
            from tqdm.auto import tqdm

            # bytes: each run damages and decodes its format's whole encoded file (rate and ETA in B/s)
            run_bytes = {fm: os.path.getsize(prepared[fm][0]) for fm in prepared}
            bar = tqdm(total=sum(run_bytes[t["format"]] for t in tasks), desc="sweep", unit="B", unit_scale=True,
                       unit_divisor=1024, disable=None)
        try:
            with open_text_append(csv_path) as fcsv:
                w = csv.writer(fcsv)
                for row in _execute(tasks, workers):
                    rows.append(row)
                    w.writerow([_fmt_value(c, row.get(c, "")) for c in COLUMNS])
                    fcsv.flush()
                    if bar is not None:
                        bar.update(run_bytes[row["format"]])
                        bar.set_postfix_str(f"{row['format']} f={row['fraction']:g}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        rows = _sort_rows(rows, formats)
        write_csv(rows, csv_path)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    else:
        rows = _sort_rows(rows, formats)

    wanted_set = set(wanted)
    selected = [r for r in rows if _key(r) in wanted_set]
    if title is None:
        title = f"Robustness sweep of {model_name(source)}"
    write_markdown(selected, os.path.join(out, "summary.md"), title=title, formats=formats, source=source)
    plot(selected, os.path.join(out, "sweep.png"), formats=formats, title=title)
    return selected
