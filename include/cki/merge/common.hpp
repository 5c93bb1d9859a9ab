// Pieces shared by the baseline merge methods: per-model weight lists,
// parameter messages, and the block loops for linear combinations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/detail/finite.hpp"
#include "cki/detail/format.hpp"
#include "cki/detail/parallel.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"

namespace cki::detail {

/// Checks the values of an optional per-model weight list: each finite, and
/// non-negative unless `allow_negative`. An empty list means equal weights.
inline void check_weight_values(const std::vector<double>& weights, bool allow_negative) {
  for (std::size_t k = 0; k < weights.size(); ++k) {
    const double weight = weights[k];
    const std::string field = "weights[" + std::to_string(k) + "]";
    if (!std::isfinite(weight)) throw_out_of_range(field, "finite", weight);
    if (!allow_negative && weight < 0) throw_out_of_range(field, ">= 0", weight);
  }
}

/// Checks that a non-empty weight list has one weight per model.
inline void check_weight_count(const std::vector<double>& weights, std::size_t n_models) {
  if (!weights.empty() && weights.size() != n_models) {
    throw std::invalid_argument("'weights' needs one value per model (" + std::to_string(n_models) +
                                " in input order), got " + std::to_string(weights.size()));
  }
}

/// Checks the weight list of an average: each weight finite and >= 0, with
/// a positive sum. An empty list means equal weights.
inline void check_average_weights(const std::vector<double>& weights) {
  check_weight_values(weights, false);
  double total = 0;
  for (double weight : weights) total += weight;
  if (!weights.empty() && !(total > 0)) {
    throw std::invalid_argument("'weights' must have a sum > 0, got " + format_value(total));
  }
}

/// The members shared by the policies whose parameters carry a per-model
/// `weights` list: the parameters, their JSON form and a check of the
/// weight count.
/// \tparam Params a parameter struct with `weights`, check() and to_json().
template <typename Params>
class WeightedPolicy {
 public:
  WeightedPolicy() = default;
  /// Throws std::invalid_argument naming the first field out of range.
  explicit WeightedPolicy(Params params) : params_(std::move(params)) { params_.check(); }

  nlohmann::json parameters() const { return params_.to_json(); }
  const Params& params() const { return params_; }

  /// Throws std::invalid_argument when the weights do not fit `n_models`.
  void check(std::size_t n_models) const {
    params_.check();
    check_weight_count(params_.weights, n_models);
  }

