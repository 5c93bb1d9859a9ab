// Information content of a tensor: entropy of its histogram of values.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/errors.hpp"
#include "cki/tensor.hpp"
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

/// Formats the position of flat element `index` of `shape` as "index 5 ([1, 2])".
inline std::string element_position(std::int64_t index, const Shape& shape) {
  Shape position(shape.size());
  std::int64_t rest = index;
  for (std::size_t d = shape.size(); d-- > 0;) {
    if (shape[d] > 0) {
      position[d] = rest % shape[d];
      rest /= shape[d];
    }
  }
  return "index " + std::to_string(index) + " (" + shape_to_string(position) + ")";
}

/// Throws NumericError for the non-finite element at `index` of tensor
/// `name`; `label` names the model ("model 2 ('a.safetensors')") or is empty.
template <typename Scalar>
[[noreturn]] void throw_non_finite(const std::string& name, const std::string& label,
                                   const TensorView<Scalar>& tensor, std::int64_t index) {
  const Scalar value = tensor[index];
  const char* text = std::isnan(value) ? "NaN" : (value > 0 ? "+Inf" : "-Inf");
  std::string message = "tensor '" + name + "' of shape " + shape_to_string(tensor.shape()) + " holds " +
                        text + " at " + element_position(index, tensor.shape());
  if (!label.empty()) message += " in " + label;
  throw NumericError(message);
}

/// Index of the first non-finite element of `tensor`, or -1 when all are
/// finite. Runs over fixed blocks in parallel.
template <typename Scalar>
std::int64_t first_non_finite(const TensorView<Scalar>& tensor, int threads = 0) {
  const BlockPlan plan(tensor.size(), 1);
  std::vector<std::int64_t> first(static_cast<std::size_t>(plan.block_count), -1);
  for_each_block(
      plan.block_count, threads, [](int) {},
      [&](std::int64_t block, int) {
        const std::int64_t begin = plan.begin(block);
        const std::int64_t count = plan.end(block) - begin;
        Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(tensor.data() + begin, count);
        if (values.allFinite()) return;
        for (std::int64_t i = 0; i < count; ++i) {
          if (!std::isfinite(values[i])) {
            first[static_cast<std::size_t>(block)] = begin + i;
            return;
          }
        }
      });
  for (std::int64_t index : first) {
    if (index >= 0) return index;
  }
  return -1;
}

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

    // Pass 1: minimum, maximum and the first non-finite element of each block.
    std::vector<Scalar> block_min(block_count), block_max(block_count);
    std::vector<std::int64_t> block_bad(block_count, -1);
    detail::for_each_block(
        plan.block_count, threads, [](int) {},
        [&](std::int64_t block, int) {
          const std::int64_t begin = plan.begin(block);
          const std::int64_t count = plan.end(block) - begin;
          Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(tensor.data() + begin, count);
          const auto b = static_cast<std::size_t>(block);
          if (!values.allFinite()) {
            for (std::int64_t i = 0; i < count; ++i) {
              if (!std::isfinite(values[i])) {
                block_bad[b] = begin + i;
                return;
              }
            }
          }
          block_min[b] = values.minCoeff();
          block_max[b] = values.maxCoeff();
        });
    for (std::int64_t index : block_bad) {
      if (index >= 0) detail::throw_non_finite(name, "", tensor, index);
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
    const double low = static_cast<double>(lowest);
    const double range = static_cast<double>(highest) - low;
    std::vector<std::int64_t> counts(block_count * static_cast<std::size_t>(bins), 0);
    detail::for_each_block(
        plan.block_count, threads, [](int) {},
        [&](std::int64_t block, int) {
          const std::int64_t begin = plan.begin(block);
          std::int64_t* histogram = counts.data() + static_cast<std::size_t>(block) * bins;
          for (std::int64_t i = begin; i < plan.end(block); ++i) {
            const double position = (static_cast<double>(tensor[i]) - low) / range * bins;
            const auto bin = std::min<std::int64_t>(bins - 1, static_cast<std::int64_t>(position));
            ++histogram[bin];
          }
        });

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
  InformationContentParams params_;
};

}  // namespace cki
