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
    """An exception torch_dtdr does not raise on purpose (a bug) is one line and exit 4: a command whose
    run function raises a plain RuntimeError, run through the real entry point."""
    code = ("import sys, torch_dtdr.cli.inspect as commands\n"
            "def broken(args):\n    raise RuntimeError('a bug\\nover two lines')\n"
            "commands.run_info = broken\n"
            "from torch_dtdr.cli import main\nsys.exit(main(['info', 'whatever.dtdr']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == ["dtdr: RuntimeError: a bug over two lines"], proc.stderr


def _bad_inputs(tmp: str) -> dict:
    """Files the bad-argument cases use: a model, a safetensors file, an empty folder, a plain file."""
    from safetensors.torch import save_file

    paths = {"model": os.path.join(tmp, "model.dtdr"), "st": os.path.join(tmp, "model.safetensors"),
             "empty": os.path.join(tmp, "emptydir"), "plain": os.path.join(tmp, "plain.txt")}
    torch_dtdr.save({"w": torch.arange(64, dtype=torch.float32)}, paths["model"])
    save_file({"w": torch.arange(64, dtype=torch.float32)}, paths["st"])
    os.mkdir(paths["empty"])
    with open(paths["plain"], "w") as f:
        f.write("not a checkpoint\n")
    return paths


#: Every command with arguments that cannot work, and the documented status: 3 for a torch_dtdr or I/O
#: error (one line, ``dtdr: <Type>: ...``), 2 for what argparse refuses (its usage, then one error line).
BAD_ARGUMENTS = [
    (["info", "{missing}"], 3, "CheckpointNotFoundError"),
    (["info", "{plain}"], 3, "Error"),
    (["verify", "{missing}"], 3, "CheckpointNotFoundError"),
    (["verify", "{plain}"], 3, "report"),  # a verify report (stdout), not a failure
    (["repair", "{missing}"], 3, "CheckpointNotFoundError"),
    (["repair", "{plain}"], 3, "Error"),
    (["convert", "{st}", "{tmp}/x.dtdr", "--parity", "high"], 3, "ArgumentError"),
    (["convert", "{st}", "{tmp}/x.dtdr", "--parity", "300,4"], 3, "ArgumentError"),
    (["convert", "{st}", "{tmp}/x.dtdr", "--codec", "nope"], 3, "Error"),
    (["convert", "{empty}/", "{tmp}/a.dtdr"], 3, "FormatError"),
    (["convert", "{model}", "{plain}/x.safetensors"], 3, "Error"),
    (["convert", "{missing}", "{tmp}/a.dtdr"], 3, "Error"),
    (["dcp-convert", "{missing}", "{tmp}/ck"], 3, "Error"),
    (["sweep", "{model}", "--formats", "dtdr,foo", "--out", "{tmp}/sw", "--no-progress"], 3, "ArgumentError"),
    (["corrupt", "{model}", "--mode", "bitflip", "--seed", "1", "--count", "-3", "-o", "{tmp}/z.dtdr"], 3,
     "ArgumentError"),
    (["corrupt", "{missing}", "--mode", "bitflip", "--seed", "1", "--count", "1"], 3, "Error"),
    (["undo", "{missing}"], 3, "Error"),
    (["undo", "{plain}"], 3, "Error"),
    (["info"], 2, None),
    (["verify"], 2, None),
    (["repair"], 2, None),
    (["convert", "{st}"], 2, None),
    (["convert", "{st}", "{tmp}/x.dtdr", "--parity", "x,y"], 2, None),
    (["sweep", "{model}"], 2, None),
    (["corrupt", "{model}", "--mode", "nope", "--seed", "1"], 2, None),
    (["undo"], 2, None),
]


@pytest.mark.parametrize("args,status,error_type", BAD_ARGUMENTS, ids=[" ".join(a[0]) for a in BAD_ARGUMENTS])
def test_every_command_refuses_bad_arguments_in_one_line(tmp_path, args, status, error_type):
    paths = _bad_inputs(str(tmp_path))
    paths.update(tmp=str(tmp_path), missing=str(tmp_path / "missing.dtdr"))
    proc = _dtdr(*[a.format(**paths) for a in args])
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    if error_type == "report":
        assert proc.stderr == "" and "UNREADABLE" in proc.stdout.splitlines()[0], proc.stdout
    elif status == 2:  # argparse: its usage, then one error line
        assert lines[0].startswith("usage: dtdr") and lines[-1].startswith(f"dtdr {args[0]}: error: "), proc.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("dtdr: "), proc.stderr
        if error_type:
            assert lines[0].split(":")[1].strip().endswith(error_type), lines[0]


def test_parity_accepts_a_tuple_as_python_writes_it(tmp_path):
    paths = _bad_inputs(str(tmp_path))
    out = tmp_path / "x.dtdr"
    proc = _dtdr("convert", paths["st"], str(out), "--parity", "(16, 4)")
    assert proc.returncode == 0, proc.stderr
    assert torch_dtdr.info(str(out))["geometry"]["k"] == 16 and torch_dtdr.info(str(out))["geometry"]["m"] == 4


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_into_a_read_only_folder_is_one_line(tmp_path):
    paths = _bad_inputs(str(tmp_path))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = _dtdr("convert", paths["model"], str(ro / "x.safetensors"))
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["info"], ["verify", "x", "--max-workers", "0"], ["convert", "a", "b", "--parity", "x,y"],
                                  ["no-such-command"]])
def test_usage_errors_exit_2(args):
    proc = _dtdr(*args)
    assert proc.returncode == 2, proc.stderr
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["info"], ["verify", "-v"], ["info", "--json"]])
def test_a_closed_pipe_ends_the_command_quietly(tmp_path, command):
    """`dtdr info f | head -1`: the reader goes away; no BrokenPipeError traceback."""
    src = tmp_path / "many.dtdr"
    torch_dtdr.save({f"tensor_with_a_long_name_{i:05d}": torch.zeros(1) for i in range(3000)}, src,
                    parity="off")
    proc = subprocess.Popen([sys.executable, "-m", "torch_dtdr.cli", *command, str(src)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    first = proc.stdout.readline()
    proc.stdout.close()  # output is far larger than a pipe buffer: the command is still writing
    _, err = proc.communicate(timeout=120)
    assert first.strip()
    assert proc.returncode == 0
    assert err == b"", err.decode()


def test_an_interrupted_repair_exits_130_and_leaves_the_file(tmp_path):
    """Ctrl-C while `dtdr repair` writes its temp file: one line, status 130, the damaged file as it was and
    no temp file left behind."""
    src = tmp_path / "big.dtdr"
    torch_dtdr.save({f"w{i}": torch.randn(4_000_000) for i in range(8)}, src, codec="raw")
    from torch_dtdr.faults import corrupt

    corrupt(str(src), mode="bitflip", count=50, seed=3)
    before = src.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "torch_dtdr.cli", "repair", str(src)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 100
    while (proc.poll() is None and time.monotonic() < deadline
           and not any(name.endswith(".dtdr-tmp") for name in os.listdir(tmp_path))):
        time.sleep(0.005)
    assert proc.poll() is None, "the repair ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines() == ["dtdr: interrupted; nothing written"], err.decode()
    assert src.read_bytes() == before
    assert os.listdir(tmp_path) == ["big.dtdr"]


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
