// The staging pipeline of a bulk-copy sender (dispatch and combine): one lane loads items (rows) global -> shared
// into a ring of stages, completion counted in bytes on one mbarrier per stage, and stores each stage to one or more
// destinations shared -> global (local or a peer's over NVLink) in one bulk async-group per item.
//
// Item k lives in stage k % kNumStages. A stage is refilled once the group of the item that used it has finished
// READING shared memory (`wait_group.read`), which is early; whether the item's writes are visible at the
// destinations is a separate, later question (`wait_group` without `.read`) that the sender asks only when it
// publishes ring tails, kPublishLag items behind, with the ring counts it recorded after each item (`SentHistory`).
// Preconditions: header-only; sm_90; only the issuing lane touches the barriers and the async-groups.
#pragma once

#include <cstdint>
#include <cstdio>

#include "device/comm.cuh"
#include "device/ptx.cuh"

namespace hybrid_ep {

// Most ranks whose ring counts a sender keeps (kernels/api.cuh kNumMaxKernelRanks).
constexpr int kNumMaxSenderRanks = 8;

template <int kNumStages>
struct StageBarriers {
    uint64_t bars[kNumStages];

    // Lane 0 only: initialises every stage's barrier for one arrival per phase.
    __device__ __forceinline__ void init() {
        for (int s = 0; s < kNumStages; ++s)
            ptx::mbarrier_init(ptx::smem_addr(&bars[s]), 1);
        ptx::fence_mbarrier_init();
    }

    // Loads `num_bytes` from global `src` into the stage of item `item_idx` at shared address `stage_addr`.
    __device__ __forceinline__ void load(int item_idx, uint32_t stage_addr, const void* src, int num_bytes) {
        const uint32_t bar = ptx::smem_addr(&bars[item_idx % kNumStages]);
        ptx::mbarrier_arrive_expect_tx(bar, num_bytes);
        ptx::tma_load_1d(stage_addr, src, num_bytes, bar);
    }

    // Arrives once at the barrier of item `item_idx`'s stage (a barrier used without bulk loads).
    __device__ __forceinline__ void arrive(int item_idx) {
        ptx::mbarrier_arrive(ptx::smem_addr(&bars[item_idx % kNumStages]));
    }

    // Waits (bounded) until the load of item `item_idx` has landed in its stage (or, for a barrier used with
    // `arrive`, until item `item_idx` arrived).
    __device__ __forceinline__ void wait(int item_idx, int64_t num_timeout_cycles, const char* kernel_name, int rank) {
        const uint32_t bar = ptx::smem_addr(&bars[item_idx % kNumStages]);
        const uint32_t phase = (item_idx / kNumStages) & 1;
        timeout_while(num_timeout_cycles, [&](bool is_last_check) {
            const bool is_done = ptx::mbarrier_try_wait(bar, phase);
            if (!is_done && is_last_check)
                printf(
                    "hybrid_ep %s timeout: rank %d, block %d: the stage barrier of item %d never completed (its local "
                    "bulk load, or its release)\n",
                    kernel_name, rank, static_cast<int>(blockIdx.x), item_idx);
            return !is_done;
        });
    }
};

// Ring counts (rows written into the ring at each rank) after each of the last kDepth items.
template <int kDepth>
struct SentHistory {
    int sent[kDepth][kNumMaxSenderRanks];

    __device__ __forceinline__ void record(int item_idx, const int* sent_now, int num_ranks) {
        for (int d = 0; d < num_ranks; ++d)
            sent[item_idx % kDepth][d] = sent_now[d];
    }
    __device__ __forceinline__ const int* after(int item_idx) const { return sent[item_idx % kDepth]; }
};

// Lane 0 of a sender whose ring at `dst_rank` holds `sent` rows and looked full at the last head read (`head_seen`):
// waits (bounded) until that receiver has freed a slot, i.e. until the head it writes into `head_ptr` (in this
// rank's buffer) passes sent - num_slots. The head is read once first; only if the ring is still full does the
// sender call `publish_all`, which must make every row it wrote visible with its tail (or the receiver could never
// free the ring), and then wait. Afterwards the bulk stores that reuse the slot are ordered after the head read.
template <typename PublishAll>
__device__ __forceinline__ void wait_ring_slot(const int* head_ptr, int sent, int num_slots, int& head_seen,
                                               int64_t num_timeout_cycles, const char* kernel_name, int rank,
                                               int sender_idx, int dst_rank, const PublishAll& publish_all) {
    head_seen = ptx::ld_acquire_sys(head_ptr);
    if (sent - head_seen >= num_slots) {
        publish_all();
        timeout_while(num_timeout_cycles, [&](bool is_last_check) {
            head_seen = ptx::ld_acquire_sys(head_ptr);
            const bool is_full = sent - head_seen >= num_slots;
            if (is_full && is_last_check)
                printf(
                    "hybrid_ep %s timeout: rank %d, block %d, sender %d waits for peer %d to free a ring slot: "
                    "expected head > %d, observed %d\n",
                    kernel_name, rank, static_cast<int>(blockIdx.x), sender_idx, dst_rank, sent - num_slots, head_seen);
            return is_full;
        });
    }
    ptx::fence_proxy_async_global();
}

}  // namespace hybrid_ep
