"""zstd frames made of Huffman-coded literal blocks: the reference of the encoder's entropy stage.

A ``dtdr`` residual frame's payload (docs/codecs.md 4.6) is a plane of small
integers, the blocks' bit totals and a few escapes: nearly all of it is
order-0 entropy, and the matches zstd's match finder looks for cost more time
than they save. At the default levels the encoder therefore writes each frame
itself as a standard zstd frame (RFC 8878) whose compressed blocks hold only
Huffman-coded literals and no sequences; any zstd decoder reads it. Every
choice below is deterministic and specified in docs/codecs.md 4.6, because the
compiled core (``_native.c``, ``literal_frames``) must write the same bytes as
this module.

The frame: magic, a header declaring a 128 KiB window and the content size
(4 bytes), then one block per *chunk*: each payload part (plane, totals,
escapes) cut into chunks of at most 128 KiB. A chunk whose bytes are all equal
is an RLE block; otherwise a compressed block (literals only) when that is
smaller than the chunk, else a raw block.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"\x28\xb5\x2f\xfd"
#: Frame header descriptor: a 4-byte content size, a window descriptor, no checksum, no dictionary.
FRAME_DESCRIPTOR = 0x80
#: Window descriptor for a 2**17-byte window (exponent 7, mantissa 0): blocks of up to 128 KiB.
WINDOW_DESCRIPTOR = 7 << 3
BLOCK_MAX = 1 << 17
#: Longest Huffman code the encoder assigns (RFC 8878's limit).
HUFFMAN_MAX_BITS = 11
#: Accuracy log of the FSE table that compresses a Huffman table's weights.
WEIGHTS_LOG = 6
#: Literal counts up to this take one Huffman stream and a 3-byte section header; above it, four streams.
SINGLE_STREAM_MAX = 1023

BLOCK_RAW, BLOCK_RLE, BLOCK_COMPRESSED = 0, 1, 2


def frame_bound(plane: int, totals: int, escapes: int) -> int:
    """The most bytes :func:`frame` writes for a payload of these part sizes."""
    chunks = sum(-(-n // BLOCK_MAX) for n in (plane, totals, escapes))
    return 13 + plane + totals + escapes + 4 * chunks


def frame(payload, parts) -> bytes:
    """One zstd frame holding ``payload``, whose consecutive ``parts`` (byte counts summing
    to its length) are blocked separately so that each gets its own Huffman table."""
    data = np.frombuffer(payload, np.uint8)
    if sum(parts) != data.size:
        raise ValueError("parts do not add up to the payload")
    chunks = []
    start = 0
    for n in parts:
        chunks += [(a, min(a + BLOCK_MAX, start + n)) for a in range(start, start + n, BLOCK_MAX)]
        start += n
    out = [MAGIC, bytes((FRAME_DESCRIPTOR, WINDOW_DESCRIPTOR)), struct.pack("<I", data.size)]
    if not chunks:  # an empty payload: one empty raw block
        out.append(_block_header(True, BLOCK_RAW, 0))
    for i, (a, b) in enumerate(chunks):
        out.append(_block(data[a:b], i == len(chunks) - 1))
    return b"".join(out)


def _block_header(last: bool, kind: int, size: int) -> bytes:
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little")


def _block(chunk: np.ndarray, last: bool) -> bytes:
    n = chunk.size
    hist = np.bincount(chunk, minlength=256)
    if hist.max() == n:
        return _block_header(last, BLOCK_RLE, n) + chunk[:1].tobytes()
    literals = huffman_literals(chunk, hist)
    if literals is not None and len(literals) + 1 < n:
        return _block_header(last, BLOCK_COMPRESSED, len(literals) + 1) + literals + b"\0"  # no sequences
    return _block_header(last, BLOCK_RAW, n) + chunk.tobytes()


def huffman_literals(chunk: np.ndarray, hist: np.ndarray) -> bytes | None:
    """The literals section (header, Huffman table, streams) of ``chunk``, or None when
    its table cannot be described."""
    lengths = code_lengths(hist.tolist())
    tree = table_description(lengths)
    if tree is None:
        return None
    codes = canonical_codes(lengths)
    code_arr = np.array(codes, np.uint32)
    len_arr = np.array(lengths, np.uint8)
    n = chunk.size
    if n <= SINGLE_STREAM_MAX:
        body = tree + _stream(chunk, code_arr, len_arr)
        size_format, bits = 0, 10
    else:
        segment = (n + 3) // 4
        streams = [_stream(chunk[i * segment : min((i + 1) * segment, n)], code_arr, len_arr) for i in range(4)]
        body = tree + struct.pack("<3H", *(len(s) for s in streams[:3])) + b"".join(streams)
        size_format, bits = (1, 10) if len(body) <= 1023 and n <= 1023 else (2, 14) if max(n, len(body)) <= 16383 else (3, 18)
    if len(body) >= 1 << bits:
        return None
    header = BLOCK_COMPRESSED | size_format << 2 | n << 4 | len(body) << (4 + bits)
    return header.to_bytes((4 + 2 * bits + 7) // 8, "little") + body


def code_lengths(hist: list[int]) -> list[int]:
    """Huffman code lengths (0 for absent symbols) of a histogram with at least two
    symbols, at most :data:`HUFFMAN_MAX_BITS` long (a complete prefix code).

    Huffman's construction with two queues, taking a leaf before a merged node of
    equal weight, leaves ordered by count, then symbol. When a code comes out too
    long, the construction is repeated with every count raised to at least a floor:
    ``max(2, total >> 12)``, then a quarter more (plus one) each time until the codes fit."""
    length = _huffman(hist)
    floor = max(2, sum(hist) >> 12)
    while max(length) > HUFFMAN_MAX_BITS:
        length = _huffman([max(c, floor) if c else 0 for c in hist])
        floor += floor // 4 + 1
    return length


def _huffman(hist: list[int]) -> list[int]:
    order = sorted((c, s) for s, c in enumerate(hist) if c)
    nleaf = len(order)
    weight = [c for c, _ in order]
    parent = [0] * (2 * nleaf - 1)
    leaf, node, nodes = 0, nleaf, nleaf
    for _ in range(nleaf - 1):
        pair = []
        for _ in range(2):
            if leaf < nleaf and (node == nodes or weight[leaf] <= weight[node]):
                pair.append(leaf)
                leaf += 1
            else:
                pair.append(node)
                node += 1
        weight.append(weight[pair[0]] + weight[pair[1]])
        parent[pair[0]] = parent[pair[1]] = nodes
        nodes += 1
    depth = [0] * nodes
    for i in range(nodes - 2, -1, -1):
        depth[i] = depth[parent[i]] + 1
    out = [0] * 256
    for (_, s), d in zip(order, depth[:nleaf]):
        out[s] = d
    return out


def canonical_codes(lengths: list[int]) -> list[int]:
    """Each symbol's code as zstd's decoder assigns it: longest codes first, symbols in order."""
    table_log = max(lengths)
    start = [0] * (table_log + 2)
    for d in lengths:
        if d:
            start[table_log + 1 - d] += 1 << (table_log - d)
    nxt, acc = [0] * (table_log + 2), 0
    for w in range(1, table_log + 1):
        nxt[w], acc = acc, acc + start[w]
    codes = [0] * 256
    for s, d in enumerate(lengths):
        if d:
            w = table_log + 1 - d
            codes[s] = nxt[w] >> (w - 1)
            nxt[w] += 1 << (w - 1)
    return codes


def table_description(lengths: list[int]) -> bytes | None:
    """The Huffman table as RFC 8878 describes it: the weights of every symbol below the
    largest one present, either as 4-bit values (up to 128 of them) or FSE-compressed
    (when that is shorter, or the only way), or None when neither fits."""
    table_log = max(lengths)
    top = max(s for s, d in enumerate(lengths) if d)
    weights = [table_log + 1 - d if d else 0 for d in lengths[:top]]
    compressed = fse_weights(weights)
    direct = None
    if top <= 128:
        packed = bytes((weights[i] << 4) | (weights[i + 1] if i + 1 < top else 0) for i in range(0, top, 2))
        direct = bytes((127 + top,)) + packed
    if compressed is not None and (direct is None or len(compressed) < len(direct)):
        return compressed
    return direct


class _Bits:
    """A little-endian bit writer (the first bit written is bit 0 of byte 0)."""

    def __init__(self):
        self.value = 0
        self.count = 0

    def put(self, value: int, nbits: int) -> None:
        self.value |= value << self.count
        self.count += nbits

    def close(self) -> bytes:
        """The bytes with a final 1 bit after the last one written (a backward stream's marker)."""
        self.put(1, 1)
        return self.value.to_bytes((self.count + 7) // 8, "little")

    def pad(self) -> bytes:
        return self.value.to_bytes((self.count + 7) // 8, "little")


def normalized_counts(weights: list[int]) -> list[int]:
    """Counts of each weight value scaled to sum to ``2**WEIGHTS_LOG``, every present value
    at least 1: floor of the scaled count, then the excess taken from the largest counts
    (the lowest value first among equals) and any shortfall given to the most frequent."""
    counts = [0] * (max(weights) + 1)
    for w in weights:
        counts[w] += 1
    total, size = len(weights), 1 << WEIGHTS_LOG
    norm = [max(1, c * size // total) if c else 0 for c in counts]
    while sum(norm) > size:
        i = max(range(len(norm)), key=lambda s: (norm[s], -s))
        norm[i] -= 1
    if sum(norm) < size:
        i = max(range(len(counts)), key=lambda s: (counts[s], -s))
        norm[i] += size - sum(norm)
    return norm


def fse_weights(weights: list[int]) -> bytes | None:
    """The weights FSE-compressed as a Huffman table description (header byte included),
    or None when fewer than two distinct weights, or 128 bytes or more."""
    n = len(weights)
    if n < 2 or len(set(weights)) < 2:
        return None
    norm = normalized_counts(weights)
    size = 1 << WEIGHTS_LOG
    header = _Bits()
    header.put(WEIGHTS_LOG - 5, 4)
    remaining, threshold, nbits = size + 1, size, WEIGHTS_LOG + 1
    s, previous_zero = 0, False
    while remaining > 1:
        if previous_zero:
            start = s
            while norm[s] == 0:
                s += 1
            run = s - start
            while run >= 3:
                header.put(3, 2)
                run -= 3
            header.put(run, 2)
        count = norm[s]
        s += 1
        most = 2 * threshold - 1 - remaining
        remaining -= count
        value = count + 1
        if value >= threshold:
            value += most
        header.put(value, nbits - 1 if value < most else nbits)
        previous_zero = count == 0
        while remaining < threshold:
            nbits -= 1
            threshold >>= 1
    symbol_of, nbits_of, base_of = fse_decoding_table(norm)
    encode = [[0] * size for _ in norm]
    for u in range(size):
        for t in range(base_of[u], base_of[u] + (1 << nbits_of[u])):
            encode[symbol_of[u]][t] = u
    state = [0] * n
    state[n - 1] = symbol_of.index(weights[n - 1])
    finals = [u for u in range(size) if symbol_of[u] == weights[n - 2] and nbits_of[u] > 0]
    if not finals:
        return None
    state[n - 2] = finals[0]
    stream = _Bits()
    for i in range(n - 3, -1, -1):
        target = state[i + 2]
        u = state[i] = encode[weights[i]][target]
        stream.put(target - base_of[u], nbits_of[u])
    stream.put(state[1], WEIGHTS_LOG)
    stream.put(state[0], WEIGHTS_LOG)
    body = header.pad() + stream.close()
    return bytes((len(body),)) + body if len(body) < 128 else None


def fse_decoding_table(norm: list[int]) -> tuple[list[int], list[int], list[int]]:
    """RFC 8878's FSE decoding table for normalized counts (no "less than one" counts):
    each state's symbol, bit count and baseline."""
    size = 1 << WEIGHTS_LOG
    step = (size >> 1) + (size >> 3) + 3
    symbol_of = [0] * size
    pos = 0
    for s, c in enumerate(norm):
        for _ in range(c):
            symbol_of[pos] = s
            pos = (pos + step) & (size - 1)
    following = list(norm)
    nbits_of, base_of = [0] * size, [0] * size
    for u in range(size):
        nxt = following[symbol_of[u]]
        following[symbol_of[u]] += 1
        nbits_of[u] = WEIGHTS_LOG - (nxt.bit_length() - 1)
        base_of[u] = (nxt << nbits_of[u]) - size
    return symbol_of, nbits_of, base_of


def _stream(literals: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """One Huffman stream: codes of the literals in reverse order, least significant bit
    first, closed by a marker bit (the decoder reads it backwards from that marker)."""
    lit = literals[::-1]
    length = lengths[lit].astype(np.int64)
    code = codes[lit]
    ends = np.cumsum(length)
    total = int(ends[-1]) if ends.size else 0
    starts = ends - length
    bits = np.zeros(total + 1, np.uint8)
    for b in range(int(length.max()) if length.size else 0):
        sel = length > b
        bits[starts[sel] + b] = (code[sel] >> b) & 1
    bits[total] = 1
    return np.packbits(bits, bitorder="little").tobytes()
