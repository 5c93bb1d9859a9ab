// Registry of the baseline merge methods: build any of them by name from
// JSON parameters, as the cki-splice tool's --method option does.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/merge/dare.hpp"
#include "cki/merge/fisher.hpp"
#include "cki/merge/linear.hpp"
#include "cki/merge/model_stock.hpp"
#include "cki/merge/prune.hpp"
#include "cki/merge/slerp.hpp"
#include "cki/merge/ties.hpp"
#include "cki/splicing/any_policy.hpp"

namespace cki {

/// A registered merge method: its name, a one-line summary for help text,
/// and the keys its JSON parameters accept.
struct MergeMethodInfo {
  std::string name;
  std::string summary;
  std::vector<std::string> parameters;
};

/// Every registered merge method, in the order help text lists them.
inline const std::vector<MergeMethodInfo>& merge_methods() {
  static const std::vector<MergeMethodInfo> methods{
      {"average", "weighted average of all models", {"weights"}},
      {"task-arithmetic", "base + lambda * weighted sum of the fine-tunes' deltas", {"weights", "lambda"}},
      {"ties", "trim deltas to the top density share, elect signs, disjoint mean",
       {"weights", "lambda", "density", "scope"}},
      {"dare", "drop delta entries at random, rescale, then task arithmetic",
       {"weights", "lambda", "drop_rate", "seed"}},
      {"dare-ties", "drop delta entries at random, rescale, then TIES sign election",
       {"weights", "lambda", "drop_rate", "seed"}},
      {"slerp", "spherical interpolation between exactly two models", {"t"}},
      {"model-stock", "base moved toward the fine-tunes' mean by their delta angle", {}},
      {"fisher", "average weighted by per-model diagonal Fisher tensors", {"weights", "floor"}},
      {"prune", "magnitude pruning of the base model", {"threshold"}},
  };
  return methods;
}

/// Names of every registered merge method.
inline std::vector<std::string> merge_method_names() {
  std::vector<std::string> names;
  for (const auto& method : merge_methods()) names.push_back(method.name);
  return names;
}

/// True when `name` is a registered merge method.
inline bool is_merge_method(const std::string& name) {
  for (const auto& method : merge_methods()) {
    if (method.name == name) return true;
  }
  return false;
}

/// Inputs of a merge method that JSON cannot carry.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
struct MergeResources {
  /// Per-model Fisher tensors; required by "fisher".
  FisherSource<Scalar> fisher;
  /// Whole-model trim thresholds from a TiesModelScope prepass; required by
  /// "ties" with scope "model".
  std::shared_ptr<const TiesModelThresholds> ties_thresholds;
};

/// True when `method` with `parameters` needs the whole-model TIES prepass
/// (TiesModelScope) before make_merge_policy(). Throws as
/// make_merge_policy() does for invalid TIES parameters.
inline bool needs_ties_prepass(const std::string& method, const nlohmann::json& parameters) {
  return method == "ties" && TiesParams::from_json(parameters).scope == TiesScope::model;
}

namespace detail {

template <typename Scalar>
AnyPolicy<Scalar> build_merge_policy(const std::string& method, const nlohmann::json& parameters,
                                     const MergeResources<Scalar>& resources) {
  if (method == "average") return AveragePolicy<Scalar>(AverageParams::from_json(parameters));
  if (method == "task-arithmetic") {
    return TaskArithmeticPolicy<Scalar>(TaskArithmeticParams::from_json(parameters));
  }
  if (method == "ties") {
    TiesParams params = TiesParams::from_json(parameters);
    if (params.scope == TiesScope::model && !resources.ties_thresholds) {
      throw std::invalid_argument("'scope' model needs whole-model thresholds: run TiesModelScope over the "
                                  "tensors and set MergeResources::ties_thresholds");
    }
    return TiesPolicy<Scalar>(std::move(params), resources.ties_thresholds);
  }
  if (method == "dare") return DarePolicy<Scalar>(DareParams::from_json(parameters));
  if (method == "dare-ties") return DareTiesPolicy<Scalar>(DareParams::from_json(parameters));
  if (method == "slerp") return SlerpPolicy<Scalar>(SlerpParams::from_json(parameters));
  if (method == "model-stock") return ModelStockPolicy<Scalar>(ModelStockParams::from_json(parameters));
  if (method == "fisher") {
    FisherParams params = FisherParams::from_json(parameters);
    if (!resources.fisher) {
      throw std::invalid_argument("the Fisher tensors are missing: set MergeResources::fisher");
    }
    return FisherPolicy<Scalar>(std::move(params), resources.fisher);
  }
  if (method == "prune") return PrunePolicy<Scalar>(PruneParams::from_json(parameters));

  std::string known;
  for (const auto& name : merge_method_names()) known += (known.empty() ? "" : ", ") + name;
  throw std::invalid_argument("unknown merge method '" + method + "'; known: " + known);
}

}  // namespace detail

/// Builds the merge method `method` (a name from merge_method_names()) with
/// `parameters`, a JSON object whose keys are the fields of the method's
/// parameter struct (for example {"density": 0.3, "scope": "model"});
/// absent keys keep their defaults. Throws std::invalid_argument for an
/// unknown method, an unknown key, a value of the wrong type or out of range,
/// or a missing resource, with the method's name in the message.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
AnyPolicy<Scalar> make_merge_policy(const std::string& method,
                                    const nlohmann::json& parameters = nlohmann::json::object(),
                                    const MergeResources<Scalar>& resources = {}) {
  if (!is_merge_method(method)) return detail::build_merge_policy(method, parameters, resources);
  try {
    return detail::build_merge_policy(method, parameters, resources);
  } catch (const std::invalid_argument& error) {
    throw std::invalid_argument("method '" + method + "': " + error.what());
  }
}

}  // namespace cki
