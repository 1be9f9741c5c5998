// A pool for the large CPU tensors of training, installed through c10's allocator hook (c10::SetCPUAllocator).
//
// Blocks of `threshold` bytes or more come from one reserved address range: best fit (lowest address on ties),
// neighbours merged on free, pages kept resident for the next pass. Smaller blocks, and any block the range
// cannot hold, go to c10's own alloc_cpu/free_cpu. Why: see cpu_pool.py.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>

namespace {

constexpr size_t kGrain = 64 << 10;  // block sizes round up to this: fewer distinct sizes, aligned blocks

struct Pool {
  std::mutex mu;
  uintptr_t base = 0, end = 0;  // the reserved range
  uintptr_t top = 0;            // nothing at or above top is in use
  uintptr_t high = 0;           // pages below high may be resident
  size_t threshold = 0, in_use = 0, peak_in_use = 0;
  std::map<uintptr_t, size_t> free_by_addr;              // free ranges below top
  std::set<std::pair<size_t, uintptr_t>> free_by_size;   // the same ranges, for best fit
  std::unordered_map<uintptr_t, size_t> live;            // block -> size

  bool owns(uintptr_t a) const { return a >= base && a < end; }

  void add_free(uintptr_t a, size_t n) {
    free_by_addr[a] = n;
    free_by_size.insert({n, a});
  }

  void drop_free(std::map<uintptr_t, size_t>::iterator it) {
    free_by_size.erase({it->second, it->first});
    free_by_addr.erase(it);
  }

  void* take(size_t n) {
    std::lock_guard<std::mutex> guard(mu);
    uintptr_t a;
    auto fit = free_by_size.lower_bound({n, 0});
    if (fit != free_by_size.end()) {
      auto [len, start] = *fit;
      drop_free(free_by_addr.find(start));
      if (len > n) add_free(start + n, len - n);
      a = start;
    } else {
      if (n > end - top) return nullptr;
      a = top;
      top += n;
      if (top > high) high = top;
    }
    live[a] = n;
    in_use += n;
    if (in_use > peak_in_use) peak_in_use = in_use;
    return reinterpret_cast<void*>(a);
  }

  void give(uintptr_t a) {
    std::lock_guard<std::mutex> guard(mu);
    auto it = live.find(a);
    size_t n = it->second;
    live.erase(it);
    in_use -= n;
    auto next = free_by_addr.lower_bound(a);
    if (next != free_by_addr.end() && next->first == a + n) {
      n += next->second;
      next = std::next(next);
      drop_free(std::prev(next));
    }
    if (next != free_by_addr.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == a) {
        a = prev->first;
        n += prev->second;
        drop_free(prev);
      }
    }
    if (a + n == top) {
      top = a;
    } else {
      add_free(a, n);
    }
  }

  // Hands the pages of every free range back to the OS; returns the bytes released.
  size_t release() {
    std::lock_guard<std::mutex> guard(mu);
    size_t released = 0;
    for (auto& [a, n] : free_by_addr) {
      madvise(reinterpret_cast<void*>(a), n, MADV_DONTNEED);
      released += n;
    }
    if (high > top) {
      madvise(reinterpret_cast<void*>(top), high - top, MADV_DONTNEED);
      released += high - top;
      high = top;
    }
    return released;
  }
};

Pool* pool = nullptr;  // never destroyed: tensors may be freed during interpreter shutdown

void pool_delete(void* p) {
  c10::profiledCPUMemoryReporter().Delete(p);  // torch.profiler's memory view, as c10's own allocator reports
  if (pool != nullptr && pool->owns(reinterpret_cast<uintptr_t>(p))) {
    pool->give(reinterpret_cast<uintptr_t>(p));
  } else {
    c10::free_cpu(p);
  }
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n >= pool->threshold) p = pool->take((n + kGrain - 1) / kGrain * kGrain);
    if (p == nullptr) p = c10::alloc_cpu(n);
    c10::profiledCPUMemoryReporter().New(p, n);
    return {p, p, &pool_delete, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &pool_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// A child forked while another thread held the lock would wait on it forever.
void lock_before_fork() { pool->mu.lock(); }
void unlock_after_fork() { pool->mu.unlock(); }

}  // namespace

extern "C" {

// Reserves `reserve_bytes` of address space (no memory until touched) and makes the pool torch's CPU allocator.
int tunesmith_pool_install(size_t reserve_bytes, size_t threshold) {
  if (pool != nullptr) return 0;
  void* range = mmap(nullptr, reserve_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
  if (range == MAP_FAILED) return -1;
  auto* fresh = new Pool();
  fresh->base = fresh->top = fresh->high = reinterpret_cast<uintptr_t>(range);
  fresh->end = fresh->base + reserve_bytes;
  fresh->threshold = threshold;
  pool = fresh;
  pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
  c10::SetCPUAllocator(new PoolAllocator(), /*priority=*/1);
  return 0;
}

size_t tunesmith_pool_release() { return pool == nullptr ? 0 : pool->release(); }

// in use, peak in use, resident span (high - base), free bytes below top, number of free ranges
void tunesmith_pool_stats(size_t* out) {
  if (pool == nullptr) return;
  std::lock_guard<std::mutex> guard(pool->mu);
  size_t free_bytes = 0;
  for (auto& [a, n] : pool->free_by_addr) free_bytes += n;
  out[0] = pool->in_use;
  out[1] = pool->peak_in_use;
  out[2] = pool->high - pool->base;
  out[3] = free_bytes;
  out[4] = pool->free_by_addr.size();
}

}
