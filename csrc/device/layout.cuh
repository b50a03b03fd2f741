// Layout of the NVLink buffer every rank allocates and shares with the ranks of its NVLink domain. The host sizes
// the allocation with it and kernels address it with it: this is the only place its offsets are computed.
//
//   [ barrier signals: int[kNumMaxNvlRanks] | barrier epoch: int | combine count: int | pad to 128 B ]
//   [ notify slots: int[kNumMaxNvlRanks][kNumNotifySlotInts] | pad to 128 B ]
//   [ ring tails, heads: each int[kNumCounterSets][kNumMaxRings][kNumMaxNvlRanks] | work claims: int[32] |
//     output record: int64 offsets[kNumDispatchOutputs], int tag | reads done: int[kNumMaxNvlRanks] | pad to 128 B ]
//   [ data: num_nvl_bytes ]
//
// Notify slot s of rank r's buffer is written by source rank s: its token count to every rank (kNumMaxNvlRanks ints),
// its count of (token, k) entries naming each of r's experts (kNumMaxLocalExperts ints), its inclusive count of
// tokens to r per channel (kNumMaxChannels ints), then its num_worst_tokens (dispatch), then two combine entries
// (CombineSlot below), written by the combine prelude (kernels/intranode/notify.cu) in turn: entry n % 2 in the
// source's n-th combine.
//
// Rings (RingLayout below) live in the data region; their counters in the tails/heads arrays, in one of
// kNumCounterSets sets: set 0 for dispatches, set 1 + n % 2 for a rank's n-th combine. Ring (block b, source s) of
// rank r: source s's block b writes rows into it and advances tails[set][b][s] of r's buffer; r's block b copies rows
// out and advances heads[set][b][r] of s's buffer. The work claims count the parts of a call's work this rank's
// blocks have taken (kernels/intranode/dispatch.cu). Every rank zeroes its own counters of a call's set at the start
// of the call, before its peers may write them (device/nvl_barrier.cuh).
//
// Reads done (pulling combine, kernels/intranode/combine_pull.cu): entry p of rank r's buffer counts what rank p's
// blocks have finished reading of r's combine inputs (each block adds its share as it finishes; complete at a fixed
// total); r's kernel ends only after every peer's is complete.
//
// The output record says where a dispatch may write this rank's outputs directly: the offset of each output
// (DispatchOutput below) in the rank's output arena, -1 for one the call does not have, or -1 for recv_x where rows
// go through the rings; then the barrier epoch of the call it belongs to (its tag, written last). Only the owner
// writes it, once per dispatch.
//
// Barrier protocol: in barrier number e (1, 2, ...), rank r adds 1 to signals[r] in every rank's buffer (its own
// included), then waits until its own signals[p] >= e for every p. The epoch, the count of barriers this rank has
// finished, lives in its own buffer, so the protocol needs no host state and replays inside CUDA graphs. So does the
// combine count, the combines this rank has begun (combine prelude; every rank makes the same combines).
//
// Combine protocol (no barrier): in its n-th combine, rank r zeroes its counter set 1 + n % 2 and its reads-done
// counts, then writes combine entry n % 2 of its slot in every rank's buffer, ending with n (release); each rank's
// combine kernels wait for entry n % 2 of every slot to read n. Two entries and two sets suffice: r's peers finished
// their combine n - 2 (reading entry n % 2, writing set 1 + n % 2 of r) before they wrote their entries of combine
// n - 1, which r waited for in its own.
// Preconditions: header-only, no torch headers; buffers are zeroed once at allocation and never reset.
#pragma once

#include <cstddef>
#include <cstdint>

// Layout code is shared with host-only translation units (compiled by the host compiler, without CUDA keywords).
#ifdef __CUDACC__
#define HEP_HOST_DEVICE __host__ __device__
#else
#define HEP_HOST_DEVICE
#endif

