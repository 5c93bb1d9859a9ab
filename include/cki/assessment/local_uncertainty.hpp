// Local uncertainty of each element of each model: how far it sits from the others.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/detail/format.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Parameters of the local uncertainty.
struct LocalUncertaintyParams {
  /// Scale s inside the logistic, l = sigmoid(s z); range (0, 1e6].
  double scale = 1.0;

  /// Throws std::invalid_argument naming the field when it is out of range.
  void check() const {
    if (!(scale > 0.0 && scale <= 1e6)) {
      detail::throw_out_of_range("scale", "in (0, 1e6]", scale);
    }
  }

  nlohmann::json to_json() const { return {{"scale", scale}}; }
};

/// Assessment map of one tensor: z = d M^T + b along the last dimension D,
/// like a linear layer. `weight` is D x D, or D x 1 holding the diagonal of M
/// when `diagonal` is set; `bias` has D entries, or none for b = 0.
template <typename Scalar>
struct AssessmentMap {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> weight;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> bias;
  bool diagonal = false;

  /// Throws std::invalid_argument when the map does not fit a last dimension
  /// of `dim`, naming `tensor` and both shapes.
  void check(std::int64_t dim, const std::string& tensor) const {
    const std::string expected = diagonal ? "[" + std::to_string(dim) + ", 1]"
                                          : "[" + std::to_string(dim) + ", " + std::to_string(dim) + "]";
    const bool weight_fits = diagonal ? (weight.rows() == dim && weight.cols() == 1)
                                      : (weight.rows() == dim && weight.cols() == dim);
    if (!weight_fits) {
      throw std::invalid_argument("assessment map of tensor '" + tensor + "' has shape [" +
                                  std::to_string(weight.rows()) + ", " + std::to_string(weight.cols()) +
                                  "], expected " + expected + " for last dimension " + std::to_string(dim));
    }
    if (bias.size() != 0 && bias.size() != dim) {
      throw std::invalid_argument("assessment bias of tensor '" + tensor + "' has " +
                                  std::to_string(bias.size()) + " entries, expected " +
                                  std::to_string(dim) + " (the last dimension) or none");
    }
  }
};

