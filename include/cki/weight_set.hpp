// Weight sets: ordered maps from tensor name to tensor, with dtype tags,
// string metadata, and the structural check across N sets.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cki/dtype.hpp"
#include "cki/errors.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Ordered map from tensor name to tensor: one model's parameters.
///
/// Floating tensors (F16, BF16, F32, F64 in storage) are held as views in the
/// compute scalar, together with the storage dtype they are written back as.
/// Other tensors (integers, BOOL, F8) are held as their raw little-endian
/// bytes, because cki never splices them. Storage is shared and immutable, so
/// copying a weight set is cheap and never copies elements.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class WeightSet {
 public:
  struct Entry {
    std::string name;
    /// Storage dtype: what the tensor was read as and is written back as.
    DType dtype = dtype_of<Scalar>();
    Shape shape;
    /// Elements in the compute scalar; set only when `is_spliceable(dtype)`.
    TensorView<Scalar> values;
    /// Raw little-endian bytes; set only when `!is_spliceable(dtype)`.
    std::shared_ptr<const std::vector<std::uint8_t>> raw;
    /// Keeps the memory behind `values` alive; null when the caller owns it.
    std::shared_ptr<const void> storage;

    bool spliceable() const { return is_spliceable(dtype); }
    std::int64_t numel() const { return shape_numel(shape); }
  };

  WeightSet() = default;

  /// Empty set whose errors name it `source` (a file path or "model 2").
  explicit WeightSet(std::string source) : source_(std::move(source)) {}

  /// Adds an owned tensor, stored as `dtype` (a spliceable dtype).
  /// Throws std::invalid_argument for a duplicate name or an integer dtype.
  void add(std::string name, Tensor<Scalar> tensor, DType dtype = dtype_of<Scalar>()) {
    auto owned = std::make_shared<const Tensor<Scalar>>(std::move(tensor));
    add_view(std::move(name), owned->view(), dtype, owned);
  }

  /// Adds a view of memory the caller keeps alive (or that `keep_alive` owns)
  /// without copying it.
  /// Throws std::invalid_argument for a duplicate name or an integer dtype.
  void add_view(std::string name, TensorView<Scalar> view, DType dtype = dtype_of<Scalar>(),
                std::shared_ptr<const void> keep_alive = nullptr) {
    if (!is_spliceable(dtype)) {
      throw std::invalid_argument("tensor '" + name + "' has dtype " + dtype_name(dtype) +
                                  ", which holds no floating values; add it with add_raw");
    }
    Entry entry;
    entry.name = std::move(name);
    entry.dtype = dtype;
    entry.shape = view.shape();
    entry.values = std::move(view);
    entry.storage = std::move(keep_alive);
    insert(std::move(entry));
  }

  /// Adds a tensor cki never splices (integers, BOOL, F8) as raw bytes.
  /// Throws std::invalid_argument for a duplicate name, a spliceable dtype or
  /// a byte count that does not match the shape.
  void add_raw(std::string name, DType dtype, Shape shape, std::vector<std::uint8_t> bytes) {
    if (is_spliceable(dtype)) {
      throw std::invalid_argument("tensor '" + name + "' has dtype " + dtype_name(dtype) +
                                  "; add floating tensors with add or add_view");
    }
    const std::int64_t numel = shape_numel(shape);
    const auto expected = static_cast<std::uint64_t>(numel) * dtype_size(dtype);
    if (bytes.size() != expected) {
      throw std::invalid_argument("tensor '" + name + "' of shape " + shape_to_string(shape) +
                                  " and dtype " + dtype_name(dtype) + " needs " +
                                  std::to_string(expected) + " bytes, got " +
                                  std::to_string(bytes.size()));
    }
    Entry entry;
    entry.name = std::move(name);
    entry.dtype = dtype;
    entry.shape = std::move(shape);
    entry.raw = std::make_shared<const std::vector<std::uint8_t>>(std::move(bytes));
    insert(std::move(entry));
  }

  /// Adds a prepared entry; the caller guarantees that it is consistent.
  /// Throws std::invalid_argument for a duplicate name.
  void insert(Entry entry) {
    if (index_.count(entry.name) != 0) {
      throw std::invalid_argument("weight set " + describe() + " already has a tensor named '" +
                                  entry.name + "'");
    }
    index_.emplace(entry.name, entries_.size());
    entries_.push_back(std::move(entry));
  }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  /// Returns the entry named `name`. Throws MismatchError when there is none.
  const Entry& at(const std::string& name) const {
    auto found = index_.find(name);
    if (found == index_.end()) {
      throw MismatchError("weight set " + describe() + " has no tensor named '" + name + "'");
    }
    return entries_[found->second];
  }

  /// Returns the values of the floating tensor `name` in the compute scalar.
  /// Throws MismatchError when it is absent or not floating.
  const TensorView<Scalar>& view(const std::string& name) const {
    const Entry& entry = at(name);
    if (!entry.spliceable()) {
      throw MismatchError("tensor '" + name + "' of " + describe() + " has dtype " +
                          dtype_name(entry.dtype) + " and no floating values");
    }
    return entry.values;
  }

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const Entry& operator[](std::size_t index) const { return entries_[index]; }
  auto begin() const { return entries_.begin(); }
  auto end() const { return entries_.end(); }

  /// Free-form string metadata, as stored in the safetensors `__metadata__` map.
  std::map<std::string, std::string>& metadata() { return metadata_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Name used in error messages: a file path, or empty for an unnamed set.
  const std::string& source() const { return source_; }
  void set_source(std::string source) { source_ = std::move(source); }

  /// The source in quotes, or "(unnamed)".
  std::string describe() const { return source_.empty() ? "(unnamed)" : "'" + source_ + "'"; }

 private:
  std::string source_;
  std::vector<Entry> entries_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

/// Name of set `index` in messages: its source, or "model K" (1-based).
template <typename Scalar>
std::string set_label(const WeightSet<Scalar>& set, std::size_t index) {
  std::string label = "model " + std::to_string(index + 1);
  if (!set.source().empty()) label += " ('" + set.source() + "')";
  return label;
}

}  // namespace detail