namespace hybrid_ep {

// Most ranks one NVLink domain may hold (an NVL72 rack).
constexpr int kNumMaxNvlRanks = 72;
// Most experts one rank may hold.
constexpr int kNumMaxLocalExperts = 1024;
// Most channels of a dispatch (Config.num_sms / 2), and most blocks of an intranode kernel.
constexpr int kNumMaxChannels = 64;
constexpr int kNumMaxBlocks = 2 * kNumMaxChannels;
// Most rings per (rank, source) pair: a dispatch block may run several senders, each with its own ring.
constexpr int kNumMaxRings = 2 * kNumMaxBlocks;
// Offsets (ints) inside one notify slot, and its size.
constexpr int kSlotExpertOffset = kNumMaxNvlRanks;
constexpr int kSlotChannelOffset = kSlotExpertOffset + kNumMaxLocalExperts;
constexpr int kSlotWorstOffset = kSlotChannelOffset + kNumMaxChannels;
constexpr int kSlotCombineOffset = kSlotWorstOffset + 2;

// One combine entry of a notify slot: the source's token count and where its combine inputs lie: the offsets of its
// x and of its top-k weights in its output arena (kernels/intranode/combine_inputs.cuh) and the rows of x; then the
// number of the combine it belongs to, written last (release).
struct CombineSlot {
    int64_t x_offset;
    int64_t weights_offset;
    int num_tokens;
    int num_x_rows;
    int seq;
    int pad;
};
constexpr int kNumCombineSlotInts = static_cast<int>(sizeof(CombineSlot) / sizeof(int));
constexpr int kNumNotifySlotInts = kSlotCombineOffset + 2 * kNumCombineSlotInts;
static_assert(kSlotCombineOffset % 2 == 0 && kNumNotifySlotInts % 2 == 0, "int64 slot fields must stay 8-byte aligned");
// Counter sets of the rings: dispatch, then two for combines taken in turn (NvlBufferLayout::combine_counter_set).
constexpr int kNumCounterSets = 3;
constexpr int kDispatchCounterSet = 0;

// The outputs of a dispatch that senders may write directly (zero copy), each a block of the receiver's output arena.
enum DispatchOutput { kOutX = 0, kOutScales, kOutTopkIdx, kOutTopkWeights, kOutSrcIdx, kNumDispatchOutputs };

struct NvlBufferLayout {
    static constexpr size_t kAlignment = 128;
    static constexpr int kNumClaims = 32;
    static constexpr int kNumRecordOffsets = kNumDispatchOutputs;

    size_t num_data_bytes;  // bytes the caller asked for (Buffer's num_nvl_bytes)

    HEP_HOST_DEVICE static constexpr size_t signal_offset() { return 0; }
    HEP_HOST_DEVICE static constexpr size_t epoch_offset() { return kNumMaxNvlRanks * sizeof(int); }
    HEP_HOST_DEVICE static constexpr size_t align(size_t bytes) {
        return (bytes + kAlignment - 1) / kAlignment * kAlignment;
    }
    HEP_HOST_DEVICE static constexpr size_t combine_count_offset() { return epoch_offset() + sizeof(int); }
    HEP_HOST_DEVICE static constexpr size_t notify_offset() { return align(combine_count_offset() + sizeof(int)); }
    HEP_HOST_DEVICE static constexpr size_t tails_offset() {
        return align(notify_offset() + sizeof(int) * kNumMaxNvlRanks * kNumNotifySlotInts);
    }
    HEP_HOST_DEVICE static constexpr size_t heads_offset() {
        return tails_offset() + sizeof(int) * kNumCounterSets * kNumMaxRings * kNumMaxNvlRanks;
    }
    HEP_HOST_DEVICE static constexpr size_t claims_offset() {
        return heads_offset() + sizeof(int) * kNumCounterSets * kNumMaxRings * kNumMaxNvlRanks;
    }
    HEP_HOST_DEVICE static constexpr size_t record_offset() { return claims_offset() + sizeof(int) * kNumClaims; }
    HEP_HOST_DEVICE static constexpr size_t reads_done_offset() {
        return record_offset() + sizeof(int64_t) * kNumRecordOffsets + sizeof(int);
    }
    HEP_HOST_DEVICE static constexpr size_t data_offset() {
        return align(reads_done_offset() + sizeof(int) * kNumMaxNvlRanks);
    }
    HEP_HOST_DEVICE size_t num_total_bytes() const { return data_offset() + num_data_bytes; }

