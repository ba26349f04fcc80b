/*
 * The compiled codec core of torch-dtdr: the per-block hot paths of the
 * transform codecs (dtdr8, dtdr16) and of the lossless dtdr residual layer.
 *
 * It works on plain CPU buffers through the buffer protocol (numpy arrays,
 * bytes, memoryviews) and never links against torch. Every kernel releases
 * the GIL, but on small inputs (GIL_FREE_ELEMENTS). The arithmetic is the one
 * docs/codecs.md specifies; the numpy/torch implementation in _blocks.py /
 * _residual.py is the reference, and the test suite checks that both give the
 * same bytes and the same bits.
 *
 * Untrusted input: every length and offset read from file data (payload
 * lengths, bit-stream positions, escape counts) is checked against the buffer
 * it indexes; malformed input is reported as a status code, never read past.
 *
 * Floating point: build with -ffp-contract=off (no fused multiply-add) and
 * without -ffast-math; every operation below is one IEEE binary32/binary64
 * operation rounded to nearest-even, so the results match numpy's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_literal_frames.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(DTDR_NO_CLONES)
#define DTDR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DTDR_CLONES
#endif

/* The bit-field reads of the residual decode with AVX2 gathers (x86-64 with
 * GCC, chosen at run time; DTDR_NO_GATHER turns them off). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(DTDR_NO_GATHER)
#define DTDR_GATHER 1
#include <immintrin.h>

static int have_avx2 = 0;

/* Eight fields r_i = (hi_i << k_i) | lo_i of a block (k_i <= 25, hi_i the bytes at
 * pl), with lo_i the k_i bits at bit position *pos + sum_{j<i} k_j of lo; advances
 * *pos past them. Each half of the eight (4 fields, at most 7 + 3 * 25 + 25 bits
 * from the byte of its first) lies inside one 16-byte load, from which a byte
 * shuffle picks each field's 4 bytes: no gathers, which are slow on several x86
 * cores. The caller guarantees that 16 bytes from the group's last byte lie
 * inside the stream. */
__attribute__((target("avx2")))
static inline __m256i fields8(const unsigned char *lo, uint32_t *pos, const uint8_t *kk, const unsigned char *pl) {
    const __m256i one = _mm256_set1_epi32(1), seven = _mm256_set1_epi32(7);
    /* lane i's byte offset (within its half) copied to the four bytes of the lane, plus 0,1,2,3 */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                            0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    const __m256i ramp = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                          0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    uint64_t kw;
    __m128i h8;
    memcpy(&kw, kk, 8);
    memcpy(&h8, pl, 8);
    /* the bit positions of fields 0 and 4 and the group's end in scalar registers (byte sums
     * by multiplication: 8 * 25 < 256), so that the loads do not wait on the vector unit */
    const uint32_t at = *pos;
    const uint32_t sum4 = (uint32_t)(((kw & 0xFFFFFFFFu) * 0x01010101u) >> 24) & 0xFF;
    const uint32_t sum8 = (uint32_t)((kw * 0x0101010101010101ull) >> 56);
    const uint32_t b0 = at >> 3, b4 = (at + sum4) >> 3;
    __m256i k = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)kw));
    __m256i x = _mm256_add_epi32(k, _mm256_slli_si256(k, 4));
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));
    __m256i last = _mm256_shuffle_epi32(x, 0xFF);
    x = _mm256_add_epi32(x, _mm256_permute2x128_si256(last, last, 0x08)); /* inclusive prefix sums */
    __m256i p = _mm256_add_epi32(_mm256_sub_epi32(x, k), _mm256_set1_epi32((int)at));
    __m256i data = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(lo + b0))),
                                           _mm_loadu_si128((const __m128i *)(lo + b4)), 1);
    __m256i rel = _mm256_sub_epi32(_mm256_srli_epi32(p, 3), _mm256_setr_epi32((int)b0, (int)b0, (int)b0, (int)b0,
                                                                                (int)b4, (int)b4, (int)b4, (int)b4));
    __m256i word = _mm256_shuffle_epi8(data, _mm256_add_epi8(_mm256_shuffle_epi8(rel, spread), ramp));
    __m256i field = _mm256_and_si256(_mm256_srlv_epi32(word, _mm256_and_si256(p, seven)),
                                     _mm256_sub_epi32(_mm256_sllv_epi32(one, k), one));
    *pos = at + sum8;
    return _mm256_or_si256(_mm256_sllv_epi32(_mm256_cvtepu8_epi32(h8), k), field);
}

/* Elements [0, cnt8) (cnt8 a multiple of 8) of one block: the fields (fields8)
 * written as 32-bit r (out16 == 0) or their low 16 bits. Returns the position
 * after them. */
__attribute__((target("avx2")))
static uint32_t gather_fields(const unsigned char *lo, uint32_t pos, const uint8_t *kk, const unsigned char *pl,
                              Py_ssize_t cnt8, void *rr, int out16) {
    const __m256i pick16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    for (Py_ssize_t i = 0; i < cnt8; i += 8) {
        __m256i r = fields8(lo, &pos, kk + i, pl + i);
        if (out16) {
            __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(r, pick16), 0x08);
            _mm_storeu_si128((__m128i *)((uint16_t *)rr + i), _mm256_castsi256_si128(packed));
        } else {
            _mm256_storeu_si256((__m256i *)((uint32_t *)rr + i), r);
        }
    }
    return pos;
}

#endif

enum { DT_F16 = 0, DT_BF16 = 1, DT_F32 = 2, DT_F64 = 3 };

/* float16 <-> float32 conversions with the F16C instructions (x86-64 with GCC,
 * chosen at run time): IEEE round-to-nearest-even, so the same bits as
 * f32_to_f16 / f16_to_f32 below (tests/test_native.py checks every float16
 * boundary both ways). */
#ifdef DTDR_GATHER
static int have_f16c = 0;

/* o[i] = float16(s[i]) for finite s[i] (round to nearest even). */
__attribute__((target("avx,f16c")))
static Py_ssize_t f32_to_f16_f16c(const float *restrict s, uint16_t *restrict o, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(o + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    return i;
}

/* w[i] = float32(h[i]), or 0 where h[i] is an infinity or a NaN (the encoder's inputs). */
__attribute__((target("avx2,f16c")))
static Py_ssize_t f16_to_f32_f16c(const uint16_t *restrict h, float *restrict w, Py_ssize_t n) {
    const __m256i expo = _mm256_set1_epi32(0x7C00);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i x = _mm_loadu_si128((const __m128i *)(h + i));
        __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_cvtepu16_epi32(x), expo), expo);
        __m256 v = _mm256_andnot_ps(_mm256_castsi256_ps(special), _mm256_cvtph_ps(x));
        _mm256_storeu_ps(w + i, v);
    }
    return i;
}
#endif

static const float F32_MAX = 3.4028234663852886e+38f;

/* ------------------------------------------------------------------ scalars */

static inline uint32_t f32_bits(float v) { uint32_t u; memcpy(&u, &v, 4); return u; }
static inline float bits_f32(uint32_t u) { float v; memcpy(&v, &u, 4); return v; }

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-08f; /* man * 2^-24: exact */
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* float32 -> float16, round to nearest even (subnormals honoured). */
static inline uint16_t f32_to_f16(float v) {
    uint32_t x = f32_bits(v);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7FFFFFFFu;
    if (x > 0x7F800000u) return sign | 0x7E00;
    if (x >= 0x477FF000u) return sign | 0x7C00; /* rounds to >= 2^16: infinity */
    if (x < 0x38800000u) {                      /* below 2^-14: a float16 subnormal or zero */
        float a = bits_f32(x) * 16777216.0f;    /* exact: scaling up by 2^24 */
        return sign | (uint16_t)rintf(a);       /* 1024 (the smallest normal) is correct too */
    }
    x -= 0x38000000u; /* rebias the exponent from 127 to 15 */
    x += 0x0FFFu + ((x >> 13) & 1u);
    return sign | (uint16_t)(x >> 13);
}

/* o[i] = float16(s[i]) for n finite floats: F16C where the CPU has it (unless
 * scalar), the portable conversion above otherwise. */
static void f32_to_f16_n(const float *restrict s, uint16_t *restrict o, Py_ssize_t n, int scalar) {
    Py_ssize_t i = 0;
#ifdef DTDR_GATHER
    if (have_f16c && !scalar) i = f32_to_f16_f16c(s, o, n);
#endif
    for (; i < n; i++) o[i] = f32_to_f16(s[i]);
}

/* float32 -> bfloat16, round to nearest even. */
static inline uint16_t f32_to_bf16(float v) {
    uint32_t x = f32_bits(v);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7FFFu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* The float32 working value of the encoder: non-finite -> 0, float64 clamped to
 * the float32 range and rounded to nearest even. */
static inline float load_work(const void *src, int dt, Py_ssize_t i) {
    switch (dt) {
    case DT_F16: {
        uint16_t h;
        memcpy(&h, (const char *)src + 2 * i, 2);
        if ((h & 0x7C00) == 0x7C00) return 0.0f;
        return f16_to_f32(h);
    }
    case DT_BF16: {
        uint16_t h;
        memcpy(&h, (const char *)src + 2 * i, 2);
        if ((h & 0x7F80) == 0x7F80) return 0.0f;
        return bits_f32((uint32_t)h << 16);
    }
    case DT_F32: {
        float v;
        memcpy(&v, (const char *)src + 4 * i, 4);
        if ((f32_bits(v) & 0x7F800000u) == 0x7F800000u) return 0.0f;
        return v;
    }
    default: {
        double v;
        memcpy(&v, (const char *)src + 8 * i, 8);
        if (!isfinite(v)) return 0.0f;
        if (v > (double)F32_MAX) v = (double)F32_MAX;
        if (v < -(double)F32_MAX) v = -(double)F32_MAX;
        return (float)v;
    }
    }
}

/* ------------------------------------------------------------------ transforms */

/* Eight-lane vectors (GCC vector extensions: AVX2 registers in the avx2/avx512
 * clones, SSE pairs in the default one). Loads and stores go through memcpy, so
 * no alignment is assumed. */
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));

static inline v8i v8i_load(const void *p) { v8i v; memcpy(&v, p, 32); return v; }
static inline void v8i_store(void *p, v8i v) { memcpy(p, &v, 32); }

/* The stages h = 1, 2, 4 inside every 8-lane vector: lane j becomes
 * t_j + s_j v_j with t the vector with partner lanes (j XOR h) swapped in and
 * s_j = -1 on the upper lane of each pair: (a, b) -> (b + a, a + (-b)) = (a + b, a - b),
 * exactly the butterfly (IEEE addition commutes, and x + (-y) is x - y). */
static const v8i SWAP1 = {1, 0, 3, 2, 5, 4, 7, 6}, SWAP2 = {2, 3, 0, 1, 6, 7, 4, 5}, SWAP4 = {4, 5, 6, 7, 0, 1, 2, 3};
static const v8i NEG1 = {0, -1, 0, -1, 0, -1, 0, -1}, NEG2 = {0, 0, -1, -1, 0, 0, -1, -1},
                 NEG4 = {0, 0, 0, 0, -1, -1, -1, -1};

#define V8I_MAX(a, b) ({ v8i a_ = (a), b_ = (b), gt_ = a_ > b_; (a_ & gt_) | (b_ & ~gt_); })

/* Stages h = 1, 2, 4 of eight floats, in registers: lane j becomes t_j + s_j v_j
 * (see SWAP1.. and NEG1..). This and fwht_f32_strides are always inlined: a plain
 * call from a DTDR_CLONES function runs the default (SSE) build, twice as slow. */
static inline __attribute__((always_inline)) v8f fwht8_f32(v8f x) {
    const v8i S1 = NEG1 & INT32_MIN, S2 = NEG2 & INT32_MIN, S4 = NEG4 & INT32_MIN; /* sign bits */
    x = __builtin_shuffle(x, SWAP1) + (v8f)((v8i)x ^ S1);
    x = __builtin_shuffle(x, SWAP2) + (v8f)((v8i)x ^ S2);
    return __builtin_shuffle(x, SWAP4) + (v8f)((v8i)x ^ S4);
}

/* Stages h = 8, 16, ..., m/2 of fwht_f32 on v[0:m] (m >= 8; stages 1, 2, 4 done): two
 * stages per pass while two remain, then the last alone. With ``track`` (a constant at
 * every call, so each caller gets its own copy of the loops) returns the largest |v_j|
 * after the last stage as bits (all finite: bit order is value order), taken in the last
 * pass; else 0. */
