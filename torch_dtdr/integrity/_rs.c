/*
 * The compiled decoder of torch-dtdr's inner Reed-Solomon code (the "archive"
 * parity level, torch_dtdr/integrity/inner.py): syndromes, Berlekamp-Massey,
 * Chien search and Forney, one interleaved codeword at a time.
 *
 * Code: RS(255, 255 - nsym) over GF(2^8), polynomial 0x11d, generator alpha = 2,
 * first consecutive root alpha^0. A chunk of C bytes is spread over
 * ncw = ceil(C / (255 - nsym)) shortened codewords: byte i of the chunk is data
 * symbol i / ncw of codeword i % ncw, parity symbol p of codeword j sits at
 * offset p * ncw + j of the chunk's inner parity. Codeword polynomial:
 * c(x) = sum_p parity[p] x^p + sum_r data[r] x^(nsym + r).
 *
 * The numpy decoder in inner.py is the reference: this one makes the same
 * corrections and the same failure decisions (the test suite compares them),
 * including its checks against miscorrection: a locator of degree above
 * nsym / 2, a root count that differs from the locator's length, a root on a
 * position the shortened codeword does not have (past its length or on the
 * zero padding of the last row), a locator without the root it claims, or a
 * zero derivative all make the codeword uncorrectable; it is then left as
 * received.
 *
 * Untrusted input: the chunk size and nsym come from the file; both are
 * checked, and every buffer length is checked against them before use. The
 * GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MAX_NSYM 128
#define MAX_CHUNK ((Py_ssize_t)1 << 30)

static uint8_t gf_exp[512];
static uint8_t gf_log[256]; /* gf_log[0] is unused (0 has no logarithm) */
static uint8_t gf_mul[256][256];
static uint8_t gf_inv[256];
/* alpha^i * x for the low and the high nibble x of a byte: a split table for pshufb */
static uint8_t nib_lo[255][16], nib_hi[255][16];
/* chien_tab[k][pos] = alpha^(-k pos), pos padded past 255 for whole-vector loads */
#define CHIEN_POS 288
static uint8_t chien_tab[MAX_NSYM / 2 + 1][CHIEN_POS];

static void init_tables(void) {
    unsigned x = 1;
    for (int i = 0; i < 255; i++) {
        gf_exp[i] = (uint8_t)x;
        gf_log[x] = (uint8_t)i;
        x <<= 1;
        if (x & 0x100) x ^= 0x11d;
    }
    for (int i = 255; i < 512; i++) gf_exp[i] = gf_exp[i - 255];
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            gf_mul[a][b] = (a && b) ? gf_exp[gf_log[a] + gf_log[b]] : 0;
    gf_inv[0] = 0;
    for (int a = 1; a < 256; a++) gf_inv[a] = gf_exp[255 - gf_log[a]];
    for (int i = 0; i < 255; i++)
        for (int x = 0; x < 16; x++) {
            nib_lo[i][x] = gf_mul[gf_exp[i]][x];
            nib_hi[i][x] = gf_mul[gf_exp[i]][x << 4];
        }
    for (int k = 0; k <= MAX_NSYM / 2; k++)
        for (int pos = 0; pos < CHIEN_POS; pos++) chien_tab[k][pos] = gf_exp[(255 - (k * pos) % 255) % 255];
}

typedef struct {
    Py_ssize_t chunk_size, ncw, parity_size;
    int nsym, t, rows, pad, npos;
} Geometry;

/* The geometry of inner.InnerCode, or -1 with an exception set. */
static int geometry(Py_ssize_t chunk_size, int nsym, Geometry *g) {
    if (nsym < 2 || nsym > MAX_NSYM || (nsym & 1)) {
        PyErr_Format(PyExc_ValueError, "inner code needs an even nsym in [2, %d], got %d", MAX_NSYM, nsym);
        return -1;
    }
    if (chunk_size < 1 || chunk_size > MAX_CHUNK) {
        PyErr_Format(PyExc_ValueError, "inner code chunk size must be in [1, 2^30], got %zd", chunk_size);
        return -1;
    }
    Py_ssize_t kmax = 255 - nsym;
    g->chunk_size = chunk_size;
    g->nsym = nsym;
    g->t = nsym / 2;
    g->ncw = (chunk_size + kmax - 1) / kmax;
    Py_ssize_t rows = (chunk_size + g->ncw - 1) / g->ncw;
    if (rows < 1 || rows > kmax) {
        PyErr_SetString(PyExc_ValueError, "inner code geometry out of range");
        return -1;
    }
    g->rows = (int)rows;
    g->pad = (int)(rows * g->ncw - chunk_size);
    g->npos = nsym + g->rows;
    g->parity_size = (Py_ssize_t)nsym * g->ncw;
    return 0;
}

