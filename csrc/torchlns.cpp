// torchlns._C: native CPU backend of torchlns.
//
// Placeholder for now: the bit-exact encode/decode and MAC kernels land in a later issue.
// Until then the module only reports how it was built, so that torchlns.backend_info()
// can show whether the native backend is present and what it was compiled with.

#include <torch/extension.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler_version();
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
#endif
  info["num_threads"] = at::get_num_threads();
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchlns native CPU backend (placeholder: build information only)";
  m.def("build_info", &build_info,
        "How this extension was built: compiler, OpenMP, ATen intra-op threads, C++ standard.");
}
