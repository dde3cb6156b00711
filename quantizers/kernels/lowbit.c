/*
 * bitalloc low-bit matmul kernels: y = x @ W^T for W on a uniform grid of 1-4 bit codes.
 *
 * Weight model (quantizers/formats.py, "uniform_grid"): w[r, c] = s[r, g] * (q[r, c] - z[r, g])
 * with unsigned codes q in [0, 2^bits), g = c / group_size, the last group of a row possibly
 * shorter, and one float16 scale s and zero point z per (row, group).
 *
 * Kernel layout (built once at load time by quantizers/kernels/layout.py):
 *
 *   codes  - uint8, rows x row_bytes. Each row is its groups in order; each group is
 *            ceil(len / 32) chunks of 32 consecutive columns (a short group is padded with
 *            code 0). A chunk is 4 * bits bytes. Element e of a chunk is written
 *            e = 8 * s + l (slot s = 0..3, lane l = 0..7) so that one 8-lane AVX2 vector
 *            of codes covers 8 consecutive columns, x[8s .. 8s+7]:
 *              4 bit: 16 bytes; byte l + 8*(s & 1), nibble (s >> 1)
 *              2 bit:  8 bytes; byte l, bits 2s..2s+1
 *              1 bit:  4 bytes; byte e % 4, bit e / 4 (so a 32-bit word broadcast to all lanes puts
 *                      element e's byte at vector byte e, where one mask and a min make it the code)
 *              3 bit: 12 bytes; the 2-bit chunk of (q & 3) followed by the 1-bit chunk of (q >> 2)
 *              8 bit: 32 bytes; byte e (column order; used for the LM head, not as an allocation option)
 *            Unpacking a slot is then one zero-extension per 8 bytes, a shift and a mask.
 *   params - float16 pairs (scale, zero), rows x groups x 2; the zero is exact in fp16
 *            (an integer code, or 1/2 for the symmetric 1-bit grid).
 *
 * GEMV with int8 activations (bq_gemv_i8, the decode path): x is first quantized per activation block
 * of up to 128 columns inside a group (BQ_ACT_BLOCK chunks), like llama.cpp's Q8_K blocks of 256
 * (d = max|x| / 127, xq = round(x / d)). Each chunk of codes is unpacked to 32 bytes and multiplied with
 * xq by maddubs; a block's int16 pair sums are added in int16 and widened once per block, and four rows
 * are reduced and scaled together (one 4-lane multiply-add per block). The result is the exact product
 * of the weight with the int8-rounded x.
 *
 * 1-bit GEMV with int8 activations through lookup tables (T-MAC, Wei et al. 2025): four 1-bit codes of a
 * row are a 4-bit index into the 16 subset sums of the four int8 activations they multiply, so one
 * pshufb does 32 rows x 4 columns. It needs the codes of 32 rows side by side (the "LUT tiles", built at
 * load time beside the chunk layout by quantizers/kernels/layout.py:lut_tiles): tile t is rows
 * 32t .. 32t+31; for each pair p of quads (8 padded columns) 32 bytes, byte j = row j (bytes 0-15 in
 * the low 128-bit lane, 16-31 in the high one, so pshufb's per-lane tables serve all 32 rows), low
 * nibble = the index of quad 2p (bit i = the code of column 8p + i), high nibble = quad 2p + 1. Its
 * (scale, zero) pairs follow per tile and group as 32 scales then 32 zeros (float16, row order). The
 * int8 activations and the result are those of the chunk-layout GEMV above.
 *
 * GEMV (one token) uses sum_c x_c * s * (q_c - z) = s * (sum_c x_c q_c) - s * z * sum_c x_c
 * with the per-group sums of x computed once per call, so the inner loop is only
 * unpack + convert + FMA. GEMM (a few tokens) dequantizes 8 weights at a time exactly as the
 * reference does ((q - z) * s in fp32) and reuses them for a tile of up to 8 tokens.
 *
 * x is copied into a zero-padded buffer matching the chunk layout only when some group is not a
 * multiple of 32 columns, so the inner loops never need a scalar tail.
 *
 * Threads: OpenMP over output rows. Inside torch's process this links to the libgomp torch has
 * already loaded (same soname), so torch.set_num_threads() also governs these kernels.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define BQ_AVX2 1
#else
#define BQ_AVX2 0
#endif

#define BQ_CHUNK 32
#define BQ_TILE 8      /* tokens per GEMM tile */
#define BQ_ROW_BLOCK 16 /* rows whose codes stay in L1 while the token tiles stream past */
#define BQ_ABI_VERSION 8
#define BQ_ACT_BLOCK 4 /* chunks per int8 activation block (128 columns), inside one group */
#define BQ_STACK_GROUPS 256 /* groups per row whose scales a GEMV keeps on the stack */

/* Below this many multiply-adds a parallel region costs more than it saves. */
#define BQ_PARALLEL_MIN_WORK 65536

#if defined(_MSC_VER)
#define BQ_INLINE static __forceinline
#define BQ_EXPORT __declspec(dllexport)
#else
#define BQ_INLINE static inline __attribute__((always_inline))
#define BQ_EXPORT __attribute__((visibility("default")))
#endif

/* ----------------------------------------------------------------------------- helpers */

BQ_INLINE float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    float out;
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24, exact in float */
        out = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -out : out;
    }
    if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    memcpy(&out, &bits, sizeof out);
    return out;
#endif
}

/* Shape of the chunk layout, derived from (cols, group_size) alone. */
typedef struct {
    int64_t groups;        /* groups per row */
    int64_t group_size;    /* columns in every group but possibly the last */
    int64_t last_len;      /* columns in the last group */
    int64_t chunks_full;   /* chunks in a full group */
    int64_t chunks_last;   /* chunks in the last group */
    int64_t chunks;        /* chunks per row */
    int64_t chunk_bytes;   /* 4 * bits */
    int padded;            /* 1 when the padded column count differs from cols */
} Geometry;

static Geometry geometry(int64_t cols, int64_t group_size, int bits) {
    Geometry g;
    if (group_size <= 0 || group_size > cols) group_size = cols;
    g.group_size = group_size;
    g.groups = (cols + group_size - 1) / group_size;
    g.last_len = cols - (g.groups - 1) * group_size;
    g.chunks_full = (group_size + BQ_CHUNK - 1) / BQ_CHUNK;
    g.chunks_last = (g.last_len + BQ_CHUNK - 1) / BQ_CHUNK;
    g.chunks = (g.groups - 1) * g.chunks_full + g.chunks_last;
    g.chunk_bytes = 4 * (int64_t)bits;
    g.padded = g.chunks * BQ_CHUNK != cols;
    return g;
}

/* Roles of a 3-bit chunk (layout.py: SINGLE, PAIR_FIRST, PAIR_SECOND): chunks 2i and 2i+1 of a group
 * share 24 bytes, 16 of nibbles (A's code + B's high bit) then B's 2-bit plane; an odd last chunk of a
 * group is single (a 2-bit plane, then a 1-bit plane). */
enum { BQ_SINGLE = 0, BQ_PAIR_FIRST = 1, BQ_PAIR_SECOND = 2 };

