// DARE: drop task-vector entries at random and rescale the survivors, then
// merge them by task arithmetic (dare) or by TIES's sign election (dare-ties).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/detail/parallel.hpp"
#include "cki/merge/common.hpp"
#include "cki/merge/random.hpp"
#include "cki/merge/ties.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Parameters of DARE and DARE-TIES.
struct DareParams {
  /// One weight per model in input order, each finite; the base's entry is
  /// ignored. DARE-TIES also needs each >= 0. Empty (the default) gives
  /// every fine-tune weight 1.
  std::vector<double> weights;
  /// Scale lambda of the merged delta; finite, default 1.
  double lambda = 1.0;
  /// Probability p of dropping each delta entry, in [0, 1); kept entries
  /// are multiplied by 1 / (1 - p). Default 0.5.
  double drop_rate = 0.5;
  /// Seed of the drops; with the model's input index, the tensor name and
  /// the element index it fixes every draw.
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    detail::check_weight_values(weights, true);
    if (!std::isfinite(lambda)) detail::throw_out_of_range("lambda", "finite", lambda);
    if (!(drop_rate >= 0 && drop_rate < 1)) detail::throw_out_of_range("drop_rate", "in [0, 1)", drop_rate);
  }

  nlohmann::json to_json() const {
    return {{"weights", weights}, {"lambda", lambda}, {"drop_rate", drop_rate}, {"seed", seed}};
  }

  /// Reads the fields present in `json` over the defaults; the result is
  /// checked. Throws std::invalid_argument for an unknown key, a value of
  /// the wrong type or out of range.
  static DareParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {"weights", "lambda", "drop_rate", "seed"});
    DareParams params;
    if (json.is_object()) {
      detail::read_number_list(json, "weights", params.weights);
      detail::read_number(json, "lambda", params.lambda);
      detail::read_number(json, "drop_rate", params.drop_rate);
      detail::read_unsigned(json, "seed", params.seed);
    }
    params.check();
    return params;
  }
};

/// DARE: each entry of tau_k = theta_k - theta_base is dropped with
/// probability p and otherwise multiplied by 1 / (1 - p), which keeps its
/// expected value. Entry i of model k is kept when draw i of
/// CounterGenerator(seed, input index of k, tensor name) is >= p.
///
/// With `SignElection` false ("dare") the result is task arithmetic on the
/// rescaled deltas, theta_base + lambda sum_k w_k tau~_k. With it true
/// ("dare-ties") the rescaled deltas go through TIES's sign election and
/// disjoint mean, without a magnitude trim: theta_base + lambda * mean.
/// \tparam Scalar compute scalar, float or double.
/// \tparam SignElection false for DARE, true for DARE-TIES.
template <typename Scalar, bool SignElection>
class BasicDarePolicy {
 public:
  using scalar_type = Scalar;

  BasicDarePolicy() = default;
  /// Throws std::invalid_argument naming the first field out of range.
  explicit BasicDarePolicy(DareParams params) : params_(std::move(params)) { check_params(); }

  std::string name() const { return SignElection ? "dare-ties" : "dare"; }
  nlohmann::json parameters() const { return params_.to_json(); }
  const DareParams& params() const { return params_; }

  /// Throws std::invalid_argument when the weights do not fit `n_models`.
  void check(std::size_t n_models) const {
    check_params();
    detail::check_weight_count(params_.weights, n_models);
  }

  /// Merges one tensor of N models (base first) into `out`. The notes list
  /// how many delta entries of each model survived the drop, in input order.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const std::size_t n = models.size();
    const std::int64_t numel = models.front().size();
    const std::vector<double> weights = detail::weights_base_first(params_.weights, context);
    const std::uint64_t keep_threshold = CounterGenerator::uniform_threshold(params_.drop_rate);
    const auto rescale = static_cast<Scalar>(1.0 / (1.0 - params_.drop_rate));
    const auto lambda = static_cast<Scalar>(params_.lambda);

