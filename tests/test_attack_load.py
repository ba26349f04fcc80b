"""Issue 12, items 8 and 9: non-DTDR input gets typed errors at once (never a
hang, never advice to disable weights_only), and lost tensors are never
returned silently as None."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr.errors import DamageWarning, DTDRError, FormatError, IntegrityError, TruncatedError

from .helpers import pseudo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------- item 8


class Custom:
    """A class torch's weights-only unpickler refuses."""


def _loaders():
    return {
        "shim.load": lambda p: torch_dtdr.load(p),
        "api.load": lambda p: torch_dtdr.api.load(p),
        "open": lambda p: torch_dtdr.open(p).close(),
        "verify": lambda p: torch_dtdr.verify(p),
    }


@pytest.mark.parametrize("loader", sorted(_loaders()))
def test_a_directory_is_a_typed_error(tmp_path, loader):
    with pytest.raises(DTDRError) as ei:
        _loaders()[loader](tmp_path)
    assert "directory" in str(ei.value)


@pytest.mark.parametrize("loader", sorted(_loaders()))
def test_a_fifo_is_a_typed_error_not_a_hang(tmp_path, loader):
    """Run in a subprocess with a timeout: the old code blocks forever in open(2)."""
    fifo = tmp_path / "x.dtdr"
    os.mkfifo(fifo)
    code = ("import sys, torch_dtdr\n"
            "from torch_dtdr.errors import DTDRError\n"
            f"call = {{'shim.load': torch_dtdr.load, 'api.load': torch_dtdr.api.load,"
            f" 'open': torch_dtdr.open, 'verify': torch_dtdr.verify}}[{loader!r}]\n"
            "try:\n    call(sys.argv[1])\nexcept DTDRError as e:\n    print('TYPED', type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert "TYPED" in proc.stdout and "not a regular file" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("content, looks", [
    (os.urandom(4096), "unrecognised"),
    (b"hello world, this is a plain text file\n" * 20, "text"),
    (b'{"a": 1}', "text"),
    (b"", "empty"),
    (b"PK\x05\x06" + bytes(18), None),  # an empty zip archive: torch's own file format family
])
def test_non_dtdr_non_torch_files_get_a_format_error(tmp_path, content, looks):
    p = tmp_path / "x.dtdr"
    p.write_bytes(content)
    if content == b"":
        with pytest.raises(TruncatedError):  # shorter than the magic and beginning like it
            torch_dtdr.load(p)
        return
    with pytest.raises(Exception) as ei:
        torch_dtdr.load(p)
    if looks is None:  # a zip file: torch.load's own error passes through unchanged
        assert not isinstance(ei.value, DTDRError)
        return
    err = ei.value
    assert isinstance(err, FormatError), repr(err)
    assert str(p) in str(err) and looks in str(err)
    assert err.__cause__ is not None  # torch's error, chained
    text = str(err) + str(err.__cause__)
    assert "weights_only=False" not in text.replace(" ", "") and "`weights_only` set to `False`" not in text


def test_genuine_torch_files_still_pass_through(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.arange(3)}, p)
    assert torch.equal(torch_dtdr.load(p)["a"], torch.arange(3))
    q = tmp_path / "custom.pt"
    torch.save({"c": Custom()}, q)
    with pytest.raises(Exception) as ei:  # torch's own refusal, unchanged
        torch_dtdr.load(q)
    assert not isinstance(ei.value, DTDRError)
    assert type(ei.value).__module__.startswith(("pickle", "_pickle", "torch"))


# ----------------------------------------------------------------------------------------- item 9


def _truncated(tmp_path):
    sd = {"first": pseudo(4096, seed=1), "second": pseudo(1 << 16, seed=2), "third": pseudo(1 << 16, seed=3)}
    p = tmp_path / "t.dtdr"
    torch_dtdr.save(sd, p, parity="off")
    size = os.path.getsize(p)
    with open(p, "r+b") as fh:
        fh.truncate(size * 3 // 10)  # inside "second": "third" has no record left
    return p, sd


def test_load_never_returns_lost_tensors_as_none_by_default(tmp_path):
    p, _sd = _truncated(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        with pytest.raises(TruncatedError) as ei:
            torch_dtdr.load(p)
        assert "third" in str(ei.value)
        with pytest.raises(IntegrityError):
            torch_dtdr.api.load(p)
        with pytest.raises(IntegrityError):
            torch_dtdr.open(p).load()


def test_partial_load_is_explicit_and_lists_the_lost(tmp_path):
    p, sd = _truncated(tmp_path)
    with pytest.warns(DamageWarning) as w:
        obj, rep = torch_dtdr.load(p, partial=True, report=True)
    assert obj["third"] is None
    assert torch.equal(obj["first"], sd["first"])
    lost = [t.name for t in rep.tensors if t.status == "lost"]
    assert "third" in lost
    assert "third" in rep.summary() and "lost:" in rep.summary()
    assert any("third" in str(x.message) for x in w)
    with pytest.raises(DTDRError):
        torch_dtdr.load(p, partial=True, errors="strict")


def test_load_model_raises_integrity_error_listing_the_lost(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256))
    p = tmp_path / "m.dtdr"
    torch_dtdr.save_model(model, p, parity="off")
    with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        with pytest.raises(IntegrityError) as ei:
            torch_dtdr.load_model(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256)), p)
    assert "1.bias" in str(ei.value)


def test_load_model_of_a_non_state_dict_is_a_typed_type_error(tmp_path):
    from torch_dtdr.errors import ObjectTypeError

    p = tmp_path / "list.dtdr"
    torch_dtdr.save([torch.ones(2)], p)
    with pytest.raises(ObjectTypeError) as ei:
        torch_dtdr.load_model(torch.nn.Linear(2, 2), p)
    assert isinstance(ei.value, TypeError) and str(p) in str(ei.value)
