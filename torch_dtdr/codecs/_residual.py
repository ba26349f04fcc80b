"""The exact residual layer of the lossless ``dtdr`` codec.

The residual of element ``i`` is the difference, in *ordered integers*, between
the saved value ``x_i`` and the base value ``b_i`` (the deterministic base-layer
decode cast to the tensor's dtype), zigzag-coded to an unsigned integer ``r_i``.
Each ``r_i`` is split at a per-element bit width ``k_i`` that both sides compute
from ``b_i`` and the block factor: the low ``k_i`` bits (nearly uniform) are
bit-packed raw, the high part (small) goes as one byte per element into a zstd
frame. This is a Rice-style code whose parameter comes from the base layer.
See ``docs/codecs.md`` for the normative definition.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from .._cpu import compute_cores
from . import _blocks as B
from . import _literal_frames as literal_frames
from . import native

# Format constants (part of the on-disk contract; see docs/codecs.md).
DELTA = {torch.float16: -2, torch.bfloat16: 1, torch.float32: -2, torch.float64: -2}
GAMMA = 0
ESCAPE = 255
FLAG_UNBOUNDED = 1  # the segment holds values the base layer cannot represent


@dataclass(frozen=True)
class DInfo:
    w: int  # bits per element
    mant: int  # explicit mantissa bits
    ebits: int  # exponent bits
    sint: type  # numpy signed int of width w
    uint: type  # numpy unsigned int of width w
    tint: torch.dtype  # torch signed int of width w

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def itemsize(self) -> int:
        return self.w // 8

    @property
    def kmax(self) -> int:
        """The largest split width: 15, 25 (so that k + 7 bits fit a 32-bit
        read) and 56 (k + 7 bits fit a 64-bit read)."""
        return {16: 15, 32: 25, 64: 56}[self.w]


INFO = {
    torch.float16: DInfo(16, 10, 5, np.int16, np.uint16, torch.int16),
    torch.bfloat16: DInfo(16, 7, 8, np.int16, np.uint16, torch.int16),
    torch.float32: DInfo(32, 23, 8, np.int32, np.uint32, torch.int32),
    torch.float64: DInfo(64, 52, 11, np.int64, np.uint64, torch.int64),
}


def nonfinite_any(bits: np.ndarray, info: DInfo, span: int = 1 << 16) -> bool:
    """Whether the float bit patterns ``bits`` (signed ints) hold an infinity or
    a NaN (all exponent bits set). Several times faster than ``torch.isfinite``
    on 16-bit floats; works span by span so the passes stay in cache."""
    mask = info.sint(((1 << info.ebits) - 1) << info.mant)
    for i in range(0, len(bits), span):
        e = bits[i: i + span] & mask
        if (e == mask).any():
            return True
    return False


def read_dtype(dtype: torch.dtype):
    """Unsigned word read from the lo stream: wide enough for k + 7 bits."""
    need = INFO[dtype].kmax + 7
    return np.dtype("<u2") if need <= 16 else np.dtype("<u4") if need <= 32 else np.dtype("<u8")


def c_of_m(m: np.ndarray) -> np.ndarray:
    """c(m) = floor(log2(m) / 2) - 2 for a power of two m."""
    lg = np.round(np.log2(m)).astype(np.int64)
    return lg // 2 - 2


def _bit_length(v: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of every non-negative integer in ``v`` (< 2**53):
    ``frexp`` writes ``v = mu 2**e`` with ``mu`` in [0.5, 1), so ``e`` is the bit length."""
    return np.frexp(np.asarray(v, dtype=np.float64))[1].astype(np.int64)


