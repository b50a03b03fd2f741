// `intranode_dispatch`: moves rows over NVLink into per-(block, source) rings of the receivers, which copy them out.
//
// Grid: 2 blocks per channel (the handle's channels; which block sends a token does not change where it lands). Each
// block has kNumWarps warps (28 for rows of at most kNumMaxNarrowRowBytes, else 16): kNumSenders senders (two warps
// each; 3 for narrow rows in grids of at most kNumMaxNarrowBlocks blocks, else 2) and kNumWarps - 2 * kNumSenders
// receiver warps. Senders take the rank's tokens a few at a time from a counter they share (claims), so fast blocks
// send more; sender w of block b owns ring r = b * kNumSenders + w at every peer (the Config's ring slots are shared
// out among a block's senders), and block b receives what block b of every peer sends:
//   * senders (warps 0..2 * kNumSenders - 1; sender w is the issuer 2w and the filler 2w + 1): each runs the
//     bulk-copy pipeline of device/bulk_pipeline.cuh in its own part of shared memory. The filler claims tokens
//     and writes the k-th one's metadata (source index, top-k, weights, scales, receive row at every rank, loaded
//     into registers one token ahead) into stage k % kNumStages and this rank's own copy of it into the outputs,
//     then its lane 0 loads the row global -> shared (TMA); the stage's mbarrier completes when both are there
//     (once no token is left, a stage marked -1 ends the issuer). The issuer's lane 0 waits for it and stores the
//     stage shared -> peer ring (TMA, row and metadata in one copy) for every destination `send_head` names, one
//     bulk group per token, or straight into recv_x for this rank. Only the issuing thread can wait for its bulk
//     groups, so it frees a stage (a second mbarrier the filler waits on) once the token's stores have read it
//     (`wait_group.read`); every num_chunk_tokens tokens it waits until the stores of the token kPublishLag back
//     have completed and publishes the ring tails it recorded after that token (one system-scope fence, then
//     relaxed stores). Before a slot is reused it waits (bounded) for the receiver's head. The last tail carries
//     kDoneBit.
//   * receivers (warps 2 * kNumSenders..): grouped per ring (source rank, sender); a group leader polls its rings'
//     tails (acquire), the group copies the available rows to recv_x / recv_* (16-byte loads that skip L1, 12 in
//     flight per lane, metadata loaded first; top-k localised), then the leader releases the head into the
//     source's buffer. A row goes to the receive row its metadata names for this rank (from `send_head`).
// Counters: tails[r][s] (receiver's buffer, written by source s), heads[r][d] (sender's buffer, written by
// receiver d) and the claim counter (each rank's own) start every call at zero: each rank zeroes its own between
// the two barriers before the kernel (notify_dispatch, or prepare_rings in cached mode).
// Preconditions: every rank's rings are idle (notify_dispatch or a barrier ran before on this stream); every rank
// launches with the same num_channels, num_ring_slots, row and metadata sizes.
#include <algorithm>
#include <cstdio>
#include <type_traits>

#include "device/bulk_pipeline.cuh"
#include "device/comm.cuh"
#include "device/exception.cuh"
#include "device/layout.cuh"
#include "device/ptx.cuh"
#include "kernels/api.cuh"
#include "kernels/launch.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

// NOTES: one issuing lane per block was the limit (receivers idled about 60% of the time). Two or three senders,
// each an issuer and a filler warp, share the block with the receivers. With 16 warps, four senders (8 receiver
// warps) were slower for BF16 and FP8 rows alike, and so were 2 of 12 receiver warps copying this rank's own rows in
// place of the issuer's bulk store (BF16 17% slower at 16 SMs). Storing two consecutive tokens' rows for a peer with
// one bulk copy (half the stores, but fewer stages free for loads) was slower for BF16 (1421 against 1537 GB/s
// summed over 4 H200 GPUs at 16 SMs) and for FP8 with three senders (1131 against 1265).

// Named barriers of a block with kNumSenders senders: sender w's issuer and filler warps use the last ones,
// receiver groups 1..kNumMaxRecvGroups.
template <int kNumSenders>
struct Roles {
    static constexpr int kFirstSenderBarrier = 16 - kNumSenders;
    static constexpr int kNumMaxRecvGroups = kFirstSenderBarrier - 1;
};
constexpr int kDoneBit = 1 << 30;
// Rows of at most this many bytes, in grids of at most this many blocks, get three senders per block, others two.
constexpr int kNumMaxNarrowRowBytes = 8192;
constexpr int kNumMaxNarrowBlocks = 16;

struct StageLayout {
    int num_x_bytes;
    int num_meta_bytes;
    HEP_HOST_DEVICE int stride() const { return (num_x_bytes + num_meta_bytes + 127) / 128 * 128; }
};

// Shared state of the sender (lane 0 reads and writes it).
struct SenderState {
    int sent[kNumMaxKernelRanks];       // rows written into the ring at each rank
    int head_seen[kNumMaxKernelRanks];  // last head read for each rank
    int published[kNumMaxKernelRanks];  // last tail published to each rank
};

// Receiver group task, written by the group leader.
struct RecvTask {
    int src_rank;  // -1: the group is done
    int ring_idx;  // the source's sender: ring (ring_idx, src_rank)
    int first;     // first ring row to copy
    int count;     // rows to copy
};

// Scales a lane keeps in registers while they are in flight (hidden up to 32 x 4 x 128 channels); wider rows load
// the rest when they are written.
constexpr int kNumScaleRegs = 4;