/* Role of chunk c (0-based) of a group of nc chunks; ignored for widths other than 3. */
BQ_INLINE int pair_role(int64_t c, int64_t nc) { return (c | 1) < nc ? BQ_PAIR_FIRST + (int)(c & 1) : BQ_SINGLE; }

/* Code of element e (0..31) of one chunk (p points at its own 4 * bits bytes): the scalar definition
 * of the layout. */
BQ_INLINE uint32_t chunk_code(const uint8_t *p, int bits, int role, int e) {
    int s = e >> 3, l = e & 7;
    switch (bits) {
    case 8: return p[e];
    case 4: return (p[l + 8 * (s & 1)] >> (4 * (s >> 1))) & 15u;
    case 2: return (p[l] >> (2 * s)) & 3u;
    case 1: return (p[e & 3] >> (e >> 2)) & 1u;
    default:
        if (role == BQ_PAIR_FIRST) return (p[e & 15] >> (4 * (e >> 4))) & 7u;
        if (role == BQ_PAIR_SECOND) /* the nibbles start 12 bytes back, this chunk's 2-bit plane 4 bytes on */
            return ((p[4 + l] >> (2 * s)) & 3u) | ((((uint32_t)p[(e & 15) - 12] >> (4 * (e >> 4) + 3)) & 1u) << 2);
        return ((p[l] >> (2 * s)) & 3u) | (((uint32_t)(p[8 + (e & 3)] >> (e >> 2)) & 1u) << 2);
    }
}

/* Copy rows of x (batch x cols) into the padded chunk layout (batch x chunks*32), zeros in the pads. */
static void pad_input(const float *x, int64_t batch, int64_t cols, const Geometry *geo, float *xp) {
    int64_t width = geo->chunks * BQ_CHUNK;
    for (int64_t t = 0; t < batch; ++t) {
        const float *src = x + t * cols;
        float *dst = xp + t * width;
        memset(dst, 0, (size_t)width * sizeof(float));
        for (int64_t g = 0; g < geo->groups; ++g) {
            int64_t len = g == geo->groups - 1 ? geo->last_len : geo->group_size;
            memcpy(dst + g * geo->chunks_full * BQ_CHUNK, src + g * geo->group_size, (size_t)len * sizeof(float));
        }
    }
}

/* Round to nearest, ties to even, for |v| < 2^22 without libm (the default FP rounding mode). */
BQ_INLINE float round_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return v >= 0.0f ? (v + magic) - magic : -((-v + magic) - magic);
}

/* One activation block of n (a multiple of 32) columns: xq = round(x * (127 / max|x|)) in [-127, 127]
 * (ties to even); stores d = max|x| / 127 and returns d * sum(xq). */
#if defined(__AVX2__)
static float quantize_block(const float *src, int64_t n, int8_t *xq, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int64_t e = 0; e < n; e += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + e)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t e = 0; e < n; e += BQ_CHUNK) {
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + e + 8 * i), inv)); /* nearest, ties to even */
        /* packs interleave 128-bit lanes; the permute restores column order */
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xq + e), _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *d = amax / 127.0f;
    return *d * (float)_mm_cvtsi128_si32(s4);
}
#else
static float quantize_block(const float *src, int64_t n, int8_t *xq, float *d) {
    float amax = 0.0f;
    for (int64_t e = 0; e < n; ++e) {
        float a = src[e] < 0.0f ? -src[e] : src[e];
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t isum = 0;
    for (int64_t e = 0; e < n; ++e) {
        int32_t v = (int32_t)round_even(src[e] * inv);
        xq[e] = (int8_t)v;
        isum += v;
    }
    *d = amax / 127.0f;
    return *d * (float)isum;
}
#endif

/* Int8 activations per block of at most BQ_ACT_BLOCK chunks inside a group (quantize_block; block b
 * covers chunks 4j .. 4j+3 of its group), and gsum[g] = the sum over group g's blocks of d[b] * sum(xq),
 * the zero-point term of the quantized x. */
static void quantize_activations(const float *xp, const Geometry *geo, int8_t *xq, float *d, float *gsum) {
    int64_t k = 0, b = 0;
    for (int64_t g = 0; g < geo->groups; ++g) {
        int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
        float total = 0.0f;
        for (int64_t c0 = 0; c0 < nc; c0 += BQ_ACT_BLOCK, ++b) {
            int64_t n = nc - c0 < BQ_ACT_BLOCK ? nc - c0 : BQ_ACT_BLOCK;
            total += quantize_block(xp + k * BQ_CHUNK, n * BQ_CHUNK, xq + k * BQ_CHUNK, d + b);
            k += n;
        }
        gsum[g] = total;
    }
}

/* ----------------------------------------------------------------------------- AVX2 path */
#if BQ_AVX2

BQ_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

BQ_INLINE __m256i load8_u8_to_i32(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

BQ_INLINE __m256i load_bits_by_lane(const uint8_t *p) {
    /* element 8s + l is bit 2s + l / 4 of byte l % 4: lane l holds the 32-bit word shifted right by
     * 8 (l % 4) + l / 4, so bit 2s of lane l is element 8s + l */
    return _mm256_srlv_epi32(_mm256_broadcastd_epi32(_mm_loadu_si32(p)), _mm256_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25));
}

/* A 3-bit pair (24 bytes at p) as two chunks of 32 code bytes in column order. The 16 nibble bytes,
 * broadcast and shifted by 0 | 4 per 128-bit half, put nibble e in the low half of vector byte e: its
 * low 3 bits are A's code and bit 3 is B's high bit, which joins B's 2-bit plane at bit 2. */
BQ_INLINE void unpack_pair3_bytes(const uint8_t *p, __m256i *a, __m256i *b) {
    const __m256i t = _mm256_srlv_epi64(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)), _mm256_setr_epi64x(0, 0, 4, 4));
    const __m256i plane = _mm256_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)(p + 16)));
    const __m256i lo2 = _mm256_and_si256(_mm256_srlv_epi64(plane, _mm256_setr_epi64x(0, 2, 4, 6)), _mm256_set1_epi8(3));
    *a = _mm256_and_si256(t, _mm256_set1_epi8(7));
    /* the 16-bit shift moves no set bit across bytes: only bit 3 of each byte survives the mask */
    *b = _mm256_or_si256(lo2, _mm256_srli_epi16(_mm256_and_si256(t, _mm256_set1_epi8(8)), 1));
}

/* The four slots (8 consecutive columns each) of one chunk as float codes. `bits` is a
 * compile-time constant at every call site, so the switch disappears; `role` matters for 3 bits. */
