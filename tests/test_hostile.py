"""Hostile files (issue 8): the reader never executes, never over-allocates, never hangs.

* The hand-written corpus in ``tests/data/hostile/`` (see ``fuzz/hostile.py``):
  every file gives its typed error, within 1 s of CPU time and 100 MB of
  memory, measured in a subprocess (``fuzz/measure.py``: peak RSS through
  /proc/self/clear_refs, an address-space limit as a backstop).
* Fuzzing regressions (``tests/data/hostile/fuzz-*``): never anything but a
  typed error.
* Linear time on files built to defeat the scans, the memory cap, the DCP
  reader and the converters, and a source scan for pickle / eval / exec /
  torch.load.
* Gaps found and not yet fixed are ``xfail(strict=True)`` with the reason
  (``KNOWN_FINDINGS`` for fuzz regressions): they start failing (XPASS) the
  day they are fixed, and must then be un-marked.
"""

from __future__ import annotations

import ast
import glob
import io
import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr import api
from torch_dtdr.errors import DamageWarning, DTDRError, FormatError
from torch_dtdr.format import constants as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE = os.path.join(ROOT, "tests", "data", "hostile")
MEASURE = os.path.join(ROOT, "fuzz", "measure.py")
sys.path.insert(0, ROOT)

from fuzz import craft, hostile  # noqa: E402

EXPECTED = json.load(open(os.path.join(HOSTILE, "expected.json")))
CPU_BUDGET_S = 1.0
MEMORY_BUDGET_MB = 100.0


def _measure(files, mode="strict", env=None) -> dict:
    cmd = [sys.executable, MEASURE, "--mode", mode, "--as-limit-mb", "3072", *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def strict_results():
    files = [os.path.join(HOSTILE, n + ".dtdr") for n in sorted(EXPECTED)]
    return _measure(files, "strict")


def _regressions():
    return sorted(glob.glob(os.path.join(HOSTILE, "fuzz-*")))


#: Fuzz findings whose fix is pending, by file name: the reason (they are xfail(strict=True)).
KNOWN_FINDINGS: dict[str, str] = {}


@pytest.fixture(scope="module")
def recover_results():
    files = [os.path.join(HOSTILE, n + ".dtdr") for n in sorted(EXPECTED)]
    return _measure(files, "recover")


def _budget(rec, clear_refs):
    assert rec["cpu_s"] < CPU_BUDGET_S, f"{rec['cpu_s']:.2f} s of CPU"
    if clear_refs:
        assert rec["peak_mb"] < MEMORY_BUDGET_MB, f"peak {rec['peak_mb']:.0f} MB above the baseline"


# --------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_typed_error_within_budget(strict_results, name):
    exp = EXPECTED[name]
    rec = strict_results["results"][os.path.join(HOSTILE, name + ".dtdr")]
    assert rec["outcome"] == "error", f"{exp['why']}: {rec}"
    assert rec["error"] == exp["error"], f"{exp['why']}: {rec['message']}"
    if exp["field"] is not None:
        assert rec["field"] == exp["field"], f"{exp['why']}: {rec['message']}"
    _budget(rec, strict_results["clear_refs"])


def test_corpus_recover_mode_never_crashes(recover_results):
    """With errors="recover" some hostile files load (degraded): still only
    typed errors, within the same budget."""
    bad = {p: r for p, r in recover_results["results"].items() if r["outcome"] == "crash"}
    assert not bad, json.dumps(bad, indent=1)[:4000]
    for path, rec in recover_results["results"].items():
        try:
            _budget(rec, recover_results["clear_refs"])
        except AssertionError as e:
            raise AssertionError(f"{os.path.basename(path)}: {e}") from None


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FINDINGS[os.path.basename(p)]))
    if os.path.basename(p) in KNOWN_FINDINGS else p for p in _regressions()], ids=os.path.basename)
def test_fuzz_regressions(path):
    """Inputs the fuzzer once crashed on (see fuzz/README.md): only typed errors now."""
    with open(path, "rb") as f:
        data = f.read()
    for mode in ("recover", "strict"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            try:
                api.load(io.BytesIO(data), errors=mode)
            except DTDRError:
                pass
    craft.exercise(data)


def test_corpus_files_are_current():
    """expected.json, the stored files and fuzz/hostile.py list the same cases
    (rerun tests/data/hostile/make_hostile.py after changing fuzz/hostile.py).
    The stored bytes are kept as they are: a writer change must not retire them."""
    assert sorted(EXPECTED) == sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(HOSTILE, "*.dtdr")))
    made = hostile.corpus()
    assert sorted(made) == sorted(EXPECTED)
    for name, (_blob, exp) in made.items():
        assert {k: v for k, v in EXPECTED[name].items() if k != "size"} == exp, name