static inline __attribute__((always_inline)) uint32_t fwht_f32_strides(float *restrict v, Py_ssize_t m, const int track) {
    const v8i ABS = {0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF};
    v8i zm = {0, 0, 0, 0, 0, 0, 0, 0};
    Py_ssize_t i, j, h;
    for (h = 8; 4 * h <= m; h <<= 2) {
        const int last = track && 4 * h == m;
        for (i = 0; i < m; i += 4 * h)
            for (j = 0; j < h; j += 8) {
                v8f a0, a1, a2, a3;
                memcpy(&a0, v + i + j, 32);
                memcpy(&a1, v + i + h + j, 32);
                memcpy(&a2, v + i + 2 * h + j, 32);
                memcpy(&a3, v + i + 3 * h + j, 32);
                v8f b0 = a0 + a1, b1 = a0 - a1, b2 = a2 + a3, b3 = a2 - a3; /* stage h */
                a0 = b0 + b2; a2 = b0 - b2; a1 = b1 + b3; a3 = b1 - b3;     /* stage 2h */
                memcpy(v + i + j, &a0, 32);
                memcpy(v + i + h + j, &a1, 32);
                memcpy(v + i + 2 * h + j, &a2, 32);
                memcpy(v + i + 3 * h + j, &a3, 32);
                if (last)
                    zm = V8I_MAX(V8I_MAX(zm, (v8i)a0 & ABS),
                                 V8I_MAX(V8I_MAX((v8i)a1 & ABS, (v8i)a2 & ABS), (v8i)a3 & ABS));
            }
    }
    for (; h < m; h <<= 1) /* at most one stage is left */
        for (i = 0; i < m; i += 2 * h)
            for (j = 0; j < h; j += 8) {
                v8f a, b;
                memcpy(&a, v + i + j, 32);
                memcpy(&b, v + i + h + j, 32);
                v8f lo = a + b, hi = a - b;
                memcpy(v + i + j, &lo, 32);
                memcpy(v + i + h + j, &hi, 32);
                if (track) zm = V8I_MAX(zm, V8I_MAX((v8i)lo & ABS, (v8i)hi & ABS));
            }
    uint32_t zmax = 0;
    for (i = 0; i < 8; i++) zmax = (uint32_t)zm[i] > zmax ? (uint32_t)zm[i] : zmax;
    return zmax;
}

/* The specified forward butterfly (docs/codecs.md 2.6): stages h = 1, 2, 4, ...,
 * m/2 in that order; stage h maps every pair (j, j + h) with bit h of j clear to
 * (v[j] + v[j+h], v[j] - v[j+h]), each rounded to binary32. Every element goes
 * through the stages in that order (two stages share a pass over the block). */
DTDR_CLONES
static void fwht_f32(float *restrict v, Py_ssize_t m) {
    Py_ssize_t i, j, h;
    if (m >= 8) {
        for (i = 0; i < m; i += 8) {
            v8f x;
            memcpy(&x, v + i, 32);
            x = fwht8_f32(x);
            memcpy(v + i, &x, 32);
        }
        fwht_f32_strides(v, m, 0);
        return;
    }
    for (h = 1; h < m; h <<= 1)
        for (i = 0; i < m; i += 2 * h)
            for (j = i; j < i + h; j++) {
                float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
}

/* The encoder's scaling and forward transform in one: v_j <- fl(s_j v_j 2^-e) (s_j the
 * sign d_j, given as the sign bit sgnb[j]; pw = 2^-e a binary32 power of two) in the
 * transform's first pass, then fwht_f32's stages, in the same order with the same
 * roundings; returns the largest |z_j| (as bits), tracked in the last pass. For m >= 16. */
DTDR_CLONES
static uint32_t fwht_f32_scaled(float *restrict v, Py_ssize_t m, const uint32_t *restrict sgnb, float pw) {
    const v8f PW = {pw, pw, pw, pw, pw, pw, pw, pw};
    for (Py_ssize_t i = 0; i < m; i += 8) {
        v8f x = fwht8_f32((v8f)(v8i_load(v + i) ^ v8i_load(sgnb + i)) * PW);
        memcpy(v + i, &x, 32);
    }
    return fwht_f32_strides(v, m, 1);
}

/* Strides 1, 2 and 4 of eight int32 sums, in registers. */
static inline v8i fwht8_i32(v8i x) {
    x = __builtin_shuffle(x, SWAP1) + ((x ^ NEG1) - NEG1);
    x = __builtin_shuffle(x, SWAP2) + ((x ^ NEG2) - NEG2);
    return __builtin_shuffle(x, SWAP4) + ((x ^ NEG4) - NEG4);
}

/* Strides h, 2h, ..., m/2 (h >= 8) of the integer transform of v[0:m]: two
 * strides per pass while two remain, then the last alone. */
static inline void fwht_i32_strides(int32_t *restrict v, Py_ssize_t m, Py_ssize_t h) {
    Py_ssize_t i, j;
    for (; 4 * h <= m; h <<= 2)
        for (i = 0; i < m; i += 4 * h)
            for (j = 0; j < h; j += 8) {
                v8i a0 = v8i_load(v + i + j), a1 = v8i_load(v + i + h + j);
                v8i a2 = v8i_load(v + i + 2 * h + j), a3 = v8i_load(v + i + 3 * h + j);
                v8i b0 = a0 + a1, b1 = a0 - a1, b2 = a2 + a3, b3 = a2 - a3;
                v8i_store(v + i + j, b0 + b2);
                v8i_store(v + i + 2 * h + j, b0 - b2);
                v8i_store(v + i + h + j, b1 + b3);
                v8i_store(v + i + 3 * h + j, b1 - b3);
            }
    for (; h < m; h <<= 1)
        for (i = 0; i < m; i += 2 * h)
            for (j = 0; j < h; j += 8) {
                v8i a = v8i_load(v + i + j), b = v8i_load(v + i + h + j);
                v8i_store(v + i + j, a + b);
                v8i_store(v + i + h + j, a - b);
            }
}

/* The exact integer transform of the decoder (any order gives the same sums). */
DTDR_CLONES
static void fwht_i32(int32_t *restrict v, Py_ssize_t m) {
    Py_ssize_t i, j, h;
    if (m >= 8) {
        for (i = 0; i < m; i += 8) v8i_store(v + i, fwht8_i32(v8i_load(v + i)));
        fwht_i32_strides(v, m, 8);
        return;
    }
    for (h = 1; h < m; h <<= 1)
        for (i = 0; i < m; i += 2 * h)
            for (j = i; j < i + h; j++) {
                int32_t a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
}

typedef int16_t v16h __attribute__((vector_size(32)));
typedef int16_t v8h __attribute__((vector_size(16)));

/* fwht_i32 of m >= 16 int8 coefficients, exactly (integer sums are the same in
 * any stage order): the strides from 16 up to min(m/2, 1024) run on 16-lane
 * int16 vectors (at most 7 stages: |sum| <= 128 * 2^7 fits int16, whatever the
 * file holds), then one pass widens to int32 and runs strides 1, 2, 4 and 8 in
 * registers, then fwht_i32's passes run the strides above 1024. About a third
 * faster than widening first. t: m int16 of scratch. */
DTDR_CLONES
static void fwht_i8(int32_t *restrict v, int16_t *restrict t, const int8_t *restrict q, Py_ssize_t m) {
    Py_ssize_t i, j, h;
    const Py_ssize_t top = m / 2 < 1024 ? m / 2 : 1024;
    for (j = 0; j < m; j++) t[j] = q[j];
    for (h = 16; 2 * h <= top; h <<= 2)
        for (i = 0; i < m; i += 4 * h)
            for (j = 0; j < h; j += 16) {
                v16h a0, a1, a2, a3;
                memcpy(&a0, t + i + j, 32);
                memcpy(&a1, t + i + h + j, 32);
                memcpy(&a2, t + i + 2 * h + j, 32);
                memcpy(&a3, t + i + 3 * h + j, 32);
                v16h b0 = a0 + a1, b1 = a0 - a1, b2 = a2 + a3, b3 = a2 - a3;
                a0 = b0 + b2; a2 = b0 - b2; a1 = b1 + b3; a3 = b1 - b3;
                memcpy(t + i + j, &a0, 32);
                memcpy(t + i + h + j, &a1, 32);
                memcpy(t + i + 2 * h + j, &a2, 32);
                memcpy(t + i + 3 * h + j, &a3, 32);
            }
    for (; h <= top; h <<= 1)
        for (i = 0; i < m; i += 2 * h)
            for (j = 0; j < h; j += 16) {
                v16h a, b;
                memcpy(&a, t + i + j, 32);
                memcpy(&b, t + i + h + j, 32);
                v16h lo = a + b, hi = a - b;
                memcpy(t + i + j, &lo, 32);
                memcpy(t + i + h + j, &hi, 32);
            }
    for (i = 0; i < m; i += 16) {
        v8h x16, y16;
        memcpy(&x16, t + i, 16);
        memcpy(&y16, t + i + 8, 16);
        v8i x = fwht8_i32(__builtin_convertvector(x16, v8i)), y = fwht8_i32(__builtin_convertvector(y16, v8i));
        v8i_store(v + i, x + y);
        v8i_store(v + i + 8, x - y);
    }
    fwht_i32_strides(v, m, h);
}

/* ------------------------------------------------------------------ base layer */

static inline Py_ssize_t next_pow2(Py_ssize_t n) {
    Py_ssize_t m = 1;
    while (m < n) m <<= 1;
    return m;
}

/* Quantise one block already loaded into work[0:m] (finite float32, zero-padded).
 * sgn[j] is the sign bit (1 << 31) where d_j = -1. Compiled with
 * -fno-strict-aliasing: work is also read as its bit patterns. */
/* ``amax_bits`` is the largest |x_j| of the block as bits, or AMAX_UNKNOWN (then it is
 * computed here). */
#define AMAX_UNKNOWN 0xFFFFFFFFu

DTDR_CLONES
static float encode_block(float *restrict work, Py_ssize_t m, const uint32_t *restrict sgn, int qbits,
                          void *qdst, uint32_t amax_bits) {
    const int32_t qmax = qbits == 8 ? 127 : 32767;
    uint32_t *restrict wb = (uint32_t *)work;
    uint32_t zmax_bits = 0;
    Py_ssize_t j;
    int e = 0;
    if (amax_bits == AMAX_UNKNOWN) {
        amax_bits = 0;
        for (j = 0; j < m; j++) { /* max |x|: for finite non-negative floats the bit order is the value order */
            uint32_t u = wb[j] & 0x7FFFFFFFu;
            amax_bits = u > amax_bits ? u : amax_bits;
        }
    }
    float amax = bits_f32(amax_bits);
    if (amax > 0.0f) frexpf(amax, &e);
    if (e >= -126 && m >= 16) {
        zmax_bits = fwht_f32_scaled(work, m, sgn, ldexpf(1.0f, -e)); /* the branch below, in fewer passes */
    } else {
        if (e >= -126) {
            /* 2^-e is a binary32 number: one rounded multiplication */
            const float pw = ldexpf(1.0f, -e);
            for (j = 0; j < m; j++) work[j] = bits_f32(wb[j] ^ sgn[j]) * pw;
        } else {
            /* the same correctly rounded product, computed where 2^-e fits */
            const double pw = ldexp(1.0, -e);
            for (j = 0; j < m; j++) work[j] = (float)((double)bits_f32(wb[j] ^ sgn[j]) * pw);
        }
        fwht_f32(work, m);
        for (j = 0; j < m; j++) {
            uint32_t u = wb[j] & 0x7FFFFFFFu;
            zmax_bits = u > zmax_bits ? u : zmax_bits;
        }
    }
    const float zmax = bits_f32(zmax_bits);
    const double two_e = ldexp(1.0, e);
    const float f = (float)(((double)zmax * two_e) / (double)((double)qmax * (double)m));
    float inv = 0.0f;
    if (f > 0.0f) {
        double iv = two_e / ((double)m * (double)f);
        if (iv > (double)F32_MAX) iv = (double)F32_MAX;
        inv = (float)iv;
    }
    /* |z * inv| <= 2 qmax (f >= half its exact value), so adding and removing
     * 1.5 * 2^23 rounds to the nearest integer, ties to even, exactly as rint. */
    const float magic = 12582912.0f;
    if (qbits == 8) {
        int8_t *restrict q = (int8_t *)qdst;
        for (j = 0; j < m; j++) {
            int32_t r = (int32_t)((work[j] * inv + magic) - magic);
            r = r > qmax ? qmax : r;
            r = r < -qmax ? -qmax : r;
            q[j] = (int8_t)r;
        }
    } else {
        int16_t *restrict q = (int16_t *)qdst;
        for (j = 0; j < m; j++) {
            int32_t r = (int32_t)((work[j] * inv + magic) - magic);
            r = r > qmax ? qmax : r;
            r = r < -qmax ? -qmax : r;
            q[j] = (int16_t)r;
        }
    }
    return f;
}

static inline int dt_size(int dt) { return dt == DT_F16 || dt == DT_BF16 ? 2 : dt == DT_F32 ? 4 : 8; }

/* The working values of a float32 / bfloat16 block (non-finite -> 0); returns their
 * largest magnitude as bits (encode_block's amax_bits). Spelled out in vectors: GCC
 * does not vectorise the store and the max reduction together. */
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
#define V8U_MAX(a, b) ({ v8u a_ = (a), b_ = (b); v8u gt_ = (v8u)(a_ > b_); (a_ & gt_) | (b_ & ~gt_); })

static inline uint32_t finite_work_bits(uint32_t u) { return (u & 0x7F800000u) == 0x7F800000u ? 0u : u; }

DTDR_CLONES
static uint32_t load_block_f32(float *restrict work, const uint32_t *restrict src, Py_ssize_t m) {
    uint32_t *restrict wb = (uint32_t *)work;
    const v8u EXP = {0x7F800000u, 0x7F800000u, 0x7F800000u, 0x7F800000u,
                     0x7F800000u, 0x7F800000u, 0x7F800000u, 0x7F800000u};
    v8u zm = {0, 0, 0, 0, 0, 0, 0, 0};
    Py_ssize_t j = 0;
    for (; j + 8 <= m; j += 8) {
        v8u u;
        memcpy(&u, src + j, 32);
        u &= ~(v8u)((u & EXP) == EXP);
        memcpy(wb + j, &u, 32);
        zm = V8U_MAX(zm, u & (EXP | 0x007FFFFFu));
    }
    uint32_t amax = 0;
    for (int i = 0; i < 8; i++) amax = zm[i] > amax ? zm[i] : amax;
    for (; j < m; j++) {
        uint32_t u = finite_work_bits(src[j]);
        wb[j] = u;
        amax = (u & 0x7FFFFFFFu) > amax ? (u & 0x7FFFFFFFu) : amax;
    }
    return amax;
}

DTDR_CLONES
static uint32_t load_block_bf16(float *restrict work, const uint16_t *restrict src, Py_ssize_t m) {
    uint32_t *restrict wb = (uint32_t *)work;
    const v8u EXP = {0x7F800000u, 0x7F800000u, 0x7F800000u, 0x7F800000u,
                     0x7F800000u, 0x7F800000u, 0x7F800000u, 0x7F800000u};
    v8u zm = {0, 0, 0, 0, 0, 0, 0, 0};
    Py_ssize_t j = 0;
    for (; j + 8 <= m; j += 8) {
        v8u16 h;
        memcpy(&h, src + j, 16);
        v8u u = __builtin_convertvector(h, v8u) << 16;
        u &= ~(v8u)((u & EXP) == EXP);
        memcpy(wb + j, &u, 32);
        zm = V8U_MAX(zm, u & (EXP | 0x007FFFFFu));
    }
    uint32_t amax = 0;
    for (int i = 0; i < 8; i++) amax = zm[i] > amax ? zm[i] : amax;
    for (; j < m; j++) {
        uint32_t u = finite_work_bits((uint32_t)src[j] << 16);
        wb[j] = u;
        amax = (u & 0x7FFFFFFFu) > amax ? (u & 0x7FFFFFFFu) : amax;
    }
    return amax;
}

static int encode_base_kernel(const void *x, int dt, Py_ssize_t numel, Py_ssize_t bs, const uint8_t *neg,
                              int qbits, char *q, float *f) {
    Py_ssize_t nfull = numel / bs, tail = numel % bs, b, j;
    Py_ssize_t qsz = qbits / 8;
    float *work = (float *)malloc(sizeof(float) * (size_t)bs);
    uint32_t *sgn = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)bs);
    if (!work || !sgn) { free(work); free(sgn); return -1; }
    for (j = 0; j < bs; j++) sgn[j] = neg[j] ? 0x80000000u : 0u;
    for (b = 0; b < nfull; b++) {
        Py_ssize_t e0 = b * bs;
        uint32_t amax_bits = AMAX_UNKNOWN;
        if (dt == DT_F32) amax_bits = load_block_f32(work, (const uint32_t *)x + e0, bs);
        else if (dt == DT_BF16) amax_bits = load_block_bf16(work, (const uint16_t *)x + e0, bs);
        else {
            j = 0;
#ifdef DTDR_GATHER
            if (dt == DT_F16 && have_f16c) j = f16_to_f32_f16c((const uint16_t *)x + e0, work, bs);
#endif
            for (; j < bs; j++) work[j] = load_work(x, dt, e0 + j);
        }
        f[b] = encode_block(work, bs, sgn, qbits, q + e0 * qsz, amax_bits);
    }
    if (tail) {
        Py_ssize_t m = next_pow2(tail), e0 = nfull * bs;
        for (j = 0; j < tail; j++) work[j] = load_work(x, dt, e0 + j);
        for (; j < m; j++) work[j] = 0.0f;
        f[nfull] = encode_block(work, m, sgn, qbits, q + e0 * qsz, AMAX_UNKNOWN);
    }
    free(work);
    free(sgn);
    return 0;
}