BQ_INLINE void unpack_chunk(const uint8_t *p, const int bits, const int role, __m256 q[4]) {
    if (bits == 3 && role == BQ_PAIR_FIRST) { /* the nibbles are placed as 4-bit codes are; their bit 3 is B's */
        const __m256i m = _mm256_set1_epi32(7);
        __m256i a = load8_u8_to_i32(p), b = load8_u8_to_i32(p + 8);
        q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, m));
        q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, m));
        q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 4), m));
        q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 4), m));
    } else if (bits == 3 && role == BQ_PAIR_SECOND) { /* 2-bit plane 4 bytes on, high bits: bit 3 of the nibbles 12 bytes back */
        const __m256i m3 = _mm256_set1_epi32(3), m4 = _mm256_set1_epi32(4);
        __m256i lo = load8_u8_to_i32(p + 4), a = load8_u8_to_i32(p - 12), b = load8_u8_to_i32(p - 4);
        q[0] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(lo, m3), _mm256_and_si256(_mm256_srli_epi32(a, 1), m4)));
        q[1] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(lo, 2), m3), _mm256_and_si256(_mm256_srli_epi32(b, 1), m4)));
        q[2] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(lo, 4), m3), _mm256_and_si256(_mm256_srli_epi32(a, 5), m4)));
        q[3] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(lo, 6), _mm256_and_si256(_mm256_srli_epi32(b, 5), m4)));
    } else if (bits == 8) {
        for (int s = 0; s < 4; ++s) q[s] = _mm256_cvtepi32_ps(load8_u8_to_i32(p + 8 * s));
    } else if (bits == 4) {
        const __m256i m = _mm256_set1_epi32(15);
        __m256i a = load8_u8_to_i32(p), b = load8_u8_to_i32(p + 8);
        q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, m));
        q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, m));
        q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
        q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    } else if (bits == 2) {
        const __m256i m = _mm256_set1_epi32(3);
        __m256i a = load8_u8_to_i32(p);
        q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, m));
        q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 2), m));
        q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 4), m));
        q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 6));
    } else if (bits == 1) {
        const __m256i m = _mm256_set1_epi32(1);
        __m256i a = load_bits_by_lane(p);
        q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, m));
        q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 2), m));
        q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 4), m));
        q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 6), m));
    } else { /* a single 3-bit chunk = 2-bit plane + 1-bit plane; the high bit is moved to bit 2 before the OR */
        const __m256i m3 = _mm256_set1_epi32(3), m4 = _mm256_set1_epi32(4);
        __m256i a = load8_u8_to_i32(p), h = load_bits_by_lane(p + 8);
        q[0] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(a, m3), _mm256_and_si256(_mm256_slli_epi32(h, 2), m4)));
        q[1] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(a, 2), m3), _mm256_and_si256(h, m4)));
        q[2] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(a, 4), m3),
                                                  _mm256_and_si256(_mm256_srli_epi32(h, 2), m4)));
        q[3] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(a, 6), _mm256_and_si256(_mm256_srli_epi32(h, 4), m4)));
    }
}

/* GEMV for R (1 or 2) consecutive rows. Four accumulators per row (one per slot) keep eight
 * independent FMA chains in flight for R = 2, enough to hide the FMA latency; the x loads are
 * shared by both rows. */
BQ_INLINE void gemv_rows(const uint8_t *codes, const uint16_t *params, int64_t row_bytes, const float *xp,
                         const float *xsum, const Geometry *geo, const int bits, const int R, float *y) {
    __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float zterm[2] = {0.0f, 0.0f};
    const uint8_t *p[2] = {codes, codes + row_bytes};
    const float *xc = xp;
    for (int64_t g = 0; g < geo->groups; ++g) {
        int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
        __m256 acc[2][4];
        for (int r = 0; r < R; ++r)
            for (int s = 0; s < 4; ++s) acc[r][s] = _mm256_setzero_ps();
        for (int64_t c = 0; c < nc; ++c) {
            __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8);
            __m256 x2 = _mm256_loadu_ps(xc + 16), x3 = _mm256_loadu_ps(xc + 24);
            const int role = pair_role(c, nc);
            for (int r = 0; r < R; ++r) {
                __m256 q[4];
                unpack_chunk(p[r], bits, role, q);
                acc[r][0] = _mm256_fmadd_ps(q[0], x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(q[1], x1, acc[r][1]);
                acc[r][2] = _mm256_fmadd_ps(q[2], x2, acc[r][2]);
                acc[r][3] = _mm256_fmadd_ps(q[3], x3, acc[r][3]);
                p[r] += geo->chunk_bytes;
            }
            xc += BQ_CHUNK;
        }
        for (int r = 0; r < R; ++r) {
            const uint16_t *pr = params + (int64_t)r * geo->groups * 2 + g * 2;
            float s = half_to_float(pr[0]), z = half_to_float(pr[1]);
            __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
            total[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), sum, total[r]);
            zterm[r] += s * z * xsum[g];
        }
    }
    for (int r = 0; r < R; ++r) y[r] = hsum256(total[r]) - zterm[r];
}

/* GEMM for one row and T (1..8) tokens: dequantize 8 weights exactly as the reference does,
 * then one FMA per token. T is a compile-time constant at every call site. */
BQ_INLINE void gemm_row(const uint8_t *codes, const uint16_t *params, const float *xp, int64_t xstride,
                        const Geometry *geo, const int bits, const int T, float *y, int64_t ystride) {
    __m256 acc[BQ_TILE];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    const uint8_t *p = codes;
    int64_t col = 0;
    for (int64_t g = 0; g < geo->groups; ++g) {
        int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
        __m256 vs = _mm256_set1_ps(half_to_float(params[2 * g]));
        __m256 vz = _mm256_set1_ps(half_to_float(params[2 * g + 1]));
        for (int64_t c = 0; c < nc; ++c) {
            __m256 q[4];
            unpack_chunk(p, bits, pair_role(c, nc), q);
            for (int s = 0; s < 4; ++s) {
                __m256 w = _mm256_mul_ps(_mm256_sub_ps(q[s], vz), vs);
                for (int t = 0; t < T; ++t)
                    acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + t * xstride + col + 8 * s), acc[t]);
            }
            p += geo->chunk_bytes;
            col += BQ_CHUNK;
        }
    }
    for (int t = 0; t < T; ++t) y[t * ystride] = hsum256(acc[t]);
}

BQ_INLINE void dequant_chunk(const uint8_t *p, const int bits, const int role, float s, float z, float *out) {
    __m256 q[4], vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    unpack_chunk(p, bits, role, q);
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + 8 * k, _mm256_mul_ps(_mm256_sub_ps(q[k], vz), vs));
}

/* One chunk's 32 codes as bytes in column order (vector byte e = element e), for the integer dot; a
 * 3-bit chunk here is a single one (pairs: unpack_pair3_bytes). */