/* Codewords are decoded in blocks of LANES: their symbols are copied into a
 * (npos x LANES) matrix, row pos holding symbol pos of each codeword, with
 * zeros where the chunk stores nothing (the padding of the last row, lanes
 * past ncw); syndromes are computed for the whole block at once. */
#define LANES 32

/* Rows of the block of codewords col .. col + LANES - 1 of one chunk. */
static void gather_block(const Geometry *g, const uint8_t *data, const uint8_t *parity, Py_ssize_t col,
                         uint8_t *m) {
    const Py_ssize_t ncw = g->ncw, last_len = ncw - g->pad;
    for (int pos = 0; pos < g->npos; pos++) {
        const uint8_t *src = pos < g->nsym ? parity + (Py_ssize_t)pos * ncw : data + (Py_ssize_t)(pos - g->nsym) * ncw;
        Py_ssize_t len = pos == g->npos - 1 ? last_len : ncw;
        Py_ssize_t n = len - col;
        if (n > LANES) n = LANES;
        if (n < 0) n = 0;
        memcpy(m + pos * LANES, src + col, (size_t)n);
        memset(m + pos * LANES + n, 0, (size_t)(LANES - n));
    }
}

/* The portable kernel: per codeword, the remainder R(x) = c(x) mod g(x) by a
 * shift register of nsym bytes held in 64-bit words (one table row XORed per
 * symbol), then S_i = R(alpha^i), since g(alpha^i) = 0 for i < nsym; a zero
 * remainder (a clean codeword) needs no evaluation. Byte k of the register is
 * bits 8 (k % 8) .. of word k / 8, whatever the host's byte order. */
#define MAX_WORDS (MAX_NSYM / 8)

/* feedback[nsym / 2][top] = top * (g(x) - x^nsym) as register words, built once per nsym (under the GIL). */
static uint64_t *feedback[MAX_NSYM / 2 + 1];

static int build_feedback(int nsym) {
    if (feedback[nsym / 2]) return 0;
    uint8_t g[MAX_NSYM + 1];
    memset(g, 0, sizeof g);
    g[0] = 1; /* prod_{i < nsym} (x - alpha^i), low degree first */
    for (int i = 0; i < nsym; i++) {
        for (int d = i + 1; d > 0; d--) g[d] = g[d - 1] ^ gf_mul[g[d]][gf_exp[i]];
        g[0] = gf_mul[g[0]][gf_exp[i]];
    }
    uint64_t *rows = PyMem_RawCalloc((size_t)256 * MAX_WORDS, sizeof(uint64_t));
    if (!rows) return -1;
    for (int top = 0; top < 256; top++)
        for (int p = 0; p < nsym; p++)
            rows[top * MAX_WORDS + p / 8] |= (uint64_t)gf_mul[top][g[p]] << (8 * (p % 8));
    feedback[nsym / 2] = rows;
    return 0;
}

/* S_i = R(alpha^i) from the register of one codeword (all zero when R is). */
static void evaluate_remainder(const uint64_t *r, int nsym, uint8_t *s, int stride) {
    uint64_t any = 0;
    for (int k = 0; k < (nsym + 7) / 8; k++) any |= r[k];
    if (!any) {
        for (int i = 0; i < nsym; i++) s[i * stride] = 0;
        return;
    }
    uint8_t acc[MAX_NSYM];
    const uint8_t *by[MAX_NSYM];
    for (int i = 0; i < nsym; i++) {
        acc[i] = 0;
        by[i] = gf_mul[gf_exp[i]];
    }
    for (int p = nsym - 1; p >= 0; p--) { /* Horner, every syndrome at once (independent chains) */
        const uint8_t c = (uint8_t)(r[p / 8] >> (8 * (p % 8)));
        for (int i = 0; i < nsym; i++) acc[i] = by[i][acc[i]] ^ c;
    }
    for (int i = 0; i < nsym; i++) s[i * stride] = acc[i];
}

#define GROUP 4 /* codewords whose registers advance together (independent chains) */

