// Finding NaN and infinite elements, and the error that names them.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "cki/detail/parallel.hpp"
#include "cki/errors.hpp"
#include "cki/tensor.hpp"

namespace cki::detail {

/// True when the `count` values are all finite. x * 0 is NaN for NaN and
/// infinite x and zero otherwise, so one vectorised sum tests them all
/// (Eigen's allFinite() is a scalar loop).
template <typename Scalar>
bool all_finite(const Scalar* values, std::int64_t count) {
  const Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> array(values, count);
  return !std::isnan((array * Scalar(0)).sum());
}

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

/// Describes a non-finite element for a message: "NaN at index 3 ([0, 3]) in
/// model 1 ('a.safetensors')".
inline std::string describe_non_finite(double value, std::int64_t index, const Shape& shape,
                                       const std::string& label) {
  const char* kind = std::isnan(value) ? "NaN" : (value > 0 ? "+Inf" : "-Inf");
  return std::string(kind) + " at " + element_position(index, shape) + " in " + label;
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
        const Scalar* values = tensor.data() + begin;
        if (all_finite(values, count)) return;
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

}  // namespace cki::detail