 protected:
  Params params_;
};

/// Returns each model's weight in base-first order, the order merge()
/// receives the models: `weights[context.order[i]]`, or 1 when `weights` is
/// empty.
inline std::vector<double> weights_base_first(const std::vector<double>& weights, const TensorContext& context) {
  std::vector<double> ordered(context.model_count(), 1.0);
  if (weights.empty()) return ordered;
  for (std::size_t i = 0; i < ordered.size(); ++i) ordered[i] = weights[context.order[i]];
  return ordered;
}

/// Block plan over the elements of a flattened tensor. The baseline methods
/// work element by element, so blocks need not hold whole rows.
inline BlockPlan element_plan(std::int64_t numel) { return BlockPlan(numel, 1); }

/// Runs `combine(begin, merged)` on each block of the `numel` elements of
/// `out`, where `merged` is an Eigen array map of the block's output, and
/// returns true when every value written is finite. The test runs on each
/// block while it is still in cache.
template <typename Scalar, typename Combine>
bool combine_blocks(std::int64_t numel, Scalar* out, int threads, Combine&& combine) {
  const BlockPlan plan = element_plan(numel);
  std::vector<char> finite(static_cast<std::size_t>(plan.block_count), 1);
  for_each_block(
      plan.block_count, threads, [](int) {},
      [&](std::int64_t block, int) {
        const std::int64_t begin = plan.begin(block);
        const std::int64_t count = plan.end(block) - begin;
        Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> merged(out + begin, count);
        combine(begin, merged);
        finite[static_cast<std::size_t>(block)] = all_finite(out + begin, count) ? 1 : 0;
      });
  return std::all_of(finite.begin(), finite.end(), [](char value) { return value != 0; });
}

/// Sets `merged` to the sum over k >= `first` of coefficients[k] * term(k),
/// skipping the models whose coefficient is 0. Returns false, leaving
/// `merged` untouched, when every coefficient is 0.
template <typename Scalar, typename Merged, typename Term>
bool add_terms(Merged& merged, const std::vector<Scalar>& coefficients, std::size_t first, Term&& term) {
  bool any = false;
  for (std::size_t k = first; k < coefficients.size(); ++k) {
    if (coefficients[k] == Scalar(0)) continue;
    if (any) {
      merged += coefficients[k] * term(k);
    } else {
      merged = coefficients[k] * term(k);
      any = true;
    }
  }
  return any;
}

/// Writes `out[i] = sum_k coefficients[k] * models[k][i]`, skipping models
/// whose coefficient is 0 (so their values never reach the output). Every
/// element is computed by the same operations for any thread count.
/// Returns true when every output value is finite.
template <typename Scalar>
bool linear_combination(const std::vector<TensorView<Scalar>>& models, const std::vector<Scalar>& coefficients,
                        Scalar* out, int threads) {
  using Column = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
  return combine_blocks(models.front().size(), out, threads, [&](std::int64_t begin, auto& merged) {
    const auto term = [&](std::size_t k) { return Column(models[k].data() + begin, merged.size()); };
    if (!add_terms(merged, coefficients, 0, term)) merged.setZero();
  });
}

/// Writes `out[i] = base[i] + sum_{k >= 1} coefficients[k] * (models[k][i] -
/// base[i])` with `models[0]` the base; `coefficients[0]` is unused.
/// Returns true when every output value is finite.
template <typename Scalar>
bool add_scaled_deltas(const std::vector<TensorView<Scalar>>& models, const std::vector<Scalar>& coefficients,
                       Scalar* out, int threads) {
  using Column = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
  return combine_blocks(models.front().size(), out, threads, [&](std::int64_t begin, auto& merged) {
    const Column base(models[0].data() + begin, merged.size());
    const auto delta = [&](std::size_t k) { return Column(models[k].data() + begin, merged.size()) - base; };
    // Sum of scaled deltas first, then the base, as in base + (sum).
    if (add_terms(merged, coefficients, 1, delta)) {
      merged += base;
    } else {
      merged = base;
    }
  });
}

/// Raises the error splice_tensor() raises for a non-finite input, for a
/// policy that merges first and checks after (see `checks_finite` on
/// SplicingPolicy). `models` are base first as merge() receives them.
/// `reached[i]` is true when every value of models[i] reached the output,
/// which then contains a NaN or infinity whenever such an input did. When
/// `output_finite` is false every model is scanned, otherwise only those
/// that did not reach the output. Throws NumericError naming the tensor,
/// the model and the first index, for the first model in input order that
/// holds a non-finite value; returns when there is none (a finite merge,
/// or an overflow of finite inputs).
template <typename Scalar>
void check_inputs_after_merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                              const std::vector<bool>& reached, bool output_finite) {
  const bool ordered = context.order.size() == models.size();
  std::vector<std::size_t> position(models.size());  // input index -> index in `models`
  for (std::size_t i = 0; i < models.size(); ++i) position[ordered ? context.order[i] : i] = i;
  for (std::size_t i : position) {
    if (output_finite && reached[i]) continue;
    const std::int64_t bad = first_non_finite(models[i], context.threads);
    if (bad < 0) continue;
    throw_non_finite(context.name, i < context.labels.size() ? context.labels[i] : "", models[i], bad);
  }
}

/// Returns the Gram matrix in double of the vectors x_a = models[first + a],
/// or x_a = models[first + a] - models[0] when `deltas` (the difference taken
/// in the compute scalar, as the merges take it): G(a, b) = sum_i x_a[i]
/// x_b[i]. Sums run per block and then in block order, so the result does
/// not depend on the thread count.
template <typename Scalar>
Eigen::MatrixXd gram_matrix(const std::vector<TensorView<Scalar>>& models, std::size_t first, bool deltas,
                            int threads) {
  const std::size_t m = models.size() - first;
  const std::size_t pairs = m * (m + 1) / 2;
  const BlockPlan plan = element_plan(models.front().size());
  std::vector<double> partial(static_cast<std::size_t>(plan.block_count) * pairs, 0.0);
  std::vector<std::vector<double>> workspaces(static_cast<std::size_t>(thread_count(threads)));
  const Scalar* base = models[0].data();

  for_each_block(
      plan.block_count, threads, [&](int thread) { workspaces[static_cast<std::size_t>(thread)].assign(m, 0.0); },
      [&](std::int64_t block, int thread) {
        std::vector<double>& x = workspaces[static_cast<std::size_t>(thread)];
        double* sums = partial.data() + static_cast<std::size_t>(block) * pairs;
        for (std::int64_t i = plan.begin(block); i < plan.end(block); ++i) {
          for (std::size_t a = 0; a < m; ++a) {
            const Scalar value = models[first + a][i];
            x[a] = static_cast<double>(deltas ? value - base[i] : value);
          }
          std::size_t pair = 0;
          for (std::size_t a = 0; a < m; ++a) {
            for (std::size_t b = a; b < m; ++b) sums[pair++] += x[a] * x[b];
          }
        }
      });

  Eigen::MatrixXd gram = Eigen::MatrixXd::Zero(static_cast<Eigen::Index>(m), static_cast<Eigen::Index>(m));
  for (std::int64_t block = 0; block < plan.block_count; ++block) {
    const double* sums = partial.data() + static_cast<std::size_t>(block) * pairs;
    std::size_t pair = 0;
    for (std::size_t a = 0; a < m; ++a) {
      for (std::size_t b = a; b < m; ++b) gram(static_cast<Eigen::Index>(a), static_cast<Eigen::Index>(b)) += sums[pair++];
    }
  }
  return gram.selfadjointView<Eigen::Upper>();
}

