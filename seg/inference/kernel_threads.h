// Work split into ranges shared by the calling thread and XLA's intra-op thread pool, for
// the kernels of int8_kernel.cc, int8_depthwise.cc and int8_stem.cc, and the record of
// each such call's start and end on request (CallTimes).
#ifndef SEG_INFERENCE_KERNEL_THREADS_H_
#define SEG_INFERENCE_KERNEL_THREADS_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace seg {

// The start and end of every ForEachRange call (one per kernel call), in seconds on the
// steady clock (CLOCK_MONOTONIC: Python's time.monotonic), while recording is on
// (int8_kernel.py: record_call_times): per-kernel times of a whole network at full speed,
// which a profiler's per-operation events distort.
class CallTimes {
 public:
  static CallTimes& Get() {
    static CallTimes times;
    return times;
  }
  bool On() const { return on_.load(std::memory_order_relaxed); }
  // Starts recording afresh (on) or stops, keeping what was recorded.
  void Record(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (on) seconds_.clear();
    on_.store(on, std::memory_order_relaxed);
  }
  static double Now() {
    return std::chrono::duration<double>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  void Add(double start, double end) {
    std::lock_guard<std::mutex> lock(mutex_);
    seconds_.push_back(start);
    seconds_.push_back(end);
  }
  // Copies up to `most` (start, end) pairs to out; returns how many there are.
  int64_t Copy(double* out, int64_t most) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t calls = static_cast<int64_t>(seconds_.size()) / 2;
    std::copy_n(seconds_.begin(), 2 * std::min(most, calls), out);
    return calls;
  }

 private:
  std::mutex mutex_;
  std::vector<double> seconds_;
  std::atomic<bool> on_{false};
};

// Calls run(begin, end) for consecutive ranges that cover [0, total), on this thread and on up
// to pool.num_threads() - 1 of the pool's, and returns when all are done. Ranges are claimed
// as threads come free, guided: a claim takes a 2 * threads'th of what is left, rounded up to
// a multiple of `grain` and at most `most` (both >= 1), so that the last ranges are small and
// the threads finish together. A pool task that starts after that finds nothing left (it
// holds the counters alive), so `run` may refer to the caller's stack.
template <typename Run>
void ForEachRange(xla::ffi::ThreadPool& pool, int64_t total, int64_t grain, int64_t most,
                  Run run) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t total, grain, most, share;
    Run run;
    State(int64_t t, int64_t g, int64_t m, int64_t s, Run r)
        : total(t), grain(g), most(m), share(s), run(std::move(r)) {}
    void Work() {
      for (int64_t begin = next.load(std::memory_order_relaxed); begin < total;) {
        const int64_t want = (total - begin + share - 1) / share;
        const int64_t size = std::min(most, std::max(grain, (want + grain - 1) / grain * grain));
        const int64_t end = std::min(total, begin + size);
        if (!next.compare_exchange_weak(begin, end, std::memory_order_relaxed)) continue;
        run(begin, end);
        done.fetch_add(end - begin, std::memory_order_release);
        begin = next.load(std::memory_order_relaxed);
      }
    }
  };
  const bool timed = CallTimes::Get().On();
  const double start = timed ? CallTimes::Now() : 0.0;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  auto state = std::make_shared<State>(total, std::max<int64_t>(grain, 1),
                                       std::max<int64_t>(most, 1), 2 * threads, std::move(run));
  const int64_t helpers = std::min(threads, (total + state->grain - 1) / state->grain) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Work(); });
  state->Work();
  // Ranges still running on pool threads finish within microseconds; yield the core after
  // a short spin, in case those threads wait for it (more threads than cores).
  for (int spins = 0; state->done.load(std::memory_order_acquire) < total; ++spins) {
    if (spins < 4096) _mm_pause(); else std::this_thread::yield();
  }
  if (timed) CallTimes::Get().Add(start, CallTimes::Now());
}

// Calls run(n, r0, r1) for ranges of rows [r0, r1) of images n in [0, images) that cover
// `rows` rows of each, as ForEachRange claims them (at most `most` rows, a multiple of
// `grain` but at the end; a claim across two images is split between them).
template <typename Run>
void ForEachRows(xla::ffi::ThreadPool& pool, int64_t images, int64_t rows, int64_t grain,
                 int64_t most, Run run) {
  ForEachRange(pool, images * rows, grain, most, [&run, rows](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t n = begin / rows, r0 = begin % rows, r1 = std::min(rows, r0 + end - begin);
      run(n, r0, r1);
      begin += r1 - r0;
    }
  });
}

}  // namespace seg

#endif  // SEG_INFERENCE_KERNEL_THREADS_H_
