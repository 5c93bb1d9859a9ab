// The report of a merge: method, parameters, models, and what happened to each tensor.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/dtype.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Contribution of one model to one spliced tensor.
struct ModelTensorStats {
  /// Information content of the model's tensor (histogram entropy, nats);
  /// absent for methods that do not compute it.
  std::optional<double> entropy;
  /// Global weight of the model for this tensor; absent likewise.
  std::optional<double> global_weight;
  /// Mean over elements of the model's per-element weight.
  std::optional<double> mean_weight;
  /// Hard splicing only: share of elements taken from this model, in [0, 1].
  std::optional<double> hard_share;
};

/// Result of a policy's `merge` for one tensor: per-model stats (base
/// first) and optional notes that splice_tensor() copies into
/// TensorReport::notes. A policy may return this or, when it has no notes,
/// the stats vector alone, which converts implicitly.
struct TensorMergeResult {
  std::vector<ModelTensorStats> models;
  /// Method-specific notes (fallbacks taken, say); null when there are none.
  /// Per-model arrays in the notes are in input order, not base first.
  nlohmann::json notes;

  TensorMergeResult() = default;
  TensorMergeResult(std::vector<ModelTensorStats> stats)  // NOLINT(google-explicit-constructor): stats convert implicitly
      : models(std::move(stats)) {}
  TensorMergeResult(std::vector<ModelTensorStats> stats, nlohmann::json tensor_notes)
      : models(std::move(stats)), notes(std::move(tensor_notes)) {}

  /// The stats alone, so code that expects a policy to return the stats
  /// vector keeps compiling.
  operator std::vector<ModelTensorStats>() const { return models; }  // NOLINT(google-explicit-constructor)
};

/// Outcome for one tensor: spliced, or copied from the base and why.
struct TensorReport {
  std::string name;
  Shape shape;
  DType dtype = DType::F32;
  /// True when the tensor was merged, false when it was copied from the base.
  bool spliced = false;
  /// Reason an unspliced tensor was copied ("not selected", "empty tensor",
  /// "dtype I64 is not spliced", "single model"); empty when spliced.
  std::string copy_reason;
  /// Per model, in input order; empty for copied tensors.
  std::vector<ModelTensorStats> models;
  /// Method-specific notes (fallbacks taken, say); null when there are none.
  nlohmann::json notes;
  /// Elements written as the output dtype's largest finite value because
  /// they lay beyond its range (WriteOptions::clamp); 0 otherwise.
  std::uint64_t clamped = 0;
};

/// Report of a whole merge, serialisable to JSON.
struct SpliceReport {
  /// Method name as the tool spells it, for example "cki-soft".
  std::string method;
  nlohmann::json parameters = nlohmann::json::object();
  /// Model labels (file paths or "model K") in input order.
  std::vector<std::string> models;
  /// Index of the base model in input order.
  std::size_t base = 0;
  std::vector<TensorReport> tensors;

  /// Number of tensors that were spliced.
  std::size_t spliced_count() const {
    std::size_t count = 0;
    for (const auto& tensor : tensors) count += tensor.spliced ? 1 : 0;
    return count;
  }

  nlohmann::json to_json() const;
};

namespace detail {

inline nlohmann::json optional_to_json(const std::optional<double>& value) {
  if (!value || !std::isfinite(*value)) return nullptr;
  return *value;
}

}  // namespace detail

inline nlohmann::json to_json(const TensorReport& tensor) {
  nlohmann::json out;
  out["name"] = tensor.name;
  out["shape"] = tensor.shape;
  out["dtype"] = dtype_name(tensor.dtype);
  out["action"] = tensor.spliced ? "spliced" : "copied";
  if (tensor.clamped > 0) out["clamped"] = tensor.clamped;
  if (!tensor.spliced) {
    out["reason"] = tensor.copy_reason;
    return out;
  }
  nlohmann::json models = nlohmann::json::array();
  for (const auto& stats : tensor.models) {
    nlohmann::json model;
    model["entropy"] = detail::optional_to_json(stats.entropy);
    model["global_weight"] = detail::optional_to_json(stats.global_weight);
    model["mean_weight"] = detail::optional_to_json(stats.mean_weight);
    if (stats.hard_share) model["hard_share"] = *stats.hard_share;
    models.push_back(std::move(model));
  }
  out["models"] = std::move(models);
  if (!tensor.notes.is_null()) out["notes"] = tensor.notes;
  return out;
}

inline nlohmann::json SpliceReport::to_json() const {
  nlohmann::json out;
  out["method"] = method;
  out["parameters"] = parameters;
  nlohmann::json model_list = nlohmann::json::array();
  for (std::size_t k = 0; k < models.size(); ++k) {
    model_list.push_back({{"index", k}, {"source", models[k]}, {"base", k == base}});
  }
  out["models"] = std::move(model_list);
  out["base"] = base;
  nlohmann::json tensor_list = nlohmann::json::array();
  for (const auto& tensor : tensors) tensor_list.push_back(cki::to_json(tensor));
  out["tensors"] = std::move(tensor_list);
  return out;
}

}  // namespace cki
