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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CodecError, IntegrityError

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

_ISAL_ALGORITHMS = ("isa_l_rs_cauchy", "isa_l_rs_vand")
_PYECLIB_ALGORITHMS = ("isa_l_rs_cauchy", "isa_l_rs_vand", "liberasurecode_rs_vand")

#: Largest stripe accepted: GF(2^8) codes have at most 256 fragments.
MAX_FRAGMENTS = 256

_HDR = 80  # liberasurecode fragment header size

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


# ==========================================================================
# GF(2^8) reference arithmetic (polynomial 0x11d, generator 2), as ISA-L.
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


def _gf_tables():
    exp, log = gf_exp_log()
    a = np.arange(256)
    mul = np.zeros((256, 256), dtype=np.uint8)
    nz = a[1:]
    mul[1:, 1:] = exp[(log[nz][:, None] + log[nz][None, :])]
    inv = np.zeros(256, dtype=np.uint8)
    inv[1:] = exp[(255 - log[nz]) % 255]
    return mul, inv


_GF_MUL, _GF_INV = _gf_tables()
_GF_EXP_LOG = gf_exp_log()


def _gen_matrix(algorithm: str, k: int, m: int) -> np.ndarray:
    """The (k + m) x k systematic generator matrix ISA-L uses for ``algorithm``."""
    a = np.zeros((k + m, k), dtype=np.uint8)
    a[np.arange(k), np.arange(k)] = 1
    if algorithm == "isa_l_rs_cauchy":
        i = np.arange(k, k + m)[:, None]
        j = np.arange(k)[None, :]
        a[k:] = _GF_INV[i ^ j]
    elif algorithm == "isa_l_rs_vand":
        gen = 1
        for i in range(k, k + m):
            p = 1
            for j in range(k):
                a[i, j] = p
                p = int(_GF_MUL[p, gen])
            gen = int(_GF_MUL[gen, 2])
    else:  # pragma: no cover - internal misuse
        raise CodecError(f"no GF(2^8) matrix for {algorithm!r}")
    return a


