/*
 * zstd frames made of Huffman-coded literal blocks: the compiled twin of
 * torch_dtdr/codecs/_literal_frames.py, which is the reference and documents
 * every choice (docs/codecs.md 4.6). Both must write the same bytes; the test
 * suite checks that, and that zstd decodes what they write.
 *
 * The input is the encoder's own payload (never file data): the functions
 * below trust their sizes, which the caller checks, and write at most
 * literal_frame_bound() bytes.
 */
#include "_literal_frames.h"

#include <stdlib.h>
#include <string.h>

/* As _native.c: BMI2's shifts (x86-64-v3) take the stream writer's variable shifts
 * without tying up a register for the count. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(DTDR_NO_CLONES)
#define LF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LF_CLONES
#endif

#define BLOCK_MAX (1u << 17)
#define HUF_MAX_BITS 11
#define WEIGHTS_LOG 6
#define SINGLE_STREAM_MAX 1023

static void put_le(uint8_t *p, uint64_t v, int nbytes) {
    for (int i = 0; i < nbytes; i++) p[i] = (uint8_t)(v >> (8 * i));
}

size_t literal_frame_bound(size_t plane, size_t totals, size_t escapes) {
    size_t chunks = (plane + BLOCK_MAX - 1) / BLOCK_MAX + (totals + BLOCK_MAX - 1) / BLOCK_MAX +
                    (escapes + BLOCK_MAX - 1) / BLOCK_MAX;
    return 10 + 3 + plane + totals + escapes + 4 * chunks;
}

/* ---- small little-endian bit writer (FSE weights) ---- */
typedef struct {
    uint8_t buf[176];
    uint64_t acc;
    unsigned nbits, nacc; /* nbits: written in all; nacc: pending in acc */
} SmallBits;

static void sb_put(SmallBits *b, unsigned value, unsigned n) {
    b->acc |= (uint64_t)value << b->nacc;
    b->nacc += n;
    b->nbits += n;
    if (b->nacc >= 32) {
        unsigned at = (b->nbits - b->nacc) >> 3;
        for (int k = 0; k < 4; k++) b->buf[at + k] = (uint8_t)(b->acc >> (8 * k));
        b->acc >>= 32;
        b->nacc -= 32;
    }
}

/* Writes out the pending bits (the last byte zero-padded). */
static void sb_finish(SmallBits *b) {
    unsigned at = (b->nbits - b->nacc) >> 3;
    for (unsigned k = 0; k < (b->nacc + 7) / 8; k++) b->buf[at + k] = (uint8_t)(b->acc >> (8 * k));
}

/* ---- Huffman code lengths ---- */
/* Sorts n distinct 32-bit keys ascending (least significant byte first). */
static void sort_keys(uint32_t *key, int n) {
    uint32_t tmp[256], *src = key, *dst = tmp;
    for (int shift = 0; shift < 32; shift += 8) {
        unsigned count[257] = {0};
        for (int i = 0; i < n; i++) count[((src[i] >> shift) & 255) + 1]++;
        if (count[1] == (unsigned)n) continue; /* every key has a zero byte here */
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (int i = 0; i < n; i++) dst[count[(src[i] >> shift) & 255]++] = src[i];
        uint32_t *t = src;
        src = dst, dst = t;
    }
    if (src != key) memcpy(key, src, (size_t)n * sizeof key[0]);
}

/* Huffman's construction with two queues (_literal_frames._huffman) over leaves already
 * ordered by (weight, symbol). Returns the longest code length. */
