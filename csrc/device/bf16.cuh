// BF16 lanes of 16-byte vectors, summed in fp32: the helpers of every kernel that reduces bfloat16 rows (combine,
// the copy sum of the permuted layout), so they all round the way torch does.
// Preconditions: header-only, no torch headers.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace hybrid_ep {

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
    return __uint_as_float(bits << 16);
}

// Round to nearest even, NaN to 0x7fc0: the rounding of torch's float -> bfloat16 conversion.
__device__ __forceinline__ uint32_t float_to_bf16_bits(float value) {
    if (isnan(value))
        return 0x7fc0u;
    const uint32_t bits = __float_as_uint(value);
    return (bits + ((bits >> 16) & 1u) + 0x7fffu) >> 16;
}

// acc[e] += element e of the eight bfloat16 values in `v`.
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
    const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                               static_cast<uint32_t>(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc[2 * i] += bf16_bits_to_float(words[i] & 0xffffu);
        acc[2 * i + 1] += bf16_bits_to_float(words[i] >> 16);
    }
}

// Returns: `acc` rounded to eight bfloat16 values.
// NOTES: the hardware conversion (cvt.rn.bf16x2.f32) rounds as torch does except for NaN, which it makes 0x7fff
// where torch makes 0x7fc0; the sum of the eight is NaN whenever one of them is (or when infinities of both signs
// meet), and only then are they converted one by one: four conversion instructions and eight adds in place of
// about fifty integer instructions, in reducers that are short of issue slots.
__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
    uint32_t words[4];
    const float any = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    if (!isnan(any)) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __nv_bfloat162 pair = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
            words[i] = *reinterpret_cast<const uint32_t*>(&pair);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
            words[i] = float_to_bf16_bits(acc[2 * i]) | (float_to_bf16_bits(acc[2 * i + 1]) << 16);
    }
    return make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                     static_cast<int>(words[3]));
}

}  // namespace hybrid_ep