def test_corpus_covers_the_issue_list():
    """The hostile inputs the issue names, by name."""
    for name in ("numel_2p62", "offset_past_end", "zstd_bomb_10g_in_1k", "nested_lists_1e6",
                 "duplicate_tensor_names", "negative_length", "non_utf8_name"):
        assert name in EXPECTED
    assert EXPECTED["zstd_bomb_10g_in_1k"]["size"] < 64 << 10
    bomb = hostile.rle_zstd_frame(10 ** 3, declared=10 << 30)
    assert len(bomb) < 1024


# --------------------------------------------------------------------------- linear time


def test_scans_are_linear(tmp_path):
    """Files built to make the footer and record scans quadratic: a 16 MiB file
    of valid index blob headers each claiming the rest of the file, and 1 MiB
    of record magic in a truncated file."""
    flood = tmp_path / "flood.dtdr"
    flood.write_bytes(hostile._blob_flood(4096))
    small = {"name": "x", "dtype": "float32", "shape": [16], "codec": {"name": "raw"}, "segment_elems": 16}
    magic = tmp_path / "magic.dtdr"
    magic.write_bytes(hostile._scan_file(small, [b"DREC\x02\x10\x00\x00" * (1 << 17)]))
    res = _measure([str(flood), str(magic)], "recover")
    for path, rec in res["results"].items():
        assert rec["outcome"] != "crash", rec
        assert rec["cpu_s"] < 2 * CPU_BUDGET_S, (path, rec["cpu_s"])


# --------------------------------------------------------------------------- limits in process


def _bytes_of(obj, **kw) -> bytes:
    return craft.save_bytes(obj, **kw)


def test_memory_cap_is_user_settable(monkeypatch):
    data = _bytes_of({"w": torch.randn(1000)})
    api.load(io.BytesIO(data))
    monkeypatch.setattr(C, "MAX_TENSOR_BYTES", 3999)
    with pytest.raises(FormatError) as ei:
        api.load(io.BytesIO(data))
    assert ei.value.field == "shape"
    with pytest.raises(FormatError):
        torch_dtdr.open(io.BytesIO(data))


def test_memory_cap_from_environment(tmp_path):
    path = tmp_path / "w.dtdr"
    api.save({"w": torch.randn(1000)}, path)
    res = _measure([str(path)], "strict", env={"TORCH_DTDR_MAX_BYTES": "3999"})
    rec = res["results"][str(path)]
    assert (rec["outcome"], rec["error"], rec["field"]) == ("error", "FormatError", "shape")
    res = _measure([str(path)], "strict", env={"TORCH_DTDR_MAX_BYTES": "4000"})
    assert res["results"][str(path)]["outcome"] == "ok"


def test_metadata_longer_than_64k_round_trips():
    """The reader used to refuse metadata values of more than 65536 characters
    that save wrote without complaint."""
    data = _bytes_of({"w": torch.zeros(2)}, metadata={"k": "x" * 100_000})
    with torch_dtdr.open(io.BytesIO(data)) as f:
        assert f.metadata()["k"] == "x" * 100_000


def test_index_zstd_ratio_limit(monkeypatch):
    """A highly repetitive index still loads under the floor; the ratio limit
    refuses the same frame when the floor is lowered."""
    data = _bytes_of({"x": [None] * 200_000, "w": torch.zeros(3)})
    assert api.load(io.BytesIO(data))["x"] == [None] * 200_000
    monkeypatch.setattr(C, "MAX_INDEX_FLOOR", 1 << 10)
    monkeypatch.setattr(C, "MAX_INDEX_RATIO", 8)
    with pytest.raises(FormatError) as ei:
        api.load(io.BytesIO(data))
    assert ei.value.field == "index"


