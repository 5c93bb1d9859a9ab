// Information content of a tensor: entropy of its histogram of values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/errors.hpp"
#include "cki/tensor.hpp"
#include "cki/detail/finite.hpp"
#include "cki/detail/kernels.hpp"
#include "cki/detail/parallel.hpp"

namespace cki {

/// Parameters of the information content.
struct InformationContentParams {
  /// Number of equal-width histogram bins B over [min, max]; range [1, 1e6].
  int bins = 10;

  /// Throws std::invalid_argument naming the field when it is out of range.
  void check() const {
    if (bins < 1 || bins > 1000000) {
      throw std::invalid_argument("'bins' must be in [1, 1000000], got " + std::to_string(bins));
    }
  }

  nlohmann::json to_json() const { return {{"bins", bins}}; }
};

namespace detail {

/// The bin formula of the information content over [lowest, highest] with
/// `bins` bins, j = min(B - 1, floor((x - lowest) / (highest - lowest) * B))
/// evaluated in double, and the values where it steps from one bin to the
/// next. Requires lowest < highest, both finite.
template <typename Scalar>
class BinFormula {
 public:
  BinFormula(Scalar lowest, Scalar highest, int bins)
      : lowest_(lowest),
        highest_(highest),
        low_(static_cast<double>(lowest)),
        range_(static_cast<double>(highest) - low_),
        bins_(bins) {}

  /// Returns the bin of `x`, which must lie in [lowest, highest].
  std::int64_t bin(Scalar x) const {
    const double position = (static_cast<double>(x) - low_) / range_ * bins_;
    return std::min<std::int64_t>(bins_ - 1, static_cast<std::int64_t>(position));
  }

  /// Returns t_0 .. t_{B-1}, where t_j is the smallest Scalar value in
  /// [lowest, highest] whose bin is j or more (t_0 = lowest). Every rounding
  /// step of bin() is monotonic, so bin(x) >= j exactly when x >= t_j. Each
  /// t_j is found by bisection over the values between lowest and highest in
  /// the order of their bit patterns, which bin(highest) = B - 1 bounds.
  std::vector<Scalar> thresholds() const {
    std::vector<Scalar> out(static_cast<std::size_t>(bins_), lowest_);
    for (int j = 1; j < bins_; ++j) {
      // Invariant: bin(below) < j <= bin(at).
      Key below = key_of(lowest_);
      Key at = key_of(highest_);
      while (at - below > 1) {
        const Key middle = below + (at - below) / 2;
        if (bin(value_of(middle)) >= j) {
          at = middle;
        } else {
          below = middle;
        }
      }
      out[static_cast<std::size_t>(j)] = value_of(at);
    }
    return out;
  }

 private:
  using Key = std::conditional_t<sizeof(Scalar) == 4, std::uint32_t, std::uint64_t>;
  static constexpr Key kSign = Key{1} << (8 * sizeof(Key) - 1);

  // Maps a non-NaN value to an unsigned key in the same order (-0 just below +0).
  static Key key_of(Scalar value) {
    Key bits;
    std::memcpy(&bits, &value, sizeof bits);
    return (bits & kSign) != 0 ? ~bits : bits | kSign;
  }

  static Scalar value_of(Key key) {
    const Key bits = (key & kSign) != 0 ? key & ~kSign : ~key;
    Scalar value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }

  Scalar lowest_;
  Scalar highest_;
  double low_;
  double range_;
  int bins_;
};

}  // namespace detail

/// Information content: the entropy H = -sum_j p_j ln p_j (nats) of the
/// histogram of a tensor's values over B equal-width bins spanning
/// [min, max]. Element x falls in bin
/// j = min(B - 1, floor((x - min) / (max - min) * B)), computed in double for
/// any compute scalar, so the maximum is in the last bin. Empty bins add
/// nothing; a constant or empty tensor has H = 0.
///
/// Requirements of a substitute functor: `double operator()(const
/// TensorView<Scalar>&, const std::string& name, int threads) const`.
class InformationContent {
 public:
  InformationContent() = default;
  explicit InformationContent(InformationContentParams params) : params_(params) { params_.check(); }

  const InformationContentParams& params() const { return params_; }
  nlohmann::json parameters() const { return params_.to_json(); }

