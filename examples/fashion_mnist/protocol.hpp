// The experiment protocol: training the N models of each setting, running
// every comparison row on them, and the extra epoch of fine-tuning.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <iostream>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <cki/weight_set.hpp>

#include "fashion_mnist/idx.hpp"
#include "fashion_mnist/mlp.hpp"
#include "fashion_mnist/random.hpp"

namespace fashion_mnist {

/// Origin of the N models being merged.
enum class Setting {
  /// One base trained on all training data, then N fine-tunes, each on a
  /// class-skewed subset.
  shared_start,
  /// N models from different random initialisations on the same data.
  independent_seeds,
};

inline const char* setting_name(Setting setting) {
  return setting == Setting::shared_start ? "A: shared start" : "B: independent seeds";
}

inline const char* setting_key(Setting setting) {
  return setting == Setting::shared_start ? "shared_start" : "independent_seeds";
}

/// Everything that defines a run of the protocol.
struct ProtocolParams {
  /// Layer widths of the MLP, input first.
  std::vector<int> sizes{784, 256, 10};
  /// Optimizer for training from scratch (the base and setting B's models).
  OptimizerParams optimizer;
  /// Learning rate of setting A's fine-tunes and of the extra epoch.
  float finetune_learning_rate = 5e-4f;
  int batch_size = 128;
  /// Epochs of setting A's base on all training data.
  int base_epochs = 1;
  /// Epochs of each setting A fine-tune on its class-skewed subset.
  int finetune_epochs = 3;
  /// Epochs of each setting B model on all training data.
  int independent_epochs = 5;
  /// Epochs of fine-tuning after the merge, on all training data.
  int extra_epochs = 1;
  /// Share of each non-preferred class in a class-skewed subset, in [0, 1];
  /// the preferred classes are included in full.
  double other_class_share = 0.1;
  int repeats = 3;
  /// Values of N to run, each >= 1.
  std::vector<int> model_counts{2, 4};
  std::vector<Setting> settings{Setting::shared_start, Setting::independent_seeds};
  std::uint64_t seed = 1;
  /// Worker threads for training and evaluation, >= 1.
  int threads = 2;
  /// Magnitude pruning zeroes weights with |w| <= this threshold.
  float prune_threshold = 0.02f;
  /// Trials of the calibrated CKI row's search, >= 1; the first trial is
  /// data-free CKI at its default parameters.
  int calibration_budget = 30;
  /// Epochs of the learned CKI row's map training, >= 1; the epoch with the
  /// best validation accuracy is kept.
  int learn_epochs = 10;
  /// Training examples per epoch of the learned CKI row, drawn once per row
  /// and reused every epoch; 0 takes all training examples. The default,
  /// 10,000 of the 50,000, keeps the full protocol within 15 minutes on 2 cores.
  int learn_examples = 10000;
  /// Examples per Adam step of the learned CKI row, >= 1.
  int learn_batch_size = 128;
  /// Learns a temperature per tensor in the learned CKI row, besides the maps.
  bool learn_temperature = true;
  /// Temperature of the learned CKI row's rule: fixed, or the starting value
  /// when learned; range (0, 1e6]. 0.1 scored higher on validation data
  /// than 1 (the reference's fixed value) in a trial run of both settings.
  double learn_start_temperature = 0.1;
  /// Examples per model for the Fisher row's diagonal Fisher, >= 1, drawn
  /// from that model's own training data.
  int fisher_examples = 2000;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    if (sizes.size() < 2) throw std::invalid_argument("'sizes' needs at least an input and an output width");
    if (base_epochs < 0 || finetune_epochs < 0 || independent_epochs < 0 || extra_epochs < 0) {
      throw std::invalid_argument("epoch counts must be >= 0");
    }
    if (!(other_class_share >= 0 && other_class_share <= 1)) {
      throw std::invalid_argument("'other_class_share' must be in [0, 1], got " + std::to_string(other_class_share));
    }
    if (repeats < 1) throw std::invalid_argument("'repeats' must be >= 1, got " + std::to_string(repeats));
    if (model_counts.empty()) throw std::invalid_argument("'model_counts' must not be empty");
    for (int count : model_counts) {
      if (count < 1) throw std::invalid_argument("every model count must be >= 1, got " + std::to_string(count));
    }
    if (settings.empty()) throw std::invalid_argument("'settings' must not be empty");
    if (threads < 1) throw std::invalid_argument("'threads' must be >= 1, got " + std::to_string(threads));
    if (!(prune_threshold >= 0)) {
      throw std::invalid_argument("'prune_threshold' must be >= 0, got " + std::to_string(prune_threshold));
    }