/// Stats with `mean_weight` set from per-model weights (base first).
inline std::vector<ModelTensorStats> stats_with_mean_weights(const std::vector<double>& mean_weights) {
  std::vector<ModelTensorStats> stats(mean_weights.size());
  for (std::size_t k = 0; k < stats.size(); ++k) stats[k].mean_weight = mean_weights[k];
  return stats;
}

/// Reorders per-model values from base-first order to input order, for
/// report notes: `input[order[i]] = base_first[i]`.
inline nlohmann::json to_input_order(const nlohmann::json& base_first, const TensorContext& context) {
  nlohmann::json input(context.model_count(), nullptr);
  for (std::size_t i = 0; i < context.model_count(); ++i) input[context.order[i]] = base_first[i];
  return input;
}

/// Parses an optional unsigned integer field of a JSON parameter object
/// into `value`. Throws std::invalid_argument naming the field when it is
/// not an integer in [0, 2^64).
inline void read_unsigned(const nlohmann::json& object, const char* field, std::uint64_t& value) {
  if (!object.contains(field)) return;
  const nlohmann::json& item = object.at(field);
  if (!item.is_number_unsigned() && !(item.is_number_integer() && item.get<std::int64_t>() >= 0)) {
    throw std::invalid_argument(std::string("'") + field + "' must be an integer in [0, 2^64), got " + item.dump());
  }
  value = item.get<std::uint64_t>();
}

/// Parses an optional number field of a JSON parameter object into `value`.
/// Throws std::invalid_argument naming the field when it is not a number.
inline void read_number(const nlohmann::json& object, const char* field, double& value) {
  if (!object.contains(field)) return;
  const nlohmann::json& item = object.at(field);
  if (!item.is_number()) {
    throw std::invalid_argument(std::string("'") + field + "' must be a number, got " + item.dump());
  }
  value = item.get<double>();
}

/// Parses an optional list of numbers into `values`. Throws
/// std::invalid_argument naming the field when it is not such a list.
inline void read_number_list(const nlohmann::json& object, const char* field, std::vector<double>& values) {
  if (!object.contains(field)) return;
  const nlohmann::json& item = object.at(field);
  if (!item.is_array()) {
    throw std::invalid_argument(std::string("'") + field + "' must be a list of numbers, got " + item.dump());
  }
  values.clear();
  for (const auto& entry : item) {
    if (!entry.is_number()) {
      throw std::invalid_argument(std::string("'") + field + "' must be a list of numbers, got " + item.dump());
    }
    values.push_back(entry.get<double>());
  }
}

/// Throws std::invalid_argument for a key of `object` that is not in
/// `known`, so a misspelt parameter is reported instead of ignored.
inline void reject_unknown_keys(const nlohmann::json& object, const std::vector<std::string>& known) {
  if (object.is_null()) return;
  if (!object.is_object()) throw std::invalid_argument("parameters must be a JSON object, got " + object.dump());
  for (const auto& item : object.items()) {
    bool found = false;
    for (const auto& name : known) found = found || item.key() == name;
    if (found) continue;
    std::string list;
    for (const auto& name : known) list += (list.empty() ? "" : ", ") + name;
    throw std::invalid_argument("unknown parameter '" + item.key() + "'; known: " + (list.empty() ? "none" : list));
  }
}

}  // namespace cki::detail