/// Local uncertainty: for model k and element i, the leave-one-out deviation
/// d_k = |theta_k - mean_{j != k} theta_j| (at N = 2 both models get
/// |theta_1 - theta_2|), mapped along the last dimension by an optional
/// assessment map z_k = d_k M^T + b (identity and zero by default, none for
/// rank-0 tensors), then l_k = sigmoid(s z_k). l grows with disagreement.
///
/// A map may be shared by all models or given per model (M_k, b_k), per
/// tensor name. Per-model maps are listed in the caller's input order.
///
/// Requirements of a substitute functor: `void check_tensor(const
/// TensorContext&) const` and `void operator()(const TensorContext&, const
/// Scalar* const* block, std::int64_t count, BlockArray<Scalar>& l,
/// BlockArray<Scalar>& scratch) const`, which writes the first `count` rows of
/// `l` from the N pointers of `block` (base first), each at the block's first
/// element. Blocks hold whole rows of the last dimension.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class LocalUncertainty {
 public:
  LocalUncertainty() = default;
  explicit LocalUncertainty(LocalUncertaintyParams params) : params_(params) { params_.check(); }

  const LocalUncertaintyParams& params() const { return params_; }
  nlohmann::json parameters() const {
    nlohmann::json out = params_.to_json();
    out["mapped_tensors"] = maps_.size();
    return out;
  }

  /// Sets one assessment map shared by every model for tensor `name`.
  void set_map(const std::string& name, AssessmentMap<Scalar> map) {
    maps_[name] = std::vector<AssessmentMap<Scalar>>{std::move(map)};
  }

  /// Sets one assessment map per model (in input order) for tensor `name`.
  void set_maps(const std::string& name, std::vector<AssessmentMap<Scalar>> maps) {
    if (maps.empty()) throw std::invalid_argument("no assessment maps given for tensor '" + name + "'");
    maps_[name] = std::move(maps);
  }

  /// Returns the maps of tensor `name`, or null when it uses the identity.
  const std::vector<AssessmentMap<Scalar>>* maps_for(const std::string& name) const {
    auto found = maps_.find(name);
    return found == maps_.end() ? nullptr : &found->second;
  }

  /// Checks the maps of the tensor against its shape and model count.
  /// Throws std::invalid_argument naming the tensor and the values.
  void check_tensor(const TensorContext& context) const {
    const auto* maps = maps_for(context.name);
    if (maps == nullptr) return;
    if (context.shape.empty()) {
      throw std::invalid_argument("tensor '" + context.name +
                                  "' is a rank-0 scalar and takes no assessment map");
    }
    if (maps->size() != 1 && maps->size() != context.model_count()) {
      throw std::invalid_argument("tensor '" + context.name + "' has " + std::to_string(maps->size()) +
                                  " assessment maps for " + std::to_string(context.model_count()) +
                                  " models; give one shared map or one per model");
    }
    for (const auto& map : *maps) map.check(last_dim(context.shape), context.name);
  }

  /// True when tensor `name` has an assessment map, which acts along whole
  /// rows of the last dimension, so blocks must hold whole rows. Without a
  /// map every element is independent and blocks may split rows.
  bool needs_whole_rows(const TensorContext& context) const { return maps_for(context.name) != nullptr; }

  /// Writes l for the first `count` elements of the block into `l`.
  void operator()(const TensorContext& context, const Scalar* const* block, std::int64_t count,
                  BlockArray<Scalar>& l, BlockArray<Scalar>& scratch) const {
    using Column = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    const auto n = static_cast<Eigen::Index>(context.model_count());

    const auto* maps = maps_for(context.name);
    const auto scale = static_cast<Scalar>(params_.scale);

    // Leave-one-out deviation. At N = 2 both models see |theta_1 - theta_2|
    // exactly; for more models the mean of the others comes from one running
    // sum. Without a map the logistic is applied in the same pass, which
    // evaluates the same operations as the separate passes below.
    if (n == 1) {
      l.col(0).head(count).setZero();
    } else if (n == 2) {
      const auto deviation = (Column(block[0], count) - Column(block[1], count)).abs();
      if (maps == nullptr) {
        l.col(0).head(count) = (deviation * scale).logistic();
      } else {
        l.col(0).head(count) = deviation;
      }
      l.col(1).head(count) = l.col(0).head(count);
    } else {
      auto sum = scratch.col(0).head(count);
      sum = Column(block[0], count);
      for (Eigen::Index k = 1; k < n; ++k) sum += Column(block[k], count);
      const Scalar inverse_others = Scalar(1) / static_cast<Scalar>(n - 1);
      for (Eigen::Index k = 0; k < n; ++k) {
        const Column theta(block[k], count);
        const auto deviation = (theta - (sum - theta) * inverse_others).abs();
        if (maps == nullptr) {
          l.col(k).head(count) = (deviation * scale).logistic();
        } else {
          l.col(k).head(count) = deviation;
        }
      }
    }
    if (maps == nullptr && n > 1) return;

    // Assessment map along the last dimension, when set, then the logistic
    // of the scaled value.
    const std::int64_t dim = last_dim(context.shape);
    for (Eigen::Index k = 0; k < n; ++k) {
      if (maps != nullptr) {
        const auto& map = maps->size() == 1 ? maps->front() : (*maps)[context.order[k]];
        apply_map(map, dim, count, l.col(k).data(), scratch.col(0).data());
      }
      l.col(k).head(count) = (l.col(k).head(count) * scale).logistic();
    }
  }

 private:
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  // z = d M^T + b in place over `count` elements (whole rows of `dim`).
  static void apply_map(const AssessmentMap<Scalar>& map, std::int64_t dim, std::int64_t count,
                        Scalar* values, Scalar* scratch) {
    const std::int64_t rows = count / dim;
    Eigen::Map<RowMatrix> deviation(values, rows, dim);
    if (map.diagonal) {
      deviation.array().rowwise() *= map.weight.col(0).transpose().array();
    } else {
      Eigen::Map<RowMatrix> product(scratch, rows, dim);
      product.noalias() = deviation * map.weight.transpose();
      deviation = product;
    }
    if (map.bias.size() != 0) deviation.rowwise() += map.bias.transpose();
  }

  LocalUncertaintyParams params_;
  std::unordered_map<std::string, std::vector<AssessmentMap<Scalar>>> maps_;
};

}  // namespace cki
