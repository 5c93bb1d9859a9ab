// Learnable assessment of one tensor: the CKI merge as a differentiable
// function of the assessment maps and the temperature, with its backward pass.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "cki/assessment/combination_rule.hpp"
#include "cki/assessment/compatibility_assessment.hpp"
#include "cki/assessment/context.hpp"
#include "cki/assessment/global_weight.hpp"
#include "cki/assessment/information_content.hpp"
#include "cki/assessment/local_uncertainty.hpp"
#include "cki/errors.hpp"
#include "cki/learn/adam.hpp"
#include "cki/splicing/policy.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Form of a learned assessment map.
enum class MapForm {
  /// A full D x D matrix M over the last dimension D: z = d M^T + b.
  full,
  /// Only the diagonal of M, one value per column: z = d * m + b. Costs D
  /// parameters instead of D^2, for wide tensors.
  diagonal,
};

/// Returns "full" or "diagonal".
inline const char* map_form_name(MapForm form) { return form == MapForm::full ? "full" : "diagonal"; }

/// Parses "full" or "diagonal", or returns nothing for another name.
inline std::optional<MapForm> parse_map_form(std::string_view name) {
  if (name == "full") return MapForm::full;
  if (name == "diagonal") return MapForm::diagonal;
  return std::nullopt;
}

/// Options of a learned assessment. The model weights stay fixed while the
/// assessment maps (and optionally the temperature) learn.
struct LearnOptions {
  /// Data-free CKI parameters: bins, a, c, scale s and rule are fixed while
  /// learning. `temperature` is the fixed temperature, or the initial one
  /// when `learn_temperature` is set.
  CkiParams params;
  /// Hard splicing in the forward pass. The backward pass then returns the
  /// gradient of soft splicing at the same weights (a straight-through
  /// estimator), because the hard choice has zero gradient almost everywhere.
  bool hard = false;
  /// Form of every map, unless `max_full_dim` makes it diagonal.
  MapForm map_form = MapForm::full;
  /// Largest last dimension that takes a full map. Wider tensors take a
  /// diagonal map even when `map_form` is full, and 0 sets no limit. Range >= 0.
  std::int64_t max_full_dim = 0;
  /// One map per model (M_k, b_k) instead of one shared by all. At N = 2 both
  /// models see the same deviation, so only per-model maps let the softmax
  /// rule prefer one model element by element.
  bool per_model = false;
  /// Learns log(temperature) per tensor as well. The blend rule has no
  /// temperature, so it rejects this.
  bool learn_temperature = false;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    params.check();
    if (max_full_dim < 0) {
      throw std::invalid_argument("'max_full_dim' must be >= 0, got " + std::to_string(max_full_dim));
    }
    if (learn_temperature && params.rule == RuleKind::blend) {
      throw std::invalid_argument(
          "'learn_temperature' is set but rule 'blend' uses no temperature; use rule 'softmax' or "
          "'paired-softmax', or clear 'learn_temperature'");
    }
  }

  /// Also throws std::invalid_argument when the rule cannot combine `n_models`.
  void check(std::size_t n_models) const {
    check();
    CombinationRule(params.combination()).check(n_models);
  }

  /// Map form of a tensor of `shape`, or nothing for a rank-0 tensor, which
  /// takes no map.
  std::optional<MapForm> form_for(const Shape& shape) const {
    if (shape.empty()) return std::nullopt;
    if (max_full_dim > 0 && last_dim(shape) > max_full_dim) return MapForm::diagonal;
    return map_form;
  }

  nlohmann::json to_json() const {
    return {{"params", params.to_json()},       {"splice", hard ? "hard" : "soft"},
            {"map_form", map_form_name(map_form)}, {"max_full_dim", max_full_dim},
            {"per_model", per_model},           {"learn_temperature", learn_temperature}};
  }
};

/// Positions of the parameters of a learned assessment in its flat parameter
/// vector. Each map contributes its weight (D x D row-major, or the D
/// diagonal entries) followed by its bias (D entries), maps in order. The
/// last entry is log(temperature) when the temperature is learned.
struct ParameterLayout {
  /// Last dimension D, or 0 for a rank-0 tensor, which has no map.
  std::int64_t dim = 0;
  bool diagonal = false;
  /// 0 (rank-0 tensor), 1 (shared map) or N (one per model, input order).
  std::size_t map_count = 0;
  bool has_temperature = false;

