// Rows of the standard merge methods (task arithmetic, TIES, DARE,
// DARE-TIES, SLERP, model stock, Fisher), each built by name through
// cki::make_merge_policy at its documented defaults, and the diagonal Fisher
// that the Fisher row needs.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <cki/cki.hpp>
#include <cki/merge/registry.hpp>

#include "fashion_mnist/idx.hpp"
#include "fashion_mnist/mlp.hpp"
#include "fashion_mnist/protocol.hpp"
#include "fashion_mnist/random.hpp"
#include "fashion_mnist/splice_candidate.hpp"

namespace fashion_mnist {

/// Returns the diagonal empirical Fisher of `mlp`: per weight and bias, the
/// mean over the examples `indices` of `data` of the squared gradient of
/// that example's cross-entropy at its true label. Laid out as the network's
/// layers. An empty `indices` gives zeros.
inline std::vector<Layer> diagonal_fisher(const Mlp& mlp, const Dataset& data, const std::vector<int>& indices) {
  std::vector<Layer> fisher;
  for (const Layer& layer : mlp.layers) {
    fisher.push_back({Eigen::MatrixXf::Zero(layer.weight.rows(), layer.weight.cols()),
                      Eigen::VectorXf::Zero(layer.bias.size())});
  }
  if (indices.empty()) return fisher;

  constexpr std::size_t kChunk = 500;
  const std::size_t depth = mlp.layers.size();
  for (std::size_t start = 0; start < indices.size(); start += kChunk) {
    // Forward pass over a chunk, keeping every layer's input.
    const std::size_t stop = std::min(indices.size(), start + kChunk);
    const auto count = static_cast<Eigen::Index>(stop - start);
    std::vector<Eigen::MatrixXf> layer_inputs(depth);
    layer_inputs[0].resize(data.features(), count);
    std::vector<int> labels(stop - start);
    for (std::size_t j = start; j < stop; ++j) {
      layer_inputs[0].col(static_cast<Eigen::Index>(j - start)) = data.images.col(indices[j]);
      labels[j - start] = data.labels[static_cast<std::size_t>(indices[j])];
    }
    Eigen::MatrixXf output;
    for (std::size_t l = 0; l < depth; ++l) {
      Eigen::MatrixXf pre = mlp.layers[l].weight * layer_inputs[l];
      pre.colwise() += mlp.layers[l].bias;
      if (l + 1 < depth) {
        layer_inputs[l + 1] = pre.cwiseMax(0.0f);
      } else {
        output = std::move(pre);
      }
    }

    // Per-example deltas (softmax - one_hot, one column per example). The
    // per-example weight gradient is delta * input^T, an outer product, so
    // its element-wise square is delta^2 * (input^2)^T, and the chunk's sum
    // of squares is one matrix product.
    Eigen::MatrixXf delta;
    softmax_cross_entropy(output, labels, &delta);
    for (Eigen::Index i = 0; i < count; ++i) delta(labels[static_cast<std::size_t>(i)], i) -= 1.0f;
    for (std::size_t l = depth; l-- > 0;) {
      const Eigen::MatrixXf delta_squared = delta.cwiseAbs2();
      fisher[l].weight.noalias() += delta_squared * layer_inputs[l].cwiseAbs2().transpose();
      fisher[l].bias += delta_squared.rowwise().sum();
      if (l == 0) break;
      Eigen::MatrixXf below = mlp.layers[l].weight.transpose() * delta;
      delta = (layer_inputs[l].array() > 0.0f).select(below, 0.0f);
    }
  }

  const float inverse_count = 1.0f / static_cast<float>(indices.size());
  for (Layer& layer : fisher) {
    layer.weight *= inverse_count;
    layer.bias *= inverse_count;
  }
  return fisher;
}

/// Returns up to `count` example indices drawn without replacement from
/// `pool` (all `total` examples when `pool` is empty), by a seeded shuffle.
inline std::vector<int> sample_examples(const std::vector<int>& pool, Eigen::Index total, int count,
                                        std::uint64_t seed) {
  std::vector<int> indices = pool;
  if (indices.empty()) {
    indices.resize(static_cast<std::size_t>(total));
    for (std::size_t i = 0; i < indices.size(); ++i) indices[i] = static_cast<int>(i);
  }
  Rng rng(seed);
  rng.shuffle(indices);
  if (indices.size() > static_cast<std::size_t>(count)) indices.resize(static_cast<std::size_t>(count));
  return indices;
}

/// The weight sets a method that measures deltas from a base merges, base
/// first: setting A's shared start followed by the N models, or in setting
/// B, where the models share no ancestor, the N models with model 1 as the
/// base.
inline std::vector<cki::WeightSet<float>> sets_with_base(const MergeInputs& in) {
  if (in.setting != Setting::shared_start) return *in.sets;
  std::vector<cki::WeightSet<float>> sets{to_weight_set(*in.base, "shared start")};
  sets.insert(sets.end(), in.sets->begin(), in.sets->end());
  return sets;
}

/// Choice of the weight sets that a baseline row merges.
enum class MergeInputsKind {
  /// The N models.
  models,
  /// The base followed by the fine-tunes, as sets_with_base() returns.
  base_and_fine_tunes,
};

/// Row of the registered merge method `method` at its defaults. The row is
/// n/a when the merged sets number fewer than `min_sets`, or other than
/// `exact_sets` when that is non-zero.
inline Method merge_method_row(std::string key, std::string label, std::string method, MergeInputsKind kind,
                               std::size_t min_sets, std::size_t exact_sets = 0) {
  return {std::move(key), std::move(label),
          [method, kind, min_sets, exact_sets](const MergeInputs& in) -> std::optional<Candidate> {
            const std::vector<cki::WeightSet<float>> sets =
                kind == MergeInputsKind::base_and_fine_tunes ? sets_with_base(in) : *in.sets;
            if (sets.size() < min_sets || (exact_sets != 0 && sets.size() != exact_sets)) return std::nullopt;
            const cki::AnyPolicy<float> policy = cki::make_merge_policy<float>(method);
            Candidate candidate = splice_sets_candidate(sets, policy, in.params->sizes);
            candidate.notes["parameters"] = policy.parameters();
            return candidate;
          }};
}

/// Row "Fisher": the N models averaged with weights from their diagonal
/// empirical Fisher (diagonal_fisher), each estimated on
/// `params.fisher_examples` examples drawn from that model's own training
/// data, at the method's defaults (floor 1e-6 on each Fisher value).
inline Method fisher_row() {
  return {"fisher", "Fisher merging (diagonal empirical Fisher)",
          [](const MergeInputs& in) -> std::optional<Candidate> {
            if (in.model_count() < 2) return std::nullopt;

            // One Fisher estimate per model, as a weight set of the model's layout.
            const std::size_t n = in.model_count();
            std::vector<cki::WeightSet<float>> fisher_sets(n);
            parallel_for(n, in.params->threads, [&](std::size_t k) {
              const std::vector<int> sample =
                  sample_examples((*in.training_subsets)[k], in.train->size(), in.params->fisher_examples,
                                  derive_seed(in.seed, 100 + k));
              Mlp fisher;
              fisher.layers = diagonal_fisher((*in.models)[k], *in.train, sample);
              fisher_sets[k] = to_weight_set(fisher, "Fisher of model " + std::to_string(k + 1));
            });

            cki::MergeResources<float> resources;
            resources.fisher = cki::fisher_from_weight_sets(std::move(fisher_sets));
            const cki::AnyPolicy<float> policy = cki::make_merge_policy<float>("fisher", nlohmann::json::object(),
                                                                               resources);
            Candidate candidate = splice_candidate(in, policy);
            candidate.notes["parameters"] = policy.parameters();
            candidate.notes["fisher_examples_per_model"] = in.params->fisher_examples;
            return candidate;
          }};
}

/// Returns the rows of the standard merge methods, each at its documented
/// defaults. Methods built on deltas (task arithmetic, TIES, DARE,
/// DARE-TIES, model stock) measure them from setting A's shared start, and
/// from model 1 in setting B.
inline std::vector<Method> baseline_methods() {
  const MergeInputsKind with_base = MergeInputsKind::base_and_fine_tunes;
  std::vector<Method> methods;
  methods.push_back(merge_method_row("task_arithmetic", "task arithmetic (λ 1)", "task-arithmetic", with_base, 2));
  methods.push_back(merge_method_row("ties", "TIES (density 0.2, λ 1)", "ties", with_base, 2));
  methods.push_back(merge_method_row("dare", "DARE (drop rate 0.5, λ 1)", "dare", with_base, 2));
  methods.push_back(merge_method_row("dare_ties", "DARE-TIES (drop rate 0.5, λ 1)", "dare-ties", with_base, 2));
  methods.push_back(merge_method_row("model_stock", "model stock", "model-stock", with_base, 3));
  methods.push_back(merge_method_row("slerp", "SLERP (t 0.5, N = 2 only)", "slerp", MergeInputsKind::models, 2, 2));
  methods.push_back(fisher_row());
  return methods;
}

}  // namespace fashion_mnist
