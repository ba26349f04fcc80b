"""Issue 12, item 10: temp files of killed saves are removed by the next save
into the directory; a live writer's temp file never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
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


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors through /proc/self/fd")
def test_a_keyboard_interrupt_anywhere_in_opening_a_local_sink_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C can land between any two lines of the code that creates a save's temp file: this test raises
    KeyboardInterrupt at each traced event in turn (every call, line and return in the storage package and
    in ``os``). Each time the descriptor is closed exactly once (none leaks; none is closed twice, which
    raises EBADF in a finalizer or, in a threaded program, closes whichever file reused the number) and no
    temp file is left. (The one gap Python leaves, between a C call returning and its result being stored,
    has no line to trace.)"""
    import gc
    import threading

    import torch_dtdr.storage as storage_pkg
    from torch_dtdr.storage import open_sink

    traced = (os.path.dirname(storage_pkg.__file__), os.__file__)
    dest = tmp_path / "out.dtdr"
    dest.write_bytes(b"old")
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: unraisable.append(info.exc_value))
    interrupted = 0
    for target in range(1, 2000):
        events = 0

        def tracer(frame, event, arg):
            nonlocal events
            if threading.current_thread() is not threading.main_thread():
                return None
            if not frame.f_code.co_filename.startswith(traced):
                return None
            events += 1
            if events == target:
                raise KeyboardInterrupt
            return tracer

        before = _open_fds()
        sys.settrace(tracer)
        try:
            sink = open_sink(str(dest))
        except KeyboardInterrupt:
            sink = None
        finally:
            sys.settrace(None)
        if sink is not None:
            sink.abort()
            break
        interrupted += 1
        gc.collect()
        assert _open_fds() == before, f"a descriptor leaked (interrupt at event {target})"
        assert not unraisable, f"interrupt at event {target}: {unraisable!r}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dtdr"], f"interrupt at event {target}"
        assert dest.read_bytes() == b"old"
    else:
        pytest.fail("the sink was never created")
    assert interrupted > 20, interrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dtdr"]


# A save over an existing checkpoint that dies before the replaced file is unlinked.
_DIES_BEFORE_UNLINK = """
import os, sys, torch, torch_dtdr
from torch_dtdr.storage import sinks
sinks._unlink_later = lambda path: None
torch_dtdr.save({"w": torch.full((1000,), 2.0)}, sys.argv[1])
os._exit(0)
"""


def test_saving_over_a_checkpoint_frees_the_old_one_off_the_save_path(tmp_path, monkeypatch):
    """The file a save replaces keeps a temp name until a background thread
    unlinks it (freeing a large file's blocks took 0.14 s inside every save);
    the destination holds the new checkpoint as soon as save returns."""
    from torch_dtdr.storage import sinks

    dest = tmp_path / "ck.dtdr"
    torch_dtdr.save({"w": torch.full((1000,), 1.0)}, dest)
    handed = []
    monkeypatch.setattr(sinks, "_unlink_later", handed.append)
    torch_dtdr.save({"w": torch.full((1000,), 2.0)}, dest)
    assert torch.equal(torch_dtdr.load(dest)["w"], torch.full((1000,), 2.0))
    assert len(handed) == 1 and os.path.basename(handed[0]) in _temps(tmp_path)
    assert torch.equal(torch_dtdr.load(handed[0])["w"], torch.full((1000,), 1.0))  # the old one, not yet freed
    monkeypatch.undo()
    torch_dtdr.save({"w": torch.full((1000,), 3.0)}, dest)  # the real background unlink
    deadline = time.monotonic() + 30
    while len(os.listdir(tmp_path)) > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    sinks._unlink_quietly(handed[0])
    assert os.listdir(tmp_path) == ["ck.dtdr"]
    assert torch.equal(torch_dtdr.load(dest)["w"], torch.full((1000,), 3.0))


def test_a_replaced_checkpoint_left_by_a_dead_saver_is_removed_by_the_next_save(tmp_path):
    dest = tmp_path / "ck.dtdr"
    torch_dtdr.save({"w": torch.full((1000,), 1.0)}, dest)
    subprocess.run([sys.executable, "-c", _DIES_BEFORE_UNLINK, str(dest)], check=True, cwd=ROOT, timeout=300)
    left = _temps(tmp_path)
    assert len(left) == 1 and torch.equal(torch_dtdr.load(tmp_path / left[0])["w"], torch.full((1000,), 1.0))
    assert torch.equal(torch_dtdr.load(dest)["w"], torch.full((1000,), 2.0))
    torch_dtdr.save({"w": torch.zeros(3)}, tmp_path / "other.dtdr")
    assert _temps(tmp_path) == []


def test_without_hard_links_a_save_still_replaces_the_checkpoint(tmp_path, monkeypatch):
    from torch_dtdr.storage import sinks

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    dest = tmp_path / "ck.dtdr"
    torch_dtdr.save({"w": torch.full((1000,), 1.0)}, dest)
    monkeypatch.setattr(sinks.os, "link", no_links)
    torch_dtdr.save({"w": torch.full((1000,), 2.0)}, dest)
    assert os.listdir(tmp_path) == ["ck.dtdr"]
    assert torch.equal(torch_dtdr.load(dest)["w"], torch.full((1000,), 2.0))


def test_a_save_flushes_to_the_disk_as_it_goes(tmp_path, monkeypatch):
    """Past every WRITEBACK_BYTES a background fdatasync flushes what was written,
    so that the closing fsync is left the last stretch."""
    from torch_dtdr.storage import sinks

    synced = []
    real = os.fdatasync
    monkeypatch.setattr(sinks, "WRITEBACK_BYTES", 1 << 20)
    monkeypatch.setattr(sinks.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    sd = {"w": torch.randn(2 << 20)}
    torch_dtdr.save(sd, tmp_path / "ck.dtdr", codec="raw")
    assert synced
    assert torch.equal(torch_dtdr.load(tmp_path / "ck.dtdr")["w"], sd["w"])


def test_a_failed_background_flush_fails_the_save_and_keeps_the_old_file(tmp_path, monkeypatch):
    """Linux reports a write-back error to one fsync of a file description only:
    the error the background fdatasync saw must fail the commit, or the closing
    fsync would succeed over lost data."""
    import errno

    from torch_dtdr.errors import StorageError
    from torch_dtdr.storage import sinks

    dest = tmp_path / "ck.dtdr"
    torch_dtdr.save({"w": torch.ones(10)}, dest)

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sinks, "WRITEBACK_BYTES", 1 << 20)
    monkeypatch.setattr(sinks.os, "fdatasync", failing)
    with pytest.raises(StorageError):
        torch_dtdr.save({"w": torch.randn(2 << 20)}, dest, codec="raw")
    assert torch.equal(torch_dtdr.load(dest)["w"], torch.ones(10))
    assert os.listdir(tmp_path) == ["ck.dtdr"]
