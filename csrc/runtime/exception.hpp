// Host-side errors: `HEPException` carries "file:line: message"; `HEP_HOST_ASSERT`, `HEP_HOST_ASSERT_MSG`,
// `CUDA_CHECK` (runtime API) and `CU_CHECK` (driver API) throw it. pybind11 turns it into a Python RuntimeError
// (see `register_apis` in runtime/build_info.cpp).
// Preconditions: none. No torch headers.
// NOTES: the one runtime header that kernel launchers (csrc/kernels/) include, since they must reject bad
// arguments and report launch errors; it therefore stays free of torch and pybind11.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <exception>
#include <string>
#include <type_traits>

namespace hybrid_ep {

class HEPException : public std::exception {
public:
    HEPException(const char* file, int line, const std::string& message)
        : what_(std::string(trim_path(file)) + ":" + std::to_string(line) + ": " + message) {}

    const char* what() const noexcept override { return what_.c_str(); }

private:
    // NOTES: `__FILE__` is the absolute path of the build tree; from `csrc/` on is what a reader can find.
    static const char* trim_path(const char* file) {
        const char* csrc = std::strstr(file, "csrc/");
        return csrc != nullptr ? csrc : file;
    }

    std::string what_;
};

namespace detail {

// Message pieces as text. NOTES: no iostreams: numbers formatted through std::ostream inside this extension have
// crashed (in the locale's num_put facet) when it was built with a host compiler whose libstdc++ differs from the
// one torch was built with; std::to_string uses no locale.
inline std::string to_text(const std::string& text) {
    return text;
}
inline std::string to_text(const char* text) {
    return text;
}
inline std::string to_text(bool value) {
    return value ? "true" : "false";
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string to_text(T value) {
    return std::to_string(value);
}

template <typename... Args>
std::string concat(const Args&... args) {
    std::string out;
    ((out += to_text(args)), ...);
    return out;
}

}  // namespace detail

}  // namespace hybrid_ep

// Input checks of the torch-facing functions: `HEP_CHECK(cond, "x must be ...", value, ...)` throws `HEPException`
// with the pieces (strings and numbers) joined. NOTES: used instead of TORCH_CHECK, whose message is built with
// iostreams (see `detail::to_text`).
#define HEP_CHECK(cond, ...)                                                                           \
    do {                                                                                               \
        if (!(cond))                                                                                   \
            throw hybrid_ep::HEPException(__FILE__, __LINE__, hybrid_ep::detail::concat(__VA_ARGS__)); \
    } while (0)

#define HEP_HOST_ASSERT(cond)                                                                             \
    do {                                                                                                  \
        if (!(cond))                                                                                      \
            throw hybrid_ep::HEPException(__FILE__, __LINE__, std::string("assertion failed: ") + #cond); \
    } while (0)

#define HEP_HOST_ASSERT_MSG(cond, msg)                                                               \
    do {                                                                                             \
        if (!(cond))                                                                                 \
            throw hybrid_ep::HEPException(__FILE__, __LINE__,                                        \
                                          std::string("assertion failed: ") + #cond + ": " + (msg)); \
    } while (0)

#define CUDA_CHECK(expr)                                                                                      \
    do {                                                                                                      \
        const cudaError_t hep_status = (expr);                                                                \
        if (hep_status != cudaSuccess)                                                                        \
            throw hybrid_ep::HEPException(__FILE__, __LINE__,                                                 \
                                          std::string(#expr) + " failed: " + cudaGetErrorString(hep_status)); \
    } while (0)

// NOTES: using this macro needs the driver library at link time (libcuda, or a dlopen'ed entry point).
#define CU_CHECK(expr)                                                                                       \
    do {                                                                                                     \
        const CUresult hep_status = (expr);                                                                  \
        if (hep_status != CUDA_SUCCESS) {                                                                    \
            const char* hep_error = nullptr;                                                                 \
            cuGetErrorString(hep_status, &hep_error);                                                        \
            throw hybrid_ep::HEPException(                                                                   \
                __FILE__, __LINE__,                                                                          \
                std::string(#expr) + " failed: " + (hep_error != nullptr ? hep_error : "unknown CUresult")); \
        }                                                                                                    \
    } while (0)
