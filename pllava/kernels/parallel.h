// Work split over the CPUs this process may use, shared by the kernels in this folder.
//
// The helper threads are kept in a pool and sleep on a condition variable between calls, never
// spinning (an OpenMP pool's spin-wait took the cores from MindSpore's next ops: an 8-stream
// step ran 116 ms against 72 with OMP_WAIT_POLICY=passive); starting and joining a thread per
// call cost ~42 us, ~60 times per decode step. The threads take small ranges in turn from a
// shared counter rather than one fixed share each: MindSpore's own threads may still hold a
// core when a kernel starts, and a fixed share then waited for it (decode steps ~10% slower).
// A call made while the pool serves another (MindSpore may run two kernels at once) runs on
// its caller's thread alone; a forked child starts a pool of its own.
#pragma once

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace pllava {

inline int64_t usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
 public:
  static Pool& instance() {
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current() = nullptr; }); });
    Pool*& pool = current();
    if (pool == nullptr) pool = new Pool();  // never deleted: its threads sleep until exit
    return *pool;
  }

  // Runs work() here and on up to ``helpers`` pool threads at once, returning when all are
  // done; false (nothing run) when the pool is serving another call.
  template <typename Work>
  bool run(int64_t helpers, const Work& work) {
    bool idle = false;
    if (!busy_.compare_exchange_strong(idle, true)) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int64_t>(threads_.size()) < helpers) {
        const int64_t index = static_cast<int64_t>(threads_.size());
        threads_.emplace_back([this, index] { serve(index); });
      }
      job_ = [](const void* w) { (*static_cast<const Work*>(w))(); };
      context_ = &work;
      wanted_ = helpers;
      running_ = helpers;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    work();
    while (running_.load() != 0) sched_yield();  // the helpers' last ranges: short
    busy_ = false;
    return true;
  }

 private:
  // How long a helper keeps looking for the next call before it sleeps: the kernels of one
  // model step come back to back, a few MindSpore ops apart; between steps it sleeps.
  static constexpr auto kLinger = std::chrono::microseconds(200);

  static Pool*& current() {
    static Pool* pool = nullptr;
    return pool;
  }

  void serve(int64_t index) {
    uint64_t seen = 0;
    for (;;) {
      // look (yielding the core to any other thread) for a while, then sleep until woken
      const auto until = std::chrono::steady_clock::now() + kLinger;
      while (generation_.load() == seen && std::chrono::steady_clock::now() < until) sched_yield();
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      if (index >= wanted_) continue;  // not needed this time
      void (*job)(const void*) = job_;
      const void* context = context_;
      lock.unlock();
      job(context);
      running_.fetch_sub(1);
    }
  }

  std::atomic<bool> busy_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> running_{0};
  int64_t wanted_ = 0;
  void (*job_)(const void*) = nullptr;
  const void* context_ = nullptr;
};

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
  if (workers == 1 || !Pool::instance().run(workers - 1, work)) work();
}

// Run body(i) for i in [0, n), split as parallel_ranges does.
template <typename Body>
void parallel_for(int64_t n, const Body& body) {
  parallel_ranges(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

}  // namespace pllava
