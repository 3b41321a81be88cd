/* y += LoRA(x) for one (possibly fused) projection, each token through its own adapter slot,
 * on the CPU, in fp32.
 *
 * Why: torch's routes either multiply every token against every slot in use and mask the
 * result (work grows with the number of distinct adapters) or issue a matmul pair per
 * adapter and slice (a few hundred small calls a step). Here each token is shrunk and
 * expanded against its own slot only, at the slot's real rank, in one call per projection.
 *
 * Arguments:
 *   x           float32 [T, K] contiguous
 *   token_slots int64 [T]: each token's slot, -1 = no adapter
 *   stacked_a   float32 [S, n_slices * R, K] contiguous: slice i's A of slot s is rows
 *               [i * R, i * R + rank) of stacked_a[s]
 *   b_pools     n_slices pointers, each float32 [S, R, N_i] contiguous (B transposed: row j
 *               of slot s is B[:, j])
 *   widths      int64 [n_slices]: N_i;  offsets int64 [n_slices]: slice i's first column in y
 *   ranks       int32 [n_slices, S];  scales float32 [n_slices, S]
 *   y           float32 [T, y_stride]: slice i's columns are offsets[i] .. + N_i
 *   half_a, half_b, slot_half: float16 copies of the pools (same shapes, uint16 bits) and a
 *               uint8 [S] flag per slot, or all three NULL. A token whose slot's flag is set
 *               reads its A and B from the copies: an adapter stored in float16 holds the same
 *               values there at half the bytes, and a decode step's LoRA work is bound by
 *               reading every distinct adapter once. Widened to float32 in registers, the sums
 *               are the same, in the same order, bit for bit.
 * Every rank must be <= R <= 256.
 */
#include <stdint.h>
#include <string.h>

#include "native_vectors.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_RANK 256

static inline float half_to_float(uint16_t bits) {
    _Float16 value;
    memcpy(&value, &bits, sizeof value);
    return (float)value;
}

/* 16 float16 values (bits) widened to floats: one vcvtph2ps where the CPU has AVX-512. */
static inline v16f load16h(const uint16_t *p) {
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    float values[16];
    for (int i = 0; i < 16; i++) values[i] = half_to_float(p[i]);
    return load16(values);
#endif
}

static inline float load1(const float *p) { return *p; }
static inline float load1h(const uint16_t *p) { return half_to_float(*p); }

/* Whether the float16 copies are worth reading here: 1 where the widening is one instruction
 * per 16 values (AVX-512), 0 where it is a scalar loop slower than reading float32. */
int inlaid_lora_half_fast(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* dot(a, b) over n values and y[0:n] += sum_j v[j] * b[j * n : j * n + n] for j < rank, for
 * pools of element type T read through LOAD16 / LOAD1: one definition for both pool types, so
 * the float16 copies are summed exactly as the float32 pools are. The scalar tails spell their
 * fused multiply-add out: left to itself the compiler contracted them in one instantiation
 * and not in the other, and the two must agree bit for bit. */
#define DEFINE_POOL_LOOPS(SUFFIX, T, LOAD16, LOAD1)                                                 \
    static float dot##SUFFIX(const float *a, const T *b, int64_t n) {                               \
        v16f acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};                                        \
        int64_t k = 0;                                                                              \
        for (; k + 64 <= n; k += 64) {                                                              \
            acc0 += load16(a + k) * LOAD16(b + k);                                                  \
            acc1 += load16(a + k + 16) * LOAD16(b + k + 16);                                        \
            acc2 += load16(a + k + 32) * LOAD16(b + k + 32);                                        \
            acc3 += load16(a + k + 48) * LOAD16(b + k + 48);                                        \
        }                                                                                           \
        for (; k + 16 <= n; k += 16) acc0 += load16(a + k) * LOAD16(b + k);                         \
        float total = sum16((acc0 + acc1) + (acc2 + acc3));                                         \
        for (; k < n; k++) total = __builtin_fmaf(a[k], LOAD1(b + k), total);                       \
        return total;                                                                               \
    }                                                                                               \
    static void expand##SUFFIX(float *y, const float *v, const T *b, int64_t rank, int64_t n) {     \
        int64_t column = 0;                                                                         \
        for (; column + 16 <= n; column += 16) {                                                    \
            v16f acc = load16(y + column);                                                          \
            for (int64_t j = 0; j < rank; j++)                                                      \
                acc += v[j] * LOAD16(b + j * n + column);                                           \
            store16(y + column, acc);                                                               \
        }                                                                                           \
        for (; column < n; column++) {                                                              \
            float acc = y[column];                                                                  \
            for (int64_t j = 0; j < rank; j++) acc = __builtin_fmaf(v[j], LOAD1(b + j * n + column), acc); \
            y[column] = acc;                                                                        \
        }                                                                                           \
    }

DEFINE_POOL_LOOPS(, float, load16, load1)
DEFINE_POOL_LOOPS(_half, uint16_t, load16h, load1h)

/* Returns 0, or -1 for arguments it cannot take (nothing written then). */
int inlaid_lora_apply(const float *x, int64_t tokens, int64_t k, const int64_t *token_slots, const float *stacked_a,
                      const float *const *b_pools, const int64_t *widths, const int64_t *offsets, const int32_t *ranks,
                      const float *scales, int64_t slots, int64_t slices, int64_t max_rank, float *y,
                      int64_t y_stride, const uint16_t *half_a, const uint16_t *const *half_b,
                      const uint8_t *slot_half) {
    if (max_rank < 1 || max_rank > MAX_RANK || slices < 1 || slots < 1 || k < 1) return -1;
    if ((slot_half != NULL) != (half_a != NULL) || (slot_half != NULL) != (half_b != NULL)) return -1;
    for (int64_t i = 0; i < slices * slots; i++)
        if (ranks[i] < 0 || ranks[i] > max_rank) return -1;
    for (int64_t t = 0; t < tokens; t++)
        if (token_slots[t] < -1 || token_slots[t] >= slots) return -1;
    float v[MAX_RANK];
    for (int64_t t = 0; t < tokens; t++) {
        int64_t slot = token_slots[t];
        if (slot < 0) continue;
        const float *x_row = x + t * k;
        int half = slot_half != NULL && slot_half[slot];
        for (int64_t i = 0; i < slices; i++) {
            int64_t rank = ranks[i * slots + slot];
            if (rank == 0) continue;
            float scale = scales[i * slots + slot];
            int64_t a_start = (slot * slices * max_rank + i * max_rank) * k, b_start = slot * max_rank * widths[i];
            float *y_row = y + t * y_stride + offsets[i];
            if (half) {
                for (int64_t j = 0; j < rank; j++) v[j] = scale * dot_half(x_row, half_a + a_start + j * k, k);
                expand_half(y_row, v, half_b[i] + b_start, rank, widths[i]);
            } else {
                for (int64_t j = 0; j < rank; j++) v[j] = scale * dot(x_row, stacked_a + a_start + j * k, k);
                expand(y_row, v, b_pools[i] + b_start, rank, widths[i]);
            }
        }
    }
    return 0;
}
