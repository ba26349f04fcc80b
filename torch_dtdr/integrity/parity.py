"""Erasure coding of stripes: k data chunks + m parity chunks, all C bytes.

The container cuts its byte stream into chunks of C bytes; every k consecutive
data chunks form a *stripe*, followed on disk by m parity chunks. Checksums
turn damage into erasures at known positions, and :meth:`ErasureCode.reconstruct`
restores any m erased chunks of a stripe bit-exactly.

Parity is stored on disk, so it must be a pure function of (algorithm, k, m,
data). Each algorithm is a systematic linear code with a fixed generator
matrix; :attr:`ErasureCode.algorithm` is the name to record in the file, and
the same algorithm must be used to reconstruct.

Algorithms
----------
``isa_l_rs_cauchy`` (the default)
    Reed-Solomon over GF(2^8) (polynomial 0x11d) with ISA-L's Cauchy generator
    matrix ``gf_gen_cauchy1_matrix``: rows ``i >= k`` hold ``1 / (i ^ j)``.
    MDS for every k + m <= 256. This is exactly the parity of pyeclib's
    ``isa_l_rs_cauchy`` fragment payloads (checked at run time).
``isa_l_rs_vand``
    ISA-L's Vandermonde-derived matrix ``gf_gen_rs_matrix``. Not MDS for m >= 5
    (some erasure patterns are singular), so it is refused for m > 4 and never
    chosen by default.
``liberasurecode_rs_vand``
    liberasurecode's portable RS over GF(2^16), through pyeclib; needs even C.
``zfec``
    zfec's systematic Vandermonde code (``zfec.Encoder(k, k + m)``).

Implementations
---------------
The ISA-L algorithms run, in order of preference, through:

``isal``
    ISA-L called directly with :mod:`ctypes` (the ``libisal`` that pyeclib's
    wheel bundles, or a system one). Zero-copy: chunk addresses are handed to
    ``ec_encode_data``; decode matrices are cached per erasure pattern.
``pyeclib``
    pyeclib's ``ECDriver``. Its fragments carry an 80-byte header; for a
    buffer of exactly ``k * C`` bytes every payload is exactly C bytes, the
    data payloads are the data chunks unchanged and the header does not depend
    on the data, so the raw parity is the payload of the last m fragments and
    headers for decoding are re-created by encoding a zero stripe once.
``reference``
    A numpy GF(2^8) implementation of the same matrices (about 0.1-0.2 GB/s):
    files stay readable and repairable where neither library is installed.

Every native implementation is checked once against the reference on a known
stripe before first use, so a library that computes different parity is
refused instead of silently writing incompatible files.

This module owns :class:`ErasureCode` and the choice of algorithm and
implementation; the implementations live in :mod:`.backends` (one small
protocol), the field arithmetic in :mod:`.gf256`.
"""

from __future__ import annotations

import itertools
import threading
from typing import Sequence

import numpy as np

from ..errors import CodecError, IntegrityError
from . import gf256
from . import native as compiled_core
from .backends import CHAIN, IMPLS, as_buffer, native, usable
from .checksum import chunk_hashes

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "ErasureCode",
    "WorkBudget",
    "available_algorithms",
    "default_algorithm",
]

#: Every algorithm name this module knows.
ALGORITHMS = ("isa_l_rs_cauchy", "isa_l_rs_vand", "liberasurecode_rs_vand", "zfec")

#: Largest stripe accepted: GF(2^8) codes have at most 256 fragments.
MAX_FRAGMENTS = 256

#: Work bound of :meth:`ErasureCode.correct`: syndromes (m x chunk size) and
#: pairs x columns when locating two wrong bytes per column. A 4 KiB-chunk
#: stripe needs 8 K and, with 20 suspects, 0.8 M; this bounds hostile geometries.
_MAX_PAIR_WORK = 1 << 24