  /// Returns the entropy of `tensor` in nats. `name` labels errors.
  /// Throws NumericError naming the tensor and the first index of a NaN or
  /// infinite element.
  template <typename Scalar>
  double operator()(const TensorView<Scalar>& tensor, const std::string& name, int threads = 0) const {
    if (tensor.empty()) return 0.0;
    const detail::BlockPlan plan(tensor.size(), 1);
    const auto block_count = static_cast<std::size_t>(plan.block_count);

    // Pass 1: minimum and maximum of each block. Both propagate NaN, so a
    // block contains a NaN or infinite element exactly when one of them is
    // not finite. The first such block contains the first bad element.
    std::vector<Scalar> block_min(block_count), block_max(block_count);
    detail::for_each_block(
        plan.block_count, threads, [](int) {},
        [&](std::int64_t block, int) {
          const std::int64_t begin = plan.begin(block);
          const std::int64_t count = plan.end(block) - begin;
          Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(tensor.data() + begin, count);
          const auto b = static_cast<std::size_t>(block);
          block_min[b] = values.template minCoeff<Eigen::PropagateNaN>();
          block_max[b] = values.template maxCoeff<Eigen::PropagateNaN>();
        });
    for (std::size_t b = 0; b < block_count; ++b) {
      if (std::isfinite(block_min[b]) && std::isfinite(block_max[b])) continue;
      const auto block = static_cast<std::int64_t>(b);
      for (std::int64_t i = plan.begin(block); i < plan.end(block); ++i) {
        if (!std::isfinite(tensor[i])) detail::throw_non_finite(name, "", tensor, i);
      }
    }
    Scalar lowest = block_min[0];
    Scalar highest = block_max[0];
    for (std::size_t b = 1; b < block_count; ++b) {
      lowest = std::min(lowest, block_min[b]);
      highest = std::max(highest, block_max[b]);
    }
    if (!(highest > lowest)) return 0.0;

    // Pass 2: histogram counts per block, added in block order (integers, so
    // the order does not change the result).
    const int bins = params_.bins;
    const detail::BinFormula<Scalar> formula(lowest, highest, bins);
    std::vector<std::int64_t> counts(block_count * static_cast<std::size_t>(bins), 0);
    if (bins <= kMaxThresholdBins) {
      // The bin is a non-decreasing function of x, so bin(x) >= j exactly
      // when x >= t_j, the smallest value whose bin is j or more. Counting
      // x >= t_j for each j is a vector compare per element and threshold,
      // and gives the same counts as evaluating the formula per element.
      const std::vector<Scalar> thresholds = formula.thresholds();
      detail::for_each_block(
          plan.block_count, threads, [](int) {},
          [&](std::int64_t block, int) {
            const std::int64_t begin = plan.begin(block);
            const std::int64_t count = plan.end(block) - begin;
            std::int64_t* histogram = counts.data() + static_cast<std::size_t>(block) * bins;
            std::int64_t at_least[kMaxThresholdBins] = {};
            count_thresholds(tensor.data() + begin, count, thresholds.data() + 1, bins - 1, at_least);
            std::int64_t above = count;  // elements in bin j - 1 or higher
            for (int j = 1; j < bins; ++j) {
              histogram[j - 1] = above - at_least[j - 1];
              above = at_least[j - 1];
            }
            histogram[bins - 1] = above;
          });
    } else {
      detail::for_each_block(
          plan.block_count, threads, [](int) {},
          [&](std::int64_t block, int) {
            const std::int64_t begin = plan.begin(block);
            std::int64_t* histogram = counts.data() + static_cast<std::size_t>(block) * bins;
            for (std::int64_t i = begin; i < plan.end(block); ++i) ++histogram[formula.bin(tensor[i])];
          });
    }

    // Entropy of the bin shares, skipping empty bins.
    double entropy = 0.0;
    const double total = static_cast<double>(tensor.size());
    for (int j = 0; j < bins; ++j) {
      std::int64_t count = 0;
      for (std::size_t b = 0; b < block_count; ++b) count += counts[b * bins + j];
      if (count == 0) continue;
      const double share = static_cast<double>(count) / total;
      entropy -= share * std::log(share);
    }
    return entropy;
  }

 private:
  // Adds to at_least[j] how many of `count` values are >= thresholds[j], for
  // `n` thresholds, in groups of up to 8 per pass over the values.
  template <typename Scalar>
  static void count_thresholds(const Scalar* values, std::int64_t count, const Scalar* thresholds, int n,
                               std::int64_t* at_least) {
    for (int first = 0; first < n; first += 8) {
      const Scalar* group = thresholds + first;
      std::int64_t* out = at_least + first;
      switch (std::min(8, n - first)) {
        case 1: detail::count_at_least_each<1>(values, count, group, out); break;
        case 2: detail::count_at_least_each<2>(values, count, group, out); break;
        case 3: detail::count_at_least_each<3>(values, count, group, out); break;
        case 4: detail::count_at_least_each<4>(values, count, group, out); break;
        case 5: detail::count_at_least_each<5>(values, count, group, out); break;
        case 6: detail::count_at_least_each<6>(values, count, group, out); break;
        case 7: detail::count_at_least_each<7>(values, count, group, out); break;
        default: detail::count_at_least_each<8>(values, count, group, out); break;
      }
    }
  }

  // Up to this many bins, pass 2 counts the elements at or above each bin's
  // lower threshold, which costs B - 1 vector compares per element. Beyond
  // it, evaluating the formula per element is cheaper.
  static constexpr int kMaxThresholdBins = 32;

  InformationContentParams params_;
};

}  // namespace cki
