/* y = x @ W for prompt rows and a 4-bit weight in torch's CPU int4pack layout, in bf16 with
 * fp32 sums, on one of two instruction sets: Intel AMX tiles (Sapphire Rapids and later) or
 * AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake).
 *
 * Why: the fp32 kernel (int4_native.c) is compute-bound on prompt rows (~80 GFLOP/s on one
 * core), and the dequantize + oneDNN bf16 route writes the whole bf16 weight to memory on every
 * call (~0.5 ns a weight), so it only wins from ~128 rows. Here each block of 64 output columns
 * is dequantized ONCE per call into a small scratch in bf16 pair layout (K x 64 bf16:
 * 72-192 KiB, stays in L2) and every row of x is multiplied against it by the back-end:
 *   AMX         tdpbf16ps on 16-row tiles of x (M a multiple of 16: the caller pads);
 *   AVX512-BF16 vdpbf16ps, 6 rows x 64 columns of accumulators in registers, a pair of x's
 *               values broadcast against 16 columns' pairs of weights (any M).
 * The values are those of the bf16 route: w = bf16((q - 8) * scale + zero) (fp32 product and
 * sum, one rounding), x rounded to bf16 by the caller; the products are exact and accumulate
 * in fp32, in an order of their own (not bit-identical to oneDNN's, nor between back-ends).
 *
 * Arguments (all contiguous, row-major):
 *   x       uint16 (bf16 bits) [M, K]    activations
 *   packed  uint8 [N / 64, K, 32]        int4pack bytes (int4_native.c describes them)
 *   scales_and_zeros  uint16 (bf16 bits) [K / group, N, 2]
 *   y       float32 [M, N]               written whole
 *   threads column blocks are split between this many threads (1: the caller's only)
 *   backend BACKEND_AMX or BACKEND_DOT (`inlaid_int4_bf16_backends` says which were built)
 * Needs K % 32 == 0, N % 64 == 0, group even and dividing K. A back-end is built where the
 * compiler targets it (-march=native on a CPU with amx-tile and amx-bf16; avx512bf16); a call
 * to one that was not returns -2. AMX tiles must be granted first: inlaid_amx_enable(). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_bf16.h"
#include "native_threads.h"

#define BLOCK_N 64
#define TILE_ROWS 16
#define TILE_K 32 /* bf16 values in one 64-byte tile row */
#define K_CHUNK 256 /* x and weight columns per pass: 32 rows of x x 256 bf16 = 16 KiB */
#define PANEL_BLOCKS 4 /* column blocks dequantized together: K x 256 bf16, 288-768 KiB, in L2 */
#define DOT_ROWS 6 /* rows of x per AVX512-BF16 pass: 6 x 4 accumulators + 4 weights < 32 zmm */

#define BACKEND_AMX 1
#define BACKEND_DOT 2

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define BUILT_AMX 1
#else
#define BUILT_AMX 0
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define BUILT_DOT 1
#else
#define BUILT_DOT 0
#endif

/* Which back-ends this build has: BACKEND_AMX | BACKEND_DOT bits. */
int inlaid_int4_bf16_backends(void) { return (BUILT_AMX ? BACKEND_AMX : 0) | (BUILT_DOT ? BACKEND_DOT : 0); }

#if BUILT_AMX || BUILT_DOT
#include <immintrin.h>

typedef uint8_t v16b __attribute__((vector_size(16)));

/* w[j] = bf16(low[j]) | bf16(high[j]) << 16 for the 16 lanes: two rows' values side by side
 * (rounded to nearest, ties to even). */
static inline void store_pairs(uint32_t *w, v16f low, v16f high) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    /* One conversion of both rows ([0, 16): low, [16, 32): high), then one shuffle into pairs:
     * fewer instructions than rounding in integers (same values for every finite float but
     * denormals, which the instruction flushes to zero: a dequantized weight is one only with a
     * scale below ~1e-37). */
    const __m512i pair_order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512bh both = _mm512_cvtne2ps_pbh((__m512)high, (__m512)low);
    _mm512_storeu_si512(w, _mm512_permutexvar_epi16(pair_order, (__m512i)both));
#else
    v16u word = bf16_bits(low) | (bf16_bits(high) << 16);
    memcpy(w, &word, sizeof word);
#endif
}

