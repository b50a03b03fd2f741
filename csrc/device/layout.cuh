// Layout of the NVLink buffer every rank allocates and shares with the ranks of its NVLink domain. The host sizes
// the allocation with it and kernels address it with it: this is the only place its offsets are computed.
//
//   [ barrier signals: int[kNumMaxNvlRanks] | barrier epoch: int | pad to 128 B ]
//   [ notify slots: int[kNumMaxNvlRanks][kNumNotifySlotInts] | pad to 128 B ][ data: num_nvl_bytes ]
//
// Notify slot s of rank r's buffer is written by source rank s: its token count to every rank (kNumMaxNvlRanks ints)
// then its count of (token, k) entries naming each of r's experts (kNumMaxLocalExperts ints).
//
// Barrier protocol: in barrier number e (1, 2, ...), rank r adds 1 to signals[r] in every rank's buffer (its own
// included), then waits until its own signals[p] >= e for every p. The epoch, the count of barriers this rank has
// finished, lives in its own buffer, so the protocol needs no host state and replays inside CUDA graphs.
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
// Ints of one notify slot: counts to every rank, then counts to every local expert of the slot's owner.
constexpr int kNumNotifySlotInts = kNumMaxNvlRanks + kNumMaxLocalExperts;

struct NvlBufferLayout {
    static constexpr size_t kAlignment = 128;

    size_t num_data_bytes;  // bytes the caller asked for (Buffer's num_nvl_bytes)

    HEP_HOST_DEVICE static constexpr size_t signal_offset() { return 0; }
    HEP_HOST_DEVICE static constexpr size_t epoch_offset() { return kNumMaxNvlRanks * sizeof(int); }
    HEP_HOST_DEVICE static constexpr size_t align(size_t bytes) {
        return (bytes + kAlignment - 1) / kAlignment * kAlignment;
    }
    HEP_HOST_DEVICE static constexpr size_t notify_offset() { return align(epoch_offset() + sizeof(int)); }
    HEP_HOST_DEVICE static constexpr size_t data_offset() {
        return align(notify_offset() + sizeof(int) * kNumMaxNvlRanks * kNumNotifySlotInts);
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
    // [kNumNotifySlotInts] notify slot of source rank `src_rank` in the buffer starting at `base`.
    HEP_HOST_DEVICE static int* notify_slot(void* base, int src_rank) {
        return reinterpret_cast<int*>(static_cast<uint8_t*>(base) + notify_offset()) + src_rank * kNumNotifySlotInts;
    }
    // Start of the data region of the buffer starting at `base`.
    HEP_HOST_DEVICE static uint8_t* data(void* base) { return static_cast<uint8_t*>(base) + data_offset(); }
};

}  // namespace hybrid_ep