    // [kNumMaxNvlRanks] barrier signals of the buffer starting at `base`.
    HEP_HOST_DEVICE static int* signals(void* base) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + signal_offset());
    }
    // The barrier epoch of the buffer starting at `base` (read and written by its owner only).
    HEP_HOST_DEVICE static int* epoch(void* base) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + epoch_offset());
    }
    // The combines the owner of the buffer starting at `base` has begun (read and written by its owner only).
    HEP_HOST_DEVICE static int* combine_count(void* base) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + combine_count_offset());
    }
    // [kNumNotifySlotInts] notify slot of source rank `src_rank` in the buffer starting at `base`.
    HEP_HOST_DEVICE static int* notify_slot(void* base, int src_rank) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + notify_offset()) + src_rank * kNumNotifySlotInts;
    }
    // The combine entry of the source's combine number `seq` in its notify slot in the buffer starting at `base`.
    HEP_HOST_DEVICE static CombineSlot* combine_slot(void* base, int src_rank, int seq) {
        return reinterpret_cast<CombineSlot*>(notify_slot(base, src_rank) + kSlotCombineOffset +
                                              (seq & 1) * kNumCombineSlotInts);
    }
    // The counter set of combine number `seq`.
    HEP_HOST_DEVICE static int combine_counter_set(int seq) { return 1 + (seq & 1); }
    // Tail of ring (ring_idx, src_rank) of counter set `set` in the buffer starting at `base`: rows the source has
    // written into it.
    HEP_HOST_DEVICE static int* tail(void* base, int set, int ring_idx, int src_rank) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + tails_offset()) +
               (set * kNumMaxRings + ring_idx) * kNumMaxNvlRanks + src_rank;
    }
    // Head of the ring (ring_idx) of counter set `set` that this buffer's owner writes at rank `dst_rank`: rows
    // `dst_rank` has read.
    HEP_HOST_DEVICE static int* head(void* base, int set, int ring_idx, int dst_rank) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + heads_offset()) +
               (set * kNumMaxRings + ring_idx) * kNumMaxNvlRanks + dst_rank;
    }
    // Work claim counter `i` (< kNumClaims) of the buffer starting at `base`, read and advanced by its owner's blocks.
    HEP_HOST_DEVICE static int* claim(void* base, int i) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + claims_offset()) + i;
    }
    // The output record of the buffer starting at `base`: offsets (int64[kNumRecordOffsets]), then the tag (int).
    HEP_HOST_DEVICE static int64_t* record_offsets(void* base) {
        return reinterpret_cast<int64_t*>(static_cast<uint8_t*>(base) + record_offset());
    }
    HEP_HOST_DEVICE static int* record_tag(void* base) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + record_offset() +
                                      sizeof(int64_t) * kNumRecordOffsets);
    }
    // Reads-done count of `src_rank` in the buffer starting at `base`: what src_rank's blocks have finished reading
    // of the combine inputs of this buffer's owner.
    HEP_HOST_DEVICE static int* reads_done(void* base, int src_rank) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + reads_done_offset()) + src_rank;
    }
    // Start of the data region of the buffer starting at `base`.
    HEP_HOST_DEVICE static uint8_t* data(void* base) { return static_cast<uint8_t*>(base) + data_offset(); }
};

// Most top-k entries a row carries through the rings (kernels/api.cuh kMaxNumTopk).
constexpr int kNumMaxRingTopk = 32;
// Most ranks of a domain the ring kernels serve (kernels/api.cuh kNumMaxKernelRanks).
constexpr int kNumMaxRingRanks = 8;

HEP_HOST_DEVICE constexpr int align16(int bytes) {
    return (bytes + 15) / 16 * 16;
}

// The per-row metadata of a dispatch ring slot, the same for every destination (the receiver localises and takes
// its own receive row):
//   [ source token: int | pad: int | top-k indices: int64[num_topk] | weights: float[num_topk] |
//     scales: float[num_scales] | receive row at each rank: int[num_ranks] | pad to 16 B ]
struct DispatchMetaLayout {
    int num_topk;    // 0 without top-k
    int num_scales;  // 0 for BF16
    int num_ranks;   // ranks of the domain
    HEP_HOST_DEVICE int topk_idx_offset() const { return 8; }
    HEP_HOST_DEVICE int weights_offset() const { return 8 + 8 * num_topk; }
    HEP_HOST_DEVICE int scales_offset() const { return 8 + 12 * num_topk; }
    HEP_HOST_DEVICE int recv_rows_offset() const { return 8 + 12 * num_topk + 4 * num_scales; }
    HEP_HOST_DEVICE int num_bytes() const { return align16(recv_rows_offset() + 4 * num_ranks); }
};