/* The normative decode (docs/codecs.md 2.5) of one block into dst (m outputs
 * computed, `count` written). nm[j] is -1 where d_j = -1, else 0. */
DTDR_CLONES
static void decode_block(int32_t *restrict s, int16_t *restrict t, float *restrict sf, const void *qsrc, int qbits,
                         Py_ssize_t m, Py_ssize_t count, float f, const int32_t *restrict nm, int dt, double M,
                         void *dst) {
    Py_ssize_t j;
    if (qbits == 8 && m >= 16) {
        fwht_i8(s, t, (const int8_t *)qsrc, m);
    } else {
        if (qbits == 8) {
            const int8_t *restrict q = (const int8_t *)qsrc;
            for (j = 0; j < m; j++) s[j] = q[j];
        } else {
            const unsigned char *q = (const unsigned char *)qsrc;
            for (j = 0; j < m; j++) s[j] = (int16_t)(q[2 * j] | (q[2 * j + 1] << 8));
        }
        fwht_i32(s, m);
    }
    if (qbits == 8) {
        /* One pass per block: v = fl32(d_j S_j * f), clamped to [-M, M] (a no-op
         * for every value that is already inside; f is finite, so no NaN), +0.0,
         * then the cast. */
        const float Mf = (float)M;
        switch (dt) {
        case DT_F32: {
            float *restrict o = (float *)dst;
            for (j = 0; j < count; j++) {
                float v = (float)((s[j] ^ nm[j]) - nm[j]) * f;
                v = v > Mf ? Mf : v;
                v = v < -Mf ? -Mf : v;
                o[j] = v + 0.0f;
            }
            break;
        }
        case DT_F64: {
            double *restrict o = (double *)dst;
            for (j = 0; j < count; j++) {
                float v = (float)((s[j] ^ nm[j]) - nm[j]) * f;
                v = v > Mf ? Mf : v;
                v = v < -Mf ? -Mf : v;
                o[j] = (double)(v + 0.0f);
            }
            break;
        }
        case DT_BF16: {
            uint16_t *restrict o = (uint16_t *)dst;
            for (j = 0; j < count; j++) {
                float v = (float)((s[j] ^ nm[j]) - nm[j]) * f;
                v = v > Mf ? Mf : v;
                v = v < -Mf ? -Mf : v;
                uint32_t u = f32_bits(v + 0.0f); /* finite: no NaN case */
                o[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            }
            break;
        }
        default: {
            uint16_t *restrict o = (uint16_t *)dst;
            for (j = 0; j < count; j++) {
                float v = (float)((s[j] ^ nm[j]) - nm[j]) * f;
                v = v > Mf ? Mf : v;
                v = v < -Mf ? -Mf : v;
                sf[j] = v + 0.0f;
            }
            f32_to_f16_n(sf, o, count, 0);
        }
        }
    } else {
        const double fd = (double)f;
        for (j = 0; j < count; j++) {
            int32_t S = (s[j] ^ nm[j]) - nm[j];
            double v = (double)S * fd;
            v = v > M ? M : v;
            v = v < -M ? -M : v;
            v = v + 0.0;
            switch (dt) {
            case DT_F64: ((double *)dst)[j] = v; break;
            case DT_F32: ((float *)dst)[j] = (float)v; break;
            case DT_BF16: ((uint16_t *)dst)[j] = f32_to_bf16((float)v); break;
            default: ((uint16_t *)dst)[j] = f32_to_f16((float)v);
            }
        }
    }
}

static int decode_base_kernel(const char *q, int qbits, const float *f, int dt, Py_ssize_t numel, Py_ssize_t bs,
                              const uint8_t *neg, double M, char *out) {
    Py_ssize_t nfull = numel / bs, tail = numel % bs, b, j;
    Py_ssize_t qsz = qbits / 8, osz = dt_size(dt);
    int32_t *s = (int32_t *)malloc(sizeof(int32_t) * (size_t)bs);
    int16_t *t = (int16_t *)malloc(sizeof(int16_t) * (size_t)bs);
    float *sf = (float *)malloc(sizeof(float) * (size_t)bs);
    int32_t *nm = (int32_t *)malloc(sizeof(int32_t) * (size_t)bs);
    if (!s || !t || !sf || !nm) { free(s); free(t); free(sf); free(nm); return -1; }
    for (j = 0; j < bs; j++) nm[j] = neg[j] ? -1 : 0;
    for (b = 0; b < nfull; b++)
        decode_block(s, t, sf, q + b * bs * qsz, qbits, bs, bs, f[b], nm, dt, M, out + b * bs * osz);
    if (tail) {
        Py_ssize_t m = next_pow2(tail);
        decode_block(s, t, sf, q + nfull * bs * qsz, qbits, m, tail, f[nfull], nm, dt, M, out + nfull * bs * osz);
    }
    free(s);
    free(t);
    free(sf);
    free(nm);
    return 0;
}

/* ------------------------------------------------------------------ buffers */

/* The exception raised for inconsistent sizes and parameters: ValueError until
 * the package installs torch_dtdr.errors.CodecError (a ValueError) with
 * set_error_class(). */
static PyObject *error_class = NULL;

static PyObject *err_cls(void) { return error_class ? error_class : PyExc_ValueError; }

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static void buf_release(Buf *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

static int buf_get(PyObject *obj, Buf *b, int writable, const char *what) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, (writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous%s buffer", what, writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    return 0;
}

static int check_len(Buf *b, Py_ssize_t need, const char *what) {
    if (need < 0 || b->view.len < need) {
        PyErr_Format(err_cls(), "%s: buffer of %zd bytes, need %zd", what, b->view.len, need);
        return -1;
    }
    return 0;
}

static int check_block(Py_ssize_t bs) {
    if (bs < 1 || bs > 65536 || (bs & (bs - 1))) {
        PyErr_Format(err_cls(), "block_size must be a power of two <= 65536, got %zd", bs);
        return -1;
    }
    return 0;
}

/* Work below this many elements runs with the GIL held: releasing and taking
 * it back costs a thread hand-off when another thread waits for it, more than
 * a small block's work (loads of many small tensors ping-pong otherwise). */
#define GIL_FREE_ELEMENTS 16384
#define RUN_UNLOCKED_IF(big, stmt) \
    do {                           \
        if (big) {                 \
            Py_BEGIN_ALLOW_THREADS \
            stmt;                  \
            Py_END_ALLOW_THREADS   \
        } else {                   \
            stmt;                  \
        }                          \
    } while (0)

/* encode_base(x, dtype_code, numel, block_size, neg, qbits, q_out, f_out) */
static PyObject *py_encode_base(PyObject *self, PyObject *args) {
    PyObject *ox, *oneg, *oq, *of;
    int dt, qbits, rc;
    Py_ssize_t numel, bs;
    Buf x, neg, q, f;
    if (!PyArg_ParseTuple(args, "OinnOiOO", &ox, &dt, &numel, &bs, &oneg, &qbits, &oq, &of)) return NULL;
    if (dt < 0 || dt > 3 || (qbits != 8 && qbits != 16) || numel < 0 || check_block(bs) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(err_cls(), "bad dtype code or qbits");
        return NULL;
    }
    Py_ssize_t nb = numel / bs + (numel % bs ? 1 : 0);
    Py_ssize_t ncoef = (numel / bs) * bs + (numel % bs ? next_pow2(numel % bs) : 0);
    if (buf_get(ox, &x, 0, "x") < 0) return NULL;
    if (buf_get(oneg, &neg, 0, "neg") < 0) { buf_release(&x); return NULL; }
    if (buf_get(oq, &q, 1, "q") < 0) { buf_release(&x); buf_release(&neg); return NULL; }
    if (buf_get(of, &f, 1, "f") < 0) { buf_release(&x); buf_release(&neg); buf_release(&q); return NULL; }
    rc = -2;
    if (check_len(&x, numel * dt_size(dt), "x") == 0 && check_len(&neg, bs, "neg") == 0 &&
        check_len(&q, ncoef * (qbits / 8), "q") == 0 && check_len(&f, 4 * nb, "f") == 0) {
        RUN_UNLOCKED_IF(numel >= GIL_FREE_ELEMENTS,
                        rc = encode_base_kernel(x.view.buf, dt, numel, bs, (const uint8_t *)neg.view.buf, qbits,
                                                (char *)q.view.buf, (float *)f.view.buf));
        if (rc == -1) PyErr_NoMemory();
    }
    buf_release(&x); buf_release(&neg); buf_release(&q); buf_release(&f);
    if (rc != 0) return NULL;
    Py_RETURN_NONE;
}

/* decode_base(q, qbits, f, dtype_code, numel, block_size, neg, M, out) */
static PyObject *py_decode_base(PyObject *self, PyObject *args) {
    PyObject *oq, *of, *oneg, *oout;
    int dt, qbits, rc;
    Py_ssize_t numel, bs;
    double M;
    Buf q, f, neg, out;
    if (!PyArg_ParseTuple(args, "OiOinnOdO", &oq, &qbits, &of, &dt, &numel, &bs, &oneg, &M, &oout)) return NULL;
    if (dt < 0 || dt > 3 || (qbits != 8 && qbits != 16) || numel < 0 || check_block(bs) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(err_cls(), "bad dtype code or qbits");
        return NULL;
    }
    Py_ssize_t nb = numel / bs + (numel % bs ? 1 : 0);
    Py_ssize_t ncoef = (numel / bs) * bs + (numel % bs ? next_pow2(numel % bs) : 0);
    if (buf_get(oq, &q, 0, "q") < 0) return NULL;
    if (buf_get(of, &f, 0, "f") < 0) { buf_release(&q); return NULL; }
    if (buf_get(oneg, &neg, 0, "neg") < 0) { buf_release(&q); buf_release(&f); return NULL; }
    if (buf_get(oout, &out, 1, "out") < 0) { buf_release(&q); buf_release(&f); buf_release(&neg); return NULL; }
    rc = -2;
    if (check_len(&q, ncoef * (qbits / 8), "q") == 0 && check_len(&f, 4 * nb, "f") == 0 &&
        check_len(&neg, bs, "neg") == 0 && check_len(&out, numel * dt_size(dt), "out") == 0) {
        RUN_UNLOCKED_IF(numel >= GIL_FREE_ELEMENTS,
                        rc = decode_base_kernel((const char *)q.view.buf, qbits, (const float *)f.view.buf, dt, numel,
                                                bs, (const uint8_t *)neg.view.buf, M, (char *)out.view.buf));
        if (rc == -1) PyErr_NoMemory();
    }
    buf_release(&q); buf_release(&f); buf_release(&neg); buf_release(&out);
    if (rc != 0) return NULL;
    Py_RETURN_NONE;
}

/* decode_base_intact(meta, base, qbits, dtype_code, numel, block_size, neg, M, out) -> 0 decoded, 1 take the
 * general path: the whole decode of a transform-codec (dtdr8, dtdr16) segment the container reported
 * undamaged, in one call. The factors are read straight from meta; a section too short or any factor the
 * general path would replace (not finite, negative, above float32_max / 63) answers 1 before anything is
 * written, so the general path then decides, as it would have. */
static PyObject *py_decode_base_intact(PyObject *self, PyObject *args) {
    PyObject *ometa, *obase, *oneg, *oout;
    int dt, qbits, rc = 1;
    Py_ssize_t numel, bs;
    double M;
    Buf meta, base, neg, out;
    if (!PyArg_ParseTuple(args, "OOiinnOdO", &ometa, &obase, &qbits, &dt, &numel, &bs, &oneg, &M, &oout)) return NULL;
    if (dt < 0 || dt > 3 || (qbits != 8 && qbits != 16) || numel < 1 || check_block(bs) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(err_cls(), "bad dtype code, qbits or size");
        return NULL;
    }
    const Py_ssize_t nb = numel / bs + (numel % bs ? 1 : 0);
    const Py_ssize_t ncoef = (numel / bs) * bs + (numel % bs ? next_pow2(numel % bs) : 0);
    const float fmax = (float)(3.4028234663852886e+38 / 63.0);
    if (buf_get(ometa, &meta, 0, "meta") < 0) return NULL;
    if (buf_get(obase, &base, 0, "base") < 0) { buf_release(&meta); return NULL; }
    if (buf_get(oneg, &neg, 0, "neg") < 0) { buf_release(&meta); buf_release(&base); return NULL; }
    if (buf_get(oout, &out, 1, "out") < 0) { buf_release(&meta); buf_release(&base); buf_release(&neg); return NULL; }
    if (check_len(&neg, bs, "neg") < 0 || check_len(&out, numel * dt_size(dt), "out") < 0) {
        rc = -2;
    } else if (meta.view.len >= 4 * nb && base.view.len >= ncoef * (qbits / 8)) {
        float *f = (float *)malloc(sizeof(float) * (size_t)nb);
        if (!f) {
            rc = -1;
        } else {
            memcpy(f, meta.view.buf, sizeof(float) * (size_t)nb);
            Py_ssize_t b = 0;
            while (b < nb && f[b] >= 0.0f && f[b] <= fmax) b++; /* NaN fails both */
            if (b == nb)
                RUN_UNLOCKED_IF(numel >= GIL_FREE_ELEMENTS,
                                rc = decode_base_kernel((const char *)base.view.buf, qbits, f, dt, numel, bs,
                                                        (const uint8_t *)neg.view.buf, M, (char *)out.view.buf));
            free(f);
        }
        if (rc == -1) PyErr_NoMemory();
    }
    buf_release(&meta); buf_release(&base); buf_release(&neg); buf_release(&out);
    if (rc < 0) return NULL;
    return PyLong_FromLong(rc);
}

/* ------------------------------------------------------------------ residual layer */

typedef struct {
    int w, mant, ebits, kmax;
} DInfo;

static inline uint64_t wmask(int w) { return w == 64 ? ~(uint64_t)0 : (((uint64_t)1 << w) - 1); }

static inline uint64_t load_w(const unsigned char *p, int w, Py_ssize_t i) {
    if (w == 16) { uint16_t v; memcpy(&v, p + 2 * i, 2); return v; }
    if (w == 32) { uint32_t v; memcpy(&v, p + 4 * i, 4); return v; }
    uint64_t v;
    memcpy(&v, p + 8 * i, 8);
    return v;
}

static inline void store_w(unsigned char *p, int w, Py_ssize_t i, uint64_t v) {
    if (w == 16) { uint16_t t = (uint16_t)v; memcpy(p + 2 * i, &t, 2); }
    else if (w == 32) { uint32_t t = (uint32_t)v; memcpy(p + 4 * i, &t, 4); }
    else memcpy(p + 8 * i, &v, 8);
}

/* ord(p) = p XOR ((p >> (w-1)) AND (2^(w-1) - 1)) on w-bit patterns (own inverse). */
static inline uint64_t ordered_w(uint64_t p, int w) {
    uint64_t top = wmask(w) >> 1;
    return (p >> (w - 1)) & 1 ? p ^ top : p;
}

static inline int k_of(uint64_t b, const DInfo *d, int A, int Zc) {
    int e = (int)((b >> d->mant) & ((1u << d->ebits) - 1));
    int k = A - e;
    k = k < Zc ? k : Zc;
    k = k < 0 ? 0 : k;
    return k > d->kmax ? d->kmax : k;
}

/* Little-endian 64-bit read at byte `at` of a buffer of `len` bytes; bytes past
 * the end read as zero. */
static inline uint64_t read64(const unsigned char *p, Py_ssize_t len, Py_ssize_t at) {
    uint64_t v = 0;
    if (at >= 0 && at + 8 <= len) {
        memcpy(&v, p + at, 8);
        return v;
    }
    for (Py_ssize_t i = 0; i < 8; i++)
        if (at + i >= 0 && at + i < len) v |= (uint64_t)p[at + i] << (8 * i);
    return v;
}

static int dinfo_of(int w, int mant, int ebits, int kmax, DInfo *d) {
    if (!((w == 16 || w == 32 || w == 64) && mant > 0 && ebits > 0 && mant + ebits < w && kmax >= 0 &&
          kmax + 7 <= (w == 64 ? 63 : 32) && kmax < w))
        return -1;
    d->w = w; d->mant = mant; d->ebits = ebits; d->kmax = kmax;
    return 0;
}

/* In the residual decode's fast path: the 16- and 32-bit fields of a block's
 * first multiple-of-8 elements through gather_fields when the CPU has AVX2 and
 * 16 bytes from the block's last byte lie inside the stream (`first` gets how
 * many were done); nothing otherwise. */
#ifdef DTDR_GATHER
#define GATHER_FIELDS(W, first)                                                                              \
    if (W <= 32 && have_avx2 && pos + (uint64_t)tot < ((uint64_t)1 << 31) &&                                 \
        (pos + (uint64_t)tot) / 8 + 16 <= (uint64_t)lolen) {                                                 \
        first = cnt & ~(Py_ssize_t)7;                                                                        \
        pos = gather_fields(lo, (uint32_t)pos, kk, pl, first, rr, W == 16);                                  \
    }
#else
#define GATHER_FIELDS(W, first)
#endif

/* The encoder's first residual pass over a block of 16-bit values (enc_pass16
 * below, same outputs) on AVX2, 32 elements at a time: AVX2 has no per-lane
 * 16-bit shifts, so r >> k is a high multiply by 2^(16-k) and r mod 2^k a mask,
 * both looked up by k with byte shuffles (GCC's vectorisation of the scalar
 * loop widened every lane to 32 bits). Returns the scalar loop's start for the
 * rest (a multiple of 32). */
#ifdef DTDR_GATHER
__attribute__((target("avx2")))
static Py_ssize_t enc_pass16_avx2(const uint16_t *restrict px, const uint16_t *restrict pb, Py_ssize_t cnt, int A,
                                  int Zc, int kmax, int mant, uint32_t emask, uint16_t nfmask, uint8_t *restrict kk,
                                  uint16_t *restrict rr, uint8_t *restrict plane, int *nf, uint32_t *tot,
                                  uint32_t *nesc) {
    /* 2^(16-k) (0 for k = 0) and 2^k - 1, split into low and high bytes, per k in 0..15 */
    const __m256i mul_lo = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, (char)128, 64, 32, 16, 8, 4, 2,
                                            0, 0, 0, 0, 0, 0, 0, 0, 0, (char)128, 64, 32, 16, 8, 4, 2);
    const __m256i mul_hi = _mm256_setr_epi8(0, (char)128, 64, 32, 16, 8, 4, 2, 1, 0, 0, 0, 0, 0, 0, 0,
                                            0, (char)128, 64, 32, 16, 8, 4, 2, 1, 0, 0, 0, 0, 0, 0, 0);
    const __m256i low_lo = _mm256_setr_epi8(0, 1, 3, 7, 15, 31, 63, 127, (char)255, (char)255, (char)255, (char)255,
                                            (char)255, (char)255, (char)255, (char)255,
                                            0, 1, 3, 7, 15, 31, 63, 127, (char)255, (char)255, (char)255, (char)255,
                                            (char)255, (char)255, (char)255, (char)255);
    const __m256i low_hi = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 7, 15, 31, 63, 127,
                                            0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 7, 15, 31, 63, 127);
    const __m256i byte_lo = _mm256_set1_epi16(0x00FF), zero = _mm256_setzero_si256();
    const __m256i vnf = _mm256_set1_epi16((short)nfmask), vemask = _mm256_set1_epi16((short)emask);
    const int As = A > 32767 ? 32767 : A < -32768 ? -32768 : A;
    const __m256i vA = _mm256_set1_epi16((short)As), vZ = _mm256_set1_epi16((short)(Zc > 32767 ? 32767 : Zc < -32768 ? -32768 : Zc));
    const __m256i vkmax = _mm256_set1_epi16((short)kmax), v255 = _mm256_set1_epi16(255);
    const __m128i vmant = _mm_cvtsi32_si128(mant);
    __m256i nfacc = zero, ksum = zero;
    uint32_t ne = 0;
    Py_ssize_t i = 0;
    for (; i + 32 <= cnt; i += 32) {
        __m256i k2[2], h2[2];
        for (int half = 0; half < 2; half++) {
            const __m256i p = _mm256_loadu_si256((const __m256i *)(px + i + 16 * half));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(pb + i + 16 * half));
            nfacc = _mm256_or_si256(nfacc, _mm256_cmpeq_epi16(_mm256_and_si256(p, vnf), vnf));
            const __m256i e = _mm256_and_si256(_mm256_srl_epi16(b, vmant), vemask);
            __m256i k = _mm256_min_epi16(_mm256_subs_epi16(vA, e), vZ);
            k = _mm256_min_epi16(_mm256_max_epi16(k, zero), vkmax);
            const __m256i op = _mm256_xor_si256(p, _mm256_srli_epi16(_mm256_srai_epi16(p, 15), 1));
            const __m256i ob = _mm256_xor_si256(b, _mm256_srli_epi16(_mm256_srai_epi16(b, 15), 1));
            const __m256i delta = _mm256_sub_epi16(op, ob);
            const __m256i r = _mm256_xor_si256(_mm256_slli_epi16(delta, 1), _mm256_srai_epi16(delta, 15));
            const __m256i kb = _mm256_or_si256(k, _mm256_slli_epi16(k, 8)); /* k in both bytes */
            const __m256i mul = _mm256_or_si256(_mm256_and_si256(_mm256_shuffle_epi8(mul_lo, kb), byte_lo),
                                                _mm256_andnot_si256(byte_lo, _mm256_shuffle_epi8(mul_hi, kb)));
            const __m256i low = _mm256_or_si256(_mm256_and_si256(_mm256_shuffle_epi8(low_lo, kb), byte_lo),
                                                _mm256_andnot_si256(byte_lo, _mm256_shuffle_epi8(low_hi, kb)));
            const __m256i k0 = _mm256_cmpeq_epi16(k, zero);
            const __m256i hi = _mm256_or_si256(_mm256_mulhi_epu16(r, mul), _mm256_and_si256(r, k0));
            _mm256_storeu_si256((__m256i *)(rr + i + 16 * half), _mm256_and_si256(r, low));
            ksum = _mm256_add_epi16(ksum, k);
            k2[half] = k;
            h2[half] = _mm256_min_epu16(hi, v255);
        }
        const __m256i planes = _mm256_permute4x64_epi64(_mm256_packus_epi16(h2[0], h2[1]), 0xD8);
        const __m256i ks = _mm256_permute4x64_epi64(_mm256_packus_epi16(k2[0], k2[1]), 0xD8);
        _mm256_storeu_si256((__m256i *)(plane + i), planes);
        _mm256_storeu_si256((__m256i *)(kk + i), ks);
        ne += (uint32_t)__builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(planes, _mm256_set1_epi8((char)255))));
        if ((i & 1023) == 992) { /* 16-bit lane sums: at most 32 * 15 per lane each 1024 elements */
            __m256i wide = _mm256_madd_epi16(ksum, _mm256_set1_epi16(1));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            *tot += (uint32_t)_mm_cvtsi128_si32(s4);
            ksum = zero;
        }
    }
    {
        __m256i wide = _mm256_madd_epi16(ksum, _mm256_set1_epi16(1));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        *tot += (uint32_t)_mm_cvtsi128_si32(s4);
    }
    *nf |= !_mm256_testz_si256(nfacc, nfacc);
    *nesc += ne;
    return i;
}
#endif

