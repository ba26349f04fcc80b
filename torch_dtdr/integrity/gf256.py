"""GF(2^8) arithmetic (polynomial 0x11d, generator 2, as ISA-L): tables, generator matrices, inversion.

The field every ISA-L-matrix erasure code of :mod:`torch_dtdr.integrity`
computes in: multiplication and inverse tables, the systematic generator
matrices of ``isa_l_rs_cauchy`` and ``isa_l_rs_vand``, Gauss-Jordan
inversion and the bytewise matrix-times-chunks product. The numpy reference
backend (:mod:`.backends`), error location in :class:`.parity.ErasureCode`
and the inner Reed-Solomon code (:mod:`.inner`) share it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import CodecError

__all__ = ["MUL", "INV", "EXP_LOG", "gf_exp_log", "generator_matrix", "invert", "matmul_chunks"]

# ==========================================================================


def gf_exp_log() -> tuple[np.ndarray, np.ndarray]:
    """GF(2^8) (polynomial 0x11d) antilog table (doubled, 512 entries) and log table."""
    exp = np.zeros(512, dtype=np.int64)
    log = np.zeros(256, dtype=np.int64)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= 0x11D
    exp[255:510] = exp[:255]
    return exp, log


def _tables():
    exp, log = gf_exp_log()
    a = np.arange(256)
    mul = np.zeros((256, 256), dtype=np.uint8)
    nz = a[1:]
    mul[1:, 1:] = exp[(log[nz][:, None] + log[nz][None, :])]
    inv = np.zeros(256, dtype=np.uint8)
    inv[1:] = exp[(255 - log[nz]) % 255]
    return mul, inv


#: ``MUL[a, b]`` is a·b and ``INV[a]`` is 1/a in GF(2^8) (``INV[0]`` is 0).
MUL, INV = _tables()
#: :func:`gf_exp_log` computed once.
EXP_LOG = gf_exp_log()


def generator_matrix(algorithm: str, k: int, m: int) -> np.ndarray:
    """The (k + m) x k systematic generator matrix ISA-L uses for ``algorithm``."""
    a = np.zeros((k + m, k), dtype=np.uint8)
    a[np.arange(k), np.arange(k)] = 1
    if algorithm == "isa_l_rs_cauchy":
        i = np.arange(k, k + m)[:, None]
        j = np.arange(k)[None, :]
        a[k:] = INV[i ^ j]
    elif algorithm == "isa_l_rs_vand":
        gen = 1
        for i in range(k, k + m):
            p = 1
            for j in range(k):
                a[i, j] = p
                p = int(MUL[p, gen])
            gen = int(MUL[gen, 2])
    else:  # pragma: no cover - internal misuse
        raise CodecError(f"no GF(2^8) matrix for {algorithm!r}")
    return a


def invert(mat: np.ndarray) -> np.ndarray | None:
    """Inverse of a square GF(2^8) matrix (Gauss-Jordan), ``None`` if singular."""
    n = mat.shape[0]
    a = np.concatenate([mat.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        piv = col + int(np.argmax(a[col:, col] != 0))
        if a[piv, col] == 0:
            return None
        if piv != col:
            a[[col, piv]] = a[[piv, col]]
        a[col] = MUL[INV[a[col, col]]][a[col]]
        f = a[:, col].copy()
        f[col] = 0
        rows = np.flatnonzero(f)
        if rows.size:
            a[rows] ^= MUL[f[rows][:, None], a[col][None, :]]
    return a[:, n:].copy()


def matmul_chunks(rows: np.ndarray, chunks: Sequence) -> np.ndarray:
    """``rows`` (r x k) times the k chunks, bytewise in GF(2^8): an (r, C) array."""
    r = rows.shape[0]
    c = memoryview(chunks[0]).nbytes
    out = np.zeros((r, c), dtype=np.uint8)
    for j, ch in enumerate(chunks):
        d = np.frombuffer(ch, dtype=np.uint8)
        for i in range(r):
            coef = rows[i, j]
            if coef == 1:
                out[i] ^= d
            elif coef:
                out[i] ^= MUL[coef][d]
    return out
