// Communication helpers shared by the NVLink and RDMA kernels: bounded waits on flags written by peers.
// Every wait on a value another GPU (or the host) writes goes through `timeout_while`, so a dead or stuck peer
// ends in a printed diagnostic and a trap, never in a hang.
// Preconditions: header-only, no torch headers.
#pragma once

#include <cstdint>
#include <cstdio>

#include "device/ptx.cuh"

namespace hybrid_ep {

// NOTES: about 50 s at 2 GHz; long enough for a slow peer under load, short enough that a test of a dead peer ends.
constexpr int64_t kNumDefaultTimeoutCycles = 100'000'000'000LL;

// Spins while `still_waiting(false)` returns true, for at most `num_timeout_cycles` SM clock cycles.
// Arguments:
//     num_timeout_cycles: budget in `clock64()` cycles of the calling SM.
//     still_waiting: `bool(bool is_last_check)`; returns true while the awaited value has not arrived. When the
//         budget is spent it is called once more with `is_last_check == true`: if it still returns true it must
//         first print its own diagnostic (rank, peer, channel, expected and observed values).
// Returns when the wait is over; traps after the last check fails.
// Example:
//     timeout_while(kNumDefaultTimeoutCycles, [&](bool is_last_check) {
//         const int observed = ptx::ld_acquire_sys(flag_ptr);
//         if (observed != expected && is_last_check)
//             printf("rank %d: timeout waiting for peer %d, channel %d: expected %d, observed %d\n", ...);
//         return observed != expected;
//     });
template <typename StillWaiting>
__device__ __forceinline__ void timeout_while(int64_t num_timeout_cycles, const StillWaiting& still_waiting) {
    const int64_t start_clock = clock64();
    while (still_waiting(false)) {
        if (clock64() - start_clock > num_timeout_cycles) {
            if (still_waiting(true))
                ptx::trap();
            return;
        }
    }
}

// Waits (bounded) until the int at `ptr`, which peer `peer` writes, reads `expected` (system-scope acquire, so
// what the peer wrote before it is visible after). On timeout prints "hybrid_ep <op> timeout: rank <rank> waits
// for <awaited> of peer <peer>: expected <expected>, observed <value>" and traps.
__device__ __forceinline__ void wait_peer_value(const int* ptr, int expected, int64_t num_timeout_cycles,
                                                const char* op, int rank, const char* awaited, int peer) {
    timeout_while(num_timeout_cycles, [&](bool is_last_check) {
        const int observed = ptx::ld_acquire_sys(ptr);
        if (observed != expected && is_last_check)
            printf("hybrid_ep %s timeout: rank %d waits for %s of peer %d: expected %d, observed %d\n", op, rank,
                   awaited, peer, expected, observed);
        return observed != expected;
    });
}

}  // namespace hybrid_ep
