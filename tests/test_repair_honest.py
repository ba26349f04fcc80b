"""``repair`` never launders damage: a file it writes from degraded or lost
data says so in its index (a per-tensor ``provenance`` marker, format.md
section 5), and ``verify``, strict loads and the load report keep saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr import api
from torch_dtdr.errors import DamageWarning, IntegrityError
from torch_dtdr.format.reader import regions

from .helpers import assert_same, pseudo, zero_range

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _degraded_file(tmp_path):
    """A lossless file whose ``w`` residual lost three chunks of one stripe (m = 2)."""
    sd = {"w": pseudo(1 << 18, seed=3), "b": pseudo(1000, seed=4), "step": torch.arange(7)}
    path = str(tmp_path / "m.dtdr")
    api.save(sd, path)
    res = regions(path)["tensor:w:residual"]
    start = (res[0][0] // 4096 + 1) * 4096
    for i in range(3):
        zero_range(path, start + i * 4096, 4096)
    return sd, path


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "torch_dtdr.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _assert_reports_degraded(path, sd):
    with pytest.raises(IntegrityError) as e:
        api.load(path, errors="strict")
    assert "w" in str(e.value) and "degraded" in str(e.value)
    rep = torch_dtdr.verify(path)
    assert rep.status == "degraded" and rep.exit_code == 2
    by_name = {t.name: t for t in rep.tensors}
    assert by_name["w"].status == "degraded"
    assert by_name["w"].provenance and by_name["w"].provenance["status"] == "degraded"
    assert by_name["b"].status == "exact" and by_name["step"].status == "exact"
    with pytest.warns(DamageWarning):
        obj, rep2 = api.load(path, report=True)
    assert {t.name: t.status for t in rep2.tensors}["w"] == "degraded"
    assert not torch.equal(obj["w"], sd["w"])
    assert_same(obj["b"], sd["b"])
    with torch_dtdr.open(path, errors="strict") as f:
        assert_same(f.get_tensor("b"), sd["b"])
        with pytest.raises(IntegrityError):
            f.get_tensor("w")


def test_repair_in_place_of_degraded_file_refuses_and_exits_nonzero(tmp_path):
    sd, path = _degraded_file(tmp_path)
    with pytest.raises(IntegrityError):
        api.load(path, errors="strict")
    before = open(path, "rb").read()
    r = _cli("repair", path)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "degraded" in (r.stdout + r.stderr) and "w" in (r.stdout + r.stderr)
    assert open(path, "rb").read() == before  # not replaced
    with pytest.raises(IntegrityError) as e:
        api.repair(path)
    assert getattr(e.value, "report", None) is not None and e.value.report.status == "degraded"
    assert open(path, "rb").read() == before


def test_repair_to_output_marks_degraded_tensors_forever(tmp_path):
    sd, path = _degraded_file(tmp_path)
    out = str(tmp_path / "healed.dtdr")
    r = _cli("repair", path, "-o", out, "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    assert json.loads(r.stdout)["status"] == "degraded"
    _assert_reports_degraded(out, sd)
    # repairing the repaired file again keeps the marker (its records now verify)
    again = str(tmp_path / "again.dtdr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        rep = api.repair(out, again)
    assert rep.status == "degraded"
    _assert_reports_degraded(again, sd)
    prov = {t.name: t.provenance for t in torch_dtdr.verify(again).tensors}["w"]
    assert prov["source"] == "m.dtdr" or prov["source"].endswith("m.dtdr")
    # the marker is also in the head manifest: a truncated copy still says degraded
    data = open(out, "rb").read()
    cut = str(tmp_path / "cut.dtdr")
    open(cut, "wb").write(data[: len(data) - 3 * 4096])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        rep = torch_dtdr.verify(cut)
    assert {t.name: t.status for t in rep.tensors}["w"] == "degraded"


def test_repair_in_place_with_allow_degraded(tmp_path):
    sd, path = _degraded_file(tmp_path)
    r = _cli("repair", path, "--allow-degraded")
    assert r.returncode == 2, r.stdout + r.stderr
    _assert_reports_degraded(path, sd)


def test_repair_of_exact_damage_still_exits_zero(tmp_path):
    sd = {"w": pseudo(1 << 16, seed=5)}
    path = str(tmp_path / "x.dtdr")
    api.save(sd, path)
    res = regions(path)["tensor:w:residual"]
    zero_range(path, res[0][0] // 4096 * 4096 + 4096, 4096)
    r = _cli("repair", path)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = torch_dtdr.verify(path)
    assert rep.status == "exact"
    assert_same(api.load(path, errors="strict")["w"], sd["w"])


def _truncated_file(tmp_path):
    sd = {"a": pseudo(1 << 16, seed=1), "b": pseudo(1 << 16, seed=2), "c": pseudo(1 << 16, seed=6)}
    path = str(tmp_path / "t.dtdr")
    api.save(sd, path)
    cut = regions(path)["tensor:b"][0][0] + 10
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])
    return sd, path


def test_repair_of_truncated_file_refuses_without_salvage(tmp_path):
    sd, path = _truncated_file(tmp_path)
    out = str(tmp_path / "o.dtdr")
    with pytest.raises(IntegrityError):
        api.repair(path, out)
    assert not os.path.exists(out)
    r = _cli("repair", path, "-o", out)
    assert r.returncode != 0 and not os.path.exists(out)


def test_repair_salvages_surviving_tensors_into_a_partial_file(tmp_path):
    sd, path = _truncated_file(tmp_path)
    out = str(tmp_path / "o.dtdr")
    r = _cli("repair", path, "-o", out, "--salvage")
    assert r.returncode == 2, r.stdout + r.stderr
    rep = torch_dtdr.verify(out)
    status = {t.name: t.status for t in rep.tensors}
    assert status == {"a": "exact", "b": "lost", "c": "lost"}, status
    assert {t.name: t.provenance for t in rep.tensors}["b"]["status"] == "lost"
    assert rep.exit_code == 2 and not rep.truncated
    with pytest.raises(IntegrityError):
        api.load(out, errors="strict")
    with torch_dtdr.open(out, errors="strict") as f:
        assert_same(f.get_tensor("a"), sd["a"])
        with pytest.raises(IntegrityError):
            f.get_tensor("b")
    with pytest.raises(IntegrityError, match="lost"):
        api.load(out)
    with pytest.warns(DamageWarning, match="lost"):
        obj = api.load(out, partial=True)
    assert_same(obj["a"], sd["a"])
    assert obj["b"] is None


def test_golden_repaired_degraded_file_decodes_with_its_marker():
    """Format 1.1's marker, frozen: tests/data/make_golden_provenance.py wrote it once."""
    import hashlib

    path = os.path.join(ROOT, "tests", "data", "golden_v1_repaired_degraded.dtdr")
    want = json.load(open(path.replace(".dtdr", ".json")))["tensors"]
    rep = torch_dtdr.verify(path)
    assert {t.name: t.status for t in rep.tensors} == {k: v["status"] for k, v in want.items()}
    assert {t.name: t.provenance for t in rep.tensors} == {k: v["provenance"] for k, v in want.items()}
    assert rep.exit_code == 2 and not rep.truncated and not rep.events
    with pytest.raises(IntegrityError, match="lost"):
        api.load(path)
    with pytest.warns(DamageWarning):
        back = api.load(path, partial=True)
    for k, v in want.items():
        if v["sha256"] is None:
            assert back[k] is None
        else:
            got = hashlib.sha256(back[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            assert got == v["sha256"], k
    with pytest.raises(IntegrityError):
        api.load(path, errors="strict")


@pytest.mark.parametrize("marker, field", [
    ({"status": "fine", "source": "x"}, "status"),
    ({"status": "degraded", "source": 7}, "source"),
    ({"status": "degraded", "source": "x" * 2000}, "source"),
    ({"status": "degraded", "source": "x", "error_bound": -1.0}, "error_bound"),
    ({"status": "degraded", "source": "x", "degraded_elements": "many"}, "degraded_elements"),
    ({"status": "lost", "source": "x"}, "records"),  # a tensor marked lost must have no records
    ("degraded", "provenance"),
])
def test_hostile_provenance_marker_is_a_format_error(marker, field):
    import io
    import sys as _sys

    _sys.path.insert(0, ROOT)
    from fuzz import craft
    from torch_dtdr.errors import FormatError

    data = craft.save_bytes({"w": pseudo(100)})
    doc = craft.parse(data).index
    doc["tensors"][0]["provenance"] = marker
    bad = craft.reseal(data, doc)
    with pytest.raises(FormatError) as e:
        api.load(io.BytesIO(bad))
    assert e.value.field is not None and e.value.field.endswith(field), e.value.field


def test_info_shows_the_marker(tmp_path):
    sd, path = _degraded_file(tmp_path)
    out = str(tmp_path / "healed.dtdr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        api.repair(path, out)
    prov = {t["name"]: t["provenance"] for t in torch_dtdr.info(out)["tensors"]}
    assert prov["w"]["status"] == "degraded" and prov["b"] is None
