/* y = x @ W for few rows of x (decode steps, short prompt chunks) and a 4-bit weight in torch's
 * CPU int4pack layout, with AVX512-BF16 dot products on the codes themselves.
 *
 * Why: the fp32 kernel (int4_native.c) is bound by its multiply-adds from ~4 rows of x: a
 * decode step of 8 sequences spends ~26 ms of its ~60 there on the project's AMD VM. Here the
 * weight is never dequantized: q - 8 is a small integer, exact in bf16, so a 16-entry table
 * turns each code into its bf16 bits (vpermw) and vdpbf16ps multiplies two codes by two values
 * of x in each lane, 32 products an instruction against an fp32 FMA's 16, with no per-weight
 * scale or zero. Those come in once per group:
 *     y[n] = sum_g ( scale[g, n] * sum_{k in g} x[k] (q[k, n] - 8)  +  zero[g, n] * sum_{k in g} x[k] )
 * x is rounded to bf16 here (to nearest even; the only operand rounded: the weight's value
 * (q - 8) * scale + zero is used exactly, where the bf16 route rounds it to bf16); the
 * products are exact and every sum is fp32, in a fixed order per row, so a row's result does
 * not depend on the other rows of the call.
 *
 * Arguments (all contiguous, row-major):
 *   x       float32 [M, K]              activations (K = the layout's padded K)
 *   packed  uint8 [N / 64, K, 32]       int4pack bytes: in each block of 64 output columns,
 *                                       byte [k, j] holds column j's code in its low nibble and
 *                                       column j + 32's in its high one
 *   scales_and_zeros  uint16 (bf16 bits) [K / group, N, 2]: w[k, n] = (q - 8) * scale + zero
 *   y       float32 [M, N]              written whole (never read before it is written)
 *   group   rows of K per scale group: even, dividing K
 *   threads column blocks are split between this many threads (1: the caller's only)
 * Needs N % 64 == 0 and AVX512-BF16 (with BW); built elsewhere, the entry returns -2. Per column
 * block: two halves of 32 columns (bytes 0-15 of a weight row: columns 0-15 from the low
 * nibbles and 32-47 from the high ones; bytes 16-31: 16-31 and 48-63), ROWS rows of x at a
 * time, each group's partial sums in registers and the running totals in y. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_bf16.h"
#include "native_threads.h"

#define BLOCK_N 64
#define ROWS 8 /* rows of x per pass: 8 x 2 partial sums + 4 table/weight vectors < 32 zmm */
typedef uint16_t v16h __attribute__((vector_size(32)));

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>

int inlaid_int4_dot_available(void) { return 1; }

/* bf16 bits of c - 8 for the codes c = 0..15 (entries 16..31 are never indexed). */
static inline __m512i code_table(void) {
    static const uint16_t bits[32] = {0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
                                      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
    return _mm512_loadu_si512(bits);
}

/* y[r, the half's 32 columns] for r < ROW_COUNT: column j of the half is 16 * half + j (j < 16)
 * or 32 + 16 * half + j - 16; `partial` holds sum_{k in g} x (q - 8) per row and 16 columns. */
static inline __attribute__((always_inline)) void dot_half(const int row_count, const uint16_t *x, int64_t k_total,
                                                           const uint8_t *bytes, const uint16_t *scales_and_zeros,
                                                           int64_t n_total, int64_t group, int64_t first_column,
                                                           const float *x_group_sums, int64_t groups, float *y) {
    const __m512i table = code_table(), low_nibble = _mm512_set1_epi16(15);
    for (int64_t g = 0; g < groups; g++) {
        __m512 partial[ROWS][2];
        for (int r = 0; r < row_count; r++) partial[r][0] = partial[r][1] = _mm512_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
            /* rows k and k + 1 of the half's 16 bytes, interleaved byte by byte: lane pairs
             * (k, k + 1) per column, as vdpbf16ps pairs them */
            __m128i even = _mm_loadu_si128((const __m128i *)(bytes + k * (BLOCK_N / 2)));
            __m128i odd = _mm_loadu_si128((const __m128i *)(bytes + (k + 1) * (BLOCK_N / 2)));
            __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(even, odd), _mm_unpacklo_epi8(even, odd));
            __m512i words = _mm512_cvtepu8_epi16(pairs);
            __m512bh w_low = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(words, low_nibble), table);
            __m512bh w_high = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
            for (int r = 0; r < row_count; r++) {
                uint32_t x_pair;
                memcpy(&x_pair, x + r * k_total + k, sizeof x_pair);
                __m512bh x_both = (__m512bh)_mm512_set1_epi32((int)x_pair);
                partial[r][0] = _mm512_dpbf16_ps(partial[r][0], x_both, w_low);
                partial[r][1] = _mm512_dpbf16_ps(partial[r][1], x_both, w_high);
            }
        }
        const uint16_t *group_pairs = scales_and_zeros + (g * n_total + first_column) * 2;
        v16f scale_low = bf16_every_other(group_pairs), zero_low = bf16_every_other(group_pairs + 1);
        v16f scale_high = bf16_every_other(group_pairs + 64), zero_high = bf16_every_other(group_pairs + 65);
        for (int r = 0; r < row_count; r++) {
            float x_sum = x_group_sums[r * groups + g];
            float *y_low = y + r * n_total + first_column, *y_high = y_low + 32;
            v16f low = (v16f)partial[r][0] * scale_low + zero_low * x_sum;
            v16f high = (v16f)partial[r][1] * scale_high + zero_high * x_sum;
            if (g > 0) {
                low += load16(y_low);
                high += load16(y_high);
            }
            store16(y_low, low);
            store16(y_high, high);
        }
    }
}

