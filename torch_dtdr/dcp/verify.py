"""Verifying a DCP checkpoint folder: every metadata copy, every shard, and the items between them.

:func:`verify_checkpoint` checks both metadata copies and every checksum of
every shard (through :func:`torch_dtdr.api.verify`, nothing written), and
that every item the metadata names is in its shard with the right dtype and
shape; :class:`CheckpointReport` answers like a
:class:`~torch_dtdr.report.Report` (they share :class:`~torch_dtdr.report.Verdict`).
Needs no ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Mapping

from .. import tree
from ..errors import FormatError, IncompleteCheckpointError
from ..report import DEGRADED, EXACT, LOST, REPAIRED, Report, TensorReport, Verdict, worst
from ..storage import isdir, join, listdir
from .metadata import (FORMAT_NAME, FORMAT_VERSION, METADATA_NAME, METADATA_NAMES, RANK_METADATA_RE, SAVE_ID_KEY,
                       SHARD_RE, metadata_names, norm_path, read_metadata_file, read_path)

__all__ = ["CheckpointReport", "verify_checkpoint"]


@dataclass
class CheckpointReport(Verdict):
    """What :func:`verify_checkpoint` (or a :class:`DTDRReader` load) found in a
    DCP checkpoint folder: one :class:`~torch_dtdr.Report` per metadata copy
    and per shard file, plus cross-checks between them (``problems``: a shard
    or an item the metadata names but that is missing, a shape that does not
    match, a shard left by another save).

    It answers like a :class:`~torch_dtdr.Report`: ``status``, ``exact``,
    ``clean``, ``counts()``, ``exit_code``, ``summary()``, ``to_dict()``,
    ``to_json()``, ``tensors`` (every shard's tensors, named ``FILE:NAME``).
    """

    file: str
    files: list[Report] = field(default_factory=list)
    metadata: list[Report] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unreadable: str | None = None
    #: shard files in the folder that the metadata does not name (left by an
    #: earlier save into the same folder); informational only
    unreferenced: list[str] = field(default_factory=list)
    format_version: str = f"{FORMAT_NAME}/{FORMAT_VERSION}"

    @property
    def events(self) -> list[str]:
        return [f"{os.path.basename(r.file)}: {e}" for r in self.metadata for e in r.events]

    @property
    def truncated(self) -> bool:
        return any(r.truncated for r in self.files)

    @property
    def tensors(self) -> list[TensorReport]:
        return [dataclasses.replace(t, name=f"{_basename(r.file)}:{t.name}") for r in self.files for t in r.tensors]

    @property
    def status(self) -> str:
        if self.unreadable:
            return LOST
        s = worst(*(r.status for r in self.files))
        if self.problems:
            s = LOST
        # one good metadata copy is enough; a bad one is a repair to make
        meta = [r.status for r in self.metadata]
        if meta and s == EXACT and any(m != EXACT for m in meta):
            s = REPAIRED
        return s

    @property
    def exact(self) -> bool:
        return not self.unreadable and not self.problems and all(r.exact for r in self.files)

    def counts(self) -> dict[str, int]:
        out = {EXACT: 0, REPAIRED: 0, DEGRADED: 0, LOST: 0}
        for r in self.files:
            for k, n in r.counts().items():
                out[k] += n
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{n} {k}" for k, n in c.items() if n]
        text = f"{self.file}: DCP checkpoint, {len(self.files)} shard file(s), " + (", ".join(parts) or "no tensors")
        if self.unreadable:
            text += f"; unreadable: {self.unreadable}"
        bad_meta = [r for r in self.metadata if r.status != EXACT]
        if bad_meta:
            text += "; metadata: " + ", ".join(f"{_basename(r.file)} {r.status}" for r in bad_meta)
        if self.problems:
            text += "; " + "; ".join(self.problems[:5]) + (f"; ... ({len(self.problems)} problems)"
                                                           if len(self.problems) > 5 else "")
        return text

    def to_dict(self) -> dict:
        return {"file": self.file, "kind": "dcp", "format_version": self.format_version, "status": self.status,
                "counts": self.counts(), "unreadable": self.unreadable, "problems": list(self.problems),
                "unreferenced": list(self.unreferenced),
                "metadata": [r.to_dict() for r in self.metadata], "files": [r.to_dict() for r in self.files]}

    def __str__(self) -> str:
        lines = [f"DTDR DCP checkpoint {self.file} ({self.format_version}): {self.status}"]
        if self.unreadable:
            lines.append(f"  unreadable: {self.unreadable}")
        for r in self.metadata:
            lines.append(f"  metadata {_basename(r.file)}: {r.status}" + (f" ({r.unreadable})" if r.unreadable else ""))
        for p in self.problems:
            lines.append(f"  problem: {p}")
        if self.unreferenced:
            lines.append(f"  not part of this checkpoint: {', '.join(self.unreferenced)}")
        for r in self.files:
            lines.extend("  " + line for line in str(r).splitlines())
        lines.append("  " + ", ".join(f"{n} {k}" for k, n in self.counts().items()))
        return "\n".join(lines)


def _basename(p: str) -> str:
    return p.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def _expected_items(doc) -> dict[str, list[tuple[str, str, tuple | None, str]]]:
    """file -> [(key, kind, expected shape or None, fqn)] from a metadata document."""
    items: dict[str, dict] = {}
    for fqn, item in doc["state_dict"]:
        items[fqn] = item
    out: dict[str, list] = {name: [] for name, _ in doc["files"]}
    for fqn, off, _index, fno, key in doc["storage"]:
        item = items.get(fqn)
        name = doc["files"][fno][0]
        if item is None:
            out[name].append((key, "missing", None, fqn))
        elif item["type"] == "bytes":
            out[name].append((key, "bytes", None, fqn))
        else:
            shape = None
            for o, s in item["chunks"]:
                if off is not None and o == off:
                    shape = (item["dtype"], tuple(s))
                    break
            out[name].append((key, "tensor", shape, fqn))
    return out


def _shard_contents(path: str, storage_options) -> tuple[dict, dict[str, dict]]:
    """A shard's string metadata and, for every tensor name in it (tied
    tensors under each of their names), ``{"dtype": NAME, "shape": [...]}``;
    from the index alone."""
    from ..format.reader import ContainerReader
    from ..storage import open_source

    with open_source(path, storage_options) as src:
        r = ContainerReader(src)
        skeleton = r.index.tree
        refs = tree.tensor_refs(skeleton, len(r.tensors))
        meta = dict(r.index.metadata)
    return meta, {name: skeleton["tensors"][i] for name, i in refs.items()}


def verify_checkpoint(path, *, storage_options: Mapping | None = None, progress: bool = False,
                      max_workers: int | None = None, workers: int | None = None) -> CheckpointReport:
    """Check a DTDR DCP checkpoint folder: both metadata copies, every checksum
    of every shard (parity repair tried in memory, nothing written), and that
    every item the metadata names is in its shard with the right dtype and
    shape. Never raises for damage; a folder without committed metadata gives a
    report with ``unreadable`` set (exit code 3) that still verifies the shard
    files it finds. Raises :class:`IncompleteCheckpointError` (a
    ``FileNotFoundError``) only when the folder does not exist. ``workers``
    threads decode the segments of each tensor (see :func:`torch_dtdr.load`)."""
    from ..api import verify
    from ..errors import DTDRError

    base = norm_path(path)
    rep = CheckpointReport(base)
    names = listdir(base, storage_options)
    if not names and not isdir(base, storage_options):
        raise IncompleteCheckpointError("no checkpoint here (no such directory)", file=base)
    # the global metadata; without it, the per-rank metadata of a save with use_collectives=False
    sets: list[int | None] = [None]
    if not any(n in names for n in METADATA_NAMES):
        ranks = sorted({int(m.group(1)) for n in names if (m := RANK_METADATA_RE.fullmatch(n))})
        sets = ranks or sets
    docs = []
    for rank in sets:
        good = None
        for name in metadata_names(rank):
            if name not in names:
                rep.metadata.append(Report(join(base, name), unreadable="missing"))
                continue
            try:
                d, r = read_metadata_file(read_path(base, name, storage_options), storage_options)
            except (DTDRError, OSError) as e:
                rep.metadata.append(Report(join(base, name), unreadable=str(e)))
                continue
            rep.metadata.append(r)
            good = d if good is None else good
        if good is not None:
            docs.append(good)
    expected: dict[str, list] = {}
    save_ids: dict[str, str] = {}
    if not docs:
        if all(r.unreadable == "missing" for r in rep.metadata):
            rep.unreadable = (f"incomplete DCP checkpoint: no {METADATA_NAME} (the save was interrupted before "
                              "its coordinator committed it, or this is not a DTDR DCP checkpoint)")
        else:
            rep.unreadable = "every copy of the DCP metadata is unreadable"
        expected = {n: [] for n in names if SHARD_RE.fullmatch(n)}
    else:
        for d in docs:
            for name, items in _expected_items(d).items():
                expected.setdefault(name, []).extend(items)
            save_ids.update({name: sid for name, sid in d["files"]})
        rep.unreferenced = [n for n in names if SHARD_RE.fullmatch(n) and n not in expected]
    doc = docs[0] if docs else None
    files = list(expected)
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="verify", unit="file", leave=False, disable=None)
    for name in files:
        fpath = join(base, name)
        if name not in names:
            rep.files.append(Report(fpath, unreadable="missing"))
            rep.problems.append(f"{name}: shard file is missing")
            continue
        try:
            read_path(base, name, storage_options)
        except FormatError as e:
            rep.files.append(Report(fpath, unreadable=str(e)))
            rep.problems.append(f"{name}: {e.message}")
            continue
        r = verify(fpath, storage_options=storage_options, max_workers=max_workers, workers=workers)
        rep.files.append(r)
        if r.unreadable or doc is None:
            continue
        try:
            file_meta, stored = _shard_contents(fpath, storage_options)
        except (DTDRError, OSError) as e:  # pragma: no cover - verify already read this index
            rep.problems.append(f"{name}: {e}")
            continue
        want_id = save_ids.get(name)
        if want_id and file_meta.get(SAVE_ID_KEY) != want_id:
            rep.problems.append(f"{name}: written by another save (id {file_meta.get(SAVE_ID_KEY)}, "
                                f"the metadata expects {want_id})")
        for key, kind, shape, fqn in expected[name]:
            t = stored.get(key)
            if kind == "missing":
                rep.problems.append(f"{name}: storage entry {fqn!r} has no state_dict metadata")
            elif t is None:
                rep.problems.append(f"{name}: item {fqn!r} (key {key!r}) is not in the shard")
            elif kind == "bytes" and (t["dtype"] != "uint8" or len(t["shape"]) != 1):
                rep.problems.append(f"{name}: byte item {fqn!r} is stored as {t['dtype']} {t['shape']}")
            elif kind == "tensor" and shape is not None and (t["dtype"], tuple(t["shape"])) != shape:
                rep.problems.append(f"{name}: item {key!r} is {t['dtype']} {t['shape']}, the metadata says "
                                    f"{shape[0]} {list(shape[1])}")
    return rep
