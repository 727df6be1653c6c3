// Work shared out among the threads of an OpenMP region, for the CPU kernels (cpu_lut.cpp, weight_only.cpp). A
// header of kernels/: cpp_build inlines it into each source before the source is compiled from the build cache.

#include <atomic>
#include <cstdint>
#include <memory>

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_thread_num() { return 0; }  // no OpenMP: one thread runs its range, then steals the others'
#endif

namespace {

// Units (consecutive pieces of a kernel's output) shared out by stealing at the tail: thread t owns the contiguous
// range [front, back) of a static split and takes units from its front; once its range is empty it takes the last
// unit of another thread's range. Each thread streams its own part of the weights in order, as under a static
// schedule, and a thread that falls behind (memory bandwidth is not shared evenly, or the vCPU is preempted) is
// helped instead of waited for at the barrier. A unit's result must not depend on the thread that computes it.
class UnitQueue {
 public:
  void reset(int64_t units, int threads) {
    if (threads > capacity_) {
      ranges_ = std::make_unique<Range[]>(threads);
      capacity_ = threads;
    }
    threads_ = threads;
    for (int t = 0; t < threads; ++t)
      ranges_[t].bounds.store(pack(units * t / threads, units * (t + 1) / threads), std::memory_order_relaxed);
  }
  // The next unit for thread `me`, or -1 when every range is empty.
  int64_t next(int me) {
    if (const int64_t unit = take(ranges_[me], /*from_front=*/true); unit >= 0) return unit;
    for (int step = 1; step < threads_; ++step)
      if (const int64_t unit = take(ranges_[(me + step) % threads_], /*from_front=*/false); unit >= 0) return unit;
    return -1;
  }

 private:
  struct alignas(64) Range {
    std::atomic<uint64_t> bounds;  // front in the high 32 bits, back in the low
  };
  static uint64_t pack(int64_t front, int64_t back) {
    return (static_cast<uint64_t>(front) << 32) | static_cast<uint64_t>(back);
  }
  static int64_t take(Range& range, bool from_front) {
    uint64_t bounds = range.bounds.load(std::memory_order_relaxed);
    while (true) {
      const int64_t front = static_cast<int64_t>(bounds >> 32), back = static_cast<int64_t>(bounds & 0xffffffffu);
      if (front >= back) return -1;
      const uint64_t taken = from_front ? pack(front + 1, back) : pack(front, back - 1);
      if (range.bounds.compare_exchange_weak(bounds, taken, std::memory_order_relaxed))
        return from_front ? front : back - 1;
    }
  }
  std::unique_ptr<Range[]> ranges_;
  int capacity_ = 0, threads_ = 0;
};

}  // namespace
