// What the extension was built with, for `hybrid_ep.build_info()`; and the registration of `HEPException`.
// Preconditions: setup.py defines HEP_VERSION and HEP_ARCH_LIST (string literals); HEP_ENABLE_MULTINODE is
// defined when built with HYBRID_EP_MULTINODE=1. Needs no GPU.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <string>

#include "runtime/build_info.hpp"
#include "runtime/exception.hpp"

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#endif

#ifndef HEP_VERSION
#error "HEP_VERSION must be defined by setup.py"
#endif
#ifndef HEP_ARCH_LIST
#error "HEP_ARCH_LIST must be defined by setup.py"
#endif

namespace hybrid_ep::build_info {
namespace {

// Returns: a dict with `version`, `arch_list`, `cuda_version` ("13.0"), `torch_version` (None when the headers do
// not say) and `features` (str -> bool: which parts were compiled in).
pybind11::dict build_info() {
    pybind11::dict features;
    features["layout"] = true;
    features["nvl_runtime"] = true;
    features["intranode"] = true;
    features["internode"] = false;
    features["low_latency"] = false;
    features["nvshmem"] = false;
    features["nvml_topology"] = true;
#ifdef HEP_ENABLE_MULTINODE
    features["multinode_build"] = true;
#else
    features["multinode_build"] = false;
#endif

    pybind11::dict info;
    info["version"] = HEP_VERSION;
    info["arch_list"] = HEP_ARCH_LIST;
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#ifdef TORCH_VERSION
    info["torch_version"] = TORCH_VERSION;
#else
    info["torch_version"] = pybind11::none();
#endif
    info["features"] = features;
    return info;
}

// Always throws through HEP_HOST_ASSERT; tests check the message reaches Python as RuntimeError with file:line.
void test_raise_host_assert() {
    const int num_expected = 1;
    HEP_HOST_ASSERT(num_expected == 0);
}

}  // namespace

void register_apis(pybind11::module_& m) {
    // NOTES: pybind11 already turns any std::exception into RuntimeError(what()); registering the class makes it
    // catchable as `hybrid_ep._C.HEPException` too, still a subclass of RuntimeError.
    pybind11::register_exception<HEPException>(m, "HEPException", PyExc_RuntimeError);
    m.def("build_info", &build_info,
          "What the extension was built with: version, arch_list, cuda_version, "
          "torch_version and features (dict of bool).");
    m.def("_test_raise_host_assert", &test_raise_host_assert,
          "Raises RuntimeError from HEP_HOST_ASSERT (for tests of error propagation).");
}

}  // namespace hybrid_ep::build_info