static void syndromes_portable(const uint8_t *m, int npos, int nsym, int lanes, uint8_t *s) {
    const uint64_t *rows = feedback[nsym / 2];
    const int words = (nsym + 7) / 8, top_word = (nsym - 1) / 8, top_shift = 8 * ((nsym - 1) % 8);
    const uint64_t keep = (nsym % 8) ? ((uint64_t)1 << (8 * (nsym % 8))) - 1 : ~(uint64_t)0;
    for (int l0 = 0; l0 < lanes; l0 += GROUP) {
        uint64_t r[GROUP][MAX_WORDS];
        memset(r, 0, sizeof r);
        for (int pos = npos - 1; pos >= 0; pos--) {
            /* R <- (R x + c) mod g: shift up one byte, the symbol in byte 0, the byte
             * shifted past x^(nsym - 1) folded back through the feedback row */
            const uint8_t *sym = m + pos * LANES + l0;
            for (int q = 0; q < GROUP; q++) {
                uint64_t *rq = r[q];
                const uint64_t *row = rows + ((rq[top_word] >> top_shift) & 0xff) * MAX_WORDS;
                uint64_t carry = sym[q];
                for (int k = 0; k < words; k++) {
                    const uint64_t w = rq[k];
                    rq[k] = ((w << 8) | carry) ^ row[k];
                    carry = w >> 56;
                }
                rq[words - 1] &= keep; /* the row has no bytes past nsym - 1: masking after it is the same */
            }
        }
        for (int q = 0; q < GROUP && l0 + q < lanes; q++) evaluate_remainder(r[q], nsym, s + l0 + q, LANES);
    }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(DTDR_NO_SIMD)
#include <immintrin.h>
#define HAVE_AVX2_KERNEL 1

/* The same with AVX2: multiplication by alpha^i as two 16-entry nibble
 * lookups (pshufb), four syndromes at a time. */
__attribute__((target("avx2"))) static void syndromes_avx2(const uint8_t *m, int npos, int nsym, uint8_t *s) {
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    int i = 0;
    for (; i + 4 <= nsym; i += 4) {
        __m256i lo[4], hi[4], acc[4];
        for (int k = 0; k < 4; k++) {
            lo[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)nib_lo[i + k]));
            hi[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)nib_hi[i + k]));
            acc[k] = _mm256_setzero_si256();
        }
        for (int pos = npos - 1; pos >= 0; pos--) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(m + pos * LANES));
            for (int k = 0; k < 4; k++) {
                __m256i l = _mm256_shuffle_epi8(lo[k], _mm256_and_si256(acc[k], nibble));
                __m256i h = _mm256_shuffle_epi8(hi[k], _mm256_and_si256(_mm256_srli_epi64(acc[k], 4), nibble));
                acc[k] = _mm256_xor_si256(_mm256_xor_si256(l, h), v);
            }
        }
        for (int k = 0; k < 4; k++) _mm256_storeu_si256((__m256i *)(s + (i + k) * LANES), acc[k]);
    }
    for (; i < nsym; i++) {
        const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)nib_lo[i]));
        const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)nib_hi[i]));
        __m256i acc = _mm256_setzero_si256();
        for (int pos = npos - 1; pos >= 0; pos--) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(m + pos * LANES));
            __m256i l = _mm256_shuffle_epi8(lo, _mm256_and_si256(acc, nibble));
            __m256i h = _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi64(acc, 4), nibble));
            acc = _mm256_xor_si256(_mm256_xor_si256(l, h), v);
        }
        _mm256_storeu_si256((__m256i *)(s + i * LANES), acc);
    }
}

/* Chien search with AVX2: Lambda(alpha^-pos) for 32 positions at once, as
 * XOR_k lambda_k * alpha^(-k pos) (a table row times a constant: nibble
 * lookups). The roots among positions 0 .. last_valid, increasing, into
 * roots[]; returns their count, or -1 past max_roots. */
