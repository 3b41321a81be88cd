/* Decode attention over the paged KV cache, on the CPU, in fp32: one query token per sequence.
 *
 * Why: torch's route gathers every sequence's key and value blocks into padded [B, L, ...]
 * copies in each layer (index_select) and then runs SDPA with a mask over the padding; at
 * decode sizes the copies and the calls cost more than the arithmetic (a 16-sequence step of
 * the default model: ~30 ms of its ~220). Here each sequence reads its own blocks in place
 * and only up to its own context length.
 *
 * Arguments (all contiguous):
 *   queries        float32 [B, H * D]: sequence b's query heads, head h at columns h * D
 *   key_cache      float32 [num_blocks, block_size, KVH, D]; value_cache the same
 *   block_tables   int64 [B, max_blocks]: sequence b's cache blocks in order (the ones its
 *                  context reaches must lie in 0 .. num_blocks - 1)
 *   context_lens   int64 [B]: keys 0 .. context_lens[b] - 1 are attended (>= 1, and at most
 *                  max_blocks * block_size)
 *   out            float32 [B, H * D], written whole
 * Query head h attends kv head h / (H / KVH) (grouped-query attention). scores = q.k * scale,
 * softmax in fp32 (the max subtracted first), out = sum_t p_t v_t. D must be a multiple of 16.
 */
#include <stdint.h>
#include <stdlib.h>

#include "native_vectors.h"

#define MAX_GROUP 16 /* query heads per kv head held at once */
#define MAX_HEAD_DIM 256

static inline v16f splat(float value) { return (v16f){0} + value; }

/* e^x for x <= 0, 16 lanes: 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2 by a degree-6
 * polynomial (relative error ~2e-7, as libm's expf within a couple of ulp). Lanes below -87
 * (where e^x leaves fp32's normal range) give 0. */
static inline v16f exp16(v16f x) {
    const v16f low = splat(-87.0f);
    v16i below = x < low;
    x = (v16f)(((v16i)x & ~below) | ((v16i)low & below));
    const v16f magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v16f n = (x * splat(1.44269504088896341f) + magic) - magic;
    v16f r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v16f p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v16i exponent = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16f result = p * (v16f)exponent;
    return (v16f)((v16i)result & ~below);
}

/* Returns 0, or -1 for arguments it cannot take (nothing written then). */
int inlaid_decode_attention(const float *queries, const float *key_cache, const float *value_cache,
                            const int64_t *block_tables, const int64_t *context_lens, int64_t batch, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, int64_t num_blocks, int64_t block_size,
                            int64_t max_blocks, float scale, float *out) {
    if (batch < 0 || kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP || head_dim % 16 ||
        head_dim > MAX_HEAD_DIM || block_size <= 0 || max_blocks <= 0)
        return -1;
    int64_t max_context = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (context_lens[b] < 1 || context_lens[b] > max_blocks * block_size) return -1;
        if (context_lens[b] > max_context) max_context = context_lens[b];
        for (int64_t i = 0; i < (context_lens[b] + block_size - 1) / block_size; i++)
            if (block_tables[b * max_blocks + i] < 0 || block_tables[b * max_blocks + i] >= num_blocks) return -1;
    }
    const int64_t group = heads / kv_heads, vectors = head_dim / 16;
    const int64_t token_stride = kv_heads * head_dim; /* floats between consecutive keys */
    float *scores = malloc(sizeof(float) * (size_t)(group * max_context + 16));
    if (scores == NULL) return -1;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t length = context_lens[b];
        const int64_t *table = block_tables + b * max_blocks;
        for (int64_t g = 0; g < kv_heads; g++) {
            const float *q = queries + (b * heads + g * group) * head_dim;
            /* scores[j * length + t] = q_j . k_t * scale, block by block (no division per key) */
            for (int64_t first = 0, block = 0; first < length; first += block_size, block++) {
                const int64_t count = length - first < block_size ? length - first : block_size;
                const float *k = key_cache + table[block] * block_size * token_stride + g * head_dim;
                for (int64_t t = first; t < first + count; t++, k += token_stride) {
                    for (int64_t j = 0; j < group; j++) {
                        const float *qj = q + j * head_dim;
                        v16f acc = load16(qj) * load16(k);
                        for (int64_t v = 1; v < vectors; v++) acc += load16(qj + 16 * v) * load16(k + 16 * v);
                        scores[j * length + t] = sum16(acc) * scale;
                    }
                }
            }
            for (int64_t j = 0; j < group; j++) {
                float *s = scores + j * length;
                float top = s[0];
                for (int64_t t = 1; t < length; t++) top = s[t] > top ? s[t] : top;
                v16f total = {0};
                int64_t t = 0;
                for (; t + 16 <= length; t += 16) {
                    v16f e = exp16(load16(s + t) - top);
                    store16(s + t, e);
                    total += e;
                }
                float sum = sum16(total);
                if (t < length) { /* the tail through a padded vector: lanes past it are not summed */
                    float tail[16] = {0};
                    for (int64_t i = t; i < length; i++) tail[i - t] = s[i] - top;
                    v16f e = exp16(load16(tail));
                    for (int64_t i = t; i < length; i++) {
                        s[i] = e[i - t];
                        sum += e[i - t];
                    }
                }
                const float inverse = 1.0f / sum;
                for (t = 0; t < length; t++) s[t] *= inverse;
            }
            /* out_j = sum_t p_jt v_t */
            v16f acc[MAX_GROUP][MAX_HEAD_DIM / 16];
            for (int64_t j = 0; j < group; j++)
                for (int64_t v = 0; v < vectors; v++) acc[j][v] = (v16f){0};
            for (int64_t first = 0, block = 0; first < length; first += block_size, block++) {
                const int64_t count = length - first < block_size ? length - first : block_size;
                const float *value = value_cache + table[block] * block_size * token_stride + g * head_dim;
                for (int64_t t = first; t < first + count; t++, value += token_stride) {
                    for (int64_t j = 0; j < group; j++) {
                        const float p = scores[j * length + t];
                        for (int64_t v = 0; v < vectors; v++) acc[j][v] += p * load16(value + 16 * v);
                    }
                }
            }
            for (int64_t j = 0; j < group; j++)
                for (int64_t v = 0; v < vectors; v++) store16(out + (b * heads + g * group + j) * head_dim + 16 * v, acc[j][v]);
        }
    }
    free(scores);
    return 0;
}