#ifdef DTDR_GATHER
#define ENC_PASS16_AVX2(W)                                                                                   \
    if (W == 16 && have_avx2 && kmax <= 15)                                                                  \
        i0 = enc_pass16_avx2((const uint16_t *)px, (const uint16_t *)pb, cnt, A, Zc, kmax, mant, emask,      \
                             (uint16_t)nfmask, kk, (uint16_t *)rr, plane, &nf, &tot, &ne);
#else
#define ENC_PASS16_AVX2(W)
#endif

/* Width-specialised residual kernels: T is the unsigned and S the signed
 * integer type of the float's width W. Pass 1 of every block is branch-free
 * (vectorisable); the bit packing / unpacking pass is sequential. */
#define RESIDUAL_KERNELS(W, T, S)                                                                              \
    static inline T ord##W(T p) { return p ^ ((T)((S)p >> (W - 1)) >> 1); }                                  \
                                                                                                             \
    DTDR_CLONES                                                                                              \
    static int enc_pass##W(const T *restrict px, const T *restrict pb, Py_ssize_t cnt, int A, int Zc, int kmax,   \
                           int mant, uint32_t emask, T nfmask, uint8_t *restrict kk, T *restrict rr,             \
                           uint8_t *restrict plane, uint32_t *restrict total, Py_ssize_t *restrict nesc) {       \
        int nf = 0;                                                                                          \
        uint32_t tot = 0, ne = 0; /* 32-bit counts (a block has at most 2^16 elements): vectors stay narrow */ \
        Py_ssize_t i0 = 0;                                                                                   \
        ENC_PASS16_AVX2(W)                                                                                   \
        for (Py_ssize_t i = i0; i < cnt; i++) {                                                              \
            T p = px[i], b = pb[i];                                                                          \
            nf |= (p & nfmask) == nfmask;                                                                    \
            int k = A - (int)((b >> mant) & emask);                                                          \
            k = k < Zc ? k : Zc;                                                                             \
            k = k < 0 ? 0 : k;                                                                               \
            k = k > kmax ? kmax : k;                                                                         \
            T delta = (T)(ord##W(p) - ord##W(b));                                                            \
            T r = (T)((T)(delta << 1) ^ (T)((S)delta >> (W - 1)));                                           \
            T hi = (T)(r >> k);                                                                              \
            ne += hi >= 255;                                                                                 \
            plane[i] = (uint8_t)(hi < 255 ? hi : 255);                                                       \
            rr[i] = (T)(r & (T)(((T)1 << k) - 1));                                                           \
            kk[i] = (uint8_t)k;                                                                              \
            tot += (uint32_t)k;                                                                              \
        }                                                                                                    \
        *total = tot;                                                                                        \
        *nesc = ne;                                                                                          \
        return nf;                                                                                           \
    }                                                                                                        \
                                                                                                             \
    DTDR_CLONES                                                                                              \
    static Py_ssize_t residual_encode_##W(const unsigned char *px8, const unsigned char *pb8, const int32_t *A,  \
                                          const int32_t *Zc, Py_ssize_t n, Py_ssize_t bs, const DInfo *d,     \
                                          unsigned char *payload, unsigned char *lo, Py_ssize_t *lolen,       \
                                          int *nonfinite, uint8_t *kk, T *rr) {                              \
        const T *px = (const T *)px8, *pb = (const T *)pb8;                                                  \
        const uint32_t emask = (1u << d->ebits) - 1;                                                         \
        const T nfmask = (T)((T)emask << d->mant);                                                           \
        Py_ssize_t nb = (n + bs - 1) / bs, nesc = 0, out = 0;                                                \
        unsigned char *plane = payload, *totals = payload + n, *esc = payload + n + 4 * nb;                  \
        uint64_t acc = 0;                                                                                    \
        int nacc = 0, nf = 0;                                                                                \
        for (Py_ssize_t t = 0; t < nb; t++) {                                                                \
            Py_ssize_t e0 = t * bs, cnt = (e0 + bs < n ? bs : n - e0), ne;                                   \
            uint32_t total;                                                                                  \
            nf |= enc_pass##W(px + e0, pb + e0, cnt, A[t], Zc[t], d->kmax, d->mant, emask, nfmask, kk, rr,   \
                              plane + e0, &total, &ne);                                                      \
            memcpy(totals + 4 * t, &total, 4);                                                               \
            if (ne) {                                                                                        \
                const unsigned char *pl = plane + e0, *pend = plane + e0 + cnt, *hit;                        \
                for (hit = memchr(pl, 255, (size_t)cnt); hit; hit = memchr(hit + 1, 255, (size_t)(pend - hit - 1))) { \
                    {                                                                                        \
                        Py_ssize_t i = hit - pl;                                                             \
                        T p = px[e0 + i], b = pb[e0 + i];                                                    \
                        T delta = (T)(ord##W(p) - ord##W(b));                                                \
                        T r = (T)((T)(delta << 1) ^ (T)((S)delta >> (W - 1)));                               \
                        T v = (T)(r >> kk[i]);                                                               \
                        memcpy(esc + (W / 8) * nesc++, &v, W / 8);                                           \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
            /* branch-free bit writer: after each element fewer than 8 bits wait in acc, so     \
             * acc holds at most 7 + kmax <= 63 bits; 8 bytes are stored each time (the buffer  \
             * has 8 bytes of slack) and the completed ones kept */                              \
            Py_ssize_t i0 = 0;                                                                               \
            if (W == 16) { /* fields of at most 15 bits: four at a time (4 * 14 + 7 <= 63 bits) or three */  \
                uint8_t kb = 0;                                                                              \
                for (Py_ssize_t i = 0; i < cnt; i++) kb = kk[i] > kb ? kk[i] : kb;                           \
                if (kb <= 14)                                                                                \
                    for (; i0 + 3 < cnt; i0 += 4) {                                                          \
                        const int k0 = kk[i0], k01 = k0 + kk[i0 + 1], k012 = k01 + kk[i0 + 2];               \
                        acc |= ((uint64_t)rr[i0] | ((uint64_t)rr[i0 + 1] << k0) |                            \
                                ((uint64_t)rr[i0 + 2] << k01) | ((uint64_t)rr[i0 + 3] << k012)) << nacc;     \
                        nacc += k012 + kk[i0 + 3];                                                           \
                        memcpy(lo + out, &acc, 8);                                                           \
                        int done = nacc >> 3;                                                                \
                        out += done;                                                                         \
                        acc >>= 8 * done;                                                                    \
                        nacc &= 7;                                                                           \
                    }                                                                                        \
                else                                                                                         \
                    for (; i0 + 2 < cnt; i0 += 3) { /* 3 * 15 + 7 <= 52 bits */                              \
                        const int k0 = kk[i0], k01 = k0 + kk[i0 + 1];                                        \
                        acc |= ((uint64_t)rr[i0] | ((uint64_t)rr[i0 + 1] << k0) |                            \
                                ((uint64_t)rr[i0 + 2] << k01)) << nacc;                                      \
                        nacc += k01 + kk[i0 + 2];                                                            \
                        memcpy(lo + out, &acc, 8);                                                           \
                        int done = nacc >> 3;                                                                \
                        out += done;                                                                         \
                        acc >>= 8 * done;                                                                    \
                        nacc &= 7;                                                                           \
                    }                                                                                        \
            }                                                                                                \
            if (W <= 32) /* two fields at a time: 2 kmax + 7 <= 57 bits */                                    \
                for (; i0 + 1 < cnt; i0 += 2) {                                                              \
                    acc |= ((uint64_t)rr[i0] | ((uint64_t)rr[i0 + 1] << kk[i0])) << nacc;                    \
                    nacc += kk[i0] + kk[i0 + 1];                                                             \
                    memcpy(lo + out, &acc, 8);                                                               \
                    int done = nacc >> 3;                                                                    \
                    out += done;                                                                             \
                    acc >>= 8 * done;                                                                        \
                    nacc &= 7;                                                                               \
                }                                                                                            \
            for (Py_ssize_t i = i0; i < cnt; i++) {                                                          \
                acc |= (uint64_t)rr[i] << nacc;                                                              \
                nacc += kk[i];                                                                               \
                memcpy(lo + out, &acc, 8);                                                                   \
                int done = nacc >> 3;                                                                        \
                out += done;                                                                                 \
                acc >>= 8 * done;                                                                             \
                nacc &= 7;                                                                                   \
            }                                                                                                \
        }                                                                                                    \
        if (nacc > 0) lo[out++] = (unsigned char)acc;                                                        \
        *lolen = out;                                                                                        \
        *nonfinite = nf;                                                                                     \
        return n + 4 * nb + nesc * (W / 8);                                                                  \
    }                                                                                                        \
                                                                                                             \
    DTDR_CLONES                                                                                              \
    static uint32_t k_pass##W(const T *restrict pb, Py_ssize_t cnt, int A, int Zc, int kmax, int mant,          \
                              uint32_t emask, uint8_t *restrict kk) {                                         \
        uint32_t tot = 0;                                                                                    \
        for (Py_ssize_t i = 0; i < cnt; i++) {                                                               \
            int k = A - (int)((pb[i] >> mant) & emask);                                                      \
            k = k < Zc ? k : Zc;                                                                             \
            k = k < 0 ? 0 : k;                                                                               \
            k = k > kmax ? kmax : k;                                                                         \
            kk[i] = (uint8_t)k;                                                                              \
            tot += (uint32_t)k;                                                                              \
        }                                                                                                    \
        return tot;                                                                                          \
    }                                                                                                        \
                                                                                                             \
    DTDR_CLONES                                                                                              \
    static int apply_pass##W(T *restrict bits, const T *restrict rr, Py_ssize_t cnt, T nfmask) {             \
        int nf = 0;                                                                                          \
        for (Py_ssize_t i = 0; i < cnt; i++) {                                                               \
            T r = rr[i];                                                                                     \
            T delta = (T)((T)(r >> 1) ^ (T)(-(T)(r & 1)));                                                   \
            T v = ord##W((T)(ord##W(bits[i]) + delta));                                                      \
            nf |= (v & nfmask) == nfmask;                                                                    \
            bits[i] = v;                                                                                     \
        }                                                                                                    \
        return nf;                                                                                           \
    }                                                                                                        \
                                                                                                             \
    DTDR_CLONES                                                                                              \
    static int residual_decode_##W(const unsigned char *payload, const unsigned char *lo, Py_ssize_t lolen,   \
                                   const unsigned char *dmg, unsigned char *bits8, const int32_t *A,          \
                                   const int32_t *Zc, const unsigned char *block_ok, Py_ssize_t n,            \
                                   Py_ssize_t bs, const DInfo *d, unsigned char *lost, uint8_t *kk, T *rr) {  \
        T *bits = (T *)bits8;                                                                                \
        const uint32_t emask = (1u << d->ebits) - 1;                                                         \
        const T nfmask = (T)((T)emask << d->mant);                                                           \
        Py_ssize_t nb = (n + bs - 1) / bs, ei = 0;                                                           \
        const unsigned char *plane = payload, *totals = payload + n, *esc = payload + n + 4 * nb;            \
        int any_lost = 0, nonfinite = 0;                                                                     \
        uint64_t bstart = 0;                                                                                 \
        for (Py_ssize_t t = 0; t < nb; t++) {                                                                \
            Py_ssize_t e0 = t * bs, cnt = (e0 + bs < n ? bs : n - e0);                                       \
            uint32_t tot;                                                                                    \
            memcpy(&tot, totals + 4 * t, 4);                                                                 \
            uint32_t csum = k_pass##W(bits + e0, cnt, A[t], Zc[t], d->kmax, d->mant, emask, kk);             \
            if (!block_ok[t] || csum != tot) {                                                               \
                for (Py_ssize_t i = e0; i < e0 + cnt; i++) {                                                 \
                    ei += plane[i] == 255;                                                                   \
                    lost[i] = 1;                                                                             \
                }                                                                                            \
                any_lost = 1;                                                                                \
                bstart += tot;                                                                               \
                continue;                                                                                    \
            }                                                                                                \
            /* a good block: its bits lie inside [bstart, bstart + tot) <= 8 * lolen */                     \
            uint64_t pos = bstart;                                                                           \
            int hit_any = 0;                                                                                 \
            const unsigned char *pl = plane + e0;                                                            \
            const unsigned char *first_esc = memchr(pl, 255, (size_t)cnt);                                \
            if (!dmg && (bstart + tot) / 8 + 8 <= (uint64_t)lolen) {                                         \
                /* fast path: every 8-byte read stays inside the stream; escapes fixed after */              \
                Py_ssize_t first = 0;                                                                        \
                GATHER_FIELDS(W, first);                                                                     \
                for (Py_ssize_t i = first; i < cnt; i++) {                                                   \
                    int k = kk[i];                                                                           \
                    uint64_t word;                                                                           \
                    memcpy(&word, lo + (pos >> 3), 8);                                                       \
                    uint64_t lv = (word >> (pos & 7)) & (((uint64_t)1 << k) - 1);                            \
                    pos += (uint64_t)k;                                                                      \
                    rr[i] = (T)((T)((T)pl[i] << k) | (T)lv);                                                 \
                }                                                                                            \
                if (first_esc) {                                                                             \
                    const unsigned char *pend = pl + cnt, *hit;                                              \
                    for (hit = first_esc; hit; hit = memchr(hit + 1, 255, (size_t)(pend - hit - 1))) { \
                        Py_ssize_t i = hit - pl;                                                             \
                        T hi;                                                                                \
                        int k = kk[i];                                                                       \
                        memcpy(&hi, esc + (W / 8) * ei, W / 8);                                              \
                        ei++;                                                                                \
                        rr[i] = (T)((T)(hi << k) | (T)(rr[i] & (T)(((T)1 << k) - 1)));                       \
                    }                                                                                        \
                }                                                                                            \
                nonfinite |= apply_pass##W(bits + e0, rr, cnt, nfmask);                                      \
                bstart += tot;                                                                               \
                continue;                                                                                    \
            }                                                                                                \
            for (Py_ssize_t i = 0; i < cnt; i++) {                                                           \
                int k = kk[i];                                                                               \
                Py_ssize_t byte = (Py_ssize_t)(pos >> 3);                                                    \
                T hi;                                                                                        \
                if (plane[e0 + i] == 255) {                                                                  \
                    memcpy(&hi, esc + (W / 8) * ei, W / 8);                                                  \
                    ei++;                                                                                    \
                } else {                                                                                     \
                    hi = plane[e0 + i];                                                                      \
                }                                                                                            \
                if (dmg) {                                                                                   \
                    Py_ssize_t last = (Py_ssize_t)((pos + (uint64_t)(k > 0 ? k : 1) - 1) >> 3) + 1;         \
                    if (last > lolen) last = lolen;                                                          \
                    int hit = 0;                                                                             \
                    for (Py_ssize_t y = byte; y < last; y++) hit |= dmg[y] != 0;                             \
                    if (hit) {                                                                               \
                        lost[e0 + i] = 1;                                                                    \
                        hit_any = 1;                                                                         \
                        rr[i] = 0;                                                                           \
                        pos += (uint64_t)k;                                                                  \
                        continue;                                                                            \
                    }                                                                                        \
                }                                                                                            \
                uint64_t word;                                                                               \
                if (byte + 8 <= lolen) memcpy(&word, lo + byte, 8);                                          \
                else word = read64(lo, lolen, byte);                                                         \
                uint64_t lv = (word >> (pos & 7)) & (((uint64_t)1 << k) - 1);                                \
                pos += (uint64_t)k;                                                                          \
                rr[i] = (T)((T)(hi << k) | (T)lv);                                                           \
            }                                                                                                \
            if (hit_any) {                                                                                   \
                any_lost = 1;                                                                                \
                for (Py_ssize_t i = 0; i < cnt; i++)                                                         \
                    if (!lost[e0 + i]) nonfinite |= apply_pass##W(bits + e0 + i, rr + i, 1, nfmask);         \
            } else {                                                                                         \
                nonfinite |= apply_pass##W(bits + e0, rr, cnt, nfmask);                                      \
            }                                                                                                \
            bstart += tot;                                                                                   \
        }                                                                                                    \
        return any_lost | (nonfinite << 1);                                                                  \
    }

