"""What the ``dtdr`` commands print: human-readable sizes, rates and durations, shared by every command group.

Imports no torch, so building the parser stays cheap.
"""

from __future__ import annotations

import glob
import os

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: int | float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.20 GiB``."""
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}" if abs(n) >= 10 else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(n_bytes: int, seconds: float) -> str:
    """Throughput in MB/s (decimal megabytes, as disks and networks are rated)."""
    return f"{n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s"


def percent(part: float, whole: float) -> str:
    """``part / whole`` as a percentage, ``-`` when ``whole`` is 0."""
    return f"{100 * part / whole:.2f} %" if whole else "-"


def expand_paths(paths: list[str]) -> list[str]:
    """Each path as given, local globs expanded here (sorted), so a quoted glob works as an unquoted one
    does in a shell; a glob with no match stays as written (and fails as a missing file). URLs pass as
    they are."""
    out: list[str] = []
    for path in paths:
        if "://" not in path and glob.has_magic(path):
            matches = sorted(glob.glob(os.path.expanduser(path)))
            out.extend(matches or [path])
        else:
            out.append(path)
    return out


def byte_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar counting bytes (rate and ETA in B/s units), shown only on a terminal
    (``disable=None``); a bar that does nothing when ``enabled`` is false."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled else True)


class spinner:
    """A tqdm bar with no total that shows elapsed time while a step without byte counts runs (on a
    terminal only); a context manager."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self._bar, self._stop = desc, enabled, None, None

    def __enter__(self):
        import threading

        from tqdm.auto import tqdm

        self._bar = tqdm(desc=self.desc, total=None, bar_format="{desc}: {elapsed}", leave=False,
                         disable=None if self.enabled else True)
        if not self._bar.disable:
            self._stop = threading.Event()
            thread = threading.Thread(target=self._tick, daemon=True)
            thread.start()
        return self

    def _tick(self):
        while not self._stop.wait(0.5):
            self._bar.refresh()

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
        self._bar.close()
        return False