BQ_INLINE __m256i unpack_chunk_bytes(const uint8_t *p, const int bits) {
    if (bits == 4) { /* elements 0..15: low nibbles of bytes 0..15; 16..31: their high nibbles */
        __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
        return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
    }
    __m256i lo2 = _mm256_setzero_si256();
    if (bits == 2 || bits == 3) { /* 64-bit lane s = the 8 bytes shifted right by 2s: byte l -> element 8s + l */
        __m256i v = _mm256_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)p)); /* read only here: a 1-bit chunk has 4 bytes */
        lo2 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 2, 4, 6)), _mm256_set1_epi8(3));
        if (bits == 2) return lo2;
    }
    /* 1-bit plane (at p for 1 bit, after the 8-byte 2-bit plane for 3 bits): the word broadcast puts byte
     * e % 4 at vector byte e; the mask keeps bit e / 4 and the min turns it into 0 or 1 */
    const __m256i bit = _mm256_setr_epi8(1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 32,
                                         64, 64, 64, 64, -128, -128, -128, -128);
    __m256i plane = _mm256_broadcastd_epi32(_mm_loadu_si32(p + (bits == 3 ? 8 : 0)));
    __m256i one = _mm256_min_epu8(_mm256_and_si256(plane, bit), _mm256_set1_epi8(1));
    if (bits == 1) return one;
    return _mm256_or_si256(lo2, _mm256_slli_epi16(one, 2));
}

/* Scales of groups g0 .. g1-1 for R (1..4) rows as 4-float vectors, scales[g - g0] (rows past R repeat
 * row 0), and the rows' zero-point terms over those groups, sum_g s[g] z[g] gsum[g]. Done before the
 * dot products so that the fp16 conversions stay off their dependency chains. */
BQ_INLINE __m128 group_scales4(const uint16_t *params, int64_t groups, int64_t g0, int64_t g1, const float *gsum, const int R,
                               __m128 *scales) {
    __m128 zterm = _mm_setzero_ps();
    const uint16_t *row[4];
    for (int r = 0; r < 4; ++r) row[r] = params + (int64_t)(r < R ? r : 0) * groups * 2;
    __m256 zterm2 = _mm256_setzero_ps();
    int64_t g = g0;
    for (; g + 4 <= g1; g += 4) { /* four groups at once: each row's 4 (scale, zero) pairs, transposed */
        __m256 q[4];
        for (int r = 0; r < 4; ++r) q[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row[r] + 2 * g)));
        /* q[r] = s(g) z(g) s(g+1) z(g+1) | s(g+2) z(g+2) s(g+3) z(g+3) of row r */
        __m256d lo01 = _mm256_castps_pd(_mm256_unpacklo_ps(q[0], q[1])), lo23 = _mm256_castps_pd(_mm256_unpacklo_ps(q[2], q[3]));
        __m256d hi01 = _mm256_castps_pd(_mm256_unpackhi_ps(q[0], q[1])), hi23 = _mm256_castps_pd(_mm256_unpackhi_ps(q[2], q[3]));
        __m256 s02 = _mm256_castpd_ps(_mm256_unpacklo_pd(lo01, lo23)), z02 = _mm256_castpd_ps(_mm256_unpackhi_pd(lo01, lo23));
        __m256 s13 = _mm256_castpd_ps(_mm256_unpacklo_pd(hi01, hi23)), z13 = _mm256_castpd_ps(_mm256_unpackhi_pd(hi01, hi23));
        scales[g - g0] = _mm256_castps256_ps128(s02);
        scales[g + 1 - g0] = _mm256_castps256_ps128(s13);
        scales[g + 2 - g0] = _mm256_extractf128_ps(s02, 1);
        scales[g + 3 - g0] = _mm256_extractf128_ps(s13, 1);
        zterm2 = _mm256_fmadd_ps(_mm256_mul_ps(s02, z02), _mm256_set_m128(_mm_set1_ps(gsum[g + 2]), _mm_set1_ps(gsum[g])), zterm2);
        zterm2 = _mm256_fmadd_ps(_mm256_mul_ps(s13, z13), _mm256_set_m128(_mm_set1_ps(gsum[g + 3]), _mm_set1_ps(gsum[g + 1])), zterm2);
    }
    zterm = _mm_add_ps(_mm256_castps256_ps128(zterm2), _mm256_extractf128_ps(zterm2, 1));
    for (; g < g1; ++g) {
        int32_t a, b, c, e;
        memcpy(&a, row[0] + 2 * g, 4);
        memcpy(&b, row[1] + 2 * g, 4);
        memcpy(&c, row[2] + 2 * g, 4);
        memcpy(&e, row[3] + 2 * g, 4);
        __m256 sz = _mm256_cvtph_ps(_mm_setr_epi32(a, b, c, e)); /* s0 z0 s1 z1 s2 z2 s3 z3 */
        __m256 split = _mm256_permutevar8x32_ps(sz, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
        __m128 s = _mm256_castps256_ps128(split);
        scales[g - g0] = s;
        zterm = _mm_fmadd_ps(_mm_mul_ps(s, _mm256_extractf128_ps(split, 1)), _mm_set1_ps(gsum[g]), zterm);
    }
    return zterm;
}

/* Lane r of the result = the sum of the 8 int32 lanes of v[r] (r = 0..3). */
BQ_INLINE __m128i sum4_epi32(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* One chunk k of R (1..4) rows into their accumulators: int16 pair sums for 1-4 bits, int32 for 8. */
BQ_INLINE void chunk_step(const uint8_t *codes, int64_t row_bytes, const int8_t *xq, int64_t k, const int bits, const int R,
                          __m256i acc[4]) {
    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k * BQ_CHUNK));
    const uint8_t *pk = codes + k * 4 * bits;
    if (bits == 8) {
        const __m256i x16lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv));
        const __m256i x16hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1));
        for (int r = 0; r < R; ++r) {
            const uint8_t *pr = pk + r * row_bytes;
            __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)pr)), x16lo);
            __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(pr + 16))), x16hi);
            acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(lo, hi));
        }
    } else {
        for (int r = 0; r < R; ++r)
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(unpack_chunk_bytes(pk + r * row_bytes, bits), xv));
    }
}

/* A 3-bit pair (chunks k and k+1) of R (1..4) rows into their int16 accumulators. */
BQ_INLINE void pair3_step(const uint8_t *codes, int64_t row_bytes, const int8_t *xq, int64_t k, const int R, __m256i acc[4]) {
    const __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + k * BQ_CHUNK));
    const __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + (k + 1) * BQ_CHUNK));
    for (int r = 0; r < R; ++r) {
        __m256i a, b;
        unpack_pair3_bytes(codes + r * row_bytes + k * 12, &a, &b);
        acc[r] = _mm256_add_epi16(acc[r], _mm256_add_epi16(_mm256_maddubs_epi16(a, xa), _mm256_maddubs_epi16(b, xb)));
    }
}

/* Int8-activation GEMV for R (1..4) consecutive rows sharing each chunk of xq. Codes are unpacked to
 * bytes and multiplied with xq by maddubs; the int16 pair sums of an activation block (at most
 * BQ_ACT_BLOCK chunks) are added in int16 (at most 4 * 2 * 15 * 127 = 15240 for 4 bits), widened once
 * per block (madd), summed across lanes for the R rows at once and scaled by the block's activation
 * scale times each row's group scale in one 4-lane multiply-add. */