    // Budgets of the rows tuned on data and of the Fisher row.
    if (calibration_budget < 1) {
      throw std::invalid_argument("'calibration_budget' must be >= 1, got " + std::to_string(calibration_budget));
    }
    if (learn_epochs < 1) throw std::invalid_argument("'learn_epochs' must be >= 1, got " + std::to_string(learn_epochs));
    if (learn_examples < 0) {
      throw std::invalid_argument("'learn_examples' must be >= 0, got " + std::to_string(learn_examples));
    }
    if (learn_batch_size < 1) {
      throw std::invalid_argument("'learn_batch_size' must be >= 1, got " + std::to_string(learn_batch_size));
    }
    if (!(learn_start_temperature > 0 && learn_start_temperature <= 1e6)) {
      throw std::invalid_argument("'learn_start_temperature' must be in (0, 1e6], got " +
                                  std::to_string(learn_start_temperature));
    }
    if (fisher_examples < 1) {
      throw std::invalid_argument("'fisher_examples' must be >= 1, got " + std::to_string(fisher_examples));
    }

    TrainParams train_params;
    train_params.batch_size = batch_size;
    train_params.optimizer = optimizer;
    train_params.check();
  }

  /// Training settings for `epochs` epochs at `learning_rate` with order seed `seed`.
  TrainParams training(int epochs, float learning_rate, std::uint64_t order_seed) const {
    TrainParams params;
    params.epochs = epochs;
    params.batch_size = batch_size;
    params.optimizer = optimizer;
    params.optimizer.learning_rate = learning_rate;
    params.seed = order_seed;
    return params;
  }
};