RESIDUAL_KERNELS(16, uint16_t, int16_t)
RESIDUAL_KERNELS(32, uint32_t, int32_t)
RESIDUAL_KERNELS(64, uint64_t, int64_t)

static Py_ssize_t residual_encode_kernel(const unsigned char *px, const unsigned char *pb, const int32_t *A,
                                         const int32_t *Zc, Py_ssize_t n, Py_ssize_t bs, const DInfo *d,
                                         unsigned char *payload, unsigned char *lo, Py_ssize_t *lolen,
                                         int *nonfinite) {
    uint8_t *kk = (uint8_t *)malloc((size_t)bs);
    uint64_t *rr = (uint64_t *)malloc(8 * (size_t)bs);
    Py_ssize_t r = -1;
    if (kk && rr) {
        if (d->w == 16) r = residual_encode_16(px, pb, A, Zc, n, bs, d, payload, lo, lolen, nonfinite, kk, (uint16_t *)rr);
        else if (d->w == 32) r = residual_encode_32(px, pb, A, Zc, n, bs, d, payload, lo, lolen, nonfinite, kk, (uint32_t *)rr);
        else r = residual_encode_64(px, pb, A, Zc, n, bs, d, payload, lo, lolen, nonfinite, kk, rr);
    }
    free(kk);
    free(rr);
    return r;
}

