// Tensor shapes, non-owning tensor views over caller memory, and owning tensors.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

namespace cki {

/// Dimensions of a tensor, outermost first (row-major, as PyTorch stores them).
/// An empty shape is a rank-0 scalar with one element.
using Shape = std::vector<std::int64_t>;

/// Formats a shape as "[2, 3]"; a rank-0 shape prints as "[]".
inline std::string shape_to_string(const Shape& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

/// Returns the number of elements of `shape`: the product of its dimensions,
/// 1 for rank 0 and 0 when any dimension is 0.
/// Throws std::invalid_argument for a negative dimension or a product beyond
/// the range of std::int64_t.
inline std::int64_t shape_numel(const Shape& shape) {
  std::int64_t count = 1;
  for (std::int64_t dim : shape) {
    if (dim < 0) {
      throw std::invalid_argument("shape " + shape_to_string(shape) +
                                  " has a negative dimension");
    }
    if (dim != 0 && count > std::numeric_limits<std::int64_t>::max() / dim) {
      throw std::invalid_argument("shape " + shape_to_string(shape) +
                                  " has more elements than fit in 64 bits");
    }
    count *= dim;
  }
  return count;
}

/// Size of the last dimension, along which an assessment map acts: the last
/// entry of the shape, or 1 for a rank-0 tensor.
inline std::int64_t last_dim(const Shape& shape) { return shape.empty() ? 1 : shape.back(); }

/// Read-only view of a contiguous row-major tensor in memory the caller owns.
/// Copying a view copies the pointer, never the elements.
/// \tparam Scalar element type, float or double.
template <typename Scalar>
class TensorView {
 public:
  using Array = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
  using Map = Eigen::Map<const Array>;

  TensorView() = default;

  /// Views `shape_numel(shape)` elements starting at `data`; `data` may be
  /// null only when the tensor is empty.
  TensorView(const Scalar* data, Shape shape)
      : data_(data), shape_(std::move(shape)), size_(shape_numel(shape_)) {
    if (data_ == nullptr && size_ > 0) {
      throw std::invalid_argument("tensor view of shape " + shape_to_string(shape_) +
                                  " has no data");
    }
  }

  const Scalar* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  std::int64_t size() const { return size_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  bool empty() const { return size_ == 0; }

  /// The elements as a flat Eigen array, without a copy.
  Map array() const { return Map(data_, static_cast<Eigen::Index>(size_)); }

  Scalar operator[](std::int64_t index) const { return data_[index]; }

 private:
  const Scalar* data_ = nullptr;
  Shape shape_;
  std::int64_t size_ = 1;
};

/// Tensor that owns its elements, stored flat in row-major order.
/// \tparam Scalar element type, float or double.
template <typename Scalar>
class Tensor {
 public:
  using Array = Eigen::Array<Scalar, Eigen::Dynamic, 1>;

  Tensor() : Tensor(Shape{}) {}

  /// Zero-filled tensor of `shape`.
  explicit Tensor(Shape shape) : shape_(std::move(shape)) {
    values_ = Array::Zero(static_cast<Eigen::Index>(shape_numel(shape_)));
  }

  /// Tensor of `shape` holding `values` in row-major order.
  /// Throws std::invalid_argument when the counts differ.
  Tensor(Shape shape, Array values) : shape_(std::move(shape)), values_(std::move(values)) {
    const std::int64_t expected = shape_numel(shape_);
    if (values_.size() != expected) {
      throw std::invalid_argument("tensor of shape " + shape_to_string(shape_) + " needs " +
                                  std::to_string(expected) + " values, got " +
                                  std::to_string(values_.size()));
    }
  }

  /// Copies the elements of `view`.
  static Tensor copy_of(const TensorView<Scalar>& view) { return Tensor(view.shape(), Array(view.array())); }

  Scalar* data() { return values_.data(); }
  const Scalar* data() const { return values_.data(); }
  const Shape& shape() const { return shape_; }
  std::int64_t size() const { return values_.size(); }
  int rank() const { return static_cast<int>(shape_.size()); }
  Array& array() { return values_; }
  const Array& array() const { return values_; }
  Scalar& operator[](std::int64_t index) { return values_[index]; }
  Scalar operator[](std::int64_t index) const { return values_[index]; }

  /// A view of this tensor; valid while the tensor lives and is not resized.
  TensorView<Scalar> view() const { return TensorView<Scalar>(values_.data(), shape_); }

 private:
  Shape shape_;
  Array values_;
};

}  // namespace cki
