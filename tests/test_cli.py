"""The `dtdr` command's one error path, its exit statuses, and its start-up cost (run as a real process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import torch_dtdr
from torch_dtdr.format.constants import FORMAT_MAJOR, FORMAT_MINOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _dtdr(*args, python_flags=(), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", "torch_dtdr.cli", *args], capture_output=True,
                          text=True, env=_env(), timeout=120, **kwargs)


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    proc = _dtdr(flag, python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr
    modules = _imported_modules(proc.stderr)
    assert "torch_dtdr.cli" in modules  # the measurement works
    heavy = sorted(m for m in modules if m == "torch" or m.startswith("torch.") or m in ("numpy", "fsspec"))
    assert not heavy, heavy


def test_version_names_the_package_and_the_format():
    proc = _dtdr("--version")
    assert proc.returncode == 0
    from torch_dtdr.codecs import native

    assert proc.stdout.strip() == (f"torch-dtdr {torch_dtdr.__version__} (DTDR format {FORMAT_MAJOR}.{FORMAT_MINOR}, "
                                   f"codec core: {native.core()})")


def test_help_lists_the_commands_but_not_the_hidden_alias():
    proc = _dtdr("--help")
    for name in ("info", "verify", "repair", "convert", "corrupt", "undo", "sweep"):
        assert name in proc.stdout
    assert "dcp-convert" not in proc.stdout
    assert "exits 3" in proc.stdout  # the documented statuses


def test_a_failure_is_one_line_with_its_type_and_status_3(tmp_path):
    missing = tmp_path / "missing.dtdr"
    proc = _dtdr("info", str(missing))
    assert proc.returncode == 3
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dtdr: CheckpointNotFoundError: ") and str(missing) in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_damaged_file_that_cannot_be_read_is_one_line(tmp_path):
    bad = tmp_path / "bad.dtdr"
    bad.write_bytes(b"not a checkpoint at all" * 100)
    proc = _dtdr("info", str(bad))
    assert proc.returncode == 3
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("dtdr: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = _dtdr("--debug", "info", str(tmp_path / "missing.dtdr"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CheckpointNotFoundError" in proc.stderr


def test_an_unexpected_exception_is_one_line_with_status_4(tmp_path):
    """An error torch_dtdr does not raise on purpose (here sweep's ValueError for an unknown format)."""
    src = tmp_path / "m.dtdr"
    torch_dtdr.save({"w": torch.arange(8, dtype=torch.float32)}, src)
    proc = _dtdr("sweep", str(src), "--formats", "no-such-format", "--fractions", "0", "--seeds", "1",
                 "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("dtdr: ValueError: ")
    assert "no-such-format" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["info"], ["verify", "x", "--max-workers", "0"], ["convert", "a", "b", "--parity", "x,y"],
                                  ["no-such-command"]])
def test_usage_errors_exit_2(args):
    proc = _dtdr(*args)
    assert proc.returncode == 2, proc.stderr
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`dtdr info f | head -1`: the reader goes away; no BrokenPipeError traceback."""
    src = tmp_path / "many.dtdr"
    torch_dtdr.save({f"tensor_with_a_long_name_{i:05d}": torch.zeros(1) for i in range(3000)}, src,
                    parity="off")
    proc = subprocess.Popen([sys.executable, "-m", "torch_dtdr.cli", "info", str(src)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    first = proc.stdout.readline()
    proc.stdout.close()  # output is far larger than a pipe buffer: the command is still writing
    _, err = proc.communicate(timeout=120)
    assert first.startswith(str(src).encode())
    assert proc.returncode == 0
    assert err == b"", err.decode()


def test_an_interrupt_exits_130_with_one_line(tmp_path):
    src = tmp_path / "m.dtdr"
    torch_dtdr.save({f"w{i}": torch.randn(20_000) for i in range(8)}, src)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "torch_dtdr.cli", "sweep", str(src), "--out", str(out),
                             "--fractions", ",".join(["1e-4"] * 1) + ",1e-3,1e-2", "--seeds", "200", "--workers", "1",
                             "--no-progress", "--formats", "dtdr,dtdr8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 100
    while not (out / "sweep.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == "dtdr: interrupted"
    assert b"Traceback" not in err