static int huffman(const uint64_t *weight_in, const uint8_t *symbol, int nleaf, uint8_t *length) {
    uint64_t weight[511];
    int parent[511], depth[511];
    memcpy(weight, weight_in, (size_t)nleaf * sizeof weight[0]);
    int leaf = 0, node = nleaf, nodes = nleaf;
    for (int m = 0; m < nleaf - 1; m++) {
        int pair[2];
        for (int k = 0; k < 2; k++) {
            if (leaf < nleaf && (node == nodes || weight[leaf] <= weight[node]))
                pair[k] = leaf++;
            else
                pair[k] = node++;
        }
        weight[nodes] = weight[pair[0]] + weight[pair[1]];
        parent[pair[0]] = parent[pair[1]] = nodes;
        nodes++;
    }
    depth[nodes - 1] = 0;
    int maxlen = 0;
    for (int i = nodes - 2; i >= 0; i--) depth[i] = depth[parent[i]] + 1;
    for (int s = 0; s < 256; s++) length[s] = 0;
    for (int i = 0; i < nleaf; i++) {
        length[symbol[i]] = (uint8_t)depth[i];
        if (depth[i] > maxlen) maxlen = depth[i];
    }
    return maxlen;
}

/* Code lengths as _literal_frames.code_lengths: plain Huffman, then with counts raised to a
 * growing floor until no code is longer than HUF_MAX_BITS. */
static void code_lengths(const uint32_t *hist, uint8_t *length) {
    uint32_t key[256]; /* count << 8 | symbol: counts are below 2**18 (chunks of 128 KiB) */
    uint64_t weight[256], total = 0;
    uint8_t symbol[256];
    int nleaf = 0;
    for (int s = 0; s < 256; s++) {
        total += hist[s];
        if (hist[s]) key[nleaf++] = (hist[s] << 8) | (uint32_t)s;
    }
    sort_keys(key, nleaf);
    for (int i = 0; i < nleaf; i++) {
        weight[i] = key[i] >> 8;
        symbol[i] = (uint8_t)(key[i] & 255);
    }
    int maxlen = huffman(weight, symbol, nleaf, length);
    uint64_t floor = total >> 12;
    if (floor < 2) floor = 2;
    while (maxlen > HUF_MAX_BITS) {
        /* raised counts: every count <= floor becomes floor (those first, by symbol), the
         * rest keep their order */
        int i = 0, rest = 0;
        while (rest < nleaf && (key[rest] >> 8) <= floor) rest++;
        for (int s = 0; s < 256; s++)
            if (hist[s] && hist[s] <= floor) {
                weight[i] = floor;
                symbol[i++] = (uint8_t)s;
            }
        for (int r = rest; r < nleaf; r++, i++) {
            weight[i] = key[r] >> 8;
            symbol[i] = (uint8_t)(key[r] & 255);
        }
        maxlen = huffman(weight, symbol, nleaf, length);
        floor += floor / 4 + 1;
    }
}

static void canonical_codes(const uint8_t *length, uint16_t *code) {
    int table_log = 0;
    for (int s = 0; s < 256; s++)
        if (length[s] > table_log) table_log = length[s];
    uint32_t start[HUF_MAX_BITS + 2] = {0}, next[HUF_MAX_BITS + 2] = {0}, acc = 0;
    for (int s = 0; s < 256; s++)
        if (length[s]) start[table_log + 1 - length[s]] += 1u << (table_log - length[s]);
    for (int w = 1; w <= table_log; w++) {
        next[w] = acc;
        acc += start[w];
    }
    for (int s = 0; s < 256; s++) {
        code[s] = 0;
        if (length[s]) {
            int w = table_log + 1 - length[s];
            code[s] = (uint16_t)(next[w] >> (w - 1));
            next[w] += 1u << (w - 1);
        }
    }
}

/* ---- FSE-compressed weights ---- */
static void normalized_counts(const uint8_t *weights, int n, int *norm, int *nsym) {
    int counts[16] = {0}, maxw = 0;
    for (int i = 0; i < n; i++) {
        counts[weights[i]]++;
        if (weights[i] > maxw) maxw = weights[i];
    }
    const int size = 1 << WEIGHTS_LOG;
    int sum = 0;
    for (int s = 0; s <= maxw; s++) {
        norm[s] = counts[s] ? (counts[s] * size / n > 1 ? counts[s] * size / n : 1) : 0;
        sum += norm[s];
    }
    while (sum > size) {
        int best = 0;
        for (int s = 1; s <= maxw; s++)
            if (norm[s] > norm[best]) best = s;
        norm[best]--;
        sum--;
    }
    if (sum < size) {
        int best = 0;
        for (int s = 1; s <= maxw; s++)
            if (counts[s] > counts[best]) best = s;
        norm[best] += size - sum;
    }
    *nsym = maxw + 1;
}

