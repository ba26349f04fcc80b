"""torch.load-compatible loading (torch_dtdr.load) and patch()/unpatch()."""

from __future__ import annotations

import importlib
import io
import os
import pickle
import threading
import uuid
import warnings
from fractions import Fraction

import fsspec
import pytest
import torch

import torch_dtdr
from torch_dtdr import shim
from torch_dtdr.errors import CheckpointNotFoundError, DamageWarning, DTDRError, DTDRWarning, IntegrityError
from torch_dtdr.format.constants import MAGIC

from .helpers import assert_same, pseudo, zero_range

REAL_LOAD = torch.load
REAL_SAVE = torch.save


@pytest.fixture(autouse=True)
def _always_unpatched():
    assert torch.load is REAL_LOAD and torch.save is REAL_SAVE
    yield
    torch_dtdr.unpatch()
    assert torch.load is REAL_LOAD and torch.save is REAL_SAVE
    assert torch.serialization.load is REAL_LOAD and torch.serialization.save is REAL_SAVE


def _sd():
    return {"w": pseudo(600, seed=3).view(20, 30), "b": pseudo(30, torch.bfloat16, seed=4),
            "steps": torch.arange(5), "meta": {"epoch": 3, "name": "x"}}


def _check(obj, ref=None):
    ref = ref or _sd()
    assert set(obj) == set(ref)
    for k in ("w", "b", "steps"):
        assert_same(obj[k], ref[k])
    assert obj["meta"] == ref["meta"]


@pytest.fixture
def files(tmp_path):
    sd = _sd()
    d, p = tmp_path / "a.dtdr", tmp_path / "a.pt"
    torch_dtdr.save(sd, d)
    REAL_SAVE(sd, p)
    return d, p


class Custom:  # not allowed by weights_only=True
    def __init__(self, v):
        self.v = v


# ----------------------------------------------------------------------------- torch_dtdr.load


def test_load_reads_dtdr_and_hands_torch_files_to_torch_load(files):
    d, p = files
    for f in (d, str(d)):
        _check(torch_dtdr.load(f))
    for f in (p, str(p)):
        _check(torch_dtdr.load(f))
    assert torch_dtdr.load is shim.load
    assert shim.is_dtdr(d) and not shim.is_dtdr(p) and not shim.is_dtdr(d.parent / "missing")


def test_file_objects_dtdr_and_torch_with_position_kept(files):
    d, p = files
    with open(d, "rb") as fh:
        _check(torch_dtdr.load(fh))
    buf = io.BytesIO(b"prefix--" + p.read_bytes())
    buf.seek(8)
    assert not shim.is_dtdr(buf)
    assert buf.tell() == 8  # peeked and put back
    _check(torch_dtdr.load(buf))
    # a DTDR file that starts in the middle of a stream
    buf = io.BytesIO(b"prefix--" + d.read_bytes())
    buf.seek(8)
    assert shim.is_dtdr(buf) and buf.tell() == 8
    _check(torch_dtdr.load(buf))
    # a file object that cannot seek: handed to torch.load untouched
    class Stream(io.RawIOBase):
        def readable(self):
            return True

        def seekable(self):
            return False

    assert not shim.is_dtdr(Stream())


def test_fsspec_urls(files):
    d, p = files
    root = f"memory://shim-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/a.dtdr", d.read_bytes())
    fs.pipe(f"{root}/a.pt", p.read_bytes())
    _check(torch_dtdr.load(f"{root}/a.dtdr"))
    _check(torch_dtdr.load(f"{root}/a.pt"))  # torch.load cannot open URLs; we pass it a file object
    with pytest.raises(FileNotFoundError):
        torch_dtdr.load(f"{root}/missing.pt")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as e:
        torch_dtdr.load(tmp_path / "missing.pt")
    assert isinstance(e.value, FileNotFoundError) and "missing.pt" in str(e.value)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DTDRError):  # too short for anything: reported as a truncated DTDR file
        torch_dtdr.load(tmp_path / "empty")
    with torch_dtdr.patch():  # torch.load's own errors, as before
        with pytest.raises(FileNotFoundError) as ours:
            torch.load(tmp_path / "missing.pt")
        with pytest.raises(EOFError):
            torch.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as theirs:
        REAL_LOAD(tmp_path / "missing.pt")
    assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize("form", ["str", "device", "dict", "callable"])