def block_param(f: np.ndarray, m: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-block integers ``(A, Z)`` (int32): ``k_i = clip(min(A - max(e_i, 1), Z), 0, kmax)``.

    ``S = E(f) - 127 + c(m) + bias`` estimates the biased exponent (in the
    target dtype) of the base layer's error; ``A = S + mant + DELTA`` and
    ``Z = mant + bit_length(max(S, 1)) + GAMMA + DELTA``. When ``f`` is zero,
    ``A = Z = 0`` (so ``k = 0``).
    """
    info = INFO[dtype]
    fb = np.ascontiguousarray(f, dtype="<f4").view("<u4").astype(np.int64)
    fe = (fb >> 23) & 0xFF
    S = fe - 127 + c_of_m(m) + info.bias
    A = S + info.mant + DELTA[dtype]
    Z = info.mant + _bit_length(np.maximum(S, 1)) + GAMMA + DELTA[dtype]
    zero = (fb & 0x7FFFFFFF) == 0
    A = np.where(zero, 0, A)
    Z = np.where(zero, 0, Z)
    return A.astype(np.int32), Z.astype(np.int32)


def ordered(p: np.ndarray, info: DInfo) -> np.ndarray:
    """Map float bit patterns (signed ints) to integers with the float order."""
    return p ^ ((p >> (info.w - 1)) & info.sint((1 << (info.w - 1)) - 1))


def zigzag(d: np.ndarray, info: DInfo) -> np.ndarray:
    """Signed differences to unsigned codes: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
    (``ordered`` and ``zigzag`` are the reference definitions; the frame loops
    below compute them in place.)"""
    return ((d << 1) ^ (d >> (info.w - 1))).view(info.uint)


def pack_bits(lo: np.ndarray, k: np.ndarray) -> bytes:
    """Concatenate the low ``k[i]`` bits of ``lo[i]`` (LSB first; bit p of the
    stream is bit p % 8 of byte p // 8), zero-padded to whole bytes."""
    k = k.astype(np.int64, copy=False)
    total = int(k.sum())
    nbytes = (total + 7) // 8
    if total == 0:
        return b""
    pos = np.cumsum(k)
    pos -= k
    if int(k.max()) <= 32:
        # 32-bit words: every value touches at most two of them; the words are
        # sums of disjoint bit patterns < 2**32, exact in float64 (bincount).
        word = pos >> 5
        v = lo.astype(np.uint64, copy=False) << (pos & 31).astype(np.uint64)
        nwords = total // 32 + 2
        w = np.bincount(word, weights=(v & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=nwords)
        w[1:] += np.bincount(word, weights=(v >> np.uint64(32)).astype(np.float64), minlength=nwords)[: nwords - 1]
        return w.astype("<u4").view(np.uint8)[:nbytes].tobytes()
    word = pos >> 6
    off = (pos & 63).astype(np.uint64)
    lo = lo.astype(np.uint64, copy=False)
    part0 = lo << off
    part1 = (lo >> np.uint64(1)) >> (np.uint64(63) - off)
    nwords = total // 64 + 2
    words = np.zeros(nwords, np.uint64)
    starts = np.flatnonzero(np.diff(word, prepend=-1))
    uw = word[starts]
    words[uw] |= np.bitwise_or.reduceat(part0, starts)
    words[uw + 1] |= np.bitwise_or.reduceat(part1, starts)
    return words.astype("<u8", copy=False).view(np.uint8)[:nbytes].tobytes()


# --------------------------------------------------------------------------- encode


def encode_residual(x: torch.Tensor, b: torch.Tensor, f: np.ndarray, lay: B.Layout, fblocks: int, level: int):
    """Returns ``(residual bytes, frame table uint32 (nframes, 2), flags)``.

    Works frame by frame (64 Ki elements by default) so that the dozen passes
    over each frame's arrays stay in cache."""
    dtype = x.dtype
    info = INFO[dtype]
    px = x.view(info.tint).numpy()
    pb = b.view(info.tint).numpy()

    flags = 0
    if dtype == torch.float64 and bool((x.abs() > float(torch.finfo(torch.float32).max)).any()):
        flags |= FLAG_UNBOUNDED  # (also catches infinities; NaNs are caught per frame below)

    kp = KParams(f, lay, dtype)
    nframes = (lay.nblocks + fblocks - 1) // fblocks
    table = np.zeros((nframes, 2), np.uint32)
    parts = []
    uint, sint = info.uint, info.sint
    top = sint((1 << (info.w - 1)) - 1)
    hi_le = np.dtype(uint).newbyteorder("<")
    compiled = native.module()
    if compiled is not None:
        fe = min(fblocks * lay.block_size, lay.numel)
        payload = np.empty(fe + 4 * fblocks + fe * info.itemsize, np.uint8)
        lo_buf = np.empty((fe * info.kmax + 7) // 8 + 8, np.uint8)
    for j in range(nframes):
        b0, b1 = j * fblocks, min((j + 1) * fblocks, lay.nblocks)
        e0, e1 = b0 * lay.block_size, min(b1 * lay.block_size, lay.numel)
        pbj = pb[e0:e1]
        if compiled is not None:
            plen, lolen, nonfinite = compiled.residual_encode_frame(
                px[e0:e1], pbj, kp.A32[b0:b1], kp.Zc32[b0:b1], e1 - e0, lay.block_size,
                info.w, info.mant, info.ebits, info.kmax, payload, lo_buf,
            )
            if nonfinite:
                flags |= FLAG_UNBOUNDED
            z = compress_payload(payload[:plen], (e1 - e0, 4 * (b1 - b0), plen - (e1 - e0) - 4 * (b1 - b0)), level)
            table[j] = (len(z), lolen)
            parts.append(z)
            parts.append(lo_buf[:lolen].tobytes())
            continue
        if not flags and nonfinite_any(px[e0:e1], info):
            flags |= FLAG_UNBOUNDED
        kj = _k_frame(kp, pbj, b0, b1 - b0, e1 - e0)
        # r = zigzag(ordered(x) - ordered(b)), in place on one scratch array
        d = px[e0:e1] >> (info.w - 1)
        d &= top
        d ^= px[e0:e1]
        ob = pbj >> (info.w - 1)
        ob &= top
        ob ^= pbj
        d -= ob
        sign = d >> (info.w - 1)
        d <<= 1
        d ^= sign
        r = d.view(uint)
        ku = kj.astype(uint)
        hi = r >> ku
        mask = np.left_shift(uint(1), ku)
        mask -= uint(1)  # k <= w - 1: no overflow
        r &= mask
        exc = np.flatnonzero(hi >= ESCAPE)
        plane = np.minimum(hi, ESCAPE).astype(np.uint8)
        totals = np.add.reduceat(kj, np.arange(0, e1 - e0, lay.block_size), dtype=np.int64).astype("<u4")
        escapes = hi[exc].astype(hi_le).tobytes()
        z = compress_payload(b"".join((plane.tobytes(), totals.tobytes(), escapes)),
                             (plane.size, 4 * totals.size, len(escapes)), level)
        lob = pack_bits(r, kj)
        table[j] = (len(z), len(lob))
        parts.append(z)
        parts.append(lob)
    parts.append(bytes(8))  # trailer: lets the decoder read 8 bytes at any stream position
    return b"".join(parts), table, flags


# --------------------------------------------------------------------------- decode


def locate_frames(table: np.ndarray, table_bad: np.ndarray, total_len: int):
    """``(starts, ends)``: byte offsets of every frame in the section (``None``
    where unknown).

    Frames are located from the front up to the first damaged table entry and
    from the back (the section ends with an 8-byte trailer) down to the last
    one. A frame whose own entry is damaged but whose neighbours are located
    still has a known start and end; frames between two damaged entries are lost.
    """
    n = len(table)
    lens = table.astype(np.int64).sum(axis=1)
    starts: list = [None] * n
    ends: list = [None] * n
    pos = 0
    for j in range(n):
        starts[j] = pos
        if table_bad[j]:
            break
        pos += int(lens[j])
        ends[j] = pos
    end = total_len - 8
    for j in range(n - 1, -1, -1):
        if ends[j] is None:
            ends[j] = end
        if table_bad[j]:
            break
        if starts[j] is None:
            starts[j] = end - int(lens[j])
        end = starts[j]
    return starts, ends


class KParams:
    """The per-block parameters of the split width k, in the form the frame
    loops use: k = max(min(A - e, Zc), 0) with Zc = min(A - 1, Z, kmax), which
    equals clip(min(A - max(e, 1), Z), 0, kmax) and is one operation cheaper."""

    def __init__(self, f: np.ndarray, lay: B.Layout, dtype: torch.dtype):
        self.info = INFO[dtype]
        self.lay = lay
        A, Z = block_param(f, B.block_sizes_m(lay), dtype)
        self.A16 = A.astype(np.int16)
        self.Zc16 = np.minimum(np.minimum(A - 1, Z), self.info.kmax).astype(np.int16)
        # the compiled core's form of the same parameters
        self.A32 = self.A16.astype(np.int32)
        self.Zc32 = self.Zc16.astype(np.int32)


class _FrameContext:
    """State shared by the frame decoders of one segment: read-only, but for
    ``lost`` (the segment's mask of elements left at their base value, where
    each frame marks its own elements) and ``nonfinite``."""

    def __init__(self, pb, out_bits, f, block_ok, resid, table, table_bad, resid_damage, lay, dtype, fblocks):
        self.lost: np.ndarray | None = None
        self.info = INFO[dtype]
        self.dtype = dtype
        self.pb, self.out_bits = pb, out_bits
        self.block_ok = block_ok
        self.lay, self.fblocks = lay, fblocks
        self.table = table
        mv = B.as_bytes(resid)
        self.total_len = len(mv)
        self.starts, self.ends = locate_frames(table, table_bad, self.total_len)
        self.table_bad = table_bad
        self.bm = B.damaged_mask(resid_damage, self.total_len) if resid_damage else None
        if self.total_len < int(table.astype(np.int64).sum()) + 8:
            # No intact trailer (a short section): read from a zero-padded copy;
            # the frames that do not fit are lost.
            mv = memoryview(bytes(mv) + bytes(16))
        self.mv = mv
        self.rdt = read_dtype(dtype)
        self.kp = KParams(f, lay, dtype)
        #: whether a restored value is non-finite: False once the compiled core
        #: decoded every frame and saw none; None when unknown (reference core)
        self.nonfinite = False if native.module() is not None and pb is out_bits else None


def _k_frame(ctx: KParams, pbj: np.ndarray, b0: int, nb: int, n: int) -> np.ndarray:
    """k (int16) for the n elements of a frame starting at block b0."""
    info, bs = ctx.info, ctx.lay.block_size
    e = pbj >> info.mant
    e &= (1 << info.ebits) - 1
    e = e.astype(np.int16, copy=False)
    nfull = min(b0 + nb, ctx.lay.nfull) - b0
    nf = nfull * bs
    if nfull:
        ev = e[:nf].reshape(nfull, bs)
        np.subtract(ctx.A16[b0 : b0 + nfull, None], ev, out=ev)
        np.minimum(ev, ctx.Zc16[b0 : b0 + nfull, None], out=ev)
    if nf < n:
        et = e[nf:]
        np.subtract(ctx.A16[b0 + nb - 1], et, out=et)
        np.minimum(et, ctx.Zc16[b0 + nb - 1], out=et)
    np.clip(e, 0, info.kmax, out=e)  # (two-sided clip: much faster than maximum for int16)
    return e


def _decode_frame(ctx: _FrameContext, dctx, j: int):
    """Decode frame j into ``ctx.out_bits``. Returns ``None`` when every element
    was restored or the lost ones are already marked in ``ctx.lost``, ``True``
    when the whole frame is lost, else a boolean mask (over the frame) of the
    elements left at their base value."""
    info, lay, bs = ctx.info, ctx.lay, ctx.lay.block_size
    b0, b1 = j * ctx.fblocks, min((j + 1) * ctx.fblocks, lay.nblocks)
    e0, e1 = b0 * bs, min(b1 * bs, lay.numel)
    n, nb = e1 - e0, b1 - b0
    s, end = ctx.starts[j], ctx.ends[j]
    all_lost = True
    if s is None or end is None or not (0 <= s <= end <= ctx.total_len):
        return all_lost
    bm = ctx.bm
    mv = ctx.mv
    cap = n + 4 * nb + n * info.itemsize
    try:
        if not ctx.table_bad[j]:
            zlen, lolen = int(ctx.table[j, 0]), int(ctx.table[j, 1])
            if zlen + lolen != end - s:
                return all_lost
            zframe = mv[s : s + zlen]
            csize = zstandard.frame_content_size(zframe)
            if csize < 0 or csize > cap:
                return all_lost
            payload = dctx.decompress(zframe, max_output_size=cap)
        else:
            # The table entry is damaged but the frame's extent is known: the
            # zstd frame ends where its decoder stops.
            region = mv[s:end]
            csize = zstandard.frame_content_size(region)
            if csize < 0 or csize > cap:
                return all_lost
            dobj = dctx.decompressobj()
            payload = dobj.decompress(region)
            zlen = (end - s) - len(dobj.unused_data)
            lolen = (end - s) - zlen
    except (zstandard.ZstdError, ValueError):
        return all_lost
    if bm is not None and bm[s : s + zlen].any():
        return all_lost
    compiled = native.module()
    if compiled is not None and ctx.pb is ctx.out_bits:
        return _decode_frame_compiled(compiled, ctx, payload, s + zlen, lolen, b0, b1, e0, e1)
    fixed = n + 4 * nb
    if len(payload) < fixed:
        return all_lost
    plane = np.frombuffer(payload, np.uint8, n)
    exc_idx = np.flatnonzero(plane == ESCAPE)
    nexc = len(exc_idx)
    if len(payload) != fixed + nexc * info.itemsize:
        return all_lost
    totals = np.frombuffer(payload, "<u4", nb, n).astype(np.int64)
    if (int(totals.sum()) + 7) // 8 != lolen:
        return all_lost
    lo0 = s + zlen  # byte offset of this frame's lo stream in the section

    # ---- k and bit positions: an exclusive prefix sum of k inside every
    # block plus the block's start (from the stored totals)
    pbj = ctx.pb[e0:e1]
    k = _k_frame(ctx.kp, pbj, b0, nb, n)
    nfull = min(b1, lay.nfull) - b0
    nf = nfull * bs
    pos = np.empty(n, np.int32)
    csum = np.empty(nb, np.int64)
    bstart = np.cumsum(totals) - totals
    if nfull:
        kv = k[:nf].reshape(nfull, bs)
        cs = np.cumsum(kv, axis=1, dtype=np.int32)
        csum[:nfull] = cs[:, -1]
        pv = pos[:nf].reshape(nfull, bs)
        np.subtract(cs, kv, out=pv)
        pv += bstart[:nfull, None].astype(np.int32)
    if nf < n:
        ct = np.cumsum(k[nf:], dtype=np.int32)
        csum[nfull] = ct[-1]
        np.subtract(ct, k[nf:], out=pos[nf:])
        pos[nf:] += np.int32(bstart[-1])
    okb = ctx.block_ok[b0:b1] & (csum == totals)
    elem_ok = None if okb.all() else np.repeat(okb, bs)[:n]

    # ---- gather the low bits: a little-endian word read at every byte offset
    rdt = ctx.rdt
    rsz = rdt.itemsize
    local = np.zeros(lolen + rsz + 8, np.uint8)
    local[:lolen] = np.frombuffer(mv, np.uint8, lolen, lo0)
    words = np.ndarray(shape=(lolen + 8,), dtype=rdt, buffer=local, strides=(1,))
    if elem_ok is not None:
        np.clip(pos, 0, 8 * lolen, out=pos)
    upos = pos.view(np.uint32)
    byte = upos >> 3
    lo = words.take(byte)
    ku = k.astype(rdt)
    lo >>= (upos & 7).astype(rdt, copy=False)
    lo &= (np.ones(1, rdt) << ku) - rdt.type(1)

    # ---- hi part and exceptions
    ku = ku.astype(info.uint, copy=False)
    r = plane.astype(info.uint)
    r <<= ku
    r |= lo.astype(info.uint, copy=False)
    if nexc:
        exc_val = np.frombuffer(payload, np.dtype(info.uint).newbyteorder("<"), nexc, fixed)
        r[exc_idx] = (exc_val.astype(info.uint) << ku[exc_idx]) | lo[exc_idx].astype(info.uint)

    # ---- damage inside the lo stream: elements whose bits overlap it
    if bm is not None and lolen and bm[lo0 : lo0 + lolen].any():
        dmg = bm[lo0 : lo0 + lolen]
        cum = np.concatenate(([0], np.cumsum(dmg, dtype=np.int64)))
        first = byte.astype(np.int64)
        last = (pos.astype(np.int64) + np.maximum(k, 1) - 1) >> 3
        np.clip(first, 0, lolen, out=first)
        np.clip(last + 1, 0, lolen, out=last)
        hit = (cum[last] - cum[first]) != 0
        elem_ok = ~hit if elem_ok is None else elem_ok & ~hit

    # ---- apply: x = unordered(ordered(b) + unzigzag(r))
    sint = info.sint
    top = sint((1 << (info.w - 1)) - 1)
    d = r >> 1
    r &= 1
    np.negative(r, out=r)
    d ^= r
    ob = pbj >> (info.w - 1)
    ob &= top
    ob ^= pbj
    ob += d.view(sint)
    t = ob >> (info.w - 1)
    t &= top
    ob ^= t
    target = ctx.out_bits[e0:e1]
    if elem_ok is None:
        target[:] = ob
        return None
    np.copyto(target, ob, where=elem_ok)
    return ~elem_ok


def _decode_frame_compiled(compiled, ctx: _FrameContext, payload, lo0: int, lolen: int, b0, b1, e0, e1):
    """The compiled core's version of the rest of :func:`_decode_frame` (same
    results; the payload checks happen inside it, bounds-checked). Also notes
    in ``ctx.nonfinite`` whether a restored value is an infinity or a NaN."""
    info, n = ctx.info, e1 - e0
    bm = ctx.bm
    dmg = None
    if bm is not None and lolen and bm[lo0 : lo0 + lolen].any():
        dmg = bm[lo0 : lo0 + lolen].view(np.uint8)
    status = compiled.residual_decode_frame(
        payload, ctx.mv[lo0 : lo0 + lolen], dmg, ctx.out_bits[e0:e1], ctx.kp.A32[b0:b1], ctx.kp.Zc32[b0:b1],
        ctx.block_ok[b0:b1].view(np.uint8), n, ctx.lay.block_size, info.w, info.mant, info.ebits, info.kmax,
        ctx.lost[e0:e1].view(np.uint8),
    )
    if status < 0:
        return True
    if status & 2:
        ctx.nonfinite = True
    return None


_local = threading.local()


def thread_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor (one per thread: creating one per segment is measurable)."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


#: zstd levels at which each frame's payload is written as a zstd frame of Huffman-coded
#: literal blocks (:mod:`._literal_frames`, docs/codecs.md 4.6 and 5); other levels run
#: zstd's own compressor at that level.
LITERAL_LEVELS = range(1, 5)


def compress_payload(payload, parts: tuple[int, int, int], level: int) -> bytes:
    """A frame's zstd frame ``Z_j``: the payload's ``parts`` are its plane, totals and
    escapes (byte counts)."""
    if level in LITERAL_LEVELS:
        return literal_frames.frame(payload, parts)
    return thread_compressor(level).compress(payload)


def compressor(level: int) -> zstandard.ZstdCompressor:
    """zstd's compressor at ``level`` (levels outside :data:`LITERAL_LEVELS`): content size
    on, no checksum (the container checksums every byte)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)


def thread_compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's :func:`compressor` for ``level``."""
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = compressor(level)
    return cctx


#: Per-thread scratch buffers above this size are not kept between calls.
SCRATCH_KEEP = 64 << 20


def thread_scratch(name: str, nbytes: int) -> np.ndarray:
    """A uint8 scratch buffer of at least ``nbytes`` owned by this thread and
    reused between segments (fresh large allocations cost a page fault per
    4 KiB on every segment). Its contents are undefined."""
    cache = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    buf = cache.get(name)
    if buf is None or len(buf) < nbytes:
        buf = np.empty(max(nbytes, 1), np.uint8)
        if nbytes <= SCRATCH_KEEP:
            cache[name] = buf
    return buf[:nbytes]


def release_thread_buffers() -> None:
    """Drop this thread's scratch buffers (a thread that encodes now and then
    need not keep tens of MB; worker threads drop theirs when they end)."""
    _local.__dict__.pop("scratch", None)


#: Threads used to decode the residual frames of one segment (frames are
#: independent; numpy and zstd release the GIL). Set to 1 to decode inline.
#: Used only while no other segment is being decoded: when a load already
#: decodes segments in parallel, more threads would only oversubscribe the CPU.
DECODE_THREADS = min(2, compute_cores())

_active = 0
_active_lock = threading.Lock()


def decode_residual(
    out_bits: np.ndarray,
    pb: np.ndarray,
    f: np.ndarray,
    block_ok: np.ndarray,
    resid,
    table: np.ndarray,
    table_bad: np.ndarray,
    resid_damage,
    lay: B.Layout,
    dtype: torch.dtype,
    fblocks: int,
) -> tuple[np.ndarray, bool | None]:
    """Apply the residual: write exact bit patterns into ``out_bits`` (signed
    ints, initialised with the base ``pb``; may be the same array) for the
    elements it can restore.

    ``block_ok`` marks blocks whose base and factor are intact. Returns
    ``(lost, nonfinite)``: a boolean mask of the elements left at their base
    value (lost residual), and whether a restored value is an infinity or a
    NaN (``None`` when this core does not know: check ``out_bits``).
    """
    ctx = _FrameContext(pb, out_bits, f, block_ok, resid, table, table_bad, resid_damage, lay, dtype, fblocks)
    nframes = len(table)
    lost = ctx.lost = np.zeros(lay.numel, bool)
    bs = lay.block_size

    def run(frames):
        dctx = zstandard.ZstdDecompressor()
        out = []
        for j in frames:
            out.append((j, _decode_frame(ctx, dctx, j)))
        return out

    global _active
    with _active_lock:
        _active += 1
        alone = _active == 1
    try:
        if alone and DECODE_THREADS > 1 and nframes >= 4:
            from concurrent.futures import ThreadPoolExecutor

            nt = min(DECODE_THREADS, nframes)
            with ThreadPoolExecutor(nt) as ex:
                results = [r for part in ex.map(run, [range(t, nframes, nt) for t in range(nt)]) for r in part]
        else:
            results = run(range(nframes))
    finally:
        with _active_lock:
            _active -= 1
    for j, lm in results:
        if lm is True:
            lost[j * fblocks * bs : (j + 1) * fblocks * bs] = True
        elif lm is not None:
            e0 = j * fblocks * bs
            lost[e0 : e0 + len(lm)] = lm
    return lost, ctx.nonfinite


def decode_residual_frames(
    out_bits: np.ndarray,
    f: np.ndarray,
    block_ok: np.ndarray,
    resid_part,
    part_start: int,
    resid_damage,
    table: np.ndarray,
    table_bad: np.ndarray,
    section_length: int,
    first_frame: int,
    lay: B.Layout,
    dtype: torch.dtype,
    fblocks: int,
) -> np.ndarray:
    """:func:`decode_residual` for some frames of a segment: those from ``first_frame`` that ``lay``
    covers (``lay``, ``out_bits`` (initialised with the base values), ``f`` and ``block_ok`` are theirs
    alone). ``resid_part`` holds bytes ``[part_start, part_start + len)`` of the residual section of
    ``section_length`` bytes (``resid_damage`` relative to them); ``table`` and ``table_bad`` are the whole
    segment's frame table, so that every frame is located where a whole decode locates it. Returns the
    mask of the elements left at their base value."""
    nframes = -(-lay.nblocks // fblocks)
    frames = slice(first_frame, first_frame + nframes)
    ctx = _FrameContext(out_bits, out_bits, f, block_ok, resid_part, table[frames], table_bad[frames], resid_damage,
                        lay, dtype, fblocks)
    starts, ends = locate_frames(table, table_bad, section_length)
    ctx.starts = [None if s is None else s - part_start for s in starts[frames]]
    ctx.ends = [None if e is None else e - part_start for e in ends[frames]]
    lost = ctx.lost = np.zeros(lay.numel, bool)
    dctx = thread_decompressor()
    for j in range(nframes):
        frame_lost = _decode_frame(ctx, dctx, j)
        e0 = j * fblocks * lay.block_size
        if frame_lost is True:
            lost[e0: e0 + fblocks * lay.block_size] = True
        elif frame_lost is not None:
            lost[e0: e0 + len(frame_lost)] = frame_lost
    return lost
