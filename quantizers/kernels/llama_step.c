/*
 * One decode step of a llama-architecture decoder in C: everything between two tokens' logits,
 * so a generated token costs one call from Python instead of a few hundred torch operations.
 *
 * The arithmetic is transformers' LlamaForCausalLM at batch 1 (allocator/decoder.py holds the
 * torch version this is tested against):
 *
 *   for each block:  h = rmsnorm(x) * w_in
 *                    q, k, v = h @ Wqkv^T;  rotary on q and k at `position`;  k, v -> the KV cache
 *                    per head: softmax(scale * q . K[0..position]) @ V   (grouped-query heads)
 *                    x += attention @ Wo^T
 *                    h = rmsnorm(x) * w_post;  g, u = h @ Wgate_up^T;  x += (silu(g) * u) @ Wdown^T
 *   logits = (rmsnorm(x) * w_final) @ Whead^T
 *
 * Matrices are bq_weight descriptors (lowbit.h): packed 1-4/8-bit grids, or float32 rows when
 * bits == 32 (a layer stored in another format, or an unquantized head). A projection may be split
 * into up to three pieces (q, k, v of different widths) whose outputs are concatenated.
 * Field order of the structs is mirrored by quantizers/kernels/build.py.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BQ_STEP_AVX2 1
#else
#define BQ_STEP_AVX2 0
#endif

#if defined(_MSC_VER)
#define BQ_EXPORT __declspec(dllexport)
#else
#define BQ_EXPORT __attribute__((visibility("default")))
#endif

#define BQ_FLOAT_BITS 32
#define BQ_MAX_PIECES 3

typedef struct {
    bq_weight qkv[BQ_MAX_PIECES];
    int64_t qkv_pieces;
    bq_weight o;
    bq_weight gate_up[BQ_MAX_PIECES];
    int64_t gate_up_pieces;
    bq_weight down;
    const float *input_norm;
    const float *post_norm;
} bq_llama_block;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, max_length, vocab;
    int64_t int8_activations; /* packed single-token products on int8-rounded x */
    float norm_eps;
    float attention_scale;
    const bq_llama_block *blocks;
    const float *final_norm;
    bq_weight head;
    const float *cos; /* max_length x head_dim */
    const float *sin; /* max_length x head_dim */
    float *keys;      /* layers x kv_heads x max_length x head_dim */
    float *values;
} bq_llama;

/* y = W x (+ bias) for a float32 weight: rows split over threads, 4 independent sums per row. */
static void gemv_float(const bq_weight *w, const float *x, float *y) {
    const float *weight = (const float *)w->codes;
    int64_t rows = w->rows, cols = w->cols;
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = weight + r * cols;
        int64_t c = 0;
        float total = 0.0f;
#if BQ_STEP_AVX2
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
        for (; c + 32 <= cols; c += 32) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(x + c), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c + 8), _mm256_loadu_ps(x + c + 8), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c + 16), _mm256_loadu_ps(x + c + 16), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c + 24), _mm256_loadu_ps(x + c + 24), acc3);
        }
        __m256 sum = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
        float lanes[8];
        _mm256_storeu_ps(lanes, sum);
        for (int i = 0; i < 8; ++i) total += lanes[i];
#endif
        for (; c < cols; ++c) total += row[c] * x[c];
        y[r] = total + (w->bias ? w->bias[r] : 0.0f);
    }
}

static int product(const bq_weight *w, const float *x, float *y, int int8) {
    if (w->bits == BQ_FLOAT_BITS) {
        gemv_float(w, x, y);
        return 0;
    }
    if (int8) return bq_gemv_i8_desc(w, x, y);
    return bq_matmul_desc(w, x, 1, y);
}

/* Outputs of the pieces side by side in y. */
static int pieces_product(const bq_weight *pieces, int64_t count, const float *x, float *y, int int8) {
    for (int64_t i = 0; i < count; ++i) {
        int code = product(&pieces[i], x, y, int8);
        if (code != 0) return code;
        y += pieces[i].rows;
    }
    return 0;
}

