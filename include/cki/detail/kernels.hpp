// Element loops written so that compilers vectorise them while the result
// stays independent of the vector width: sums in a fixed order, exact counts.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cki::detail {

/// Number of independent partial results the loops below keep: enough
/// vector registers of the widest vector unit (AVX-512: 16 floats or 8
/// doubles) to hide the latency of an addition.
inline constexpr int kLanes = 64;

/// Returns the sum of `count` values in double precision. The values are
/// added into kLanes partial sums by position modulo kLanes, and the partial
/// sums are added in index order, so the result depends only on the values,
/// never on the vector width or the thread count. Compilers turn the inner
/// loop into vector conversions and additions; a plain running sum would not
/// vectorise, because floating-point addition is not associative.
template <typename Scalar>
double sum_as_double(const Scalar* values, std::int64_t count) {
  double partial[kLanes] = {};
  const std::int64_t whole = count - count % kLanes;
  for (std::int64_t i = 0; i < whole; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += static_cast<double>(values[i + lane]);
  }
  for (std::int64_t i = whole; i < count; ++i) partial[i - whole] += static_cast<double>(values[i]);
  double total = 0.0;
  for (double value : partial) total += value;
  return total;
}

/// Returns how many of `count` values satisfy `predicate`, which the loop
/// evaluates on every element. The per-lane tallies keep the vectorised loop
/// on the elements, where a caller's loop around this call might otherwise
/// be vectorised instead. `count` must be below 2^31 (32-bit tallies).
template <typename Scalar, typename Predicate>
std::int64_t count_if(const Scalar* values, std::int64_t count, Predicate predicate) {
  std::int32_t tally[kLanes] = {};
  const std::int64_t whole = count - count % kLanes;
  for (std::int64_t i = 0; i < whole; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) tally[lane] += predicate(values[i + lane]) ? 1 : 0;
  }
  std::int64_t total = 0;
  for (std::int64_t i = whole; i < count; ++i) total += predicate(values[i]) ? 1 : 0;
  for (std::int32_t value : tally) total += value;
  return total;
}

/// Returns how many of `count` values are >= `threshold`; `count` < 2^31.
template <typename Scalar>
std::int64_t count_at_least(const Scalar* values, std::int64_t count, Scalar threshold) {
  return count_if(values, count, [threshold](Scalar value) { return value >= threshold; });
}

/// Width in bytes of the vectors count_at_least_each() uses: 32 where the
/// target has AVX (8 floats), 16 otherwise. On the AVX-512 machine of
/// docs/benchmarks.md, 32 bytes also beat 64 (3.6 against 4.6 ms for 16 Mi
/// floats and 9 thresholds).
#if defined(__AVX__)
inline constexpr int kCountVectorBytes = 32;
#else
inline constexpr int kCountVectorBytes = 16;
#endif

#if defined(__GNUC__) || defined(__clang__)
/// Vector types of the GCC and Clang vector extensions for `Scalar`,
/// kCountVectorBytes wide: values, a lane mask of the same width (a
/// comparison gives -1 where true), and unaligned loads and stores.
template <typename Scalar>
struct Vectors {
  using Bits = std::conditional_t<sizeof(Scalar) == 4, std::int32_t, std::int64_t>;
  static constexpr int kWidth = kCountVectorBytes / static_cast<int>(sizeof(Scalar));
  typedef Scalar Vector __attribute__((vector_size(kCountVectorBytes)));
  typedef Bits Mask __attribute__((vector_size(kCountVectorBytes)));

  static Vector load(const Scalar* from) {
    Vector value;
    std::memcpy(&value, from, sizeof value);
    return value;
  }
  static void store(Scalar* to, const Vector& value) { std::memcpy(to, &value, sizeof value); }
};

/// Returns `chosen` in the lanes where `when` is all ones and `other` where
/// it is all zeros, for vectors of the GCC and Clang vector extensions (or
/// Eigen's x86 packets, which are such vectors) as wide as `Mask`.
template <typename Mask, typename Vector>
Vector pick_lanes(Mask when, Vector chosen, Vector other) {
  const Mask bits = (reinterpret_cast<Mask>(chosen) & when) | (reinterpret_cast<Mask>(other) & ~when);
  return reinterpret_cast<Vector>(bits);
}
#endif

/// Adds to `at_least[j]`, for each of the kThresholds values of
/// `thresholds`, how many of the `count` values are >= thresholds[j]. One
/// pass reads each value once and keeps one vector of tallies per
/// threshold in registers. A count_at_least() call per threshold would read
/// the values kThresholds times. Uses the GCC and Clang vector
/// extensions; `count` must be below 2^31.
template <int kThresholds, typename Scalar>
void count_at_least_each(const Scalar* values, std::int64_t count, const Scalar* thresholds,
                         std::int64_t* at_least) {
#if defined(__GNUC__) || defined(__clang__)
  using Tally = std::conditional_t<sizeof(Scalar) == 4, std::int32_t, std::int64_t>;
  constexpr int kWidth = kCountVectorBytes / static_cast<int>(sizeof(Scalar));
  typedef Scalar Vector __attribute__((vector_size(kCountVectorBytes)));
  typedef Tally Tallies __attribute__((vector_size(kCountVectorBytes)));
  Vector bound[kThresholds];
  Tallies tally[kThresholds];
  for (int j = 0; j < kThresholds; ++j) {
    bound[j] = Vector{} + thresholds[j];
    tally[j] = Tallies{};
  }
  const std::int64_t whole = count - count % kWidth;
  for (std::int64_t i = 0; i < whole; i += kWidth) {
    Vector x;
    std::memcpy(&x, values + i, sizeof x);
    // A vector compare gives -1 where true, so subtracting it counts.
    for (int j = 0; j < kThresholds; ++j) tally[j] -= x >= bound[j];
  }
  for (int j = 0; j < kThresholds; ++j) {
    std::int64_t total = 0;
    for (int lane = 0; lane < kWidth; ++lane) total += tally[j][lane];
    for (std::int64_t i = whole; i < count; ++i) total += values[i] >= thresholds[j] ? 1 : 0;
    at_least[j] += total;
  }
#else
  for (int j = 0; j < kThresholds; ++j) at_least[j] += count_at_least(values, count, thresholds[j]);
#endif
}

/// Returns how many of `count` values equal `target`; `count` < 2^31.
template <typename Scalar>
std::int64_t count_equal(const Scalar* values, std::int64_t count, Scalar target) {
  return count_if(values, count, [target](Scalar value) { return value == target; });
}

}  // namespace cki::detail
