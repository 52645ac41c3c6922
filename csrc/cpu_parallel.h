// The parallel split of the CPU kernels (rope_cpu_ops.cpp, sinusoidal_cpu.cpp, learned_cpu.cpp): one rule,
// the grain chosen from the work size in bytes of memory traffic, so a small call runs on the calling thread.
//
// Why: a second thread can at best halve a call, and it costs a wake-up and a join. On an idle machine that
// is ~10-50 us; on a busy one (other processes on every core) a woken thread may wait a scheduler slice
// (milliseconds) and the caller waits at the join meanwhile: a 512-token Llama-3-8B RoPE call in bf16 took
// 0.4 ms on one thread and 8 ms on two on a 2-core machine with two busy processes (issue 21); torch's own
// x.mul_ over the same bytes loses the same way (its grain is 32K elements). So a task gets at least
// kMinTaskBytes of traffic (reads + writes, ~0.3-0.5 ms of one core at 20-30 GB/s): a call below twice that
// runs inline (decode and short prefill: a 512-token Llama-3-8B call moves 10 MiB in bf16), a larger one
// is split into at most traffic / kMinTaskBytes equal tasks, one per thread (4096 tokens in bf16, 80 MiB:
// up to 10 threads), as at::parallel_for splits torch's own ops. A large call on a busy machine still waits
// for its slowest thread, as torch's ops do: no grain avoids that.
// The price: on an idle many-core machine a call uses fewer threads than it could, and mid-sized calls
// (8-16 MiB) run on one thread where two would be up to ~2x faster. Compute-heavy kernels (the sinusoidal
// ops evaluate sin/cos per pair) count bytes too, which errs towards fewer threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace posenc {

// Minimum bytes of memory traffic (each input read once, each output written once) per parallel task.
constexpr int64_t kMinTaskBytes = int64_t{8} << 20;

// Tasks a call of n items moving bytes_per_item each is split into (1: inline on the calling thread).
inline int64_t cpu_tasks(int64_t n, int64_t bytes_per_item) {
  const int64_t per_item = std::max<int64_t>(bytes_per_item, 1);
  const int64_t min_items = std::max<int64_t>(1, (kMinTaskBytes + per_item - 1) / per_item);
  return std::max<int64_t>(1, n / min_items);
}

// f(begin, end) over [0, n): inline when the work is small (cpu_tasks == 1), else at::parallel_for with a
// grain that gives every task at least kMinTaskBytes (at::parallel_for runs min(threads, ceil(n / grain))
// tasks of equal size).
template <class F>
void parallel_items(int64_t n, int64_t bytes_per_item, const F& f) {
  if (n <= 0) return;
  const int64_t tasks = cpu_tasks(n, bytes_per_item);
  if (tasks <= 1) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, (n + tasks - 1) / tasks, f);
}

}  // namespace posenc
