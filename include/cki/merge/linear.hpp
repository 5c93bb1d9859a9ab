// Linear merge methods: weighted average and task arithmetic.
#pragma once

#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/merge/common.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Parameters of the weighted average.
struct AverageParams {
  /// One weight per model in input order, each finite and >= 0 with a
  /// positive sum; empty (the default) weighs the models equally.
  std::vector<double> weights;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const { detail::check_average_weights(weights); }

  nlohmann::json to_json() const { return {{"weights", weights}}; }

  /// Reads the fields present in `json` over the defaults; the result is
  /// checked. Throws std::invalid_argument for an unknown key, a value of
  /// the wrong type or out of range.
  static AverageParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {"weights"});
    AverageParams params;
    if (json.is_object()) detail::read_number_list(json, "weights", params.weights);
    params.check();
    return params;
  }
};

/// Weighted average of all models: theta = sum_k w_k theta_k / sum_k w_k,
/// computed as sum_k (w_k / sum_j w_j) theta_k.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class AveragePolicy : public detail::WeightedPolicy<AverageParams> {
 public:
  using scalar_type = Scalar;
  using WeightedPolicy::WeightedPolicy;

  std::string name() const { return "average"; }
  /// True: merge() tests its output for NaN and infinity and finds the
  /// input that caused them, so splice_tensor() need not scan first.
  bool checks_finite() const { return true; }

  /// Averages one tensor of N models (base first) into `out`; each model's
  /// mean weight in the stats is its normalised weight. Throws NumericError
  /// for a NaN or infinite input, found by testing the output as it is
  /// written rather than by a separate pass over the inputs.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const std::vector<double> weights = detail::weights_base_first(params_.weights, context);
    double total = 0;
    for (double weight : weights) total += weight;
    std::vector<double> normalised(weights.size());
    std::vector<Scalar> coefficients(weights.size());
    for (std::size_t k = 0; k < weights.size(); ++k) {
      normalised[k] = weights[k] / total;
      coefficients[k] = static_cast<Scalar>(normalised[k]);
    }
    const bool finite = detail::linear_combination(models, coefficients, out, context.threads);
    std::vector<bool> reached(models.size());
    for (std::size_t k = 0; k < models.size(); ++k) reached[k] = coefficients[k] != Scalar(0);
    detail::check_inputs_after_merge(context, models, reached, finite);
    return detail::stats_with_mean_weights(normalised);
  }
};

/// Parameters of task arithmetic.
struct TaskArithmeticParams {
  /// One weight per model in input order, each finite (negative weights
  /// subtract a task); the base's entry is ignored because its delta is 0.
  /// Empty (the default) gives every fine-tune weight 1.
  std::vector<double> weights;
  /// Scale lambda of the summed deltas; finite, default 1.
  double lambda = 1.0;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    detail::check_weight_values(weights, true);
    if (!std::isfinite(lambda)) detail::throw_out_of_range("lambda", "finite", lambda);
  }

  nlohmann::json to_json() const { return {{"weights", weights}, {"lambda", lambda}}; }

  /// Reads the fields present in `json` over the defaults; the result is
  /// checked. Throws std::invalid_argument for an unknown key, a value of
  /// the wrong type or out of range.
  static TaskArithmeticParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {"weights", "lambda"});
    TaskArithmeticParams params;
    if (json.is_object()) {
      detail::read_number_list(json, "weights", params.weights);
      detail::read_number(json, "lambda", params.lambda);
    }
    params.check();
    return params;
  }
};

/// Task arithmetic: theta = theta_base + lambda sum_k w_k (theta_k - theta_base)
/// over the fine-tunes k.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class TaskArithmeticPolicy : public detail::WeightedPolicy<TaskArithmeticParams> {
 public:
  using scalar_type = Scalar;
  using WeightedPolicy::WeightedPolicy;

  std::string name() const { return "task-arithmetic"; }
  /// True: merge() tests its output for NaN and infinity and finds the
  /// input that caused them, so splice_tensor() need not scan first.
  bool checks_finite() const { return true; }

  /// Merges one tensor of N models (base first) into `out`. The stats carry
  /// no per-model values. Throws NumericError for a NaN or infinite input,
  /// found by testing the output as it is written.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const std::vector<double> weights = detail::weights_base_first(params_.weights, context);
    std::vector<Scalar> coefficients(weights.size(), Scalar(0));
    for (std::size_t k = 1; k < weights.size(); ++k) {
      coefficients[k] = static_cast<Scalar>(params_.lambda * weights[k]);
    }
    const bool finite = detail::add_scaled_deltas(models, coefficients, out, context.threads);
    std::vector<bool> reached(models.size());
    for (std::size_t k = 0; k < models.size(); ++k) reached[k] = k == 0 || coefficients[k] != Scalar(0);
    detail::check_inputs_after_merge(context, models, reached, finite);
    return std::vector<ModelTensorStats>(models.size());
  }
};

}  // namespace cki