def test_truncated_record_is_clipped_not_allocated():
    """A file cut inside its last record: the record is read only as far as
    the file goes (the lost tail is reported, not zero-filled in memory), and
    the tensors before it are intact."""
    x = torch.randn(300_000)
    data = _bytes_of({"a": torch.arange(10.0), "x": x}, codec="raw", parity="off")
    p = craft.parse(data)
    off, hs, *_ = p.index["tensors"][1]["records"][0]
    cut = p.striped[: off + hs + 400_000]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        obj, rep = api.load(io.BytesIO(cut), report=True, partial=True)
        with pytest.raises(DTDRError):
            api.load(io.BytesIO(cut), errors="strict")
    assert rep.truncated
    assert torch.equal(obj["a"], torch.arange(10.0))
    assert obj["x"] is None or obj["x"].shape == x.shape
    assert rep.tensors[1].status != "exact"


def test_scanned_record_beyond_numel_is_ignored():
    small = {"name": "x", "dtype": "float32", "shape": [4], "codec": {"name": "raw"}, "segment_elems": 16}
    rec = craft.record(C.RECORD_KIND_SEGMENT, 0, 0, 16, [("data", 1, bytes(64))])
    data = hostile._scan_file(small, [rec])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        assert api.load(io.BytesIO(data), partial=True) == {"x": None}


def test_non_ascii_and_surrogate_names_are_data_not_errors():
    """Names are plain data: a lone surrogate (legal JSON escape) is kept."""
    data = _bytes_of({"a": torch.zeros(2), "b": torch.ones(2)})
    idx = craft.parse(data).index
    idx["tensors"][0]["name"] = "\udc80"
    idx["tree"]["entries"][0]["name"] = "\udc80"
    idx["tree"]["root"] = ["dict", "\udc80", ["tensor", 0], "b", ["tensor", 1]]
    out = api.load(io.BytesIO(craft.reseal(data, idx)))
    assert set(out) == {"\udc80", "b"}


# --------------------------------------------------------------------------- known gaps


def _with_device(device: str) -> bytes:
    data = _bytes_of({"w": torch.zeros(3)})
    idx = craft.parse(data).index
    idx["tree"]["tensors"][0]["device"] = device
    return craft.reseal(data, idx)


def test_unknown_saved_device_gives_typed_error():
    """Found by the fuzzer (fuzz-unknown-device-*.bin): torch's RuntimeError escaped."""
    data = _with_device("xyz")
    with pytest.raises(DTDRError):
        api.load(io.BytesIO(data))
    with pytest.raises(DTDRError):
        with torch_dtdr.open(io.BytesIO(data)) as f:
            f.get_tensor("w")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_unavailable_saved_device_gives_typed_error():
    with pytest.raises(DTDRError):
        api.load(io.BytesIO(_with_device("cuda:0")))


def test_unknown_saved_device_with_map_location_loads():
    assert torch.equal(api.load(io.BytesIO(_with_device("xyz")), map_location="cpu")["w"], torch.zeros(3))


# --------------------------------------------------------------------------- DCP and converters


