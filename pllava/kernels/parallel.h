// Work split over the CPUs this process may use, shared by the kernels in this folder.
//
// Threads are started per call and joined, not kept spinning in a pool (an OpenMP pool's
// spin-wait took the cores from MindSpore's next ops: an 8-stream step ran 116 ms against 72
// with OMP_WAIT_POLICY=passive). The threads take small ranges in turn from a shared counter
// rather than one fixed share each: MindSpore's own threads may still hold a core when a
// kernel starts, and a fixed share then waited for it (decode steps ~10% slower).
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace pllava {

inline int64_t usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Run body(begin, end) on ranges covering [0, n) exactly once, on up to one thread per usable
// CPU, each thread taking the next range of about n / (8 * threads) items until none is left.
template <typename Body>
void parallel_ranges(int64_t n, const Body& body) {
  const int64_t workers = std::min<int64_t>(usable_cpus(), n);
  if (workers <= 0) return;
  const int64_t grain = std::max<int64_t>(1, n / (8 * workers));
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t begin; (begin = next.fetch_add(grain)) < n;) body(begin, std::min(n, begin + grain));
  };
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
}

// Run body(i) for i in [0, n), split as parallel_ranges does.
template <typename Body>
void parallel_for(int64_t n, const Body& body) {
  parallel_ranges(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

}  // namespace pllava
