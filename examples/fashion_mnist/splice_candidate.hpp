// Merging a row's weight sets through cki::splice and summarising the
// splice report for the JSON output.
#pragma once

#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <cki/cki.hpp>

#include "fashion_mnist/mlp.hpp"
#include "fashion_mnist/protocol.hpp"

namespace fashion_mnist {

/// Short summary of a splice report for the JSON output: per tensor, each
/// model's global weight, mean element weight and (hard splicing) share.
inline nlohmann::json summarise_report(const cki::SpliceReport& report) {
  nlohmann::json tensors = nlohmann::json::object();
  for (const cki::TensorReport& tensor : report.tensors) {
    nlohmann::json models = nlohmann::json::array();
    for (const cki::ModelTensorStats& stats : tensor.models) {
      nlohmann::json model;
      if (stats.global_weight) model["global_weight"] = *stats.global_weight;
      if (stats.mean_weight) model["mean_weight"] = *stats.mean_weight;
      if (stats.hard_share) model["hard_share"] = *stats.hard_share;
      models.push_back(std::move(model));
    }
    tensors[tensor.name] = tensor.spliced ? nlohmann::json(models) : nlohmann::json(tensor.copy_reason);
  }
  return tensors;
}

/// Merges `sets` with `policy` through cki::splice, the first set as the
/// base, and rebuilds the network of layer widths `sizes` from the merged
/// weight set. The notes are the report's summary, plus the methods' own
/// per-tensor notes (fallbacks taken, say) under "method_notes" when any exist.
template <typename Policy>
Candidate splice_sets_candidate(const std::vector<cki::WeightSet<float>>& sets, const Policy& policy,
                                const std::vector<int>& sizes) {
  cki::SpliceOptions options;
  options.base = 0;
  const cki::SpliceResult<float> result = cki::splice(sets, policy, options);
  nlohmann::json notes = summarise_report(result.report);
  for (const cki::TensorReport& tensor : result.report.tensors) {
    if (!tensor.notes.is_null()) notes["method_notes"][tensor.name] = tensor.notes;
  }
  return Candidate::merged(from_weight_set(result.merged, sizes), std::move(notes));
}

/// Merges the N weight sets with `policy` through cki::splice, model 1 as the
/// base, and rebuilds the network from the merged weight set.
template <typename Policy>
Candidate splice_candidate(const MergeInputs& in, const Policy& policy) {
  return splice_sets_candidate(*in.sets, policy, in.params->sizes);
}

}  // namespace fashion_mnist