def test_all_four_map_location_forms(files, form):
    d, p = files
    ml = {"str": "meta", "device": torch.device("meta"), "dict": {"cpu": "meta"},
          "callable": lambda storage, loc: torch.UntypedStorage(storage.nbytes(), device="meta")}[form]
    ours = torch_dtdr.load(d, map_location=ml)
    theirs = REAL_LOAD(p, map_location=ml)
    for k in ("w", "b", "steps"):
        assert ours[k].device.type == theirs[k].device.type == "meta"
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
    # forms that keep the data on the CPU
    keep = {"str": "cpu", "device": torch.device("cpu"), "dict": {"cuda:0": "meta"},
            "callable": lambda storage, loc: storage}[form]
    _check(torch_dtdr.load(d, map_location=keep))
    _check(REAL_LOAD(p, map_location=keep))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_map_location_cuda(tmp_path):
    sd = {"w": pseudo(1000).cuda(), "c": pseudo(10)}
    torch_dtdr.save(sd, tmp_path / "g.dtdr")
    out = torch_dtdr.load(tmp_path / "g.dtdr")
    assert out["w"].device.type == "cuda" and out["c"].device.type == "cpu"
    out = torch_dtdr.load(tmp_path / "g.dtdr", map_location={"cuda:0": "cpu"})
    assert out["w"].device.type == "cpu"
    out = torch_dtdr.load(tmp_path / "g.dtdr", map_location=lambda s, loc: s.cuda())
    assert out["c"].device.type == "cuda"
    assert_same(out["c"].cpu(), sd["c"])


def test_weights_only_and_pickle_args_pass_through(tmp_path):
    p = tmp_path / "custom.pt"
    REAL_SAVE({"obj": Custom(7)}, p)
    with pytest.raises(pickle.UnpicklingError):
        torch_dtdr.load(p)  # weights_only defaults to True, as torch.load's does
    assert torch_dtdr.load(p, weights_only=False)["obj"].v == 7
    assert torch_dtdr.load(p, pickle_module=pickle)["obj"].v == 7  # torch: a pickle_module means weights_only=False
    # on DTDR files the pickle arguments are irrelevant (nothing is unpickled) and accepted
    d = tmp_path / "x.dtdr"
    torch_dtdr.save(_sd(), d)
    _check(torch_dtdr.load(d, pickle_module=pickle, weights_only=False, encoding="latin1"))


def test_mmap(files):
    d, p = files
    _check(torch_dtdr.load(d, mmap=True))  # accepted, no effect yet
    out = torch_dtdr.load(p, mmap=True)
    _check(out)


def test_dtdr_keywords_errors_and_report(files):
    d, p = files
    obj, rep = torch_dtdr.load(d, report=True)
    _check(obj)
    assert rep.status == "exact"
    obj, rep = torch_dtdr.load(p, report=True)
    _check(obj)
    assert rep is None
    # damage one tensor's data beyond repair by parity: zero a large span of the file
    info = torch_dtdr.api.info(d)
    assert info["tensors"]
    size = os.path.getsize(d)
    zero_range(str(d), 4096, size // 2)
    with pytest.raises(IntegrityError):
        torch_dtdr.load(d, errors="strict")


# ----------------------------------------------------------------------------- patch()


def test_patch_makes_torch_load_read_both_and_unpatch_restores_the_object(files):
    d, p = files
    torch_dtdr.patch()
    assert torch.load is not REAL_LOAD and torch.serialization.load is torch.load
    _check(torch.load(d))
    _check(torch.load(str(p)))
    _check(torch.load(p, map_location="cpu", weights_only=True))
    obj, rep = torch.load(d, report=True, errors="strict")
    _check(obj)
    assert rep.status == "exact"
    torch_dtdr.unpatch()
    assert torch.load is REAL_LOAD and torch.serialization.load is REAL_LOAD
    with pytest.raises(Exception):
        torch.load(d)  # the real torch.load cannot read DTDR
    torch_dtdr.unpatch()  # no-op
    assert torch.load is REAL_LOAD


def test_patch_is_idempotent_and_nests_as_context_manager(files):
    d, _ = files
    with torch_dtdr.patch():
        wrapper = torch.load
        assert torch_dtdr.patch() is not None and torch.load is wrapper  # one wrapper, not two
        with torch_dtdr.patch():
            assert torch.load is wrapper
        assert torch.load is wrapper  # the inner block does not undo the outer one
        _check(torch.load(d))
        assert shim.is_patched()
    assert torch.load is REAL_LOAD and not shim.is_patched()


def test_patched_torch_load_forwards_other_calls_exactly(files):
    d, p = files
    calls = []

    def spy(f, *args, **kwargs):
        calls.append((f, args, kwargs))
        return "spied"

    torch.load = torch.serialization.load = spy
    try:
        with torch_dtdr.patch():
            assert torch.load is not spy
            assert torch.load(p, "cpu", None, weights_only=False, mmap=None, encoding="latin1") == "spied"
            assert calls == [(p, ("cpu", None), {"weights_only": False, "mmap": None, "encoding": "latin1"})]
            _check(torch.load(d))  # DTDR files never reach the previous torch.load
            assert len(calls) == 1
        assert torch.load is spy and torch.serialization.load is spy
    finally:
        torch.load = torch.serialization.load = REAL_LOAD


def test_patched_torch_load_keeps_torch_errors_and_defaults(tmp_path):
    p = tmp_path / "custom.pt"
    REAL_SAVE({"obj": Custom(1)}, p)
    with torch_dtdr.patch():
        with pytest.raises(FileNotFoundError):
            torch.load(tmp_path / "missing.pt")
        with pytest.raises(pickle.UnpicklingError):
            torch.load(p)
        assert torch.load(p, weights_only=False)["obj"].v == 1


def test_patched_torch_load_on_urls_and_file_objects(files):
    d, p = files
    root = f"memory://patched-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/a.dtdr", d.read_bytes())
    fs.pipe(f"{root}/a.pt", p.read_bytes())
    with torch_dtdr.patch():
        _check(torch.load(f"{root}/a.dtdr"))
        _check(torch.load(f"{root}/a.pt"))
        obj, rep = torch.load(f"{root}/a.pt", report=True, storage_options={})  # our keywords, not torch's
        _check(obj)
        assert rep is None
        buf = io.BytesIO(p.read_bytes())
        _check(torch.load(buf))
        with open(d, "rb") as fh:
            _check(torch.load(fh, map_location="cpu"))