__attribute__((target("avx2"))) static int chien_avx2(const uint8_t *lam, int deg, int last_valid, int max_roots,
                                                      int *roots) {
    const __m256i nibble = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    int nroots = 0;
    for (int base = 0; base <= last_valid; base += 32) {
        __m256i acc = _mm256_set1_epi8((char)lam[0]);
        for (int k = 1; k <= deg; k++) {
            if (!lam[k]) continue;
            const int lg = gf_log[lam[k]];
            const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)nib_lo[lg]));
            const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)nib_hi[lg]));
            const __m256i x = _mm256_loadu_si256((const __m256i *)(chien_tab[k] + base));
            const __m256i l = _mm256_shuffle_epi8(lo, _mm256_and_si256(x, nibble));
            const __m256i h = _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi64(x, 4), nibble));
            acc = _mm256_xor_si256(acc, _mm256_xor_si256(l, h));
        }
        uint32_t hits = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(acc, zero));
        if (last_valid - base < 31) hits &= (1u << (last_valid - base + 1)) - 1u;
        while (hits) {
            if (nroots >= max_roots) return -1;
            roots[nroots++] = base + __builtin_ctz(hits);
            hits &= hits - 1;
        }
    }
    return nroots;
}
#endif

static int use_avx2 = 0;

/* The portable Chien search: the same roots as chien_avx2, one term of the
 * locator at a time over every position (independent lookups). */
static int chien_scalar(const uint8_t *lam, int deg, int last_valid, int max_roots, int *roots) {
    uint8_t v[256];
    int nroots = 0;
    memset(v, lam[0], (size_t)(last_valid + 1));
    for (int k = 1; k <= deg; k++) {
        if (!lam[k]) continue;
        const uint8_t *by = gf_mul[lam[k]], *x = chien_tab[k];
        for (int pos = 0; pos <= last_valid; pos++) v[pos] ^= by[x[pos]];
    }
    for (int pos = 0; pos <= last_valid; pos++)
        if (v[pos] == 0) {
            if (nroots >= max_roots) return -1;
            roots[nroots++] = pos;
        }
    return nroots;
}

static void block_syndromes(const uint8_t *m, int npos, int nsym, int lanes, uint8_t *s) {
#ifdef HAVE_AVX2_KERNEL
    if (use_avx2) {
        syndromes_avx2(m, npos, nsym, s);
        return;
    }
#endif
    syndromes_portable(m, npos, nsym, lanes, s);
}

/* Decode codeword j of one chunk, in place, from its syndromes s[0 .. nsym - 1].
 * Returns the number of symbol errors corrected (data and parity), or -1 when
 * the codeword is uncorrectable (it is then left as received). */
static int solve_codeword(const Geometry *g, const uint8_t *s, uint8_t *data, Py_ssize_t j) {
    const int nsym = g->nsym, t = g->t, npos = g->npos;
    const Py_ssize_t ncw = g->ncw;
    uint8_t any = 0;
    for (int i = 0; i < nsym; i++) any |= s[i];
    if (!any) return 0;

    /* Berlekamp-Massey, step for step as the reference; ldeg and bdeg are the
     * exact degrees of Lambda and B, so the loops skip their zero coefficients. */
    uint8_t lam[MAX_NSYM + 2], bpoly[MAX_NSYM + 2], old[MAX_NSYM + 2];
    memset(lam, 0, sizeof lam);
    lam[0] = 1;
    memcpy(bpoly, lam, sizeof lam);
    int length = 0, ldeg = 0, bdeg = 0;
    uint8_t bcoef = 1;
    for (int step = 0; step < nsym; step++) {
        uint8_t d = 0;
        const int top = ldeg < step ? ldeg : step;
        for (int i = 0; i <= top; i++) d ^= gf_mul[lam[i]][s[step - i]];
        /* B <- x B (degree <= nsym < w - 1: nothing is shifted out) */
        memmove(bpoly + 1, bpoly, (size_t)(bdeg + 1));
        bpoly[0] = 0;
        bdeg++;
        if (d == 0) continue; /* the reference's update is then a no-op */
        const uint8_t *coef = gf_mul[gf_mul[d][gf_inv[bcoef]]];
        const int change = 2 * length <= step, old_deg = ldeg;
        if (change) memcpy(old, lam, (size_t)(ldeg + 1));
        for (int i = 0; i <= bdeg; i++) lam[i] ^= coef[bpoly[i]];
        if (bdeg > ldeg) ldeg = bdeg;
        while (ldeg > 0 && lam[ldeg] == 0) ldeg--;
        if (change) {
            memcpy(bpoly, old, (size_t)(old_deg + 1));
            if (bdeg > old_deg) memset(bpoly + old_deg + 1, 0, (size_t)(bdeg - old_deg));
            bdeg = old_deg;
            bcoef = d;
            length = step + 1 - length;
        }
    }
    if (length > t || ldeg > t) return -1;

    /* Positions the shortened codeword has: the padding of the last row of
     * codewords ncw - pad .. ncw - 1 is not stored (known zero). */
    const int last_valid = (g->pad && j >= ncw - g->pad) ? npos - 2 : npos - 1;

    if (length == 1) {
        /* Lambda = 1 + X x: the position is log X, the value S_0. */
        if (lam[1] == 0) return -1;
        int pos = gf_log[lam[1]];
        if (pos > last_valid) return -1;
        if (pos >= nsym) data[(Py_ssize_t)(pos - nsym) * ncw + j] ^= s[0];
        return 1;
    }

    /* Chien search over the stored positions: Lambda(alpha^-pos) == 0. */
    const int deg = ldeg;
    int roots[MAX_NSYM];
    int nroots;
#ifdef HAVE_AVX2_KERNEL
    if (use_avx2)
        nroots = chien_avx2(lam, deg, last_valid, t, roots);
    else
#endif
        nroots = chien_scalar(lam, deg, last_valid, t, roots);
    /* more roots than a locator of degree <= t has (-1), or not as many as its length */
    if (nroots != length) return -1;

    /* Forney: e = X Omega(X^-1) / Lambda'(X^-1), Omega = S Lambda mod x^nsym. */
    uint8_t omega[MAX_NSYM], vals[MAX_NSYM];
    for (int k = 0; k < nsym; k++) {
        uint8_t acc = 0;
        for (int i = 0; i <= k; i++) acc ^= gf_mul[s[i]][lam[k - i]];
        omega[k] = acc;
    }
    for (int e = 0; e < nroots; e++) {
        const int pos = roots[e];
        const uint8_t xinv = gf_exp[(255 - pos % 255) % 255];
        const uint8_t *by = gf_mul[xinv];
        uint8_t om = 0, dl = 0;
        for (int i = nsym - 1; i >= 0; i--) om = by[om] ^ omega[i];
        for (int k = t; k >= 0; k--) dl = by[dl] ^ ((k % 2 == 0) ? lam[k + 1] : 0);
        if (dl == 0) return -1;
        vals[e] = gf_mul[gf_mul[gf_exp[pos % 255]][om]][gf_inv[dl]];
    }
    for (int e = 0; e < nroots; e++)
        if (roots[e] >= nsym) data[(Py_ssize_t)(roots[e] - nsym) * ncw + j] ^= vals[e];
    return nroots;
}

