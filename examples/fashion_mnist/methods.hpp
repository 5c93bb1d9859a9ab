// The rows of the comparison table, one function each: single models,
// uniform average, output ensemble, magnitude pruning and data-free CKI, and
// the list of every row, with those of baseline_methods.hpp and
// searched_methods.hpp.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <cki/cki.hpp>

#include "fashion_mnist/baseline_methods.hpp"
#include "fashion_mnist/mlp.hpp"
#include "fashion_mnist/protocol.hpp"
#include "fashion_mnist/searched_methods.hpp"
#include "fashion_mnist/splice_candidate.hpp"

namespace fashion_mnist {

/// Row "model k" (0-based `index`); n/a when N <= index.
inline Method single_model_method(std::size_t index) {
  return {"model_" + std::to_string(index + 1), "model " + std::to_string(index + 1),
          [index](const MergeInputs& in) -> std::optional<Candidate> {
            if (index >= in.model_count()) return std::nullopt;
            return Candidate::of_singles({index});
          }};
}

/// Row "best single": the single model with the best validation accuracy.
inline Method best_single_method() {
  return {"best_single", "best single (chosen on validation)",
          [](const MergeInputs& in) -> std::optional<Candidate> {
            Candidate candidate = Candidate::of_singles({in.best_index});
            candidate.notes = {{"chosen_model", in.best_index + 1}};
            return candidate;
          }};
}

/// Row "shared start": setting A's base, the common ancestor of the N
/// fine-tunes, given for comparison; n/a in setting B.
inline Method shared_start_method() {
  return {"shared_start", "shared start (setting A's base, not merged)",
          [](const MergeInputs& in) -> std::optional<Candidate> {
            if (in.setting != Setting::shared_start) return std::nullopt;
            return Candidate::merged(*in.base);
          }};
}

/// Row "uniform average": every parameter is the mean over the N models.
inline Method uniform_average_method() {
  return {"uniform_average", "uniform average", [](const MergeInputs& in) -> std::optional<Candidate> {
            const std::vector<Mlp>& models = *in.models;
            Mlp average = models.front();
            for (std::size_t k = 1; k < models.size(); ++k) {
              for (std::size_t l = 0; l < average.layers.size(); ++l) {
                average.layers[l].weight += models[k].layers[l].weight;
                average.layers[l].bias += models[k].layers[l].bias;
              }
            }
            const float scale = 1.0f / static_cast<float>(models.size());
            for (Layer& layer : average.layers) {
              layer.weight *= scale;
              layer.bias *= scale;
            }
            return Candidate::merged(std::move(average));
          }};
}

/// Row "output ensemble": the logits of the N models averaged. A reference
/// only, since inference runs all N models.
inline Method output_ensemble_method() {
  return {"output_ensemble", "output ensemble (reference, N x inference cost)",
          [](const MergeInputs& in) -> std::optional<Candidate> {
            std::vector<std::size_t> all(in.model_count());
            for (std::size_t k = 0; k < all.size(); ++k) all[k] = k;
            return Candidate::of_singles(all);
          }};
}

/// Row "magnitude pruning": the best single model with every weight of
/// |w| <= threshold set to zero. Biases are kept. The extra epoch keeps the
/// pruned weights at zero.
inline Method magnitude_pruning_method() {
  return {"magnitude_pruning", "magnitude pruning of best single",
          [](const MergeInputs& in) -> std::optional<Candidate> {
            const float threshold = in.params->prune_threshold;
            Candidate candidate = Candidate::merged((*in.models)[in.best_index]);
            Eigen::Index zeroed = 0;
            Eigen::Index total = 0;
            for (Layer& layer : candidate.members.front().layers) {
              Eigen::MatrixXf mask = (layer.weight.array().abs() > threshold).cast<float>().matrix();
              layer.weight.array() *= mask.array();
              zeroed += mask.size() - static_cast<Eigen::Index>(mask.sum());
              total += mask.size();
              candidate.weight_masks.push_back(std::move(mask));
            }
            candidate.notes = {{"pruned_model", in.best_index + 1},
                               {"threshold", threshold},
                               {"zeroed_weight_share", static_cast<double>(zeroed) / static_cast<double>(total)}};
            return candidate;
          }};
}

/// Row "CKI soft" or "CKI hard" with `rule` at the default parameters; n/a
/// for the two-model rules when N != 2.
inline Method cki_method(bool hard, cki::RuleKind rule) {
  const std::string splicing = hard ? "hard" : "soft";
  const std::string rule_label = cki::rule_name(rule);
  return {"cki_" + splicing + "_" + rule_label, "CKI " + splicing + ", " + rule_label + " rule",
          [hard, rule](const MergeInputs& in) -> std::optional<Candidate> {
            if (rule != cki::RuleKind::softmax && in.model_count() != 2) return std::nullopt;
            cki::CkiParams params;
            params.rule = rule;
            if (hard) return splice_candidate(in, cki::CkiHard<float>(params));
            return splice_candidate(in, cki::CkiSoft<float>(params));
          }};
}

/// Returns the rows of the table, in order, with `max_models` rows "model k".
inline std::vector<Method> default_methods(int max_models) {
  std::vector<Method> methods;
  for (int k = 0; k < max_models; ++k) methods.push_back(single_model_method(static_cast<std::size_t>(k)));
  methods.push_back(best_single_method());
  methods.push_back(shared_start_method());
  methods.push_back(uniform_average_method());
  methods.push_back(output_ensemble_method());
  methods.push_back(magnitude_pruning_method());
  for (cki::RuleKind rule : {cki::RuleKind::softmax, cki::RuleKind::blend, cki::RuleKind::paired_softmax}) {
    methods.push_back(cki_method(false, rule));
    methods.push_back(cki_method(true, rule));
  }
  for (Method& method : searched_methods()) methods.push_back(std::move(method));
  for (Method& method : baseline_methods()) methods.push_back(std::move(method));
  return methods;
}

}  // namespace fashion_mnist