def test_reload_while_patched_keeps_the_real_original(files):
    d, p = files
    with torch_dtdr.patch():
        importlib.reload(shim)
        assert shim.original_load() is REAL_LOAD and shim.original_save() is REAL_SAVE
        _check(shim.load(p))  # goes to the real torch.load, not to the wrapper
        assert shim.is_patched()
        shim.unpatch()  # the reloaded module undoes the patch made before the reload
        assert torch.load is REAL_LOAD
    importlib.reload(shim)
    assert torch_dtdr.load(d) is not None


def test_patch_is_thread_safe(files):
    d, p = files
    errors = []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(50):
                with torch_dtdr.patch(save=bool(i % 2)):
                    assert getattr(torch.load, shim._WRAPPER_FLAG, None) is not None or not shim.is_patched()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    torch_dtdr.unpatch()
    assert torch.load is REAL_LOAD and torch.save is REAL_SAVE
    with torch_dtdr.patch():
        _check(torch.load(d))


# ----------------------------------------------------------------------------- patch(save=True)


def test_patch_save_writes_dtdr_and_falls_back_for_what_it_cannot_store(tmp_path):
    sd = _sd()
    with torch_dtdr.patch(save=True, parity="strong"):
        assert torch.save is not REAL_SAVE
        torch.save(sd, tmp_path / "a.pt")
        buf = io.BytesIO()
        torch.save(sd, buf)
        assert (tmp_path / "a.pt").read_bytes()[:8] == MAGIC and buf.getvalue()[:8] == MAGIC
        assert torch_dtdr.api.info(tmp_path / "a.pt")["geometry"]["m"] == 4  # save options applied
        _check(torch.load(tmp_path / "a.pt"))
        buf.seek(0)
        _check(torch.load(buf))
        shim._save_fallback_warned = False
        with pytest.warns(DTDRWarning, match="pickle"):
            torch.save({"s": Fraction(1, 3)}, tmp_path / "set.pt")  # an unregistered class needs pickle
        assert (tmp_path / "set.pt").read_bytes()[:4] == b"PK\x03\x04"
        assert torch.load(tmp_path / "set.pt", weights_only=False) == {"s": Fraction(1, 3)}
        torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # pickle args: torch's own
        assert (tmp_path / "legacy.pt").read_bytes()[:8] != MAGIC
        with torch_dtdr.patch():  # save=False inside: torch.save is the original again
            assert torch.save is REAL_SAVE
        assert torch.save is not REAL_SAVE
    assert torch.save is REAL_SAVE and torch.load is REAL_LOAD
    torch.save(sd, tmp_path / "plain.pt")
    assert (tmp_path / "plain.pt").read_bytes()[:4] == b"PK\x03\x04"


def test_patch_save_off_by_default(tmp_path):
    with torch_dtdr.patch():
        torch.save(_sd(), tmp_path / "a.pt")
    assert (tmp_path / "a.pt").read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(TypeError):
        torch_dtdr.patch(codec="dtdr8")  # save options without save=True


def test_damage_warning_through_patched_load(files):
    d, _ = files
    from torch_dtdr import faults

    faults.corrupt(d, mode="replace", count=3, region="tensor:w", seed=0)  # within what parity repairs
    with torch_dtdr.patch(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _check(torch.load(d))
    assert any(issubclass(x.category, DamageWarning) for x in w)


def test_dtdr_file_with_a_destroyed_first_page_is_still_recognised(files):
    d, p = files
    zero_range(str(d), 0, 4096)  # the superblock and its magic are gone; the trailer says DTDR
    assert shim.is_dtdr(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        _check(torch_dtdr.load(d))
        buf = io.BytesIO(b"xx" + d.read_bytes())
        buf.seek(2)
        _check(torch_dtdr.load(buf))
        with torch_dtdr.patch():
            _check(torch.load(d))
    assert not shim.is_dtdr(p)
