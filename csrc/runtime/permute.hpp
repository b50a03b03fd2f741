// Torch entry points of the permuted-layout row movers (see runtime/permute.cpp).
// Preconditions: none.
#pragma once

#include <pybind11/pybind11.h>

namespace hybrid_ep::permute {

// Registers `gather_rows` and `sum_row_copies` on the extension module.
void register_apis(pybind11::module_& m);

}  // namespace hybrid_ep::permute
