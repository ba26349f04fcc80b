"""Differential fuzzing of the compiled decoders against their references: the
codec core, and the inner Reed-Solomon decoder of the archive parity level.

Every input becomes a codec (``dtdr``, ``dtdr8``, ``dtdr16``), a dtype, a block
size, an element count, section bytes and reported damage. Both cores decode
it; the input is a finding when either raises anything (a decoder must never
raise on section bytes, whatever they are), or when the two results differ in
a single bit, in exactness, in the degraded count or in the error bound.

Inputs reach the compiled decoder's untrusted-data paths: raw bytes as every
section, valid encodings with bytes overwritten (factors, coefficients, frame
table, bit streams), and valid zstd frames whose payloads lie (wrong lengths,
escape markers, totals), which is what a file with recomputed checksums
delivers. Inputs starting with ``R`` go to the inner Reed-Solomon decoder
instead: chunks and parity from the input's bytes, or a valid encoding with the
input's byte errors (spread, or all in one codeword), decoded by the compiled
decoder with each syndrome kernel and by the numpy reference (any difference
in a corrected byte or a codeword's status is a finding); then the compiled
decoder is called with chunk sizes, nsym and buffers the input chooses. See
fuzz/README.md for the sanitizer (ASan + UBSan) build.

    python fuzz/fuzz_codec.py -max_total_time=60 CORPUS_DIR          # atheris
    python fuzz/fuzz_codec.py --pure --seconds 60                      # without atheris
    python fuzz/fuzz_codec.py --make-seeds DIR                         # a starting corpus
    python fuzz/fuzz_codec.py --replay DIR_OR_FILE...                  # run inputs once (sanitizer run)
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

torch.set_num_threads(1)

try:
    import atheris
except ImportError:
    atheris = None

PURE = atheris is None or any(a in sys.argv for a in ("--pure", "--make-seeds", "--replay"))

if atheris is not None and not PURE:
    with atheris.instrument_imports(include=["torch_dtdr"]):
        from torch_dtdr import codecs
        from torch_dtdr.codecs import native
        from torch_dtdr.codecs.base import Damage
        from torch_dtdr.integrity import native as rs_native
        from torch_dtdr.integrity.inner import InnerCode
else:
    from torch_dtdr import codecs
    from torch_dtdr.codecs import native
    from torch_dtdr.codecs.base import Damage
    from torch_dtdr.integrity import native as rs_native
    from torch_dtdr.integrity.inner import InnerCode

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NAMES = ["dtdr", "dtdr8", "dtdr16"]


class Mismatch(AssertionError):
    """The compiled core and the reference disagree."""


def _case(data: bytes):
    """(codec, dtype, numel, sections, damage) for one input."""
    h = data[:8].ljust(8, b"\0")
    rest = data[8:]
    name = NAMES[h[0] % 3]
    dtype = FLOATS[h[1] % 4]
    bs = 16 << (h[2] % 4)
    n = 1 + int.from_bytes(h[3:5], "little") % 1200
    mode = h[5] % 4
    params = {"block_size": bs, "seed": h[6]}
    if name == "dtdr":
        params["frame_elements"] = bs * (1 + h[7] % 4)
    codec = codecs.get(name, **params)
    rng = random.Random(int.from_bytes(hashlib.sha1(rest).digest()[:8], "little"))
    specs = [s.name for s in codec.sections(dtype)]
    if mode == 0:
        # raw bytes as every section, split by the input
        sections, pos = {}, 0
        for s in specs:
            take = rest[pos : pos + 2] if pos + 2 <= len(rest) else b"\0\0"
            length = int.from_bytes(take, "little") % (4 * n + 64)
            pos += 2
            sections[s] = rest[pos : pos + length]
            pos += length
        return codec, dtype, n, sections, Damage() if h[7] & 1 else None
    x = (torch.randn(n, generator=torch.Generator().manual_seed(h[6] * 7 + n), dtype=torch.float64)
         * 10.0 ** rng.randint(-6, 4)).to(dtype)
    if rng.random() < 0.3:
        x[rng.randrange(n)] = rng.choice([float("nan"), float("inf"), -0.0, float(torch.finfo(dtype).max)])
    sections = {k: bytearray(v) for k, v in codec.encode(x).items()}
    ranges: dict[str, list[tuple[int, int]]] = {}
    if mode == 3 and name == "dtdr":
        # replace one frame's payload with the input, as a valid zstd frame
        meta, resid = sections["meta"], sections["residual"]
        nb = -(-n // bs)
        nframes = -(-nb // (params["frame_elements"] // bs))
        toff = 4 + 4 * nb
        table = np.frombuffer(bytes(meta[toff : toff + 8 * nframes]), "<u4").reshape(nframes, 2).astype(int)
        j = rng.randrange(nframes)
        start = int(table[:j].sum())
        zlen, lolen = int(table[j, 0]), int(table[j, 1])
        payload = bytearray(zstandard.ZstdDecompressor().decompress(bytes(resid[start : start + zlen])))
        for i, b in enumerate(rest[:64]):
            if payload:
                payload[(i * 131 + b) % len(payload)] ^= b
        if rest[64:65]:
            cut = rest[64] % 9
            payload = payload[: len(payload) - cut] if rest[64] & 16 else payload + bytes(cut)
        z = zstandard.ZstdCompressor().compress(bytes(payload))
        lo = resid[start + zlen : start + zlen + lolen]
        if rest[65:66] and rest[65] & 1:
            lo = lo[: len(lo) - 1 - rest[65] % 4] if lo else lo + b"\x01"
        sections["residual"] = resid[:start] + z + lo + resid[start + zlen + lolen :]
        meta[toff + 8 * j : toff + 8 * j + 8] = len(z).to_bytes(4, "little") + len(lo).to_bytes(4, "little")
    else:
        # overwrite bytes of the valid sections at positions the input chooses
        for i in range(0, len(rest) - 3, 4):
            s = specs[rest[i] % len(specs)]
            buf = sections[s]
            if not buf:
                continue
            pos = int.from_bytes(rest[i + 1 : i + 3], "little") % len(buf)
            buf[pos] ^= rest[i + 3] or 1
            if mode == 2:
                ranges.setdefault(s, []).append((pos, pos + 1))
        if mode == 2 and rest[-1:] and rest[-1] % 5 == 0:
            victim = specs[rest[-1] % len(specs)]
            cut = len(sections[victim]) // 2
            del sections[victim][cut:]
    merged = {}
    for s, rs in ranges.items():
        out: list[tuple[int, int]] = []
        for a, b in sorted(rs):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(b, out[-1][1]))
            else:
                out.append((a, b))
        merged[s] = out
    damage = Damage(ranges=merged) if mode == 2 else None
    return codec, dtype, n, {k: bytes(v) for k, v in sections.items()}, damage


def _same(a, b) -> bool:
    va = a.values.contiguous().view(torch.uint8)
    vb = b.values.contiguous().view(torch.uint8)
    return (torch.equal(va, vb) and (a.exact, a.degraded_elements) == (b.exact, b.degraded_elements)
            and a.error_bound == b.error_bound)


INFO = {16: (10, 5, 15), 32: (23, 8, 25), 64: (52, 11, 56)}


def run_kernel(data: bytes) -> None:
    """The compiled residual decoder called directly on exactly-sized copies of
    hostile payloads and bit streams, so that a sanitizer sees any read past them."""
    compiled = native.module()
    if compiled is None or len(data) < 8:
        return
    w = (16, 32, 64)[data[1] % 3]
    mant, ebits, kmax = INFO[w]
    bs = 16 << (data[2] % 3)
    n = 1 + data[3] % (3 * bs)
    nb = -(-n // bs)
    rest = data[8:]
    rng = np.random.default_rng(data[6])
    itype = {16: np.int16, 32: np.int32, 64: np.int64}[w]
    # a valid frame of the compiled encoder, then the input's changes to it
    base = rng.integers(-(1 << 62), 1 << 62, n, dtype=np.int64).astype(itype)
    x = (base.astype(np.int64) + rng.integers(-300, 300, n)).astype(itype)
    A = rng.integers(0, 60, nb).astype(np.int32)
    Zc = np.minimum(A - 1, kmax).astype(np.int32)
    payload_buf = np.empty(n + 4 * nb + n * (w // 8), np.uint8)
    lo_buf = np.empty((n * kmax + 7) // 8 + 8, np.uint8)
    plen, lolen, _ = compiled.residual_encode_frame(x, base, A, Zc, n, bs, w, mant, ebits, kmax, payload_buf, lo_buf)
    payload = bytearray(payload_buf[:plen].tobytes())
    lo = bytearray(lo_buf[:lolen].tobytes())
    for i in range(0, len(rest) - 2, 3):
        target = payload if rest[i] & 1 else lo
        if rest[i] & 2 and target:
            del target[-1 - rest[i + 1] % 4 :]
        elif rest[i] & 4:
            target += bytes([rest[i + 1]])
        elif target:
            target[int.from_bytes(rest[i + 1 : i + 3], "little") % len(target)] ^= rest[i] | 1
    payload = np.frombuffer(bytes(payload), np.uint8).copy()  # exactly sized heap buffers
    lo = np.frombuffer(bytes(lo), np.uint8).copy()
    bits = base.copy()
    ok = (rng.random(nb) < 0.9).astype(np.uint8)
    dmg = (rng.random(len(lo)) < 0.1).astype(np.uint8) if data[7] & 1 else None
    lost = np.zeros(n, np.uint8)
    status = compiled.residual_decode_frame(payload, lo, dmg, bits, A, Zc, ok, n, bs, w, mant, ebits, kmax, lost)
    if status not in (-1, 0, 1, 2, 3):
        raise Mismatch(f"unexpected status {status}")
    if not rest and dmg is None and ok.all() and not np.array_equal(bits, x):
        raise Mismatch("an intact frame did not restore the saved bits")


def run_rs(data: bytes) -> None:
    """The inner Reed-Solomon decoder of the archive level: the compiled decoder
    (each syndrome kernel) against the numpy reference on chunks the input
    fills or damages, then the compiled decoder called directly with sizes and
    buffers the input chooses (only ValueError or TypeError may come back)."""
    compiled = rs_native.module()
    h = data[1:8].ljust(7, b"\0")
    rest = data[8:]
    nsym = 2 * (1 + h[0] % 64)
    chunk = 1 + int.from_bytes(h[1:3], "little") % 6000
    nchunks = 1 + h[3] % 3
    ic = InnerCode(chunk, nsym)
    if h[4] % 3 == 0:  # the input's bytes as chunks and parity: mostly far beyond capacity
        fill = np.frombuffer(rest or b"\0", np.uint8)
        body = np.resize(fill, nchunks * (chunk + ic.parity_size))
        chunks, parity = body[: nchunks * chunk].copy(), body[nchunks * chunk :].copy()
    else:  # a valid encoding, then errors where the input says (mode 2: all in one codeword)
        chunks = np.random.default_rng(h[5]).integers(0, 256, nchunks * chunk, dtype=np.uint8)
        parity = ic.encode(chunks).reshape(-1).copy()
        for i in range(0, len(rest) - 2, 3):
            at = int.from_bytes(rest[i : i + 2], "little")
            if h[4] % 3 == 2:
                at = (at % ic.npos) * ic.ncw + h[6] % ic.ncw
            target = parity if rest[i + 2] & 1 else chunks
            target[at % target.size] ^= rest[i + 2] | 1
    with rs_native.forced("reference"):
        want = ic.decode_codewords(chunks, parity)
    if compiled is not None:
        for simd in (False, True):
            compiled.set_simd(simd)
            got = ic.decode_codewords(chunks, parity)
            if not all(np.array_equal(g, w) for g, w in zip(got, want)):
                raise Mismatch(f"{ic} simd={simd}: the compiled decoder and the reference disagree")
        compiled.set_simd(True)
        # hostile sizes on exactly-sized buffers: an error, or a decode that stays inside them
        size = int.from_bytes(h[1:3], "little") - 16
        sym = h[0] - 8
        dbuf = np.frombuffer(rest[: len(rest) // 2], np.uint8).copy()
        pbuf = np.frombuffer(rest[len(rest) // 2 :], np.uint8).copy()
        n = max(0, len(dbuf) // max(size, 1))
        try:
            compiled.decode(dbuf, pbuf, size, sym, np.zeros(n, np.int64), np.zeros(n * (h[5] % 40), np.int32))
        except (ValueError, TypeError):
            pass


def run_one(data: bytes) -> None:
    if data[:1] == b"K":
        run_kernel(data)
        return
    if data[:1] == b"R":
        run_rs(data)
        return
    codec, dtype, n, sections, damage = _case(data)
    got = codec.decode(sections, dtype, n, damage)
    with native.forced("reference"):
        want = codec.decode(sections, dtype, n, damage)
    if native.core() == "native" and not _same(got, want):
        raise Mismatch(f"{codec.to_dict()} {dtype} n={n}: the compiled core and the reference disagree")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    run_one(data)


def seed_inputs() -> list[bytes]:
    out = []
    for name in range(3):
        for dt in range(4):
            for mode in range(4):
                out.append(bytes([name, dt, mode, 37, 1, mode, 5, 3]) + bytes(range(0, 256, 3)))
    for w in range(3):
        out.append(b"K" + bytes([w, 0, 40, 60, 0, 1, 1]) + bytes(range(0, 256, 5)))
        out.append(b"K" + bytes([w, 1, 70, 0, 0, 3, 0]))
    for nsym_code, chunk in ((15, 4095), (7, 999), (63, 300), (0, 5)):  # nsym 32, 16, 128, 2
        for mode in range(3):
            out.append(b"R" + bytes([nsym_code, chunk & 255, chunk >> 8, 1, mode, 9, 4]) + bytes(range(1, 250, 7)))
    return out


def main() -> int:
    if "--make-seeds" in sys.argv:
        folder = sys.argv[sys.argv.index("--make-seeds") + 1]
        os.makedirs(folder, exist_ok=True)
        for i, blob in enumerate(seed_inputs()):
            with open(os.path.join(folder, f"codec-seed-{i:03d}"), "wb") as f:
                f.write(blob)
        print(f"{len(seed_inputs())} codec seed inputs in {folder}")
        return 0
    if "--replay" in sys.argv:
        paths = []
        for p in sys.argv[sys.argv.index("--replay") + 1 :]:
            paths += [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
        for path in paths:
            with open(path, "rb") as f:
                run_one(f.read())
        print(f"replayed {len(paths)} inputs with the {native.core()} core: no finding")
        return 0
    if PURE:
        secs = 60.0
        if "--seconds" in sys.argv:
            secs = float(sys.argv[sys.argv.index("--seconds") + 1])
        rng = random.Random(int(time.time()))
        deadline, runs = time.monotonic() + secs, 0
        pool = seed_inputs()
        while time.monotonic() < deadline:
            data = bytearray(rng.choice(pool))
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data += rng.randbytes(rng.randrange(64))
            runs += 1
            try:
                run_one(bytes(data))
            except Exception:
                path = os.path.join(ROOT, "fuzz", "crashes", "codec-" + hashlib.sha1(data).hexdigest())
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                print(f"FINDING after {runs} runs -> {path}", flush=True)
                raise
        print(f"done: {runs} runs, no finding", flush=True)
        return 0
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
