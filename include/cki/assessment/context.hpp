// Tensor context passed to every assessment functor: name, shape and model order.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "cki/tensor.hpp"

namespace cki {

/// One tensor being spliced: its name and shape, and how the models handed
/// to the functors map back to the caller's input order.
struct TensorContext {
  std::string name;
  Shape shape;
  /// `order[i]` is the input index of the i-th model the functors see. The
  /// functors always see the base model first.
  std::vector<std::size_t> order;
  /// Model labels for messages (file paths or "model K"), in the same order
  /// as the models the functors see.
  std::vector<std::string> labels;
  /// Threads for element loops; 0 means the OpenMP default.
  int threads = 0;

  std::size_t model_count() const { return order.size(); }
};

/// Per-element values of one block for N models: one column per model (base
/// first), one row per element. Buffers are allocated once with room for the
/// largest block; functors use the first `count` rows.
template <typename Scalar>
using BlockArray = Eigen::Array<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

}  // namespace cki
