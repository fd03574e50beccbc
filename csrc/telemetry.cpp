// The fixed accumulator's telemetry counters (see Note: accumulator telemetry in common.h).

#include <ATen/Parallel.h>

#include "common.h"

namespace torchlns {

std::atomic<bool> telemetry_flag{false};

namespace {

constexpr int kSlots = 256;  // ATen threads map onto slots modulo this; a shared slot stays exact (atomics)

struct alignas(64) Slot {
  std::atomic<int64_t> outputs{0}, overflow{0}, max_abs{0}, chunks{0}, chunk_overflow{0}, max_chunk{0};
};
Slot slots[kSlots];

}  // namespace

void telemetry_record(int64_t total, int64_t T, bool wrap, bool chunk) {
  Slot& s = slots[at::get_thread_num() & (kSlots - 1)];
  const int64_t mag = total < 0 ? (total == INT64_MIN ? INT64_MAX : -total) : total;
  (chunk ? s.chunks : s.outputs).fetch_add(1, std::memory_order_relaxed);
  if (total > T || total < (wrap ? -T - 1 : -T)) (chunk ? s.chunk_overflow : s.overflow).fetch_add(1, std::memory_order_relaxed);
  std::atomic<int64_t>& top = chunk ? s.max_chunk : s.max_abs;
  int64_t seen = top.load(std::memory_order_relaxed);
  while (mag > seen && !top.compare_exchange_weak(seen, mag, std::memory_order_relaxed)) {
  }
}

void telemetry_start() {
  for (auto& s : slots) s.outputs = 0, s.overflow = 0, s.max_abs = 0, s.chunks = 0, s.chunk_overflow = 0, s.max_chunk = 0;
  telemetry_flag.store(true);
}

TelemetryCounts telemetry_stop() {
  telemetry_flag.store(false);
  TelemetryCounts c{0, 0, 0, 0, 0, 0};
  for (auto& s : slots) {
    c.outputs += s.outputs.load();
    c.overflow += s.overflow.load();
    c.max_abs = std::max(c.max_abs, s.max_abs.load());
    c.chunks += s.chunks.load();
    c.chunk_overflow += s.chunk_overflow.load();
    c.max_chunk = std::max(c.max_chunk, s.max_chunk.load());
  }
  return c;
}

}  // namespace torchlns
