// The extension module `hybrid_ep._C`: each runtime module registers its own functions.
// Preconditions: built by setup.py, which defines TORCH_EXTENSION_NAME.
#include <pybind11/pybind11.h>

#include "runtime/buffer.hpp"
#include "runtime/build_info.hpp"
#include "runtime/layout.hpp"
#include "runtime/permute.hpp"
#include "runtime/topology/topology.hpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "hybrid_ep CUDA extension";
    hybrid_ep::build_info::register_apis(m);
    hybrid_ep::layout::register_apis(m);
    hybrid_ep::permute::register_apis(m);
    hybrid_ep::runtime::register_apis(m);
    hybrid_ep::topology::register_apis(m);
}