BQ_INLINE void gemv_i8_rows(const uint8_t *codes, const uint16_t *params, int64_t row_bytes, const int8_t *xq,
                            const float *d, const float *gsum, const Geometry *geo, const int bits, const int R, float *y) {
    __m128 total = _mm_setzero_ps(), zterm = _mm_setzero_ps();
    __m128 scales[BQ_STACK_GROUPS];
    const __m256i ones16 = _mm256_set1_epi16(1);
    int64_t k = 0, b = 0;
    for (int64_t g0 = 0; g0 < geo->groups; g0 += BQ_STACK_GROUPS) {
        const int64_t g1 = g0 + BQ_STACK_GROUPS < geo->groups ? g0 + BQ_STACK_GROUPS : geo->groups;
        zterm = _mm_add_ps(zterm, group_scales4(params, geo->groups, g0, g1, gsum, R, scales));
        for (int64_t g = g0; g < g1; ++g) {
            const int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
            const __m128 s = scales[g - g0];
            for (int64_t c0 = 0; c0 < nc; c0 += BQ_ACT_BLOCK, ++b) {
                const int64_t n = nc - c0 < BQ_ACT_BLOCK ? nc - c0 : BQ_ACT_BLOCK;
                __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
                if (n == BQ_ACT_BLOCK) { /* a constant trip count, which the compiler unrolls */
                    /* R rows are R streams at once, which the hardware prefetcher alone follows too late on wide
                     * rows: fetch the same block of the next four rows, which this thread reads next */
                    for (int r = 0; r < R; ++r)
                        for (int off = 0; off < BQ_ACT_BLOCK * 4 * bits; off += 64)
                            _mm_prefetch((const char *)(codes + (r + 4) * row_bytes + k * 4 * bits + off), _MM_HINT_T0);
                    if (bits == 3) /* BQ_ACT_BLOCK is even, so a full block is whole pairs */
                        for (int64_t i = 0; i < BQ_ACT_BLOCK; i += 2) pair3_step(codes, row_bytes, xq, k + i, R, acc);
                    else
                        for (int64_t i = 0; i < BQ_ACT_BLOCK; ++i) chunk_step(codes, row_bytes, xq, k + i, bits, R, acc);
                } else { /* a group's last block: for 3 bits, pairs and then an odd last chunk, which is single */
                    int64_t i = 0;
                    if (bits == 3)
                        for (; i + 2 <= n; i += 2) pair3_step(codes, row_bytes, xq, k + i, R, acc);
                    for (; i < n; ++i) chunk_step(codes, row_bytes, xq, k + i, bits, R, acc);
                }
                k += n;
                if (bits != 8)
                    for (int r = 0; r < 4; ++r) acc[r] = _mm256_madd_epi16(acc[r], ones16);
                __m128 dots = _mm_cvtepi32_ps(sum4_epi32(acc[0], acc[1], acc[2], acc[3]));
                total = _mm_fmadd_ps(dots, _mm_mul_ps(s, _mm_set1_ps(d[b])), total);
            }
        }
    }
    float out[4];
    _mm_storeu_ps(out, _mm_sub_ps(total, zterm));
    for (int r = 0; r < R; ++r) y[r] = out[r];
}

/* The 16 subset sums of quads q0 .. q1-1 of int8 activations, as two 16-byte tables per quad: the low
 * bytes and the high bytes of the int16 sums (|sum| <= 4 * 127). */
static void build_lut(const int8_t *xq, int64_t q0, int64_t q1, uint8_t *lut) {
    /* entry e of a quad's table sums the activations whose bit is set in e */
    const __m256i m0 = _mm256_setr_epi16(0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1);
    const __m256i m1 = _mm256_setr_epi16(0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1);
    const __m256i m2 = _mm256_setr_epi16(0, 0, 0, 0, -1, -1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1);
    const __m256i m3 = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i low = _mm256_set1_epi16(0xff);
    for (int64_t q = q0; q < q1; ++q) {
        const int8_t *x = xq + 4 * q;
        __m256i t = _mm256_add_epi16(_mm256_and_si256(_mm256_set1_epi16(x[0]), m0), _mm256_and_si256(_mm256_set1_epi16(x[1]), m1));
        t = _mm256_add_epi16(t, _mm256_add_epi16(_mm256_and_si256(_mm256_set1_epi16(x[2]), m2), _mm256_and_si256(_mm256_set1_epi16(x[3]), m3)));
        /* packus keeps 128-bit lanes: lo(e 0-7) hi(e 0-7) | lo(e 8-15) hi(e 8-15); the permute gathers lo | hi */
        __m256i bytes = _mm256_packus_epi16(_mm256_and_si256(t, low), _mm256_srli_epi16(t, 8));
        _mm256_storeu_si256((__m256i *)(lut + 32 * q), _mm256_permute4x64_epi64(bytes, 0xD8));
    }
}

/* One LUT tile (32 rows) of the 1-bit int8 GEMV; y gets its 32 outputs in row order. */
static void lut_tile(const uint8_t *tile, const uint16_t *tparams, const uint8_t *lut, const float *d, const float *gsum,
                     const Geometry *geo, float *y) {
    const __m256i nibble = _mm256_set1_epi8(15);
    __m256 total[4], zterm[4]; /* rows 0-7, 8-15, 16-23, 24-31 */
    for (int i = 0; i < 4; ++i) total[i] = zterm[i] = _mm256_setzero_ps();
    int64_t pair = 0, b = 0;
    for (int64_t g = 0; g < geo->groups; ++g) {
        const int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
        const uint16_t *sz = tparams + g * 64;
        __m256 s[4];
        for (int i = 0; i < 4; ++i) {
            s[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sz + 8 * i)));
            __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sz + 32 + 8 * i)));
            zterm[i] = _mm256_fmadd_ps(_mm256_mul_ps(s[i], z), _mm256_set1_ps(gsum[g]), zterm[i]);
        }
        for (int64_t c0 = 0; c0 < nc; c0 += BQ_ACT_BLOCK, ++b) {
            const int64_t pairs = 4 * (nc - c0 < BQ_ACT_BLOCK ? nc - c0 : BQ_ACT_BLOCK); /* at most 16: int16 sums <= 16 * 2 * 508 */
            __m256i lo_rows = _mm256_setzero_si256(), hi_rows = _mm256_setzero_si256();
            for (int64_t e = pair + pairs; pair < e; ++pair) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(tile + 32 * pair));
                const __m256i i0 = _mm256_and_si256(v, nibble), i1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                const uint8_t *t0 = lut + 64 * pair, *t1 = t0 + 32;
                const __m256i lo0 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t0)), i0);
                const __m256i hi0 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t0 + 16))), i0);
                const __m256i lo1 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t1)), i1);
                const __m256i hi1 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t1 + 16))), i1);
                /* unpack low/high bytes into int16: lanes hold rows 0-7 | 16-23 (lo) and 8-15 | 24-31 (hi) */
                lo_rows = _mm256_add_epi16(lo_rows, _mm256_add_epi16(_mm256_unpacklo_epi8(lo0, hi0), _mm256_unpacklo_epi8(lo1, hi1)));
                hi_rows = _mm256_add_epi16(hi_rows, _mm256_add_epi16(_mm256_unpackhi_epi8(lo0, hi0), _mm256_unpackhi_epi8(lo1, hi1)));
            }
            const __m256 dv = _mm256_set1_ps(d[b]);
            const __m128i part[4] = {_mm256_castsi256_si128(lo_rows), _mm256_castsi256_si128(hi_rows),
                                     _mm256_extracti128_si256(lo_rows, 1), _mm256_extracti128_si256(hi_rows, 1)};
            for (int i = 0; i < 4; ++i)
                total[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[i])), _mm256_mul_ps(s[i], dv), total[i]);
        }
    }
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(y + 8 * i, _mm256_sub_ps(total[i], zterm[i]));
}

