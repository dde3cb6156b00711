/*
 * The weight descriptor shared by lowbit.c (the kernels) and llama_step.c (a decode step on them).
 * Field order is mirrored by quantizers/kernels/build.py:WeightDescriptor.
 */
#ifndef BITALLOC_LOWBIT_H
#define BITALLOC_LOWBIT_H

#include <stdint.h>

/* A weight described once, so a per-token call from Python converts 4 arguments instead of 10
 * (ctypes spends ~0.3 us per argument, comparable to a small GEMV). */
typedef struct {
    const uint8_t *codes;
    const uint16_t *params;
    const float *bias;
    int64_t rows;
    int64_t cols;
    int64_t group_size;
    int64_t bits;
    /* optional, 1-bit weights with rows % 32 == 0: the same codes and (scale, zero) pairs as LUT tiles
     * (lowbit.c), which the int8 GEMV then uses; NULL otherwise */
    const uint8_t *lut_codes;
    const uint16_t *lut_params;
} bq_weight;

int bq_matmul_desc(const bq_weight *w, const float *x, int64_t batch, float *y);
int bq_gemv_i8_desc(const bq_weight *w, const float *x, float *y);

#endif