def _gf_invert(mat: np.ndarray) -> np.ndarray | None:
    """Inverse of a square GF(2^8) matrix (Gauss-Jordan), ``None`` if singular."""
    n = mat.shape[0]
    a = np.concatenate([mat.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        piv = col + int(np.argmax(a[col:, col] != 0))
        if a[piv, col] == 0:
            return None
        if piv != col:
            a[[col, piv]] = a[[piv, col]]
        a[col] = _GF_MUL[_GF_INV[a[col, col]]][a[col]]
        f = a[:, col].copy()
        f[col] = 0
        rows = np.flatnonzero(f)
        if rows.size:
            a[rows] ^= _GF_MUL[f[rows][:, None], a[col][None, :]]
    return a[:, n:].copy()


def _gf_matmul_chunks(rows: np.ndarray, chunks: Sequence) -> np.ndarray:
    """``rows`` (r x k) times the k chunks, bytewise in GF(2^8): an (r, C) array."""
    r = rows.shape[0]
    c = _nbytes(chunks[0])
    out = np.zeros((r, c), dtype=np.uint8)
    for j, ch in enumerate(chunks):
        d = np.frombuffer(ch, dtype=np.uint8)
        for i in range(r):
            coef = rows[i, j]
            if coef == 1:
                out[i] ^= d
            elif coef:
                out[i] ^= _GF_MUL[coef][d]
    return out


# ==========================================================================
# Buffer helpers
# ==========================================================================


def _nbytes(x) -> int:
    if isinstance(x, (bytes, bytearray)):
        return len(x)
    return memoryview(x).nbytes


def _as_buffer(x):
    """``x`` if it is bytes/bytearray, else a flat byte memoryview (no copy).

    Whatever it returns, ``len()`` of the result is its size in bytes.
    """
    t = type(x)
    if t is bytes or t is bytearray:
        return x
    if t is memoryview and x.ndim == 1 and x.format == "B":
        return x
    if isinstance(x, (bytes, bytearray)):
        return x
    mv = x if isinstance(x, memoryview) else memoryview(x)
    if mv.ndim != 1 or mv.format != "B":
        if not mv.c_contiguous:
            raise ValueError("chunks must be C-contiguous buffers")
        mv = mv.cast("B")
    return mv


def _address(x) -> int:
    """Address of the first byte of a contiguous buffer (kept alive by the caller)."""
    return np.frombuffer(x, dtype=np.uint8).ctypes.data


# Chunks up to this size are staged in a fixed per-thread buffer for ISA-L
# calls (one memcpy, pointer arrays built once): asking numpy for a chunk's
# address costs ~2 us, about the time to copy 8-16 KiB.
_STAGE_LIMIT = 16384


# ==========================================================================
# ISA-L through ctypes
# ==========================================================================

_V, _I = ctypes.c_void_p, ctypes.c_int
_ISAL = None
_ISAL_TRIED = False
_ISAL_LOCK = threading.Lock()


def _isal_candidates():
    """Paths of libisal to try: pyeclib's bundled copy first, then the system's
    (``find_library`` spawns a subprocess, so only when the first is absent)."""
    try:
        import pyeclib

        site = Path(pyeclib.__file__).resolve().parent.parent
        for pattern in ("pyeclib.libs/libisal*.so*", "pyeclib/.dylibs/libisal*.dylib", "pyeclib.libs/isal*.dll"):
            for p in sorted(site.glob(pattern)):
                yield str(p)
    except Exception:
        pass
    name = ctypes.util.find_library("isal")
    if name:
        yield name


def _load_isal():
    """ISA-L as a ctypes library, or ``None``."""
    global _ISAL, _ISAL_TRIED
    if _ISAL_TRIED:
        return _ISAL
    with _ISAL_LOCK:
        if _ISAL_TRIED:
            return _ISAL
        for cand in _isal_candidates():
            try:
                lib = ctypes.CDLL(cand)
                lib.gf_gen_cauchy1_matrix.argtypes = [_V, _I, _I]
                lib.gf_gen_cauchy1_matrix.restype = None
                lib.gf_gen_rs_matrix.argtypes = [_V, _I, _I]
                lib.gf_gen_rs_matrix.restype = None
                lib.gf_invert_matrix.argtypes = [_V, _V, _I]
                lib.gf_invert_matrix.restype = _I
                lib.ec_init_tables.argtypes = [_I, _I, _V, _V]
                lib.ec_init_tables.restype = None
                lib.ec_encode_data.argtypes = [_I, _I, _I, _V, _V, _V]
                lib.ec_encode_data.restype = None
            except (OSError, AttributeError):
                continue
            _ISAL = lib
            break
        _ISAL_TRIED = True
    return _ISAL


class _IsalBackend:
    impl = "isal"

    def __init__(self, name: str, k: int, m: int):
        lib = _load_isal()
        if lib is None:
            raise CodecError("ISA-L is not loadable")
        self.lib, self.name, self.k, self.m = lib, name, k, m
        mat = np.zeros((k + m) * k, dtype=np.uint8)
        gen = lib.gf_gen_cauchy1_matrix if name == "isa_l_rs_cauchy" else lib.gf_gen_rs_matrix
        gen(mat.ctypes.data, k + m, k)
        self.matrix = mat.reshape(k + m, k)
        self._enc_tbls = np.zeros(k * m * 32, dtype=np.uint8)
        lib.ec_init_tables(k, m, self.matrix[k:].ctypes.data, self._enc_tbls.ctypes.data)
        self._enc_addr = self._enc_tbls.ctypes.data
        self._dec_cache: dict[tuple, tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()
        self._tls = threading.local()

    def _scratch(self, c: int):
        """Per-thread staging buffers for one stripe of chunk size ``c`` and
        their ctypes pointer arrays, built once: ``(c, src, dst, src view,
        dst view, src pointers, dst pointers)``."""
        st = getattr(self._tls, "scratch", None)
        if st is None or st[0] != c:
            k, m = self.k, self.m
            src = np.empty(k * c, dtype=np.uint8)
            dst = np.empty(m * c, dtype=np.uint8)
            sa, da = src.ctypes.data, dst.ctypes.data
            st = (c, src, dst, memoryview(src), memoryview(dst),
                  (_V * k)(*range(sa, sa + k * c, c)), (_V * m)(*range(da, da + m * c, c)))
            self._tls.scratch = st
        return st

    def _run(self, tbls_addr: int, rows: int, bufs: Sequence, c: int) -> list[bytes]:
        """``rows`` output chunks of ``ec_encode_data`` over the k ``bufs``."""
        k = self.k
        if c <= _STAGE_LIMIT:
            # Stage the stripe in a fixed buffer: the pointer arrays are reused
            # and ISA-L reads cache-hot memory; cheaper than asking for k
            # addresses (~2 us each) for small chunks.
            _, _, _, smv, dmv, sp, dp = self._scratch(c)
            for j, b in enumerate(bufs):
                smv[j * c : (j + 1) * c] = b
            self.lib.ec_encode_data(c, k, rows, tbls_addr, sp, dp)
            return [bytes(dmv[i * c : (i + 1) * c]) for i in range(rows)]
        src = (_V * k)(*[_address(b) for b in bufs])
        out = np.empty((rows, c), dtype=np.uint8)
        base = out.ctypes.data
        dst = (_V * rows)(*range(base, base + rows * c, c))
        self.lib.ec_encode_data(c, k, rows, tbls_addr, src, dst)
        return [out[i].tobytes() for i in range(rows)]

    def encode(self, chunks: Sequence, c: int) -> list[bytes]:
        return self._run(self._enc_addr, self.m, chunks, c)

    def encode_stripes(self, buf, c: int, out: np.ndarray) -> None:
        k, m = self.k, self.m
        s = out.shape[0]
        base = _address(buf)
        src = np.arange(s * k, dtype=np.uint64) * np.uint64(c) + np.uint64(base)
        dst = np.arange(s * m, dtype=np.uint64) * np.uint64(c) + np.uint64(out.ctypes.data)
        sp, dp, tb = src.ctypes.data, dst.ctypes.data, self._enc_addr
        enc = self.lib.ec_encode_data
        for i in range(s):
            enc(c, k, m, tb, sp + 8 * k * i, dp + 8 * m * i)

    def _decode_tables(self, surv: tuple, missing: tuple) -> int:
        """Address of the cached ISA-L tables that rebuild ``missing`` from ``surv``."""
        key = (surv, missing)
        hit = self._dec_cache.get(key)
        if hit is None:
            k = self.k
            sub = np.ascontiguousarray(self.matrix[list(surv)])
            inv = np.zeros((k, k), dtype=np.uint8)
            if self.lib.gf_invert_matrix(sub.ctypes.data, inv.ctypes.data, k) != 0:
                raise IntegrityError(
                    f"{self.name} cannot decode erasure pattern (survivors {list(surv)}): singular matrix"
                )
            rows = np.ascontiguousarray(inv[list(missing)])
            tbls = np.zeros(k * len(missing) * 32, dtype=np.uint8)
            self.lib.ec_init_tables(k, len(missing), rows.ctypes.data, tbls.ctypes.data)
            hit = (tbls, tbls.ctypes.data)
            with self._lock:
                if len(self._dec_cache) >= 1024:
                    self._dec_cache.clear()
                self._dec_cache[key] = hit
        return hit[1]

    def reconstruct(self, chunks: Sequence, missing: list[int], c: int) -> list[bytes]:
        k = self.k
        surv, bufs = [], []
        for i, ch in enumerate(chunks):
            if ch is not None:
                surv.append(i)
                bufs.append(ch)
                if len(surv) == k:
                    break
        return self._run(self._decode_tables(tuple(surv), tuple(missing)), len(missing), bufs, c)


# ==========================================================================
# pyeclib (fragments with headers)
# ==========================================================================


class _PyECLibBackend:
    impl = "pyeclib"

    def __init__(self, name: str, k: int, m: int):
        try:
            from pyeclib.ec_iface import ECDriver
        except Exception as exc:
            raise CodecError(f"pyeclib is not importable: {exc}") from exc
        self.name, self.k, self.m = name, k, m
        try:
            self._driver = ECDriver(k=k, m=m, ec_type=name)
        except Exception as exc:
            raise CodecError(f"pyeclib cannot create {name} (k={k}, m={m}): {exc}") from exc
        self._lib = self._driver.ec_lib_reference  # skip one Python layer per call
        self._headers: dict[int, list[bytes]] = {}
        self._lock = threading.Lock()

    def headers(self, c: int) -> list[bytes]:
        """The k + m fragment headers for stripes of chunk size ``c``."""
        hdr = self._headers.get(c)
        if hdr is None:
            with self._lock:
                hdr = self._headers.get(c)
                if hdr is None:
                    frags = self._lib.encode(bytes(self.k * c))
                    if len(frags) != self.k + self.m or any(len(f) != _HDR + c for f in frags):
                        raise CodecError(
                            f"{self.name} cannot code chunks of {c} bytes without padding "
                            f"(fragment payload {len(frags[0]) - _HDR} bytes)"
                        )
                    hdr = [bytes(f[:_HDR]) for f in frags]
                    self._headers[c] = hdr
        return hdr

    def _encode_joined(self, stripe: bytes, c: int) -> list[bytes]:
        self.headers(c)  # validates that c gives unpadded fragments
        frags = self._lib.encode(stripe)
        return [f[_HDR:] for f in frags[self.k :]]

    def encode(self, chunks: Sequence, c: int) -> list[bytes]:
        return self._encode_joined(b"".join(chunks), c)

    def encode_stripes(self, buf, c: int, out: np.ndarray) -> None:
        sb = self.k * c
        mv = memoryview(buf)
        for i in range(out.shape[0]):
            for j, p in enumerate(self._encode_joined(bytes(mv[i * sb : (i + 1) * sb]), c)):
                out[i, j] = np.frombuffer(p, dtype=np.uint8)

    def reconstruct(self, chunks: Sequence, missing: list[int], c: int) -> list[bytes]:
        hdr = self.headers(c)
        avail = []
        for i, ch in enumerate(chunks):
            if ch is not None:
                avail.append(b"".join((hdr[i], ch)))
                if len(avail) == self.k:
                    break
        # One decode rebuilds every missing data chunk; pyeclib's reconstruct()
        # runs a full decode per missing index.
        whole = self._lib.decode(avail)
        if len(whole) != self.k * c:
            raise IntegrityError(f"{self.name} decoded {len(whole)} bytes, expected {self.k * c}")
        return [whole[i * c : (i + 1) * c] for i in missing]


# ==========================================================================
# numpy reference for the ISA-L matrices
# ==========================================================================


class _ReferenceBackend:
    impl = "reference"

    def __init__(self, name: str, k: int, m: int):
        self.name, self.k, self.m = name, k, m
        self.matrix = _gen_matrix(name, k, m)

    def encode(self, chunks: Sequence, c: int) -> list[bytes]:
        out = _gf_matmul_chunks(self.matrix[self.k :], chunks)
        return [row.tobytes() for row in out]

    def encode_stripes(self, buf, c: int, out: np.ndarray) -> None:
        mv = memoryview(buf)
        k = self.k
        for i in range(out.shape[0]):
            base = i * k * c
            out[i] = _gf_matmul_chunks(self.matrix[k:], [mv[base + j * c : base + (j + 1) * c] for j in range(k)])

    def reconstruct(self, chunks: Sequence, missing: list[int], c: int) -> list[bytes]:
        surv = [i for i, ch in enumerate(chunks) if ch is not None][: self.k]
        inv = _gf_invert(self.matrix[surv])
        if inv is None:
            raise IntegrityError(f"{self.name} cannot decode erasure pattern (survivors {surv}): singular matrix")
        out = _gf_matmul_chunks(inv[missing], [chunks[i] for i in surv])
        return [row.tobytes() for row in out]


# ==========================================================================
# zfec
# ==========================================================================


class _ZfecBackend:
    impl = "zfec"

    def __init__(self, name: str, k: int, m: int):
        try:
            import zfec
        except Exception as exc:
            raise CodecError(f"zfec is not importable: {exc}") from exc
        self.name, self.k, self.m = name, k, m
        self._enc = zfec.Encoder(k, k + m)
        self._dec = zfec.Decoder(k, k + m)
        self._ids = tuple(range(k, k + m))

    def encode(self, chunks: Sequence, c: int) -> list[bytes]:
        return list(self._enc.encode(tuple(chunks), self._ids))

    def encode_stripes(self, buf, c: int, out: np.ndarray) -> None:
        mv = memoryview(buf)
        k = self.k
        for i in range(out.shape[0]):
            base = i * k * c
            par = self._enc.encode(tuple(mv[base + j * c : base + (j + 1) * c] for j in range(k)), self._ids)
            for j, p in enumerate(par):
                out[i, j] = np.frombuffer(p, dtype=np.uint8)

    def reconstruct(self, chunks: Sequence, missing: list[int], c: int) -> list[bytes]:
        blocks, ids = [], []
        for i, ch in enumerate(chunks):
            if ch is not None:
                # zfec's decode writes into the buffers it is given, even
                # immutable bytes: hand it private copies (bytes(memoryview(x))
                # always allocates, unlike bytes(x) on a bytes object).
                blocks.append(bytes(memoryview(ch)))
                ids.append(i)
                if len(ids) == self.k:
                    break
        out = self._dec.decode(tuple(blocks), tuple(ids))
        return [bytes(out[i]) for i in missing]


# ==========================================================================
# Selection and known-answer checks
# ==========================================================================

_IMPLS = {"isal": _IsalBackend, "pyeclib": _PyECLibBackend, "reference": _ReferenceBackend, "zfec": _ZfecBackend}

_CHAIN = {
    "isa_l_rs_cauchy": ("isal", "pyeclib", "reference"),
    "isa_l_rs_vand": ("isal", "pyeclib", "reference"),
    "liberasurecode_rs_vand": ("pyeclib",),
    "zfec": ("zfec",),
}

_KAT_OK: dict[tuple[str, str], bool] = {}


def _kat_stripe(k: int, c: int = 96) -> list[bytes]:
    rng = np.random.default_rng(20240607)
    return [rng.integers(0, 256, c, dtype=np.uint8).tobytes() for _ in range(k)]


def _known_answer_ok(impl: str, algorithm: str) -> bool:
    """Native ISA-L-matrix implementations must match the numpy reference."""
    key = (impl, algorithm)
    if key not in _KAT_OK:
        ok = True
        if impl in ("isal", "pyeclib") and algorithm in _ISAL_ALGORITHMS:
            try:
                k, m = 5, 3
                data = _kat_stripe(k)
                ref = _ReferenceBackend(algorithm, k, m).encode(data, len(data[0]))
                got = _IMPLS[impl](algorithm, k, m).encode(data, len(data[0]))
                ok = got == ref
            except Exception:
                ok = False
        _KAT_OK[key] = ok
    return _KAT_OK[key]


def _impl_usable(impl: str, algorithm: str) -> bool:
    if impl == "isal":
        return _load_isal() is not None and _known_answer_ok(impl, algorithm)
    if impl == "pyeclib":
        try:
            from pyeclib.ec_iface import check_backend_available
        except Exception:
            return False
        try:
            if not check_backend_available(algorithm):
                return False
        except Exception:
            return False
        return _known_answer_ok(impl, algorithm)
    if impl == "zfec":
        try:
            import zfec  # noqa: F401
        except Exception:
            return False
        return True
    return impl == "reference"


def _native(algorithm: str) -> bool:
    return any(_impl_usable(i, algorithm) for i in _CHAIN[algorithm] if i != "reference")


def available_algorithms() -> list[str]:
    """The algorithms usable here (the ISA-L ones always are, via the reference)."""
    return [a for a in ALGORITHMS if any(_impl_usable(i, a) for i in _CHAIN[a])]


def default_algorithm() -> str:
    """The algorithm new files use: ``isa_l_rs_cauchy`` when a native ISA-L
    (ctypes or pyeclib) is usable, else ``zfec`` when importable, else
    ``isa_l_rs_cauchy`` through the slow numpy reference."""
    if _native("isa_l_rs_cauchy"):
        return "isa_l_rs_cauchy"
    if _impl_usable("zfec", "zfec"):
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
        chain = _CHAIN[algorithm]
        if impl is not None:
            if impl not in chain:
                raise CodecError(f"{algorithm} has no implementation {impl!r} (has: {', '.join(chain)})")
            chain = (impl,)
        errors = []
        for name in chain:
            if not _impl_usable(name, algorithm):
                errors.append(f"{name}: not usable here")
                continue
            try:
                self._backend = _IMPLS[name](algorithm, k, m)
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
        chunks = [_as_buffer(ch) for ch in data_chunks]
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
        mv = _as_buffer(buf)
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
        slots = [None if ch is None else _as_buffer(ch) for ch in chunks]
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
                if not np.array_equal(got, _gf_matmul_chunks(p, stripe)):
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
        exp, log = _GF_EXP_LOG
        k, m = self.k, self.m
        rows = [np.frombuffer(_as_buffer(ch), dtype=np.uint8) for ch in chunks]
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
        mul, inv = _GF_MUL, _GF_INV
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