static void gemv_i8_lut(const bq_weight *w, const int8_t *xq, const float *d, const float *gsum, const Geometry *geo,
                        uint8_t *lut, float *y) {
    const int64_t tiles = w->rows / 32, tile_bytes = 32 * geo->chunks * BQ_CHUNK / 8, tile_params = 64 * geo->groups;
    const int64_t quads = geo->chunks * BQ_CHUNK / 4, per = 64; /* quads per piece of the table built by one thread */
    int parallel = w->rows * w->cols >= BQ_PARALLEL_MIN_WORK;
    (void)parallel;
    /* one parallel region: the threads build the tables together, then (after the barrier) split the tiles */
#pragma omp parallel if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t q = 0; q < quads; q += per) build_lut(xq, q, q + per < quads ? q + per : quads, lut);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t)
            lut_tile(w->lut_codes + t * tile_bytes, w->lut_params + t * tile_params, lut, d, gsum, geo, y + 32 * t);
    }
}

#else /* ------------------------------------------------------------------ portable path */

/* Plain loops over a chunk decoded into 32 floats: compilers vectorize the 32-wide dot and
 * multiply-add loops for whatever SIMD the target has. */
BQ_INLINE void unpack_chunk_scalar(const uint8_t *p, const int bits, const int role, float *q) {
    for (int e = 0; e < BQ_CHUNK; ++e) q[e] = (float)chunk_code(p, bits, role, e);
}

BQ_INLINE void gemv_rows(const uint8_t *codes, const uint16_t *params, int64_t row_bytes, const float *xp,
                         const float *xsum, const Geometry *geo, const int bits, const int R, float *y) {
    for (int r = 0; r < R; ++r) {
        const uint8_t *p = codes + r * row_bytes;
        const uint16_t *pr = params + (int64_t)r * geo->groups * 2;
        const float *xc = xp;
        float total = 0.0f, zterm = 0.0f;
        for (int64_t g = 0; g < geo->groups; ++g) {
            int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
            float acc[BQ_CHUNK] = {0};
            for (int64_t c = 0; c < nc; ++c) {
                float q[BQ_CHUNK];
                unpack_chunk_scalar(p, bits, pair_role(c, nc), q);
                for (int e = 0; e < BQ_CHUNK; ++e) acc[e] += q[e] * xc[e];
                p += geo->chunk_bytes;
                xc += BQ_CHUNK;
            }
            float sum = 0.0f;
            for (int e = 0; e < BQ_CHUNK; ++e) sum += acc[e];
            float s = half_to_float(pr[2 * g]), z = half_to_float(pr[2 * g + 1]);
            total += s * sum;
            zterm += s * z * xsum[g];
        }
        y[r] = total - zterm;
    }
}

BQ_INLINE void gemm_row(const uint8_t *codes, const uint16_t *params, const float *xp, int64_t xstride,
                        const Geometry *geo, const int bits, const int T, float *y, int64_t ystride) {
    float acc[BQ_TILE][BQ_CHUNK];
    memset(acc, 0, sizeof acc);
    const uint8_t *p = codes;
    int64_t col = 0;
    for (int64_t g = 0; g < geo->groups; ++g) {
        int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
        float s = half_to_float(params[2 * g]), z = half_to_float(params[2 * g + 1]);
        for (int64_t c = 0; c < nc; ++c) {
            float w[BQ_CHUNK];
            const int role = pair_role(c, nc);
            for (int e = 0; e < BQ_CHUNK; ++e) w[e] = ((float)chunk_code(p, bits, role, e) - z) * s;
            for (int t = 0; t < T; ++t)
                for (int e = 0; e < BQ_CHUNK; ++e) acc[t][e] += w[e] * xp[t * xstride + col + e];
            p += geo->chunk_bytes;
            col += BQ_CHUNK;
        }
    }
    for (int t = 0; t < T; ++t) {
        float sum = 0.0f;
        for (int e = 0; e < BQ_CHUNK; ++e) sum += acc[t][e];
        y[t * ystride] = sum;
    }
}

BQ_INLINE void dequant_chunk(const uint8_t *p, const int bits, const int role, float s, float z, float *out) {
    for (int e = 0; e < BQ_CHUNK; ++e) out[e] = ((float)chunk_code(p, bits, role, e) - z) * s;
}

BQ_INLINE void gemv_i8_rows(const uint8_t *codes, const uint16_t *params, int64_t row_bytes, const int8_t *xq,
                            const float *d, const float *gsum, const Geometry *geo, const int bits, const int R, float *y) {
    for (int r = 0; r < R; ++r) {
        const uint8_t *p = codes + r * row_bytes;
        const uint16_t *pr = params + (int64_t)r * geo->groups * 2;
        float total = 0.0f, zterm = 0.0f;
        int64_t k = 0, b = 0;
        for (int64_t g = 0; g < geo->groups; ++g) {
            int64_t nc = g == geo->groups - 1 ? geo->chunks_last : geo->chunks_full;
            float s = half_to_float(pr[2 * g]), z = half_to_float(pr[2 * g + 1]);
            for (int64_t c0 = 0; c0 < nc; c0 += BQ_ACT_BLOCK, ++b) {
                int64_t c1 = c0 + BQ_ACT_BLOCK < nc ? c0 + BQ_ACT_BLOCK : nc;
                int32_t dot = 0;
                for (int64_t c = c0; c < c1; ++c, ++k) {
                    const int role = pair_role(c, nc);
                    for (int e = 0; e < BQ_CHUNK; ++e) dot += (int32_t)chunk_code(p, bits, role, e) * xq[k * BQ_CHUNK + e];
                    p += geo->chunk_bytes;
                }
                total += s * (d[b] * (float)dot);
            }
            zterm += s * z * gsum[g];
        }
        y[r] = total - zterm;
    }
}

#endif

/* ----------------------------------------------------------------------------- drivers */

/* Each driver is instantiated per bit width so `bits` is a constant inside the hot loops. */
#define BQ_DEFINE_GEMV(B)                                                                                         \
    static void gemv_b##B(const uint8_t *codes, const uint16_t *params, int64_t rows, int64_t row_bytes,          \
                          const float *xp, const float *xsum, const Geometry *geo, float *y, int parallel) {      \
        int64_t pairs = rows / 2;                                                                                 \
        (void)parallel; /* unused without OpenMP */                                                               \
        _Pragma("omp parallel for schedule(static) if (parallel)") for (int64_t i = 0; i < pairs; ++i) {          \
            int64_t r = 2 * i;                                                                                    \
            gemv_rows(codes + r * row_bytes, params + r * geo->groups * 2, row_bytes, xp, xsum, geo, B, 2, y + r); \
        }                                                                                                         \
        if (rows & 1) {                                                                                           \
            int64_t r = rows - 1;                                                                                 \
            gemv_rows(codes + r * row_bytes, params + r * geo->groups * 2, row_bytes, xp, xsum, geo, B, 1, y + r); \
        }                                                                                                         \
    }