/* residual_encode_frame(px, pb, A, Zc, n, bs, w, mant, ebits, kmax, payload_out, lo_out)
 *   -> (payload_len, lo_len, nonfinite) */
static PyObject *py_residual_encode_frame(PyObject *self, PyObject *args) {
    PyObject *opx, *opb, *oA, *oZ, *opay, *olo;
    Py_ssize_t n, bs, plen = -1, lolen = 0;
    int w, mant, ebits, kmax, nonfinite = 0;
    DInfo d;
    Buf px, pb, A, Z, pay, lo;
    if (!PyArg_ParseTuple(args, "OOOOnniiiiOO", &opx, &opb, &oA, &oZ, &n, &bs, &w, &mant, &ebits, &kmax, &opay,
                          &olo))
        return NULL;
    if (dinfo_of(w, mant, ebits, kmax, &d) < 0 || n < 0 || check_block(bs) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(err_cls(), "bad residual parameters");
        return NULL;
    }
    Py_ssize_t nb = (n + bs - 1) / bs, isz = w / 8;
    Buf *all[6] = {&px, &pb, &A, &Z, &pay, &lo};
    PyObject *objs[6] = {opx, opb, oA, oZ, opay, olo};
    const char *names[6] = {"px", "pb", "A", "Zc", "payload", "lo"};
    int got = 0, ok = 1;
    for (; got < 6; got++)
        if (buf_get(objs[got], all[got], got >= 4, names[got]) < 0) { ok = 0; break; }
    if (ok)
        ok = check_len(&px, n * isz, "px") == 0 && check_len(&pb, n * isz, "pb") == 0 &&
             check_len(&A, 4 * nb, "A") == 0 && check_len(&Z, 4 * nb, "Zc") == 0 &&
             check_len(&pay, n + 4 * nb + n * isz, "payload") == 0 &&
             check_len(&lo, (n * kmax + 7) / 8 + 8, "lo") == 0;
    if (ok) {
        RUN_UNLOCKED_IF(n >= GIL_FREE_ELEMENTS,
                        plen = residual_encode_kernel(px.view.buf, pb.view.buf, A.view.buf, Z.view.buf, n, bs, &d,
                                                      pay.view.buf, lo.view.buf, &lolen, &nonfinite));
        if (plen < 0) {
            PyErr_NoMemory();
            ok = 0;
        }
    }
    for (int i = 0; i < got; i++) buf_release(all[i]);
    if (!ok) return NULL;
    return Py_BuildValue("nni", plen, lolen, nonfinite);
}

/* Decode the residual of one frame into bits (holding the base patterns).
 * Returns -1 when the payload is malformed (nothing written: every element
 * lost), else a bit set: 1 when lost[] marks some elements lost (left at their
 * base value), 2 when a restored value is an infinity or a NaN (all exponent
 * bits set; base values never are). */
static int residual_decode_kernel(const unsigned char *payload, Py_ssize_t plen, const unsigned char *lo,
                                  Py_ssize_t lolen, const unsigned char *dmg, unsigned char *bits,
                                  const int32_t *A, const int32_t *Zc, const unsigned char *block_ok, Py_ssize_t n,
                                  Py_ssize_t bs, const DInfo *d, unsigned char *lost) {
    const int w = d->w, isz = w / 8;
    Py_ssize_t nb = (n + bs - 1) / bs, fixed = n + 4 * nb, nesc = 0, t;
    if (plen < fixed) return -1;
    for (const unsigned char *p = payload, *end = payload + n; (p = memchr(p, 255, (size_t)(end - p))) != NULL; p++)
        nesc++; /* escapes are rare: memchr skips the rest at memory speed */
    if (plen != fixed + nesc * isz) return -1;
    const unsigned char *totals = payload + n;
    uint64_t sum = 0;
    for (t = 0; t < nb; t++) {
        uint32_t tot;
        memcpy(&tot, totals + 4 * t, 4);
        sum += tot;
    }
    if ((Py_ssize_t)((sum + 7) / 8) != lolen) return -1;
    uint8_t *kk = (uint8_t *)malloc((size_t)bs);
    uint64_t *rr = (uint64_t *)malloc(8 * (size_t)bs);
    int r = -2;
    if (kk && rr) {
        if (w == 16) r = residual_decode_16(payload, lo, lolen, dmg, bits, A, Zc, block_ok, n, bs, d, lost, kk, (uint16_t *)rr);
        else if (w == 32) r = residual_decode_32(payload, lo, lolen, dmg, bits, A, Zc, block_ok, n, bs, d, lost, kk, (uint32_t *)rr);
        else r = residual_decode_64(payload, lo, lolen, dmg, bits, A, Zc, block_ok, n, bs, d, lost, kk, rr);
    }
    free(kk);
    free(rr);
    return r;
}

/* residual_decode_frame(payload, lo, lo_damage_or_None, bits, A, Zc, block_ok, n, bs, w, mant, ebits, kmax, lost)
 *   -> status (-1 malformed, else bit 0: some lost, bit 1: a restored value is non-finite) */
