// Which instruction-set level the kernels use (see Note: instruction sets in common.h).

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common.h"

namespace torchlns {
namespace {

Isa detect() {
#ifdef TORCHLNS_X86_INTRINSICS
  __builtin_cpu_init();
  const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  if (v4 && v3) return Isa::avx512;
  if (v3) return Isa::avx2;
#endif
  return Isa::baseline;
}

bool parse(const char* s, Isa* out) {
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512})
    if (std::strcmp(s, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  return false;
}

// The level from TORCHLNS_ISA, read once at load. A bad value cannot raise here (this runs
// while the extension loads), so it is remembered; torchlns/ops/backend.py raises it.
std::string& env_error() {
  static std::string e;
  return e;
}

int initial_level() {
  const Isa cpu = cpu_isa();
  const char* env = std::getenv("TORCHLNS_ISA");
  if (!env || !*env) return int(cpu);
  Isa want;
  if (!parse(env, &want)) {
    env_error() = std::string("TORCHLNS_ISA=") + env + " is not one of baseline, avx2, avx512";
    return int(cpu);
  }
  if (int(want) > int(cpu)) {
    env_error() = std::string("TORCHLNS_ISA=") + env + " but this CPU supports at most " + isa_name(cpu);
    return int(cpu);
  }
  return int(want);
}

std::atomic<int>& level() {
  static std::atomic<int> l{initial_level()};
  return l;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

Isa cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  return Isa(level().load(std::memory_order_relaxed));
}

void set_isa(Isa isa) {
  TORCH_CHECK(int(isa) <= int(cpu_isa()), "torchlns: cannot force ", isa_name(isa), ": this CPU supports at most ",
              isa_name(cpu_isa()));
  env_error().clear();
  level().store(int(isa), std::memory_order_relaxed);
}

std::string isa_env_error() {
  level();  // reads the environment
  return env_error();
}

bool set_isa_by_name(const std::string& name) {
  Isa isa;
  if (!parse(name.c_str(), &isa)) return false;
  set_isa(isa);
  return true;
}

namespace {
std::atomic<int>& path_setting() {
  static std::atomic<int> p{0};
  return p;
}
}  // namespace

MacPath mac_path() { return MacPath(path_setting().load(std::memory_order_relaxed)); }
void set_mac_path(MacPath path) { path_setting().store(int(path), std::memory_order_relaxed); }

}  // namespace torchlns
