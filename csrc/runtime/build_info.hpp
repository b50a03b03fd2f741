// What the extension was built with (see runtime/build_info.cpp).
// Preconditions: none.
#pragma once

#include <pybind11/pybind11.h>

namespace hybrid_ep::build_info {

// Registers `HEPException`, `build_info` and `_test_raise_host_assert` on the extension module.
void register_apis(pybind11::module_& m);

}  // namespace hybrid_ep::build_info
