// The fixed accumulator's telemetry counters (see Note: accumulator telemetry in common.h).

#include <ATen/Parallel.h>

#include "common.h"

namespace torchlns {

std::atomic<bool> telemetry_flag{false};

namespace {

constexpr int kSlots = 256;  // ATen threads map onto slots modulo this; a shared slot stays exact (atomics)

struct alignas(64) Slot {
  std::atomic<int64_t> outputs{0}, overflow{0}, max_abs{0};
};
Slot slots[kSlots];

}  // namespace

void telemetry_record(int64_t total, int64_t T) {
  Slot& s = slots[at::get_thread_num() & (kSlots - 1)];
  const int64_t mag = total < 0 ? (total == INT64_MIN ? INT64_MAX : -total) : total;
  s.outputs.fetch_add(1, std::memory_order_relaxed);
  if (mag > T) s.overflow.fetch_add(1, std::memory_order_relaxed);
  int64_t seen = s.max_abs.load(std::memory_order_relaxed);
  while (mag > seen && !s.max_abs.compare_exchange_weak(seen, mag, std::memory_order_relaxed)) {
  }
}

void telemetry_start() {
  for (auto& s : slots) s.outputs = 0, s.overflow = 0, s.max_abs = 0;
  telemetry_flag.store(true);
}

TelemetryCounts telemetry_stop() {
  telemetry_flag.store(false);
  TelemetryCounts c{0, 0, 0};
  for (auto& s : slots) {
    c.outputs += s.outputs.load();
    c.overflow += s.overflow.load();
    c.max_abs = std::max(c.max_abs, s.max_abs.load());
  }
  return c;
}

}  // namespace torchlns
