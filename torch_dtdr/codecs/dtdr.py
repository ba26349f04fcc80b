"""``dtdr``: the default, lossless transform-domain codec.

Base layer exactly as ``dtdr8`` (int8 random-sign Hadamard blocks, one float32
factor per block) plus an exact residual layer, so that decoding returns the
saved bits exactly, NaN payloads, infinities, -0.0 and subnormals included.
When the residual of some elements is lost to damage, those elements fall back
to the base layer (graceful, bounded error); when the base of a block is
damaged the block decodes as ``dtdr8`` would.

Sections (byte layout in ``docs/codecs.md``):

* ``meta`` (3 copies): uint32 flags, the float32 block factors, and a frame
  table of ``(zstd length, lo length)`` uint32 pairs.
* ``base``: the int8 coefficients (uncompressed).
* ``residual``: one zstd frame plus one raw bit stream per frame of
  ``frame_elements`` elements, then an 8-byte zero trailer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np
import torch
import zstandard

from .. import _memory as memory
from ..errors import CodecError
from . import _blocks as B
from . import _residual as R
from . import _literal_frames as literal_frames
from . import _units, native, register
from ._transform import check_input, read_coefs, read_factors, rounding_allowance
from .base import Codec, Damage, SectionSpec, SegmentResult, usable_out


@register
@dataclass(frozen=True)
class DTDR(Codec):
    """Lossless: int8 Hadamard base layer plus an exact, compressed residual."""

    block_size: int = 1024
    seed: int = 0
    frame_elements: int = 65536
    level: int = 3

    name: ClassVar[str] = "dtdr"
    lossless: ClassVar[bool] = True
    decodes_into: ClassVar[bool] = True

    def __post_init__(self):
        B.check_block_size(self.block_size)
        B.check_seed(self.seed)
        fe = self.frame_elements
        if not isinstance(fe, int) or isinstance(fe, bool) or fe < self.block_size or fe % self.block_size or fe > 1 << 24:
            raise CodecError(
                f"frame_elements must be a multiple of block_size ({self.block_size}) in [block_size, 2**24], got {fe!r}"
            )
        if not isinstance(self.level, int) or isinstance(self.level, bool) or not (-7 <= self.level <= 22):
            raise CodecError(f"level must be a zstd level in [-7, 22], got {self.level!r}")

    # ------------------------------------------------------------------ interface

    def accepts(self, dtype: torch.dtype) -> bool:
        return dtype in B.FLOAT_DTYPES

    def sections(self, dtype: torch.dtype) -> tuple[SectionSpec, ...]:
        return (SectionSpec("meta", copies=3), SectionSpec("base", copies=1), SectionSpec("residual", copies=1))

    @property
    def _fblocks(self) -> int:
        return self.frame_elements // self.block_size

    def nframes(self, numel: int) -> int:
        lay = B.layout(numel, self.block_size)
        return (lay.nblocks + self._fblocks - 1) // self._fblocks

    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        x = check_input(self, x)
        if x.numel() and native.module() is not None:
            return self._encode_compiled(x)
        lay = B.layout(x.numel(), self.block_size)
        q, f = B.encode_base(x, self.block_size, self.seed, 8)
        b = B.decode_base(q, f, x.dtype, x.numel(), self.block_size, self.seed, 8)
        fnp = f.numpy()
        if x.numel():
            resid, table, flags = R.encode_residual(x, b, fnp, lay, self._fblocks, self.level)
        else:
            resid, table, flags = bytes(8), np.zeros((0, 2), np.uint32), 0
        meta = b"".join((struct.pack("<I", flags), fnp.astype("<f4").tobytes(), table.astype("<u4").tobytes()))
        return {"meta": meta, "base": q.numpy().tobytes(), "residual": resid}

    def _encode_compiled(self, x: torch.Tensor) -> dict[str, bytes]:
        """The compiled core's encode: base layer, its decode and every residual
        frame in one GIL-free call, then each frame's zstd frame (docs/codecs.md 4.6) in another.
        Byte-identical to the reference encoder (docs/codecs.md 2.6, 4)."""
        numel, bs, dtype = x.numel(), self.block_size, x.dtype
        info = R.INFO[dtype]
        lay = B.layout(numel, bs)
        fblocks = self._fblocks
        nframes = (lay.nblocks + fblocks - 1) // fblocks
        frame_n = [min(fblocks * bs, numel - j * fblocks * bs) for j in range(nframes)]
        payload_caps = [n + 4 * -(-n // bs) + n * info.itemsize for n in frame_n]
        lo_caps = [(n * info.kmax + 7) // 8 + 8 for n in frame_n]
        q = native.module().unfilled_bytearray(lay.ncoef)  # written in full by the call below
        f = np.empty(lay.nblocks, np.float32)
        scratch = R.thread_scratch("base", min(numel, fblocks * bs) * info.itemsize)  # one frame's base values
        payload = R.thread_scratch("payload", sum(payload_caps))
        lo = R.thread_scratch("lo", sum(lo_caps))
        flags, lens = native.module().dtdr_encode_segment(
            B.bits_view(x), numel, bs, B.dtype_code(dtype), B.dtype_max(dtype),
            B.sign_bits(self.seed, bs), info.w, info.mant, info.ebits, info.kmax, R.DELTA[dtype], fblocks,
            q, f, scratch, payload, lo,
        )
        table = np.empty((nframes, 2), np.uint32)
        table[:, 1] = lens[1::2]
        if self.level in R.LITERAL_LEVELS:
            # the frames and the lo streams straight into the residual section, which is
            # then cut to length (its unused tail was never written)
            specs = np.empty((nframes, 4), np.uint64)
            lo_specs = np.empty((nframes, 2), np.uint64)
            poff = loff = bound = 0
            for j, n in enumerate(frame_n):
                totals, lolen = 4 * -(-n // bs), lens[2 * j + 1]
                specs[j] = (poff, n, totals, lens[2 * j] - n - totals)
                lo_specs[j] = (loff, lolen)
                bound += literal_frames.frame_bound(n, totals, lens[2 * j] - n - totals) + lolen
                poff += payload_caps[j]
                loff += lo_caps[j]
            residual = native.module().unfilled_bytearray(bound + 8)
            zlens = np.empty(nframes, np.uint64)
            native.module().literal_frames(payload, specs, residual, zlens, lo, lo_specs)
            table[:, 0] = zlens
            end = int(zlens.sum()) + int(table[:, 1].sum())
            residual[end : end + 8] = bytes(8)
            del residual[end + 8 :]
        else:
            compressor = R.thread_compressor(self.level)
            plains = []
            poff = 0
            for j in range(nframes):
                plains.append(payload[poff : poff + lens[2 * j]])
                poff += payload_caps[j]
            parts = []
            loff = 0
            for j, z in enumerate(compressor.multi_compress_to_buffer(plains, threads=0)):
                table[j, 0] = len(z)
                parts += (z, lo[loff : loff + lens[2 * j + 1]])
                loff += lo_caps[j]
            parts.append(bytes(8))
            residual = b"".join(parts)
        meta = b"".join((struct.pack("<I", flags), f.astype("<f4", copy=False).tobytes(), table.astype("<u4").tobytes()))
        return {"meta": meta, "base": q, "residual": residual}

    def decode(
        self,
        data: Mapping[str, bytes | memoryview],
        dtype: torch.dtype,
        numel: int,
        damage: Damage | None = None,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> SegmentResult:
        if not self.accepts(dtype):
            raise CodecError(f"codec 'dtdr' cannot decode dtype {dtype}")
        on_cpu = device is None or torch.device(device).type == "cpu"
        res = self._decode_cpu(data, dtype, numel, damage, usable_out(out, dtype, numel) if on_cpu else None)
        if device is not None and torch.device(device).type != "cpu":
            res.values = res.values.to(device)
        return res

    # ------------------------------------------------------------------ partial decoding: a unit is a frame

    def unit_elements(self) -> int:
        """One residual frame (``frame_elements``): frames decode independently (docs/codecs.md 4.6)."""
        return self.frame_elements

    def unit_reads(self, dtype, numel, units, meta, damage, lengths) -> dict[str, tuple[int, int]]:
        """The ``base`` coefficients and the ``residual`` bytes of frames ``[u0, u1)``."""
        return _units.unit_reads(self, numel, units, meta, damage, lengths)

    def decode_units(self, data, dtype, numel, units, damage, lengths) -> SegmentResult:
        """Frames ``[u0, u1)``, bit for bit as :meth:`decode` gives them (see :mod:`._units`)."""
        if not self.accepts(dtype):
            raise CodecError(f"codec 'dtdr' cannot decode dtype {dtype}")
        return _units.decode_units(self, data, dtype, numel, units, damage, lengths)

    # ------------------------------------------------------------------ decode

    def _decode_intact(self, data, dtype, numel, out) -> SegmentResult | None:
        """The compiled core's one-call decode of a segment the container
        reported undamaged: every frame decompressed here, then factors, base
        layer and residual in one call without the GIL. None when there is no
        compiled core or the segment is anything but a well-formed, exactly
        restorable one (then the general path decides what is lost and why)."""
        compiled = native.module()
        if compiled is None or not all(name in data for name in ("meta", "base", "residual")):
            return None
        lay = B.layout(numel, self.block_size)
        fblocks = self._fblocks
        nframes = (lay.nblocks + fblocks - 1) // fblocks
        meta, resid = B.as_bytes(data["meta"]), B.as_bytes(data["residual"])
        toff = 4 + 4 * lay.nblocks
        if len(meta) < toff + 8 * nframes:
            return None
        table = struct.unpack_from(f"<{2 * nframes}I", meta, toff)
        info = R.INFO[dtype]
        frame_elements = fblocks * self.block_size
        zframes = []
        pos = 0
        for j in range(nframes):
            zlen, lolen = table[2 * j], table[2 * j + 1]
            n = min(frame_elements, numel - j * frame_elements)
            cap = n + 4 * -(-n // self.block_size) + n * info.itemsize
            if pos + zlen + lolen + 8 > len(resid):
                return None
            zframe = resid[pos : pos + zlen]
            try:
                size = zstandard.frame_content_size(zframe)
            except (zstandard.ZstdError, ValueError):
                return None
            if size < 0 or size > cap:  # the declared sizes bound what decompression allocates
                return None
            zframes.append((zframe, cap))
            pos += zlen + lolen
        # One decompress call per frame, capped: frames are untrusted input here, so not the batched
        # multi_decompress_to_buffer the encoder uses on its own output (a fuzzed frame corrupted the heap
        # inside it).
        dctx = R.thread_decompressor()
        try:
            payloads = [dctx.decompress(zframe, max_output_size=cap) for zframe, cap in zframes]
        except (zstandard.ZstdError, ValueError):
            return None
        values = out if out is not None else memory.empty(numel, dtype)
        status = compiled.dtdr_decode_segment(
            meta, data["base"], resid, payloads, B.sign_bits(self.seed, self.block_size), B.bits_view(values),
            numel, self.block_size, B.dtype_code(dtype), B.dtype_max(dtype),
            info.w, info.mant, info.ebits, info.kmax, R.DELTA[dtype], fblocks,
        )
        return SegmentResult(values) if status == 0 else None

    def _decode_cpu(self, data, dtype, numel, damage, out=None) -> SegmentResult:
        lay = B.layout(numel, self.block_size)
        if numel == 0:
            return SegmentResult(torch.empty(0, dtype=dtype))
        if damage is None:
            intact = self._decode_intact(data, dtype, numel, out)
            if intact is not None:
                return intact
        nb = lay.nblocks
        nframes = (nb + self._fblocks - 1) // self._fblocks
        meta_missing = "meta" not in data or (damage is not None and "meta" in damage.missing)
        meta = B.as_bytes(data["meta"]) if not meta_missing else memoryview(b"")
        mdm = B.damaged_mask(damage.ranges.get("meta"), len(meta)) if damage is not None and not meta_missing else None

        # flags: damaged or missing -> assume the worst (no error bound on fallback)
        if len(meta) >= 4 and (mdm is None or not mdm[:4].any()):
            flags = struct.unpack_from("<I", meta, 0)[0]
        else:
            flags = R.FLAG_UNBOUNDED
        f, bad_f = read_factors(data, lay, damage, offset=4)

        table, table_bad = _units.frame_table(meta, mdm, nb, nframes)

        q, counts, base_missing = read_coefs(data, lay, 8, damage)
        values = B.decode_base(q, torch.from_numpy(f), dtype, numel, self.block_size, self.seed, 8, out=out)

        bad_base = np.ones(nb, bool) if base_missing else (counts > 0 if counts is not None else np.zeros(nb, bool))
        block_ok = ~bad_f & ~bad_base
        resid_missing = "residual" not in data or (damage is not None and "residual" in damage.missing)
        info = R.INFO[dtype]
        if resid_missing or meta_missing or base_missing:
            lost = np.ones(numel, bool)
        else:
            bits = values.view(info.tint).numpy()
            rdm = damage.ranges.get("residual") if damage is not None else None
            lost, nonfinite = R.decode_residual(
                bits, bits, f, block_ok, data["residual"], table, table_bad, rdm, lay, dtype, self._fblocks
            )
            if nonfinite is None:
                nonfinite = R.nonfinite_any(bits, info)
            if not flags & R.FLAG_UNBOUNDED and nonfinite:
                # Only undetected corruption can produce a non-finite value in a
                # segment that saved none: fall back to the base layer there.
                bad = ~torch.isfinite(values)
                idx = torch.nonzero(bad).flatten()
                fallback = B.decode_base(q, torch.from_numpy(f), dtype, numel, self.block_size, self.seed, 8)
                values[idx] = fallback[idx]
                lost[idx.numpy()] = True
        if not lost.any():
            return SegmentResult(values)

        # ---- report: every element not restored exactly is degraded
        n_deg = int(lost.sum())
        lost_blocks = np.zeros(nb, bool)
        idx = np.flatnonzero(lost)
        lost_blocks[np.unique(idx // self.block_size)] = True
        bound: float | None
        if base_missing or (lost_blocks & bad_f).any() or (flags & R.FLAG_UNBOUNDED):
            bound = None
        else:
            m = B.block_sizes_m(lay)
            step = f.astype(np.float64) * np.sqrt(m)
            err = step * np.sqrt(m) / 2.0  # L2 quantisation error bound: sqrt(m) * step / 2
            if counts is not None:
                err = err + step * 254.0 * np.sqrt(counts)
            err = err * 1.02
            A = B.block_maxabs(values, lay) + err
            per = err + rounding_allowance(A, dtype)
            bound = float(per[lost_blocks].max())
        return SegmentResult(values, exact=False, degraded_elements=n_deg, error_bound=bound)
