"""New tensors for decoded values: large ones on transparent huge pages.

A load writes every byte of its output tensors once, right after allocating
them, and on Linux much of that first write is page faults: one per 4 KiB
page. Measured on this project's 2-core machine, faulting in 363 MB took
0.11 s with 4 KiB pages and 0.033 s with 2 MiB pages, and a lossless fp32
load of MiniLM x4 spent a tenth of its CPU time in those faults.

:func:`empty` asks the kernel (``madvise(MADV_HUGEPAGE)``) to back the whole
2 MiB pages inside a large new tensor with huge pages, before anything
touches it. The tensor stays an ordinary torch tensor from torch's own
allocator (resizable, shared, freed as any other). Only pages that lie
wholly inside the tensor are advised, so no memory is added; the head and
tail keep small pages. The advice is only a hint: where the kernel has
transparent huge pages set to ``never`` (or has none, or this is not Linux)
nothing changes. PyTorch's own ``THP_MEM_ALLOC_ENABLE`` does the same for
every allocation of the process; this does it for the tensors a load makes.
``TORCH_DTDR_HUGE_PAGES=0`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

#: The transparent huge page size of x86-64 and of arm64 with 4 KiB pages.
HUGE_PAGE = 2 << 20
#: ``MADV_HUGEPAGE`` in <sys/mman.h> on Linux (every architecture).
MADV_HUGEPAGE = 14


def _madvise():
    """libc's ``madvise`` through ctypes, or None where there is none to call."""
    if not sys.platform.startswith("linux") or os.environ.get("TORCH_DTDR_HUGE_PAGES", "").strip() == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        advise = libc.madvise
    except (OSError, AttributeError):
        return None
    advise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advise.restype = ctypes.c_int
    return advise


_advise = _madvise()


def advise_huge_pages(address: int, nbytes: int) -> int:
    """Ask for huge pages on the whole huge pages inside ``[address, address +
    nbytes)``, memory not touched yet. Returns how many bytes were advised (0
    when none: too small a range, no ``madvise``, or the kernel refused)."""
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if _advise is None or end <= start:
        return 0
    return end - start if _advise(start, end - start, MADV_HUGEPAGE) == 0 else 0


def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(numel, dtype=dtype)`` on CPU, with huge pages asked for
    when it spans at least two of them (the first write fills it)."""
    values = torch.empty(numel, dtype=dtype)
    nbytes = numel * values.element_size()
    if nbytes >= 2 * HUGE_PAGE:
        advise_huge_pages(values.data_ptr(), nbytes)
    return values