// The metadata of one token, loaded into registers one token before it is written into its stage.
struct TokenMeta {
    int64_t expert_idx;           // lane < num_topk
    float weight;                 // lane < num_topk
    int recv_row;                 // lane < num_ranks: the token's receive row at that rank, or -1
    float scales[kNumScaleRegs];  // scale lane + 32 * i
};

__device__ __forceinline__ TokenMeta load_token_meta(const DispatchParams& p, int token_idx, int lane_idx) {
    TokenMeta meta;
    meta.expert_idx = -1;
    meta.weight = 0.0f;
    if (lane_idx < p.num_topk) {
        meta.expert_idx = __ldg(p.topk_idx + static_cast<int64_t>(token_idx) * p.num_topk + lane_idx);
        meta.weight = __ldg(p.topk_weights + static_cast<int64_t>(token_idx) * p.num_topk + lane_idx);
    }
    meta.recv_row =
        lane_idx < p.num_ranks ? __ldg(p.send_head + static_cast<int64_t>(token_idx) * p.num_ranks + lane_idx) : -1;
#pragma unroll
    for (int i = 0; i < kNumScaleRegs; ++i) {
        const int s = lane_idx + i * kWarpSize;
        meta.scales[i] =
            s < p.num_scales ? __ldg(p.x_scales + token_idx * p.scale_token_stride + s * p.scale_hidden_stride) : 0.0f;
    }
    return meta;
}

// The rings of a dispatch: kNumSenders per block and source, sharing the Config's slots.
template <int kNumSenders>
__device__ __forceinline__ RingLayout dispatch_rings(const DispatchParams& p, const DispatchMetaLayout& meta_layout) {
    return RingLayout{p.num_ranks, 2 * p.num_channels * kNumSenders, p.num_ring_slots / kNumSenders, p.num_x_bytes,
                      meta_layout.num_bytes()};
}

// The outputs of a peer that receives without a copy (its dispatch outputs lie in its output arena): rows go from the
// stage straight to `x` there, metadata from the filler's registers.
struct PeerOutputs {
    uint8_t* x;  // nullptr: the peer receives through its rings
    float* scales;
    int64_t* topk_idx;
    float* topk_weights;
    int* src_idx;
};

// Publishes where this rank's outputs lie (or that it receives through its rings) in its output record, tagged with
// the call's barrier epoch (device/layout.cuh). One thread of the grid.
__device__ __forceinline__ void publish_output_record(const DispatchParams& p) {
    void* local = p.buffer_ptrs[p.rank];
    for (int i = 0; i < kNumDispatchOutputs; ++i)
        reinterpret_cast<volatile int64_t*>(NvlBufferLayout::record_offsets(local))[i] = p.out_offsets[i];
    ptx::st_release_sys(NvlBufferLayout::record_tag(local), *NvlBufferLayout::epoch(local));
}

// Returns: the outputs of peer `peer` if it receives without a copy, read from its output record once the record
// carries this call's tag (a bounded wait: the peer writes it when its dispatch kernel starts).
__device__ __forceinline__ PeerOutputs read_peer_outputs(const DispatchParams& p, int peer) {
    PeerOutputs out{};
    if (peer == p.rank || p.arena_ptrs[peer] == nullptr)
        return out;
    void* remote = p.buffer_ptrs[peer];
    const int epoch = *NvlBufferLayout::epoch(p.buffer_ptrs[p.rank]);
    wait_peer_value(NvlBufferLayout::record_tag(remote), epoch, p.num_timeout_cycles, "dispatch", p.rank,
                    "the output record (tag)", peer);
    const auto* offsets = reinterpret_cast<const volatile int64_t*>(NvlBufferLayout::record_offsets(remote));
    const auto at = [&](int part) {
        const int64_t offset = offsets[part];
        return offset < 0 ? nullptr : static_cast<uint8_t*>(p.arena_ptrs[peer]) + offset;
    };
    out.x = at(kOutX);
    if (out.x == nullptr)
        return out;
    out.scales = reinterpret_cast<float*>(at(kOutScales));
    out.topk_idx = reinterpret_cast<int64_t*>(at(kOutTopkIdx));
    out.topk_weights = reinterpret_cast<float*>(at(kOutTopkWeights));
    out.src_idx = reinterpret_cast<int*>(at(kOutSrcIdx));
    return out;
}

// Shared state of one sender: the issuer's counters, and the stages it shares with the filler.
template <int kNumStages, int kPublishLag>
struct SenderShared {
    SenderState state;
    SentHistory<kPublishLag + 1> history;
    StageBarriers<kNumStages> stages;                // stage filled: metadata written, row loaded
    StageBarriers<kNumStages> free_stages;           // stage free again: its stores have read it
    int stage_rows[kNumStages][kNumMaxKernelRanks];  // receive row of a stage's token at each rank, or -1
    int stage_token[kNumStages];                     // a stage's token, or -1: the sender has no more tokens
    PeerOutputs outputs[kNumMaxKernelRanks];         // where rows for each peer go directly (zero copy), if anywhere
};

