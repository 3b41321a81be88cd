/* The 16-float vector the native CPU kernels compute with (GCC vector extensions: the
 * compiler maps it onto what the CPU it is built on has, one zmm on AVX-512), its 16-int32
 * twin, unaligned loads and stores of the floats, and the sum of a vector's lanes. Included
 * by each kernels/<name>_native.c; kernels/native.py builds them. */
#ifndef INLAID_NATIVE_VECTORS_H
#define INLAID_NATIVE_VECTORS_H

#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64))); /* lane masks, codes, bit patterns */

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }

/* The sum of the 16 lanes: four shuffle + add steps (summing lane by lane costs ~3x more, and
 * a pairwise sum rounds no worse than a sequential one). */
static inline float sum16(v16f v) {
    v = v + __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v = v + __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v = v + __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v = v + __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

#endif
