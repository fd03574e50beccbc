// torchlns._C: the native CPU backend of torchlns.
//
// Importing the module registers the CPU kernels of the torchlns:: ops (codec_cpu.cpp,
// mac_cpu.cpp, conv_cpu.cpp, each with TORCH_LIBRARY_IMPL; the schemas are declared in
// torchlns/ops/library.py). The Python module itself only reports how it was built, so that
// torchlns.backend_info() can show what serves the CPU.

#include <torch/extension.h>

#include <string>

#include "common.h"
#include "weight_cache.h"

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
  info["cpu_isa"] = torchlns::isa_name(torchlns::cpu_isa());
  info["isa"] = torchlns::isa_name(torchlns::active_isa());
  return info;
}

void set_mac_path(const std::string& name) {
  using torchlns::MacPath;
  if (name == "auto") return torchlns::set_mac_path(MacPath::automatic);
  if (name == "direct") return torchlns::set_mac_path(MacPath::direct);
  if (name == "classes") return torchlns::set_mac_path(MacPath::classes);
  if (name == "scalar") return torchlns::set_mac_path(MacPath::scalar);
  TORCH_CHECK(false, "unknown MAC kernel '", name, "'; expected auto, direct, classes or scalar");
}

std::string mac_path() {
  switch (torchlns::mac_path()) {
    case torchlns::MacPath::direct:
      return "direct";
    case torchlns::MacPath::classes:
      return "classes";
    case torchlns::MacPath::scalar:
      return "scalar";
    default:
      return "auto";
  }
}

void set_isa(const std::string& name) {
  TORCH_CHECK(torchlns::set_isa_by_name(name), "unknown instruction-set level '", name,
              "'; expected baseline, avx2 or avx512");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchlns native CPU backend: registers the torchlns:: CPU kernels on import";
  m.def("build_info", &build_info,
        "How this extension was built and runs: compiler, OpenMP, ATen intra-op threads, C++ standard, the "
        "CPU's instruction-set level and the one in use.");
  m.def("isa", [] { return std::string(torchlns::isa_name(torchlns::active_isa())); },
        "The instruction-set level the kernels use now (see Note: instruction sets in csrc/common.h).");
  m.def("cpu_isa", [] { return std::string(torchlns::isa_name(torchlns::cpu_isa())); },
        "The best instruction-set level this CPU supports.");
  m.def("set_isa", &set_isa, "Force an instruction-set level at or below the CPU's (baseline, avx2, avx512).");
  m.def("set_mac_path", &set_mac_path, "Force the LNS MAC kernel: auto, direct, classes or scalar (for tests).");
  m.def("mac_path", &mac_path, "The LNS MAC kernel setting.");
  m.def("weight_cache_stats", [] {
    const auto s = torchlns::weight_cache_stats();
    py::dict d;
    d["entries"] = s.entries;
    d["bytes"] = s.bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["builds"] = s.builds;
    d["capacity_bytes"] = s.capacity_bytes;
    return d;
  }, "Prepared-weight cache counters (see Note: prepared weights in csrc/weight_cache.h).");
  m.def("direct_counts", [] {
    const auto c = torchlns::direct_counts();
    py::dict d;
    d["table"] = c.table;
    d["pairs"] = c.pairs;
    d["declined"] = c.declined;
    d["blocks_unchanged"] = c.blocks_unchanged;
    d["blocks_repaired"] = c.blocks_repaired;
    d["blocks_columns"] = c.blocks_columns;
    return d;
  }, "How often the direct LNS kernels ran with tables, with product pairs, or declined a call, and how dynamic blocks of narrow groups ran.");
  m.def("telemetry_start", &torchlns::telemetry_start,
        "Zero the fixed accumulator's telemetry counters and start counting (see Note: accumulator telemetry).");
  m.def("telemetry_stop", [] {
    const auto c = torchlns::telemetry_stop();
    py::dict d;
    d["outputs"] = c.outputs;
    d["overflow"] = c.overflow;
    d["max_abs"] = c.max_abs;
    d["chunks"] = c.chunks;
    d["chunk_overflow"] = c.chunk_overflow;
    d["max_chunk"] = c.max_chunk;
    return d;
  }, "Stop counting; the fixed-accumulator totals seen since telemetry_start: outputs, overflow (|total| > T), "
     "max_abs (the largest |total|), and chunks, chunk_overflow, max_chunk of two-stage MACs.");
  m.def("act_counts", &torchlns::act_counts, py::arg("x"), py::arg("flush"), py::arg("sat"),
        "Of float32 CPU activations: how many have |x| > 0, |x| >= sat, and 0 < |x| < flush (telemetry).");
  m.def("code_hist", [](const at::Tensor& x, int64_t bits, int64_t kh, int64_t kw, std::vector<int64_t> stride,
                        std::vector<int64_t> pad_before, std::vector<int64_t> dilation, int64_t Ho, int64_t Wo) {
    return torchlns::code_hist(x, bits, kh, kw, stride, pad_before, dilation, Ho, Wo);
  }, "A 2-D convolution's per-tensor codes per (channel, tap) for telemetry: (C*kh*kw, 2^bits) read counts "
     "(Note: telemetry's tap histograms in csrc/conv_cpu.cpp).");
  m.def("blocks_tap_hist", [](const at::Tensor& x, int64_t x_off, int64_t frac_bits, int64_t groups, int64_t kh,
                              int64_t kw, std::vector<int64_t> stride, std::vector<int64_t> pad_before,
                              std::vector<int64_t> dilation, int64_t Ho, int64_t Wo, int64_t x_block,
                              int64_t x_block_bits) {
    return torchlns::blocks_tap_hist(x, x_off, frac_bits, groups, kh, kw, stride, pad_before, dilation, Ho, Wo,
                                     x_block, x_block_bits);
  }, "A 2-D convolution's dynamic-block logs per (channel, tap) for telemetry: (hist, lo, reads, saturated, flushed) "
     "(Note: telemetry's tap histograms in csrc/conv_cpu.cpp).");
  m.def("reset_direct_counts", &torchlns::reset_direct_counts, "Zero the direct-kernel counters.");
  m.def("clear_weight_cache", &torchlns::clear_weight_cache, "Drop every prepared weight.");
  m.def("set_weight_cache_capacity", &torchlns::set_weight_cache_capacity, "Cache capacity in bytes (0: off).");
  m.def("isa_env_error", &torchlns::isa_env_error, "Why TORCHLNS_ISA was refused, or an empty string.");
}
