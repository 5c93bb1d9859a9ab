// Magnitude pruning of the base model, the reference's pruning baseline.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/detail/parallel.hpp"
#include "cki/merge/common.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Parameters of magnitude pruning.
struct PruneParams {
  /// Elements with |theta| <= threshold are set to 0; finite and >= 0,
  /// default 0.02.
  double threshold = 0.02;

  /// Throws std::invalid_argument naming the field when it is out of range.
  void check() const {
    if (!(std::isfinite(threshold) && threshold >= 0)) {
      detail::throw_out_of_range("threshold", "finite and >= 0", threshold);
    }
  }

  nlohmann::json to_json() const { return {{"threshold", threshold}}; }

  /// Reads the fields present in `json` over the defaults; the result is
  /// checked. Throws std::invalid_argument for an unknown key, a value of
  /// the wrong type or out of range.
  static PruneParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {"threshold"});
    PruneParams params;
    if (json.is_object()) detail::read_number(json, "threshold", params.threshold);
    params.check();
    return params;
  }
};

/// Writes `out[i] = |values[i]| <= threshold ? 0 : values[i]` and returns the
/// number of elements set to 0.
template <typename Scalar>
std::int64_t magnitude_prune(const TensorView<Scalar>& values, double threshold, Scalar* out, int threads = 0) {
  const auto limit = static_cast<Scalar>(threshold);
  const detail::BlockPlan plan = detail::element_plan(values.size());
  std::vector<std::int64_t> pruned(static_cast<std::size_t>(plan.block_count), 0);
  detail::for_each_block(
      plan.block_count, threads, [](int) {},
      [&](std::int64_t block, int) {
        std::int64_t count = 0;
        for (std::int64_t i = plan.begin(block); i < plan.end(block); ++i) {
          const bool drop = std::abs(values[i]) <= limit;
          out[i] = drop ? Scalar(0) : values[i];
          count += drop ? 1 : 0;
        }
        pruned[static_cast<std::size_t>(block)] = count;
      });
  std::int64_t total = 0;
  for (std::int64_t count : pruned) total += count;
  return total;
}

/// Magnitude pruning of the base model: every element with |theta| <=
/// threshold becomes 0, the others are kept. The other models are ignored;
/// they may be passed so the method runs beside the others with one model
/// list. With a single model, splice() copies the tensor unchanged like
/// every method, so prune one model with magnitude_prune().
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class PrunePolicy {
 public:
  using scalar_type = Scalar;

  PrunePolicy() = default;
  /// Throws std::invalid_argument naming the field out of range.
  explicit PrunePolicy(PruneParams params) : params_(params) { params_.check(); }

  std::string name() const { return "prune"; }
  nlohmann::json parameters() const { return params_.to_json(); }
  const PruneParams& params() const { return params_; }

  /// Throws std::invalid_argument for a threshold out of range; any number
  /// of models is accepted.
  void check(std::size_t /*n_models*/) const { params_.check(); }

  /// Prunes the base's tensor into `out`. The base's mean weight is the
  /// share of elements kept, every other model's is 0; the notes give the
  /// number of elements set to 0.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const std::int64_t pruned = magnitude_prune(models[0], params_.threshold, out, context.threads);
    const auto numel = static_cast<double>(models[0].size());
    std::vector<double> mean_weights(models.size(), 0.0);
    mean_weights[0] = numel > 0 ? (numel - static_cast<double>(pruned)) / numel : 1.0;
    return {detail::stats_with_mean_weights(mean_weights), nlohmann::json{{"pruned", pruned}}};
  }

 private:
  PruneParams params_;
};

}  // namespace cki
