"""New tensors for decoded values: large ones advised onto transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torch_dtdr
from torch_dtdr import _memory as memory

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists(THP),
                               reason="needs Linux with transparent huge pages (madvise MADV_HUGEPAGE)")


def vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_a_large_tensor_has_its_whole_huge_pages_advised():
    values = memory.empty(6 << 20, torch.float32)  # 24 MiB
    assert values.shape == (6 << 20,) and values.dtype == torch.float32
    assert values.untyped_storage().resizable()  # an ordinary torch tensor
    start = values.data_ptr()
    first = -(-start // memory.HUGE_PAGE) * memory.HUGE_PAGE
    last = (start + values.nbytes) // memory.HUGE_PAGE * memory.HUGE_PAGE
    assert last - first >= 10 * memory.HUGE_PAGE
    assert "hg" in vm_flags(first) and "hg" in vm_flags(last - 1)
    values.fill_(1.5)
    assert float(values.sum()) == 1.5 * (6 << 20)


@needs_thp
def test_only_whole_pages_inside_the_range_are_advised():
    page = memory.HUGE_PAGE
    buf = torch.empty(5 * page, dtype=torch.uint8)
    base = -(-buf.data_ptr() // page) * page
    assert memory.advise_huge_pages(base + 1, 2 * page) == page  # [base+1, base+2p+1): one whole page
    assert memory.advise_huge_pages(base + 1, page) == 0
    assert memory.advise_huge_pages(base, 3 * page + page // 2) == 3 * page
    assert "hg" in vm_flags(base + page)


@needs_thp
def test_small_tensors_are_left_alone_and_the_advice_can_be_turned_off(monkeypatch):
    calls = []
    real = memory._advise
    monkeypatch.setattr(memory, "_advise", lambda *args: calls.append(args) or real(*args))
    memory.empty((2 * memory.HUGE_PAGE - 1) // 4, torch.float32)  # can hold a whole page, yet not two
    assert calls == []
    memory.empty((4 * memory.HUGE_PAGE) // 4, torch.float32)
    assert len(calls) == 1
    script = ("import torch; from torch_dtdr import _memory as m; "
              "v = torch.empty(8 << 20, dtype=torch.uint8); print(m.advise_huge_pages(v.data_ptr(), v.nbytes))")
    env = dict(os.environ, TORCH_DTDR_HUGE_PAGES="0")
    off = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "0"
    env["TORCH_DTDR_HUGE_PAGES"] = "1"
    on = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert int(on.stdout) >= 2 * memory.HUGE_PAGE


@needs_thp
@pytest.mark.parametrize("codec", ["dtdr", "dtdr8", "raw"])
def test_loaded_tensors_come_advised_and_exact(tmp_path, codec):
    """A load's large output tensors are advised (one segment and several), and their values are
    what was saved."""
    torch.manual_seed(0)
    state = {"one": torch.randn(3 << 20), "many": torch.randn(9 << 20)}
    path = tmp_path / "m.dtdr"
    torch_dtdr.save(state, path, codec=codec, segment_elems=1 << 21)
    loaded = torch_dtdr.load(path)
    for name, values in loaded.items():
        start = values.data_ptr()
        first = -(-start // memory.HUGE_PAGE) * memory.HUGE_PAGE
        assert "hg" in vm_flags(first), name
        same = torch.equal(values, state[name])
        assert same or codec == "dtdr8", name