/* ------------------------------------------------------------------ buffers */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static void buf_release(Buf *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

static int buf_get(PyObject *obj, Buf *b, int flags, const char *what) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, flags | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous%s buffer", what,
                     (flags & PyBUF_WRITABLE) ? " writable" : "");
        return -1;
    }
    b->held = 1;
    return 0;
}

/* The item size and integer format of a status buffer, checked. */
static int check_items(Buf *b, Py_ssize_t count, Py_ssize_t itemsize, const char *what) {
    const char *f = b->view.format;
    int ok = b->view.itemsize == itemsize && f != NULL;
    if (ok) {
        if (*f == '<' || *f == '=' || *f == '@') f++;
        ok = f[1] == '\0' && ((itemsize == 8 && (*f == 'q' || (*f == 'l' && sizeof(long) == 8))) ||
                              (itemsize == 4 && (*f == 'i' || (*f == 'l' && sizeof(long) == 4))));
    }
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: expected a buffer of %zd-byte signed integers", what, itemsize);
        return -1;
    }
    if (b->view.len != count * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd items, need %zd", what, b->view.len / itemsize, count);
        return -1;
    }
    return 0;
}

static const char decode_doc[] =
    "decode(data, parity, chunk_size, nsym, chunk_status, codeword_status)\n\n"
    "Correct, in place, the byte errors of every chunk of the writable buffer data\n"
    "(a whole number of chunk_size-byte chunks) with its inner parity (nsym * ncw\n"
    "bytes per chunk). codeword_status (int32, one per codeword, chunk-major) gets\n"
    "the errors corrected in each codeword or -1 when it was uncorrectable;\n"
    "chunk_status (int64, one per chunk) their sum, or -1 when a codeword of the\n"
    "chunk failed. Corrections of the codewords that decoded apply either way.";

