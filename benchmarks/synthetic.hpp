// Synthetic weights shared by the benchmark programs.
#pragma once

#include <cmath>
#include <cstdint>

#include <cki/merge/random.hpp>

namespace cki_bench {

/// Returns an approximately normal value with mean 0 and standard deviation
/// 1 for the counter `x`: the centred sum of the four 16-bit parts of one
/// SplitMix64 output (Irwin-Hall), scaled. Every element is drawn from its
/// own counter, so workloads can be built in parallel with the same result.
inline float pseudo_normal(std::uint64_t x) {
  const std::uint64_t bits = cki::detail::mix64(x + cki::detail::kSplitMixIncrement);
  float sum = 0.0f;
  for (int part = 0; part < 4; ++part) sum += static_cast<float>((bits >> (16 * part)) & 0xFFFF) / 65536.0f;
  return (sum - 2.0f) * std::sqrt(3.0f);
}

}  // namespace cki_bench
