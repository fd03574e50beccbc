// The prepared-weight cache (see Note: prepared weights in weight_cache.h).

#include "weight_cache.h"

#include <cstdlib>
#include <list>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace torchlns {
namespace {

// A tensor's identity for the cache: where its elements are and which write it has seen.
bool identity(const at::Tensor& t, std::ostringstream& key) {
  if (!t.defined()) {
    key << "none;";
    return true;
  }
  if (t.is_inference() || !t.has_storage()) return false;
  key << t.storage().data() << '+' << t.storage_offset() << ':' << t.sizes() << t.strides() << '@'
      << t.unsafeGetTensorImpl()->version_counter().current_version() << '#' << int(t.scalar_type()) << ';';
  return true;
}

struct Entry {
  std::string key;
  at::Tensor weight, param;  // held so that their storage outlives the key
  std::vector<at::Tensor> prepared;
  int64_t bytes;
};

struct Cache {
  std::mutex lock;
  std::list<Entry> lru;  // most recently used first
  std::unordered_map<std::string, std::list<Entry>::iterator> index;
  std::unordered_set<std::string> seen;  // keys used once (admission on the second use)
  int64_t bytes = 0, hits = 0, misses = 0, builds = 0;
  int64_t capacity = [] {
    const char* env = std::getenv("TORCHLNS_WEIGHT_CACHE_MB");
    return (env && *env ? std::atoll(env) : 2048) << 20;
  }();

  void evict_to(int64_t limit) {
    while (bytes > limit && !lru.empty()) {
      bytes -= lru.back().bytes;
      index.erase(lru.back().key);
      lru.pop_back();
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors must not be freed after torch shuts down
  return *c;
}

}  // namespace

std::vector<at::Tensor> prepared_weight(const at::Tensor& weight, const at::Tensor& param, const std::string& tag,
                                        const std::function<std::vector<at::Tensor>()>& build) {
  Cache& c = cache();
  std::ostringstream k;
  k << tag << '|';
  if (c.capacity <= 0 || !identity(weight, k) || !identity(param, k)) {
    std::lock_guard<std::mutex> g(c.lock);
    ++c.builds;
    return build();
  }
  const std::string key = k.str();
  {
    std::lock_guard<std::mutex> g(c.lock);
    auto it = c.index.find(key);
    if (it != c.index.end()) {
      ++c.hits;
      c.lru.splice(c.lru.begin(), c.lru, it->second);
      return it->second->prepared;
    }
    ++c.misses;
    ++c.builds;
  }
  std::vector<at::Tensor> out = build();  // outside the lock: builds run in parallel
  std::lock_guard<std::mutex> g(c.lock);
  if (!c.seen.insert(key).second) {  // second use: keep it
    c.seen.erase(key);
    int64_t bytes = 0;
    for (const auto& t : out) bytes += t.defined() ? int64_t(t.nbytes()) : 0;
    if (bytes <= c.capacity && !c.index.count(key)) {
      c.evict_to(c.capacity - bytes);
      c.lru.push_front(Entry{key, weight, param, out, bytes});
      c.index[key] = c.lru.begin();
      c.bytes += bytes;
    }
  } else if (c.seen.size() > 4096) {  // forget old one-time keys (QAT makes one per step)
    c.seen.clear();
    c.seen.insert(key);
  }
  return out;
}

WeightCacheStats weight_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.lock);
  return {int64_t(c.lru.size()), c.bytes, c.hits, c.misses, c.builds, c.capacity};
}

void clear_weight_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.lock);
  c.evict_to(0);
  c.seen.clear();
  c.hits = c.misses = c.builds = 0;
}

void set_weight_cache_capacity(int64_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.lock);
  c.capacity = bytes;
  c.evict_to(std::max<int64_t>(bytes, 0));
}

}  // namespace torchlns