// The per-row metadata of a combine ring slot: [ source token: int | weights: float[num_topk] | pad to 16 B ].
struct CombineMetaLayout {
    int num_topk;  // 0 without weights
    HEP_HOST_DEVICE int weights_offset() const { return 4; }
    HEP_HOST_DEVICE int num_bytes() const { return align16(4 + 4 * num_topk); }
};

// The rings of one dispatch or combine call in the data region: one ring per (sender, source rank), each holding
// `num_slots` slots of [ x: num_x_bytes | meta: num_meta_bytes | pad to 128 B ], so a row and its metadata arrive in
// one bulk copy.
// A block with k senders owns k rings per source, which share the Config's ring slots (so the bytes are those of one
// ring per block).
struct RingLayout {
    int num_ranks;       // ranks of the domain
    int num_rings;       // rings per source rank: the kernel's blocks, times its senders per block
    int num_slots;       // ring capacity in rows (Config.num_max_nvl_chunked_recv_tokens / senders per block)
    int num_x_bytes;     // bytes of one row's data, a multiple of 16
    int num_meta_bytes;  // bytes of one row's metadata, a multiple of 16

    // NOTES: slots start on 128-byte boundaries; unaligned ones made BF16 dispatch 19% slower on 4 H200 GPUs.
    HEP_HOST_DEVICE size_t num_slot_bytes() const {
        return (static_cast<size_t>(num_x_bytes + num_meta_bytes) + 127) / 128 * 128;
    }
    HEP_HOST_DEVICE size_t num_ring_bytes() const { return static_cast<size_t>(num_slots) * num_slot_bytes(); }
    // Bytes of the data region all rings take.
    HEP_HOST_DEVICE size_t num_bytes() const {
        return static_cast<size_t>(num_rings) * static_cast<size_t>(num_ranks) * num_ring_bytes();
    }
    HEP_HOST_DEVICE uint8_t* ring(void* base, int ring_idx, int src_rank) const {
        return NvlBufferLayout::data(base) + (static_cast<size_t>(ring_idx) * num_ranks + src_rank) * num_ring_bytes();
    }
    // Row data of slot `slot_idx` of ring (ring_idx, src_rank) in the buffer starting at `base`.
    HEP_HOST_DEVICE uint8_t* x(void* base, int ring_idx, int src_rank, int slot_idx) const {
        return ring(base, ring_idx, src_rank) + static_cast<size_t>(slot_idx) * num_slot_bytes();
    }
    // Metadata of slot `slot_idx` of ring (ring_idx, src_rank).
    HEP_HOST_DEVICE uint8_t* meta(void* base, int ring_idx, int src_rank, int slot_idx) const {
        return x(base, ring_idx, src_rank, slot_idx) + num_x_bytes;
    }
};

// Returns: bytes of data region that calls with `num_blocks` blocks, `num_ranks` ranks and `num_slots`-row rings
// need for rows of `hidden_bytes` bytes at BF16 width, whatever the dtype (BF16 or FP8 with 128-channel scales) and
// top-k (up to kNumMaxRingTopk): the bound `Config.get_nvl_buffer_size_hint` returns.
HEP_HOST_DEVICE inline size_t ring_bytes_hint(int hidden_bytes, int num_ranks, int num_blocks, int num_slots) {
    const int dispatch_meta = DispatchMetaLayout{kNumMaxRingTopk, hidden_bytes / 256, kNumMaxRingRanks}.num_bytes();
    const int combine_meta = CombineMetaLayout{kNumMaxRingTopk}.num_bytes();
    const int meta = dispatch_meta > combine_meta ? dispatch_meta : combine_meta;
    return RingLayout{num_ranks, num_blocks, num_slots, align16(hidden_bytes), meta}.num_bytes();
}

}  // namespace hybrid_ep
