// Rows of CKI tuned on data: "CKI calibrated" (cki::calibrate searching the
// data-free parameters against validation accuracy) and "CKI learned"
// (cki::LearnableSplice training assessment maps through the task loss).
#pragma once

#include <chrono>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <cki/cki.hpp>
#include <cki/learn/learn.hpp>

#include "fashion_mnist/baseline_methods.hpp"
#include "fashion_mnist/mlp.hpp"
#include "fashion_mnist/protocol.hpp"
#include "fashion_mnist/random.hpp"
#include "fashion_mnist/splice_candidate.hpp"

namespace fashion_mnist {

/// Row "CKI calibrated": cki::calibrate over the default CalibrationSpace
/// (rule, hard or soft, a, c, scale, temperature, bins), scored by accuracy
/// on the validation data, with `params.calibration_budget` trials in a
/// random order of fixed seed 0, the first at the default parameters. The
/// notes record the chosen point and the cost (seconds, evaluations).
inline Method cki_calibrated_method() {
  return {"cki_calibrated", "CKI calibrated (searched on validation accuracy)",
          [](const MergeInputs& in) -> std::optional<Candidate> {
            const std::vector<int>& sizes = in.params->sizes;
            const int threads = in.params->threads;
            auto validation_accuracy = [&](const cki::WeightSet<float>& merged) {
              return evaluate_parallel(from_weight_set(merged, sizes), *in.valid, threads).accuracy;
            };
            cki::CalibrationOptions options;
            options.order = cki::SearchOrder::random;
            options.seed = 0;
            // Serial merges, because after each trial's short OpenMP loops
            // the idle libgomp workers spin-wait and take cores from the
            // evaluation's threads. The merged weights are the same for any
            // thread count.
            options.splice.threads = 1;
            const cki::CalibrationResult search =
                cki::calibrate(*in.sets, validation_accuracy, cki::CalibrationSpace{},
                               static_cast<std::size_t>(in.params->calibration_budget), options);

            // Merge again at the chosen point, for the network and the report.
            const cki::CalibrationTrial& best = search.best();
            const cki::SpliceResult<float> merged = cki::splice_calibrated(*in.sets, best.point);
            nlohmann::json notes = {{"chosen", best.point.to_json()},
                                    {"valid_accuracy", best.score},
                                    {"evaluations", search.trials.size()},
                                    {"valid_points", search.valid_points},
                                    {"seconds", search.seconds},
                                    {"report", summarise_report(merged.report)}};
            return Candidate::merged(from_weight_set(merged.merged, sizes), std::move(notes));
          }};
}

/// Computes the mean cross-entropy gradient of `mlp` on the examples
/// `batch` of `data`, split over up to `threads` threads, as a weight set of
/// the network's layout (one gradient tensor per weight and bias).
inline cki::WeightSet<float> batch_gradient(const Mlp& mlp, const Dataset& data, const std::vector<int>& batch,
                                            int threads) {
  const std::size_t parts = std::min<std::size_t>(static_cast<std::size_t>(std::max(threads, 1)), batch.size());
  std::vector<std::vector<Layer>> gradients(parts);
  std::vector<double> shares(parts);
  parallel_for(parts, threads, [&](std::size_t part) {
    const std::size_t begin = batch.size() * part / parts;
    const std::size_t end = batch.size() * (part + 1) / parts;
    Eigen::MatrixXf inputs(data.features(), static_cast<Eigen::Index>(end - begin));
    std::vector<int> labels(end - begin);
    for (std::size_t j = begin; j < end; ++j) {
      inputs.col(static_cast<Eigen::Index>(j - begin)) = data.images.col(batch[j]);
      labels[j - begin] = data.labels[static_cast<std::size_t>(batch[j])];
    }
    loss_and_gradients(mlp, inputs, labels, gradients[part]);
    shares[part] = static_cast<double>(end - begin) / static_cast<double>(batch.size());
  });

  // Each part's gradient is a mean over its examples, so weight it by its share.
  Mlp total;
  total.layers = gradients[0];
  for (Layer& layer : total.layers) {
    layer.weight *= static_cast<float>(shares[0]);
    layer.bias *= static_cast<float>(shares[0]);
  }
  for (std::size_t part = 1; part < parts; ++part) {
    for (std::size_t l = 0; l < total.layers.size(); ++l) {
      total.layers[l].weight += static_cast<float>(shares[part]) * gradients[part][l].weight;
      total.layers[l].bias += static_cast<float>(shares[part]) * gradients[part][l].bias;
    }
  }
  return to_weight_set(total, "gradient");
}

/// Options of the learned CKI row. The data-free parameters keep their
/// defaults (softmax rule, the only rule for any N), with soft splicing and
/// one assessment map per model. Maps are full up to a last dimension of 256
/// and diagonal for wider tensors (fc1.weight, 784 columns). The temperature
/// is fixed at `temperature`, or starts there when `learn_temperature` is set.
inline cki::LearnOptions learned_cki_options(bool learn_temperature, double temperature) {
  cki::LearnOptions options;
  options.params.temperature = temperature;
  options.per_model = true;
  options.map_form = cki::MapForm::full;
  options.max_full_dim = 256;
  options.learn_temperature = learn_temperature;
  return options;
}

/// Row "CKI learned": assessment maps (and temperatures) trained with Adam
/// (learning rate 1e-3) through the task loss on the training split, while
/// the N models stay fixed. Each step merges the models, computes the
/// merged MLP's cross-entropy gradient on a batch, and passes it back
/// through the merge. Every epoch covers `params.learn_examples` training
/// examples (all when 0), drawn once and reshuffled each epoch. The row
/// keeps the merged model of the epoch with the best validation accuracy,
/// ties going to the earlier epoch. Epoch 0 (identity maps, which equal
/// data-free CKI at the same temperature) is a candidate too. The notes
/// record the epoch, the accuracies and the cost.
inline Method cki_learned_method() {
  return {"cki_learned", "CKI learned (per-model maps, trained on the task loss)",
          [](const MergeInputs& in) -> std::optional<Candidate> {
            const ProtocolParams& params = *in.params;
            const auto started = std::chrono::steady_clock::now();
            cki::LearnableSplice<float> learner(*in.sets, learned_cki_options(params.learn_temperature, params.learn_start_temperature));
            cki::Adam<float> adam;
            const std::vector<std::string> names = learner.names();

            // The examples of every epoch, drawn once.
            const int per_epoch = params.learn_examples > 0 ? params.learn_examples : static_cast<int>(in.train->size());
            std::vector<int> examples = sample_examples({}, in.train->size(), per_epoch, derive_seed(in.seed, 200));
            Rng order(derive_seed(in.seed, 201));

            // Epoch 0 is the identity start.
            Mlp best = from_weight_set(learner.forward(), params.sizes);
            double best_accuracy = evaluate_parallel(best, *in.valid, params.threads).accuracy;
            int best_epoch = 0;
            std::vector<double> valid_accuracy{best_accuracy};
            std::int64_t steps = 0;

            for (int epoch = 1; epoch <= params.learn_epochs; ++epoch) {
              order.shuffle(examples);
              for (std::size_t start = 0; start < examples.size();
                   start += static_cast<std::size_t>(params.learn_batch_size)) {
                // Merge, take the task loss's gradient at the merged weights,
                // and pass it back into the maps.
                const std::size_t stop =
                    std::min(examples.size(), start + static_cast<std::size_t>(params.learn_batch_size));
                const std::vector<int> batch(examples.begin() + static_cast<std::ptrdiff_t>(start),
                                             examples.begin() + static_cast<std::ptrdiff_t>(stop));
                const Mlp merged = from_weight_set(learner.forward(), params.sizes);
                const cki::WeightSet<float> gradient = batch_gradient(merged, *in.train, batch, params.threads);
                for (const std::string& name : names) learner.backward(name, gradient.view(name));
                learner.step(adam);
                ++steps;
              }

              // Keep the epoch with the best validation accuracy.
              Mlp merged = from_weight_set(learner.forward(), params.sizes);
              const double accuracy = evaluate_parallel(merged, *in.valid, params.threads).accuracy;
              valid_accuracy.push_back(accuracy);
              if (accuracy > best_accuracy) {
                best_accuracy = accuracy;
                best_epoch = epoch;
                best = std::move(merged);
              }
            }

            nlohmann::json notes = {{"options", learner.options().to_json()},
                                    {"learned_parameters", learner.parameter_count()},
                                    {"examples_per_epoch", examples.size()},
                                    {"batch_size", params.learn_batch_size},
                                    {"epochs", params.learn_epochs},
                                    {"steps", steps},
                                    {"best_epoch", best_epoch},
                                    {"valid_accuracy_per_epoch", valid_accuracy},
                                    {"seconds", seconds_since(started)}};
            if (params.learn_temperature) {
              nlohmann::json temperatures = nlohmann::json::object();
              for (const std::string& name : names) temperatures[name] = learner.assessment(name).temperature();
              notes["final_temperatures"] = std::move(temperatures);
            }
            return Candidate::merged(std::move(best), std::move(notes));
          }};
}

/// Returns the rows "CKI calibrated" and "CKI learned".
inline std::vector<Method> searched_methods() { return {cki_calibrated_method(), cki_learned_method()}; }

}  // namespace fashion_mnist
