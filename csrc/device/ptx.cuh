// Inline PTX wrappers: every `asm` of hybrid_ep lives in this file.
// Loads and stores at system scope order memory seen by peer GPUs (NVLink) and the host: a writer publishes data
// then `st_release_sys`; a reader polls with `ld_acquire_sys` and may then read the data.
// Preconditions: sm_70 or newer (`elect_one_sync` needs sm_90). Header-only, no torch headers.
#pragma once

#include <cstdint>

namespace hybrid_ep {

constexpr int kWarpSize = 32;

}  // namespace hybrid_ep

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

// NOTES: the functions below use sm_90 instructions (mbarrier tx-counts, bulk copies); the package builds for
// sm_90a only (setup.py), so they need no architecture guard.

// ---- Shared-memory barriers (mbarrier) and 1-D bulk copies (TMA), sm_90 ----
// Shared-memory addresses are 32-bit `.shared::cta` addresses from `smem_addr`.

// Returns: the shared-state-space address of a pointer into this block's shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Initialises the mbarrier at `bar` for `num_arrivals` arrivals per phase.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int num_arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" : : "r"(bar), "r"(num_arrivals) : "memory");
}

// Makes mbarrier initialisations visible to the async proxy (bulk copies) before their first use.
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" : : : "memory");
}

// Arrives once at `bar` and adds `num_bytes` to the bytes the current phase still expects.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, int num_bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" : : "r"(bar), "r"(num_bytes) : "memory");
}

// Arrives once at `bar` (release at CTA scope).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" : : "r"(bar) : "memory");
}

// Returns: true once the phase of `bar` with parity `phase` has completed (one bounded hardware try).
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t phase) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
    return done != 0;
}

// Bulk copy of `num_bytes` (a multiple of 16, both addresses 16-byte aligned) from global memory to shared memory;
// completion is counted in bytes on the mbarrier `bar`.
__device__ __forceinline__ void tma_load_1d(uint32_t dst, const void* src, int num_bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :
                 : "r"(dst), "l"(src), "r"(num_bytes), "r"(bar)
                 : "memory");
}

// Bulk copy of `num_bytes` (a multiple of 16, 16-byte aligned) from shared memory to global memory, local or a
// peer's over NVLink; tracked by the issuing thread's bulk async-groups.
__device__ __forceinline__ void tma_store_1d(void* dst, uint32_t src, int num_bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                 :
                 : "l"(dst), "r"(src), "r"(num_bytes)
                 : "memory");
}

// Closes the issuing thread's current bulk async-group.
__device__ __forceinline__ void bulk_commit_group() {
    asm volatile("cp.async.bulk.commit_group;" : : : "memory");
}

// Waits until at most `kNumPending` of the issuing thread's bulk async-groups are incomplete: their writes are
// done and visible (stronger than the `.read` form, which only frees the shared-memory source).
template <int kNumPending>
__device__ __forceinline__ void bulk_wait_group() {
    asm volatile("cp.async.bulk.wait_group %0;" : : "n"(kNumPending) : "memory");
}

// Waits until at most `kNumPending` bulk async-groups still read their shared-memory source.
template <int kNumPending>
__device__ __forceinline__ void bulk_wait_group_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" : : "n"(kNumPending) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later bulk copies that read them.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;" : : : "memory");
}

// Orders global-memory accesses between the generic proxy and the async proxy (bulk copies) of this thread.
__device__ __forceinline__ void fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;" : : : "memory");
}

// ---- Vector accesses ----

// 16-byte load of data that no one writes during the kernel (the caller's inputs): non-coherent path, no L1 fill.
__device__ __forceinline__ int4 ld_nc_v4(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// 16-byte load that bypasses L1 (data a peer wrote, read after an acquire on its flag).
__device__ __forceinline__ int4 ld_cg_v4(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr)
                 : "memory");
    return v;
}

// 4-byte load that bypasses L1.
__device__ __forceinline__ int ld_cg(const int* ptr) {
    int v;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
}

// 8-byte load that bypasses L1.
__device__ __forceinline__ int64_t ld_cg_s64(const int64_t* ptr) {
    int64_t v;
    asm volatile("ld.global.cg.s64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
    return v;
}

// 4-byte float load that bypasses L1.
__device__ __forceinline__ float ld_cg_f32(const float* ptr) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(ptr) : "memory");
    return v;
}

// 16-byte load from shared memory at the `.shared::cta` address `addr` (from `smem_addr`).
__device__ __forceinline__ int4 ld_shared_v4(uint32_t addr) {
    int4 v;
    asm volatile("ld.shared.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr)
                 : "memory");
    return v;
}

// 4-byte float load from shared memory at the `.shared::cta` address `addr`.
__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
    return v;
}

// 16-byte store that does not allocate in L1 (outputs and peers' rings).
__device__ __forceinline__ void st_na_v4(int4* ptr, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Loads `*ptr` with acquire semantics at block scope (a flag other warps of this block set).
__device__ __forceinline__ int ld_acquire_cta(const int* ptr) {
    int value;
    asm volatile("ld.acquire.cta.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Stores `value` to `*ptr` with release semantics at block scope.
__device__ __forceinline__ void st_release_cta(int* ptr, int value) {
    asm volatile("st.release.cta.b32 [%0], %1;" : : "l"(ptr), "r"(value) : "memory");
}

// Full fence at system scope: this thread's earlier accesses are ordered before its later ones for every observer.
__device__ __forceinline__ void fence_acq_rel_sys() {
    asm volatile("fence.acq_rel.sys;" : : : "memory");
}

// Stores `value` to `*ptr` at system scope with no ordering (after an explicit fence).
__device__ __forceinline__ void st_relaxed_sys(int* ptr, int value) {
    asm volatile("st.relaxed.sys.global.s32 [%0], %1;" : : "l"(ptr), "r"(value) : "memory");
}

// Adds `value` to `*ptr` at system scope with no ordering: for a count whose waiter needs nothing this thread wrote.
__device__ __forceinline__ void red_add_relaxed_sys(int* ptr, int value) {
    asm volatile("red.relaxed.sys.global.add.s32 [%0], %1;" : : "l"(ptr), "r"(value) : "memory");
}

// Adds `value` to `*ptr` at device scope with no ordering.
__device__ __forceinline__ void red_add_relaxed_gpu(int* ptr, int value) {
    asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;" : : "l"(ptr), "r"(value) : "memory");
}

// Programmatic dependent launch: lets the next kernel of the stream, if launched with programmatic stream
// serialization, start once every block of this one has called this or ended. No effect otherwise.
__device__ __forceinline__ void griddep_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" : : : "memory");
}

// Programmatic dependent launch: waits until the kernels this one depends on have completed and their writes are
// visible. Returns at once in a kernel launched without programmatic stream serialization.
__device__ __forceinline__ void griddep_wait() {
    asm volatile("griddepcontrol.wait;" : : : "memory");
}

// Waits at named barrier `barrier_idx` (1..15; 0 is __syncthreads) for `num_threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int barrier_idx, int num_threads) {
    asm volatile("bar.sync %0, %1;" : : "r"(barrier_idx), "r"(num_threads) : "memory");
}

// Stops the kernel with an error that the host sees as cudaErrorIllegalInstruction (the context is lost).
__device__ __forceinline__ void trap() {
    asm volatile("trap;");
}

}  // namespace hybrid_ep::ptx
