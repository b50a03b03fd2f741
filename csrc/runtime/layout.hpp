// Torch entry points of the dispatch layout (see runtime/layout.cpp).
// Preconditions: none.
#pragma once

#include <pybind11/pybind11.h>

namespace hybrid_ep::layout {

// Registers `get_dispatch_layout` on the extension module.
void register_apis(pybind11::module_& m);

}  // namespace hybrid_ep::layout