typedef struct {
    const uint16_t *x;
    const uint8_t *packed;
    const uint16_t *scales_and_zeros;
    const float *x_group_sums; /* [M, K / group] */
    float *y;
    int64_t m, k, n, group, first_block, end_block;
} Work;

static void *run_blocks(void *arg) {
    const Work *work = (const Work *)arg;
    const int64_t groups = work->k / work->group;
    for (int64_t block = work->first_block; block < work->end_block; block++) {
        for (int half = 0; half < 2; half++) {
            const uint8_t *bytes = work->packed + block * work->k * (BLOCK_N / 2) + 16 * half;
            const int64_t first_column = block * BLOCK_N + 16 * half;
            for (int64_t m0 = 0; m0 < work->m; m0 += ROWS) {
                const uint16_t *x = work->x + m0 * work->k;
                const float *sums = work->x_group_sums + m0 * groups;
                float *y = work->y + m0 * work->n;
                switch (work->m - m0 < ROWS ? work->m - m0 : ROWS) {
#define CASE(R)                                                                                                 \
    case R:                                                                                                     \
        dot_half(R, x, work->k, bytes, work->scales_and_zeros, work->n, work->group, first_column, sums, groups, \
                 y);                                                                                            \
        break;
                CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
                }
            }
        }
    }
    return 0;
}

/* Returns 0, -1 for arguments it cannot take, -3 when no scratch could be had (nothing
 * written then). */
int inlaid_int4pack_mm_dot(const float *x, const uint8_t *packed, const uint16_t *scales_and_zeros, float *y,
                           int64_t m, int64_t k, int64_t n, int64_t group, int64_t threads) {
    if (m < 1 || k < 2 || n < BLOCK_N || n % BLOCK_N || group < 2 || group % 2 || k % group) return -1;
    const int64_t groups = k / group, blocks = n / BLOCK_N;
    /* x in bf16, then per row and group sum_{k in g} x[k] in fp32, in order (the zero's factor) */
    uint16_t *x_bf16 = malloc((size_t)(m * k) * sizeof *x_bf16);
    float *x_group_sums = malloc((size_t)(m * groups) * sizeof *x_group_sums);
    if (!x_bf16 || !x_group_sums) {
        free(x_bf16);
        free(x_group_sums);
        return -3;
    }
    int64_t i = 0;
    for (; i + 16 <= m * k; i += 16) {
        v16h bits = __builtin_convertvector(bf16_bits(load16(x + i)), v16h);
        memcpy(x_bf16 + i, &bits, sizeof bits);
    }
    for (; i < m * k; i++) {
        uint32_t word;
        memcpy(&word, x + i, sizeof word);
        x_bf16[i] = (uint16_t)((word + 0x7FFF + ((word >> 16) & 1)) >> 16); /* as bf16_bits, one lane */
    }
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0.0f;
            for (int64_t kk = g * group; kk < (g + 1) * group; kk++) sum += bf16_to_float(x_bf16[r * k + kk]);
            x_group_sums[r * groups + g] = sum;
        }
    threads = thread_count(threads, blocks);
    Work work[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++)
        work[t] = (Work){x_bf16, packed, scales_and_zeros, x_group_sums, y, m, k, n, group,
                         blocks * t / threads, blocks * (t + 1) / threads};
    run_on_threads(run_blocks, work, sizeof work[0], threads);
    free(x_bf16);
    free(x_group_sums);
    return 0;
}

#else /* no AVX512-BF16 in this build */

int inlaid_int4_dot_available(void) { return 0; }

int inlaid_int4pack_mm_dot(const float *x, const uint8_t *packed, const uint16_t *scales_and_zeros, float *y,
                           int64_t m, int64_t k, int64_t n, int64_t group, int64_t threads) {
    (void)x, (void)packed, (void)scales_and_zeros, (void)y, (void)m, (void)k, (void)n, (void)group, (void)threads;
    return -2;
}

#endif
