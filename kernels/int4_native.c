/* y = x @ W for a 4-bit weight in torch's CPU int4pack layout, on the CPU, in fp32.
 *
 * Why: torch's int4 CPU kernel dequantizes each weight tile again for every 4 rows of x, so
 * its time grows linearly with M (docs/kernels.md, "int4 vs bf16 by batch"). This kernel
 * dequantizes a slab of the weight ONCE per call into a small fp32 scratch (64 columns x
 * K_CHUNK rows: 32 KiB, stays in L1) and multiplies every row of x against it, ROWS rows at
 * a time with the accumulators in registers. Up to FUSED_ROWS rows of x, each weight row is
 * dequantized in registers and used at once instead (no scratch).
 *
 * Arguments (all contiguous, row-major):
 *   x       float32 [M, K]         activations (K = the layout's padded K)
 *   packed  uint8   [N / 64, K, 32] int4pack bytes: in each block of 64 output columns,
 *                                   byte [k, j] holds column j's code in its low nibble and
 *                                   column j + 32's in its high one
 *   scales_and_zeros  uint16 (bf16 bits) [K / group, N, 2]: w[k, n] = (q - 8) * scale + zero,
 *                                   scale/zero of group k / group
 *   y       float32 [M, N]         written whole (never read before it is written)
 *   group   rows of K per scale group (divides K)
 *   threads column blocks are split between this many threads (1: the caller's only)
 * Needs N % 64 == 0. Plain C with GCC vector extensions: the compiler maps a 16-float vector
 * onto whatever the CPU it is built on has (-march=native; one zmm on AVX-512).
 */
#include <stdint.h>
#include <string.h>

#include "native_bf16.h"
#include "native_threads.h"

typedef uint8_t v16b __attribute__((vector_size(16)));

#define BLOCK_N 64
#define K_CHUNK 128 /* 128 x 64 floats = 32 KiB of scratch: stays in L1 */
#define ROWS 6 /* 6 rows x 4 vectors = 24 accumulators: fits 32 vector registers */
#define PREFETCH_BYTES (K_CHUNK * BLOCK_N / 2) /* one slab ahead */
#define FUSED_ROWS 4 /* up to this many rows of x: dequantize in registers (measured: from 6 rows the slab wins) */

/* Rows [k0, k0 + rows) of column block `block`, dequantized into w [rows, 64]. The scales and
 * zeros of the current group live in registers (in memory, their loads stall behind the stores
 * into w that alias them modulo 4 KiB). */
static void dequantize_slab(const uint8_t *packed, const uint16_t *scales_and_zeros, int64_t k_total, int64_t n_total,
                            int64_t group, int64_t block, int64_t k0, int64_t rows, float *w) {
    v16f scale[4], zero[4];
    const uint8_t *bytes = packed + (block * k_total + k0) * (BLOCK_N / 2);
    for (int64_t k = 0; k < rows;) {
        int64_t g = (k0 + k) / group;
        const uint16_t *pairs = scales_and_zeros + (g * n_total + block * BLOCK_N) * 2;
        for (int c = 0; c < 4; c++) {
            scale[c] = bf16_every_other(pairs + 32 * c);
            zero[c] = bf16_every_other(pairs + 32 * c + 1) - 8.0f * scale[c]; /* folds the -8 of (q - 8) */
        }
        int64_t group_end = (g + 1) * group - k0;
        if (group_end > rows) group_end = rows;
        for (; k < group_end; k++, bytes += BLOCK_N / 2) {
            /* The packed bytes are one sequential stream; while the slab is multiplied no load
             * touches it, so the hardware prefetcher idles: fetch the next slab's bytes now. */
            __builtin_prefetch(bytes + PREFETCH_BYTES);
            float *row = w + k * BLOCK_N;
            v16b raw0, raw1;
            memcpy(&raw0, bytes, sizeof raw0);
            memcpy(&raw1, bytes + 16, sizeof raw1);
            /* low nibbles: columns 0..31, high nibbles: 32..63 */
            v16f q0 = __builtin_convertvector(__builtin_convertvector(raw0 & 15, v16i), v16f);
            v16f q1 = __builtin_convertvector(__builtin_convertvector(raw1 & 15, v16i), v16f);
            v16f q2 = __builtin_convertvector(__builtin_convertvector(raw0 >> 4, v16i), v16f);
            v16f q3 = __builtin_convertvector(__builtin_convertvector(raw1 >> 4, v16i), v16f);
            store16(row, q0 * scale[0] + zero[0]);
            store16(row + 16, q1 * scale[1] + zero[1]);
            store16(row + 32, q2 * scale[2] + zero[2]);
            store16(row + 48, q3 * scale[3] + zero[3]);
        }
    }
}