// Filler warp of sender `sender_idx`: writes every token's metadata into its stage, and this rank's own copy of it
// straight into the outputs, then starts the load of the token's row (`stages_smem`: the sender's stages).
template <int kNumSenders, int kNumStages, int kPublishLag>
__device__ void run_filler(const DispatchParams& p, uint8_t* stages_smem, SenderShared<kNumStages, kPublishLag>& shared,
                           int sender_idx) {
    const int lane_idx = ptx::get_lane_idx();
    const int rank = p.rank, num_ranks = p.num_ranks;
    const DispatchMetaLayout meta_layout{p.num_topk, p.num_scales, num_ranks};
    const StageLayout stage_layout{p.num_x_bytes, meta_layout.num_bytes()};
    const auto stage_ptr = [&](int k) { return stages_smem + (k % kNumStages) * stage_layout.stride(); };
    // The issuer initialises the barriers.
    ptx::named_barrier_sync(Roles<kNumSenders>::kFirstSenderBarrier + sender_idx, 2 * kWarpSize);

    // Every lane of the filler: writes the metadata of token k into its (free) stage and this rank's own copy of it
    // straight into the outputs, then starts the load of the token's row; the stage's barrier completes once both
    // are there.
    const auto fill_stage = [&](int k, int token_idx, const TokenMeta& meta) {
        uint8_t* stage = stage_ptr(k);
        uint8_t* stage_meta = stage + p.num_x_bytes;
        if (lane_idx == 0) {
            *reinterpret_cast<int*>(stage_meta) = token_idx;
            shared.stage_token[k % kNumStages] = token_idx;
        }
        if (lane_idx < p.num_topk) {
            reinterpret_cast<int64_t*>(stage_meta + meta_layout.topk_idx_offset())[lane_idx] = meta.expert_idx;
            reinterpret_cast<float*>(stage_meta + meta_layout.weights_offset())[lane_idx] = meta.weight;
        }
        auto* stage_scales = reinterpret_cast<float*>(stage_meta + meta_layout.scales_offset());
#pragma unroll
        for (int i = 0; i < kNumScaleRegs; ++i)
            if (lane_idx + i * kWarpSize < p.num_scales)
                stage_scales[lane_idx + i * kWarpSize] = meta.scales[i];
        for (int s = lane_idx + kNumScaleRegs * kWarpSize; s < p.num_scales; s += kWarpSize)
            stage_scales[s] = p.x_scales[token_idx * p.scale_token_stride + s * p.scale_hidden_stride];
        if (lane_idx < num_ranks) {
            shared.stage_rows[k % kNumStages][lane_idx] = meta.recv_row;
            reinterpret_cast<int*>(stage_meta + meta_layout.recv_rows_offset())[lane_idx] = meta.recv_row;
        }

        // The token's metadata, localised for rank `dst`, into outputs there (this rank's own, or a peer's that
        // receives without a copy); nullptr for an output the call does not have.
        // NOTES: which outputs a call has is read from the destination's pointers, not this rank's: a rank that
        // receives no rows has empty outputs, whose data pointers are null.
        const auto write_outputs = [&](int dst, int64_t row, int* src_idx, int64_t* topk_idx, float* topk_weights,
                                       float* scales) {
            if (src_idx != nullptr && lane_idx == 0)
                src_idx[row] = token_idx;
            if (lane_idx < p.num_topk && topk_idx != nullptr) {
                const int64_t first = static_cast<int64_t>(dst) * p.num_local_experts;
                const bool is_local = meta.expert_idx >= first && meta.expert_idx < first + p.num_local_experts;
                topk_idx[row * p.num_topk + lane_idx] = is_local ? meta.expert_idx - first : -1;
                topk_weights[row * p.num_topk + lane_idx] = is_local ? meta.weight : 0.0f;
            }
            if (scales != nullptr)
                for (int s = lane_idx; s < p.num_scales; s += kWarpSize)
                    scales[row * p.num_scales + s] = stage_scales[s];
        };
        for (int d = 0; d < num_ranks; ++d) {
            const int row = __shfl_sync(0xffffffff, meta.recv_row, d);
            if (row < 0)
                continue;
            if (d == rank) {
                write_outputs(d, row, p.recv_src_idx, p.recv_topk_idx, p.recv_topk_weights, p.recv_scales);
            } else if (const PeerOutputs& out = shared.outputs[d]; out.x != nullptr) {
                write_outputs(d, row, out.src_idx, out.topk_idx, out.topk_weights, out.scales);
            }
        }
        // NOTES: the metadata written above is read by the issuer's bulk stores (async proxy) once it sees the
        // stage's barrier complete, which lane 0's arrival (release) below orders after every lane's writes.
        ptx::fence_proxy_async_shared();
        __syncwarp();
        if (lane_idx == 0)
            shared.stages.load(k, ptx::smem_addr(stage),
                               static_cast<const uint8_t*>(p.x) + static_cast<int64_t>(token_idx) * p.num_x_bytes,
                               p.num_x_bytes);
    };

    // Lane 0 takes the next p.num_claim_tokens tokens of this rank (a claim on the rank's shared counter); every lane
    // gets the first of them, num_tokens or more once every token is taken.
    // NOTES: blocks send at different speeds (on 4 H200 GPUs the 8 blocks that shared one group of SMs took up to
    // 1.7 times as long as the others for the same tokens), so fixed shares left the grid waiting for the slowest.
    int* claims = NvlBufferLayout::claim(p.buffer_ptrs[rank], 0);
    const auto claim = [&]() {
        int first = 0;
        if (lane_idx == 0)
            first = atomicAdd(claims, 1) * p.num_claim_tokens;
        return __shfl_sync(0xffffffff, first, 0);
    };

    // NOTES: a warp of its own fills the stages, so the issuer's lane does nothing but issue bulk copies; as
    // one warp, filling took about a fifth of the sender's time on 4 H200 GPUs. The metadata of the next token
    // is always in flight, and the claim after the current one is taken when the current one starts. Token k of
    // the sender reuses the stage of token k - kNumStages once the issuer frees it.
    int claim_end = 0, next_claim = claim();
    const auto advance = [&](int token) {
        if (token + 1 < claim_end)
            return token + 1;
        // The next claim starts: take the one after it.
        const int first = next_claim;
        claim_end = min(first + p.num_claim_tokens, p.num_tokens);
        if (first < p.num_tokens)
            next_claim = claim();
        return first;
    };
    int token_idx = advance(-1);
    TokenMeta next_meta;
    if (token_idx < p.num_tokens)
        next_meta = load_token_meta(p, token_idx, lane_idx);
    int k = 0;
    for (; token_idx < p.num_tokens; ++k) {
        const TokenMeta meta = next_meta;
        const int next_token = advance(token_idx);
        if (next_token < p.num_tokens)
            next_meta = load_token_meta(p, next_token, lane_idx);
        if (k >= kNumStages && lane_idx == 0)
            shared.free_stages.wait(k - kNumStages, p.num_timeout_cycles, "dispatch (stage free)", rank);
        __syncwarp();
        fill_stage(k, token_idx, meta);
        token_idx = next_token;
    }
    // Stage k tells the issuer that there are no more tokens; the metadata this warp wrote into peers' outputs is
    // visible at system scope before that (the issuer's last tails follow it).
    __threadfence_system();
    __syncwarp();
    if (lane_idx == 0) {
        if (k >= kNumStages)
            shared.free_stages.wait(k - kNumStages, p.num_timeout_cycles, "dispatch (stage free)", rank);
        shared.stage_token[k % kNumStages] = -1;
        shared.stages.arrive(k);
    }
    __syncwarp();
}