BQ_DEFINE_GEMV(1)
BQ_DEFINE_GEMV(2)
BQ_DEFINE_GEMV(3)
BQ_DEFINE_GEMV(4)
BQ_DEFINE_GEMV(8)

#define BQ_DEFINE_GEMV_I8(B)                                                                                      \
    static void gemv_i8_b##B(const uint8_t *codes, const uint16_t *params, int64_t rows, int64_t row_bytes,       \
                             const int8_t *xq, const float *d, const float *gsum, const Geometry *geo, float *y,  \
                             int parallel) {                                                                      \
        int64_t quads = rows / 4;                                                                                 \
        (void)parallel;                                                                                           \
        _Pragma("omp parallel for schedule(static) if (parallel)") for (int64_t i = 0; i < quads; ++i) {          \
            int64_t r = 4 * i;                                                                                    \
            gemv_i8_rows(codes + r * row_bytes, params + r * geo->groups * 2, row_bytes, xq, d, gsum, geo, B, 4,   \
                         y + r);                                                                                  \
        }                                                                                                         \
        const uint8_t *tail = codes + 4 * quads * row_bytes;                                                      \
        const uint16_t *tail_params = params + 4 * quads * geo->groups * 2;                                       \
        switch (rows - 4 * quads) {                                                                               \
        case 1: gemv_i8_rows(tail, tail_params, row_bytes, xq, d, gsum, geo, B, 1, y + 4 * quads); break;         \
        case 2: gemv_i8_rows(tail, tail_params, row_bytes, xq, d, gsum, geo, B, 2, y + 4 * quads); break;         \
        case 3: gemv_i8_rows(tail, tail_params, row_bytes, xq, d, gsum, geo, B, 3, y + 4 * quads); break;         \
        default: break;                                                                                           \
        }                                                                                                         \
    }

BQ_DEFINE_GEMV_I8(1)
BQ_DEFINE_GEMV_I8(2)
BQ_DEFINE_GEMV_I8(3)
BQ_DEFINE_GEMV_I8(4)
BQ_DEFINE_GEMV_I8(8)

#define BQ_GEMM_TAIL_CASE(B, T)                                                                        \
    case T: gemm_row(p, pr, xp + t0 * xstride, xstride, geo, B, T, y + t0 * rows + r, rows); break;