/* acc[r][0:4] += x[r, k] * (w0, w1, w2, w3) for r < ROW_COUNT: one weight row (64 columns, four
 * vectors) into every row's accumulators; a macro, so the accumulators stay in registers. */
#define ACCUMULATE_ROWS(ROW_COUNT, acc, x, x_stride, k, w0, w1, w2, w3) \
    for (int r = 0; r < (ROW_COUNT); r++) {                             \
        float xs = (x)[r * (x_stride) + (k)];                           \
        (acc)[r][0] += xs * (w0);                                       \
        (acc)[r][1] += xs * (w1);                                       \
        (acc)[r][2] += xs * (w2);                                       \
        (acc)[r][3] += xs * (w3);                                       \
    }

/* y[r, 0:64] (+)= x[r, 0:rows_k] @ w[0:rows_k, 0:64] for r < ROW_COUNT. */
#define DEFINE_MICRO(ROW_COUNT)                                                                                   \
    static void micro_##ROW_COUNT(const float *x, int64_t x_stride, const float *w, int64_t rows_k, float *y,      \
                                  int64_t y_stride, int accumulate) {                                             \
        v16f acc[ROW_COUNT][4];                                                                                   \
        for (int r = 0; r < ROW_COUNT; r++)                                                                       \
            for (int c = 0; c < 4; c++)                                                                           \
                acc[r][c] = accumulate ? load16(y + r * y_stride + 16 * c) : (v16f){0};                           \
        for (int64_t k = 0; k < rows_k; k++) {                                                                    \
            const float *w_row = w + k * BLOCK_N;                                                                 \
            v16f w0 = load16(w_row), w1 = load16(w_row + 16), w2 = load16(w_row + 32), w3 = load16(w_row + 48);   \
            ACCUMULATE_ROWS(ROW_COUNT, acc, x, x_stride, k, w0, w1, w2, w3);                                      \
        }                                                                                                         \
        for (int r = 0; r < ROW_COUNT; r++)                                                                       \
            for (int c = 0; c < 4; c++) store16(y + r * y_stride + 16 * c, acc[r][c]);                            \
    }

DEFINE_MICRO(1)
DEFINE_MICRO(2)
DEFINE_MICRO(3)
DEFINE_MICRO(4)
DEFINE_MICRO(5)
DEFINE_MICRO(6)

/* The 64 scales and zeros (the -8 of q - 8 folded into the zero) of one group of a block. */
static void load_group(const uint16_t *pairs, float *scale, float *zero) {
    for (int j = 0; j < BLOCK_N; j++) {
        scale[j] = bf16_to_float(pairs[2 * j]);
        zero[j] = bf16_to_float(pairs[2 * j + 1]) - 8.0f * scale[j];
    }
}

/* Few rows: y[r, block's 64 columns] = x[r, :] @ W for r < ROW_COUNT, each weight row
 * dequantized in registers and used at once (no scratch: with so few rows, storing and
 * reloading the slab would cost more than the multiplies). */
