// fashion_mnist: trains N small MLPs on Fashion-MNIST, merges them with CKI and
// the baseline methods, and prints a Markdown table of test accuracy and log
// loss (mean ± std over repeats), directly and after one extra epoch.

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdlib.h>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "fashion_mnist/idx.hpp"
#include "fashion_mnist/methods.hpp"
#include "fashion_mnist/protocol.hpp"
#include "fashion_mnist/report.hpp"
#include "fashion_mnist/tool_row.hpp"

namespace {

/// Everything the command line sets.
struct Options {
  std::string data_dir = fashion_mnist::kDefaultDataDir;
  bool quick = false;
  std::vector<int> hidden{256};
  std::string optimizer = "adam";
  std::vector<std::string> settings{"A", "B"};
  fashion_mnist::SplitSizes sizes;
  std::uint64_t split_seed = 0;
  std::string json_path;
  /// Path of the cki-splice executable; empty leaves out its row.
#ifdef CKI_SPLICE_PATH
  std::string cki_splice = CKI_SPLICE_PATH;
#else
  std::string cki_splice;
#endif
};

/// Creates a fresh private folder for the safetensors files of the
/// cki-splice row. Throws std::runtime_error when that fails.
std::filesystem::path make_work_folder() {
  std::string pattern = (std::filesystem::temp_directory_path() / "cki_fashion_mnist_XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) {
    throw std::runtime_error("failed to create a temporary folder from the pattern '" + pattern + "'");
  }
  return pattern;
}

/// Compares, in every block and repeat, the test accuracy of the row that
/// merges through cki-splice with the in-process row of the same parameters.
/// Writes one line with the outcome to `out` and returns true when the
/// weights agree within rounding.
bool check_tool_row(const std::vector<fashion_mnist::Block>& blocks,
                    const std::vector<fashion_mnist::Method>& methods, std::ostream& out) {
  const std::size_t tool = fashion_mnist::find_method(methods, "cki_soft_softmax_tool");
  const std::size_t in_process = fashion_mnist::find_method(methods, "cki_soft_softmax");
  if (tool == methods.size() || in_process == methods.size()) return true;

  int compared = 0;
  int mismatched = 0;
  double largest_difference = 0;
  for (const fashion_mnist::Block& block : blocks) {
    for (const std::vector<fashion_mnist::RowOutcome>& repeat : block.outcomes) {
      ++compared;
      if (repeat[tool].test.accuracy != repeat[in_process].test.accuracy) ++mismatched;
      largest_difference = std::max(largest_difference,
                                    repeat[tool].notes.value("max_abs_difference_to_in_process", 0.0));
    }
  }
  out << "Safetensors files through cki-splice versus the in-process splice (CKI soft, softmax rule): "
      << (mismatched == 0 ? "same test accuracy" : "DIFFERENT test accuracy") << " in "
      << compared - mismatched << " of " << compared << " comparisons; largest weight difference "
      << largest_difference << ".\n";

  // The tool and this program may be built with different vector
  // instructions (the runner builds this program with -march=native), so
  // their exp and logistic can round differently by a few units in the last
  // place. Such differences may flip a borderline test example; a weight
  // difference above 1e-5 is a real disagreement.
  constexpr double kRoundingTolerance = 1e-5;
  return largest_difference <= kRoundingTolerance;
}

/// Lowers the cost of every option the user did not set, so the whole run
/// takes one to two minutes on 2 cores: one repeat on 20,000 training and 5,000 validation
/// examples, and 5,000 examples per epoch of the learned CKI row.
void apply_quick_profile(const CLI::App& app, fashion_mnist::ProtocolParams& params, Options& options) {
  auto unset = [&app](const char* name) { return app.count(name) == 0; };
  if (unset("--repeats")) params.repeats = 1;
  if (unset("--train-size")) options.sizes.train = 20000;
  if (unset("--valid-size")) options.sizes.valid = 5000;
  if (unset("--independent-epochs")) params.independent_epochs = 3;
  if (unset("--finetune-epochs")) params.finetune_epochs = 2;
  if (unset("--learn-examples")) params.learn_examples = 5000;
}

}  // namespace