class _Boom:
    """Unpickling this runs a command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pt(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(2), "x": _Boom(marker)}, f)


def test_hostile_pt_is_never_unpickled_by_convert(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    _evil_pt(src, marker)
    with pytest.raises(Exception):  # noqa: B017 - torch's restricted unpickler refuses it
        torch_dtdr.convert(str(src), str(tmp_path / "out.dtdr"))
    assert not marker.exists()
    assert not (tmp_path / "out.dtdr").exists()
    # the torch.load shim refuses it the same way (weights_only is torch's default)
    with pytest.raises(Exception):  # noqa: B017
        torch_dtdr.load(str(src))
    assert not marker.exists()


def test_hostile_pt_convert_gives_typed_error(tmp_path):
    src = tmp_path / "evil.pt"
    _evil_pt(src, tmp_path / "pwned")
    with pytest.raises(DTDRError):
        torch_dtdr.convert(str(src), str(tmp_path / "out.dtdr"))


@pytest.mark.parametrize("name", ["numel_2p62", "zstd_bomb_10g_in_1k", "nested_lists_1e6", "offset_past_end"])
def test_hostile_dtdr_convert_gives_typed_error(tmp_path, name):
    with pytest.raises(DTDRError):
        torch_dtdr.convert(os.path.join(HOSTILE, name + ".dtdr"), str(tmp_path / "out.safetensors"))


def _dcp_checkpoint(path):
    from torch_dtdr import dcp

    src = path.parent / "src.dtdr"
    api.save({"w": torch.randn(8), "step": torch.tensor(3)}, src)
    dcp.dtdr_to_dcp(str(src), str(path))
    return dcp


def test_dcp_reader_hostile_metadata(tmp_path):
    """Both metadata copies replaced by hostile files, then by valid containers
    holding hostile JSON: typed errors only, nothing unpickled."""
    ckpt = tmp_path / "ckpt"
    dcp = _dcp_checkpoint(ckpt)
    dcp.read_metadata(str(ckpt))
    names = dcp.METADATA_NAMES
    for hostile_name in ("zstd_bomb_10g_in_1k", "numel_2p62", "nested_lists_1e6", "garbage_1k"):
        for n in names:
            with open(os.path.join(HOSTILE, hostile_name + ".dtdr"), "rb") as f:
                (ckpt / n).write_bytes(f.read())
        with pytest.raises(DTDRError):
            dcp.read_metadata(str(ckpt))
    from torch_dtdr.integrity.checksum import hash64

    for doc in (b"[" * 100_000 + b"]" * 100_000, b'{"format":"torch_dtdr.dcp","format":1}',
                b'{"format":"torch_dtdr.dcp","version":1,"state_dict":[["w",{"type":"pickle"}]]}', b"\xff\xfe"):
        payload = torch.frombuffer(bytearray(doc), dtype=torch.uint8)
        meta = {"format": dcp.FORMAT_NAME, "version": "1", "xxh3": f"{hash64(doc):016x}", "bytes": str(len(doc))}
        for n in names:
            api.save({dcp.metadata.META_KEY: payload}, ckpt / n, codec="raw", metadata=meta)
        with pytest.raises(DTDRError):
            dcp.read_metadata(str(ckpt))


def _rewrite_dcp_metadata(ckpt, dcp, fn):
    doc, _ = dcp.metadata.load_plain_metadata(str(ckpt), None)
    fn(doc)
    dcp.metadata.write_metadata(str(ckpt), dcp.METADATA_NAMES, doc, None, "default")


def test_dcp_shard_names_cannot_leave_the_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    dcp = _dcp_checkpoint(ckpt)
    _rewrite_dcp_metadata(ckpt, dcp, lambda d: d["files"][0].__setitem__(0, "../evil.dtdr"))
    with pytest.raises(DTDRError) as ei:
        dcp.read_metadata(str(ckpt))
    assert "shard name" in str(ei.value)


def test_dcp_declared_size_is_capped(tmp_path):
    """A DCP metadata item's declared size is held to the memory cap before DCP allocates it."""
    ckpt = tmp_path / "ckpt"
    dcp = _dcp_checkpoint(ckpt)

    def huge(doc):  # 2**62 elements: torch refuses at once, whatever the machine's overcommit policy
        for fqn, item in doc["state_dict"]:
            if fqn == "w":
                item["size"] = [1 << 62]

    _rewrite_dcp_metadata(ckpt, dcp, huge)
    with pytest.raises(DTDRError):
        dcp.dcp_to_dtdr(str(ckpt), str(tmp_path / "out.dtdr"))


@pytest.mark.parametrize("header", [b'{"a": 5}', b'{' + b'[' * 100_000,
                                    b'{"a": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'])
def test_hostile_safetensors_convert_gives_typed_error(tmp_path, header):
    import struct

    src = tmp_path / "x.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(DTDRError):
        torch_dtdr.convert(str(src), str(tmp_path / "out.dtdr"))


def test_dcp_refuses_pickled_metadata(tmp_path):
    """A standard DCP checkpoint (pickled .metadata) is refused unless the caller opts in."""
    from torch_dtdr import dcp

    ckpt = tmp_path / "std"
    ckpt.mkdir()
    marker = tmp_path / "pwned"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(_Boom(marker), f)
    with pytest.raises(DTDRError):
        dcp.dcp_to_dtdr(str(ckpt), str(tmp_path / "out.dtdr"))
    assert not marker.exists()


# --------------------------------------------------------------------------- the source itself

_PKG = os.path.join(ROOT, "torch_dtdr")
#: torch.load calls whose weights_only is not a literal True, and why that is safe.
_TORCH_LOAD_ALLOWED = {
    ("torchfiles.py", "load_torch"): "the torch.load drop-in forwards the caller's own weights_only (torch >= 2.6 "
                         "defaults to True; on older torch the shim passes True itself)",
    ("convert.py", "load_bytes"): "_full_state_dict_planner(weights_only=not allow_pickle): False only when the "
                              "caller passes allow_pickle=True for a checkpoint it trusts",
}


