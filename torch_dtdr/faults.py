"""Deterministic, undoable fault injection for any file at any fsspec URL.

Reliability engineers use :func:`corrupt` to damage a checkpoint (a DTDR file,
a safetensors file, a torch ``.pt`` file, anything) in a controlled,
reproducible way, load it, and then :func:`undo` the damage bit-exactly::

    rec = corrupt("ckpt.dtdr", mode="bitflip", fraction=1e-4, seed=7)
    ...                                  # load, check the damage report
    rec.save("fault.json")
    undo(FaultRecord.load("fault.json"))  # the file is sha256-identical again

Works on local paths, ``file://``, ``memory://``, ``s3://``, ``gs://`` ... Local
files damaged in place are read once, streamed in blocks (the record needs the
whole file's sha256), and only the changed bytes are written back, in place
(the file is memory-mapped ``r+`` and just those bytes assigned; a truncation
is an ``r+b`` truncate). Object stores get a read-modify-write of the whole
object (``cat``-like streamed read, one ``pipe_file``). With ``out=`` the source is left untouched and the damaged
copy is streamed to ``out`` (any URL).

Modes
-----
``"replace"``
    Chosen bytes get a new random value, always different from the old one
    (drawn uniformly among the 255 other values).
``"bitflip"``
    One random bit of each chosen byte is flipped.
``"burst"``
    Runs of ``burst_length`` consecutive bytes are replaced (every byte
    changes, as in ``"replace"``). Bursts start anywhere a whole burst fits
    inside the (region's) eligible range; independently placed bursts may
    overlap or touch, in which case the damaged bytes are their union.
``"zero-sectors"``
    Whole sectors, aligned to multiples of ``sector_size`` (4 KiB by default)
    in the file, are zeroed. The last sector of a file whose size is not a
    multiple of ``sector_size`` is the partial one up to EOF. Every byte of a
    chosen sector is recorded (old and new), even bytes that were already 0,
    so ``n_bytes_changed`` counts recorded bytes; ``n_bytes_differing`` counts
    those that really changed.
``"truncate"``
    The file loses its tail. ``count`` = number of bytes REMOVED from the end;
    ``fraction`` = fraction of the file REMOVED, i.e.
    ``removed = floor(size * fraction)`` and ``new_size = size - removed``.
    The removed bytes are stored in the record so undo can append them back.
    No randomness is used. ``region`` is not accepted (a truncation always
    removes the tail).
``"region"``
    Targeted overwrite of ``region`` (required). With neither ``fraction`` nor
    ``count`` every byte of the region is replaced (always changing); with one
    of them it is ``"replace"`` restricted to the region.

How much: ``fraction`` or ``count``
-----------------------------------
Exactly one of them (``"region"`` mode: at most one).

* bytes (replace, bitflip, region): ``fraction`` is the probability that a
  byte is damaged, ``count`` the exact number of damaged bytes;
* burst: ``count`` is the exact number of bursts; with ``fraction`` each
  possible start offset begins a burst with probability
  ``fraction / burst_length``, so about ``fraction`` of the bytes are hit;
* zero-sectors: ``count`` is the exact number of sectors; ``fraction`` the
  probability that a sector is zeroed;
* truncate: see above.

``region`` restricts every mode except truncate to a byte range ``(start,
end)`` (half-open), a list of ranges, a NAME of a part of a DTDR file (resolved
with ``torch_dtdr.format.reader.regions``; exact names or :mod:`fnmatch` globs
such as ``"tensor:*:meta"``; a prefix match is a glob ``"prefix*"``) or a list
mixing names and ranges. No byte outside the region is ever changed: bursts and
sectors are only placed where they fit entirely inside one range.

Sampling procedure (stable: same file + same arguments -> identical damage)
----------------------------------------------------------------------------
``rng = numpy.random.Generator(numpy.random.PCG64(seed))``, then:

1. The eligible units are listed in increasing file offset: bytes (replace,
   bitflip, region), burst start offsets (burst; every offset ``s`` with
   ``[s, s + burst_length)`` inside one eligible range) or sectors
   (zero-sectors). Call their number ``N``.
2. ``k = count``, or ``k = rng.binomial(N, p)`` with ``p = fraction``
   (``fraction / burst_length`` for bursts). Region mode without either uses
   all ``N`` bytes and draws nothing here.
3. ``k`` of the ``N`` unit indices are chosen uniformly without replacement by
   *sequential rejection*: ``S = []``; while ``len(S) < m``: ``d =
   rng.integers(0, N, size=m - len(S), dtype=int64)`` and append, in draw
   order, every value of ``d`` not already in ``S`` nor earlier in ``d``.
   If ``k > N - k``, the ``N - k`` EXCLUDED indices are drawn this way
   (``m = N - k``) and the chosen set is their complement; otherwise
   ``m = k``. The chosen indices are then sorted.
4. The damaged bytes are the chosen bytes / the union of the chosen bursts /
   the chosen sectors, in file order; call their number ``D``.
5. New values, one draw for all ``D`` bytes in file order: replace, burst,
   region: ``r = rng.integers(1, 256, size=D, dtype=uint8)``,
   ``new = (old + r) % 256``; bitflip: ``b = rng.integers(0, 8, size=D,
   dtype=uint8)``, ``new = old ^ (1 << b)``; zero-sectors: ``new = 0`` (no
   draw).

The streams are those of numpy's ``Generator``; numpy does not promise them
across numpy versions, so pin numpy to replay a record's seed. A saved
:class:`FaultRecord` replays exactly regardless, since it stores the bytes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib
import io
import json
import math
import numbers
import os
from typing import Any

import numpy as np

from .errors import ArgumentError, CheckpointNotFoundError, IntegrityError, StorageError
from .storage import (is_local_fs, makedirs, map_for_update, open_read, open_sink, patch_bytes, read_text, url_to_fs,
                      write_bytes_atomic)

__all__ = [
    "MODES",
    "FaultArgumentError",
    "FaultRecord",
    "corrupt",
    "undo",
]

MODES = ("replace", "bitflip", "burst", "zero-sectors", "truncate", "region")

_BLOCK = 1 << 22  # streaming block (bytes); does not influence the sampling
_RECORD_FORMAT = "torch_dtdr.faults.FaultRecord"
_RECORD_VERSION = 1


#: Bad arguments to :func:`corrupt` / :func:`undo`, or a malformed :class:`FaultRecord`.
FaultArgumentError = ArgumentError


# --------------------------------------------------------------------------- record


@dataclasses.dataclass
class FaultRecord:
    """What :func:`corrupt` did, complete enough for :func:`undo`.

    ``path`` is the file that was read; ``out`` where the damaged bytes went
    (``None``: ``path`` was damaged in place). ``changes`` is a list of
    ``(offset, old_bytes, new_bytes)`` runs in increasing offset, adjacent
    changed bytes merged into one run. A truncation is the single run
    ``(new_size, removed_tail, b"")``.
    """

    path: str
    mode: str
    seed: int
    parameters: dict
    original_size: int
    new_size: int
    original_sha256: str
    changes: list
    damaged_sha256: str | None = None
    out: str | None = None

    @property
    def target(self) -> str:
        """The damaged file: ``out`` if given, else ``path``."""
        return self.out if self.out is not None else self.path

    @property
    def n_bytes_changed(self) -> int:
        """Bytes recorded as changed (removed bytes count for truncation)."""
        return sum(max(len(old), len(new)) for _, old, new in self.changes)

    @property
    def n_bytes_differing(self) -> int:
        """Bytes whose value really differs (removed bytes count)."""
        total = 0
        for _, old, new in self.changes:
            if len(old) != len(new):
                total += abs(len(old) - len(new))
                continue
            a = np.frombuffer(old, np.uint8)
            b = np.frombuffer(new, np.uint8)
            total += int(np.count_nonzero(a != b))
        return total

    def summary(self) -> str:
        size = (
            f"{self.original_size} bytes"
            if self.new_size == self.original_size
            else f"{self.original_size} -> {self.new_size} bytes"
        )
        where = self.path if self.out is None else f"{self.path} -> {self.out}"
        return (
            f"{self.mode} (seed={self.seed}) on {where}: {self.n_bytes_changed} bytes changed "
            f"in {len(self.changes)} run(s), {size}, original sha256 {self.original_sha256[:16]}"
        )

    # ---- serialisation
    def to_dict(self) -> dict:
        return {
            "format": _RECORD_FORMAT,
            "version": _RECORD_VERSION,
            "path": self.path,
            "out": self.out,
            "mode": self.mode,
            "seed": self.seed,
            "parameters": self.parameters,
            "original_size": self.original_size,
            "new_size": self.new_size,
            "original_sha256": self.original_sha256,
            "damaged_sha256": self.damaged_sha256,
            "changes": [[int(off), bytes(old).hex(), bytes(new).hex()] for off, old, new in self.changes],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "FaultRecord":
        try:
            if d.get("format") != _RECORD_FORMAT:
                raise FaultArgumentError(f"not a fault record (format={d.get('format')!r})")
            if d.get("version") != _RECORD_VERSION:
                raise FaultArgumentError(f"unsupported fault record version {d.get('version')!r}")
            changes = [(int(off), bytes.fromhex(old), bytes.fromhex(new)) for off, old, new in d["changes"]]
            rec = cls(
                path=str(d["path"]),
                out=None if d.get("out") is None else str(d["out"]),
                mode=str(d["mode"]),
                seed=int(d["seed"]),
                parameters=dict(d["parameters"]),
                original_size=int(d["original_size"]),
                new_size=int(d["new_size"]),
                original_sha256=str(d["original_sha256"]),
                damaged_sha256=None if d.get("damaged_sha256") is None else str(d["damaged_sha256"]),
                changes=changes,
            )
        except FaultArgumentError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FaultArgumentError(f"malformed fault record: {exc}") from exc
        _check_changes(rec)
        return rec

    @classmethod
    def from_json(cls, text: str | bytes) -> "FaultRecord":
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise FaultArgumentError(f"fault record is not JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise FaultArgumentError("fault record is not a JSON object")
        return cls.from_dict(d)

    def save(self, path) -> None:
        """Write the record as a local JSON file (not a checkpoint), atomically:
        a failed write leaves no partial record."""
        write_bytes_atomic(os.fspath(path), self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path) -> "FaultRecord":
        path = os.fspath(path)
        try:
            text = read_text(path)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError("no fault record file", file=path) from exc
        return cls.from_json(text)


class _Changes:
    """A record's changes as arrays: the same-size runs (offsets, lengths, old
    and new bytes concatenated) and the removed tail of a truncation."""

    def __init__(self, rec: "FaultRecord"):
        ch = rec.changes
        n = len(ch)
        offs = np.fromiter((c[0] for c in ch), np.int64, n)
        lold = np.fromiter((len(c[1]) for c in ch), np.int64, n)
        lnew = np.fromiter((len(c[2]) for c in ch), np.int64, n)
        if n and ((offs < 0).any() or (offs[1:] < offs[:-1] + lold[:-1]).any()):
            raise FaultArgumentError("fault record changes overlap, are unsorted or negative")
        resize = np.flatnonzero(lold != lnew)
        self.tail = b""
        if resize.size:
            i = int(resize[0])
            off, old, new = ch[i]
            if resize.size > 1 or i != n - 1 or new or off != rec.new_size or off + len(old) != rec.original_size:
                raise FaultArgumentError("fault record has a malformed size change", byte_range=(off, off + len(old)))
            self.tail = bytes(old)
        if rec.original_size - rec.new_size != len(self.tail):
            raise FaultArgumentError("fault record sizes do not match its changes")
        same = np.flatnonzero((lold == lnew) & (lold > 0))
        if same.size and int(offs[same[-1]] + lold[same[-1]]) > rec.new_size:
            raise FaultArgumentError("fault record change lies beyond the file")
        self.starts = offs[same]
        self.lens = lold[same]
        self.ends = self.starts + self.lens
        sl = same.tolist()
        self.old = np.frombuffer(b"".join([ch[i][1] for i in sl]), np.uint8)
        self.new = np.frombuffer(b"".join([ch[i][2] for i in sl]), np.uint8)


def _check_changes(rec: "FaultRecord") -> "_Changes":
    """A record's changes must be sorted, non-overlapping, inside the file, and
    describe exactly its size change."""
    return _Changes(rec)


# --------------------------------------------------------------------------- helpers


def _open_fs(path, storage_options):
    if storage_options is not None and not isinstance(storage_options, dict):
        raise FaultArgumentError("storage_options must be a dict or None")
    url = os.fspath(path)
    if not isinstance(url, str):
        raise FaultArgumentError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    fs, p = url_to_fs(url, storage_options)
    return url, fs, p


def _is_local(fs) -> bool:
    return is_local_fs(fs)


def _file_size(fs, p, url) -> int:
    try:
        info = fs.info(p)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError("no such file", file=url) from exc
    if info.get("type") not in (None, "file"):
        raise CheckpointNotFoundError(f"not a file (type={info.get('type')})", file=url)
    size = info.get("size")
    if size is None:
        raise StorageError("storage back-end reported no size", file=url)
    return int(size)


def _same_file(fs_a, p_a, fs_b, p_b) -> bool:
    if type(fs_a) is not type(fs_b):
        return False
    if _is_local(fs_a):
        a, b = os.path.abspath(p_a), os.path.abspath(p_b)
        if a == b:
            return True
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return fs_a._strip_protocol(p_a) == fs_b._strip_protocol(p_b) and fs_a.storage_options == fs_b.storage_options


def _as_int(x, name: str, minimum: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise FaultArgumentError(f"{name} must be an integer, got {x!r}")
    x = int(x)
    if x < minimum:
        raise FaultArgumentError(f"{name} must be >= {minimum}, got {x}")
    return x


def _merge_ranges(starts: np.ndarray, ends: np.ndarray):
    """Union of half-open intervals (adjacent ones merged), sorted; empty dropped."""
    starts = np.asarray(starts, np.int64)
    ends = np.asarray(ends, np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return starts, ends
    if not (starts[1:] >= starts[:-1]).all():
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
    run_end = np.maximum.accumulate(ends)
    new_group = np.empty(starts.size, bool)
    new_group[0] = True
    new_group[1:] = starts[1:] > run_end[:-1]
    gidx = np.flatnonzero(new_group)
    out_starts = starts[gidx]
    out_ends = np.maximum.reduceat(ends, gidx)
    return out_starts, out_ends


def _resolve_named(url, pattern: str, storage_options):
    try:
        reader = importlib.import_module("torch_dtdr.format.reader")
        regions_fn = reader.regions
    except (ImportError, AttributeError) as exc:
        raise FaultArgumentError(
            "region names need torch_dtdr.format.reader.regions, which is not available", field="region"
        ) from exc
    table = regions_fn(url, storage_options=storage_options)
    if pattern in table:
        names = [pattern]
    else:
        names = [n for n in table if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        sample = ", ".join(sorted(table)[:12])
        raise FaultArgumentError(f"region {pattern!r} matches no part of the file (parts: {sample}...)", file=url)
    out = []
    for n in names:
        for start, end in table[n]:
            out.append((int(start), int(end), n))
    return out


def _normalise_region(region, size: int, url, storage_options):
    """-> (starts, ends) merged int64 arrays, and a JSON-able description."""
    if isinstance(region, str):
        items = [region]
    elif isinstance(region, tuple) and len(region) == 2 and all(isinstance(v, numbers.Integral) for v in region):
        items = [region]
    else:
        try:
            items = list(region)
        except TypeError as exc:
            raise FaultArgumentError(f"region must be (start, end), a list of them, or a name; got {region!r}") from exc
    starts, ends, desc = [], [], []
    for item in items:
        if isinstance(item, str):
            for start, end, name in _resolve_named(url, item, storage_options):
                if not (0 <= start <= end <= size):
                    raise FaultArgumentError(
                        f"region {name!r} lies beyond the file ({size} bytes)", file=url, byte_range=(start, end)
                    )
                starts.append(start)
                ends.append(end)
            desc.append(item)
            continue
        try:
            start, end = item
        except (TypeError, ValueError) as exc:
            raise FaultArgumentError(f"bad region item {item!r}: expected (start, end) or a name") from exc
        start = _as_int(start, "region start")
        end = _as_int(end, "region end")
        if start > end:
            raise FaultArgumentError("region start > end", byte_range=(start, end))
        if end > size:
            raise FaultArgumentError(f"region lies beyond the file ({size} bytes)", file=url, byte_range=(start, end))
        starts.append(start)
        ends.append(end)
        desc.append([start, end])
    s, e = _merge_ranges(np.array(starts, np.int64), np.array(ends, np.int64))
    return s, e, desc


def _draw_distinct(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """m distinct values of range(n), by sequential rejection (see module doc);
    returned in acceptance order."""
    chosen = np.empty(0, np.int64)
    chosen_sorted = chosen
    while chosen.size < m:
        d = rng.integers(0, n, size=m - chosen.size, dtype=np.int64)
        order = np.argsort(d, kind="stable")
        sd = d[order]
        first = np.ones(sd.size, bool)  # first occurrence of each value within d
        first[1:] = sd[1:] != sd[:-1]
        if chosen_sorted.size:  # ... and not accepted in an earlier round
            pos = np.searchsorted(chosen_sorted, sd)
            pos[pos == chosen_sorted.size] = 0
            first &= chosen_sorted[pos] != sd
        cand = d[np.sort(order[first])]  # accepted values, in draw order
        chosen = np.concatenate([chosen, cand])
        chosen_sorted = np.sort(chosen)
    return chosen


def _sample(rng, n: int, k: int):
    """Choose k of range(n) uniformly without replacement.

    Returns ("chosen", sorted indices) or ("excluded", sorted indices) when it
    is cheaper to draw the complement (k > n - k).
    """
    if k > n - k:
        return "excluded", np.sort(_draw_distinct(rng, n, n - k))
    return "chosen", np.sort(_draw_distinct(rng, n, k))


def _materialise(kind, idx, n):
    if kind == "chosen":
        return idx
    mask = np.ones(n, bool)
    mask[idx] = False
    return np.flatnonzero(mask).astype(np.int64)


def _eligible_to_offsets(idx, rstarts, rends):
    """Map indices into the concatenation of ranges to file offsets."""
    lens = rends - rstarts
    cum = np.cumsum(lens)
    j = np.searchsorted(cum, idx, side="right")
    before = cum[j] - lens[j]
    return rstarts[j] + (idx - before)


def _subtract_points(rstarts, rends, points):
    """Ranges minus sorted points (each inside some range) -> merged runs."""
    starts = np.sort(np.concatenate([rstarts, points + 1]))
    ends = np.sort(np.concatenate([rends, points]))
    return _merge_ranges(starts, ends)


def _count(fraction, count, n, p_scale=1.0, rng=None, unit="bytes"):
    if count is not None:
        if count > n:
            raise FaultArgumentError(f"count={count} exceeds the {n} eligible {unit}")
        return count
    return int(rng.binomial(n, fraction / p_scale))


# --------------------------------------------------------------------------- streaming pass


class _Mismatch(Exception):
    def __init__(self, rank):
        self.rank = rank


def _stream_pass(src, size, starts, ends, make_new, *, keep=None, sink=None, url=None, append=b""):
    """Stream ``src`` (``size`` bytes) block by block.

    Bytes inside the runs [starts, ends) are gathered (in file order, rank
    0..D-1) and replaced by ``make_new(old_values, rank0)``. Returns
    (old_all, new_all, sha256(original), sha256(result), tail) where result is
    the patched file cut at ``keep`` followed by ``append``, and tail the
    bytes beyond ``keep``. The result is written to ``sink`` if given.
    """
    keep = size if keep is None else keep
    lens = ends - starts
    cum = np.zeros(lens.size + 1, np.int64)
    np.cumsum(lens, out=cum[1:])
    total = int(cum[-1])
    old_all = np.empty(total, np.uint8)
    new_all = np.empty(total, np.uint8)
    h_old, h_new = hashlib.sha256(), hashlib.sha256()
    tail = bytearray()
    pos = 0
    while pos < size:
        blk = src.read(min(_BLOCK, size - pos))
        if not blk:
            raise StorageError("short read: the file is smaller than its reported size", file=url, byte_range=(pos, size))
        n = len(blk)
        h_old.update(blk)
        bs, be = pos, pos + n
        i0 = int(np.searchsorted(ends, bs, side="right"))
        i1 = int(np.searchsorted(starts, be, side="left"))
        out = blk
        if i1 > i0:
            arr = np.frombuffer(blk, np.uint8).copy()
            s = np.clip(starts[i0:i1], bs, be) - bs
            e = np.clip(ends[i0:i1], bs, be) - bs
            ln = e - s
            before = np.cumsum(ln) - ln
            mask = np.repeat(s - before, ln) + np.arange(int(ln.sum()), dtype=np.int64)  # in-block offsets
            old_vals = arr[mask]
            rank0 = int(cum[i0] + (max(bs, int(starts[i0])) - int(starts[i0])))
            new_vals = make_new(old_vals, rank0)
            m = old_vals.size
            old_all[rank0 : rank0 + m] = old_vals
            new_all[rank0 : rank0 + m] = new_vals
            arr[mask] = new_vals
            out = arr.tobytes()
        if be <= keep:
            h_new.update(out)
            if sink is not None:
                sink.write(out)
        elif bs < keep:
            h_new.update(out[: keep - bs])
            if sink is not None:
                sink.write(out[: keep - bs])
            tail += blk[keep - bs :]
        else:
            tail += blk
        pos = be
    if append:
        h_new.update(append)
        if sink is not None:
            sink.write(append)
    return old_all, new_all, h_old.hexdigest(), h_new.hexdigest(), bytes(tail)


def _runs_to_changes(starts, ends, old_all, new_all):
    lens = ends - starts
    cum = np.zeros(lens.size + 1, np.int64)
    np.cumsum(lens, out=cum[1:])
    ob, nb = old_all.tobytes(), new_all.tobytes()
    c = cum.tolist()
    return [(s, ob[c[i] : c[i + 1]], nb[c[i] : c[i + 1]]) for i, s in enumerate(starts.tolist())]


def _write_local(lpath, starts, lens, vals, truncate_to=None, append=None):
    """Store only the changed bytes into a local file, in place.

    Runs ``[starts[i], starts[i] + lens[i])`` receive ``vals`` (concatenated
    in run order). The file is memory-mapped and only the changed bytes are
    assigned (long runs by slice, short ones by vectorised fancy indexing), so
    there is no per-run system call and unchanged bytes are never written.
    """
    if starts.size:
        cum = np.zeros(lens.size + 1, np.int64)
        np.cumsum(lens, out=cum[1:])
        with map_for_update(lpath) as mm:
            long_runs = lens >= 4096
            for i in np.flatnonzero(long_runs).tolist():
                s0 = int(starts[i])
                mm[s0 : s0 + int(lens[i])] = vals[cum[i] : cum[i + 1]]
            short = np.flatnonzero(~long_runs)
            step = 1 << 20  # runs per vectorised batch: bounds the index arrays
            for j in range(0, short.size, step):
                sel = short[j : j + step]
                ln = lens[sel]
                before = np.cumsum(ln) - ln
                k = np.arange(int(ln.sum()), dtype=np.int64)
                # file offset and source index of every byte of the selected runs
                mm[np.repeat(starts[sel] - before, ln) + k] = vals[np.repeat(cum[sel] - before, ln) + k]
        del mm  # unmapped before the file may be truncated
    if truncate_to is not None or append:
        patch_bytes(lpath, truncate_to=truncate_to, append=append)


def _sha256_of(url, storage_options) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open_read(url, storage_options) as f:
        while True:
            blk = f.read(_BLOCK)
            if not blk:
                break
            h.update(blk)
            n += len(blk)
    return h.hexdigest(), n


# --------------------------------------------------------------------------- corrupt


def corrupt(
    path,
    *,
    mode: str,
    fraction: float | None = None,
    count: int | None = None,
    seed: int,
    region=None,
    out=None,
    storage_options: dict | None = None,
    burst_length: int = 64,
    sector_size: int = 4096,
    record=None,
) -> FaultRecord:
    """Damage ``path`` deterministically and return a :class:`FaultRecord`.

    See the module documentation for the modes, the meaning of ``fraction`` /
    ``count`` / ``region`` and the exact sampling procedure. ``out`` (a path or
    URL) receives the damaged copy and leaves ``path`` untouched;
    ``storage_options`` are passed to fsspec for both ``path`` and ``out``.

    ``record`` (a local path) receives the undo record (:meth:`FaultRecord.save`)
    *before* the file is damaged in place: when it cannot be written, the
    error is raised and the file is left untouched.

    Raises :class:`FaultArgumentError` (a ``ValueError``) for bad arguments and
    :class:`~torch_dtdr.errors.CheckpointNotFoundError` if ``path`` names no
    file.
    """
    # ---- argument checks that need no I/O
    if mode not in MODES:
        raise FaultArgumentError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    seed = _as_int(seed, "seed")
    burst_length = _as_int(burst_length, "burst_length", 1)
    sector_size = _as_int(sector_size, "sector_size", 1)
    if fraction is not None and count is not None:
        raise FaultArgumentError("give fraction or count, not both")
    if fraction is None and count is None and mode != "region":
        raise FaultArgumentError(f"mode {mode!r} needs fraction or count")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise FaultArgumentError(f"fraction must be a number, got {fraction!r}")
        fraction = float(fraction)
        if not (0.0 <= fraction <= 1.0):  # also rejects NaN
            raise FaultArgumentError(f"fraction must be within [0, 1], got {fraction}")
    if count is not None:
        count = _as_int(count, "count")
    if mode == "region" and region is None:
        raise FaultArgumentError("mode 'region' needs region=")
    if mode == "truncate" and region is not None:
        raise FaultArgumentError("mode 'truncate' removes the tail and takes no region; use count= to choose the cut")

    url, fs, p = _open_fs(path, storage_options)
    size = _file_size(fs, p, url)
    out_url = out_fs = out_p = None
    if out is not None:
        out_url, out_fs, out_p = _open_fs(out, storage_options)
        if _same_file(fs, p, out_fs, out_p):
            out_url = out_fs = out_p = None  # same file: damage in place

    # ---- eligible ranges
    if region is not None:
        rstarts, rends, region_desc = _normalise_region(region, size, url, storage_options)
    else:
        rstarts, rends, region_desc = np.array([0], np.int64), np.array([size], np.int64), None
    rng = np.random.Generator(np.random.PCG64(seed))
    params: dict[str, Any] = {"fraction": fraction, "count": count, "region": region_desc}

    keep = size
    values = None  # how new values are made
    if mode == "truncate":
        removed = count if count is not None else int(math.floor(size * fraction))
        if removed > size:
            raise FaultArgumentError(f"count={removed} exceeds the file size {size}")
        keep = size - removed
        starts = ends = np.empty(0, np.int64)
        params["removed"] = removed
    elif mode in ("replace", "bitflip", "region"):
        n = int((rends - rstarts).sum())
        if mode == "region" and fraction is None and count is None:
            starts, ends = rstarts, rends
            k = n
        else:
            k = _count(fraction, count, n, rng=rng)
            kind, idx = _sample(rng, n, k)
            offs = _eligible_to_offsets(idx, rstarts, rends) if idx.size else idx
            if kind == "chosen":
                starts, ends = _merge_ranges(offs, offs + 1)
            else:
                starts, ends = _subtract_points(rstarts, rends, offs)
        params["n_selected"] = int(k)
        values = "bitflip" if mode == "bitflip" else "replace"
    elif mode == "burst":
        L = burst_length
        fits = (rends - rstarts) >= L
        sstarts, sends = rstarts[fits], rends[fits] - L + 1  # ranges of valid burst starts
        n = int((sends - sstarts).sum())
        k = _count(fraction, count, n, p_scale=L, rng=rng, unit=f"burst start offsets (burst_length={L})")
        idx = _materialise(*_sample(rng, n, k), n)
        bstarts = _eligible_to_offsets(idx, sstarts, sends) if idx.size else idx
        starts, ends = _merge_ranges(bstarts, bstarts + L)
        params.update(burst_length=L, n_selected=int(k))
        values = "replace"
    else:  # zero-sectors
        S = sector_size
        n_sec = -(-size // S)
        sec_start = np.arange(n_sec, dtype=np.int64) * S
        sec_end = np.minimum(sec_start + S, size)
        j = np.searchsorted(rends, sec_start, side="right")  # range that could contain the sector
        inside = np.zeros(n_sec, bool)
        valid = j < rstarts.size
        jj = j[valid]
        inside[valid] = (rstarts[jj] <= sec_start[valid]) & (sec_end[valid] <= rends[jj])
        eligible = np.flatnonzero(inside)
        n = int(eligible.size)
        k = _count(fraction, count, n, rng=rng, unit=f"sectors (sector_size={S})")
        idx = _materialise(*_sample(rng, n, k), n)
        chosen = eligible[idx]
        starts, ends = _merge_ranges(sec_start[chosen], sec_end[chosen])
        params.update(sector_size=S, n_selected=int(k))
        values = "zero"

    total = int((ends - starts).sum())
    if values == "replace":
        draws = rng.integers(1, 256, size=total, dtype=np.uint8)

        def make_new(old, r0):
            return old + draws[r0 : r0 + old.size]  # uint8 arithmetic wraps mod 256

    elif values == "bitflip":
        draws = rng.integers(0, 8, size=total, dtype=np.uint8)

        def make_new(old, r0):
            return old ^ np.left_shift(np.uint8(1), draws[r0 : r0 + old.size])

    else:

        def make_new(old, r0):
            return np.zeros_like(old)

    # ---- I/O
    in_place_local = out_fs is None and _is_local(fs)
    in_place_remote = out_fs is None and not in_place_local
    sink = io.BytesIO() if in_place_remote else None
    out_file = None
    try:
        if out_fs is not None:
            if _is_local(out_fs):
                makedirs(os.path.dirname(os.path.abspath(out_p)))
            out_file = open_sink(out_url, storage_options)
            sink = out_file
        with open_read(url, storage_options) as src:
            old_all, new_all, sha_orig, sha_new, tail = _stream_pass(
                src, size, starts, ends, make_new, keep=keep, sink=sink, url=url
            )
        if out_file is not None:
            out_file.commit()
            out_file = None
    except BaseException:
        if out_file is not None:
            try:
                out_file.abort()  # nothing partial appears at ``out``
            except Exception:
                pass
        raise

    changes = _runs_to_changes(starts, ends, old_all, new_all)
    if keep < size:
        changes.append((keep, tail, b""))
    result = FaultRecord(
        path=url,
        out=out_url,
        mode=mode,
        seed=seed,
        parameters=params,
        original_size=size,
        new_size=keep,
        original_sha256=sha_orig,
        damaged_sha256=sha_new,
        changes=changes,
    )
    if record is not None:
        result.save(record)  # the undo record exists before any damage does
    if in_place_local:
        if changes:
            _write_local(p, starts, ends - starts, new_all, truncate_to=keep if keep < size else None)
    elif in_place_remote:
        if changes:
            fs.pipe_file(p, sink.getvalue())
    return result


# --------------------------------------------------------------------------- undo


def is_restored(record: FaultRecord, path=None, storage_options: dict | None = None) -> bool:
    """Whether the file of ``record`` (or ``path``) already holds the original bytes (its size and
    sha256 match the record's), as after a successful :func:`undo`."""
    if not isinstance(record, FaultRecord):
        raise FaultArgumentError(f"is_restored needs a FaultRecord, got {type(record).__name__}")
    url, fs, p = _open_fs(record.target if path is None else path, storage_options)
    if _file_size(fs, p, url) != record.original_size:
        return False
    digest, _size = _sha256_of(url, storage_options)
    return digest == record.original_sha256


def undo(record: FaultRecord, path=None, storage_options: dict | None = None) -> str:
    """Restore the damaged file of ``record`` bit-exactly; returns its URL.

    ``path`` defaults to ``record.target`` (``out`` if the damage went to a
    copy, else ``path``). Before writing anything the current file is checked
    against the damaged state (size, sha256 when recorded, and every changed
    byte) and the restored content's sha256 against ``original_sha256``;
    afterwards the file is re-read and its sha256 checked again.

    Raises :class:`~torch_dtdr.errors.IntegrityError` if the file is not in the
    recorded damaged state (it changed since, or is another file) or the
    restore did not give the original bytes.
    """
    if not isinstance(record, FaultRecord):
        raise FaultArgumentError(f"undo needs a FaultRecord, got {type(record).__name__}")
    ch = _check_changes(record)
    url, fs, p = _open_fs(record.target if path is None else path, storage_options)
    size = _file_size(fs, p, url)
    if size != record.new_size:
        raise IntegrityError(
            f"file is {size} bytes but the damaged file was {record.new_size}; it changed since the fault",
            file=url,
        )
    starts, ends, tail = ch.starts, ch.ends, ch.tail
    want_now, restore = ch.new, ch.old

    def make_new(cur, r0):
        exp = want_now[r0 : r0 + cur.size]
        if not np.array_equal(cur, exp):
            raise _Mismatch(r0 + int(np.flatnonzero(cur != exp)[0]))
        return restore[r0 : r0 + cur.size]

    is_local = _is_local(fs)
    sink = None if is_local else io.BytesIO()
    try:
        with open_read(url, storage_options) as src:
            _, _, sha_now, sha_restored, _ = _stream_pass(
                src, size, starts, ends, make_new, sink=sink, url=url, append=tail
            )
    except _Mismatch as mm:
        lens = ends - starts
        cum = np.cumsum(lens)
        i = int(np.searchsorted(cum, mm.rank, side="right"))
        off = int(starts[i] + (mm.rank - (cum[i] - lens[i])))
        raise IntegrityError(
            "file does not hold the recorded damaged bytes; it changed since the fault, refusing to undo",
            file=url,
            byte_range=(off, off + 1),
        ) from None
    if record.damaged_sha256 is not None and sha_now != record.damaged_sha256:
        raise IntegrityError(
            "file's sha256 differs from the recorded damaged state; it changed since the fault, refusing to undo",
            file=url,
        )
    if sha_restored != record.original_sha256:
        raise IntegrityError("the record does not restore the original bytes (sha256 mismatch)", file=url)

    if not starts.size and not tail:
        return url  # nothing was changed
    if is_local:
        _write_local(p, starts, ch.lens, restore, append=tail or None)
    else:
        fs.pipe_file(p, sink.getvalue())
    final_sha, final_size = _sha256_of(url, storage_options)
    if final_sha != record.original_sha256 or final_size != record.original_size:
        raise IntegrityError("file does not match the original sha256 after undo", file=url)
    return url