  Eigen::Index weight_size() const { return diagonal ? dim : dim * dim; }
  Eigen::Index map_size() const { return weight_size() + dim; }
  Eigen::Index weight_offset(std::size_t map) const { return static_cast<Eigen::Index>(map) * map_size(); }
  Eigen::Index bias_offset(std::size_t map) const { return weight_offset(map) + weight_size(); }
  Eigen::Index temperature_offset() const { return static_cast<Eigen::Index>(map_count) * map_size(); }
  Eigen::Index size() const { return temperature_offset() + (has_temperature ? 1 : 0); }
};

/// Gradient of the loss with respect to the parameters of one learned
/// assessment, laid out as its parameter vector.
template <typename Scalar>
struct AssessmentGradient {
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  ParameterLayout layout;
  /// Every entry, in the order of ParameterLayout.
  Vector values;

  /// dLoss/dM of map `map`: D x D, or D x 1 for a diagonal map.
  Eigen::Map<const RowMatrix> weight(std::size_t map) const {
    return Eigen::Map<const RowMatrix>(values.data() + layout.weight_offset(map), layout.dim,
                                       layout.diagonal ? 1 : layout.dim);
  }

  /// dLoss/db of map `map`, D entries.
  Eigen::Map<const Vector> bias(std::size_t map) const {
    return Eigen::Map<const Vector>(values.data() + layout.bias_offset(map), layout.dim);
  }

  /// dLoss/dlog(temperature), or 0 when the temperature is not learned.
  Scalar log_temperature() const {
    return layout.has_temperature ? values[layout.temperature_offset()] : Scalar(0);
  }
};