/* Writes the description (header byte included) to out; returns its length, or 0. */
static size_t fse_weights(const uint8_t *weights, int n, uint8_t *out) {
    if (n < 2) return 0;
    int distinct = 0;
    for (int i = 1; i < n; i++)
        if (weights[i] != weights[0]) distinct = 1;
    if (!distinct) return 0;
    int norm[16], nsym;
    normalized_counts(weights, n, norm, &nsym);
    const int size = 1 << WEIGHTS_LOG;
    SmallBits header;
    memset(&header, 0, sizeof header);
    sb_put(&header, WEIGHTS_LOG - 5, 4);
    int remaining = size + 1, threshold = size, nbits = WEIGHTS_LOG + 1, s = 0, previous_zero = 0;
    while (remaining > 1) {
        if (previous_zero) {
            int start = s;
            while (norm[s] == 0) s++;
            int run = s - start;
            while (run >= 3) {
                sb_put(&header, 3, 2);
                run -= 3;
            }
            sb_put(&header, (unsigned)run, 2);
        }
        int count = norm[s++];
        int most = 2 * threshold - 1 - remaining;
        remaining -= count;
        int value = count + 1;
        if (value >= threshold) value += most;
        sb_put(&header, (unsigned)value, (unsigned)(value < most ? nbits - 1 : nbits));
        previous_zero = count == 0;
        while (remaining < threshold) {
            nbits--;
            threshold >>= 1;
        }
    }
    /* decoding table (RFC 8878 4.1.1), then its inverse per symbol */
    uint8_t symbol_of[64], nbits_of[64];
    int base_of[64], following[16];
    const int step = (size >> 1) + (size >> 3) + 3;
    int pos = 0;
    for (int sym = 0; sym < nsym; sym++)
        for (int i = 0; i < norm[sym]; i++) {
            symbol_of[pos] = (uint8_t)sym;
            pos = (pos + step) & (size - 1);
        }
    for (int sym = 0; sym < nsym; sym++) following[sym] = norm[sym];
    for (int u = 0; u < size; u++) {
        int nxt = following[symbol_of[u]]++;
        int hb = 0;
        while ((nxt >> (hb + 1)) != 0) hb++;
        nbits_of[u] = (uint8_t)(WEIGHTS_LOG - hb);
        base_of[u] = (nxt << nbits_of[u]) - size;
    }
    uint8_t encode[16][64];
    for (int u = 0; u < size; u++)
        for (int t = base_of[u]; t < base_of[u] + (1 << nbits_of[u]); t++) encode[symbol_of[u]][t] = (uint8_t)u;
    int state[256];
    state[n - 1] = -1;
    state[n - 2] = -1;
    for (int u = 0; u < size; u++) {
        if (state[n - 1] < 0 && symbol_of[u] == weights[n - 1]) state[n - 1] = u;
        if (state[n - 2] < 0 && symbol_of[u] == weights[n - 2] && nbits_of[u] > 0) state[n - 2] = u;
    }
    if (state[n - 2] < 0) return 0;
    SmallBits stream;
    memset(&stream, 0, sizeof stream);
    for (int i = n - 3; i >= 0; i--) {
        int target = state[i + 2];
        int u = state[i] = encode[weights[i]][target];
        sb_put(&stream, (unsigned)(target - base_of[u]), nbits_of[u]);
        if (stream.nbits > 8 * 130) return 0; /* already too long */
    }
    sb_put(&stream, (unsigned)state[1], WEIGHTS_LOG);
    sb_put(&stream, (unsigned)state[0], WEIGHTS_LOG);
    sb_put(&stream, 1, 1);
    sb_finish(&header);
    sb_finish(&stream);
    size_t hlen = (header.nbits + 7) / 8, slen = (stream.nbits + 7) / 8;
    if (hlen + slen >= 128) return 0;
    out[0] = (uint8_t)(hlen + slen);
    memcpy(out + 1, header.buf, hlen);
    memcpy(out + 1 + hlen, stream.buf, slen);
    return 1 + hlen + slen;
}

