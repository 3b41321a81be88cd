/* bf16 <-> float for the native int4 kernels (int4_native.c, int4_amx.c): the layout's bf16
 * scales and zeros read as floats, and floats rounded to bf16 bits. */
#ifndef INLAID_NATIVE_BF16_H
#define INLAID_NATIVE_BF16_H

#include <stdint.h>
#include <string.h>

#include "native_vectors.h"

typedef uint32_t v16u __attribute__((vector_size(64)));

static inline float bf16_to_float(uint16_t bits) {
    uint32_t word = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &word, sizeof value);
    return value;
}

/* The 16 bf16 values at pairs[0], pairs[2], ... pairs[30] (every other uint16), as floats. */
static inline v16f bf16_every_other(const uint16_t *pairs) {
    float values[16];
    for (int j = 0; j < 16; j++) values[j] = bf16_to_float(pairs[2 * j]);
    return load16(values);
}

/* The bf16 bits of 16 floats, rounded to nearest (ties to even), in each lane's low half. */
static inline v16u bf16_bits(v16f value) {
    v16u bits = (v16u)value;
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
}

#endif
