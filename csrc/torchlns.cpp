// torchlns._C: the native CPU backend of torchlns.
//
// Importing the module registers the CPU kernels of the torchlns:: ops (codec_cpu.cpp,
// mac_cpu.cpp, conv_cpu.cpp, each with TORCH_LIBRARY_IMPL; the schemas are declared in
// torchlns/ops/library.py). The Python module itself only reports how it was built, so that
// torchlns.backend_info() can show what serves the CPU.

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
  m.doc() = "torchlns native CPU backend: registers the torchlns:: CPU kernels on import";
  m.def("build_info", &build_info,
        "How this extension was built: compiler, OpenMP, ATen intra-op threads, C++ standard.");
}
