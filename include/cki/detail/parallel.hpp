// Fixed-size blocks over a tensor's elements and the OpenMP loop that runs them.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace cki::detail {

/// Target number of elements per block: small enough that a block of N
/// models stays in L2 cache, large enough to amortise per-block work.
inline constexpr std::int64_t kBlockElements = 4096;

/// Partition of a tensor into blocks of whole rows of its last dimension.
/// Block boundaries depend only on the shape, never on the thread count, so
/// every element is computed by the same instructions in any run.
struct BlockPlan {
  std::int64_t numel = 0;
  std::int64_t row_length = 1;
  std::int64_t rows_per_block = 1;
  std::int64_t block_count = 0;

  BlockPlan(std::int64_t element_count, std::int64_t last_dimension) : numel(element_count) {
    row_length = std::max<std::int64_t>(1, last_dimension);
    rows_per_block = std::max<std::int64_t>(1, kBlockElements / row_length);
    const std::int64_t rows = numel / row_length;
    block_count = (rows + rows_per_block - 1) / rows_per_block;
  }

  std::int64_t begin(std::int64_t block) const { return block * rows_per_block * row_length; }
  std::int64_t end(std::int64_t block) const {
    return std::min(numel, (block + 1) * rows_per_block * row_length);
  }
};

/// Number of threads a loop will use: `requested` when positive, otherwise
/// the OpenMP default; always 1 without OpenMP.
inline int thread_count(int requested) {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

/// Runs `body(block, thread_index)` for every block, split statically over
/// threads. `body` must not throw: record failures per block and raise them
/// after the loop. `setup(thread_index)` runs once per thread before its blocks.
template <typename Setup, typename Body>
void for_each_block(std::int64_t block_count, int threads, Setup&& setup, Body&& body) {
  const int used = std::max(1, std::min<int>(thread_count(threads),
                                             static_cast<int>(std::min<std::int64_t>(block_count, 1 << 20))));
#if defined(_OPENMP)
  if (used > 1) {
#pragma omp parallel num_threads(used)
    {
      const int thread = omp_get_thread_num();
      setup(thread);
#pragma omp for schedule(static)
      for (std::int64_t block = 0; block < block_count; ++block) body(block, thread);
    }
    return;
  }
#endif
  (void)used;
  setup(0);
  for (std::int64_t block = 0; block < block_count; ++block) body(block, 0);
}

}  // namespace cki::detail