def _sources():
    for path in sorted(glob.glob(os.path.join(_PKG, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, _PKG), ast.parse(f.read(), path)


def _enclosing_functions(tree):
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _is_torch_load(func) -> bool:
    if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name):
        return func.value.id == "torch"
    if isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "original_load":
        return True  # original_load()(...) is torch.load
    if isinstance(func, ast.Subscript) and isinstance(func.slice, ast.Constant) and func.slice.value == "load":
        return True  # _STATE["load"](...) is torch.load
    return False


def test_no_pickle_eval_exec_or_unsafe_torch_load():
    found = []
    for rel, tree in _sources():
        parents = _enclosing_functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    if m.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"):
                        found.append(f"{rel}:{node.lineno}: imports {m}")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                    found.append(f"{rel}:{node.lineno}: calls {f.id}")
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "pickle":
                    found.append(f"{rel}:{node.lineno}: calls pickle.{f.attr}")
                if _is_torch_load(f):
                    wo = [k for k in node.keywords if k.arg == "weights_only"]
                    if wo and isinstance(wo[0].value, ast.Constant) and wo[0].value.value is True:
                        continue
                    fn = node
                    while fn in parents and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        fn = parents[fn]
                    key = (os.path.basename(rel), getattr(fn, "name", "<module>"))
                    if key not in _TORCH_LOAD_ALLOWED:
                        found.append(f"{rel}:{node.lineno}: torch.load without weights_only=True in {key[1]}")
    assert not found, "\n".join(found)


def test_reader_imports_nothing_by_name():
    """The modules a load runs through never import or look up code by a
    name that could come from a file."""
    reader_side = ("api.py", "lazy.py", "decoding.py", "torchfiles.py", "kinds.py", "dispatch.py", "tree.py", "format/",
                   "codecs/", "integrity/", "storage/", "dtypes.py")
    for rel, tree in _sources():
        if not rel.startswith(reader_side):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "import_module":
                raise AssertionError(f"{rel}:{node.lineno}: importlib.import_module")
            if isinstance(node, ast.Name) and node.id in ("__import__", "eval", "exec"):
                raise AssertionError(f"{rel}:{node.lineno}: {node.id}")


def _forge_section(data: bytes, section: str, copy: int) -> bytes:
    """``data`` with one byte of copy ``copy`` of the first record's ``section`` flipped and every chunk
    checksum and parity recomputed, so only the section's own digest can tell."""
    with torch_dtdr.storage.open_source(io.BytesIO(data)) as src:
        reader = torch_dtdr.format.reader.ContainerReader(src)
        rec = reader.tensors[0].records[0]
        pos = rec.body_start
        for spec in rec.sections:
            if spec.name == section:
                break
            pos += spec.stored_length
        stream = bytearray(reader.read_logical(0, reader.stream_length).data)
    stream[pos + copy * spec.length] ^= 0x10
    return craft.restream(data, bytes(stream))


@pytest.mark.parametrize("codec", ["dtdr", "dtdr8"])
def test_a_forged_first_copy_under_valid_chunk_checksums_is_outvoted(codec):
    """Chunks that verify do not vouch for a section: its first copy is checked against its digest,
    and when it differs the other copies decide (the reader's fast path for intact records must not
    take it as read)."""
    w = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    data = craft.save_bytes({"w": w}, codec=codec)
    forged = _forge_section(data, "meta", copy=0)
    assert forged != data
    out, rep = torch_dtdr.load(io.BytesIO(forged), report=True)
    assert torch.equal(out["w"], torch_dtdr.load(io.BytesIO(data))["w"])
    assert rep.tensors[0].status in ("exact", "repaired"), rep.tensors[0]


def test_a_forged_single_copy_section_under_valid_chunk_checksums_is_damage_not_exact():
    w = torch.randn(64, 40, generator=torch.Generator().manual_seed(4))
    forged = _forge_section(craft.save_bytes({"w": w}, codec="dtdr8"), "base", copy=0)
    with pytest.warns(DamageWarning):
        _out, rep = torch_dtdr.load(io.BytesIO(forged), report=True)
    assert rep.tensors[0].status != "exact"
    with pytest.raises(DTDRError):
        torch_dtdr.load(io.BytesIO(forged), errors="strict")
