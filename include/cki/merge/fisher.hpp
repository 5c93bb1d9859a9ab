// Fisher merging: average the models weighted element by element by their
// diagonal Fisher information.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/detail/kernels.hpp"
#include "cki/detail/parallel.hpp"
#include "cki/errors.hpp"
#include "cki/merge/common.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// Parameters of Fisher merging.
struct FisherParams {
  /// One weight per model in input order, each finite and >= 0 with a
  /// positive sum; empty (the default) weighs the models equally.
  std::vector<double> weights;
  /// Lower bound applied to every Fisher value, so an element where all
  /// models have zero Fisher information still gets a defined average;
  /// finite and > 0, default 1e-6.
  double floor = 1e-6;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    detail::check_average_weights(weights);
    if (!(std::isfinite(floor) && floor > 0)) detail::throw_out_of_range("floor", "finite and > 0", floor);
  }

  nlohmann::json to_json() const { return {{"weights", weights}, {"floor", floor}}; }

  /// Reads the fields present in `json` over the defaults; the result is
  /// checked. Throws std::invalid_argument for an unknown key, a value of
  /// the wrong type or out of range.
  static FisherParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {"weights", "floor"});
    FisherParams params;
    if (json.is_object()) {
      detail::read_number_list(json, "weights", params.weights);
      detail::read_number(json, "floor", params.floor);
    }
    params.check();
    return params;
  }
};

/// The diagonal Fisher tensors of one tensor, one per model in input order,
/// each of the tensor's shape. `storage` keeps the views' memory alive while
/// the policy uses them; it may be null when the caller owns the memory.
template <typename Scalar>
struct FisherTensors {
  std::vector<TensorView<Scalar>> models;
  std::shared_ptr<const void> storage;
};

/// Supplies the Fisher tensors of the tensor named by its argument. It is
/// called once per merged tensor, from the thread that merges it, and may
/// throw (MismatchError for a missing tensor, IoError for a failed read).
/// A streamed merge can read each Fisher checkpoint's tensor here, so the
/// Fisher data need not be in memory all at once.
template <typename Scalar>
using FisherSource = std::function<FisherTensors<Scalar>(const std::string& name)>;

/// Returns a FisherSource over in-memory weight sets, one per model in input
/// order, holding the Fisher tensors under the models' tensor names. The
/// sets share their storage, so this copies no elements.
template <typename Scalar>
FisherSource<Scalar> fisher_from_weight_sets(std::vector<WeightSet<Scalar>> sets) {
  auto shared = std::make_shared<const std::vector<WeightSet<Scalar>>>(std::move(sets));
  return [shared](const std::string& name) {
    FisherTensors<Scalar> tensors;
    tensors.models.reserve(shared->size());
    for (const auto& set : *shared) tensors.models.push_back(set.view(name));
    tensors.storage = shared;
    return tensors;
  };
}