// Issuer warp of sender `sender_idx`: its lane 0 stores each filled stage into the ring of every destination (or
// straight into recv_x for this rank), frees the stage once the stores have read it, and publishes the tails.
template <int kNumSenders, int kNumStages, int kNumPrefetch, int kPublishLag>
__device__ void run_issuer(const DispatchParams& p, uint8_t* stages_smem, SenderShared<kNumStages, kPublishLag>& shared,
                           int block_idx, int sender_idx) {
    static_assert(kNumPrefetch >= 0 && kNumPrefetch + 1 < kNumStages, "prefetch depth must be below the stage count");
    constexpr int kNumReadPending = kNumStages - kNumPrefetch - 1;
    SenderState& state = shared.state;
    auto& history = shared.history;
    const int lane_idx = ptx::get_lane_idx();
    const int rank = p.rank, num_ranks = p.num_ranks;
    const DispatchMetaLayout meta_layout{p.num_topk, p.num_scales, num_ranks};
    const StageLayout stage_layout{p.num_x_bytes, meta_layout.num_bytes()};
    const RingLayout rings = dispatch_rings<kNumSenders>(p, meta_layout);
    const int ring_idx = block_idx * kNumSenders + sender_idx;
    const auto stage_ptr = [&](int k) { return stages_smem + (k % kNumStages) * stage_layout.stride(); };

    if (lane_idx < kNumMaxKernelRanks)
        state.sent[lane_idx] = state.head_seen[lane_idx] = state.published[lane_idx] = 0;
    if (lane_idx == 0) {
        shared.stages.init();
        shared.free_stages.init();
    }
    if (lane_idx < num_ranks)
        shared.outputs[lane_idx] = read_peer_outputs(p, lane_idx);
    ptx::named_barrier_sync(Roles<kNumSenders>::kFirstSenderBarrier + sender_idx, 2 * kWarpSize);

    // Lane 0: makes tails up to `sent_after` visible at every peer (all bulk groups they count have completed).
    const auto publish = [&](const int* sent_after, bool is_last) {
        // NOTES: one system-scope fence orders every completed row before all the tails that follow (a release store
        // per peer would fence once per peer).
        ptx::fence_proxy_async_global();
        bool is_fenced = false;
        for (int d = 0; d < num_ranks; ++d) {
            if (d == rank)
                continue;
            const int value = sent_after[d] | (is_last ? kDoneBit : 0);
            if (value == state.published[d])
                continue;
            if (!is_fenced) {
                ptx::fence_acq_rel_sys();
                is_fenced = true;
            }
            ptx::st_relaxed_sys(NvlBufferLayout::tail(p.buffer_ptrs[d], kDispatchCounterSet, ring_idx, rank), value);
            state.published[d] = value;
        }
    };

    for (int k = 0;; ++k) {
        bool is_end = false;
        if (lane_idx == 0) {
            shared.stages.wait(k, p.num_timeout_cycles, "dispatch", rank);
            is_end = shared.stage_token[k % kNumStages] < 0;
        }
        if (__shfl_sync(0xffffffff, is_end, 0))
            break;
        if (lane_idx == 0) {
            const uint32_t stage_addr = ptx::smem_addr(stage_ptr(k));
            const int* rows = shared.stage_rows[k % kNumStages];
            // Rotate the destinations so the blocks of a rank do not all hit the same peer at once.
            for (int i = 0; i < num_ranks; ++i) {
                const int d = (rank + 1 + ring_idx + i) % num_ranks;
                const int row = rows[d];
                if (row < 0)
                    continue;
                uint8_t* direct = d == rank ? static_cast<uint8_t*>(p.recv_x) : shared.outputs[d].x;
                if (direct != nullptr) {
                    ptx::tma_store_1d(direct + static_cast<int64_t>(row) * p.num_x_bytes, stage_addr, p.num_x_bytes);
                    continue;
                }
                const int sent = state.sent[d];
                if (sent - state.head_seen[d] >= rings.num_slots) {
                    // NOTES: the ring may be full of rows not yet published; publish everything first (an extra
                    // bulk group only makes the later group waits stricter), or the receiver could never free it.
                    wait_ring_slot(NvlBufferLayout::head(p.buffer_ptrs[rank], kDispatchCounterSet, ring_idx, d), sent,
                                   rings.num_slots, state.head_seen[d], p.num_timeout_cycles, "dispatch", rank,
                                   sender_idx, d, [&]() {
                                       ptx::bulk_commit_group();
                                       ptx::bulk_wait_group<0>();
                                       publish(state.sent, false);
                                   });
                }
                const int slot = sent % rings.num_slots;
                // The row and its metadata, contiguous in the stage and in the slot.
                ptx::tma_store_1d(rings.x(p.buffer_ptrs[d], ring_idx, rank, slot), stage_addr,
                                  p.num_x_bytes + stage_layout.num_meta_bytes);
                state.sent[d] = sent + 1;
            }
            ptx::bulk_commit_group();
            history.record(k, state.sent, num_ranks);
            // Every num_chunk_tokens tokens: the tails of the token kPublishLag back, whose writes have landed.
            if ((k + 1) % p.num_chunk_tokens == 0 && k >= kPublishLag) {
                ptx::bulk_wait_group<kPublishLag>();
                publish(history.after(k - kPublishLag), false);
            }
            // The stage of token k - kNumReadPending is free once its stores have read it; the filler needs it
            // for token (or the end mark) k - kNumReadPending + kNumStages.
            ptx::bulk_wait_group_read<kNumReadPending>();
            if (k >= kNumReadPending)
                shared.free_stages.arrive(k - kNumReadPending);
        }
        __syncwarp();
    }

    if (lane_idx == 0) {
        ptx::bulk_wait_group<0>();
        publish(state.sent, true);
    }
    __syncwarp();
}

