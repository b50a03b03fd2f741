// Launch helpers for kernel launchers: a typed launch geometry and small host-side arithmetic.
// Preconditions: host code only; no torch headers.
// NOTES: runtime-to-template switches (`HEP_SWITCH_*`, whose default branch throws and lists the supported
// values) belong here too; the first one comes with the first kernel templated on a runtime value.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {

// Launch geometry of one kernel.
struct LaunchArgs {
    dim3 grid;    // blocks
    dim3 block;   // threads per block
    size_t smem;  // dynamic shared memory bytes per block
};

// Returns: ceil(a / b) for positive b.
template <typename T>
constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

// Returns: the static shared memory of `kernel` in bytes (the dynamic part must fit beside it).
template <typename Kernel>
size_t static_shared_bytes(Kernel kernel) {
    cudaFuncAttributes attributes{};
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    return attributes.sharedSizeBytes;
}

}  // namespace hybrid_ep::kernels
