// What the combine prelude (notify_combine) tells every rank of every other, and the choice of combine it implies.
// Each rank publishes its token count and where its inputs lie: the offsets of its x and of its top-k weights in its
// output arena (kInputNotInArena where they lie elsewhere, kInputAbsent for a combine without weights) and the rows
// of x. The combine pulls (kernels/intranode/combine_pull.cu) when every rank's x lies in its arena and either every
// rank's weights do or no rank has weights; otherwise the senders push rows through the rings
// (kernels/intranode/combine.cu). Every rank reads the same published values, so every rank chooses the same.
// Preconditions: header-only; notify_combine ran just before on the same stream.
#pragma once

#include "device/comm.cuh"
#include "device/layout.cuh"
#include "device/ptx.cuh"
#include "kernels/api.cuh"

namespace hybrid_ep::kernels {

struct CombineInputs {
    int seq;                                   // this combine's number (device/layout.cuh, combine protocol)
    int num_tokens[kNumMaxKernelRanks];        // token count of each rank
    int num_x_rows[kNumMaxKernelRanks];        // rows of each rank's x
    const uint8_t* x[kNumMaxKernelRanks];      // each rank's x (peer mappings), when pulling
    const float* weights[kNumMaxKernelRanks];  // each rank's top-k weights, when pulling with weights
    bool is_pull;
};

// Fills `inputs` (in shared memory) from this rank's notify slots, waiting (bounded) for each rank's entry of this
// call. Called by every thread of the block; thread r < num_ranks reads rank r's slot.
__device__ __forceinline__ void read_combine_inputs(const CombineParams& p, CombineInputs& inputs) {
    __shared__ int64_t x_offsets[kNumMaxKernelRanks], weights_offsets[kNumMaxKernelRanks];
    const int r = threadIdx.x;
    // Written by notify_combine, which ended before this kernel reads.
    const int seq = *NvlBufferLayout::combine_count(p.buffer_ptrs[p.rank]);
    if (r < p.num_ranks) {
        CombineSlot* slot = NvlBufferLayout::combine_slot(p.buffer_ptrs[p.rank], r, seq);
        wait_peer_value(&slot->seq, seq, p.num_timeout_cycles, "combine", p.rank,
                        "the token count and inputs (combine entry of its notify slot)", r);
        inputs.num_tokens[r] = ptx::ld_cg(&slot->num_tokens);
        inputs.num_x_rows[r] = ptx::ld_cg(&slot->num_x_rows);
        x_offsets[r] = ptx::ld_cg_s64(&slot->x_offset);
        weights_offsets[r] = ptx::ld_cg_s64(&slot->weights_offset);
    }
    if (threadIdx.x == 0)
        inputs.seq = seq;
    __syncthreads();
    if (threadIdx.x == 0) {
        bool all_x = true, all_weights = true, no_weights = true;
        for (int i = 0; i < p.num_ranks; ++i) {
            all_x = all_x && x_offsets[i] >= 0 && (p.arena_ptrs[i] != nullptr || inputs.num_x_rows[i] == 0);
            all_weights =
                all_weights && weights_offsets[i] >= 0 && (p.arena_ptrs[i] != nullptr || inputs.num_x_rows[i] == 0);
            no_weights = no_weights && weights_offsets[i] == kInputAbsent;
        }
        inputs.is_pull = all_x && (all_weights || no_weights);
        for (int i = 0; i < p.num_ranks; ++i) {
            const auto* base = static_cast<const uint8_t*>(p.arena_ptrs[i]);
            inputs.x[i] = base != nullptr && x_offsets[i] >= 0 ? base + x_offsets[i] : nullptr;
            inputs.weights[i] = base != nullptr && weights_offsets[i] >= 0
                                    ? reinterpret_cast<const float*>(base + weights_offsets[i])
                                    : nullptr;
        }
    }
    __syncthreads();
}

}  // namespace hybrid_ep::kernels