#define DEFINE_FUSED(ROW_COUNT)                                                                                   \
    static void fused_##ROW_COUNT(const float *x, int64_t x_stride, const uint8_t *packed,                        \
                                  const uint16_t *scales_and_zeros, int64_t k_total, int64_t n_total,             \
                                  int64_t group, int64_t block, float *y, int64_t y_stride) {                     \
        v16f acc[ROW_COUNT][4];                                                                                   \
        for (int r = 0; r < ROW_COUNT; r++)                                                                       \
            for (int c = 0; c < 4; c++) acc[r][c] = (v16f){0};                                                    \
        float scale[BLOCK_N] __attribute__((aligned(64))), zero[BLOCK_N] __attribute__((aligned(64)));            \
        const uint8_t *bytes = packed + block * k_total * (BLOCK_N / 2);                                          \
        for (int64_t k = 0; k < k_total;) {                                                                       \
            load_group(scales_and_zeros + ((k / group) * n_total + block * BLOCK_N) * 2, scale, zero);           \
            for (int64_t group_end = k + group; k < group_end; k++, bytes += BLOCK_N / 2) {                       \
                __builtin_prefetch(bytes + PREFETCH_BYTES);                                                       \
                v16b raw0, raw1;                                                                                  \
                memcpy(&raw0, bytes, sizeof raw0);                                                                \
                memcpy(&raw1, bytes + 16, sizeof raw1);                                                           \
                v16f w0 = __builtin_convertvector(__builtin_convertvector(raw0 & 15, v16i), v16f) *               \
                              load16(scale) + load16(zero);                                                       \
                v16f w1 = __builtin_convertvector(__builtin_convertvector(raw1 & 15, v16i), v16f) *               \
                              load16(scale + 16) + load16(zero + 16);                                             \
                v16f w2 = __builtin_convertvector(__builtin_convertvector(raw0 >> 4, v16i), v16f) *               \
                              load16(scale + 32) + load16(zero + 32);                                             \
                v16f w3 = __builtin_convertvector(__builtin_convertvector(raw1 >> 4, v16i), v16f) *               \
                              load16(scale + 48) + load16(zero + 48);                                             \
                ACCUMULATE_ROWS(ROW_COUNT, acc, x, x_stride, k, w0, w1, w2, w3);                                  \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < ROW_COUNT; r++)                                                                       \
            for (int c = 0; c < 4; c++) store16(y + r * y_stride + 16 * c, acc[r][c]);                            \
    }

DEFINE_FUSED(1)
DEFINE_FUSED(2)
DEFINE_FUSED(3)
DEFINE_FUSED(4)

typedef void (*fused_fn)(const float *, int64_t, const uint8_t *, const uint16_t *, int64_t, int64_t, int64_t, int64_t,
                         float *, int64_t);
static const fused_fn FUSED[FUSED_ROWS + 1] = {0, fused_1, fused_2, fused_3, fused_4};

typedef void (*micro_fn)(const float *, int64_t, const float *, int64_t, float *, int64_t, int);
static const micro_fn MICRO[ROWS + 1] = {0, micro_1, micro_2, micro_3, micro_4, micro_5, micro_6};

typedef struct {
    const float *x;
    const uint8_t *packed;
    const uint16_t *scales_and_zeros;
    float *y;
    int64_t m, k, n, group, first_block, end_block;
} Work;

static void *run_blocks(void *arg) {
    const Work *work = (const Work *)arg;
    float w[K_CHUNK * BLOCK_N] __attribute__((aligned(64)));
    for (int64_t block = work->first_block; block < work->end_block; block++) {
        if (work->m <= FUSED_ROWS) {
            FUSED[work->m](work->x, work->k, work->packed, work->scales_and_zeros, work->k, work->n, work->group, block,
                           work->y + block * BLOCK_N, work->n);
            continue;
        }
        for (int64_t k0 = 0; k0 < work->k; k0 += K_CHUNK) {
            int64_t rows_k = work->k - k0 < K_CHUNK ? work->k - k0 : K_CHUNK;
            dequantize_slab(work->packed, work->scales_and_zeros, work->k, work->n, work->group, block, k0, rows_k, w);
            for (int64_t m0 = 0; m0 < work->m; m0 += ROWS) {
                int64_t rows_m = work->m - m0 < ROWS ? work->m - m0 : ROWS;
                MICRO[rows_m](work->x + m0 * work->k + k0, work->k, w, rows_k, work->y + m0 * work->n + block * BLOCK_N,
                              work->n, k0 > 0);
            }
        }
    }
    return 0;
}

/* Returns 0, or -1 for arguments it cannot take (nothing written then). */
int inlaid_int4pack_mm(const float *x, const uint8_t *packed, const uint16_t *scales_and_zeros, float *y, int64_t m,
                       int64_t k, int64_t n, int64_t group, int64_t threads) {
    if (m < 1 || k < 1 || n < BLOCK_N || n % BLOCK_N || group < 1 || k % group) return -1;
    int64_t blocks = n / BLOCK_N;
    threads = thread_count(threads, blocks);
    Work work[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++) {
        work[t] = (Work){x, packed, scales_and_zeros, y, m, k, n, group, blocks * t / threads, blocks * (t + 1) / threads};
    }
    run_on_threads(run_blocks, work, sizeof work[0], threads);
    return 0;
}

typedef uint16_t v16h __attribute__((vector_size(32)));

/* 16 floats rounded to bf16 (to nearest, ties to even), as their bit patterns. */
static inline v16h to_bf16(v16f value) { return __builtin_convertvector(bf16_bits(value), v16h); }

/* The whole weight dequantized to bf16 for the many-rows route (a bf16 GEMM on it):
 *   out  uint16 (bf16 bits) [K, N] row-major: out[k, n] = bf16((q - 8) * scale + zero), the
 *        product and sum in fp32 (exact product, one rounding of the sum, then one to bf16:
 *        what torch's addcmul on these bf16 tensors computes)
 * Returns 0, or -1 for arguments it cannot take. */
int inlaid_int4pack_dequant_bf16(const uint8_t *packed, const uint16_t *scales_and_zeros, uint16_t *out, int64_t k,
                                 int64_t n, int64_t group) {
    if (k < 1 || n < BLOCK_N || n % BLOCK_N || group < 1 || k % group) return -1;
    for (int64_t block = 0; block < n / BLOCK_N; block++) {
        const uint8_t *bytes = packed + block * k * (BLOCK_N / 2);
        for (int64_t k0 = 0; k0 < k; k0 += group) {
            const uint16_t *pairs = scales_and_zeros + ((k0 / group) * n + block * BLOCK_N) * 2;
            v16f scale[4], zero[4];
            for (int c = 0; c < 4; c++) {
                scale[c] = bf16_every_other(pairs + 32 * c);
                zero[c] = bf16_every_other(pairs + 32 * c + 1);
            }
            for (int64_t kk = k0; kk < k0 + group; kk++, bytes += BLOCK_N / 2) {
                v16b raw0, raw1;
                memcpy(&raw0, bytes, sizeof raw0);
                memcpy(&raw1, bytes + 16, sizeof raw1);
                v16f q[4] = {
                    __builtin_convertvector(__builtin_convertvector(raw0 & 15, v16i) - 8, v16f),
                    __builtin_convertvector(__builtin_convertvector(raw1 & 15, v16i) - 8, v16f),
                    __builtin_convertvector(__builtin_convertvector(raw0 >> 4, v16i) - 8, v16f),
                    __builtin_convertvector(__builtin_convertvector(raw1 >> 4, v16i) - 8, v16f),
                };
                uint16_t *row = out + kk * n + block * BLOCK_N;
                for (int c = 0; c < 4; c++) {
                    v16f product = q[c] * scale[c]; /* exact: a 4-bit integer times a bf16 */
                    v16h bf16 = to_bf16(product + zero[c]);
                    memcpy(row + 16 * c, &bf16, sizeof bf16);
                }
            }
        }
    }
    return 0;
}
