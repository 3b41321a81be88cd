/* The 16-float vector the native CPU kernels compute with (GCC vector extensions: the
 * compiler maps it onto what the CPU it is built on has, one zmm on AVX-512), its 16-int32
 * twin, and unaligned loads and stores of the floats. Included by each kernels/<name>_native.c;
 * kernels/native.py builds them. */
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

#endif
