// Launch helpers for kernel launchers: a typed launch geometry, small host-side arithmetic and the runtime-to-template
// switch.
// Preconditions: host code only; no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <type_traits>  // std::integral_constant
#include <utility>

#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {

// Launch geometry of one kernel.
struct LaunchArgs {
    dim3 grid;    // blocks
    dim3 block;   // threads per block
    size_t smem;  // dynamic shared memory bytes per block
};

// Launches `kernel` with `args` on `stream` with programmatic stream serialization: its blocks may start once every
// block of the kernel ahead of it in the stream has called ptx::griddep_launch_dependents (or ended), so they must
// call ptx::griddep_wait before touching anything that kernel, or any before it, writes. Under stream capture the
// graph keeps the same programmatic edge.
template <typename... KernelParams, typename... Args>
void launch_programmatic(void (*kernel)(KernelParams...), const LaunchArgs& args, cudaStream_t stream,
                         Args&&... kernel_args) {
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = args.grid;
    config.blockDim = args.block;
    config.dynamicSmemBytes = args.smem;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
    CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(kernel_args)...));
}

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

namespace detail {

// Returns: "a, b, c" for kValues a, b, c.
template <int... kValues>
std::string list_values() {
    std::string list;
    ((list += (list.empty() ? "" : ", ") + std::to_string(kValues)), ...);
    return list;
}

// Calls f(std::integral_constant<int, V>{}) for the V of kFirst, kRest... equal to `value` and returns its result
// (f returns a value, e.g. whether it launched); throws for any other value, naming `what` and listing the values.
template <int kFirst, int... kRest, typename F>
auto switch_int(int value, const char* what, const F& f) {
    decltype(f(std::integral_constant<int, kFirst>{})) result{};
    const bool is_matched = ((value == kFirst && (result = f(std::integral_constant<int, kFirst>{}), true)) || ... ||
                             (value == kRest && (result = f(std::integral_constant<int, kRest>{}), true)));
    HEP_CHECK(is_matched, what, " must be one of ", list_values<kFirst, kRest...>(), ", got ", value);
    return result;
}

}  // namespace detail

// Runtime-to-template switch: calls `f(std::integral_constant<int, V>{})` for the V among the listed values that
// equals `value` and returns its result; any other value throws a HEPException naming `what` and the values.
// Example: HEP_SWITCH_INT(max_ranks, "combine: rank bound", launch_ranks, 2, 4, 8).
#define HEP_SWITCH_INT(value, what, f, ...) ::hybrid_ep::kernels::detail::switch_int<__VA_ARGS__>((value), (what), (f))

}  // namespace hybrid_ep::kernels