/// Fisher merging: theta = sum_k w_k F'_k theta_k / sum_k w_k F'_k element by
/// element, with F'_k = max(F_k, floor) and F_k model k's diagonal Fisher
/// tensor from the FisherSource. Fisher values must be finite and >= 0.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class FisherPolicy : public detail::WeightedPolicy<FisherParams> {
 public:
  using scalar_type = Scalar;

  FisherPolicy() = default;

  /// Throws std::invalid_argument naming the first field out of range.
  FisherPolicy(FisherParams params, FisherSource<Scalar> source)
      : WeightedPolicy(std::move(params)), source_(std::move(source)) {}

  std::string name() const { return "fisher"; }

  /// Throws std::invalid_argument when the weights do not fit `n_models` or
  /// no FisherSource was given.
  void check(std::size_t n_models) const {
    WeightedPolicy::check(n_models);
    if (!source_) {
      throw std::invalid_argument("fisher needs the models' Fisher tensors: construct FisherPolicy with a "
                                  "FisherSource, for example fisher_from_weight_sets()");
    }
  }

  /// Merges one tensor of N models (base first) into `out`. Each model's
  /// mean weight is the mean over elements of w_k F'_k / sum_j w_j F'_j.
  /// Throws MismatchError when the source gives the wrong number or shape of
  /// Fisher tensors, and NumericError naming the tensor, model and index of
  /// a negative or non-finite Fisher value.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const std::size_t n = models.size();
    const std::int64_t numel = models.front().size();
    const FisherTensors<Scalar> supplied = fetch(context, n);
    std::vector<const Scalar*> fisher(n);
    for (std::size_t i = 0; i < n; ++i) fisher[i] = supplied.models[context.order[i]].data();
    const std::vector<double> weights = detail::weights_base_first(params_.weights, context);
    std::vector<Scalar> scalar_weights(weights.begin(), weights.end());
    const auto floor = static_cast<Scalar>(params_.floor);

    const detail::BlockPlan plan = detail::element_plan(numel);
    const auto blocks = static_cast<std::size_t>(plan.block_count);
    std::vector<double> weight_sums(blocks * n, 0.0);
    std::vector<std::int64_t> first_bad(blocks * n, -1);
    struct Workspace {
      BlockArray<Scalar> scaled;
      Eigen::Array<Scalar, Eigen::Dynamic, 1> numerator, denominator;
    };
    std::vector<Workspace> workspaces(static_cast<std::size_t>(detail::thread_count(context.threads)));

    detail::for_each_block(
        plan.block_count, context.threads,
        [&](int thread) {
          Workspace& work = workspaces[static_cast<std::size_t>(thread)];
          work.scaled.resize(detail::kBlockElements, static_cast<Eigen::Index>(n));
          work.numerator.resize(detail::kBlockElements);
          work.denominator.resize(detail::kBlockElements);
        },
        [&](std::int64_t block, int thread) {
          Workspace& work = workspaces[static_cast<std::size_t>(thread)];
          const std::int64_t begin = plan.begin(block);
          const std::int64_t count = plan.end(block) - begin;
          const auto offset = static_cast<std::size_t>(block) * n;

          // Scaled Fisher values w_k F'_k. A block with an invalid value is
          // searched for its first one, which is raised after the loop.
          for (std::size_t k = 0; k < n; ++k) {
            const Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(fisher[k] + begin, count);
            const bool valid = ((values >= Scalar(0)) && (values <= std::numeric_limits<Scalar>::max())).all();
            if (!valid) {
              for (std::int64_t i = 0; i < count && first_bad[offset + k] < 0; ++i) {
                const Scalar value = values[i];
                if (!(std::isfinite(value) && value >= 0)) first_bad[offset + k] = begin + i;
              }
            }
            work.scaled.col(static_cast<Eigen::Index>(k)).head(count) = scalar_weights[k] * values.max(floor);
          }

          // Weighted sum over the models, then the division.
          auto numerator = work.numerator.head(count);
          auto denominator = work.denominator.head(count);
          for (std::size_t k = 0; k < n; ++k) {
            const auto scaled = work.scaled.col(static_cast<Eigen::Index>(k)).head(count);
            const Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(models[k].data() + begin, count);
            if (k == 0) {
              numerator = scaled * values;
              denominator = scaled;
            } else {
              numerator += scaled * values;
              denominator += scaled;
            }
          }
          Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>(out + begin, count) = numerator / denominator;
          // Each model's weights w_k F'_k / sum_j w_j F'_j, summed for the
          // report, with one division per element rather than one per model.
          numerator = Scalar(1) / denominator;
          for (std::size_t k = 0; k < n; ++k) {
            auto scaled = work.scaled.col(static_cast<Eigen::Index>(k)).head(count);
            scaled *= numerator;
            weight_sums[offset + k] = detail::sum_as_double(scaled.data(), count);
          }
        });

    // Invalid Fisher values, first by model then by index.
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t b = 0; b < blocks; ++b) {
        const std::int64_t bad = first_bad[b * n + i];
        if (bad < 0) continue;
        const Scalar value = fisher[i][bad];
        throw NumericError("Fisher tensor of '" + context.name + "' for " + label(context, i) + " contains " +
                           detail::format_value(static_cast<double>(value)) + " at " +
                           detail::element_position(bad, context.shape) + "; Fisher values must be finite and >= 0");
      }
    }

    std::vector<double> mean_weights(n, 0.0);
    for (std::size_t k = 0; k < n; ++k) {
      for (std::size_t b = 0; b < blocks; ++b) mean_weights[k] += weight_sums[b * n + k];
      if (numel > 0) mean_weights[k] /= static_cast<double>(numel);
    }
    return detail::stats_with_mean_weights(mean_weights);
  }

 private:
  static std::string label(const TensorContext& context, std::size_t i) {
    if (i < context.labels.size()) return context.labels[i];
    return "model " + std::to_string(context.order[i] + 1);
  }

  /// Fetches the Fisher tensors of the current tensor and checks their count
  /// and shapes against it.
  FisherTensors<Scalar> fetch(const TensorContext& context, std::size_t n) const {
    check(n);
    FisherTensors<Scalar> supplied = source_(context.name);
    if (supplied.models.size() != n) {
      throw MismatchError("Fisher source gave " + std::to_string(supplied.models.size()) + " tensors for '" +
                          context.name + "', expected one per model (" + std::to_string(n) + ")");
    }
    for (std::size_t k = 0; k < n; ++k) {
      if (supplied.models[k].shape() != context.shape) {
        throw MismatchError("Fisher tensor of '" + context.name + "' for model " + std::to_string(k + 1) +
                            " has shape " + shape_to_string(supplied.models[k].shape()) + ", expected " +
                            shape_to_string(context.shape));
      }
    }
    return supplied;
  }

  FisherSource<Scalar> source_;
};

}  // namespace cki