#define BQ_DEFINE_GEMM(B)                                                                                         \
    static void gemm_b##B(const uint8_t *codes, const uint16_t *params, int64_t rows, int64_t row_bytes,          \
                          const float *xp, int64_t xstride, int64_t batch, const Geometry *geo, float *y,         \
                          int parallel) {                                                                         \
        int64_t blocks = (rows + BQ_ROW_BLOCK - 1) / BQ_ROW_BLOCK;                                                \
        (void)parallel; /* unused without OpenMP */                                                               \
        _Pragma("omp parallel for schedule(static) if (parallel)") for (int64_t b = 0; b < blocks; ++b) {         \
            int64_t r_end = (b + 1) * BQ_ROW_BLOCK < rows ? (b + 1) * BQ_ROW_BLOCK : rows;                        \
            for (int64_t t0 = 0; t0 < batch; t0 += BQ_TILE) {                                                     \
                int64_t tn = batch - t0 < BQ_TILE ? batch - t0 : BQ_TILE;                                         \
                for (int64_t r = b * BQ_ROW_BLOCK; r < r_end; ++r) {                                              \
                    const uint8_t *p = codes + r * row_bytes;                                                     \
                    const uint16_t *pr = params + r * geo->groups * 2;                                            \
                    switch (tn) {                                                                                 \
                        BQ_GEMM_TAIL_CASE(B, 1) BQ_GEMM_TAIL_CASE(B, 2) BQ_GEMM_TAIL_CASE(B, 3)                    \
                        BQ_GEMM_TAIL_CASE(B, 4) BQ_GEMM_TAIL_CASE(B, 5) BQ_GEMM_TAIL_CASE(B, 6)                    \
                        BQ_GEMM_TAIL_CASE(B, 7) BQ_GEMM_TAIL_CASE(B, 8)                                            \
                    }                                                                                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

BQ_DEFINE_GEMM(1)
BQ_DEFINE_GEMM(2)
BQ_DEFINE_GEMM(3)
BQ_DEFINE_GEMM(4)
BQ_DEFINE_GEMM(8)

/* ----------------------------------------------------------------------------- exported API */

BQ_EXPORT int bq_abi_version(void) { return BQ_ABI_VERSION; }

BQ_EXPORT int bq_simd(void) { return BQ_AVX2 ? 2 : 0; }

BQ_EXPORT int bq_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

BQ_EXPORT int64_t bq_row_bytes(int64_t cols, int64_t group_size, int bits) {
    Geometry geo = geometry(cols, group_size, bits);
    return geo.chunks * geo.chunk_bytes;
}

/*
 * y (batch x rows) = x (batch x cols) @ W^T + bias. All arrays contiguous row-major; params holds
 * float16 bit patterns; bias (rows floats) may be NULL. Returns 0 on success, a negative code on
 * bad arguments or no memory.
 */
BQ_EXPORT int bq_matmul(const float *x, int64_t batch, int64_t cols, const uint8_t *codes, const uint16_t *params,
                        const float *bias, int64_t rows, int bits, int64_t group_size, float *y) {
    if (bits < 1 || (bits > 4 && bits != 8) || batch < 0 || cols <= 0 || rows <= 0) return -1;
    if (batch == 0) return 0;
    Geometry geo = geometry(cols, group_size, bits);
    int64_t row_bytes = geo.chunks * geo.chunk_bytes;
    int64_t width = geo.chunks * BQ_CHUNK;
    int parallel = rows * cols * batch >= BQ_PARALLEL_MIN_WORK;
    float *padded = NULL;
    const float *xp = x;
    if (geo.padded) {
        padded = (float *)malloc((size_t)(batch * width) * sizeof(float));
        if (!padded) return -2;
        pad_input(x, batch, cols, &geo, padded);
        xp = padded;
    }
    if (batch == 1) {
        float *xsum = (float *)malloc((size_t)geo.groups * sizeof(float));
        if (!xsum) {
            free(padded);
            return -2;
        }
        for (int64_t g = 0; g < geo.groups; ++g) {
            int64_t len = g == geo.groups - 1 ? geo.last_len : geo.group_size;
            const float *src = x + g * geo.group_size;
            float s = 0.0f;
            for (int64_t c = 0; c < len; ++c) s += src[c];
            xsum[g] = s;
        }
        switch (bits) {
        case 1: gemv_b1(codes, params, rows, row_bytes, xp, xsum, &geo, y, parallel); break;
        case 2: gemv_b2(codes, params, rows, row_bytes, xp, xsum, &geo, y, parallel); break;
        case 3: gemv_b3(codes, params, rows, row_bytes, xp, xsum, &geo, y, parallel); break;
        case 4: gemv_b4(codes, params, rows, row_bytes, xp, xsum, &geo, y, parallel); break;
        default: gemv_b8(codes, params, rows, row_bytes, xp, xsum, &geo, y, parallel); break;
        }
        free(xsum);
    } else {
        int64_t xstride = geo.padded ? width : cols;
        switch (bits) {
        case 1: gemm_b1(codes, params, rows, row_bytes, xp, xstride, batch, &geo, y, parallel); break;
        case 2: gemm_b2(codes, params, rows, row_bytes, xp, xstride, batch, &geo, y, parallel); break;
        case 3: gemm_b3(codes, params, rows, row_bytes, xp, xstride, batch, &geo, y, parallel); break;
        case 4: gemm_b4(codes, params, rows, row_bytes, xp, xstride, batch, &geo, y, parallel); break;
        default: gemm_b8(codes, params, rows, row_bytes, xp, xstride, batch, &geo, y, parallel); break;
        }
    }
    free(padded);
    if (bias) {
        for (int64_t t = 0; t < batch; ++t)
            for (int64_t r = 0; r < rows; ++r) y[t * rows + r] += bias[r];
    }
    return 0;
}

BQ_EXPORT int bq_matmul_desc(const bq_weight *w, const float *x, int64_t batch, float *y) {
    return bq_matmul(x, batch, w->cols, w->codes, w->params, w->bias, w->rows, (int)w->bits, w->group_size, y);
}

/*
 * y (rows) = q8(x) @ W^T + bias for one token, with x quantized to int8 per 32 columns (see the header).
 * Returns 0 on success, -1 on bad arguments, -2 without memory.
 */
BQ_EXPORT int bq_gemv_i8_desc(const bq_weight *w, const float *x, float *y) {
    int bits = (int)w->bits;
    if (bits < 1 || (bits > 4 && bits != 8) || w->cols <= 0 || w->rows <= 0) return -1;
    Geometry geo = geometry(w->cols, w->group_size, bits);
    int64_t row_bytes = geo.chunks * geo.chunk_bytes;
    int64_t width = geo.chunks * BQ_CHUNK;
    const int lut = BQ_AVX2 && bits == 1 && w->lut_codes && w->lut_params && w->rows % 32 == 0;
    /* one allocation: d (chunks floats), gsum (groups floats), padded x (width floats when needed), xq (width bytes),
     * and for the LUT path its tables (width / 4 x 32 bytes) */
    size_t floats = (size_t)(geo.chunks + geo.groups + (geo.padded ? width : 0));
    float *scratch = (float *)malloc(floats * sizeof(float) + (size_t)width + (lut ? (size_t)width * 8 : 0));
    if (!scratch) return -2;
    float *d = scratch, *gsum = scratch + geo.chunks;
    const float *xp = x;
    if (geo.padded) {
        float *padded = gsum + geo.groups;
        pad_input(x, 1, w->cols, &geo, padded);
        xp = padded;
    }
    int8_t *xq = (int8_t *)(scratch + floats);
    quantize_activations(xp, &geo, xq, d, gsum);
    int parallel = w->rows * w->cols >= BQ_PARALLEL_MIN_WORK;
#if BQ_AVX2
    if (lut)
        gemv_i8_lut(w, xq, d, gsum, &geo, (uint8_t *)xq + width, y);
    else
#endif
    switch (bits) {
    case 1: gemv_i8_b1(w->codes, w->params, w->rows, row_bytes, xq, d, gsum, &geo, y, parallel); break;
    case 2: gemv_i8_b2(w->codes, w->params, w->rows, row_bytes, xq, d, gsum, &geo, y, parallel); break;
    case 3: gemv_i8_b3(w->codes, w->params, w->rows, row_bytes, xq, d, gsum, &geo, y, parallel); break;
    case 4: gemv_i8_b4(w->codes, w->params, w->rows, row_bytes, xq, d, gsum, &geo, y, parallel); break;
    default: gemv_i8_b8(w->codes, w->params, w->rows, row_bytes, xq, d, gsum, &geo, y, parallel); break;
    }
    free(scratch);
    if (w->bias)
        for (int64_t r = 0; r < w->rows; ++r) y[r] += w->bias[r];
    return 0;
}

/* `count` single-token products one after another, y_i = x @ W_i^T (all of one shape; each overwrites y):
 * the kernels' own throughput with no caller between the products, as the C decode step calls them. */
BQ_EXPORT int bq_gemv_sequence(const bq_weight *weights, int64_t count, const float *x, float *y, int int8_activations) {
    for (int64_t i = 0; i < count; ++i) {
        int code = int8_activations ? bq_gemv_i8_desc(&weights[i], x, y) : bq_matmul_desc(&weights[i], x, 1, y);
        if (code != 0) return code;
    }
    return 0;
}

/* out (rows x cols, float32) = the dequantized weight, (q - z) * s exactly as the reference. */
BQ_EXPORT int bq_dequantize(const uint8_t *codes, const uint16_t *params, int64_t rows, int64_t cols, int bits,
                            int64_t group_size, float *out) {
    if (bits < 1 || (bits > 4 && bits != 8) || cols <= 0 || rows <= 0) return -1;
    Geometry geo = geometry(cols, group_size, bits);
    int64_t row_bytes = geo.chunks * geo.chunk_bytes;
    int parallel = rows * cols >= BQ_PARALLEL_MIN_WORK;
    (void)parallel;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *p = codes + r * row_bytes;
        const uint16_t *pr = params + r * geo.groups * 2;
        float *dst = out + r * cols;
        for (int64_t g = 0; g < geo.groups; ++g) {
            int64_t len = g == geo.groups - 1 ? geo.last_len : geo.group_size;
            int64_t nc = g == geo.groups - 1 ? geo.chunks_last : geo.chunks_full;
            float s = half_to_float(pr[2 * g]), z = half_to_float(pr[2 * g + 1]);
            for (int64_t c = 0; c < nc; ++c) {
                float buf[BQ_CHUNK];
                int64_t n = len - c * BQ_CHUNK < BQ_CHUNK ? len - c * BQ_CHUNK : BQ_CHUNK;
                /* dispatch once per chunk; dequantization is not on the hot decode path */
                switch (bits) {
                case 1: dequant_chunk(p, 1, BQ_SINGLE, s, z, buf); break;
                case 2: dequant_chunk(p, 2, BQ_SINGLE, s, z, buf); break;
                case 3: dequant_chunk(p, 3, pair_role(c, nc), s, z, buf); break;
                case 4: dequant_chunk(p, 4, BQ_SINGLE, s, z, buf); break;
                default: dequant_chunk(p, 8, BQ_SINGLE, s, z, buf); break;
                }
                memcpy(dst + g * geo.group_size + c * BQ_CHUNK, buf, (size_t)n * sizeof(float));
                p += geo.chunk_bytes;
            }
        }
    }
    return 0;
}
