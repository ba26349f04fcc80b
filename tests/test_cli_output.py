"""What the `dtdr` commands print for a person and a script: verify's one line per clean file and its
table for damaged ones, info's sizes and real parity overhead, convert's summary and warnings, and the
commands that leave a clean file alone (run as real processes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import torch_dtdr
from torch_dtdr.faults import corrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dtdr(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "torch_dtdr.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def _model(path, **kwargs) -> None:
    torch.manual_seed(0)
    torch_dtdr.save({"w": torch.randn(50_000), "b": torch.randn(16)}, path, **kwargs)


def test_verify_several_paths_and_a_quoted_glob(tmp_path):
    for name in ("a", "b", "c"):
        _model(tmp_path / f"{name}.dtdr")
    corrupt(str(tmp_path / "c.dtdr"), mode="bitflip", count=3, seed=1, region="tensor:w")
    proc = _dtdr("verify", "a.dtdr", "*.dtdr", cwd=tmp_path)  # the glob is quoted: dtdr expands it
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the worst file: repairable
    lines = proc.stdout.splitlines()
    clean = [line for line in lines if re.fullmatch(r"[abc]\.dtdr +\S+ \S+ +clean +\d+\.\d\d s +\d+\.\d MB/s", line)]
    assert [line.split()[0] for line in clean] == ["a.dtdr", "a.dtdr", "b.dtdr"]  # one line per clean file
    damaged = lines.index(next(line for line in lines if line.startswith("c.dtdr")))
    assert "damaged, repairable exactly" in lines[damaged]
    header = next(line for line in lines if "wrong bytes repaired" in line)
    assert header.split()[:3] == ["tensor", "status", "codec"] and "unrepaired bytes (whole chunks)" in header
    row_w = next(line for line in lines if line.split()[:2] == ["w", "repaired"])
    assert int(row_w.split()[3]) == 3  # the 3 flipped bytes, restored
    assert "heal it with: dtdr repair c.dtdr" in proc.stdout
    assert lines[-1].startswith("4 paths, ") and lines[-1].endswith(
        "3 clean, 1 repairable, 0 degraded or lost, 0 unreadable")
    assert proc.stderr == ""


def test_verify_exit_status_is_the_worst_files_and_a_missing_file_is_one_line(tmp_path):
    _model(tmp_path / "a.dtdr")
    proc = _dtdr("verify", "a.dtdr", "missing.dtdr", cwd=tmp_path)
    assert proc.returncode == 3
    assert any(line.startswith("missing.dtdr") and "CheckpointNotFoundError" in line
               for line in proc.stdout.splitlines())
    assert "Traceback" not in proc.stderr


def test_verify_clean_file_table_only_with_verbose(tmp_path):
    _model(tmp_path / "a.dtdr")
    quiet = _dtdr("verify", "a.dtdr", cwd=tmp_path)
    assert quiet.returncode == 0 and len(quiet.stdout.splitlines()) == 1
    verbose = _dtdr("verify", "-v", "a.dtdr", cwd=tmp_path)
    assert "wrong bytes repaired" in verbose.stdout and len(verbose.stdout.splitlines()) > 3


def test_verify_json_one_object_or_an_array(tmp_path):
    _model(tmp_path / "a.dtdr")
    _model(tmp_path / "b.dtdr")
    one = json.loads(_dtdr("verify", "--json", "a.dtdr", cwd=tmp_path).stdout)
    assert one["file"] == "a.dtdr" and one["status"] == "exact" and one["size"] == os.path.getsize(tmp_path / "a.dtdr")
    several = json.loads(_dtdr("verify", "--json", "a.dtdr", "b.dtdr", cwd=tmp_path).stdout)
    assert [d["file"] for d in several] == ["a.dtdr", "b.dtdr"] and all(d["exit_code"] == 0 for d in several)


def test_verify_degraded_file_names_the_salvage_command(tmp_path):
    path = tmp_path / "a.dtdr"
    _model(path, parity="off")
    corrupt(str(path), mode="bitflip", count=20, seed=2, region="tensor:w")
    proc = _dtdr("verify", "a.dtdr", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout.splitlines()[-1] == ("  write a copy with the degraded tensors marked: "
                                            "dtdr repair a.dtdr -o a.repaired.dtdr")


def test_info_sizes_ratio_and_the_real_archive_overhead(tmp_path):
    path = tmp_path / "a.dtdr"
    torch_dtdr.save({"w": torch.randn(50_000), "q": torch.randn(64, 64)}, path, parity="archive",
                    codec={"w": "dtdr", "q": "dtdr8"}, metadata={"model": "tiny", "source": "x" * 400})
    proc = _dtdr("info", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # 2 parity chunks per 32 data chunks, plus 608 inner-code bytes for each of the 34 4096-byte chunks
    expected = 100 * (2 * 4096 + 34 * 608) / (32 * 4096)
    assert f"overhead {expected:.2f} %" in out and "6.25 %" not in out
    assert re.search(r"^  dtdr +1 +\S+ \S+ +\S+ \S+ +\d+\.\d\dx$", out, re.M)
    assert re.search(r"^  dtdr8 +1 ", out, re.M) and re.search(r"^  total +2 ", out, re.M)
    assert "KiB" in out
    metadata = next(line for line in out.splitlines() if line.startswith("  metadata:"))
    assert metadata.endswith("...") and len(metadata) < 130
    full = _dtdr("info", "-v", str(path)).stdout
    assert "x" * 400 in full


def test_info_on_a_dcp_folder(tmp_path):
    _model(tmp_path / "a.dtdr")
    assert _dtdr("convert", "a.dtdr", "ck", "--to", "dcp", cwd=tmp_path).returncode == 0
    proc = _dtdr("info", "ck", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ck: DTDR DCP checkpoint, ") and "__0_0.dtdr" in proc.stdout
    doc = json.loads(_dtdr("info", "--json", "ck", cwd=tmp_path).stdout)
    assert doc["folder"] == "ck" and any(f["file"].endswith("__0_0.dtdr") for f in doc["files"])


def test_parity_help_lists_archive():
    for command in ("convert", "dcp-convert"):
        assert "archive" in _dtdr(command, "--help").stdout


def test_convert_prints_what_it_wrote_and_warns_on_lossy_to_safetensors(tmp_path):
    torch_dtdr.save({"w": torch.randn(20_000)}, tmp_path / "q.dtdr", codec="dtdr8")
    proc = _dtdr("convert", "q.dtdr", "q.safetensors", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lossy codec(s) dtdr8" in proc.stderr and "dequantised" in proc.stderr
    assert re.search(r"-> safetensors: q\.safetensors \(\S+ \S+, \d+\.\d\d % of the source\)", proc.stdout)
    back = _dtdr("convert", "q.safetensors", "r.dtdr", "--parity", "archive", cwd=tmp_path)
    assert back.stderr == ""  # lossless source: no warning
    assert "codec dtdr, parity archive" in back.stdout


@pytest.mark.skipif(not hasattr(os, "umask"), reason="POSIX permissions")
def test_convert_outputs_get_the_usual_permissions(tmp_path):
    save_file({"w": torch.randn(100)}, str(tmp_path / "m.safetensors"))
    old = os.umask(0o022)
    try:
        assert _dtdr("convert", "m.safetensors", "m.dtdr", cwd=tmp_path).returncode == 0
        assert _dtdr("convert", "m.dtdr", "back.safetensors", cwd=tmp_path).returncode == 0
    finally:
        os.umask(old)
    for name in ("m.dtdr", "back.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


def test_repair_leaves_a_clean_file_alone(tmp_path):
    path = tmp_path / "a.dtdr"
    _model(path)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    before = path.read_bytes()
    proc = _dtdr("repair", str(path))
    assert proc.returncode == 0 and "is clean: nothing to repair" in proc.stdout
    assert path.read_bytes() == before and os.stat(path).st_mtime == 1_000_000_000


def test_a_second_undo_says_the_file_is_already_restored(tmp_path):
    path = tmp_path / "a.dtdr"
    _model(path)
    before = path.read_bytes()
    record = tmp_path / "r.json"
    assert _dtdr("corrupt", str(path), "--mode", "bitflip", "--count", "4", "--seed", "1", "--record",
                 str(record)).returncode == 0
    first = _dtdr("undo", str(record))
    assert first.returncode == 0 and first.stdout.startswith("restored ")
    second = _dtdr("undo", str(record))
    assert second.returncode == 0 and "already restored" in second.stdout and second.stderr == ""
    assert path.read_bytes() == before
    path.write_bytes(before[:-10] + b"0123456789")  # neither damaged as recorded nor the original
    third = _dtdr("undo", str(record))
    assert third.returncode == 3 and third.stderr.startswith("dtdr: IntegrityError: ")


def _on_a_terminal(args: list[str]) -> str:
    """Run ``args`` with stdout and stderr on a pseudo-terminal (120 columns) and return what it wrote."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_progress_counts_bytes_on_a_terminal_and_is_off_in_a_pipe(tmp_path):
    path = tmp_path / "m.dtdr"
    torch_dtdr.save({f"w{i}": torch.randn(500_000) for i in range(4)}, path, codec="raw")
    shown = _on_a_terminal([sys.executable, "-m", "torch_dtdr.cli", "repair", str(path), "-o", str(tmp_path / "o.dtdr")])
    assert re.search(r"repair: +\d+%\|.*\| [\d.]+[kMG]?/7\.6\dM \[", shown), shown  # a bar over the bytes (7.6 MiB)
    assert "B/s" in shown and "tensor" not in shown
    saved = _on_a_terminal([sys.executable, "-c", "import torch, torch_dtdr; torch_dtdr.save("
                            "{'w': torch.zeros(3_000_000)}, %r, progress=True)" % str(tmp_path / "s.dtdr")])
    assert re.search(r"save: +\d+%\|.*/11\.4M \[", saved), saved
    loaded = _on_a_terminal([sys.executable, "-c", "import torch_dtdr; torch_dtdr.load(%r, progress=True)" % str(path)])
    assert re.search(r"load: +\d+%\|.*\| [\d.]+[kMG]?/7\.6\dM \[", loaded), loaded  # bytes, not tensors
    assert "B/s" in loaded and "tensor" not in loaded
    save_file({"w": torch.zeros(3_000_000)}, str(tmp_path / "m.safetensors"))
    converted = _on_a_terminal([sys.executable, "-m", "torch_dtdr.cli", "convert", str(tmp_path / "m.safetensors"),
                                str(tmp_path / "c.dtdr")])
    assert re.search(r"save: +\d+%\|.*/11\.4M \[", converted), converted
    piped = _dtdr("repair", str(path), "-o", str(tmp_path / "p.dtdr"))
    assert piped.returncode == 0 and piped.stderr == ""  # no bar when not a terminal


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_sweep_progress_counts_the_bytes_of_the_runs(tmp_path):
    torch.manual_seed(0)
    save_file({"w": torch.randn(300_000), "b": torch.randn(64)}, str(tmp_path / "tiny.safetensors"))
    shown = _on_a_terminal([sys.executable, "-m", "torch_dtdr.cli", "sweep", str(tmp_path / "tiny.safetensors"),
                            "--fractions", "0,1e-4", "--seeds", "2", "--formats", "dtdr", "--workers", "1",
                            "--out", str(tmp_path / "out"), "--keep-work"])
    runs_bytes = 4 * os.path.getsize(tmp_path / "out" / ".sweep-work" / "dtdr.dtdr")  # 2 fractions x 2 seeds
    from tqdm import tqdm

    total = tqdm.format_sizeof(runs_bytes, divisor=1024)
    assert re.search(r"sweep: +100%\|.*\| " + re.escape(total) + "/" + re.escape(total) + r" \[", shown), shown
    assert "B/s" in shown and "run/s" not in shown and "s/run" not in shown
    piped = _dtdr("sweep", str(tmp_path / "tiny.safetensors"), "--fractions", "0", "--seeds", "1", "--formats", "dtdr",
                  "--workers", "1", "--out", str(tmp_path / "out2"))
    assert piped.returncode == 0 and "sweep:" not in piped.stderr  # no bar when not a terminal


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_conversions_to_safetensors_and_dcp_show_bytes_on_a_terminal(tmp_path):
    torch.manual_seed(0)
    torch_dtdr.save({"w": torch.randn(3_000_000), "b": torch.randn(16)}, tmp_path / "m.dtdr")
    raw = f"{(3_000_000 + 16) * 4 / 2**20:.1f}M"  # the tensor bytes the safetensors output holds (11.4 MiB)
    to_st = _on_a_terminal([sys.executable, "-m", "torch_dtdr.cli", "convert", str(tmp_path / "m.dtdr"),
                            str(tmp_path / "m.safetensors")])
    assert re.search(r"convert: +\d+%\|.*\| [\d.]+[kMG]?/" + re.escape(raw) + r" \[", to_st), to_st
    assert "B/s" in to_st
    to_dcp = _on_a_terminal([sys.executable, "-m", "torch_dtdr.cli", "convert", str(tmp_path / "m.dtdr"),
                             str(tmp_path / "ck"), "--to", "dcp"])
    assert re.search(r"load: +\d+%\|.*B/s", to_dcp) and re.search(r"save: +\d+%\|.*B/s", to_dcp), to_dcp
    back = _on_a_terminal([sys.executable, "-m", "torch_dtdr.cli", "convert", str(tmp_path / "ck"),
                           str(tmp_path / "back.dtdr")])
    assert re.search(r"save: +\d+%\|.*B/s", back), back
    piped = _dtdr("convert", "m.dtdr", "p.safetensors", cwd=tmp_path)
    assert piped.returncode == 0 and piped.stderr == ""  # no bar when not a terminal