// Copies `count` ring rows [first, first + count) of ring (task.ring_idx, task.src_rank) out; this warp takes every
// `num_warps`-th row from `warp_rank`.
template <int kUnroll>
__device__ void copy_out(const DispatchParams& p, const RingLayout& rings, const DispatchMetaLayout& meta_layout,
                         const RecvTask& task, int warp_rank, int num_warps) {
    const int lane_idx = ptx::get_lane_idx();
    void* local = p.buffer_ptrs[p.rank];
    const int num_vectors = p.num_x_bytes / 16;
    const int64_t first_expert = static_cast<int64_t>(p.rank) * p.num_local_experts;
    for (int j = task.first + warp_rank; j < task.first + task.count; j += num_warps) {
        const int slot = j % rings.num_slots;
        const auto* src = reinterpret_cast<const int4*>(rings.x(local, task.ring_idx, task.src_rank, slot));
        const uint8_t* meta = rings.meta(local, task.ring_idx, task.src_rank, slot);
        // The row's place at this rank, which the source wrote into the metadata.
        const int64_t row = ptx::ld_cg(reinterpret_cast<const int*>(meta + meta_layout.recv_rows_offset()) + p.rank);
        auto* dst = reinterpret_cast<int4*>(static_cast<uint8_t*>(p.recv_x) + row * p.num_x_bytes);

        // NOTES: every load of a round is issued before its first use (metadata first), so a row costs one memory
        // latency per kUnroll vectors a lane moves, not one per vector.
        int src_idx = 0;
        int64_t expert_idx = -1;
        float weight = 0.0f;
        float scales[kNumScaleRegs];
        if (p.recv_src_idx != nullptr && lane_idx == 0)
            src_idx = ptx::ld_cg(reinterpret_cast<const int*>(meta));
        if (lane_idx < p.num_topk && p.recv_topk_idx != nullptr) {
            expert_idx =
                ptx::ld_cg_s64(reinterpret_cast<const int64_t*>(meta + meta_layout.topk_idx_offset()) + lane_idx);
            weight = ptx::ld_cg_f32(reinterpret_cast<const float*>(meta + meta_layout.weights_offset()) + lane_idx);
        }
#pragma unroll
        for (int i = 0; i < kNumScaleRegs; ++i)
            if (lane_idx + i * kWarpSize < p.num_scales)
                scales[i] = ptx::ld_cg_f32(reinterpret_cast<const float*>(meta + meta_layout.scales_offset()) +
                                           lane_idx + i * kWarpSize);
        for (int base = 0; base < num_vectors; base += kUnroll * kWarpSize) {
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * kWarpSize + lane_idx < num_vectors)
                    v[u] = ptx::ld_cg_v4(src + base + u * kWarpSize + lane_idx);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * kWarpSize + lane_idx < num_vectors)
                    ptx::st_na_v4(dst + base + u * kWarpSize + lane_idx, v[u]);
        }

        if (p.recv_src_idx != nullptr && lane_idx == 0)
            p.recv_src_idx[row] = src_idx;
        if (lane_idx < p.num_topk && p.recv_topk_idx != nullptr) {
            const bool is_local = expert_idx >= first_expert && expert_idx < first_expert + p.num_local_experts;
            p.recv_topk_idx[row * p.num_topk + lane_idx] = is_local ? expert_idx - first_expert : -1;
            p.recv_topk_weights[row * p.num_topk + lane_idx] = is_local ? weight : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kNumScaleRegs; ++i)
            if (lane_idx + i * kWarpSize < p.num_scales)
                p.recv_scales[row * p.num_scales + lane_idx + i * kWarpSize] = scales[i];
        for (int s = lane_idx + kNumScaleRegs * kWarpSize; s < p.num_scales; s += kWarpSize)
            p.recv_scales[row * p.num_scales + s] =
                ptx::ld_cg_f32(reinterpret_cast<const float*>(meta + meta_layout.scales_offset()) + s);
    }
}

