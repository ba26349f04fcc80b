"""Reading ahead: a plan of byte ranges fetched in large concurrent parts while the caller decodes.

:class:`Prefetch` is what :meth:`~torch_dtdr.storage.sources.Source.prefetch`
returns: it schedules the planned ranges in parts, keeps at most a window of
bytes ahead of the reads it serves, and hands each read its bytes from
memory; how a remote load overlaps download and decode.
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sources import Source


MIN_PREFETCH_PART = 2**20


class Prefetch:
    """A plan of reads being fetched ahead; see :meth:`Source.prefetch`.

    Thread-safe: the decoding threads of a load read from it concurrently.
    Parts are scheduled in plan order; only parts ahead of every pending read
    count against the window, so a read larger than the window cannot stall.
    """

    def __init__(self, source: Source, ranges, *, active: bool, part_size: int = 1,
                 window: int = 1, gap: int = 0):
        self.source = source
        self.active = active
        self.parts: list[tuple[int, int]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._futures: dict[int, Any] = {}
        self._dropped: set[int] = set()
        self._next = 0
        self._window = window
        if not active:
            return
        spans: list[list[int]] = []
        for o, n in sorted(ranges):
            if spans and o - spans[-1][1] <= gap:
                spans[-1][1] = max(spans[-1][1], o + n)
            else:
                spans.append([o, o + n])
        for s, e in spans:
            self.parts += [(p, min(part_size, e - p)) for p in range(s, e, part_size)]
        self._starts = [p for p, _ in self.parts]
        self._planned = [0] * len(self.parts)
        self._served = [0] * len(self.parts)
        for o, n in ranges:
            for i, lo, hi in self._overlaps(o, n):
                self._planned[i] += hi - lo

    # -- scheduling ----------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            self._fill(-1)

    def _fill(self, demanded: int) -> None:
        """Submit parts in order: up to ``demanded`` unconditionally, then while
        fewer than ``window`` parts are held or in flight."""
        while self._next < len(self.parts) and (self._next <= demanded or len(self._futures) < self._window):
            p, n = self.parts[self._next]
            self._futures[self._next] = self._pool.submit(self.source._checked_read, p, n)
            self._next += 1

    def _overlaps(self, o: int, n: int) -> list[tuple[int, int, int]]:
        i = max(0, bisect.bisect_right(self._starts, o) - 1)
        out = []
        while i < len(self.parts) and self.parts[i][0] < o + n:
            p, m = self.parts[i]
            lo, hi = max(o, p), min(o + n, p + m)
            if lo < hi:
                out.append((i, lo, hi))
            i += 1
        return out

    # -- serving -------------------------------------------------------------
    def _serve(self, offset: int, length: int):
        """The bytes of a read the plan covers, or None (read it directly)."""
        if not self.active or length <= 0 or not self.parts:
            return None
        ov = self._overlaps(offset, length)
        if sum(hi - lo for _i, lo, hi in ov) != length:
            return None
        with self._lock:
            if not self.active or any(i in self._dropped for i, _lo, _hi in ov):
                return None
            self._fill(ov[-1][0])
            futures = [self._futures[i] for i, _lo, _hi in ov]
        pieces = []
        for (i, lo, hi), fut in zip(ov, futures):
            try:
                data = fut.result()
            except CancelledError:  # the plan was closed under this read
                return None
            p = self.parts[i][0]
            pieces.append(memoryview(data)[lo - p: hi - p])
        with self._lock:
            for i, lo, hi in ov:
                self._served[i] += hi - lo
                if self._served[i] >= self._planned[i] and i in self._futures:
                    del self._futures[i]
                    self._dropped.add(i)
            self._fill(-1)
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    @property
    def held(self) -> int:
        """Parts fetched or in flight and not yet dropped (for tests and tuning)."""
        with self._lock:
            return len(self._futures)

    def close(self) -> None:
        """Stop: cancel queued parts, drop what is held; later reads go direct."""
        with self._lock:
            self.active = False
            futures, self._futures = self._futures, {}
        for fut in futures.values():
            fut.cancel()
        self.source._end_prefetch(self)

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