/// Checks that N weight sets hold the same tensor names with the same shapes,
/// and that each tensor is floating in all sets or in none.
/// Throws std::invalid_argument for N = 0, and MismatchError for the first
/// missing or extra tensor, shape mismatch or dtype-kind mismatch, naming the
/// tensor, both values and both sets. Order of tensors may differ between sets.
template <typename Scalar>
void check_compatible(const std::vector<WeightSet<Scalar>>& sets) {
  if (sets.empty()) throw std::invalid_argument("no weight sets given; need at least one");
  const WeightSet<Scalar>& first = sets.front();

  for (std::size_t k = 1; k < sets.size(); ++k) {
    const WeightSet<Scalar>& other = sets[k];
    const std::string first_label = detail::set_label(first, 0);
    const std::string other_label = detail::set_label(other, k);

    // Every tensor of the first set must exist in the other, with its shape
    // and kind.
    for (const auto& entry : first) {
      if (!other.contains(entry.name)) {
        throw MismatchError("tensor '" + entry.name + "' of " + first_label +
                            " is missing from " + other_label);
      }
      const auto& match = other.at(entry.name);
      if (match.shape != entry.shape) {
        throw MismatchError("tensor '" + entry.name + "' has shape " +
                            shape_to_string(entry.shape) + " in " + first_label + " but " +
                            shape_to_string(match.shape) + " in " + other_label);
      }
      if (match.spliceable() != entry.spliceable()) {
        throw MismatchError("tensor '" + entry.name + "' has dtype " + dtype_name(entry.dtype) +
                            " in " + first_label + " but " + dtype_name(match.dtype) + " in " +
                            other_label + "; floating and non-floating tensors cannot be merged");
      }
    }

    // Equal counts after the loop above mean no extra tensors; otherwise find one.
    if (other.size() != first.size()) {
      for (const auto& entry : other) {
        if (!first.contains(entry.name)) {
          throw MismatchError("tensor '" + entry.name + "' of " + other_label +
                              " is missing from " + first_label);
        }
      }
    }
  }
}

}  // namespace cki