int main(int argc, char** argv) {
  fashion_mnist::ProtocolParams params;
  Options options;

  CLI::App app{"Fashion-MNIST experiment: merges N trained MLPs with CKI and baseline methods and prints "
               "a Markdown table of test accuracy and log loss on stdout (progress on stderr)."};
  app.add_option("--data-dir", options.data_dir,
                 "Directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (Debian package "
                 "dataset-fashion-mnist)")
      ->capture_default_str();
  app.add_flag("--quick", options.quick,
               "Run in one to two minutes: 1 repeat, 20,000 training and 5,000 validation examples, fewer epochs, "
               "5,000 examples per epoch of the learned CKI row "
               "(explicit options still apply)");
  app.add_option("--json", options.json_path, "Also write every outcome, per repeat, to this JSON file");
  app.add_option("--cki-splice", options.cki_splice,
                 "Path of the cki-splice executable for the row merged through safetensors files; empty leaves "
                 "the row out")
      ->capture_default_str();
  app.add_option("--repeats", params.repeats, "Repeats with different seeds")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--seed", params.seed, "Seed of the repeats' training")->capture_default_str();
  app.add_option("--split-seed", options.split_seed, "Seed of the training/validation split")->capture_default_str();
  app.add_option("--threads", params.threads, "Worker threads for training and evaluation")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--models", params.model_counts, "Values of N, the number of models merged")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--settings", options.settings, "Settings to run: A (shared start), B (independent seeds)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::IsMember({"A", "B"}));
  app.add_option("--hidden", options.hidden, "Hidden layer widths, comma-separated")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--optimizer", options.optimizer, "Optimizer: adam or sgd (with momentum 0.9)")
      ->capture_default_str()
      ->check(CLI::IsMember({"adam", "sgd"}));
  app.add_option("--lr", params.optimizer.learning_rate, "Learning rate when training from scratch")
      ->capture_default_str();
  app.add_option("--finetune-lr", params.finetune_learning_rate,
                 "Learning rate of setting A's fine-tunes and of the extra epoch")
      ->capture_default_str();
  app.add_option("--batch-size", params.batch_size, "Examples per optimizer step")->capture_default_str();
  app.add_option("--base-epochs", params.base_epochs, "Epochs of setting A's shared base on all training data")
      ->capture_default_str();
  app.add_option("--finetune-epochs", params.finetune_epochs,
                 "Epochs of each setting A fine-tune on its class-skewed subset")
      ->capture_default_str();
  app.add_option("--independent-epochs", params.independent_epochs,
                 "Epochs of each setting B model on all training data")
      ->capture_default_str();
  app.add_option("--extra-epochs", params.extra_epochs, "Epochs of fine-tuning after the merge")->capture_default_str();
  app.add_option("--other-class-share", params.other_class_share,
                 "Share of each non-preferred class in a class-skewed subset, 0 to 1")
      ->capture_default_str();
  app.add_option("--prune-threshold", params.prune_threshold, "Magnitude pruning zeroes weights with |w| <= this")
      ->capture_default_str();
  app.add_option("--calibration-budget", params.calibration_budget,
                 "Trials of the calibrated CKI row's search on validation accuracy")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--learn-epochs", params.learn_epochs, "Epochs of the learned CKI row's map training")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--learn-examples", params.learn_examples,
                 "Training examples per epoch of the learned CKI row, drawn once; 0 for all")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--learn-batch-size", params.learn_batch_size, "Examples per Adam step of the learned CKI row")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--learn-temperature", params.learn_temperature,
                 "Learn a temperature per tensor in the learned CKI row (true or false)")
      ->capture_default_str();
  app.add_option("--learn-start-temperature", params.learn_start_temperature,
                 "Temperature of the learned CKI row's rule, fixed or the starting value when learned")
      ->capture_default_str();
  app.add_option("--fisher-examples", params.fisher_examples,
                 "Examples per model for the Fisher row's diagonal Fisher")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--train-size", options.sizes.train, "Training examples taken from the training file")
      ->capture_default_str();
  app.add_option("--valid-size", options.sizes.valid, "Validation examples taken from the training file")
      ->capture_default_str();
  app.add_option("--test-size", options.sizes.test, "Test examples used, 0 for the whole test file")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    const int code = app.exit(error);
    return code == 0 ? 0 : 2;
  }

  // Translate the options into the protocol's parameters.
  if (options.quick) apply_quick_profile(app, params, options);
  params.optimizer.kind = options.optimizer == "sgd" ? fashion_mnist::OptimizerKind::sgd
                                                     : fashion_mnist::OptimizerKind::adam;
  params.settings.clear();
  for (const std::string& setting : options.settings) {
    params.settings.push_back(setting == "A" ? fashion_mnist::Setting::shared_start
                                             : fashion_mnist::Setting::independent_seeds);
  }
  try {
    params.check();
  } catch (const std::invalid_argument& error) {
    std::cerr << "fashion_mnist: invalid option: " << error.what() << "\n";
    return 2;
  }

  const auto start = std::chrono::steady_clock::now();

  try {
    fashion_mnist::Splits data = fashion_mnist::load_splits(options.data_dir, options.sizes, options.split_seed);
    params.sizes.assign(1, static_cast<int>(data.train.features()));
    params.sizes.insert(params.sizes.end(), options.hidden.begin(), options.hidden.end());
    params.sizes.push_back(fashion_mnist::kClassCount);
    std::cerr << "loaded " << data.train.size() << " training, " << data.valid.size() << " validation and "
              << data.test.size() << " test examples (" << fashion_mnist::seconds_since(start) << " s)\n";

    int max_models = 0;
    for (int count : params.model_counts) max_models = std::max(max_models, count);
    std::vector<fashion_mnist::Method> methods = fashion_mnist::default_methods(max_models);

    // The row through safetensors files and the tool, when the tool exists.
    std::filesystem::path work_folder;
    if (!options.cki_splice.empty() && std::filesystem::exists(options.cki_splice)) {
      work_folder = make_work_folder();
      methods.push_back(fashion_mnist::cki_splice_tool_method(options.cki_splice, work_folder));
    } else if (!options.cki_splice.empty()) {
      std::cerr << "cki-splice not found at '" << options.cki_splice
                << "'; the row merged through safetensors files is left out (build the cki-splice target or "
                   "pass --cki-splice PATH)\n";
    }

    const std::vector<fashion_mnist::Block> blocks = fashion_mnist::run_protocol(methods, data, params, std::cerr);
    const double elapsed = fashion_mnist::seconds_since(start);
    if (!work_folder.empty()) std::filesystem::remove_all(work_folder);

    std::cout << "## Fashion-MNIST: merging N MLPs\n\n"
              << "MLP " << params.sizes.front();
    for (std::size_t l = 1; l < params.sizes.size(); ++l) std::cout << "-" << params.sizes[l];
    std::cout << ", " << data.train.size() << " training / " << data.valid.size() << " validation / "
              << data.test.size() << " test examples, " << params.repeats << " repeat(s)"
              << (params.repeats > 1 ? " (mean ± sample std)" : "") << ". Setting A: base "
              << params.base_epochs << " epoch(s) on all training data, then " << params.finetune_epochs
              << " epoch(s) per model on a class-skewed subset. Setting B: " << params.independent_epochs
              << " epoch(s) per model from its own seed. \"+" << params.extra_epochs
              << " ep\": every row fine-tuned that many epochs on all training data (the ensemble fine-tunes each "
                 "member). Δ: paired difference to the best single model, in percentage points. "
              << "Run time " << static_cast<int>(elapsed) << " s.\n\n";
    std::cout << fashion_mnist::markdown_tables(blocks, methods, params);
    std::cout << fashion_mnist::searched_rows_summary(blocks, methods);
    const bool tool_row_matches = check_tool_row(blocks, methods, std::cout);

    if (!options.json_path.empty()) {
      nlohmann::json json = fashion_mnist::results_to_json(blocks, methods, params);
      json["seconds"] = elapsed;
      json["split"] = {{"train", data.train.size()},
                       {"valid", data.valid.size()},
                       {"test", data.test.size()},
                       {"split_seed", options.split_seed}};
      std::ofstream file(options.json_path);
      file << json.dump(2) << "\n";
      if (!file) {
        std::cerr << "fashion_mnist: failed to write '" << options.json_path << "'\n";
        return 1;
      }
    }
    std::cerr << "done in " << elapsed << " s\n";
    if (!tool_row_matches) {
      std::cerr << "fashion_mnist: the merge through cki-splice differs from the in-process splice by more than "
                   "rounding (largest weight difference above 1e-5)\n";
      return 1;
    }
  } catch (const std::exception& error) {
    std::cerr << "fashion_mnist: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
