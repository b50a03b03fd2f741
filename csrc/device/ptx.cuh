// Inline PTX wrappers: every `asm` of hybrid_ep lives in this file.
// Loads and stores at system scope order memory seen by peer GPUs (NVLink) and the host: a writer publishes data
// then `st_release_sys`; a reader polls with `ld_acquire_sys` and may then read the data.
// Preconditions: sm_70 or newer (`elect_one_sync` needs sm_90). Header-only, no torch headers.
#pragma once

#include <cstdint>

namespace hybrid_ep::ptx {

// Returns: the lane index of the calling thread within its warp (0..31).
__device__ __forceinline__ int get_lane_idx() {
    int lane_idx;
    asm volatile("mov.s32 %0, %%laneid;" : "=r"(lane_idx));
    return lane_idx;
}

// Loads `*ptr` with acquire semantics at system scope: later reads see what the releasing writer wrote before.
__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
    int value;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Loads `*ptr` at system scope with no ordering; for polls whose result is checked again with an acquire.
__device__ __forceinline__ int ld_relaxed_sys(const int* ptr) {
    int value;
    asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Stores `value` to `*ptr` with release semantics at system scope: earlier writes are visible before it.
__device__ __forceinline__ void st_release_sys(int* ptr, int value) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" : : "l"(ptr), "r"(value) : "memory");
}

// Adds `value` to `*ptr` at system scope with release semantics: earlier writes are visible before the addition.
__device__ __forceinline__ void red_add_release_sys(int* ptr, int value) {
    asm volatile("red.release.sys.global.add.s32 [%0], %1;" : : "l"(ptr), "r"(value) : "memory");
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Returns: true in exactly one active lane of the warp (all 32 lanes must call it).
__device__ __forceinline__ bool elect_one_sync() {
    uint32_t is_elected;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "elect.sync _|p, 0xffffffff;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(is_elected));
    return is_elected != 0;
}
#endif

// Stops the kernel with an error that the host sees as cudaErrorIllegalInstruction (the context is lost).
__device__ __forceinline__ void trap() {
    asm volatile("trap;");
}

}  // namespace hybrid_ep::ptx