class WorkBudget:
    """Work units (bytes or table lookups) that column correction may still
    spend; shared by the threads reading one file. A reader sizes it in
    proportion to the file, so damage can never make correction cost more
    than a fixed multiple of a clean load."""

    def __init__(self, units: int):
        self.left = int(units)
        self._lock = threading.Lock()

    def spend(self, units: int) -> bool:
        """Take ``units`` if that many are left (True), else take nothing (False)."""
        with self._lock:
            if units > self.left:
                return False
            self.left -= units
            return True


#: When locating pairs of wrong bytes, columns are first tried in a sample of
#: this many; when fewer than a quarter of them are explained, the stripe is
#: given up on (its columns hold more errors than the code can locate).
_PAIR_SAMPLE = 32



def available_algorithms() -> list[str]:
    """The algorithms usable here (the ISA-L ones always are, via the reference)."""
    return [a for a in ALGORITHMS if any(usable(i, a) for i in CHAIN[a])]


def default_algorithm() -> str:
    """The algorithm new files use: ``isa_l_rs_cauchy`` when a native ISA-L
    (ctypes or pyeclib) is usable, else ``zfec`` when importable, else
    ``isa_l_rs_cauchy`` through the slow numpy reference."""
    if native("isa_l_rs_cauchy"):
        return "isa_l_rs_cauchy"
    if usable("zfec", "zfec"):
        return "zfec"
    return "isa_l_rs_cauchy"


#: The default algorithm for new files on this machine.
DEFAULT_ALGORITHM: str = default_algorithm()


# ==========================================================================
# Public API
# ==========================================================================