static size_t table_description(const uint8_t *length, uint8_t *out) {
    int table_log = 0, top = 0;
    for (int s = 0; s < 256; s++)
        if (length[s]) {
            if (length[s] > table_log) table_log = length[s];
            top = s;
        }
    uint8_t weights[256];
    for (int s = 0; s < top; s++) weights[s] = length[s] ? (uint8_t)(table_log + 1 - length[s]) : 0;
    uint8_t fse[130];
    size_t flen = fse_weights(weights, top, fse);
    size_t dlen = top <= 128 ? 1 + (size_t)(top + 1) / 2 : 0;
    if (flen && (!dlen || flen < dlen)) {
        memcpy(out, fse, flen);
        return flen;
    }
    if (!dlen) return 0;
    out[0] = (uint8_t)(127 + top);
    for (int i = 0; i < top; i += 2) out[1 + i / 2] = (uint8_t)((weights[i] << 4) | (i + 1 < top ? weights[i + 1] : 0));
    return dlen;
}

/* Huffman streams: each stream's codes in reverse literal order, least significant bit
 * first, then a marker bit, into exactly the bytes its histogram says it takes.
 *
 * A stream's pending bits sit at the top of a 64-bit container, the latest code highest:
 * each symbol shifts the container right by its length and ORs in its table entry (the
 * code at the top, its length in the low byte, which lands below the pending bits and is
 * never written out). Two streams are encoded interleaved: their containers are
 * independent dependency chains. */
typedef struct {
    uint64_t bits, count; /* count: pending bits in its low byte (the byte above collects carries) */
    uint8_t *p, *limit;
} StreamOut;

#define STREAM_PUT(w, x)       \
    do {                       \
        const uint64_t e_ = (x); \
        (w).bits = ((w).bits >> (e_ & 63)) | e_; \
        (w).count += e_;       \
    } while (0)

static inline void stream_flush(StreamOut *w) {
    const unsigned n = (unsigned)(w->count & 0xFF);
    const uint64_t out = n ? w->bits >> (64 - n) : 0;
    if (w->limit - w->p >= 8) {
        memcpy(w->p, &out, 8); /* little-endian hosts only (x86-64, aarch64), as _native.c */
    } else { /* the next stream's bytes follow */
        for (unsigned k = 0; k < n >> 3; k++) w->p[k] = (uint8_t)(out >> (8 * k));
    }
    w->p += n >> 3;
    w->count = n & 7;
}

static inline void stream_close(StreamOut *w) {
    stream_flush(w);
    w->bits = (w->bits >> 1) | ((uint64_t)1 << 63);
    const unsigned n = (unsigned)(w->count & 0xFF) + 1;
    const uint64_t out = w->bits >> (64 - n);
    w->p[0] = (uint8_t)out;
    if (n > 8) w->p[1] = (uint8_t)(out >> 8);
}

