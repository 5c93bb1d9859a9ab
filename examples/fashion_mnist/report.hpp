// Summaries of the protocol's outcomes: mean and standard deviation over
// repeats, as a Markdown table and as JSON.
#pragma once

#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fashion_mnist/protocol.hpp"

namespace fashion_mnist {

/// Mean and sample standard deviation (n - 1 in the denominator; 0 for a
/// single value) of `values`.
struct Spread {
  double mean = 0;
  double std_dev = 0;
  std::size_t count = 0;
};

inline Spread spread_of(const std::vector<double>& values) {
  Spread spread;
  spread.count = values.size();
  if (values.empty()) return spread;
  for (double value : values) spread.mean += value;
  spread.mean /= static_cast<double>(values.size());
  if (values.size() > 1) {
    double squares = 0;
    for (double value : values) squares += (value - spread.mean) * (value - spread.mean);
    spread.std_dev = std::sqrt(squares / static_cast<double>(values.size() - 1));
  }
  return spread;
}

/// Formats a spread as "85.12 ± 0.31" (the "±" part only for two or more
/// values) with `decimals` decimals, each value first multiplied by `scale`.
inline std::string format_spread(const Spread& spread, double scale, int decimals) {
  // A mean that rounds to zero prints as 0.00, not -0.00.
  double mean = spread.mean * scale;
  if (std::fabs(mean) < 0.5 * std::pow(10.0, -decimals)) mean = 0.0;

  char buffer[64];
  if (spread.count > 1) {
    std::snprintf(buffer, sizeof buffer, "%.*f ± %.*f", decimals, mean, decimals, spread.std_dev * scale);
  } else {
    std::snprintf(buffer, sizeof buffer, "%.*f", decimals, mean);
  }
  return buffer;
}

/// Score of a row outcome that a table column shows.
enum class Metric { test_accuracy, test_log_loss, test_accuracy_extra, test_log_loss_extra };

inline double metric_value(const RowOutcome& outcome, Metric metric) {
  switch (metric) {
    case Metric::test_accuracy: return outcome.test.accuracy;
    case Metric::test_log_loss: return outcome.test.log_loss;
    case Metric::test_accuracy_extra: return outcome.test_extra.accuracy;
    case Metric::test_log_loss_extra: return outcome.test_extra.log_loss;
  }
  return 0;
}

/// Index of the method with key `key`, or methods.size() when absent.
inline std::size_t find_method(const std::vector<Method>& methods, const std::string& key) {
  for (std::size_t r = 0; r < methods.size(); ++r) {
    if (methods[r].key == key) return r;
  }
  return methods.size();
}

/// The values of `metric` for row `row` over the repeats where it applies;
/// with `reference` < rows, each minus the reference row's value in the same
/// repeat (a paired difference).
inline std::vector<double> row_values(const Block& block, std::size_t row, Metric metric,
                                      std::size_t reference) {
  std::vector<double> values;
  for (const std::vector<RowOutcome>& repeat : block.outcomes) {
    if (!repeat[row].applicable) continue;
    double value = metric_value(repeat[row], metric);
    if (reference < repeat.size()) value -= metric_value(repeat[reference], metric);
    values.push_back(value);
  }
  return values;
}

/// Writes one Markdown table per block: test accuracy (%) and log loss,
/// directly and after the extra epochs, with the paired difference in
/// accuracy to the best single model (percentage points).
inline std::string markdown_tables(const std::vector<Block>& blocks, const std::vector<Method>& methods,
                                   const ProtocolParams& params) {
  const std::size_t best = find_method(methods, "best_single");
  std::ostringstream out;
  const std::string extra = "+" + std::to_string(params.extra_epochs) + " ep";

  for (const Block& block : blocks) {
    out << "### Setting " << setting_name(block.setting) << ", N = " << block.model_count << "\n\n";
    if (block.setting == Setting::independent_seeds) {
      out << "The models share no ancestor, so methods that need a base (task arithmetic, TIES, DARE, "
             "DARE-TIES, model stock) use model 1 "
             "(CKI's base, which orders the models, is model 1 in both settings).\n\n";
    } else {
      out << "Methods that need a base (task arithmetic, TIES, DARE, DARE-TIES, model stock) measure the "
             "fine-tunes' deltas from the shared start.\n\n";
    }
    out << "| method | test acc (%) | Δ acc vs best (pp) | test log loss | acc " << extra << " (%) | Δ acc "
        << extra << " vs best (pp) | log loss " << extra << " |\n";
    out << "|---|---|---|---|---|---|---|\n";

    for (std::size_t r = 0; r < methods.size(); ++r) {
      const std::vector<double> accuracy = row_values(block, r, Metric::test_accuracy, methods.size());
      if (accuracy.empty()) {
        // Single-model rows beyond N are omitted; other rows show n/a.
        if (methods[r].key.rfind("model_", 0) == 0) continue;
        out << "| " << methods[r].label << " | n/a | n/a | n/a | n/a | n/a | n/a |\n";
        continue;
      }
      const bool is_reference = r == best || best == methods.size();
      auto delta = [&](Metric metric) {
        return is_reference ? std::string("–") : format_spread(spread_of(row_values(block, r, metric, best)), 100, 2);
      };
      out << "| " << methods[r].label << " | " << format_spread(spread_of(accuracy), 100, 2) << " | "
          << delta(Metric::test_accuracy) << " | "
          << format_spread(spread_of(row_values(block, r, Metric::test_log_loss, methods.size())), 1, 4) << " | "
          << format_spread(spread_of(row_values(block, r, Metric::test_accuracy_extra, methods.size())), 100, 2)
          << " | " << delta(Metric::test_accuracy_extra) << " | "
          << format_spread(spread_of(row_values(block, r, Metric::test_log_loss_extra, methods.size())), 1, 4)
          << " |\n";
    }
    out << "\n";
  }
  return out.str();
}

/// Formats the chosen point of a calibrated CKI row's notes as
/// "soft paired-softmax, a 0.2, c 50, s 1, τ 0.1, B 30".
inline std::string format_calibration_point(const nlohmann::json& chosen) {
  std::ostringstream out;
  out << chosen.value("splice", "?") << " " << chosen.value("rule", "?") << ", a " << chosen.value("a", 0.0)
      << ", c " << chosen.value("c", 0.0) << ", s " << chosen.value("scale", 0.0) << ", τ "
      << chosen.value("temperature", 0.0) << ", B " << chosen.value("bins", 0);
  return out.str();
}

/// Writes the cost and the choices of the rows tuned on data, one Markdown
/// table: per block, the calibrated CKI row's seconds, evaluations and
/// chosen parameters, and the learned CKI row's seconds, Adam steps and the
/// epoch chosen on validation data, per repeat. Empty when neither row is
/// in `methods`.
inline std::string searched_rows_summary(const std::vector<Block>& blocks, const std::vector<Method>& methods) {
  const std::size_t calibrated = find_method(methods, "cki_calibrated");
  const std::size_t learned = find_method(methods, "cki_learned");
  if (calibrated == methods.size() && learned == methods.size()) return "";

  std::ostringstream out;
  out << "### Cost of the rows tuned on data\n\n"
      << "Seconds are wall-clock time of the search or the training, validation scoring included, mean ± std "
         "over repeats. Per repeat: the calibrated row's chosen parameters (validation accuracy as the score), and "
         "the learned row's chosen epoch (0 is the identity start, equal to CKI soft with the softmax rule at the "
         "learned row's starting temperature) with its validation accuracy against epoch 0's.\n\n"
      << "| block | row | seconds | work | chosen per repeat |\n|---|---|---|---|---|\n";
  for (const Block& block : blocks) {
    const std::string name = std::string(setting_name(block.setting)) + ", N = " + std::to_string(block.model_count);
    for (std::size_t row : {calibrated, learned}) {
      if (row == methods.size()) continue;
      std::vector<double> seconds;
      std::string work;
      std::string chosen;
      for (const std::vector<RowOutcome>& repeat : block.outcomes) {
        const RowOutcome& outcome = repeat[row];
        if (!outcome.applicable) continue;
        const nlohmann::json& notes = outcome.notes;
        seconds.push_back(notes.value("seconds", 0.0));
        if (!chosen.empty()) chosen += "; ";
        if (row == calibrated) {
          work = std::to_string(notes.value("evaluations", 0)) + " evaluations of " +
                 std::to_string(notes.value("valid_points", 0)) + " grid points";
          chosen += format_calibration_point(notes.value("chosen", nlohmann::json::object()));
        } else {
          work = std::to_string(notes.value("steps", 0)) + " Adam steps (" +
                 std::to_string(notes.value("examples_per_epoch", 0)) + " examples per epoch)";
          const std::vector<double> accuracy =
              notes.value("valid_accuracy_per_epoch", std::vector<double>{});
          const int epoch = notes.value("best_epoch", 0);
          char buffer[96];
          if (static_cast<std::size_t>(epoch) < accuracy.size()) {
            std::snprintf(buffer, sizeof buffer, "epoch %d, %.2f%% (epoch 0: %.2f%%)", epoch,
                          100 * accuracy[static_cast<std::size_t>(epoch)], 100 * accuracy.front());
          } else {
            std::snprintf(buffer, sizeof buffer, "epoch %d", epoch);
          }
          chosen += buffer;
        }
      }
      if (seconds.empty()) continue;
      out << "| " << name << " | " << methods[row].label << " | " << format_spread(spread_of(seconds), 1, 1)
          << " | " << work << " | " << chosen << " |\n";
    }
  }
  out << "\n";
  return out.str();
}

inline nlohmann::json scores_to_json(const Scores& scores) {
  return {{"accuracy", scores.accuracy}, {"log_loss", scores.log_loss}};
}

/// The protocol's settings and every outcome, per block, row and repeat,
/// with the mean and standard deviation of each test metric.
inline nlohmann::json results_to_json(const std::vector<Block>& blocks, const std::vector<Method>& methods,
                                      const ProtocolParams& params) {
  nlohmann::json out;
  out["protocol"] = {{"sizes", params.sizes},
                     {"optimizer", params.optimizer.kind == OptimizerKind::adam ? "adam" : "sgd"},
                     {"learning_rate", params.optimizer.learning_rate},
                     {"finetune_learning_rate", params.finetune_learning_rate},
                     {"batch_size", params.batch_size},
                     {"base_epochs", params.base_epochs},
                     {"finetune_epochs", params.finetune_epochs},
                     {"independent_epochs", params.independent_epochs},
                     {"extra_epochs", params.extra_epochs},
                     {"other_class_share", params.other_class_share},
                     {"repeats", params.repeats},
                     {"seed", params.seed},
                     {"prune_threshold", params.prune_threshold},
                     {"calibration_budget", params.calibration_budget},
                     {"learn_epochs", params.learn_epochs},
                     {"learn_examples", params.learn_examples},
                     {"learn_batch_size", params.learn_batch_size},
                     {"learn_temperature", params.learn_temperature},
                     {"learn_start_temperature", params.learn_start_temperature},
                     {"fisher_examples", params.fisher_examples}};

  nlohmann::json block_list = nlohmann::json::array();
  for (const Block& block : blocks) {
    nlohmann::json rows = nlohmann::json::array();
    for (std::size_t r = 0; r < methods.size(); ++r) {
      nlohmann::json row;
      row["key"] = methods[r].key;
      row["label"] = methods[r].label;
      nlohmann::json repeats = nlohmann::json::array();
      for (const std::vector<RowOutcome>& repeat : block.outcomes) {
        const RowOutcome& outcome = repeat[r];
        if (!outcome.applicable) {
          repeats.push_back(nullptr);
          continue;
        }
        repeats.push_back({{"valid", scores_to_json(outcome.valid)},
                           {"test", scores_to_json(outcome.test)},
                           {"valid_extra", scores_to_json(outcome.valid_extra)},
                           {"test_extra", scores_to_json(outcome.test_extra)},
                           {"notes", outcome.notes}});
      }
      row["repeats"] = std::move(repeats);

      const std::pair<const char*, Metric> metrics[] = {{"test_accuracy", Metric::test_accuracy},
                                                        {"test_log_loss", Metric::test_log_loss},
                                                        {"test_accuracy_extra", Metric::test_accuracy_extra},
                                                        {"test_log_loss_extra", Metric::test_log_loss_extra}};
      for (const auto& [name, metric] : metrics) {
        const Spread spread = spread_of(row_values(block, r, metric, methods.size()));
        row["summary"][name] = spread.count == 0 ? nlohmann::json(nullptr)
                                                 : nlohmann::json{{"mean", spread.mean}, {"std", spread.std_dev}};
      }
      rows.push_back(std::move(row));
    }
    block_list.push_back({{"setting", setting_key(block.setting)},
                          {"model_count", block.model_count},
                          {"rows", std::move(rows)}});
  }
  out["blocks"] = std::move(block_list);
  return out;
}

}  // namespace fashion_mnist
