// The fixed accumulator's telemetry counters (see Note: accumulator telemetry in common.h).

#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <mutex>

#include "common.h"

namespace torchlns {

std::atomic<bool> telemetry_flag{false};

namespace {

// One thread's counters. Only their thread writes them (a plain load and store, no locked
// read-modify-write); they are atomics only so that telemetry_stop may read them from another.
struct alignas(64) Counters {
  std::atomic<int64_t> outputs{0}, overflow{0}, max_abs{0}, chunks{0}, chunk_overflow{0}, max_chunk{0};
};

std::mutex registry_mutex;
std::vector<Counters*>& registry() {  // every live thread's counters that ever recorded
  static auto* r = new std::vector<Counters*>();
  return *r;
}
Counters& retired() {  // what threads that exited since telemetry_start had counted
  static auto* c = new Counters();
  return *c;
}

TORCHLNS_INLINE void bump(std::atomic<int64_t>& a, int64_t d) {
  a.store(a.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
}
TORCHLNS_INLINE void raise_to(std::atomic<int64_t>& a, int64_t v) {
  if (v > a.load(std::memory_order_relaxed)) a.store(v, std::memory_order_relaxed);
}

void zero(Counters& c) {
  for (auto* a : {&c.outputs, &c.overflow, &c.max_abs, &c.chunks, &c.chunk_overflow, &c.max_chunk}) a->store(0);
}

void fold(Counters& into, const Counters& c) {  // into is not being recorded to (held under the mutex)
  bump(into.outputs, c.outputs.load());
  bump(into.overflow, c.overflow.load());
  raise_to(into.max_abs, c.max_abs.load());
  bump(into.chunks, c.chunks.load());
  bump(into.chunk_overflow, c.chunk_overflow.load());
  raise_to(into.max_chunk, c.max_chunk.load());
}

struct Owner {
  Counters* c = new Counters();
  Owner() {
    std::lock_guard<std::mutex> lock(registry_mutex);
    registry().push_back(c);
  }
  ~Owner() {
    std::lock_guard<std::mutex> lock(registry_mutex);
    fold(retired(), *c);
    auto& r = registry();
    r.erase(std::find(r.begin(), r.end(), c));
    delete c;
  }
};

Counters& mine() {
  thread_local Owner owner;
  return *owner.c;
}

}  // namespace

void telemetry_add(const TelemetryCounts& t) {
  Counters& s = mine();
  bump(s.outputs, t.outputs);
  bump(s.overflow, t.overflow);
  raise_to(s.max_abs, t.max_abs);
  bump(s.chunks, t.chunks);
  bump(s.chunk_overflow, t.chunk_overflow);
  raise_to(s.max_chunk, t.max_chunk);
}

void telemetry_start() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (Counters* c : registry()) zero(*c);  // no kernel is running: the caller starts one after this
  zero(retired());
  telemetry_flag.store(true);
}

TelemetryCounts telemetry_read() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  Counters sum;
  fold(sum, retired());
  for (Counters* c : registry()) fold(sum, *c);
  return {sum.outputs.load(), sum.overflow.load(), sum.max_abs.load(),
          sum.chunks.load(), sum.chunk_overflow.load(), sum.max_chunk.load()};
}

void telemetry_reset_to(const TelemetryCounts& counts) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (Counters* c : registry()) zero(*c);
  Counters& r = retired();
  zero(r);
  r.outputs = counts.outputs, r.overflow = counts.overflow, r.max_abs = counts.max_abs;
  r.chunks = counts.chunks, r.chunk_overflow = counts.chunk_overflow, r.max_chunk = counts.max_chunk;
}

TelemetryCounts telemetry_stop() {
  telemetry_flag.store(false);
  return telemetry_read();
}

namespace {

using ActCounts = std::array<int64_t, 3>;  // a type the clone macro can take

TORCHLNS_INLINE ActCounts act_tally_impl(const float* p, int64_t n, float flush, float sat) {
  int64_t values = 0, saturated = 0, flushed = 0;  // branch-free, so that the loop vectorizes
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(p[i]);
    values += a > 0.0f;
    saturated += a >= sat;
    flushed += (a > 0.0f) & (a < flush);
  }
  return {values, saturated, flushed};
}
TORCHLNS_ISA_CLONES(ActCounts, act_tally, (const float* p, int64_t n, float flush, float sat),
                    (p, n, flush, sat))

}  // namespace

std::array<int64_t, 3> act_counts(const at::Tensor& x, double flush, double sat) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "act_counts: x must be a float32 CPU tensor");
  const auto xc = x.contiguous();
  const float* p = xc.data_ptr<float>();
  constexpr int64_t kGrain = 1 << 16;
  const int64_t n = xc.numel(), parts = (n + kGrain - 1) / kGrain;
  std::vector<std::array<int64_t, 3>> sums(static_cast<size_t>(parts));
  at::parallel_for(0, parts, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      sums[c] = act_tally(p + c * kGrain, std::min(n, (c + 1) * kGrain) - c * kGrain, float(flush), float(sat));
  });
  std::array<int64_t, 3> total{0, 0, 0};
  for (const auto& s : sums)
    for (int i = 0; i < 3; ++i) total[i] += s[i];
  return total;
}

}  // namespace torchlns