/* Streams a and b: na >= nb literals ending at ea and eb (encoded from the end). */
LF_CLONES static void huf_pair(const uint8_t *ea, size_t na, const uint8_t *eb, size_t nb, const uint64_t *elt,
                               StreamOut *a, StreamOut *b) {
    StreamOut wa = *a, wb = *b;
    size_t t = 0;
    for (; t + 4 <= nb && wa.limit - wa.p >= 16 && wb.limit - wb.p >= 16; t += 4) {
        const uint8_t *qa = ea - t, *qb = eb - t;
        STREAM_PUT(wa, elt[qa[-1]]);
        STREAM_PUT(wb, elt[qb[-1]]);
        STREAM_PUT(wa, elt[qa[-2]]);
        STREAM_PUT(wb, elt[qb[-2]]);
        STREAM_PUT(wa, elt[qa[-3]]);
        STREAM_PUT(wb, elt[qb[-3]]);
        STREAM_PUT(wa, elt[qa[-4]]);
        STREAM_PUT(wb, elt[qb[-4]]);
        const unsigned fa = (unsigned)(wa.count & 0xFF), fb = (unsigned)(wb.count & 0xFF);
        const uint64_t oa = wa.bits >> (64 - fa), ob = wb.bits >> (64 - fb);
        memcpy(wa.p, &oa, 8);
        memcpy(wb.p, &ob, 8);
        wa.p += fa >> 3;
        wb.p += fb >> 3;
        wa.count = fa & 7;
        wb.count = fb & 7;
    }
    for (size_t u = t; u < na; u++) {
        STREAM_PUT(wa, elt[ea[-1 - (ptrdiff_t)u]]);
        if ((u & 3) == 3) stream_flush(&wa);
    }
    for (size_t u = t; u < nb; u++) {
        STREAM_PUT(wb, elt[eb[-1 - (ptrdiff_t)u]]);
        if ((u & 3) == 3) stream_flush(&wb);
    }
    stream_close(&wa);
    stream_close(&wb);
    *a = wa, *b = wb;
}

static void huf_streams(const uint8_t *chunk, size_t n, size_t segment, int nstreams, const uint8_t *length,
                        const uint16_t *code, uint8_t *const *dst, const size_t *sizes) {
    uint64_t elt[256];
    for (int s = 0; s < 256; s++)
        elt[s] = length[s] ? ((uint64_t)code[s] << (64 - length[s])) | length[s] : 0;
    StreamOut w[4];
    for (int k = 0; k < nstreams; k++) {
        w[k].bits = 0, w[k].count = 0, w[k].p = dst[k], w[k].limit = dst[k] + sizes[k];
    }
    if (nstreams == 1) {
        for (size_t u = 0; u < n; u++) {
            STREAM_PUT(w[0], elt[chunk[n - 1 - u]]);
            if ((u & 3) == 3) stream_flush(&w[0]);
        }
        stream_close(&w[0]);
        return;
    }
    huf_pair(chunk + segment, segment, chunk + 2 * segment, segment, elt, &w[0], &w[1]);
    huf_pair(chunk + 3 * segment, segment, chunk + n, n - 3 * segment, elt, &w[2], &w[3]);
}