    // Per fine-tune: its generator and, for plain DARE, lambda * w_k.
    std::vector<CounterGenerator> generators;
    std::vector<Scalar> coefficients(n, Scalar(0));
    std::vector<Scalar> scalar_weights(weights.begin(), weights.end());
    generators.reserve(n);
    for (std::size_t k = 0; k < n; ++k) {
      generators.emplace_back(params_.seed, static_cast<std::uint64_t>(context.order[k]), context.name);
      coefficients[k] = static_cast<Scalar>(params_.lambda * weights[k]);
    }

    const detail::BlockPlan plan = detail::element_plan(numel);
    const auto blocks = static_cast<std::size_t>(plan.block_count);
    std::vector<std::int64_t> kept_per_block(blocks * n, 0);
    std::vector<std::vector<Scalar>> workspaces(static_cast<std::size_t>(detail::thread_count(context.threads)));
    const Scalar* base = models[0].data();

    detail::for_each_block(
        plan.block_count, context.threads,
        [&](int thread) {
          workspaces[static_cast<std::size_t>(thread)].assign(
              SignElection ? n : static_cast<std::size_t>(detail::kBlockElements), Scalar(0));
        },
        [&](std::int64_t block, int thread) {
          std::vector<Scalar>& work = workspaces[static_cast<std::size_t>(thread)];
          const std::int64_t begin = plan.begin(block);
          const std::int64_t end = plan.end(block);
          std::int64_t* kept = kept_per_block.data() + static_cast<std::size_t>(block) * n;
          if constexpr (SignElection) {
            // Rescaled deltas of one element, then TIES's election.
            for (std::int64_t i = begin; i < end; ++i) {
              for (std::size_t k = 1; k < n; ++k) {
                const bool keep = generators[k].uniform_at_least(i, keep_threshold);
                const Scalar rescaled = (models[k][i] - base[i]) * rescale;
                work[k] = keep ? rescaled : Scalar(0);
                kept[k] += keep ? 1 : 0;
              }
              out[i] = base[i] + lambda * detail::disjoint_mean(work.data(), scalar_weights.data(), n);
            }
          } else {
            // Sum of lambda w_k times the rescaled deltas, model by model,
            // then the base, as task arithmetic adds them.
            Scalar* sum = work.data();
            std::fill(sum, sum + (end - begin), Scalar(0));
            for (std::size_t k = 1; k < n; ++k) {
              const Scalar coefficient = coefficients[k];
              const CounterGenerator generator = generators[k];
              const Scalar* values = models[k].data();
              std::int64_t kept_here = 0;
              for (std::int64_t i = begin; i < end; ++i) {
                const bool keep = generator.uniform_at_least(i, keep_threshold);
                const Scalar rescaled = (values[i] - base[i]) * rescale;
                sum[i - begin] += coefficient * (keep ? rescaled : Scalar(0));
                kept_here += keep ? 1 : 0;
              }
              kept[k] = kept_here;
            }
            for (std::int64_t i = begin; i < end; ++i) out[i] = sum[i - begin] + base[i];
          }
        });

    std::vector<std::int64_t> kept(n, 0);
    for (std::size_t b = 0; b < blocks; ++b) {
      for (std::size_t k = 1; k < n; ++k) kept[k] += kept_per_block[b * n + k];
    }
    return {std::vector<ModelTensorStats>(n), detail::kept_notes(kept, context)};
  }

 private:
  void check_params() const {
    params_.check();
    if (SignElection) detail::check_weight_values(params_.weights, false);
  }

  DareParams params_;
};

/// DARE followed by task arithmetic ("dare").
template <typename Scalar>
using DarePolicy = BasicDarePolicy<Scalar, false>;

/// DARE followed by TIES's sign election and disjoint mean ("dare-ties").
template <typename Scalar>
using DareTiesPolicy = BasicDarePolicy<Scalar, true>;

}  // namespace cki