template <int kNumSenders, int kNumRecvWarps, int kUnroll>
__device__ void run_receiver(const DispatchParams& p, int block_idx, int recv_warp_idx) {
    static_assert(kNumRecvWarps >= 1, "at least one receiver warp");
    constexpr int kNumMaxRecvRings = kNumMaxKernelRanks * kNumSenders;
    __shared__ RecvTask tasks[kNumRecvWarps];
    __shared__ int consumed[kNumMaxRecvRings];
    const int lane_idx = ptx::get_lane_idx();
    const int rank = p.rank, num_ranks = p.num_ranks;
    const int num_blocks = 2 * p.num_channels;
    const DispatchMetaLayout meta_layout{p.num_topk, p.num_scales, num_ranks};
    const RingLayout rings = dispatch_rings<kNumSenders>(p, meta_layout);

    // Padding rows after the received ones: zero data, -1 indices (spread over every receiver warp of the grid).
    const int num_recv_rows = p.rank_prefix_matrix[(num_ranks - 1) * num_ranks + rank];
    for (int64_t row = num_recv_rows + block_idx * kNumRecvWarps + recv_warp_idx; row < p.num_out_rows;
         row += static_cast<int64_t>(num_blocks) * kNumRecvWarps) {
        auto* dst = reinterpret_cast<int4*>(static_cast<uint8_t*>(p.recv_x) + row * p.num_x_bytes);
        for (int i = lane_idx; i < p.num_x_bytes / 16; i += kWarpSize)
            dst[i] = make_int4(0, 0, 0, 0);
        if (p.recv_src_idx != nullptr && lane_idx == 0)
            p.recv_src_idx[row] = -1;
        if (p.recv_topk_idx != nullptr && lane_idx < p.num_topk) {
            p.recv_topk_idx[row * p.num_topk + lane_idx] = -1;
            p.recv_topk_weights[row * p.num_topk + lane_idx] = 0.0f;
        }
        for (int s = lane_idx; s < p.num_scales; s += kWarpSize)
            p.recv_scales[row * p.num_scales + s] = 0.0f;
    }

    // Groups of warps, one or more rings each: ring j of this block is (sender j % kNumSenders of the (j /
    // kNumSenders + 1)-th peer after this rank).
    const int num_recv_rings = (num_ranks - 1) * kNumSenders;
    if (num_recv_rings == 0)
        return;
    const auto source_of = [&](int j) { return (rank + 1 + j / kNumSenders) % num_ranks; };
    const auto ring_idx_of = [&](int j) { return block_idx * kNumSenders + j % kNumSenders; };
    if (p.out_offsets[kOutX] >= 0) {
        // Peers write this rank's outputs themselves: wait until every sender of a peer that this block's rings
        // pair with has written its last row (its last tail carries kDoneBit, after its rows).
        static_assert(kNumMaxRecvRings <= kNumRecvWarps * kWarpSize, "a lane per ring");
        const int j = recv_warp_idx * kWarpSize + lane_idx;
        if (j < num_recv_rings) {
            const int* tail =
                NvlBufferLayout::tail(p.buffer_ptrs[rank], kDispatchCounterSet, ring_idx_of(j), source_of(j));
            timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
                const int observed = ptx::ld_acquire_sys(tail);
                if (!(observed & kDoneBit) && is_last_check)
                    printf(
                        "hybrid_ep dispatch timeout: rank %d, block %d waits for peer %d (sender %d) to finish "
                        "writing its rows: observed tail %d\n",
                        rank, block_idx, source_of(j), j % kNumSenders, observed);
                return !(observed & kDoneBit);
            });
        }
        return;
    }
    // Group g has warps [g * W / G, (g + 1) * W / G): every warp works, group sizes differ by at most one.
    const int num_groups = min(num_recv_rings, min(kNumRecvWarps, Roles<kNumSenders>::kNumMaxRecvGroups));
    const auto first_warp = [&](int g) { return g * kNumRecvWarps / num_groups; };
    int group_idx = 0;
    while (first_warp(group_idx + 1) <= recv_warp_idx)
        ++group_idx;
    const int warps_per_group = first_warp(group_idx + 1) - first_warp(group_idx);
    const int warp_rank = recv_warp_idx - first_warp(group_idx);
    const bool is_leader = warp_rank == 0 && lane_idx == 0;
    RecvTask& task = tasks[group_idx];
    // Rings of this group: j = group_idx, group_idx + num_groups, ...; the i-th is ring_of(i).
    const auto ring_of = [&](int i) { return group_idx + i * num_groups; };
    const int num_group_rings = (num_recv_rings - group_idx + num_groups - 1) / num_groups;
    if (is_leader)
        for (int i = 0; i < num_group_rings; ++i)
            consumed[ring_of(i)] = 0;

    unsigned done_mask = 0;
    int next = 0;
    int current_ring = 0;
    while (true) {
        if (is_leader) {
            task.src_rank = -1;
            if (done_mask != (1u << num_group_rings) - 1) {
                timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
                    for (int n = 0; n < num_group_rings; ++n) {
                        const int i = (next + n) % num_group_rings;
                        if (done_mask >> i & 1)
                            continue;
                        const int j = ring_of(i);
                        const int s = source_of(j), r = ring_idx_of(j);
                        const int tail =
                            ptx::ld_acquire_sys(NvlBufferLayout::tail(p.buffer_ptrs[rank], kDispatchCounterSet, r, s));
                        const int available = (tail & ~kDoneBit) - consumed[j];
                        if (available > 0) {
                            task = RecvTask{s, r, consumed[j], min(available, 8 * warps_per_group)};
                            current_ring = j;
                            next = (i + 1) % num_group_rings;
                            return false;
                        }
                        if (tail & kDoneBit) {
                            done_mask |= 1u << i;
                            if (done_mask == (1u << num_group_rings) - 1)
                                return false;
                        }
                        if (is_last_check)
                            printf(
                                "hybrid_ep dispatch timeout: rank %d, block %d waits for rows from peer %d (sender "
                                "%d): expected tail > %d, observed %d\n",
                                rank, block_idx, s, j % kNumSenders, consumed[j], tail & ~kDoneBit);
                    }
                    return true;
                });
            }
        }
        ptx::named_barrier_sync(1 + group_idx, warps_per_group * kWarpSize);
        const RecvTask current = task;
        if (current.src_rank < 0)
            break;
        copy_out<kUnroll>(p, rings, meta_layout, current, warp_rank, warps_per_group);
        ptx::named_barrier_sync(1 + group_idx, warps_per_group * kWarpSize);
        if (is_leader) {
            consumed[current_ring] += current.count;
            ptx::st_release_sys(
                NvlBufferLayout::head(p.buffer_ptrs[current.src_rank], kDispatchCounterSet, current.ring_idx, rank),
                consumed[current_ring]);
        }
    }
}

