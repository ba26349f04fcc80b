"""Issue 12, item 10: temp files of killed saves are removed by the next save
into the directory; a live writer's temp file never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

import torch_dtdr
from torch_dtdr.storage import TEMP_SUFFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A writer that opens a sink, writes, prints READY and then waits: a save in progress.
_LIVE_WRITER = """
import sys, time
from torch_dtdr.storage import open_sink
sink = open_sink(sys.argv[1])
sink.write(b"x" * 4096)
sink._f.flush()
print("READY", flush=True)
time.sleep(600)
"""

# A real save of ~64 MB, killed with SIGKILL by the test while it writes.
_SAVER = """
import sys, torch, torch_dtdr
torch_dtdr.save({"w": torch.randn(16 << 20)}, sys.argv[1], parity="off", codec="raw")
"""


def _temps(d):
    return sorted(n for n in os.listdir(d) if n.endswith(TEMP_SUFFIX))


def _spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))


def _kill_while_writing(d, target):
    proc = _spawn(_SAVER, str(target))
    deadline = time.monotonic() + 60
    while (not any(f".{proc.pid}@" in n for n in _temps(d)) and time.monotonic() < deadline
           and proc.poll() is None):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def test_temp_files_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / "big.dtdr"
    _kill_while_writing(tmp_path, target)
    (first,) = _temps(tmp_path)  # the killed save left its temp file (and no destination)
    _kill_while_writing(tmp_path, target)
    (second,) = _temps(tmp_path)  # the second save removed the first's before it was killed too
    assert second != first
    assert not target.exists()
    torch_dtdr.save({"a": torch.ones(4)}, tmp_path / "other.dtdr")
    assert _temps(tmp_path) == []
    assert torch.equal(torch_dtdr.load(tmp_path / "other.dtdr")["a"], torch.ones(4))


def test_a_live_writers_temp_file_is_never_removed(tmp_path):
    live = _spawn(_LIVE_WRITER, str(tmp_path / "live.dtdr"))
    try:
        assert live.stdout.readline().strip() == "READY"
        (held,) = _temps(tmp_path)
        torch_dtdr.save({"a": torch.ones(4)}, tmp_path / "x.dtdr")
        torch_dtdr.save({"a": torch.ones(4)}, tmp_path / "live.dtdr")
        assert _temps(tmp_path) == [held]
        assert os.path.getsize(tmp_path / held) == 4096
    finally:
        live.kill()
        live.wait()
    torch_dtdr.save({"a": torch.ones(4)}, tmp_path / "x.dtdr")  # now its writer is gone
    assert _temps(tmp_path) == []


def test_foreign_and_old_style_temp_files_are_left_alone(tmp_path):
    other_host = tmp_path / f".m.dtdr.0123456789ab.1@some-other-host{TEMP_SUFFIX}"
    old_style = tmp_path / f".m.dtdr.0123456789ab{TEMP_SUFFIX}"
    unrelated = tmp_path / "notes.txt"
    for p in (other_host, old_style, unrelated):
        p.write_bytes(b"keep")
    torch_dtdr.save({"a": torch.ones(4)}, tmp_path / "m.dtdr")
    assert all(p.read_bytes() == b"keep" for p in (other_host, old_style, unrelated))