/* Column block `block` dequantized into w in the tiles' pair layout: for each of its four
 * 16-column tiles t, w[t][k / 2][j][k % 2] = bf16(W[k, 16 t + j]), i.e. a [K / 2, 32] bf16
 * matrix per tile whose 16-row slices are AMX B tiles. */
static void dequantize_pairs(const uint8_t *packed, const uint16_t *scales_and_zeros, int64_t k_total, int64_t n_total,
                             int64_t group, int64_t block, uint32_t *w) {
    const uint8_t *bytes = packed + block * k_total * (BLOCK_N / 2);
    const int64_t tile_words = k_total / 2 * 16;
    for (int64_t k0 = 0; k0 < k_total; k0 += group) {
        const uint16_t *pairs = scales_and_zeros + ((k0 / group) * n_total + block * BLOCK_N) * 2;
        v16f scale[4], zero[4];
        for (int c = 0; c < 4; c++) {
            scale[c] = bf16_every_other(pairs + 32 * c);
            zero[c] = bf16_every_other(pairs + 32 * c + 1);
        }
        for (int64_t k = k0; k < k0 + group; k += 2, bytes += BLOCK_N) {
            v16b even0, even1, odd0, odd1; /* rows k and k + 1 */
            memcpy(&even0, bytes, sizeof even0);
            memcpy(&even1, bytes + 16, sizeof even1);
            memcpy(&odd0, bytes + 32, sizeof odd0);
            memcpy(&odd1, bytes + 48, sizeof odd1);
            v16i even[4] = {__builtin_convertvector(even0 & 15, v16i), __builtin_convertvector(even1 & 15, v16i),
                            __builtin_convertvector(even0 >> 4, v16i), __builtin_convertvector(even1 >> 4, v16i)};
            v16i odd[4] = {__builtin_convertvector(odd0 & 15, v16i), __builtin_convertvector(odd1 & 15, v16i),
                           __builtin_convertvector(odd0 >> 4, v16i), __builtin_convertvector(odd1 >> 4, v16i)};
            for (int c = 0; c < 4; c++) {
                /* exact products (a 4-bit integer times a bf16), one rounding of the sum: the
                 * values of the bf16 route's dequantization (int4_native.c) */
                v16f low = __builtin_convertvector(even[c] - 8, v16f) * scale[c] + zero[c];
                v16f high = __builtin_convertvector(odd[c] - 8, v16f) * scale[c] + zero[c];
                store_pairs(w + c * tile_words + (k / 2) * 16, low, high);
            }
        }
    }
}

#endif

#if BUILT_AMX
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

/* 0, or the negative errno of Linux's refusal (the process may not use the tile registers). */
int inlaid_amx_enable(void) {
    long status = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
    return status == 0 ? 0 : -1;
}

static void configure_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = TILE_ROWS;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* y[0 : 32, columns of tiles t, t + 1] (+)= x[0 : 32, k_begin : k_end] @ W[k_begin : k_end]: tiles
 * 0-3 accumulate (from zero, or from y where `accumulate`), 4-5 hold x, 6-7 the weight. */