static PyObject *py_residual_decode_frame(PyObject *self, PyObject *args) {
    PyObject *opay, *olo, *odmg, *obits, *oA, *oZ, *ook, *olost;
    Py_ssize_t n, bs;
    int w, mant, ebits, kmax, rc = -2;
    DInfo d;
    Buf pay, lo, dmg, bits, A, Z, okb, lost;
    if (!PyArg_ParseTuple(args, "OOOOOOOnniiiiO", &opay, &olo, &odmg, &obits, &oA, &oZ, &ook, &n, &bs, &w, &mant,
                          &ebits, &kmax, &olost))
        return NULL;
    if (dinfo_of(w, mant, ebits, kmax, &d) < 0 || n < 0 || check_block(bs) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(err_cls(), "bad residual parameters");
        return NULL;
    }
    Py_ssize_t nb = (n + bs - 1) / bs, isz = w / 8;
    Buf *all[8] = {&pay, &lo, &bits, &A, &Z, &okb, &lost, &dmg};
    PyObject *objs[8] = {opay, olo, obits, oA, oZ, ook, olost, odmg};
    const char *names[8] = {"payload", "lo", "bits", "A", "Zc", "block_ok", "lost", "lo_damage"};
    int nbuf = odmg == Py_None ? 7 : 8, got = 0, ok = 1;
    for (; got < nbuf; got++)
        if (buf_get(objs[got], all[got], got == 2 || got == 6, names[got]) < 0) { ok = 0; break; }
    if (ok)
        ok = check_len(&bits, n * isz, "bits") == 0 && check_len(&A, 4 * nb, "A") == 0 &&
             check_len(&Z, 4 * nb, "Zc") == 0 && check_len(&okb, nb, "block_ok") == 0 &&
             check_len(&lost, n, "lost") == 0 && (nbuf == 7 || check_len(&dmg, lo.view.len, "lo_damage") == 0);
    if (ok) {
        RUN_UNLOCKED_IF(n >= GIL_FREE_ELEMENTS,
                        rc = residual_decode_kernel(pay.view.buf, pay.view.len, lo.view.buf, lo.view.len,
                                                    nbuf == 8 ? (const unsigned char *)dmg.view.buf : NULL,
                                                    bits.view.buf, A.view.buf, Z.view.buf, okb.view.buf, n, bs, &d,
                                                    lost.view.buf));
        if (rc == -2) {
            PyErr_NoMemory();
            ok = 0;
        }
    }
    for (int i = 0; i < got; i++) buf_release(all[i]);
    if (!ok) return NULL;
    return PyLong_FromLong(rc);
}

/* ------------------------------------------------------------------ whole dtdr segments */

/* The split-width parameters of one block (docs/codecs.md 4.5) in the form the
 * kernels use: k = max(min(A - e, Zc), 0) with Zc = min(A - 1, Z, kmax). */
static void block_param_of(float f, Py_ssize_t m, const DInfo *d, int delta, int32_t *A, int32_t *Zc) {
    uint32_t fb = f32_bits(f);
    if ((fb & 0x7FFFFFFFu) == 0) {
        *A = 0;
        *Zc = -1; /* min(A - 1, Z, kmax) with A = Z = 0: every k is 0 */
        return;
    }
    int lg = 0;
    while (((Py_ssize_t)1 << lg) < m) lg++;
    int bias = (1 << (d->ebits - 1)) - 1;
    int S = (int)((fb >> 23) & 0xFF) - 127 + (lg / 2 - 2) + bias;
    int a = S + d->mant + delta;
    int sm = S > 1 ? S : 1, bl = 0;
    while (sm >> bl) bl++;
    int z = d->mant + bl + delta;
    int zc = a - 1 < z ? a - 1 : z;
    *A = a;
    *Zc = zc < d->kmax ? zc : d->kmax;
}

/* Decode a whole undamaged dtdr segment (docs/codecs.md 4): factors, base
 * layer, every residual frame (payloads already decompressed by the caller).
 * Returns 0 when every element was restored exactly into out, 1 when the
 * segment needs the general path (an implausible factor, a malformed frame,
 * an unexpected non-finite value, short sections: the general path decides
 * what is lost), -1 when out of memory. */
static int dtdr_segment_kernel(const unsigned char *meta, Py_ssize_t meta_len, const char *base, Py_ssize_t base_len,
                               const unsigned char *resid, Py_ssize_t resid_len, Py_buffer *payloads,
                               Py_ssize_t npayloads, const uint8_t *neg, char *out, Py_ssize_t numel, Py_ssize_t bs,
                               int dt, double M, const DInfo *d, int delta, Py_ssize_t fblocks) {
    const Py_ssize_t nfull = numel / bs, tail = numel % bs, nb = nfull + (tail ? 1 : 0);
    const Py_ssize_t mtail = tail ? next_pow2(tail) : 0, ncoef = nfull * bs + mtail;
    const Py_ssize_t nframes = (nb + fblocks - 1) / fblocks, toff = 4 + 4 * nb, isz = d->w / 8;
    const float fmax = (float)(3.4028234663852886e+38 / 63.0);
    if (numel <= 0 || meta_len < toff + 8 * nframes || base_len < ncoef || npayloads != nframes) return 1;
    uint32_t flags;
    memcpy(&flags, meta, 4);
    float *f = (float *)malloc(sizeof(float) * (size_t)nb);
    int32_t *A = (int32_t *)malloc(sizeof(int32_t) * (size_t)nb);
    int32_t *Zc = (int32_t *)malloc(sizeof(int32_t) * (size_t)nb);
    unsigned char *ok = (unsigned char *)malloc((size_t)fblocks);
    unsigned char *lost = (unsigned char *)malloc((size_t)(fblocks * bs));
    int rc = 1, nonfinite = 0;
    if (!f || !A || !Zc || !ok || !lost) { rc = -1; goto done; }
    memcpy(f, meta + 4, sizeof(float) * (size_t)nb);
    for (Py_ssize_t b = 0; b < nb; b++) {
        if (!(f[b] >= 0.0f && f[b] <= fmax)) goto done; /* NaN too: the general path replaces it */
        block_param_of(f[b], b < nfull ? bs : mtail, d, delta, A + b, Zc + b);
    }
    memset(ok, 1, (size_t)fblocks);
    Py_ssize_t pos = 0;
    /* frame by frame, so that the residual finds the frame's base values still in cache */
    for (Py_ssize_t j = 0; j < nframes; j++) {
        uint32_t zlen, lolen;
        memcpy(&zlen, meta + toff + 8 * j, 4);
        memcpy(&lolen, meta + toff + 8 * j + 4, 4);
        if ((Py_ssize_t)zlen + (Py_ssize_t)lolen > resid_len - 8 - pos) goto done;
        const Py_ssize_t b0 = j * fblocks, b1 = b0 + fblocks < nb ? b0 + fblocks : nb;
        const Py_ssize_t e0 = b0 * bs, e1 = b1 * bs < numel ? b1 * bs : numel;
        if (decode_base_kernel(base + b0 * bs, 8, f + b0, dt, e1 - e0, bs, neg, M, out + e0 * isz) < 0) {
            rc = -1;
            goto done;
        }
        int r = residual_decode_kernel((const unsigned char *)payloads[j].buf, payloads[j].len, resid + pos + zlen,
                                       (Py_ssize_t)lolen, NULL, (unsigned char *)out + e0 * isz, A + b0, Zc + b0, ok,
                                       e1 - e0, bs, d, lost);
        if (r == -2) { rc = -1; goto done; }
        if (r < 0 || (r & 1)) goto done;
        nonfinite |= (r & 2) != 0;
        pos += (Py_ssize_t)zlen + (Py_ssize_t)lolen;
    }
    rc = nonfinite && !(flags & 1) ? 1 : 0;
done:
    free(f); free(A); free(Zc); free(ok); free(lost);
    return rc;
}

/* dtdr_decode_segment(meta, base, residual, payloads, neg, out, numel, block_size, dtype_code, M,
 *                     w, mant, ebits, kmax, delta, frame_blocks) -> 0 exact, 1 take the general path */
static PyObject *py_dtdr_decode_segment(PyObject *self, PyObject *args) {
    PyObject *ometa, *obase, *oresid, *opay, *oneg, *oout;
    Py_ssize_t numel, bs, fblocks;
    int dt, w, mant, ebits, kmax, delta, rc = -3;
    double M;
    DInfo d;
    Buf meta, base, resid, neg, out;
    if (!PyArg_ParseTuple(args, "OOOO!OOnnidiiiiin", &ometa, &obase, &oresid, &PyList_Type, &opay, &oneg, &oout,
                          &numel, &bs, &dt, &M, &w, &mant, &ebits, &kmax, &delta, &fblocks))
        return NULL;
    if (dt < 0 || dt > 3 || dinfo_of(w, mant, ebits, kmax, &d) < 0 || w != 8 * dt_size(dt) || numel < 0 ||
        check_block(bs) < 0 || fblocks < 1 || fblocks > (1 << 24) / bs || delta < -8 || delta > 8) {
        if (!PyErr_Occurred()) PyErr_SetString(err_cls(), "bad segment parameters");
        return NULL;
    }
    Py_ssize_t npay = PyList_GET_SIZE(opay), got_pay = 0;
    Py_buffer *pay = (Py_buffer *)PyMem_Calloc((size_t)(npay ? npay : 1), sizeof(Py_buffer));
    if (!pay) return PyErr_NoMemory();
    Buf *all[5] = {&meta, &base, &resid, &neg, &out};
    PyObject *objs[5] = {ometa, obase, oresid, oneg, oout};
    const char *names[5] = {"meta", "base", "residual", "neg", "out"};
    int got = 0, ok = 1;
    for (; got < 5; got++)
        if (buf_get(objs[got], all[got], got == 4, names[got]) < 0) { ok = 0; break; }
    for (; ok && got_pay < npay; got_pay++)
        if (PyObject_GetBuffer(PyList_GET_ITEM(opay, got_pay), &pay[got_pay], PyBUF_SIMPLE) < 0) { ok = 0; break; }
    if (ok) ok = check_len(&neg, bs, "neg") == 0 && check_len(&out, numel * dt_size(dt), "out") == 0;
    if (ok) {
        RUN_UNLOCKED_IF(numel >= GIL_FREE_ELEMENTS,
                        rc = dtdr_segment_kernel(meta.view.buf, meta.view.len, base.view.buf, base.view.len,
                                                 resid.view.buf, resid.view.len, pay, npay, neg.view.buf,
                                                 out.view.buf, numel, bs, dt, M, &d, delta, fblocks));
        if (rc == -1) { PyErr_NoMemory(); ok = 0; }
    }
    for (Py_ssize_t i = 0; i < got_pay; i++) PyBuffer_Release(&pay[i]);
    PyMem_Free(pay);
    for (int i = 0; i < got; i++) buf_release(all[i]);
    if (!ok) return NULL;
    return PyLong_FromLong(rc);
}

/* Sizes of frame j's areas in the encoder's scratch buffers: the payload before
 * zstd (plane, totals, escapes at most) and the lo stream (with 8 bytes of slack). */
static inline Py_ssize_t frame_payload_cap(Py_ssize_t n, Py_ssize_t nb, Py_ssize_t isz) { return n + 4 * nb + n * isz; }
static inline Py_ssize_t frame_lo_cap(Py_ssize_t n, int kmax) { return (n * kmax + 7) / 8 + 8; }

/* Encode a whole dtdr segment except the zstd step: base layer (q, f), its
 * decode into scratch (one frame's worth), and every residual frame (payload and lo stream at the
 * offsets frame_payload_cap / frame_lo_cap give). lens[2j], lens[2j+1] receive
 * the frame's payload and lo lengths. Returns the flags, or -1 when out of memory. */
static int dtdr_encode_kernel(const void *x, Py_ssize_t numel, Py_ssize_t bs, int dt, double M, const uint8_t *neg,
                              const DInfo *d, int delta, Py_ssize_t fblocks, char *q, float *f, char *scratch,
                              unsigned char *payload, unsigned char *lo, Py_ssize_t *lens) {
    const Py_ssize_t nfull = numel / bs, tail = numel % bs, nb = nfull + (tail ? 1 : 0);
    const Py_ssize_t mtail = tail ? next_pow2(tail) : 0, isz = d->w / 8;
    const Py_ssize_t nframes = (nb + fblocks - 1) / fblocks;
    int flags = 0;
    int32_t *A = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nb ? nb : 1));
    int32_t *Zc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nb ? nb : 1));
    if (!A || !Zc) { free(A); free(Zc); return -1; }
    Py_ssize_t poff = 0, loff = 0;
    /* frame by frame (frames are whole blocks; only the last holds the tail), so that
     * each pass finds the frame's input, coefficients and base values in cache */
    for (Py_ssize_t j = 0; j < nframes; j++) {
        const Py_ssize_t b0 = j * fblocks, b1 = b0 + fblocks < nb ? b0 + fblocks : nb;
        const Py_ssize_t e0 = b0 * bs, e1 = b1 * bs < numel ? b1 * bs : numel, n = e1 - e0;
        const char *xf = (const char *)x + e0 * isz;
        if (encode_base_kernel(xf, dt, n, bs, neg, 8, q + e0, f + b0) < 0 ||
            decode_base_kernel(q + e0, 8, f + b0, dt, n, bs, neg, M, scratch) < 0) {
            flags = -1;
            break;
        }
        if (dt == DT_F64) {
            const double *v = (const double *)xf;
            for (Py_ssize_t i = 0; i < n; i++) flags |= fabs(v[i]) > (double)F32_MAX; /* infinities too */
        }
        for (Py_ssize_t b = b0; b < b1; b++) block_param_of(f[b], b < nfull ? bs : mtail, d, delta, A + b, Zc + b);
        Py_ssize_t lolen = 0;
        int nonfinite = 0;
        Py_ssize_t plen = residual_encode_kernel((const unsigned char *)xf, (const unsigned char *)scratch, A + b0,
                                                 Zc + b0, n, bs, d, payload + poff, lo + loff, &lolen, &nonfinite);
        if (plen < 0) { flags = -1; break; }
        flags |= nonfinite;
        lens[2 * j] = plen;
        lens[2 * j + 1] = lolen;
        poff += frame_payload_cap(n, b1 - b0, isz);
        loff += frame_lo_cap(n, d->kmax);
    }
    free(A);
    free(Zc);
    return flags;
}