/* One block for chunk into dst: RLE, compressed (literals only) when smaller, else raw. */
static size_t write_block(const uint8_t *chunk, size_t n, int last, uint8_t *dst) {
    const int nstreams = n <= SINGLE_STREAM_MAX ? 1 : 4;
    const size_t segment = nstreams == 1 ? n : (n + 3) / 4;
    /* one table per stream (their bits are counted apart), each split in two by position
     * parity: a run of equal bytes would otherwise wait on its own increments */
    uint32_t h[8][256];
    memset(h, 0, sizeof h);
    if (nstreams == 1) {
        size_t i = 0;
        for (; i + 2 <= n; i += 2) {
            h[0][chunk[i]]++;
            h[4][chunk[i + 1]]++;
        }
        if (i < n) h[0][chunk[i]]++;
    } else {
        const size_t last_len = n - 3 * segment;
        const uint8_t *c0 = chunk, *c1 = chunk + segment, *c2 = chunk + 2 * segment, *c3 = chunk + 3 * segment;
        size_t i = 0;
        for (; i + 2 <= last_len; i += 2) {
            h[0][c0[i]]++;
            h[1][c1[i]]++;
            h[2][c2[i]]++;
            h[3][c3[i]]++;
            h[4][c0[i + 1]]++;
            h[5][c1[i + 1]]++;
            h[6][c2[i + 1]]++;
            h[7][c3[i + 1]]++;
        }
        for (; i < last_len; i++) {
            h[0][c0[i]]++;
            h[1][c1[i]]++;
            h[2][c2[i]]++;
            h[3][c3[i]]++;
        }
        for (; i < segment; i++) {
            h[0][c0[i]]++;
            h[1][c1[i]]++;
            h[2][c2[i]]++;
        }
    }
    for (int k = 0; k < 4; k++)
        for (int s = 0; s < 256; s++) h[k][s] += h[k + 4][s];
    uint32_t hist[256];
    int rle = 0;
    for (int s = 0; s < 256; s++) {
        hist[s] = h[0][s] + h[1][s] + h[2][s] + h[3][s];
        if (hist[s] == n) rle = 1;
    }
    if (rle) {
        put_le(dst, (uint64_t)last | 1u << 1 | (uint64_t)n << 3, 3);
        dst[3] = chunk[0];
        return 4;
    }
    uint8_t length[256], tree[130];
    code_lengths(hist, length);
    size_t tlen = table_description(length, tree);
    if (tlen) {
        size_t sbytes[4], body = tlen + (nstreams == 4 ? 6 : 0);
        for (int k = 0; k < nstreams; k++) {
            uint64_t bits = 0;
            for (int s = 0; s < 256; s++) bits += (uint64_t)h[k][s] * length[s];
            sbytes[k] = (size_t)(bits / 8 + 1);
            body += sbytes[k];
        }
        const size_t hlen = nstreams == 1 ? 3 : n <= 16383 ? 4 : 5;
        const int bits = hlen == 3 ? 10 : hlen == 4 ? 14 : 18;
        if (body < ((size_t)1 << bits) && hlen + body + 1 < n) {
            uint16_t code[256];
            canonical_codes(length, code);
            put_le(dst, (uint64_t)last | 2u << 1 | (uint64_t)(hlen + body + 1) << 3, 3);
            uint64_t header = 2u | (uint64_t)(hlen == 3 ? 0 : hlen == 4 ? 2 : 3) << 2 | (uint64_t)n << 4 |
                              (uint64_t)body << (4 + bits);
            uint8_t *p = dst + 3;
            put_le(p, header, (int)hlen);
            p += hlen;
            memcpy(p, tree, tlen);
            p += tlen;
            uint8_t *streams[4];
            if (nstreams == 4) {
                for (int k = 0; k < 3; k++) put_le(p + 2 * k, sbytes[k], 2);
                p += 6;
            }
            for (int k = 0; k < nstreams; k++) {
                streams[k] = p;
                p += sbytes[k];
            }
            huf_streams(chunk, n, segment, nstreams, length, code, streams, sbytes);
            *p = 0; /* no sequences */
            return hlen + body + 4;
        }
    }
    put_le(dst, (uint64_t)last | (uint64_t)n << 3, 3);
    memcpy(dst + 3, chunk, n);
    return n + 3;
}

size_t literal_frame(const uint8_t *payload, size_t plane, size_t totals, size_t escapes, uint8_t *dst) {
    const size_t parts[3] = {plane, totals, escapes}, total = plane + totals + escapes;
    uint8_t *p = dst;
    p[0] = 0x28, p[1] = 0xB5, p[2] = 0x2F, p[3] = 0xFD, p[4] = 0x80, p[5] = 7 << 3;
    put_le(p + 6, total, 4);
    p += 10;
    if (!total) {
        put_le(p, 1, 3);
        return 13;
    }
    size_t start = 0;
    for (int k = 0; k < 3; k++) {
        for (size_t a = start; a < start + parts[k]; a += BLOCK_MAX) {
            size_t b = a + BLOCK_MAX < start + parts[k] ? a + BLOCK_MAX : start + parts[k];
            p += write_block(payload + a, b - a, b == total, p);
        }
        start += parts[k];
    }
    return (size_t)(p - dst);
}
