// Device-side assertions: `HEP_DEVICE_ASSERT(cond)` prints file:line and the condition, then traps.
// A trap ends the kernel and poisons the CUDA context; the host then sees the error at its next CUDA_CHECK.
// Preconditions: none. Header-only, no torch headers.
#pragma once

#include <cstdio>

#include "device/ptx.cuh"

// NOTES: checked in release builds too; a failed assert means a broken invariant that would otherwise hang or
// corrupt a peer's buffer, so stopping loudly is cheaper than debugging silent corruption.
#define HEP_DEVICE_ASSERT(cond)                                                        \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            printf("%s:%d: device assertion failed: %s\n", __FILE__, __LINE__, #cond); \
            hybrid_ep::ptx::trap();                                                    \
        }                                                                              \
    } while (0)