static PyObject *py_decode(PyObject *self, PyObject *args) {
    PyObject *odata, *oparity, *ochunk, *ocw;
    Py_ssize_t chunk_size;
    int nsym;
    Geometry g;
    Buf data, parity, chunk_status, cw_status;
    if (!PyArg_ParseTuple(args, "OOniOO", &odata, &oparity, &chunk_size, &nsym, &ochunk, &ocw)) return NULL;
    if (geometry(chunk_size, nsym, &g) < 0) return NULL;
    if (buf_get(odata, &data, PyBUF_WRITABLE, "data") < 0) return NULL;
    if (buf_get(oparity, &parity, PyBUF_SIMPLE, "parity") < 0) goto fail1;
    if (buf_get(ochunk, &chunk_status, PyBUF_WRITABLE | PyBUF_FORMAT, "chunk_status") < 0) goto fail2;
    if (buf_get(ocw, &cw_status, PyBUF_WRITABLE | PyBUF_FORMAT, "codeword_status") < 0) goto fail3;

    Py_ssize_t nchunks = data.view.len / g.chunk_size;
    if (data.view.len % g.chunk_size) {
        PyErr_Format(PyExc_ValueError, "data: %zd bytes is not a whole number of %zd-byte chunks", data.view.len,
                     g.chunk_size);
        goto fail4;
    }
    if (nchunks > PY_SSIZE_T_MAX / g.parity_size || nchunks > PY_SSIZE_T_MAX / 8 / g.ncw) {
        PyErr_SetString(PyExc_ValueError, "data: too many chunks");
        goto fail4;
    }
    if (parity.view.len != nchunks * g.parity_size) {
        PyErr_Format(PyExc_ValueError, "parity: %zd bytes, need %zd for %zd chunks", parity.view.len,
                     nchunks * g.parity_size, nchunks);
        goto fail4;
    }
    if (check_items(&chunk_status, nchunks, 8, "chunk_status") < 0) goto fail4;
    if (check_items(&cw_status, nchunks * g.ncw, 4, "codeword_status") < 0) goto fail4;
    if (build_feedback(g.nsym) < 0) {
        PyErr_NoMemory();
        goto fail4;
    }

    Py_BEGIN_ALLOW_THREADS
    uint8_t *d = (uint8_t *)data.view.buf;
    const uint8_t *p = (const uint8_t *)parity.view.buf;
    int64_t *cs = (int64_t *)chunk_status.view.buf;
    int32_t *ws = (int32_t *)cw_status.view.buf;
    uint8_t m[255 * LANES], syn[MAX_NSYM * LANES], one[MAX_NSYM];
    for (Py_ssize_t b = 0; b < nchunks; b++) {
        uint8_t *chunk = d + b * g.chunk_size;
        const uint8_t *par = p + b * g.parity_size;
        int64_t total = 0;
        int failed = 0;
        for (Py_ssize_t col = 0; col < g.ncw; col += LANES) {
            gather_block(&g, chunk, par, col, m);
            block_syndromes(m, g.npos, g.nsym, g.ncw - col < LANES ? (int)(g.ncw - col) : LANES, syn);
            for (Py_ssize_t j = col; j < g.ncw && j < col + LANES; j++) {
                for (int i = 0; i < g.nsym; i++) one[i] = syn[i * LANES + (j - col)];
                int r = solve_codeword(&g, one, chunk, j);
                ws[b * g.ncw + j] = r;
                if (r < 0)
                    failed = 1;
                else
                    total += r;
            }
        }
        cs[b] = failed ? -1 : total;
    }
    Py_END_ALLOW_THREADS

    buf_release(&cw_status);
    buf_release(&chunk_status);
    buf_release(&parity);
    buf_release(&data);
    Py_RETURN_NONE;

fail4:
    buf_release(&cw_status);
fail3:
    buf_release(&chunk_status);
fail2:
    buf_release(&parity);
fail1:
    buf_release(&data);
    return NULL;
}

/* set_simd(enabled) -> whether the AVX2 syndrome kernel is now in use (tests compare both kernels). */
static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    int want = PyObject_IsTrue(arg);
    if (want < 0) return NULL;
#ifdef HAVE_AVX2_KERNEL
    use_avx2 = want && __builtin_cpu_supports("avx2");
#endif
    return PyBool_FromLong(use_avx2);
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, decode_doc},
    {"set_simd", py_set_simd, METH_O, "Use the AVX2 syndrome kernel where the CPU has it (True) or the portable one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rs",
                                    "torch-dtdr compiled decoder of the inner Reed-Solomon code.", -1, methods};

PyMODINIT_FUNC PyInit__rs(void) {
    init_tables();
#ifdef HAVE_AVX2_KERNEL
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&module);
}