template <int kNumSenders, int kNumStages, int kNumPrefetch, int kPublishLag, int kNumWarps, int kRecvUnroll>
__global__ void __launch_bounds__((kNumWarps * kWarpSize), 1)
    dispatch_kernel(const __grid_constant__ DispatchParams params) {
    extern __shared__ __align__(128) uint8_t smem[];
    const int warp_idx = threadIdx.x / kWarpSize;
    if (blockIdx.x == 0 && threadIdx.x == 0)
        publish_output_record(params);
    __shared__ SenderShared<kNumStages, kPublishLag> senders[kNumSenders];
    if (warp_idx < 2 * kNumSenders) {
        const int sender_idx = warp_idx / 2;
        const DispatchMetaLayout meta_layout{params.num_topk, params.num_scales, params.num_ranks};
        uint8_t* stages_smem =
            smem + sender_idx * kNumStages * StageLayout{params.num_x_bytes, meta_layout.num_bytes()}.stride();
        if (warp_idx % 2 == 0)
            run_issuer<kNumSenders, kNumStages, kNumPrefetch, kPublishLag>(params, stages_smem, senders[sender_idx],
                                                                           blockIdx.x, sender_idx);
        else
            run_filler<kNumSenders, kNumStages, kPublishLag>(params, stages_smem, senders[sender_idx], sender_idx);
    } else
        run_receiver<kNumSenders, kNumWarps - 2 * kNumSenders, kRecvUnroll>(params, blockIdx.x,
                                                                            warp_idx - 2 * kNumSenders);
}

// Returns: the tokens a sender takes per claim when `num_senders` senders share `num_tokens` tokens: at most
// kNumMaxClaimTokens, fewer where a sender would otherwise get under kClaimsPerSender claims.
// NOTES: a claim costs one atomic on the rank's counter, taken one claim ahead. On 4 H200 GPUs (GB/s summed over
// the ranks at 8 / 16 / 20 / 24 SMs) claims of 2 tokens gave BF16 846 / 1564 / 1443 / 1334 and FP8 750 / 1308 /
// 1364 / 1506, against 846 / 1538 / 1370 / 1359 and 764 / 1324 / 1344 / 1338 with fixed shares; claims of 4 and of
// 5-8 tokens were no better than 2.
int claim_tokens(int num_tokens, int num_senders) {
    constexpr int kClaimsPerSender = 32, kNumMaxClaimTokens = 2;
    return std::max(std::min(num_tokens / (kClaimsPerSender * std::max(num_senders, 1)), kNumMaxClaimTokens), 1);
}

}  // namespace

