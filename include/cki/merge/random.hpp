// Counter-based random draws for DARE: each draw is a pure function of
// (seed, model index, tensor name, element index).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

namespace cki {

namespace detail {

/// Increment of the SplitMix64 sequence: 2^64 divided by the golden ratio.
inline constexpr std::uint64_t kSplitMixIncrement = 0x9E3779B97F4A7C15ULL;

/// SplitMix64 output function: a bijection of 64-bit words in which every
/// input bit affects every output bit.
constexpr std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

/// 64-bit FNV-1a hash of a string's bytes.
inline std::uint64_t fnv1a64(const std::string& text) {
  std::uint64_t hash = 0xCBF29CE484222325ULL;
  for (unsigned char byte : text) {
    hash ^= byte;
    hash *= 0x100000001B3ULL;
  }
  return hash;
}

}  // namespace detail

/// Counter-based generator: draw `i` of the stream keyed by (seed, model
/// index, tensor name) is the i-th SplitMix64 output from a state derived
/// from the key. A draw depends on nothing else, so results are identical
/// for any thread count, block size, streamed or in-memory merge, and
/// standard library.
class CounterGenerator {
 public:
  CounterGenerator(std::uint64_t seed, std::uint64_t model_index, const std::string& tensor_name) {
    std::uint64_t key = detail::mix64(seed + detail::kSplitMixIncrement);
    key = detail::mix64(key ^ (model_index + 1) * detail::kSplitMixIncrement);
    key_ = detail::mix64(key ^ detail::fnv1a64(tensor_name));
  }

  /// 64 random bits of draw `index`.
  std::uint64_t bits(std::int64_t index) const {
    return detail::mix64(key_ + (static_cast<std::uint64_t>(index) + 1) * detail::kSplitMixIncrement);
  }

  /// Draw `index` as a double uniform on [0, 1) with 53 random bits.
  double uniform(std::int64_t index) const {
    return static_cast<double>(bits(index) >> 11) * 0x1.0p-53;
  }

  /// Returns the integer form of probability `p` in [0, 1] for
  /// uniform_at_least(): ceil(p * 2^53), exact because scaling by a power
  /// of two is exact.
  static std::uint64_t uniform_threshold(double p) { return static_cast<std::uint64_t>(std::ceil(p * 0x1.0p53)); }

  /// True exactly when uniform(index) >= p, for `threshold` =
  /// uniform_threshold(p); compares integers, so it avoids the conversion.
  bool uniform_at_least(std::int64_t index, std::uint64_t threshold) const { return (bits(index) >> 11) >= threshold; }

 private:
  std::uint64_t key_ = 0;
};

}  // namespace cki
