// NVML topology probe of this machine's GPUs: names, PCI bus ids, NVLinks and what each reaches, P2P status and
// fabric (multi-node NVLink) membership. `hybrid_ep._C.probe_topology()` returns it as a dict; hybrid_ep/topology.py
// derives the NVLink domains from it.
// Preconditions: none. Needs no GPU: without NVML the result says why it is unavailable.
#pragma once

#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

namespace hybrid_ep::topology {

struct NvLink {
    int link_idx;                                  // NVLink number on its GPU
    bool active;                                   // link state enabled
    std::optional<std::string> remote_pci_bus_id;  // as NVML writes it; nullopt when inactive or unreadable
    std::string remote;                            // "gpu:<index>", "switch", "cpu" or "unknown"
};

struct Fabric {
    unsigned int clique_id;
    std::string cluster_uuid;  // 32 hex digits
    std::string state;         // "not_started", "in_progress" or "completed"
};

struct Gpu {
    int gpu_idx;  // NVML index (all GPUs of the machine, CUDA_VISIBLE_DEVICES ignored)
    std::string name;
    std::string pci_bus_id;  // "00000000:18:00.0"
    std::vector<NvLink> nvlinks;
    std::vector<std::pair<int, std::string>> p2p;  // (other gpu_idx, NVLink P2P status)
    std::optional<Fabric> fabric;                  // nullopt when not supported
};

struct Topology {
    bool available = false;
    std::optional<std::string> error;  // why not available, or the first per-GPU read that failed
    std::optional<std::string> driver_version;
    std::vector<Gpu> gpus;
};

// Probes through `library_name` (dlopen'ed). Never throws: failures are reported in `available` and `error`.
Topology probe(const std::string& library_name);

// Registers `probe_topology` on the extension module.
void register_apis(pybind11::module_& m);

}  // namespace hybrid_ep::topology
