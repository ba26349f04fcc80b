"""Inner byte-level Reed-Solomon code: the "archive" parity level.

Stripe parity (:mod:`.parity`) repairs whole chunks, at most m per stripe.
When random byte errors hit *every* chunk (a byte error rate of 1e-3 damages
98% of 4 KiB chunks), stripe parity alone is helpless. The inner code adds,
to every chunk, Reed-Solomon parity that corrects scattered byte errors at
unknown positions inside the chunk itself.

Code
----
``RS(255, 255 - nsym)`` over GF(2^8), polynomial 0x11d, generator alpha = 2,
first consecutive root alpha^0 (``g(x) = prod_{i<nsym} (x - alpha^i)``). A
chunk of C bytes is spread over ``ncw = ceil(C / (255 - nsym))`` interleaved,
shortened codewords: byte ``i`` of the chunk is data symbol ``i // ncw`` of
codeword ``i % ncw`` (the chunk is zero-padded to ``rows * ncw`` bytes; the
padding is not stored). Codeword polynomial::

    c(x) = sum_p parity[p] x^p + sum_r data[r] x^(nsym + r)

The chunk's inner parity is ``nsym * ncw`` bytes: parity symbol ``p`` of
codeword ``j`` at offset ``p * ncw + j``. Each codeword corrects up to
``nsym // 2`` byte errors anywhere (data or parity). With the default
C = 4096, nsym = 32: 19 codewords, 608 parity bytes (14.8%), up to 16 errors
per 255-byte codeword.

Speed
-----
Encoding is a GF(2^8) matrix product, run by ISA-L's ``ec_encode_data``
over many codewords at once (ctypes, as in :mod:`.parity`). Decoding runs in
the compiled decoder (``_rs.c``, chosen by :mod:`.native`): per block of 32
codewords, syndromes with AVX2 nibble lookups (portable C: the remainder
modulo g(x) by a shift register, evaluated only when nonzero), then
Berlekamp-Massey, a Chien search (AVX2: 32 positions at once) and Forney for
each codeword with a nonzero syndrome, without the GIL. It costs about 3 ms
of CPU per MB of damaged chunks at a byte error rate of 3e-4, 6 ms at 1e-2
and 7 ms for random bytes (portable: 5, 12 and 21 ms), against about 3 ms per
MB for a clean load: the archive level meets the cost bounds of the other
levels (docs/security.md; ``benchmarks/inner_decode.py``). The numpy
reference (ISA-L syndromes, then a batch decoder over the codewords with a
nonzero syndrome) is the fallback with ``TORCH_DTDR_NATIVE=0`` or without a
C compiler: the same corrections and decisions, at 110 to 360 ms per MB.
Without ISA-L, a numpy product computes the same parity, slowly.

The algorithm name to record is :attr:`InnerCode.algorithm`.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from ..errors import CodecError, IntegrityError
from . import native
from .backends import load_isal
from .gf256 import INV, MUL, gf_exp_log, matmul_chunks

__all__ = ["InnerCode"]

_SOLVE = 8192  # codewords per batch of the numpy decoder (bounds its temporaries)
_BATCH = 128  # chunks per ISA-L call: keeps the ~0.6 MiB working set in cache (measured best)


_EXP, _LOG = gf_exp_log()


def _generator(nsym: int) -> list[int]:
    """Coefficients (low degree first) of prod_{i<nsym} (x - alpha^i)."""
    g = [1]
    for i in range(nsym):
        a = int(_EXP[i])
        ng = [0] * (len(g) + 1)
        for d, coef in enumerate(g):
            ng[d + 1] ^= coef  # coef * x
            ng[d] ^= int(MUL[coef, a])  # coef * alpha^i
        g = ng
    return g


class InnerCode:
    """Per-chunk interleaved RS(255, 255 - nsym) for chunks of ``chunk_size`` bytes.

    ``encode(buf)`` -> ``(nchunks, parity_size)`` uint8 parity.
    ``decode(buf, parity)`` -> ``(data (nchunks, chunk_size) uint8, status)``
    where ``status[i]`` is the number of byte errors corrected in chunk ``i``
    (data and parity symbols) or -1 when some codeword of it had too many.
    """

    def __init__(self, chunk_size: int = 4096, nsym: int = 32):
        c, nsym = int(chunk_size), int(nsym)
        if c <= 0:
            raise CodecError(f"inner code needs a positive chunk size, got {c}", field="chunk_size")
        if not 2 <= nsym <= 128 or nsym % 2:
            raise CodecError(f"inner code needs an even nsym in [2, 128], got {nsym}", field="nsym")
        self.chunk_size, self.nsym = c, nsym
        self.kmax = 255 - nsym
        self.ncw = math.ceil(c / self.kmax)
        self.rows = math.ceil(c / self.ncw)
        self.pad = self.rows * self.ncw - c
        self.parity_size = nsym * self.ncw
        self.t = nsym // 2
        self.algorithm = f"rs255_{255 - nsym}_interleaved"
        self.npos = nsym + self.rows  # codeword length (shortened)

        # Encoding matrix: P[p, r] = coefficient of x^p in x^(nsym + r) mod g(x).
        g = _generator(nsym)
        enc = np.zeros((nsym, self.rows), dtype=np.uint8)
        rem = [g[p] for p in range(nsym)]  # x^nsym mod g (char 2: -g == g)
        for r in range(self.rows):
            enc[:, r] = rem
            top = rem[-1]
            rem = [0] + rem[:-1]
            if top:
                for p in range(nsym):
                    rem[p] ^= int(MUL[top, g[p]])
        self.enc_matrix = enc
        # Syndrome matrix: H[i, pos] = alpha^(i * pos).
        i = np.arange(nsym)[:, None]
        pos = np.arange(self.npos)[None, :]
        self.syn_matrix = _EXP[(i * pos) % 255].astype(np.uint8)
        # Chien table: alpha^(-j * pos), j = 0..t.
        j = np.arange(self.t + 1)[:, None]
        self._chien = _EXP[(-(j * pos)) % 255].astype(np.uint8)
        # Positions that exist: the zero padding of the last row is not stored.
        valid = np.ones((self.ncw, self.npos), dtype=bool)
        if self.pad:
            valid[self.ncw - self.pad :, self.npos - 1] = False
        self._valid = valid

        self._lib = load_isal()
        self._tables = {}
        if self._lib is not None:
            for name, mat in (("enc", enc), ("syn", self.syn_matrix)):
                rows, k = mat.shape
                tbl = np.zeros(k * rows * 32, dtype=np.uint8)
                m = np.ascontiguousarray(mat)
                self._lib.ec_init_tables(k, rows, m.ctypes.data, tbl.ctypes.data)
                self._tables[name] = tbl

    def __repr__(self) -> str:
        return f"InnerCode(chunk_size={self.chunk_size}, nsym={self.nsym})"

    # -- GF matrix product over rows of equal length ---------------------------

    def _matmul(self, which: str, rows_arr: np.ndarray) -> np.ndarray:
        """``matrix @ rows_arr`` in GF(2^8): rows_arr is (k, L) contiguous uint8."""
        mat = self.enc_matrix if which == "enc" else self.syn_matrix
        r, k = mat.shape
        assert rows_arr.shape[0] == k and rows_arr.flags.c_contiguous
        length = rows_arr.shape[1]
        if self._lib is None:
            return matmul_chunks(mat, list(rows_arr))
        out = np.empty((r, length), dtype=np.uint8)
        V = ctypes.c_void_p
        sa, da = rows_arr.ctypes.data, out.ctypes.data
        src = (V * k)(*range(sa, sa + k * length, length))
        dst = (V * r)(*range(da, da + r * length, length))
        self._lib.ec_encode_data(length, k, r, self._tables[which].ctypes.data, src, dst)
        return out

    def _as_chunks(self, buf) -> np.ndarray:
        a = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
        if a.size % self.chunk_size:
            raise ValueError(f"buffer of {a.size} bytes is not a whole number of {self.chunk_size}-byte chunks")
        return a.reshape(-1, self.chunk_size)

    def _transpose_in(self, chunks: np.ndarray) -> np.ndarray:
        """(B, C) chunks -> (rows, B * ncw): row r holds data symbol r of every codeword."""
        b = chunks.shape[0]
        if self.pad:
            padded = np.zeros((b, self.rows * self.ncw), dtype=np.uint8)
            padded[:, : self.chunk_size] = chunks
        else:
            padded = np.ascontiguousarray(chunks)
        v = padded.view(f"V{self.ncw}")  # (B, rows) of ncw-byte records
        return np.ascontiguousarray(v.T).view(np.uint8).reshape(self.rows, b * self.ncw)

    def _parity_in(self, parity: np.ndarray) -> np.ndarray:
        """(B, nsym * ncw) parity -> (nsym, B * ncw)."""
        b = parity.shape[0]
        v = np.ascontiguousarray(parity).view(f"V{self.ncw}")  # (B, nsym)
        return np.ascontiguousarray(v.T).view(np.uint8).reshape(self.nsym, b * self.ncw)

    # -- encode ----------------------------------------------------------------

    def encode(self, buf) -> np.ndarray:
        """Inner parity of every chunk of ``buf`` (a whole number of chunks)."""
        chunks = self._as_chunks(buf)
        out = np.empty((chunks.shape[0], self.parity_size), dtype=np.uint8)
        for s in range(0, chunks.shape[0], _BATCH):
            part = chunks[s : s + _BATCH]
            b = part.shape[0]
            par = self._matmul("enc", self._transpose_in(part))  # (nsym, B * ncw)
            v = par.view(f"V{self.ncw}").reshape(self.nsym, b)
            out[s : s + b] = np.ascontiguousarray(v.T).view(np.uint8).reshape(b, self.parity_size)
        return out

    # -- decode ----------------------------------------------------------------

    def syndromes(self, buf, parity) -> np.ndarray:
        """(nchunks * ncw, nsym) syndromes, codeword ``b * ncw + j`` per row."""
        chunks = self._as_chunks(buf)
        par = np.frombuffer(parity, dtype=np.uint8) if not isinstance(parity, np.ndarray) else parity
        par = par.reshape(chunks.shape[0], self.parity_size)
        outs = []
        for s in range(0, chunks.shape[0], _BATCH):
            part = chunks[s : s + _BATCH]
            b = part.shape[0]
            stacked = np.concatenate([self._parity_in(par[s : s + b]), self._transpose_in(part)], axis=0)
            syn = self._matmul("syn", stacked)  # (nsym, B * ncw)
            outs.append(np.ascontiguousarray(syn.T))
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, self.nsym), dtype=np.uint8)

    def decode(self, buf, parity) -> tuple[np.ndarray, np.ndarray]:
        """Correct byte errors in every chunk of ``buf`` using its inner parity.

        Returns ``(data, status)``: ``data`` a new (nchunks, chunk_size) uint8
        array, ``status[i]`` the number of symbol errors corrected in chunk
        ``i`` or -1 when a codeword of it was uncorrectable (those codewords
        are left as received). Follow with the chunk checksum: like any
        bounded-distance decoder, beyond ``nsym // 2`` errors a codeword can
        be miscorrected to a wrong but valid codeword.
        """
        data, status, _codewords = self.decode_codewords(buf, parity)
        return data, status

    def decode_codewords(self, buf, parity) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`decode`, plus the (nchunks, ncw) int32 status of every
        codeword: the errors corrected in it, or -1 when it was uncorrectable.

        The compiled decoder (:mod:`.native`) runs when it is built and not
        disabled; the numpy batch decoder is the reference."""
        chunks = self._as_chunks(buf)
        nchunks = chunks.shape[0]
        par = np.frombuffer(parity, dtype=np.uint8) if not isinstance(parity, np.ndarray) else parity.reshape(-1)
        if par.size != nchunks * self.parity_size:
            raise ValueError(f"inner parity of {par.size} bytes for {nchunks} chunks of {self.parity_size}")
        compiled = native.module()
        if compiled is None:
            return self._decode_reference(chunks, par)
        data = chunks.copy()
        status = np.empty(nchunks, dtype=np.int64)
        codewords = np.empty((nchunks, self.ncw), dtype=np.int32)
        compiled.decode(data, np.ascontiguousarray(par, dtype=np.uint8), self.chunk_size, self.nsym, status,
                        codewords)
        return data, status, codewords

    def _decode_reference(self, chunks: np.ndarray, parity: np.ndarray):
        data = chunks.copy()
        nchunks = chunks.shape[0]
        status = np.zeros(nchunks, dtype=np.int64)
        codewords = np.zeros(nchunks * self.ncw, dtype=np.int32)
        syn = self.syndromes(chunks, parity)
        bad = np.flatnonzero(syn.any(axis=1))
        if bad.size == 0:
            return data, status, codewords.reshape(nchunks, self.ncw)
        ncw, nsym = self.ncw, self.nsym
        parts = [self._solve(syn[bad[i : i + _SOLVE]], bad[i : i + _SOLVE]) for i in range(0, bad.size, _SOLVE)]
        errs_q, errs_pos, errs_val, failed = (np.concatenate(x) for x in zip(*parts))
        np.add.at(status, errs_q // ncw, 1)
        status[np.unique(failed // ncw)] = -1
        np.add.at(codewords, errs_q, 1)
        codewords[failed] = -1
        # Corrections of the decodable codewords apply even in a chunk where
        # another codeword failed: the result is then closer to the original.
        d = errs_pos >= nsym  # errors in parity symbols need no fixing
        qb, qj, r = errs_q[d] // ncw, errs_q[d] % ncw, errs_pos[d] - nsym
        flat = data.reshape(nchunks, -1)
        idx = r * ncw + qj
        flat[qb, idx] ^= errs_val[d].astype(np.uint8)
        return data, status, codewords.reshape(nchunks, ncw)

    def decode_chunk(self, chunk, parity) -> bytes:
        """One chunk corrected; :class:`IntegrityError` if uncorrectable."""
        data, status = self.decode(chunk, parity)
        if status[0] < 0:
            raise IntegrityError("inner Reed-Solomon code could not correct the chunk")
        return data.tobytes()

    def _solve(self, s: np.ndarray, q: np.ndarray):
        """Batch Berlekamp-Massey + Chien + Forney for codewords ``q`` with syndromes ``s``.

        Returns (codeword ids, positions, values) of the errors found, and the
        codeword ids that could not be decoded.
        """
        mul, inv = MUL, INV
        n, two_t = s.shape
        t = self.t
        w = two_t + 2
        lam = np.zeros((n, w), dtype=np.uint8)
        lam[:, 0] = 1
        bpoly = lam.copy()
        length = np.zeros(n, dtype=np.int64)
        bcoef = np.ones(n, dtype=np.uint8)
        for step in range(two_t):
            d = np.bitwise_xor.reduce(mul[lam[:, : step + 1], s[:, step::-1]], axis=1)
            bpoly[:, 1:] = bpoly[:, :-1].copy()
            bpoly[:, 0] = 0
            coef = mul[d, inv[bcoef]]
            old = lam
            lam = lam ^ mul[coef[:, None], bpoly]
            chg = (d != 0) & (2 * length <= step)
            bpoly = np.where(chg[:, None], old, bpoly)
            bcoef = np.where(chg, d, bcoef)
            length = np.where(chg, step + 1 - length, length)
        fail = (length > t) | lam[:, t + 1 :].any(axis=1)
        valid = self._valid[q % self.ncw]
        # One error (most codewords at low error rates): Lambda = 1 + X x, so
        # the position is log(lambda_1) and the value is S_0. No search.
        one = np.flatnonzero((length == 1) & ~fail)
        pos1 = _LOG[lam[one, 1]]
        # lambda_1 == 0 leaves Lambda = 1, which has no root (log 0 is no position).
        ok1 = (lam[one, 1] != 0) & (pos1 < self.npos) & valid[one, np.minimum(pos1, self.npos - 1)]
        fail[one[~ok1]] = True
        one, pos1 = one[ok1], pos1[ok1]
        # Chien search over the stored positions of the other codewords.
        many = np.flatnonzero((length > 1) & ~fail)
        cw, pos = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if many.size:
            sub = lam[many]
            deg = int(length[many].max())
            val = np.zeros((many.size, self.npos), dtype=np.uint8)
            for j in range(deg + 1):
                val ^= mul[sub[:, j][:, None], self._chien[j][None, :]]
            roots = (val == 0) & valid[many]
            # Roots on padding positions are missing from the count, so such a
            # locator fails here: the padding is known to be zero.
            bad_count = roots.sum(axis=1) != length[many]
            fail[many[bad_count]] = True
            roots[bad_count] = False
            r_cw, pos = np.nonzero(roots)
            cw = many[r_cw]
        evals1 = s[one, 0]
        if cw.size:
            # Omega(x) = S(x) Lambda(x) mod x^(2t)
            omega = np.zeros((n, two_t), dtype=np.uint8)
            for i in range(two_t):
                omega[:, i:] ^= mul[s[:, i][:, None], lam[:, : two_t - i]]
            xinv_log = (-pos) % 255
            # Horner evaluation of Omega and Lambda' at X^-1 for every error.
            xinv = _EXP[xinv_log].astype(np.uint8)
            om = np.zeros(cw.size, dtype=np.uint8)
            for i in range(two_t - 1, -1, -1):
                om = mul[om, xinv] ^ omega[cw, i]
            dl = np.zeros(cw.size, dtype=np.uint8)
            for jj in range(t, -1, -1):  # Lambda'(x) = sum_{j even} lam[j+1] x^j
                coef_j = lam[cw, jj + 1] if jj % 2 == 0 else np.zeros(cw.size, dtype=np.uint8)
                dl = mul[dl, xinv] ^ coef_j
            x = _EXP[pos % 255].astype(np.uint8)
            bad_deriv = dl == 0
            if bad_deriv.any():
                fail[np.unique(cw[bad_deriv])] = True
            evals = mul[mul[x, om], inv[dl]]
            keep = ~fail[cw]
            cw, pos, evals = cw[keep], pos[keep], evals[keep]
        else:
            evals = np.zeros(0, dtype=np.uint8)
        cw = np.concatenate([one, cw])
        pos = np.concatenate([pos1, pos])
        evals = np.concatenate([evals1, evals])
        return q[cw], pos, evals, q[np.flatnonzero(fail)]