void intranode_dispatch(const DispatchParams& params, size_t num_nvl_bytes, int smem_limit, cudaStream_t stream) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    HEP_CHECK(params.num_ranks <= kNumMaxKernelRanks, "dispatch: at most ", kNumMaxKernelRanks,
              " ranks per NVLink domain are supported, got ", params.num_ranks);
    HEP_CHECK(params.num_channels >= 1 && params.num_channels <= kNumMaxChannels, "dispatch: config.num_sms / 2 (",
              params.num_channels, " channels) must be in [1, ", kNumMaxChannels, "]");
    HEP_CHECK(params.num_x_bytes > 0 && params.num_x_bytes % 16 == 0,
              "dispatch: a row of x must be a positive multiple of 16 bytes, got ", params.num_x_bytes);
    HEP_CHECK(params.num_topk >= 0 && params.num_topk <= kNumMaxRingTopk, "dispatch: num_topk must be in [0, ",
              kNumMaxRingTopk, "], got ", params.num_topk);
    HEP_CHECK(params.num_ring_slots >= 2,
              "dispatch: config.num_max_nvl_chunked_recv_tokens must be at least 2 (one ring slot per sender of a "
              "block), got ",
              params.num_ring_slots);
    HEP_CHECK(params.num_chunk_tokens >= 1, "dispatch: config.num_max_nvl_chunked_send_tokens must be positive");
    const DispatchMetaLayout meta_layout{params.num_topk, params.num_scales, params.num_ranks};
    const int stage_bytes = StageLayout{params.num_x_bytes, meta_layout.num_bytes()}.stride();
    // Launches `kernel` with kNumSenders senders if its stages fit in shared memory beside the kernel's static
    // shared memory.
    const auto try_launch = [&](auto senders_tag, auto kernel, int num_warps, int num_stages) {
        constexpr int kNumSenders = decltype(senders_tag)::value;
        const size_t smem = static_cast<size_t>(kNumSenders) * num_stages * stage_bytes;
        if (smem + static_shared_bytes(kernel) > static_cast<size_t>(smem_limit))
            return false;
        const RingLayout rings{params.num_ranks, 2 * params.num_channels * kNumSenders,
                               params.num_ring_slots / kNumSenders, params.num_x_bytes, meta_layout.num_bytes()};
        HEP_CHECK(rings.num_bytes() <= num_nvl_bytes, "dispatch: the rings of this config need ", rings.num_bytes(),
                  " bytes of NVLink buffer, but the Buffer has num_nvl_bytes=", num_nvl_bytes,
                  "; create the Buffer with num_nvl_bytes >= config.get_nvl_buffer_size_hint(hidden_bytes, "
                  "num_ranks)");
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        DispatchParams launch_params = params;
        launch_params.num_claim_tokens = claim_tokens(params.num_tokens, 2 * params.num_channels * kNumSenders);
        kernel<<<2 * params.num_channels, num_warps * kWarpSize, smem, stream>>>(launch_params);
        return true;
    };
    // NOTES: the stage count, prefetch depth and publish lag changed little on 4 H200 GPUs (12 or 14 stages with
    // one sender, lag 8 to 40; 14 stages instead of 8 for FP8 rows of hidden 7168, 7 instead of 6 for BF16 ones);
    // the publish period (Config.num_max_nvl_chunked_send_tokens) did. Each sender gets its own stages; wider rows
    // get fewer.
    const auto launch_warps = [&](auto senders_tag, auto warps_tag, auto unroll_tag) {
        constexpr int kNumSenders = decltype(senders_tag)::value;
        constexpr int kWarps = decltype(warps_tag)::value, kUnroll = decltype(unroll_tag)::value;
        return try_launch(senders_tag, dispatch_kernel<kNumSenders, 8, 3, 6, kWarps, kUnroll>, kWarps, 8) ||
               try_launch(senders_tag, dispatch_kernel<kNumSenders, 6, 2, 4, kWarps, kUnroll>, kWarps, 6) ||
               try_launch(senders_tag, dispatch_kernel<kNumSenders, 4, 1, 3, kWarps, kUnroll>, kWarps, 4) ||
               try_launch(senders_tag, dispatch_kernel<kNumSenders, 2, 0, 2, kWarps, kUnroll>, kWarps, 2);
    };
    // NOTES: narrow rows (FP8 of hidden 7168) are limited by how fast the issuers issue, token by token: three
    // senders per block made FP8 dispatch 12-23% faster on 4 H200 GPUs at 8-16 SMs, but 6-9% slower at 20-24 SMs
    // (60 or more senders in the grid) and BF16 rows of hidden 7168 slower at every SM count. Narrow rows also
    // gain from more receiver warps: with 28 warps per block (22 or 24 receivers, 8 vectors per lane in flight)
    // FP8 dispatch reached 1355 against 1260 GB/s summed over the ranks at 16 SMs and 1337 against 1299 at 24
    // (24 warps: 1329, 32: 1304); BF16 rows of hidden 7168 did not move (1508-1531 against 1526 at 16 SMs, 20 to
    // 32 warps).
    const bool is_narrow_row = params.num_x_bytes <= kNumMaxNarrowRowBytes;
    const auto launch = [&](auto senders_tag) {
        if (is_narrow_row)
            return launch_warps(senders_tag, std::integral_constant<int, 28>{}, std::integral_constant<int, 8>{});
        return launch_warps(senders_tag, std::integral_constant<int, 16>{}, std::integral_constant<int, 12>{});
    };
    static_assert(3 * kNumMaxNarrowBlocks <= kNumMaxRings, "three senders' rings per block must fit the layout");
    const int num_blocks = 2 * params.num_channels;
    const int num_senders = is_narrow_row && num_blocks <= kNumMaxNarrowBlocks && params.num_ring_slots >= 3 ? 3 : 2;
    bool is_launched = HEP_SWITCH_INT(num_senders, "dispatch: senders per block", launch, 2, 3);
    // Three senders' stages may not fit in shared memory where two senders' do.
    if (!is_launched && num_senders == 3)
        is_launched = launch(std::integral_constant<int, 2>{});
    HEP_CHECK(is_launched, "dispatch: a row of ", params.num_x_bytes, " bytes is too wide for shared memory (",
              smem_limit, " bytes per block)");
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