static void multiply_32_rows(const uint16_t *x, int64_t k_total, int64_t k_begin, int64_t k_end,
                             const uint32_t *w_tile0, const uint32_t *w_tile1, float *y, int64_t n_total,
                             int accumulate) {
    const int64_t y_stride = n_total * 4, lower = TILE_ROWS * n_total;
    if (accumulate) {
        _tile_loadd(0, y, y_stride);
        _tile_loadd(1, y + 16, y_stride);
        _tile_loadd(2, y + lower, y_stride);
        _tile_loadd(3, y + lower + 16, y_stride);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = k_begin; k < k_end; k += TILE_K) {
        _tile_loadd(4, x + k, k_total * 2);
        _tile_loadd(5, x + TILE_ROWS * k_total + k, k_total * 2);
        _tile_loadd(6, w_tile0 + k / 2 * 16, 64);
        _tile_loadd(7, w_tile1 + k / 2 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, y, y_stride);
    _tile_stored(1, y + 16, y_stride);
    _tile_stored(2, y + lower, y_stride);
    _tile_stored(3, y + lower + 16, y_stride);
}

/* The same for 16 rows (tiles 0-1 accumulate). */
static void multiply_16_rows(const uint16_t *x, int64_t k_total, int64_t k_begin, int64_t k_end,
                             const uint32_t *w_tile0, const uint32_t *w_tile1, float *y, int64_t n_total,
                             int accumulate) {
    const int64_t y_stride = n_total * 4;
    if (accumulate) {
        _tile_loadd(0, y, y_stride);
        _tile_loadd(1, y + 16, y_stride);
    } else {
        _tile_zero(0);
        _tile_zero(1);
    }
    for (int64_t k = k_begin; k < k_end; k += TILE_K) {
        _tile_loadd(4, x + k, k_total * 2);
        _tile_loadd(6, w_tile0 + k / 2 * 16, 64);
        _tile_loadd(7, w_tile1 + k / 2 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
    }
    _tile_stored(0, y, y_stride);
    _tile_stored(1, y + 16, y_stride);
}

/* y[:, the panel's columns] = x @ the panel's weight (`panel` column blocks in w) on AMX tiles.
 * K in chunks, rows outside the panel's column tiles: a chunk of 32 rows of x (16 KiB) stays in
 * L1 while the panel's weight tiles of the chunk stream from L2 under it (with all of K at once,
 * x and the weight together outgrow L1; measured: 576 x 1536 at 64-512 rows 1.5-1.9x slower,
 * the other shapes of the default model within noise). */
static void multiply_panel_amx(const uint16_t *x, const uint32_t *w, float *y, int64_t m, int64_t k, int64_t n,
                               int64_t first_column, int64_t panel) {
    const int64_t tile_words = k / 2 * 16;
    for (int64_t k_begin = 0; k_begin < k; k_begin += K_CHUNK) {
        int64_t k_end = k - k_begin < K_CHUNK ? k : k_begin + K_CHUNK;
        for (int64_t m0 = 0; m0 < m; m0 += 2 * TILE_ROWS) {
            for (int64_t t = 0; t < 4 * panel; t += 2) {
                const uint32_t *w0 = w + t * tile_words, *w1 = w0 + tile_words;
                float *y_rows = y + m0 * n + first_column + t * 16;
                if (m0 + 2 * TILE_ROWS <= m)
                    multiply_32_rows(x + m0 * k, k, k_begin, k_end, w0, w1, y_rows, n, k_begin > 0);
                else
                    multiply_16_rows(x + m0 * k, k, k_begin, k_end, w0, w1, y_rows, n, k_begin > 0);
            }
        }
    }
}
#else
int inlaid_amx_enable(void) { return -2; }
#endif

#if BUILT_DOT
/* y[0 : ROWS, 64 columns] = x[0 : ROWS] @ one column block's weight (its four 16-column tiles in
 * pair layout, `tile_words` apart), over all of K: each pair of x's values (one 32-bit word)
 * is broadcast against the 16 columns' weight pairs of a tile and summed by vdpbf16ps into
 * that row and tile's accumulator. ROWS is a constant where it is inlined (the accumulators
 * then live in registers). */
static inline __attribute__((always_inline)) void dot_rows(const int rows, const uint16_t *x, int64_t k,
                                                           const uint32_t *w, int64_t tile_words, float *y,
                                                           int64_t n) {
    __m512 acc[DOT_ROWS][4];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t pair = 0; pair < k / 2; pair++) {
        __m512bh weight[4];
        for (int t = 0; t < 4; t++) weight[t] = (__m512bh)_mm512_loadu_si512(w + t * tile_words + pair * 16);
        for (int r = 0; r < rows; r++) {
            uint32_t word;
            memcpy(&word, x + r * k + 2 * pair, sizeof word);
            __m512bh x_pair = (__m512bh)_mm512_set1_epi32((int)word);
            for (int t = 0; t < 4; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], x_pair, weight[t]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < 4; t++) _mm512_storeu_ps(y + r * n + 16 * t, acc[r][t]);
}

/* y[:, the panel's columns] = x @ the panel's weight with AVX512-BF16 dot products: rows of x
 * DOT_ROWS at a time (their K x 2 bytes, 7-18 KiB, stay in L1), each against every block of
 * the panel (the weight streams from L2). */
static void multiply_panel_dot(const uint16_t *x, const uint32_t *w, float *y, int64_t m, int64_t k, int64_t n,
                               int64_t first_column, int64_t panel) {
    const int64_t tile_words = k / 2 * 16, block_words = 4 * tile_words;
    for (int64_t m0 = 0; m0 < m; m0 += DOT_ROWS) {
        const int64_t rows = m - m0 < DOT_ROWS ? m - m0 : DOT_ROWS;
        for (int64_t b = 0; b < panel; b++) {
            const uint16_t *x_rows = x + m0 * k;
            const uint32_t *w_block = w + b * block_words;
            float *y_rows = y + m0 * n + first_column + b * BLOCK_N;
            switch (rows) {
            case 6: dot_rows(6, x_rows, k, w_block, tile_words, y_rows, n); break;
            case 5: dot_rows(5, x_rows, k, w_block, tile_words, y_rows, n); break;
            case 4: dot_rows(4, x_rows, k, w_block, tile_words, y_rows, n); break;
            case 3: dot_rows(3, x_rows, k, w_block, tile_words, y_rows, n); break;
            case 2: dot_rows(2, x_rows, k, w_block, tile_words, y_rows, n); break;
            default: dot_rows(1, x_rows, k, w_block, tile_words, y_rows, n); break;
            }
        }
    }
}
#endif

#if BUILT_AMX || BUILT_DOT
typedef struct {
    const uint16_t *x;
    const uint8_t *packed;
    const uint16_t *scales_and_zeros;
    float *y;
    uint32_t *scratch; /* K / 2 x 64 x PANEL_BLOCKS words of its own */
    int64_t m, k, n, group, first_block, end_block;
    int backend;
} Work;

static void *run_blocks(void *arg) {
    const Work *work = (const Work *)arg;
    const int64_t m = work->m, k = work->k, n = work->n, block_words = 4 * (k / 2 * 16);
#if BUILT_AMX
    if (work->backend == BACKEND_AMX) configure_tiles(); /* the tile configuration belongs to the thread */
#endif
    for (int64_t first = work->first_block; first < work->end_block; first += PANEL_BLOCKS) {
        int64_t panel = work->end_block - first < PANEL_BLOCKS ? work->end_block - first : PANEL_BLOCKS;
        for (int64_t b = 0; b < panel; b++)
            dequantize_pairs(work->packed, work->scales_and_zeros, k, n, work->group, first + b,
                             work->scratch + b * block_words);
#if BUILT_AMX
        if (work->backend == BACKEND_AMX)
            multiply_panel_amx(work->x, work->scratch, work->y, m, k, n, first * BLOCK_N, panel);
#endif
#if BUILT_DOT
        if (work->backend == BACKEND_DOT)
            multiply_panel_dot(work->x, work->scratch, work->y, m, k, n, first * BLOCK_N, panel);
#endif
    }
#if BUILT_AMX
    if (work->backend == BACKEND_AMX) _tile_release();
#endif
    return 0;
}
#endif

/* Returns 0, -1 for arguments it cannot take, -2 for a back-end this build does not have, -3
 * when no scratch could be had (nothing written then). */
int inlaid_int4pack_mm_bf16(const uint16_t *x, const uint8_t *packed, const uint16_t *scales_and_zeros, float *y,
                            int64_t m, int64_t k, int64_t n, int64_t group, int64_t threads, int64_t backend) {
    if (backend != BACKEND_AMX && backend != BACKEND_DOT) return -1;
    if (!(inlaid_int4_bf16_backends() & backend)) return -2;
    if (m < 1 || (backend == BACKEND_AMX && m % TILE_ROWS) || k < TILE_K || k % TILE_K || n < BLOCK_N ||
        n % BLOCK_N || group < 2 || group % 2 || k % group)
        return -1;
#if BUILT_AMX || BUILT_DOT
    int64_t blocks = n / BLOCK_N, words = k / 2 * BLOCK_N * PANEL_BLOCKS;
    threads = thread_count(threads, blocks);
    uint32_t *scratch = aligned_alloc(64, (size_t)(words * threads) * 4);
    if (!scratch) return -3;
    Work work[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++)
        work[t] = (Work){x, packed, scales_and_zeros, y, scratch + t * words, m, k, n, group,
                         blocks * t / threads, blocks * (t + 1) / threads, (int)backend};
    run_on_threads(run_blocks, work, sizeof work[0], threads);
    free(scratch);
    return 0;
#else
    (void)x, (void)packed, (void)scales_and_zeros, (void)y, (void)threads;
    return -2;
#endif
}
