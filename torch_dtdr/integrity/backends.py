"""Erasure-code backends behind one small protocol: ISA-L through ctypes, pyeclib, zfec and a numpy reference.

A :class:`Backend` computes the parity of a stripe and rebuilds erased
chunks for one (algorithm, k, m); :data:`CHAIN` lists, per algorithm, the
implementations to try in order of preference, :func:`usable` says whether
one works here (native ISA-L implementations must match the reference on a
known stripe first), and :data:`IMPLS` builds them.
:class:`torch_dtdr.integrity.parity.ErasureCode` picks one; nothing else
needs to know which. Also the buffer helpers they share (:func:`as_buffer`,
:func:`nbytes`, :func:`address`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..errors import CodecError, IntegrityError
from . import gf256

#: Algorithms computed with ISA-L's GF(2^8) matrices.
ISAL_ALGORITHMS = ("isa_l_rs_cauchy", "isa_l_rs_vand")
#: Algorithms pyeclib provides.
PYECLIB_ALGORITHMS = ("isa_l_rs_cauchy", "isa_l_rs_vand", "liberasurecode_rs_vand")

_HDR = 80  # liberasurecode fragment header size


class Backend(Protocol):
    """One implementation of a systematic (k + m, k) code over chunks of ``c`` bytes."""

    impl: str

    def encode(self, chunks: Sequence, c: int) -> list[bytes]:
        """The m parity chunks of k data chunks."""

    def encode_stripes(self, buf, c: int, out: np.ndarray) -> None:
        """Parity of every stripe of ``buf`` (whole stripes of k chunks) into ``out``."""

    def reconstruct(self, chunks: Sequence, missing: list[int], c: int) -> list[bytes]:
        """The chunks at positions ``missing`` (data or parity) from the others."""


# ==========================================================================
# Buffer helpers
# ==========================================================================


def nbytes(x) -> int:
    if isinstance(x, (bytes, bytearray)):
        return len(x)
    return memoryview(x).nbytes


def as_buffer(x):
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


def address(x) -> int:
    """Address of the first byte of a contiguous buffer (kept alive by the caller)."""
    return np.frombuffer(x, dtype=np.uint8).ctypes.data


# Chunks up to this size are staged in a fixed per-thread buffer for ISA-L
# calls (one memcpy, pointer arrays built once): asking numpy for a chunk's
# address costs ~2 us, about the time to copy 8-16 KiB.
STAGE_LIMIT = 16384


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


def load_isal():
    """ISA-L as a ctypes library (loaded once, thread-safely), or ``None``."""
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


class IsalBackend:
    impl = "isal"

    def __init__(self, name: str, k: int, m: int):
        lib = load_isal()
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
        if c <= STAGE_LIMIT:
            # Stage the stripe in a fixed buffer: the pointer arrays are reused
            # and ISA-L reads cache-hot memory; cheaper than asking for k
            # addresses (~2 us each) for small chunks.
            _, _, _, smv, dmv, sp, dp = self._scratch(c)
            for j, b in enumerate(bufs):
                smv[j * c : (j + 1) * c] = b
            self.lib.ec_encode_data(c, k, rows, tbls_addr, sp, dp)
            return [bytes(dmv[i * c : (i + 1) * c]) for i in range(rows)]
        src = (_V * k)(*[address(b) for b in bufs])
        out = np.empty((rows, c), dtype=np.uint8)
        base = out.ctypes.data
        dst = (_V * rows)(*range(base, base + rows * c, c))
        self.lib.ec_encode_data(c, k, rows, tbls_addr, src, dst)
        return [out[i].tobytes() for i in range(rows)]

    def encode(self, chunks: Sequence, c: int) -> list[bytes]:
        return self._run(self._enc_addr, self.m, chunks, c)

    def encode_address(self) -> tuple[int, int]:
        """The addresses of ISA-L's ``ec_encode_data`` and of this code's encode
        tables, for the compiled stripe loop (``_xxh.stripe_parity_hashes``)."""
        return ctypes.cast(self.lib.ec_encode_data, _V).value, self._enc_addr

    def encode_stripes(self, buf, c: int, out: np.ndarray) -> None:
        k, m = self.k, self.m
        s = out.shape[0]
        base = address(buf)
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


class PyECLibBackend:
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


class ReferenceBackend:
    impl = "reference"

    def __init__(self, name: str, k: int, m: int):
        self.name, self.k, self.m = name, k, m
        self.matrix = gf256.generator_matrix(name, k, m)

    def encode(self, chunks: Sequence, c: int) -> list[bytes]:
        out = gf256.matmul_chunks(self.matrix[self.k :], chunks)
        return [row.tobytes() for row in out]

    def encode_stripes(self, buf, c: int, out: np.ndarray) -> None:
        mv = memoryview(buf)
        k = self.k
        for i in range(out.shape[0]):
            base = i * k * c
            out[i] = gf256.matmul_chunks(self.matrix[k:], [mv[base + j * c : base + (j + 1) * c] for j in range(k)])

    def reconstruct(self, chunks: Sequence, missing: list[int], c: int) -> list[bytes]:
        surv = [i for i, ch in enumerate(chunks) if ch is not None][: self.k]
        inv = gf256.invert(self.matrix[surv])
        if inv is None:
            raise IntegrityError(f"{self.name} cannot decode erasure pattern (survivors {surv}): singular matrix")
        out = gf256.matmul_chunks(inv[missing], [chunks[i] for i in surv])
        return [row.tobytes() for row in out]


# ==========================================================================
# zfec
# ==========================================================================


class ZfecBackend:
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

IMPLS = {"isal": IsalBackend, "pyeclib": PyECLibBackend, "reference": ReferenceBackend, "zfec": ZfecBackend}

CHAIN = {
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
        if impl in ("isal", "pyeclib") and algorithm in ISAL_ALGORITHMS:
            try:
                k, m = 5, 3
                data = _kat_stripe(k)
                ref = ReferenceBackend(algorithm, k, m).encode(data, len(data[0]))
                got = IMPLS[impl](algorithm, k, m).encode(data, len(data[0]))
                ok = got == ref
            except Exception:
                ok = False
        _KAT_OK[key] = ok
    return _KAT_OK[key]


def usable(impl: str, algorithm: str) -> bool:
    """Whether implementation ``impl`` of ``algorithm`` works here (native ISA-L ones must match the reference)."""
    if impl == "isal":
        return load_isal() is not None and _known_answer_ok(impl, algorithm)
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


def native(algorithm: str) -> bool:
    """Whether a native (non-reference) implementation of ``algorithm`` is usable here."""
    return any(usable(i, algorithm) for i in CHAIN[algorithm] if i != "reference")