/// Runs `task(0) ... task(count - 1)` on up to `threads` threads and rethrows
/// the first exception a task threw.
inline void parallel_for(std::size_t count, int threads, const std::function<void(std::size_t)>& task) {
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    for (std::size_t i = next++; i < count; i = next++) {
      try {
        task(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    }
  };

  const std::size_t workers = std::min<std::size_t>(count, static_cast<std::size_t>(std::max(threads, 1)));
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
}

/// Scores `mlp` on `data` with the examples split over up to `threads`
/// threads; the same scores as evaluate(), up to the order of the sums.
inline Scores evaluate_parallel(const Mlp& mlp, const Dataset& data, int threads) {
  const auto parts = static_cast<std::size_t>(std::max(threads, 1));
  const std::vector<const Mlp*> members{&mlp};
  std::vector<ScoreSums> sums(parts);
  parallel_for(parts, threads, [&](std::size_t part) {
    const Eigen::Index begin = data.size() * static_cast<Eigen::Index>(part) / static_cast<Eigen::Index>(parts);
    const Eigen::Index end = data.size() * static_cast<Eigen::Index>(part + 1) / static_cast<Eigen::Index>(parts);
    sums[part] = score_range(members, data, begin, end);
  });

  ScoreSums total;
  for (const ScoreSums& part : sums) {
    total.log_loss += part.log_loss;
    total.correct += part.correct;
  }
  Scores scores;
  scores.accuracy = static_cast<double>(total.correct) / static_cast<double>(data.size());
  scores.log_loss = total.log_loss / static_cast<double>(data.size());
  return scores;
}

/// Seconds elapsed since `start`.
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Indices of the class-skewed subset of model `model` (0-based) of `count`:
/// every training example of the preferred classes (those with
/// class % count == model), plus a random `share` of each other class.
inline std::vector<int> class_skewed_subset(const Dataset& train, int model, int count, double share,
                                            std::uint64_t seed) {
  std::vector<std::vector<int>> by_class(kClassCount);
  for (std::size_t i = 0; i < train.labels.size(); ++i) {
    by_class[static_cast<std::size_t>(train.labels[i])].push_back(static_cast<int>(i));
  }

  Rng rng(seed);
  std::vector<int> subset;
  for (int c = 0; c < kClassCount; ++c) {
    std::vector<int>& members = by_class[static_cast<std::size_t>(c)];
    if (c % count == model) {
      subset.insert(subset.end(), members.begin(), members.end());
      continue;
    }
    rng.shuffle(members);
    const auto take = static_cast<std::size_t>(std::lround(share * static_cast<double>(members.size())));
    subset.insert(subset.end(), members.begin(), members.begin() + static_cast<std::ptrdiff_t>(take));
  }
  return subset;
}

/// Inputs of a comparison row: the N trained models of one setting, as
/// networks and as weight sets, and the validation data.
struct MergeInputs {
  Setting setting = Setting::shared_start;
  const ProtocolParams* params = nullptr;
  /// The N models, model 1 first.
  const std::vector<Mlp>* models = nullptr;
  /// The same models as weight sets, sources "model 1" ... "model N".
  const std::vector<cki::WeightSet<float>>* sets = nullptr;
  /// Model that methods needing a base (task vectors) measure from: the
  /// shared start in setting A, model 1 in setting B, where the models share
  /// no ancestor.
  const Mlp* base = nullptr;
  /// Index of the single model with the best validation accuracy (ties go to
  /// the lowest index).
  std::size_t best_index = 0;
  const Dataset* train = nullptr;
  /// Indices into `train` of the examples each model was trained on; an
  /// empty list means all training examples.
  const std::vector<std::vector<int>>* training_subsets = nullptr;
  const Dataset* valid = nullptr;
  /// Seed for rows that draw random numbers (example samples, say), the
  /// same for every row of one comparison.
  std::uint64_t seed = 0;

  std::size_t model_count() const { return models->size(); }
};

/// Output of a comparison row: one merged model, or several models whose
/// logits are averaged (an output ensemble).
struct Candidate {
  /// Networks of the row; empty when `single_indices` names them instead.
  std::vector<Mlp> members;
  /// Members that are single models, by index. The harness then reuses
  /// those models and their extra-epoch fine-tunes.
  std::vector<std::size_t> single_indices;
  /// Optional 0/1 mask per layer, kept during the extra epoch (pruning).
  std::vector<Eigen::MatrixXf> weight_masks;
  /// Method-specific facts for the JSON output (a splice report, say).
  nlohmann::json notes;

  static Candidate merged(Mlp mlp, nlohmann::json notes = nullptr) {
    Candidate candidate;
    candidate.members.push_back(std::move(mlp));
    candidate.notes = std::move(notes);
    return candidate;
  }

  static Candidate of_singles(std::vector<std::size_t> indices) {
    Candidate candidate;
    candidate.single_indices = std::move(indices);
    return candidate;
  }
};

/// One row of the comparison table. `run` returns std::nullopt where the
/// method does not apply (blend at N = 4, model 3 of 2), shown as "n/a".
struct Method {
  std::string key;
  std::string label;
  std::function<std::optional<Candidate>(const MergeInputs&)> run;
};

/// Scores of one row in one repeat.
struct RowOutcome {
  bool applicable = false;
  Scores valid;
  Scores test;
  Scores valid_extra;
  Scores test_extra;
  nlohmann::json notes;
};

/// Fine-tunes copies of `models` for the extra epochs on all training data,
/// all with the same example order, on `threads` threads.
inline std::vector<Mlp> fine_tune_all(const std::vector<const Mlp*>& models, const std::vector<const std::vector<Eigen::MatrixXf>*>& masks,
                                      const Dataset& train_data, const TrainParams& params, int threads) {
  std::vector<Mlp> tuned(models.size());
  parallel_for(models.size(), threads, [&](std::size_t i) {
    tuned[i] = *models[i];
    train(tuned[i], train_data, {}, params, *masks[i]);
  });
  return tuned;
}

/// Runs every row of `methods` on one set of N models and returns, per row,
/// the scores directly and after the extra epoch of fine-tuning.
inline std::vector<RowOutcome> compare_methods(const std::vector<Method>& methods, Setting setting,
                                               const std::vector<Mlp>& models,
                                               const std::vector<std::vector<int>>& training_subsets,
                                               const Mlp& base, const Splits& data, const ProtocolParams& params,
                                               std::uint64_t extra_seed, std::uint64_t row_seed) {
  const std::size_t n = models.size();
  std::vector<cki::WeightSet<float>> sets;
  for (std::size_t k = 0; k < n; ++k) sets.push_back(to_weight_set(models[k], "model " + std::to_string(k + 1)));

  // Score the single models on validation data and choose the best.
  std::vector<Scores> single_valid(n);
  parallel_for(n, params.threads, [&](std::size_t k) { single_valid[k] = evaluate(models[k], data.valid); });
  std::size_t best = 0;
  for (std::size_t k = 1; k < n; ++k) {
    if (single_valid[k].accuracy > single_valid[best].accuracy) best = k;
  }

  MergeInputs inputs;
  inputs.setting = setting;
  inputs.params = &params;
  inputs.models = &models;
  inputs.sets = &sets;
  inputs.base = &base;
  inputs.best_index = best;
  inputs.train = &data.train;
  inputs.training_subsets = &training_subsets;
  inputs.valid = &data.valid;
  inputs.seed = row_seed;

  // Build every row's candidate. Rows run one after another, since a
  // splice uses threads of its own.
  std::vector<std::optional<Candidate>> candidates;
  for (const Method& method : methods) candidates.push_back(method.run(inputs));

  // One fine-tuning job per single model and per member of every row that
  // is not made of single models.
  const std::vector<Eigen::MatrixXf> no_masks;
  std::vector<const Mlp*> job_models;
  std::vector<const std::vector<Eigen::MatrixXf>*> job_masks;
  for (const Mlp& model : models) {
    job_models.push_back(&model);
    job_masks.push_back(&no_masks);
  }
  std::vector<std::size_t> first_job(candidates.size(), 0);
  for (std::size_t r = 0; r < candidates.size(); ++r) {
    if (!candidates[r]) continue;
    first_job[r] = job_models.size();
    for (const Mlp& member : candidates[r]->members) {
      job_models.push_back(&member);
      job_masks.push_back(&candidates[r]->weight_masks);
    }
  }
  const TrainParams extra = params.training(params.extra_epochs, params.finetune_learning_rate, extra_seed);
  const std::vector<Mlp> tuned = fine_tune_all(job_models, job_masks, data.train, extra, params.threads);

  // Score every row before and after the extra epoch.
  std::vector<RowOutcome> outcomes(candidates.size());
  parallel_for(candidates.size(), params.threads, [&](std::size_t r) {
    if (!candidates[r]) return;
    const Candidate& candidate = *candidates[r];
    std::vector<const Mlp*> direct;
    std::vector<const Mlp*> after;
    for (std::size_t k : candidate.single_indices) {
      direct.push_back(&models.at(k));
      after.push_back(&tuned.at(k));
    }
    for (std::size_t m = 0; m < candidate.members.size(); ++m) {
      direct.push_back(&candidate.members[m]);
      after.push_back(&tuned[first_job[r] + m]);
    }

    RowOutcome& outcome = outcomes[r];
    outcome.applicable = true;
    outcome.valid = evaluate(direct, data.valid);
    outcome.test = evaluate(direct, data.test);
    outcome.valid_extra = evaluate(after, data.valid);
    outcome.test_extra = evaluate(after, data.test);
    outcome.notes = candidate.notes;
  });
  return outcomes;
}

/// Per-repeat outcomes of every row for one setting and one N.
struct Block {
  Setting setting = Setting::shared_start;
  int model_count = 0;
  /// outcomes[repeat][row], rows in the order of the method list.
  std::vector<std::vector<RowOutcome>> outcomes;
};

/// Returns the class-skewed training subsets of setting A's `count`
/// fine-tunes in one repeat, model k's preferring classes with class % N == k.
inline std::vector<std::vector<int>> shared_start_subsets(const Splits& data, const ProtocolParams& params, int count,
                                                          std::uint64_t repeat_seed) {
  std::vector<std::vector<int>> subsets;
  for (int k = 0; k < count; ++k) {
    const std::uint64_t stream = 1000 + 10 * static_cast<std::uint64_t>(count) + static_cast<std::uint64_t>(k);
    subsets.push_back(class_skewed_subset(data.train, k, count, params.other_class_share,
                                          derive_seed(repeat_seed, stream)));
  }
  return subsets;
}

/// Trains the N models of setting A for one repeat: fine-tunes of `base`,
/// model k on `subsets[k]` (from shared_start_subsets).
inline std::vector<Mlp> train_shared_start_models(const Mlp& base, const Splits& data, const ProtocolParams& params,
                                                  const std::vector<std::vector<int>>& subsets,
                                                  std::uint64_t repeat_seed) {
  const auto count = static_cast<std::uint64_t>(subsets.size());
  std::vector<Mlp> models(subsets.size(), base);
  parallel_for(models.size(), params.threads, [&](std::size_t k) {
    const std::uint64_t stream = 1000 + 10 * count + k;
    train(models[k], data.train, subsets[k],
          params.training(params.finetune_epochs, params.finetune_learning_rate, derive_seed(repeat_seed, stream + 5000)));
  });
  return models;
}

/// Trains `count` models of setting B for one repeat, each from its own
/// initialisation and example order, on all training data.
inline std::vector<Mlp> train_independent_models(const Splits& data, const ProtocolParams& params, int count,
                                                 std::uint64_t repeat_seed) {
  std::vector<Mlp> models(static_cast<std::size_t>(count));
  parallel_for(models.size(), params.threads, [&](std::size_t k) {
    models[k] = Mlp::initialised(params.sizes, derive_seed(repeat_seed, 2000 + k));
    train(models[k], data.train, {},
          params.training(params.independent_epochs, params.optimizer.learning_rate, derive_seed(repeat_seed, 3000 + k)));
  });
  return models;
}

/// Runs the whole protocol: for every repeat and setting, trains the models,
/// then compares every method for every N. Progress goes to `log`.
/// Returns one block per (setting, N), settings outermost.
inline std::vector<Block> run_protocol(const std::vector<Method>& methods, const Splits& data,
                                       const ProtocolParams& params, std::ostream& log) {
  params.check();
  // The worker threads train one model each; Eigen's own OpenMP threads
  // inside them would oversubscribe the cores, so Eigen stays serial.
  Eigen::setNbThreads(1);
  std::vector<Block> blocks;
  for (Setting setting : params.settings) {
    for (int count : params.model_counts) {
      Block block;
      block.setting = setting;
      block.model_count = count;
      blocks.push_back(block);
    }
  }

  int max_count = 0;
  for (int count : params.model_counts) max_count = std::max(max_count, count);

  for (int repeat = 0; repeat < params.repeats; ++repeat) {
    const std::uint64_t repeat_seed = derive_seed(params.seed, static_cast<std::uint64_t>(repeat));
    for (std::size_t s = 0; s < params.settings.size(); ++s) {
      const Setting setting = params.settings[s];
      const auto setting_start = std::chrono::steady_clock::now();
      const std::string where = "repeat " + std::to_string(repeat + 1) + "/" + std::to_string(params.repeats) +
                                ", setting " + setting_name(setting);

      // Setting A trains one base per repeat; setting B trains the largest N
      // once, and smaller N use its first models.
      Mlp base;
      std::vector<Mlp> independent;
      if (setting == Setting::shared_start) {
        base = Mlp::initialised(params.sizes, derive_seed(repeat_seed, 1));
        train(base, data.train, {},
              params.training(params.base_epochs, params.optimizer.learning_rate, derive_seed(repeat_seed, 2)));
        log << where << ": base trained (" << seconds_since(setting_start) << " s)\n";
      } else {
        independent = train_independent_models(data, params, max_count, repeat_seed);
        log << where << ": " << max_count << " models trained (" << seconds_since(setting_start) << " s)\n";
      }

      for (std::size_t c = 0; c < params.model_counts.size(); ++c) {
        const int count = params.model_counts[c];
        const auto start = std::chrono::steady_clock::now();
        std::vector<Mlp> models;
        // Setting B's models train on all examples, an empty subset each.
        std::vector<std::vector<int>> subsets(static_cast<std::size_t>(count));
        if (setting == Setting::shared_start) {
          subsets = shared_start_subsets(data, params, count, repeat_seed);
          models = train_shared_start_models(base, data, params, subsets, repeat_seed);
        } else {
          models.assign(independent.begin(), independent.begin() + count);
        }
        const Mlp& merge_base = setting == Setting::shared_start ? base : models.front();

        const std::uint64_t extra_seed = derive_seed(repeat_seed, 4000 + 10 * static_cast<std::uint64_t>(count) + s);
        const std::uint64_t row_seed = derive_seed(repeat_seed, 6000 + 10 * static_cast<std::uint64_t>(count) + s);
        Block& block = blocks[s * params.model_counts.size() + c];
        block.outcomes.push_back(
            compare_methods(methods, setting, models, subsets, merge_base, data, params, extra_seed, row_seed));
        log << where << ", N = " << count << ": compared " << methods.size() << " rows (" << seconds_since(start)
            << " s)\n";
      }
    }
  }
  return blocks;
}

}  // namespace fashion_mnist
