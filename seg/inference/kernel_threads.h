// Work split into chunks shared by the calling thread and XLA's intra-op thread pool, for
// the kernels of int8_kernel.cc and int8_depthwise.cc.
#ifndef SEG_INFERENCE_KERNEL_THREADS_H_
#define SEG_INFERENCE_KERNEL_THREADS_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace seg {

// Calls run(chunk) once for every chunk in [0, chunks), on this thread and on up to
// pool.num_threads() - 1 of the pool's, and returns when all are done. A pool task that
// starts after that finds no chunk left (it holds the counters alive), so `run` may refer
// to the caller's stack.
template <typename Run>
void ForEachChunk(xla::ffi::ThreadPool& pool, int64_t chunks, Run run) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks;
    Run run;
    State(int64_t c, Run r) : chunks(c), run(std::move(r)) {}
    void Work() {
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
        run(c);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(chunks, std::move(run));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Work(); });
  state->Work();
  // Chunks still running on pool threads finish within microseconds; yield the core after
  // a short spin, in case those threads wait for it (more threads than cores).
  for (int spins = 0; state->done.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins < 4096) _mm_pause(); else std::this_thread::yield();
  }
}

}  // namespace seg

#endif  // SEG_INFERENCE_KERNEL_THREADS_H_