/* dtdr_encode_segment(x, numel, block_size, dtype_code, M, neg, w, mant, ebits, kmax, delta, frame_blocks,
 *                     q_out, f_out, scratch, payload_out, lo_out) -> (flags, [payload_len, lo_len, ...]) */
static PyObject *py_dtdr_encode_segment(PyObject *self, PyObject *args) {
    PyObject *ox, *oneg, *oq, *of, *oscr, *opay, *olo;
    Py_ssize_t numel, bs, fblocks;
    int dt, w, mant, ebits, kmax, delta, flags = -2;
    double M;
    DInfo d;
    Buf x, neg, q, f, scr, pay, lo;
    if (!PyArg_ParseTuple(args, "OnnidOiiiiinOOOOO", &ox, &numel, &bs, &dt, &M, &oneg, &w, &mant, &ebits, &kmax,
                          &delta, &fblocks, &oq, &of, &oscr, &opay, &olo))
        return NULL;
    if (dt < 0 || dt > 3 || dinfo_of(w, mant, ebits, kmax, &d) < 0 || w != 8 * dt_size(dt) || numel < 0 ||
        check_block(bs) < 0 || fblocks < 1 || fblocks > (1 << 24) / bs || delta < -8 || delta > 8) {
        if (!PyErr_Occurred()) PyErr_SetString(err_cls(), "bad segment parameters");
        return NULL;
    }
    const Py_ssize_t nb = numel / bs + (numel % bs ? 1 : 0), isz = w / 8;
    const Py_ssize_t ncoef = (numel / bs) * bs + (numel % bs ? next_pow2(numel % bs) : 0);
    const Py_ssize_t nframes = (nb + fblocks - 1) / fblocks;
    Py_ssize_t need_pay = 0, need_lo = 0;
    for (Py_ssize_t j = 0; j < nframes; j++) {
        const Py_ssize_t b0 = j * fblocks, b1 = b0 + fblocks < nb ? b0 + fblocks : nb;
        const Py_ssize_t n = (b1 * bs < numel ? b1 * bs : numel) - b0 * bs;
        need_pay += frame_payload_cap(n, b1 - b0, isz);
        need_lo += frame_lo_cap(n, kmax);
    }
    Py_ssize_t *lens = (Py_ssize_t *)PyMem_Calloc((size_t)(2 * nframes + 1), sizeof(Py_ssize_t));
    if (!lens) return PyErr_NoMemory();
    Buf *all[7] = {&x, &neg, &q, &f, &scr, &pay, &lo};
    PyObject *objs[7] = {ox, oneg, oq, of, oscr, opay, olo};
    const char *names[7] = {"x", "neg", "q", "f", "scratch", "payload", "lo"};
    int got = 0, ok = 1;
    for (; got < 7; got++)
        if (buf_get(objs[got], all[got], got >= 2, names[got]) < 0) { ok = 0; break; }
    if (ok)
        ok = check_len(&x, numel * isz, "x") == 0 && check_len(&neg, bs, "neg") == 0 &&
             check_len(&q, ncoef, "q") == 0 && check_len(&f, 4 * nb, "f") == 0 &&
             check_len(&scr, (numel < fblocks * bs ? numel : fblocks * bs) * isz, "scratch") == 0 &&
             check_len(&pay, need_pay, "payload") == 0 &&
             check_len(&lo, need_lo, "lo") == 0;
    if (ok) {
        RUN_UNLOCKED_IF(numel >= GIL_FREE_ELEMENTS,
                        flags = dtdr_encode_kernel(x.view.buf, numel, bs, dt, M, neg.view.buf, &d, delta, fblocks,
                                                   q.view.buf, f.view.buf, scr.view.buf, pay.view.buf, lo.view.buf,
                                                   lens));
        if (flags < 0) { PyErr_NoMemory(); ok = 0; }
    }
    for (int i = 0; i < got; i++) buf_release(all[i]);
    PyObject *result = NULL;
    if (ok) {
        PyObject *lst = PyList_New(2 * nframes);
        if (lst) {
            for (Py_ssize_t i = 0; i < 2 * nframes; i++) {
                PyObject *v = PyLong_FromSsize_t(lens[i]);
                if (!v) { Py_CLEAR(lst); break; }
                PyList_SET_ITEM(lst, i, v);
            }
        }
        if (lst) result = Py_BuildValue("iN", flags, lst);
    }
    PyMem_Free(lens);
    return result;
}

/* literal_frames(payload, specs, out, lengths[, lo, lo_specs]): zstd frames of
 * Huffman-coded literal blocks (_literal_frames.c) for the frames whose parts specs
 * lists as uint64 quadruples (payload offset, plane, totals, escapes), one after the
 * other in out; each frame's length into lengths (uint64). With lo and lo_specs
 * (uint64 pairs: offset, length), each frame is followed in out by its bytes of lo:
 * a dtdr residual's Z_0 L_0 Z_1 L_1 ... without a copy of each part. */
static PyObject *py_literal_frames(PyObject *self, PyObject *args) {
    PyObject *opay, *ospec, *oout, *olen, *olo = NULL, *olospec = NULL;
    Buf pay, spec, out, lens, lo, lospec;
    if (!PyArg_ParseTuple(args, "OOOO|OO", &opay, &ospec, &oout, &olen, &olo, &olospec)) return NULL;
    if ((olo == NULL) != (olospec == NULL)) {
        PyErr_SetString(PyExc_TypeError, "literal_frames: lo and lo_specs go together");
        return NULL;
    }
    const int nbuf = olo ? 6 : 4;
    Buf *all[6] = {&pay, &spec, &out, &lens, &lo, &lospec};
    PyObject *objs[6] = {opay, ospec, oout, olen, olo, olospec};
    const char *names[6] = {"payload", "specs", "out", "lengths", "lo", "lo_specs"};
    const int writable[6] = {0, 0, 1, 1, 0, 0};
    int got = 0, ok = 1;
    for (; got < nbuf; got++)
        if (buf_get(objs[got], all[got], writable[got], names[got]) < 0) { ok = 0; break; }
    Py_ssize_t nframes = 0;
    size_t need = 0, work = 0;
    const uint64_t *sp = NULL, *lsp = NULL;
    if (ok) {
        nframes = spec.view.len / 32;
        sp = (const uint64_t *)spec.view.buf;
        if (spec.view.len % 32) {
            PyErr_SetString(err_cls(), "specs: not quadruples of uint64");
            ok = 0;
        }
        ok = ok && check_len(&lens, 8 * nframes, "lengths") == 0;
        if (ok && olo) {
            lsp = (const uint64_t *)lospec.view.buf;
            ok = check_len(&lospec, 16 * nframes, "lo_specs") == 0;
        }
        for (Py_ssize_t j = 0; ok && j < nframes; j++) {
            const uint64_t off = sp[4 * j], a = sp[4 * j + 1], b = sp[4 * j + 2], c = sp[4 * j + 3];
            if (a > (1u << 30) || b > (1u << 30) || c > (1u << 30) || off > (uint64_t)pay.view.len ||
                a + b + c > (uint64_t)pay.view.len - off) {
                PyErr_Format(err_cls(), "literal_frames: frame %zd lies outside the payload", j);
                ok = 0;
            }
            if (ok && lsp && (lsp[2 * j] > (uint64_t)lo.view.len || lsp[2 * j + 1] > (uint64_t)lo.view.len - lsp[2 * j])) {
                PyErr_Format(err_cls(), "literal_frames: frame %zd's lo bytes lie outside lo", j);
                ok = 0;
            }
            if (ok) {
                need += literal_frame_bound(a, b, c) + (lsp ? lsp[2 * j + 1] : 0);
                work += a + b + c;
            }
        }
        if (ok) ok = check_len(&out, (Py_ssize_t)need, "out") == 0;
    }
    if (ok) {
        const uint8_t *src = (const uint8_t *)pay.view.buf;
        const uint8_t *losrc = olo ? (const uint8_t *)lo.view.buf : NULL;
        uint8_t *dst = (uint8_t *)out.view.buf;
        uint64_t *lp = (uint64_t *)lens.view.buf;
        RUN_UNLOCKED_IF(work >= GIL_FREE_ELEMENTS, {
            for (Py_ssize_t j = 0; j < nframes; j++) {
                lp[j] = literal_frame(src + sp[4 * j], sp[4 * j + 1], sp[4 * j + 2], sp[4 * j + 3], dst);
                dst += lp[j];
                if (lsp) {
                    memcpy(dst, losrc + lsp[2 * j], lsp[2 * j + 1]);
                    dst += lsp[2 * j + 1];
                }
            }
        });
    }
    for (int i = 0; i < got; i++) buf_release(all[i]);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* f32_convert(src float32 buffer, dtype_code, out[, scalar]): the decoder's
 * casts, for tests (scalar: float16 without F16C). */
static PyObject *py_f32_convert(PyObject *self, PyObject *args) {
    PyObject *osrc, *oout;
    int dt, scalar = 0;
    Buf src, out;
    if (!PyArg_ParseTuple(args, "OiO|p", &osrc, &dt, &oout, &scalar)) return NULL;
    if (dt != DT_F16 && dt != DT_BF16) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be float16 or bfloat16");
        return NULL;
    }
    if (buf_get(osrc, &src, 0, "src") < 0) return NULL;
    if (buf_get(oout, &out, 1, "out") < 0) { buf_release(&src); return NULL; }
    Py_ssize_t n = src.view.len / 4;
    int ok = check_len(&out, 2 * n, "out") == 0;
    if (ok) {
        const float *s = src.view.buf;
        uint16_t *o = out.view.buf;
        if (dt == DT_F16) f32_to_f16_n(s, o, n, scalar);
        else for (Py_ssize_t i = 0; i < n; i++) o[i] = f32_to_bf16(s[i]);
    }
    buf_release(&src); buf_release(&out);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* unfilled_bytearray(n): a bytearray of n bytes whose contents are not set (no zeroing pass):
 * for an encoder's sections, which a kernel then writes in full. */
static PyObject *py_unfilled_bytearray(PyObject *self, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be non-negative");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

static PyObject *py_set_error_class(PyObject *self, PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_ValueError)) {
        PyErr_SetString(PyExc_TypeError, "the error class must be a subclass of ValueError");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(error_class, cls);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_error_class", py_set_error_class, METH_O, "The exception class for inconsistent sizes (a ValueError)."},
    {"encode_base", py_encode_base, METH_VARARGS, "Quantise blocks (the base layer encode)."},
    {"decode_base", py_decode_base, METH_VARARGS, "The normative base-layer decode."},
    {"decode_base_intact", py_decode_base_intact, METH_VARARGS, "Decode a whole undamaged dtdr8/dtdr16 segment."},
    {"residual_encode_frame", py_residual_encode_frame, METH_VARARGS, "Encode one residual frame (before zstd)."},
    {"residual_decode_frame", py_residual_decode_frame, METH_VARARGS, "Apply one residual frame (after zstd)."},
    {"dtdr_decode_segment", py_dtdr_decode_segment, METH_VARARGS, "Decode a whole undamaged dtdr segment."},
    {"dtdr_encode_segment", py_dtdr_encode_segment, METH_VARARGS, "Encode a whole dtdr segment (but for zstd)."},
    {"literal_frames", py_literal_frames, METH_VARARGS, "zstd frames of Huffman-coded literal blocks."},
    {"f32_convert", py_f32_convert, METH_VARARGS, "float32 -> float16/bfloat16 with the decoder's rounding."},
    {"unfilled_bytearray", py_unfilled_bytearray, METH_O, "A bytearray of n bytes, contents not set."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "torch-dtdr compiled codec core.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) {
    const uint16_t probe = 1;
    if (*(const unsigned char *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "the compiled core supports little-endian hosts only");
        return NULL;
    }
#ifdef DTDR_GATHER
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && getenv("TORCH_DTDR_NO_GATHER") == NULL;
    have_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    return PyModule_Create(&module);
}
