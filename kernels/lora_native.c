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
 * Every rank must be <= R <= 256.
 */
#include <stdint.h>

#include "native_vectors.h"

#define MAX_RANK 256

static inline float sum16(v16f v) {
    float total = 0.0f;
    for (int i = 0; i < 16; i++) total += v[i];
    return total;
}

/* dot(a, b) over n floats: four vector accumulators, then the tail. */
static float dot(const float *a, const float *b, int64_t n) {
    v16f acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
    int64_t k = 0;
    for (; k + 64 <= n; k += 64) {
        acc0 += load16(a + k) * load16(b + k);
        acc1 += load16(a + k + 16) * load16(b + k + 16);
        acc2 += load16(a + k + 32) * load16(b + k + 32);
        acc3 += load16(a + k + 48) * load16(b + k + 48);
    }
    for (; k + 16 <= n; k += 16) acc0 += load16(a + k) * load16(b + k);
    float total = sum16((acc0 + acc1) + (acc2 + acc3));
    for (; k < n; k++) total += a[k] * b[k];
    return total;
}

/* y[0:n] += sum_j v[j] * b[j * n : j * n + n] for j < rank, 16 columns at a time. */
static void expand(float *y, const float *v, const float *b, int64_t rank, int64_t n) {
    int64_t column = 0;
    for (; column + 16 <= n; column += 16) {
        v16f acc = load16(y + column);
        for (int64_t j = 0; j < rank; j++) acc += v[j] * load16(b + j * n + column);
        store16(y + column, acc);
    }
    for (; column < n; column++) {
        float acc = y[column];
        for (int64_t j = 0; j < rank; j++) acc += v[j] * b[j * n + column];
        y[column] = acc;
    }
}

/* Returns 0, or -1 for arguments it cannot take (nothing written then). */
int inlaid_lora_apply(const float *x, int64_t tokens, int64_t k, const int64_t *token_slots, const float *stacked_a,
                      const float *const *b_pools, const int64_t *widths, const int64_t *offsets, const int32_t *ranks,
                      const float *scales, int64_t slots, int64_t slices, int64_t max_rank, float *y,
                      int64_t y_stride) {
    if (max_rank < 1 || max_rank > MAX_RANK || slices < 1 || slots < 1 || k < 1) return -1;
    for (int64_t i = 0; i < slices * slots; i++)
        if (ranks[i] < 0 || ranks[i] > max_rank) return -1;
    for (int64_t t = 0; t < tokens; t++)
        if (token_slots[t] < -1 || token_slots[t] >= slots) return -1;
    float v[MAX_RANK];
    for (int64_t t = 0; t < tokens; t++) {
        int64_t slot = token_slots[t];
        if (slot < 0) continue;
        const float *x_row = x + t * k;
        for (int64_t i = 0; i < slices; i++) {
            int64_t rank = ranks[i * slots + slot];
            if (rank == 0) continue;
            float scale = scales[i * slots + slot];
            const float *a = stacked_a + (slot * slices * max_rank + i * max_rank) * k;
            for (int64_t j = 0; j < rank; j++) v[j] = scale * dot(x_row, a + j * k, k);
            expand(y + t * y_stride + offsets[i], v, b_pools[i] + slot * max_rank * widths[i], rank, widths[i]);
        }
    }
    return 0;
}
