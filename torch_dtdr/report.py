"""What a load or a verify found: per tensor, exact / repaired / degraded / lost."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

#: Tensor states, from best to worst.
EXACT, REPAIRED, DEGRADED, LOST = "exact", "repaired", "degraded", "lost"
_RANK = {EXACT: 0, REPAIRED: 1, DEGRADED: 2, LOST: 3}


def worst(*statuses: str) -> str:
    return max(statuses, key=_RANK.__getitem__, default=EXACT)


def exit_code(status: str, unreadable) -> int:
    """The ``dtdr verify`` exit code: 0 clean, 1 damaged but recovered exactly,
    2 degraded or lost, 3 unreadable."""
    if unreadable:
        return 3
    return {EXACT: 0, REPAIRED: 1, DEGRADED: 2, LOST: 2}[status]


class Verdict:
    """What every report answers, whatever it covers (one file, or every file of a DCP checkpoint folder):
    subclasses give ``status``, ``unreadable`` and ``to_dict()``; ``clean``, ``exit_code`` and
    ``to_json()`` follow from them the same way for all."""

    status: str
    unreadable: str | None

    @property
    def clean(self) -> bool:
        """True when nothing was damaged at all."""
        return self.status == EXACT

    @property
    def exit_code(self) -> int:
        """0 clean, 1 damaged but recovered exactly, 2 degraded or lost, 3 unreadable."""
        return exit_code(self.status, self.unreadable)

    def to_dict(self) -> dict:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_json(self, **kwargs) -> str:
        """:meth:`to_dict` as JSON (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **kwargs)


@dataclass
class TensorReport:
    """The fate of one stored tensor.

    ``damaged_bytes`` are physical byte ranges that failed their checksums and
    could not be repaired; ``repaired_bytes`` failed and were restored exactly
    by parity or by voting between copies. Both are whole checksum chunks (the
    unit the reader checks), clipped to the tensor's records. The bytes that
    were actually wrong: ``wrong_bytes_repaired`` counts, byte by byte, those
    a repair restored (the stored bytes compared with the restored ones; at
    most the size of ``repaired_bytes``); ``unrepaired_bytes`` is the size of
    ``damaged_bytes``, because which bytes of a chunk that cannot be restored
    are wrong is unknown (an upper bound, counted in whole chunks). For ``degraded`` tensors,
    ``degraded_elements`` counts affected elements and ``error_bound`` bounds
    ``max |saved - loaded|`` (None when no bound is known). ``provenance`` is
    the file's own record that the tensor was written by ``repair`` from data
    that was already degraded or lost (``{"status", "source", ...}``); such a
    tensor never reports better than that status.
    """

    name: str
    dtype: str
    shape: list[int]
    codec: str
    status: str = EXACT
    damaged_bytes: list[tuple[int, int]] = field(default_factory=list)
    repaired_bytes: list[tuple[int, int]] = field(default_factory=list)
    degraded_elements: int = 0
    wrong_bytes_repaired: int = 0
    unrepaired_bytes: int = 0
    error_bound: float | None = 0.0
    provenance: dict | None = None


@dataclass
class Report(Verdict):
    """Everything a load or :func:`torch_dtdr.verify` found in one file."""

    file: str
    format_version: str = ""
    events: list[str] = field(default_factory=list)
    truncated: bool = False
    tensors: list[TensorReport] = field(default_factory=list)
    unreadable: str | None = None

    @property
    def status(self) -> str:
        """The worst tensor status; ``repaired`` also when only container
        metadata (a trailer, an index copy) needed repair."""
        if self.unreadable:
            return LOST
        s = worst(*(t.status for t in self.tensors))
        if s == EXACT and (self.events or self.truncated):
            s = REPAIRED
        return s

    @property
    def exact(self) -> bool:
        """True when every tensor came back bit-exact (possibly after repair)."""
        return not self.unreadable and all(t.status in (EXACT, REPAIRED) for t in self.tensors)

    def counts(self) -> dict[str, int]:
        out = {EXACT: 0, REPAIRED: 0, DEGRADED: 0, LOST: 0}
        for t in self.tensors:
            out[t.status] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{n} {k}" for k, n in c.items() if n]
        text = f"{self.file}: " + (", ".join(parts) if parts else "no tensors")
        lost = [t.name for t in self.tensors if t.status == LOST]
        if lost:
            text += "; lost: " + ", ".join(lost[:20]) + (f", ... ({len(lost) - 20} more)" if len(lost) > 20 else "")
        if self.truncated:
            text += "; file truncated"
        if self.events:
            text += "; " + "; ".join(self.events)
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status
        d["counts"] = self.counts()
        return d

    def __str__(self) -> str:
        lines = [f"DTDR report for {self.file} (format {self.format_version}): {self.status}"]
        if self.unreadable:
            lines.append(f"  unreadable: {self.unreadable}")
        for e in self.events:
            lines.append(f"  container: {e}")
        if self.truncated:
            lines.append("  container: file truncated")
        lines.extend(self.table())
        lines.append("  " + ", ".join(f"{n} {k}" for k, n in self.counts().items()))
        return "\n".join(lines)

    def table(self) -> list[str]:
        """The per-tensor table, columns labelled. "wrong bytes repaired" counts the stored bytes that were
        wrong and were restored bit-exactly (byte by byte); "unrepaired bytes (whole chunks)" counts the bytes
        of the checksum chunks that could not be restored: which of them are wrong is unknown, so whole chunks
        are counted (an upper bound)."""
        w = max([len(t.name) for t in self.tensors] + [6])
        lines = [f"  {'tensor':<{w}}  {'status':<9}{'codec':<8}{'wrong bytes repaired':>22}"
                 f"{'unrepaired bytes (whole chunks)':>33}{'bad elements':>14}  max error"]
        for t in self.tensors:
            bound = "-" if t.status in (EXACT, REPAIRED) else ("unknown" if t.error_bound is None else f"{t.error_bound:.3g}")
            lines.append(f"  {t.name:<{w}}  {t.status:<9}{t.codec:<8}{t.wrong_bytes_repaired:>22}"
                         f"{t.unrepaired_bytes:>33}{t.degraded_elements:>14}  {bound}")
        return lines
