// Seeded random numbers that give the same sequence on every platform.
#pragma once

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace fashion_mnist {

/// Random source for initialisation, shuffling and subset sampling.
///
/// std::mt19937_64 produces the same sequence everywhere, but the standard
/// distributions and std::shuffle do not, so the conversions are written here.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed) {}

  /// Uniform integer in [0, bound), bound > 0. Takes a 64-bit draw modulo
  /// `bound`, whose bias is below bound / 2^64, negligible for data sizes.
  std::uint64_t below(std::uint64_t bound) { return engine_() % bound; }

  /// Uniform float in [low, high), from the top 24 bits of one draw.
  float uniform(float low, float high) {
    const float unit = static_cast<float>(engine_() >> 40) * (1.0f / 16777216.0f);
    return low + (high - low) * unit;
  }

  /// Shuffles `values` in place (Fisher-Yates).
  template <typename T>
  void shuffle(std::vector<T>& values) {
    for (std::size_t i = values.size(); i > 1; --i) {
      const std::size_t j = static_cast<std::size_t>(below(i));
      std::swap(values[i - 1], values[j]);
    }
  }

  /// Returns a random permutation of 0..count-1.
  std::vector<int> permutation(int count) {
    std::vector<int> order(static_cast<std::size_t>(count));
    std::iota(order.begin(), order.end(), 0);
    shuffle(order);
    return order;
  }

  /// A fresh seed for a derived generator.
  std::uint64_t next_seed() { return engine_(); }

 private:
  std::mt19937_64 engine_;
};

/// Mixes a seed with a stream number into a new seed (SplitMix64 finaliser),
/// so that "repeat 2, model 3" gets its own reproducible generator.
inline std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t stream) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace fashion_mnist