static void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
    float inv = 1.0f / sqrtf(sum / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

/* transformers' rotary: v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[half:], v[:half]). */
static void rotate(float *v, const float *cos, const float *sin, int64_t dim) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One query head over the cached keys/values 0..length-1 of its kv head. */
static void attend(const float *q, const float *keys, const float *values, int64_t length, int64_t dim, float scale,
                   float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t t = 0; t < length; ++t) {
        const float *k = keys + t * dim;
        float dot = 0.0f;
        for (int64_t i = 0; i < dim; ++i) dot += q[i] * k[i];
        scores[t] = dot * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0.0f;
    for (int64_t t = 0; t < length; ++t) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    memset(out, 0, (size_t)dim * sizeof(float));
    for (int64_t t = 0; t < length; ++t) {
        const float *v = values + t * dim;
        float p = scores[t] / total;
        for (int64_t i = 0; i < dim; ++i) out[i] += p * v[i];
    }
}

/*
 * Append one token at `position` (its embedding in x, hidden floats; overwritten) and write the
 * next-token logits (vocab floats). The KV cache rows 0..position-1 must hold the earlier tokens.
 * Returns 0, -1 on bad arguments, -2 without memory, or a kernel's error code.
 */
/* Whether the pieces are 1..BQ_MAX_PIECES matrices reading `cols` inputs and writing `rows` outputs in all. */
static int pieces_fit(const bq_weight *pieces, int64_t count, int64_t cols, int64_t rows) {
    if (count < 1 || count > BQ_MAX_PIECES) return 0;
    int64_t total = 0;
    for (int64_t i = 0; i < count; ++i) {
        if (pieces[i].cols != cols) return 0;
        total += pieces[i].rows;
    }
    return total == rows;
}

/* The descriptor's sizes agree with each other, so no product writes past its scratch buffer. */
static int valid(const bq_llama *m) {
    if (m->layers < 1 || m->hidden < 1 || m->heads < 1 || m->kv_heads < 1 || m->heads % m->kv_heads != 0 || m->head_dim < 2
        || m->head_dim % 2 != 0 || m->intermediate < 1 || m->vocab < 1)
        return 0;
    int64_t q_width = m->heads * m->head_dim, kv_width = m->kv_heads * m->head_dim;
    for (int64_t l = 0; l < m->layers; ++l) {
        const bq_llama_block *b = &m->blocks[l];
        if (!pieces_fit(b->qkv, b->qkv_pieces, m->hidden, q_width + 2 * kv_width) || !pieces_fit(&b->o, 1, q_width, m->hidden)
            || !pieces_fit(b->gate_up, b->gate_up_pieces, m->hidden, 2 * m->intermediate)
            || !pieces_fit(&b->down, 1, m->intermediate, m->hidden))
            return 0;
    }
    return pieces_fit(&m->head, 1, m->hidden, m->vocab);
}

BQ_EXPORT int bq_llama_step(const bq_llama *m, float *x, int64_t position, float *logits) {
    if (position < 0 || position >= m->max_length || !valid(m)) return -1;
    int64_t hd = m->head_dim, q_width = m->heads * hd, kv_width = m->kv_heads * hd;
    int64_t group = m->heads / m->kv_heads, length = position + 1;
    int int8 = m->int8_activations != 0;
    size_t floats = (size_t)(m->hidden * 2 + q_width + 2 * kv_width + q_width + 2 * m->intermediate + m->intermediate + length);
    float *scratch = (float *)malloc(floats * sizeof(float));
    if (!scratch) return -2;
    float *h = scratch, *delta = h + m->hidden, *qkv = delta + m->hidden, *attention = qkv + q_width + 2 * kv_width;
    float *gate_up = attention + q_width, *mixed = gate_up + 2 * m->intermediate, *scores = mixed + m->intermediate;
    const float *cos = m->cos + position * hd, *sin = m->sin + position * hd;
    int code = 0;
    for (int64_t l = 0; l < m->layers && code == 0; ++l) {
        const bq_llama_block *b = &m->blocks[l];
        rms_norm(x, b->input_norm, m->hidden, m->norm_eps, h);
        if ((code = pieces_product(b->qkv, b->qkv_pieces, h, qkv, int8)) != 0) break;
        float *q = qkv, *k = qkv + q_width, *v = k + kv_width;
        for (int64_t head = 0; head < m->heads; ++head) rotate(q + head * hd, cos, sin, hd);
        float *layer_keys = m->keys + l * m->kv_heads * m->max_length * hd;
        float *layer_values = m->values + l * m->kv_heads * m->max_length * hd;
        for (int64_t g = 0; g < m->kv_heads; ++g) {
            rotate(k + g * hd, cos, sin, hd);
            memcpy(layer_keys + (g * m->max_length + position) * hd, k + g * hd, (size_t)hd * sizeof(float));
            memcpy(layer_values + (g * m->max_length + position) * hd, v + g * hd, (size_t)hd * sizeof(float));
        }
        for (int64_t head = 0; head < m->heads; ++head) {
            int64_t g = head / group;
            attend(q + head * hd, layer_keys + g * m->max_length * hd, layer_values + g * m->max_length * hd, length, hd,
                   m->attention_scale, scores, attention + head * hd);
        }
        if ((code = product(&b->o, attention, delta, int8)) != 0) break;
        for (int64_t i = 0; i < m->hidden; ++i) x[i] += delta[i];
        rms_norm(x, b->post_norm, m->hidden, m->norm_eps, h);
        if ((code = pieces_product(b->gate_up, b->gate_up_pieces, h, gate_up, int8)) != 0) break;
        for (int64_t i = 0; i < m->intermediate; ++i) {
            float g = gate_up[i];
            mixed[i] = g / (1.0f + expf(-g)) * gate_up[m->intermediate + i];
        }
        if ((code = product(&b->down, mixed, delta, int8)) != 0) break;
        for (int64_t i = 0; i < m->hidden; ++i) x[i] += delta[i];
    }
    if (code == 0) {
        rms_norm(x, m->final_norm, m->hidden, m->norm_eps, h);
        code = product(&m->head, h, logits, int8);
    }
    free(scratch);
    return code;
}