class ErasureCode:
    """A systematic (k + m, k) erasure code over chunks of equal length.

    ``ErasureCode(k, m, algorithm=None, impl=None)``: ``algorithm`` is one of
    :data:`ALGORITHMS` (``None``: :data:`DEFAULT_ALGORITHM`); ``impl`` forces
    an implementation (``"isal"``, ``"pyeclib"``, ``"reference"``, ``"zfec"``)
    and is meant for tests and benchmarks: every implementation of one
    algorithm computes the same bytes. With ``m == 0`` there is no parity and
    nothing is loaded.

    Attributes: ``k``, ``m``, ``n`` (= k + m), ``algorithm`` (the stable name to
    record in the file) and ``impl`` (the implementation in use, for reports).
    Instances are safe to share between threads; ISA-L calls release the GIL.
    """

    def __init__(self, k: int, m: int, algorithm: str | None = None, *, impl: str | None = None):
        k, m = int(k), int(m)
        if k < 1:
            raise CodecError(f"erasure code needs k >= 1, got k={k}", field="k")
        if m < 0:
            raise CodecError(f"erasure code needs m >= 0, got m={m}", field="m")
        if k + m > MAX_FRAGMENTS:
            raise CodecError(f"erasure code supports k + m <= {MAX_FRAGMENTS}, got k={k}, m={m}", field="k")
        algorithm = DEFAULT_ALGORITHM if algorithm is None else str(algorithm)
        if algorithm not in ALGORITHMS:
            raise CodecError(
                f"unknown erasure-code algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}", field="algorithm"
            )
        if algorithm == "isa_l_rs_vand" and m > 4:
            # ISA-L's Vandermonde-derived matrix has singular erasure patterns
            # for m >= 5 (measured: k=7, m=5 fails 4 of the 5-erasure patterns).
            raise CodecError("isa_l_rs_vand is not MDS for m > 4; use isa_l_rs_cauchy", field="algorithm")
        self.k, self.m, self.n = k, m, k + m
        self.algorithm = algorithm
        self.impl = "none"
        self._backend = None
        if m == 0:
            return
        chain = CHAIN[algorithm]
        if impl is not None:
            if impl not in chain:
                raise CodecError(f"{algorithm} has no implementation {impl!r} (has: {', '.join(chain)})")
            chain = (impl,)
        errors = []
        for name in chain:
            if not usable(name, algorithm):
                errors.append(f"{name}: not usable here")
                continue
            try:
                self._backend = IMPLS[name](algorithm, k, m)
            except CodecError as exc:
                errors.append(f"{name}: {exc}")
                continue
            self.impl = name
            break
        if self._backend is None:
            raise CodecError(f"erasure-code algorithm {algorithm!r} is not usable here ({'; '.join(errors)})")

    def __repr__(self) -> str:
        return f"ErasureCode(k={self.k}, m={self.m}, algorithm={self.algorithm!r}, impl={self.impl!r})"

    def _check_chunk_size(self, c: int) -> None:
        if c <= 0:
            raise ValueError("chunks must not be empty")
        if c >= 1 << 31:
            raise ValueError("chunks must be smaller than 2 GiB")
        if self.algorithm == "liberasurecode_rs_vand" and c % 2:
            raise CodecError("liberasurecode_rs_vand needs an even chunk size", field="chunk_size")

    def encode(self, data_chunks: Sequence) -> list[bytes]:
        """The m parity chunks (each as long as a data chunk) of one stripe of
        k equal-length bytes-like data chunks."""
        if len(data_chunks) != self.k:
            raise ValueError(f"encode needs {self.k} data chunks, got {len(data_chunks)}")
        chunks = [as_buffer(ch) for ch in data_chunks]
        c = len(chunks[0])
        if any(len(ch) != c for ch in chunks):
            raise ValueError("all chunks of a stripe must have the same length")
        if self.m == 0:
            return []
        self._check_chunk_size(c)
        return self._backend.encode(chunks, c)

    def encode_stripes(self, buf, chunk_size: int) -> np.ndarray:
        """Parity of consecutive stripes stored contiguously in ``buf``.

        ``len(buf)`` must be a multiple of ``k * chunk_size`` (pad the last
        stripe). Returns a ``uint8`` array of shape ``(stripes, m, chunk_size)``
        whose row ``s`` is the m parity chunks of stripe ``s``, back to back,
        identical to ``encode`` of that stripe. With ISA-L this is zero-copy
        and makes one C call per stripe.
        """
        c = int(chunk_size)
        mv = as_buffer(buf)
        n = len(mv)
        sb = self.k * c
        if c <= 0 or n % sb:
            raise ValueError(f"buffer of {n} bytes is not a whole number of {self.k} x {c}-byte stripes")
        s = n // sb
        out = np.empty((s, self.m, c), dtype=np.uint8)
        if self.m == 0 or s == 0:
            return out
        self._check_chunk_size(c)
        self._backend.encode_stripes(mv, c, out)
        return out

    def encode_stripes_hashed(self, buf, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode_stripes` and the chunk checksums of the stripes:
        ``(parity, hashes)``, ``hashes`` a ``uint64`` array of shape
        ``(stripes, k + m)`` whose row ``s`` is the xxh3_64 of stripe ``s``'s k
        data chunks, then of its m parity chunks (the container's chunk-sum
        order). With ISA-L and the compiled checksums (``_xxh``) one C call
        does both while each stripe is in cache, without the GIL; otherwise
        the parity, then the checksums, with the same result."""
        c = int(chunk_size)
        mv = as_buffer(buf)
        compiled = compiled_core.hashes_module()
        address = getattr(self._backend, "encode_address", None)
        if compiled is None or address is None or self.m == 0 or c <= 0 or len(mv) % (self.k * c):
            parity = self.encode_stripes(mv, c)
            stripes = parity.shape[0]  # (encode_stripes refused a bad chunk size or a partial stripe)
            return parity, np.concatenate([chunk_hashes(mv, c).reshape(stripes, self.k),
                                           chunk_hashes(parity.reshape(-1), c).reshape(stripes, self.m)], axis=1)
        self._check_chunk_size(c)
        stripes = len(mv) // (self.k * c)
        parity = np.empty((stripes, self.m, c), dtype=np.uint8)
        hashes = np.empty((stripes, self.n), dtype=np.uint64)
        compiled.stripe_parity_hashes(mv, c, self.k, self.m, *address(), parity, hashes)
        return parity, hashes

    def reconstruct(self, chunks: Sequence) -> list[bytes]:
        """The k data chunks of a stripe from its k + m slots (``None`` = erased).

        Raises :class:`~torch_dtdr.errors.IntegrityError` when more than m
        slots are erased (or the erasure pattern cannot be decoded). Inputs are
        never modified; data chunks that are present are returned as ``bytes``
        (the same object when given ``bytes``, else a copy: callers that hold
        the present chunks already should use :meth:`rebuild`).
        """
        slots, rebuilt = self._rebuild(chunks)
        out = [ch if ch is None or type(ch) is bytes else bytes(ch) for ch in slots[: self.k]]
        for i, data in rebuilt.items():
            out[i] = data
        return out

    def rebuild(self, chunks: Sequence) -> dict[int, bytes]:
        """Only the erased *data* chunks of a stripe: ``{index: bytes}``.

        Same arguments and errors as :meth:`reconstruct`, without copying the
        data chunks that are present (an empty dict when no data chunk is
        erased).
        """
        return self._rebuild(chunks)[1]

    def _rebuild(self, chunks: Sequence):
        if len(chunks) != self.n:
            raise ValueError(f"reconstruct needs {self.n} slots (k={self.k}, m={self.m}), got {len(chunks)}")
        slots = [None if ch is None else as_buffer(ch) for ch in chunks]
        erased = [i for i, ch in enumerate(slots) if ch is None]
        if len(erased) > self.m:
            raise IntegrityError(
                f"stripe has {len(erased)} erased chunks but parity repairs at most {self.m} "
                f"({self.algorithm}, k={self.k}, m={self.m})"
            )
        sizes = {len(ch) for ch in slots if ch is not None}
        if len(sizes) != 1:
            raise ValueError("all chunks of a stripe must have the same length")
        c = sizes.pop()
        missing = [i for i in erased if i < self.k]
        if not missing:
            return slots, {}
        self._check_chunk_size(c)
        try:
            rebuilt = self._backend.reconstruct(slots, missing, c)
        except (CodecError, IntegrityError):
            raise
        except Exception as exc:  # a backend failure is a failed repair
            raise IntegrityError(
                f"{self.algorithm} could not reconstruct chunks {missing} (k={self.k}, m={self.m}): {exc}"
            ) from exc
        for data in rebuilt:
            if len(data) != c:
                raise IntegrityError(f"{self.algorithm} rebuilt a chunk of {len(data)} bytes, expected {c}")
        return slots, dict(zip(missing, rebuilt))

    # ------------------------------------------------------------------ error correction

    def _parity_rows(self) -> np.ndarray | None:
        """The m x k matrix P with parity = P · data, bytewise in GF(2^8)
        (0x11d), probed from the encoder and checked on a random stripe; None
        when the code is not such a code (GF(2^16) liberasurecode)."""
        cached = getattr(self, "_p_rows", False)
        if cached is not False:
            return cached
        p = None
        if self.m and self.algorithm != "liberasurecode_rs_vand":
            try:
                unit = [bytes(64)] * self.k
                p = np.zeros((self.m, self.k), dtype=np.uint8)
                for i in range(self.k):
                    probe = list(unit)
                    probe[i] = b"\x01" + bytes(63)
                    for j, par in enumerate(self.encode(probe)):
                        p[j, i] = par[0]
                rng = np.random.default_rng(0x5EED)
                stripe = [rng.integers(0, 256, 64, dtype=np.uint8).tobytes() for _ in range(self.k)]
                got = np.stack([np.frombuffer(x, np.uint8) for x in self.encode(stripe)])
                if not np.array_equal(got, gf256.matmul_chunks(p, stripe)):
                    p = None
            except Exception:  # noqa: BLE001 - a backend that cannot be probed: no correction, erasures only
                p = None
        self._p_rows = p
        return p

    def correct(self, chunks: Sequence, suspects: Sequence[int], budget: "WorkBudget | None" = None
                ) -> dict[int, bytes]:
        """Locate and fix byte errors inside the ``suspects`` (slots whose
        checksums failed) of a full stripe of k + m present chunks.

        Every byte column of a stripe is a codeword of a distance-(m + 1) code,
        so a column with a single wrong byte can be corrected without knowing
        where it is, when m >= 2: its syndrome (the parity recomputed from the
        data, XOR the stored parity) is the error value times one column of
        the parity-check matrix, which names the slot. Scattered byte damage
        mostly hits columns once, so chunks far beyond the m that erasure
        decoding can rebuild come back. With m >= 4 (distance >= 5) a column
        with two wrong bytes in suspects is located too, when exactly one pair
        of suspects explains its syndrome. A correction is applied only where it
        lands on a suspect; columns with two or more errors are left alone.
        Returns ``{slot: corrected bytes}`` for the suspects that changed; the
        caller must check them against their checksums (a column with several
        errors can be miscorrected). ``budget`` (a :class:`WorkBudget`) is
        charged before each stage; a stage it cannot pay for is skipped.
        """
        if self.m < 2 or not suspects or len(chunks) != self.n:
            return {}
        p = self._parity_rows()
        if p is None:
            return {}
        exp, log = gf256.EXP_LOG
        k, m = self.k, self.m
        rows = [np.frombuffer(as_buffer(ch), dtype=np.uint8) for ch in chunks]
        c = len(rows[0])
        if any(len(r) != c for r in rows) or m * c > _MAX_PAIR_WORK:
            return {}
        if budget is not None and not budget.spend((k + m) * c):
            return {}
        syn = np.stack([np.frombuffer(x, np.uint8) for x in self.encode(rows[:k])]) ^ np.stack(rows[k:])
        cols = np.flatnonzero(syn.any(axis=0))
        if not cols.size:
            return {}
        s = syn[:, cols].astype(np.int64)  # (m, ncols)
        nz = s != 0
        slot = np.full(cols.size, -1, dtype=np.int64)
        value = np.zeros(cols.size, dtype=np.int64)
        # an error in parity chunk j changes syndrome j alone
        single = nz.sum(axis=0) == 1
        j = np.argmax(nz, axis=0)
        slot[single] = k + j[single]
        value[single] = s[j[single], np.flatnonzero(single)]
        # an error v in data chunk i gives syndrome P[:, i] · v
        cand = ~single & nz.all(axis=0)
        if cand.any() and (p != 0).all():
            lp = log[p.astype(np.int64)]  # (m, k)
            key = (lp[1] - lp[0]) % 255
            if len(np.unique(key)) == k:  # the ratio names the slot (MDS: always)
                lookup = np.full(255, -1, dtype=np.int64)
                lookup[key] = np.arange(k)
                idx = np.flatnonzero(cand)
                ls = log[s[:, idx]]
                i = lookup[(ls[1] - ls[0]) % 255]
                ok = i >= 0
                lv = (ls[0] - lp[0, np.maximum(i, 0)]) % 255
                for r in range(2, m):  # every other syndrome must agree
                    ok &= (lp[r, np.maximum(i, 0)] + lv) % 255 == ls[r]
                slot[idx[ok]] = i[ok]
                value[idx[ok]] = exp[lv[ok]]
        allowed = sorted(set(int(x) for x in suspects if 0 <= int(x) < self.n))
        # corrections as parallel arrays: chunk slot, column, value to XOR in
        located = slot >= 0
        fix_slot, fix_col, fix_val = [slot[located]], [cols[located]], [value[located]]
        if m >= 4:  # distance >= 5: two wrong bytes in a column can be located as well
            rest = np.flatnonzero(~located & nz.any(axis=0))
            pairs = self._pairs_sampled(p, allowed, s[:, rest], budget) if rest.size else None
            if pairs is not None:
                where, a, b, ea, eb = pairs
                fix_slot += [a, b]
                fix_col += [cols[rest[where]]] * 2
                fix_val += [ea, eb]
        fix_slot = np.concatenate(fix_slot)
        fix_col = np.concatenate(fix_col)
        fix_val = np.concatenate(fix_val).astype(np.uint8)
        fixed: dict[int, np.ndarray] = {}
        for sl in np.unique(fix_slot):
            if int(sl) not in allowed:
                continue  # it would change a chunk whose checksum passed: a multi-error column
            at = fix_slot == sl
            buf = rows[sl].copy()
            np.bitwise_xor.at(buf, fix_col[at], fix_val[at])
            fixed[int(sl)] = buf
        return {sl: buf.tobytes() for sl, buf in fixed.items()}

    def _pairs_sampled(self, p: np.ndarray, suspects: list[int], s: np.ndarray, budget):
        """:meth:`_pairs` on a sample of the columns first, giving up on the
        stripe when the sample shows its columns mostly beyond the code; each
        part is paid for from ``budget`` (suspect pairs x columns x m)."""
        npairs = len(suspects) * (len(suspects) - 1) // 2
        ncols = s.shape[1]
        first = min(ncols, _PAIR_SAMPLE)
        if budget is not None and not budget.spend(npairs * first * self.m):
            return None
        head = self._pairs(p, suspects, s[:, :first])
        if ncols == first:
            return head
        if head is None or 4 * len(head[0]) < first:
            return None
        if budget is not None and not budget.spend(npairs * (ncols - first) * self.m):
            return head
        tail = self._pairs(p, suspects, s[:, first:])
        if tail is None:
            return head
        return (np.concatenate([head[0], tail[0] + first]),) + tuple(np.concatenate([x, y]) for x, y in
                                                                      zip(head[1:], tail[1:]))

    def _pairs(self, p: np.ndarray, suspects: list[int], s: np.ndarray):
        """Columns of syndromes ``s`` (m x ncols) explained by exactly one pair of
        wrong bytes among ``suspects``: ``(column indices, slot a, slot b,
        value a, value b)``, or None. Two rows whose 2 x 2 minor is invertible
        solve each pair's two values (Cramer's rule); every row must then agree."""
        k, m = self.k, self.m
        if len(suspects) < 2 or len(suspects) > 32:
            return None
        h = np.zeros((m, self.n), dtype=np.uint8)
        h[:, :k] = p
        h[np.arange(m), k + np.arange(m)] = 1
        mul, inv = gf256.MUL, gf256.INV
        pa, pb, r1, r2 = [], [], [], []
        for a, b in itertools.combinations(suspects, 2):
            for i, j in itertools.combinations(range(m), 2):
                if mul[h[i, a], h[j, b]] ^ mul[h[i, b], h[j, a]]:
                    pa.append(a), pb.append(b), r1.append(i), r2.append(j)
                    break
        if not pa or len(pa) * s.shape[1] > _MAX_PAIR_WORK:
            return None
        a, b, r1, r2 = (np.array(x, dtype=np.int64) for x in (pa, pb, r1, r2))
        s = s.astype(np.uint8)
        h1a, h2a, h1b, h2b = (x[:, None] for x in (h[r1, a], h[r2, a], h[r1, b], h[r2, b]))
        det = mul[h1a, h2b] ^ mul[h1b, h2a]  # (pairs, 1), nonzero by construction
        s1, s2 = s[r1], s[r2]  # (pairs, ncols)
        ea = mul[mul[s1, h2b] ^ mul[s2, h1b], inv[det]]
        eb = mul[mul[s2, h1a] ^ mul[s1, h2a], inv[det]]
        ok = (ea != 0) & (eb != 0)
        for r in range(m):
            ok &= (mul[h[r, a][:, None], ea] ^ mul[h[r, b][:, None], eb]) == s[r][None, :]
        unique = ok.sum(axis=0) == 1
        if not unique.any():
            return None
        where = np.flatnonzero(unique)
        pick = np.argmax(ok[:, where], axis=0)
        return where, a[pick], b[pick], ea[pick, where].astype(np.int64), eb[pick, where].astype(np.int64)