/// Learned CKI assessment of one tensor of N models.
///
/// forward() merges the models with the CKI formulas: information content
/// and global weight per model (no learned parameter), the leave-one-out
/// deviation d_k, z_k = d_k M_k^T + b_k along the last dimension,
/// l_k = sigmoid(s z_k), the combination rule at temperature tau, then soft
/// or hard splicing. It keeps what backward() needs. backward() takes
/// dLoss/dtheta* and returns dLoss/dM, dLoss/db and dLoss/dlog(tau) by the
/// chain rule through soft splicing, the rule and the logistic.
///
/// The entropies and global weights depend on the models only, so forward()
/// computes them once and reuses them while it receives the same tensors
/// (the same data pointers). After the first forward(), a training loop runs
/// none of cki's OpenMP loops.
/// NOTE: Eigen's matrix products in forward() and backward() may still use
/// OpenMP threads. Eigen::setNbThreads() sets their count, not `threads`.
///
/// The maps start at the identity with zero bias, so the first forward pass
/// equals data-free CKI (CkiSoft or CkiHard with `options.params`).
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class LearnableAssessment {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "cki computes in float or double");

 public:
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  /// Creates the assessment of tensor `name` of `shape` over `n_models`
  /// models, whose input index `base` is the base model (first in the formulas, and the
  /// winner of ties in hard splicing). Maps start at identity and zero bias.
  /// Throws std::invalid_argument for bad options, a rule that cannot
  /// combine `n_models`, or `base` out of range.
  LearnableAssessment(std::string name, Shape shape, std::size_t n_models, LearnOptions options,
                      std::size_t base = 0)
      : name_(std::move(name)), shape_(std::move(shape)), options_(std::move(options)), base_(base) {
    options_.check(n_models);
    if (base_ >= n_models) {
      throw std::invalid_argument("'base' must be in [0, " + std::to_string(n_models) + "), got " +
                                  std::to_string(base_));
    }
    numel_ = shape_numel(shape_);
    order_ = detail::base_first_order(n_models, base_);

    // Parameter layout and the identity start.
    const auto form = options_.form_for(shape_);
    layout_.dim = form ? last_dim(shape_) : 0;
    layout_.diagonal = form == MapForm::diagonal;
    if (form) layout_.map_count = options_.per_model ? n_models : 1;
    layout_.has_temperature = options_.learn_temperature;
    parameters_ = Vector::Zero(layout_.size());
    for (std::size_t map = 0; map < layout_.map_count; ++map) {
      weight(map) = identity_weight();
    }
    if (layout_.has_temperature) {
      parameters_[layout_.temperature_offset()] = static_cast<Scalar>(std::log(options_.params.temperature));
    }
    gradient_.layout = layout_;
    gradient_.values = Vector::Zero(layout_.size());
  }

  const std::string& name() const { return name_; }
  const Shape& shape() const { return shape_; }
  std::size_t model_count() const { return order_.size(); }
  std::size_t base() const { return base_; }
  const LearnOptions& options() const { return options_; }
  const ParameterLayout& layout() const { return layout_; }

  /// Every learned parameter, in the order of ParameterLayout. Writable, so
  /// an optimiser may update it in place.
  Vector& parameters() { return parameters_; }
  const Vector& parameters() const { return parameters_; }

  /// Number of maps: 0 for a rank-0 tensor, 1 when shared, N when per model.
  std::size_t map_count() const { return layout_.map_count; }

  /// Returns map `index` as the local uncertainty takes it: the shared map
  /// for 0, or the map of the model with input index `index` when maps are
  /// per model. Throws std::out_of_range for an index beyond map_count().
  AssessmentMap<Scalar> map(std::size_t index) const {
    check_map_index(index);
    AssessmentMap<Scalar> out;
    out.diagonal = layout_.diagonal;
    out.weight = weight(index);
    out.bias = bias(index);
    return out;
  }

  /// Replaces map `index`. A bias with no entries sets b = 0.
  /// Throws std::out_of_range for an index beyond map_count(), and
  /// std::invalid_argument when the map's form or shape does not fit.
  void set_map(std::size_t index, const AssessmentMap<Scalar>& value) {
    check_map_index(index);
    value.check(layout_.dim, name_);
    if (value.diagonal != layout_.diagonal) {
      throw std::invalid_argument("assessment map of tensor '" + name_ + "' is " +
                                  (value.diagonal ? "diagonal" : "full") + ", expected " +
                                  (layout_.diagonal ? "diagonal" : "full"));
    }
    weight(index) = value.weight;
    if (value.bias.size() == 0) {
      bias(index).setZero();
    } else {
      bias(index) = value.bias;
    }
  }

  /// Temperature tau of the rule: exp(log tau) when learned, otherwise the
  /// fixed `options().params.temperature`.
  double temperature() const {
    if (!layout_.has_temperature) return options_.params.temperature;
    return std::exp(static_cast<double>(parameters_[layout_.temperature_offset()]));
  }

  /// Sets the learned temperature. Throws std::logic_error when the
  /// temperature is not learned, std::invalid_argument when it is outside (0, 1e6].
  void set_temperature(double temperature) {
    if (!layout_.has_temperature) {
      throw std::logic_error("tensor '" + name_ + "' does not learn its temperature");
    }
    CombinationRuleParams{options_.params.rule, temperature}.check();
    parameters_[layout_.temperature_offset()] = static_cast<Scalar>(std::log(temperature));
  }

  /// Merges the N `models` (input order, each of shape()) into theta* and
  /// keeps the deviations, uncertainties and weights for backward(). The
  /// views are kept too, so the models must stay alive and unchanged until
  /// backward() has run. One model is returned unchanged.
  ///
  /// Computes the entropies and global weights on `threads` threads (0 uses
  /// the OpenMP default) only when the models' data pointers differ from
  /// those of the last computation, and reuses them otherwise. Call
  /// reset_global_weights() after changing a model's values in place.
  /// NOTE: a model freed and another allocated at the same address also
  /// reuses the stored values; call reset_global_weights() when the models
  /// change. Throws MismatchError for a wrong model count or shape,
  /// std::invalid_argument for `threads` < 0, and NumericError for a learned
  /// temperature outside (0, 1e6] or a NaN or infinite element.
  Tensor<Scalar> forward(const std::vector<TensorView<Scalar>>& models, int threads = 0) {
    check_models(models);
    if (threads < 0) throw std::invalid_argument("'threads' must be >= 0, got " + std::to_string(threads));
    const auto n = static_cast<Eigen::Index>(models.size());
    has_forward_ = false;
    ordered_.clear();
    for (std::size_t index : order_) ordered_.push_back(models[index]);
    Tensor<Scalar> out(shape_);
    weights_.resize(numel_, n);
    if (numel_ == 0) {
      has_forward_ = true;
      return out;
    }

    // Global level: entropies and global weights, no learned parameter.
    update_global_weights(models, threads);

    // Local level: leave-one-out deviation, map and logistic.
    compute_deviations();
    compute_uncertainties();

    // Combination rule at the current temperature.
    const double tau = checked_temperature();
    BlockArray<Scalar> scratch(numel_, std::max<Eigen::Index>(n, 2));
    CombinationRule rule(CombinationRuleParams{options_.params.rule, tau});
    rule(global_weights_, numel_, uncertainties_, weights_, scratch);

    // Splicing, by the same code as the data-free policies.
    std::vector<const Scalar*> pointers;
    for (const auto& view : ordered_) pointers.push_back(view.data());
    std::vector<double> weight_sums(static_cast<std::size_t>(n), 0.0);
    std::vector<std::int64_t> hard_counts(static_cast<std::size_t>(n), 0);
    if (options_.hard) {
      HardSplice::apply(weights_, pointers.data(), numel_, n, out.data(), weight_sums.data(), hard_counts.data());
    } else {
      SoftSplice::apply(weights_, pointers.data(), numel_, n, out.data(), weight_sums.data(), hard_counts.data());
    }
    has_forward_ = true;
    return out;
  }

  /// Computes dLoss/dparameters from `output_gradient` = dLoss/dtheta* (of
  /// shape()) at the last forward pass, stores it as gradient() and returns
  /// it. The gradient replaces the previous one. With hard splicing this is
  /// the straight-through gradient (that of soft splicing at the same
  /// weights). Throws std::logic_error before the first forward() and
  /// std::invalid_argument for a gradient of another shape.
  const AssessmentGradient<Scalar>& backward(const TensorView<Scalar>& output_gradient) {
    if (!has_forward_) {
      throw std::logic_error("backward() of tensor '" + name_ + "' called before forward()");
    }
    if (output_gradient.shape() != shape_) {
      throw std::invalid_argument("gradient of tensor '" + name_ + "' has shape " +
                                  shape_to_string(output_gradient.shape()) + ", expected " +
                                  shape_to_string(shape_));
    }
    gradient_.values.setZero();
    if (model_count() == 1 || numel_ == 0) return gradient_;

    // dLoss/dw_k = dLoss/dtheta* . theta_k, by soft splicing.
    BlockArray<Scalar> weight_gradient = splice_backward(output_gradient);

    // dLoss/dl_k through the rule, and dLoss/dlog tau on the way.
    BlockArray<Scalar> uncertainty_gradient = rule_backward(weight_gradient);

    // dLoss/dz_k through the logistic, into the maps.
    logistic_backward(uncertainty_gradient);
    map_backward(uncertainty_gradient);
    return gradient_;
  }

  /// The gradient of the last backward() (zero before it).
  const AssessmentGradient<Scalar>& gradient() const { return gradient_; }

  /// Sets the stored gradient to zero.
  void zero_gradient() { gradient_.values.setZero(); }

  /// Parameters and gradient as one block for Adam.
  ParameterBlock<Scalar> parameter_block() {
    return ParameterBlock<Scalar>{parameters_.data(), gradient_.values.data(), parameters_.size()};
  }

  /// Returns the information content (nats) of each model, in input order,
  /// that the global weights come from. Empty before the first forward() of
  /// a non-empty tensor and after reset_global_weights().
  std::vector<double> entropies() const { return to_input_order(entropies_); }

  /// Returns the global weight of each model, in input order, in double as
  /// GlobalWeight computes it. The rule uses these values rounded to Scalar.
  /// Empty whenever entropies() is empty.
  std::vector<double> global_weights() const { return to_input_order(global_weight_values_); }

  /// Drops the stored entropies and global weights, so that the next
  /// forward() computes them again. forward() notices other tensors by their
  /// data pointers, but not values changed in place.
  void reset_global_weights() {
    global_level_key_.clear();
    entropies_.clear();
    global_weight_values_.clear();
    global_weights_.clear();
  }

  /// Mean weight of each model (input order) in the last forward pass, or
  /// nothing before the first forward pass.
  std::vector<double> mean_weights() const {
    std::vector<double> out;
    if (!has_forward_) return out;
    out.assign(model_count(), numel_ == 0 ? 0.0 : 1.0 / static_cast<double>(model_count()));
    if (numel_ == 0) return out;
    for (std::size_t i = 0; i < model_count(); ++i) {
      out[order_[i]] = weights_.col(static_cast<Eigen::Index>(i)).template cast<double>().mean();
    }
    return out;
  }

 private:
  using Column = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;

  Eigen::Map<RowMatrix> weight(std::size_t map) {
    return Eigen::Map<RowMatrix>(parameters_.data() + layout_.weight_offset(map), layout_.dim,
                                 layout_.diagonal ? 1 : layout_.dim);
  }
  Eigen::Map<const RowMatrix> weight(std::size_t map) const {
    return Eigen::Map<const RowMatrix>(parameters_.data() + layout_.weight_offset(map), layout_.dim,
                                       layout_.diagonal ? 1 : layout_.dim);
  }
  Eigen::Map<Vector> bias(std::size_t map) {
    return Eigen::Map<Vector>(parameters_.data() + layout_.bias_offset(map), layout_.dim);
  }
  Eigen::Map<const Vector> bias(std::size_t map) const {
    return Eigen::Map<const Vector>(parameters_.data() + layout_.bias_offset(map), layout_.dim);
  }

  RowMatrix identity_weight() const {
    if (layout_.diagonal) return RowMatrix::Ones(layout_.dim, 1);
    return RowMatrix::Identity(layout_.dim, layout_.dim);
  }

  void check_map_index(std::size_t map) const {
    if (map >= layout_.map_count) {
      throw std::out_of_range("tensor '" + name_ + "' has " + std::to_string(layout_.map_count) +
                              " assessment maps, no map " + std::to_string(map));
    }
  }

  // Index of the map that the model at base-first position `position` uses.
  std::size_t map_index(Eigen::Index position) const {
    return options_.per_model ? order_[static_cast<std::size_t>(position)] : 0;
  }

  void check_models(const std::vector<TensorView<Scalar>>& models) const {
    if (models.size() != model_count()) {
      throw MismatchError("tensor '" + name_ + "' was set up for " + std::to_string(model_count()) +
                          " models, got " + std::to_string(models.size()));
    }
    for (std::size_t k = 0; k < models.size(); ++k) {
      if (models[k].shape() != shape_) {
        throw MismatchError("tensor '" + name_ + "' has shape " + shape_to_string(models[k].shape()) +
                            " in model " + std::to_string(k + 1) + ", expected " + shape_to_string(shape_));
      }
    }
  }

  // Base-first `values` in input order, or nothing when `values` is empty.
  std::vector<double> to_input_order(const std::vector<double>& values) const {
    if (values.empty()) return {};
    std::vector<double> out(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) out[order_[i]] = values[i];
    return out;
  }

  // Computes the entropies and global weights of ordered_ unless they were
  // computed for the data pointers of `models`. Stores nothing when an
  // element is not finite. Reused values still get the finite check, one
  // vectorised read of each model on this thread (no OpenMP region in a
  // training loop), so a NaN written in place is reported.
  void update_global_weights(const std::vector<TensorView<Scalar>>& models, int threads) {
    std::vector<const Scalar*> key;
    for (const auto& view : models) key.push_back(view.data());
    if (!global_level_key_.empty() && key == global_level_key_) {
      for (std::size_t i = 0; i < ordered_.size(); ++i) {
        const std::int64_t bad = detail::first_non_finite(ordered_[i], 1);
        if (bad >= 0) detail::throw_non_finite(name_, "model " + std::to_string(order_[i] + 1), ordered_[i], bad);
      }
      return;
    }

    const InformationContent information(options_.params.information());
    std::vector<double> entropies;
    for (std::size_t i = 0; i < ordered_.size(); ++i) {
      try {
        entropies.push_back(information(ordered_[i], name_, threads));
      } catch (const NumericError& error) {
        throw NumericError(std::string(error.what()) + " in model " + std::to_string(order_[i] + 1));
      }
    }
    std::vector<double> weights = GlobalWeight(options_.params.global())(entropies);

    global_weights_.assign(weights.begin(), weights.end());
    global_weight_values_ = std::move(weights);
    entropies_ = std::move(entropies);
    global_level_key_ = std::move(key);
  }

  // Leave-one-out deviation d_k = |theta_k - mean_{j != k} theta_j|, by the
  // same operations as the local uncertainty, so that the identity start
  // reproduces data-free CKI up to rounding.
  void compute_deviations() {
    const auto n = static_cast<Eigen::Index>(ordered_.size());
    deviations_.resize(numel_, n);
    if (n == 1) {
      deviations_.setZero();
      return;
    }
    if (n == 2) {
      deviations_.col(0) = (Column(ordered_[0].data(), numel_) - Column(ordered_[1].data(), numel_)).abs();
      deviations_.col(1) = deviations_.col(0);
      return;
    }
    Eigen::Array<Scalar, Eigen::Dynamic, 1> sum = Column(ordered_[0].data(), numel_);
    for (Eigen::Index k = 1; k < n; ++k) sum += Column(ordered_[static_cast<std::size_t>(k)].data(), numel_);
    const Scalar inverse_others = Scalar(1) / static_cast<Scalar>(n - 1);
    for (Eigen::Index k = 0; k < n; ++k) {
      const Column theta(ordered_[static_cast<std::size_t>(k)].data(), numel_);
      deviations_.col(k) = (theta - (sum - theta) * inverse_others).abs();
    }
  }

  // l_k = sigmoid(s z_k) with z_k = d_k M^T + b along the last dimension.
  void compute_uncertainties() {
    const auto n = deviations_.cols();
    uncertainties_.resize(numel_, n);
    const auto scale = static_cast<Scalar>(options_.params.scale);
    const Eigen::Index dim = layout_.dim;
    const Eigen::Index rows = dim == 0 ? 0 : numel_ / dim;
    for (Eigen::Index k = 0; k < n; ++k) {
      if (layout_.map_count == 0) {
        uncertainties_.col(k) = deviations_.col(k);
      } else {
        const std::size_t map = map_index(k);
        Eigen::Map<const RowMatrix> deviation(deviations_.col(k).data(), rows, dim);
        Eigen::Map<RowMatrix> z(uncertainties_.col(k).data(), rows, dim);
        if (layout_.diagonal) {
          z.array() = deviation.array().rowwise() * weight(map).col(0).transpose().array();
        } else {
          z.noalias() = deviation * weight(map).transpose();
        }
        z.rowwise() += bias(map).transpose();
      }
      uncertainties_.col(k) = (uncertainties_.col(k) * scale).logistic();
    }
  }

  double checked_temperature() const {
    const double tau = temperature();
    if (!(tau > 0.0 && tau <= 1e6)) {
      throw NumericError("learned temperature of tensor '" + name_ + "' is " + std::to_string(tau) +
                         ", outside (0, 1e6]; lower the learning rate or fix the temperature");
    }
    return tau;
  }

  // dLoss/dw_k = g . theta_k per element, base-first columns.
  BlockArray<Scalar> splice_backward(const TensorView<Scalar>& output_gradient) const {
    const auto n = static_cast<Eigen::Index>(ordered_.size());
    BlockArray<Scalar> out(numel_, n);
    const Column gradient(output_gradient.data(), numel_);
    for (Eigen::Index k = 0; k < n; ++k) {
      out.col(k) = gradient * Column(ordered_[static_cast<std::size_t>(k)].data(), numel_);
    }
    return out;
  }

  // Back through the combination rule: from dLoss/dw to dLoss/dl. Adds
  // dLoss/dlog tau to the gradient when the temperature is learned.
  BlockArray<Scalar> rule_backward(const BlockArray<Scalar>& weight_gradient) {
    const auto n = weight_gradient.cols();
    BlockArray<Scalar> out = BlockArray<Scalar>::Zero(numel_, n);
    const auto& g = global_weights_;
    const auto& l = uncertainties_;

    if (options_.params.rule == RuleKind::blend) {
      // w_1 = g_1 l + (1 - g_1) and w_2 = 1 - w_1, so dw_1/dl = g_1 = -dw_2/dl.
      out.col(0) = g[0] * (weight_gradient.col(0) - weight_gradient.col(1));
      return out;
    }

    // Softmax of u = e / tau: du_k = w_k (dw_k - sum_j w_j dw_j).
    const auto tau = static_cast<Scalar>(temperature());
    Eigen::Array<Scalar, Eigen::Dynamic, 1> weighted = weights_.col(0) * weight_gradient.col(0);
    for (Eigen::Index k = 1; k < n; ++k) weighted += weights_.col(k) * weight_gradient.col(k);
    BlockArray<Scalar> score_gradient(numel_, n);
    for (Eigen::Index k = 0; k < n; ++k) {
      score_gradient.col(k) = weights_.col(k) * (weight_gradient.col(k) - weighted);
    }

    // Scores e_k again, for dLoss/dlog tau = -sum du_k e_k / tau.
    BlockArray<Scalar> scores(numel_, n);
    BlockArray<Scalar> score_slope(numel_, n);
    if (options_.params.rule == RuleKind::paired_softmax) {
      // e_1 = g_1 (1 - exp(-g_1 l)), e_2 = g_2 (1 - exp(-g_2 (1 - l))), l = l_1.
      const Eigen::Array<Scalar, Eigen::Dynamic, 1> decay1 = (-g[0] * l.col(0)).exp();
      const Eigen::Array<Scalar, Eigen::Dynamic, 1> decay2 = (-g[1] * (Scalar(1) - l.col(0))).exp();
      scores.col(0) = g[0] * (Scalar(1) - decay1);
      scores.col(1) = g[1] * (Scalar(1) - decay2);
      score_slope.col(0) = g[0] * g[0] * decay1;
      score_slope.col(1) = -g[1] * g[1] * decay2;
    } else {
      // e_k = g_k (1 - exp(-g_k (1 - l_k))), so de_k/dl_k = -g_k^2 exp(-g_k (1 - l_k)).
      for (Eigen::Index k = 0; k < n; ++k) {
        const Scalar gk = g[static_cast<std::size_t>(k)];
        const Eigen::Array<Scalar, Eigen::Dynamic, 1> decay = (-gk * (Scalar(1) - l.col(k))).exp();
        scores.col(k) = gk * (Scalar(1) - decay);
        score_slope.col(k) = -gk * gk * decay;
      }
    }
    if (layout_.has_temperature) {
      gradient_.values[layout_.temperature_offset()] = -(score_gradient * scores).sum() / tau;
    }

    // de_k = du_k / tau, then into l.
    if (options_.params.rule == RuleKind::paired_softmax) {
      out.col(0) = (score_gradient.col(0) * score_slope.col(0) + score_gradient.col(1) * score_slope.col(1)) / tau;
    } else {
      out = score_gradient * score_slope / tau;
    }
    return out;
  }

  // dLoss/dz = dLoss/dl . s l (1 - l), in place.
  void logistic_backward(BlockArray<Scalar>& uncertainty_gradient) const {
    const auto scale = static_cast<Scalar>(options_.params.scale);
    uncertainty_gradient *= scale * uncertainties_ * (Scalar(1) - uncertainties_);
  }

  // dLoss/dM = dz^T d and dLoss/db = column sums of dz, added per model into
  // the map it uses.
  void map_backward(const BlockArray<Scalar>& z_gradient) {
    if (layout_.map_count == 0) return;
    const Eigen::Index dim = layout_.dim;
    const Eigen::Index rows = numel_ / dim;
    // Blend and paired softmax read l_1 only, so the other columns are zero.
    const Eigen::Index used = options_.params.rule == RuleKind::softmax ? z_gradient.cols() : 1;
    for (Eigen::Index k = 0; k < used; ++k) {
      const std::size_t map = map_index(k);
      Eigen::Map<const RowMatrix> dz(z_gradient.col(k).data(), rows, dim);
      Eigen::Map<const RowMatrix> deviation(deviations_.col(k).data(), rows, dim);
      Eigen::Map<RowMatrix> weight_gradient(gradient_.values.data() + layout_.weight_offset(map), dim,
                                            layout_.diagonal ? 1 : dim);
      if (layout_.diagonal) {
        weight_gradient.col(0) += dz.cwiseProduct(deviation).colwise().sum().transpose();
      } else {
        weight_gradient.noalias() += dz.transpose() * deviation;
      }
      Eigen::Map<Vector>(gradient_.values.data() + layout_.bias_offset(map), dim) += dz.colwise().sum().transpose();
    }
  }

  std::string name_;
  Shape shape_;
  LearnOptions options_;
  std::size_t base_ = 0;
  std::int64_t numel_ = 0;
  std::vector<std::size_t> order_;
  ParameterLayout layout_;
  Vector parameters_;
  AssessmentGradient<Scalar> gradient_;

  // Entropies and global weights (base first) and the data pointers of the
  // models (input order) they were computed for. All are empty until computed.
  std::vector<const Scalar*> global_level_key_;
  std::vector<double> entropies_;
  std::vector<double> global_weight_values_;
  std::vector<Scalar> global_weights_;

  // State of the last forward pass, columns base first.
  bool has_forward_ = false;
  std::vector<TensorView<Scalar>> ordered_;
  BlockArray<Scalar> deviations_;
  BlockArray<Scalar> uncertainties_;
  BlockArray<Scalar> weights_;
};

}  // namespace cki
