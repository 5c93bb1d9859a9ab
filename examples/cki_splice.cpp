// cki-splice: merge N safetensors checkpoints of one architecture into one
// with Compatibility-aware Knowledge Integration, a learned CKI merge or a
// baseline merge method, streaming tensor by tensor.
//
//   cki-splice [options] MODEL... -o OUT
//
// Exit status: 0 on success. 1 on a runtime failure: unreadable or malformed
// input, mismatched models, non-finite values, output values beyond their
// dtype, failed write. 2 on a usage error: unknown option, invalid option
// value, an option the chosen method does not take.
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <cstring>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cki/cki.hpp"
#include "cki/io/atomic_file.hpp"
#include "cki/io/sharded.hpp"
#include "cki/io/streaming.hpp"
#include "cki/io/streaming_methods.hpp"
#include "cki/learn/learn.hpp"

#ifndef CKI_VERSION
#define CKI_VERSION "unknown"
#endif

namespace {

namespace fs = std::filesystem;

constexpr int kExitSuccess = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

/// A usage error found after parsing (an option value out of range, say).
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The CKI methods with their help lines. The baseline methods come from
/// cki::merge_methods(); make_policy() builds both kinds.
const std::vector<std::pair<std::string, std::string>> kCkiMethods = {
    {"cki-soft", "CKI, soft splicing: the weighted sum of the models (the default)"},
    {"cki-hard", "CKI, hard splicing: each element from the model with the highest weight"},
};

/// Options that set CKI's parameters; only the CKI methods take them.
const std::vector<std::string> kCkiOptions = {"--rule", "--bins", "--a", "--c", "--scale", "--temperature"};

/// Options of the baseline methods and the parameter (JSON key of the
/// method's parameter struct) each sets. --fisher is handled on its own,
/// because it names files rather than setting a parameter.
const std::vector<std::pair<std::string, std::string>> kMethodOptions = {
    {"--weights", "weights"},     {"--lambda", "lambda"}, {"--density", "density"},
    {"--ties-scope", "scope"},    {"--drop-rate", "drop_rate"}, {"--seed", "seed"},
    {"--t", "t"},                 {"--fisher-floor", "floor"}, {"--threshold", "threshold"},
};

/// Every method name --method accepts.
std::vector<std::string> method_names() {
  std::vector<std::string> names;
  for (const auto& method : kCkiMethods) names.push_back(method.first);
  for (const auto& name : cki::merge_method_names()) names.push_back(name);
  return names;
}

bool is_cki_method(const std::string& method) { return method == "cki-soft" || method == "cki-hard"; }

/// Options as parsed from the command line.
struct ToolOptions {
  std::vector<std::string> models;
  std::string output;
  std::string method = "cki-soft";
  std::string rule = "softmax";
  std::size_t base = 0;
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  cki::CkiParams params;
  // Baseline method options; only those given reach `method_parameters`.
  std::vector<double> weights;
  double lambda = 1.0;
  double density = 0.2;
  std::string ties_scope = "tensor";
  double drop_rate = 0.5;
  std::uint64_t seed = 0;
  double t = 0.5;
  std::vector<std::string> fisher;
  double fisher_floor = 1e-6;
  double threshold = 0.02;
  /// Parameters of a baseline method as JSON, from the options given.
  nlohmann::json method_parameters = nlohmann::json::object();
  std::string assessment_maps;
  std::string nan_policy = "error";
  bool clamp = false;
  std::string out_dtype;
  std::string max_shard_size;
  int threads = 0;
  std::string report;
  bool dry_run = false;
  bool force = false;
  bool quiet = false;
  /// Names of the options given on the command line, such as "--a".
  std::set<std::string> given_options;

  bool was_given(const std::string& option) const { return given_options.count(option) != 0; }
};

cki::RuleKind parse_rule(const std::string& rule) {
  if (rule == "softmax") return cki::RuleKind::softmax;
  if (rule == "blend") return cki::RuleKind::blend;
  if (rule == "paired-softmax") return cki::RuleKind::paired_softmax;
  throw UsageError("unknown rule '" + rule + "'");
}

std::string join(const std::vector<std::string>& items, const std::string& separator = ", ") {
  std::string text;
  for (std::size_t i = 0; i < items.size(); ++i) text += (i == 0 ? "" : separator) + items[i];
  return text;
}

/// The options a method takes, as the tool spells them.
std::vector<std::string> options_of(const std::string& method) {
  if (is_cki_method(method)) return kCkiOptions;
  std::vector<std::string> options;
  for (const auto& info : cki::merge_methods()) {
    if (info.name != method) continue;
    for (const auto& [option, key] : kMethodOptions) {
      if (std::find(info.parameters.begin(), info.parameters.end(), key) != info.parameters.end()) {
        options.push_back(option);
      }
    }
  }
  if (method == "fisher") options.insert(options.begin(), "--fisher");
  return options;
}

/// Throws UsageError for `option`, given although `method` does not take it.
[[noreturn]] void reject_option(const std::string& option, const std::string& method) {
  const std::vector<std::string> accepted = options_of(method);
  throw UsageError(option + " does not apply to --method " + method + ", which takes " +
                   (accepted.empty() ? std::string("no method options") : join(accepted)));
}

/// Checks that every method option given applies to the chosen method, and
/// collects a baseline method's parameters as JSON. With --assessment-maps
/// the learned file sets the method, so only the CKI options and --method
/// may be given (and are checked against the file later). Throws UsageError.
void check_method_options(ToolOptions& options) {
  std::vector<std::string> method_specific = kCkiOptions;
  for (const auto& [option, key] : kMethodOptions) method_specific.push_back(option);
  method_specific.push_back("--fisher");

  if (!options.assessment_maps.empty()) {
    for (const auto& option : method_specific) {
      const bool cki_option = std::find(kCkiOptions.begin(), kCkiOptions.end(), option) != kCkiOptions.end();
      if (options.was_given(option) && !cki_option) {
        throw UsageError(option + " does not apply to --assessment-maps, which replays a learned CKI merge");
      }
    }
    return;
  }

  const std::vector<std::string> accepted = options_of(options.method);
  for (const auto& option : method_specific) {
    if (options.was_given(option) && std::find(accepted.begin(), accepted.end(), option) == accepted.end()) {
      reject_option(option, options.method);
    }
  }
  if (options.method == "fisher" && options.fisher.empty()) {
    throw UsageError("--method fisher needs --fisher F1,F2,...: one Fisher checkpoint per model, in input order");
  }

  nlohmann::json& parameters = options.method_parameters;
  if (options.was_given("--weights")) parameters["weights"] = options.weights;
  if (options.was_given("--lambda")) parameters["lambda"] = options.lambda;
  if (options.was_given("--density")) parameters["density"] = options.density;
  if (options.was_given("--ties-scope")) parameters["scope"] = options.ties_scope;
  if (options.was_given("--drop-rate")) parameters["drop_rate"] = options.drop_rate;
  if (options.was_given("--seed")) parameters["seed"] = options.seed;
  if (options.was_given("--t")) parameters["t"] = options.t;
  if (options.was_given("--fisher-floor")) parameters["floor"] = options.fisher_floor;
  if (options.was_given("--threshold")) parameters["threshold"] = options.threshold;
}

/// Rewrites the parameter names in a message of the merge methods, such as
/// "'drop_rate' must be in [0, 1)", to the tool's options: "--drop-rate".
std::string with_option_names(std::string message) {
  for (const auto& [option, key] : kMethodOptions) {
    message = std::regex_replace(message, std::regex("'" + key + "(\\[[0-9]+\\])?'"), option + "$1");
  }
  return message;
}

/// Checks the options that a learned-maps file fixes against the file:
/// each of --method, --rule, --bins, --a, --c, --scale, --temperature,
/// --base, --include and --exclude may be given only with the file's value.
/// Throws UsageError naming the option, the value given and the file's.
template <typename Scalar>
void check_against_maps(const ToolOptions& options, const cki::LearnedMaps<Scalar>& maps) {
  const std::string file = "the learned maps file '" + options.assessment_maps + "'";
  const auto conflict = [&](const std::string& option, const std::string& value, const std::string& stored) {
    throw UsageError(option + " " + value + " conflicts with " + file + ", which was learned with " + stored +
                     "; leave out " + option + " or give the file's value");
  };

  // Method and CKI parameters.
  const cki::CkiParams& learned = maps.options.params;
  const std::string method = maps.options.hard ? "cki-hard" : "cki-soft";
  const std::string rule = cki::rule_name(learned.rule);
  if (options.was_given("--method") && options.method != method) conflict("--method", options.method, method);
  if (options.was_given("--rule") && options.rule != rule) conflict("--rule", options.rule, rule);
  if (options.was_given("--bins") && options.params.bins != learned.bins) {
    conflict("--bins", std::to_string(options.params.bins), std::to_string(learned.bins));
  }
  const auto check_number = [&](const char* option, double value, double stored) {
    if (options.was_given(option) && value != stored) {
      conflict(option, nlohmann::json(value).dump(), nlohmann::json(stored).dump());
    }
  };
  check_number("--a", options.params.a, learned.a);
  check_number("--c", options.params.c, learned.c);
  check_number("--scale", options.params.scale, learned.scale);
  check_number("--temperature", options.params.temperature, learned.temperature);

  // Base and selection.
  if (options.was_given("--base") && options.base != maps.base) {
    conflict("--base", std::to_string(options.base), std::to_string(maps.base));
  }
  if (options.was_given("--include") && options.include != maps.include) {
    conflict("--include", nlohmann::json(options.include).dump(), nlohmann::json(maps.include).dump());
  }
  if (options.was_given("--exclude") && options.exclude != maps.exclude) {
    conflict("--exclude", nlohmann::json(options.exclude).dump(), nlohmann::json(maps.exclude).dump());
  }
}

/// Checks that every tensor with learned maps is one the merge splices, so
/// no learned map is silently left unused. Throws cki::MismatchError naming
/// the tensor and the files.
template <typename Scalar>
void check_learned_tensors(const cki::LearnedMaps<Scalar>& maps, const cki::StreamPlan& plan,
                           const std::vector<cki::Checkpoint>& inputs, const std::string& maps_path) {
  for (const auto& [name, tensor] : maps.tensors) {
    const auto planned = std::find_if(plan.tensors.begin(), plan.tensors.end(),
                                      [&](const cki::PlannedTensor& item) { return item.name == name; });
    if (planned == plan.tensors.end()) {
      throw cki::MismatchError("tensor '" + name + "' has learned maps in '" + maps_path +
                               "' but is missing from the base model '" + inputs[plan.base].path().string() + "'");
    }
    if (!planned->spliced) {
      throw cki::MismatchError("tensor '" + name + "' has learned maps in '" + maps_path +
                               "' but is not spliced: " + planned->copy_reason);
    }
  }
}

/// Everything the merge needs besides the models: the learned maps and the
/// Fisher checkpoints, when the options name them.
template <typename Scalar>
struct MethodInputs {
  std::optional<cki::LearnedMaps<Scalar>> maps;
  std::vector<cki::Checkpoint> fisher;
};

/// Returns the splicing policy of the options in the compute scalar
/// `Scalar`: learned CKI from the maps, CKI, or a baseline method from the
/// registry. Runs the whole-model TIES prepass over the inputs for
/// --ties-scope model, except in a dry run, where the TIES parameters are
/// only checked. Throws UsageError for invalid method parameters, and what
/// the prepass and the Fisher checks throw.
template <typename Scalar>
cki::AnyPolicy<Scalar> make_policy(const ToolOptions& options, MethodInputs<Scalar>& method_inputs,
                                   const std::vector<cki::Checkpoint>& inputs, const cki::StreamOptions& stream,
                                   const cki::StreamPlan& plan) {
  if (method_inputs.maps) {
    check_learned_tensors(*method_inputs.maps, plan, inputs, options.assessment_maps);
    return cki::make_learned_policy(*method_inputs.maps);
  }
  if (options.method == "cki-soft") return cki::CkiSoft<Scalar>(options.params);
  if (options.method == "cki-hard") return cki::CkiHard<Scalar>(options.params);

  cki::MergeResources<Scalar> resources;
  const nlohmann::json& parameters = options.method_parameters;
  try {
    if (options.method == "fisher") {
      cki::check_fisher_checkpoints(plan, method_inputs.fisher);
      resources.fisher = cki::fisher_from_checkpoints<Scalar>(std::move(method_inputs.fisher));
    }
    if (cki::needs_ties_prepass(options.method, parameters)) {
      // Check the parameters against the model count before the prepass
      // reads the models; the per-tensor policy needs no thresholds for that.
      nlohmann::json per_tensor = parameters;
      per_tensor["scope"] = "tensor";
      cki::AnyPolicy<Scalar> checked = cki::make_merge_policy<Scalar>(options.method, per_tensor, resources);
      checked.check(inputs.size());
      if (options.dry_run) return checked;

      const double density = cki::TiesParams::from_json(parameters).density;
      resources.ties_thresholds = cki::stream_ties_thresholds<Scalar>(inputs, density, stream);
    }
    return cki::make_merge_policy<Scalar>(options.method, parameters, resources);
  } catch (const std::invalid_argument& error) {
    throw UsageError(with_option_names(error.what()));
  }
}

/// Parses a byte count such as "500M": an integer with an optional suffix,
/// K, M, G, T or KiB, MiB, GiB, TiB for powers of 1024 and KB, MB, GB, TB for
/// powers of 1000 (case-insensitive). Throws UsageError.
std::uint64_t parse_byte_size(const std::string& text) {
  std::size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  if (digits == 0) {
    throw UsageError("--max-shard-size: '" + text + "' is not a byte count; expected, e.g., 2000000, 500M or 5GB");
  }
  std::string suffix = text.substr(digits);
  for (char& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));

  std::uint64_t unit = 1;
  const char* prefixes = "KMGT";
  if (!suffix.empty() && suffix != "B") {
    const char* found = std::strchr(prefixes, suffix[0]);
    const std::string rest = suffix.substr(1);
    if (found == nullptr || !(rest.empty() || rest == "IB" || rest == "B")) {
      throw UsageError("--max-shard-size: unknown unit '" + text.substr(digits) +
                       "'; use K, M, G, T (powers of 1024) or KB, MB, GB, TB (powers of 1000)");
    }
    const std::uint64_t base = rest == "B" ? 1000 : 1024;
    for (const char* p = prefixes; p <= found; ++p) unit *= base;
  }

  const std::string number = text.substr(0, digits);
  std::uint64_t value = 0;
  try {
    value = std::stoull(number);
  } catch (const std::out_of_range&) {
    throw UsageError("--max-shard-size: '" + text + "' is too large");
  }
  if (value > UINT64_MAX / unit) throw UsageError("--max-shard-size: '" + text + "' is too large");
  if (value == 0) throw UsageError("--max-shard-size must be positive, got '" + text + "'");
  return value * unit;
}

/// Formats a byte count for people: "12.3 MiB".
std::string human_bytes(std::uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.1f %s", value, units[unit]);
  return text;
}

std::string join_dtypes(const std::vector<cki::DType>& dtypes) {
  std::string text;
  for (std::size_t k = 0; k < dtypes.size(); ++k) text += (k == 0 ? "" : ",") + std::string(cki::dtype_name(dtypes[k]));
  return text;
}

/// Prints the plan of a merge to stdout.
template <typename Scalar>
void print_plan(const cki::StreamPlan& plan, const std::vector<cki::Checkpoint>& inputs, const ToolOptions& options,
                const cki::AnyPolicy<Scalar>& policy, const char* scalar_name) {
  nlohmann::json parameters = policy.parameters();
  if (cki::needs_ties_prepass(options.method, options.method_parameters)) parameters["scope"] = "model";
  std::cout << "method: " << policy.name() << " " << parameters.dump() << ", compute scalar " << scalar_name
            << ", nan policy " << options.nan_policy << (options.clamp ? ", clamp" : "") << "\n";
  if (!options.assessment_maps.empty()) std::cout << "learned maps: " << options.assessment_maps << "\n";
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    std::cout << "model " << k + 1 << (k == plan.base ? " (base)" : "") << ": " << inputs[k].path().string() << " ("
              << inputs[k].tensors().size() << " tensors, " << human_bytes(inputs[k].data_bytes()) << ")\n";
  }
  std::cout << "output: " << options.output
            << (cki::is_file_output(options.output) ? " (file)" : " (folder)") << "\n\n";

  std::cout << "tensor\tshape\tinput dtypes\toutput dtype\tbytes\taction\n";
  for (const auto& tensor : plan.tensors) {
    std::cout << tensor.name << "\t" << cki::shape_to_string(tensor.shape) << "\t" << join_dtypes(tensor.input_dtypes)
              << "\t" << cki::dtype_name(tensor.out_dtype) << "\t" << tensor.out_bytes << "\t"
              << (tensor.spliced ? std::string("spliced") : "copied (" + tensor.copy_reason + ")") << "\n";
  }

  std::cout << "\ntensors: " << plan.spliced_count() << " spliced, " << plan.tensors.size() - plan.spliced_count()
            << " copied\n";
  std::cout << "output size: " << plan.output_bytes << " bytes (" << human_bytes(plan.output_bytes) << ")\n";
  std::cout << "peak memory estimate: " << plan.peak_memory_estimate() << " bytes ("
            << human_bytes(plan.peak_memory_estimate()) << "), " << plan.model_count + 1
            << " buffers of the largest spliced tensor (" << plan.largest_spliced << " elements)\n";
  if (options.method == "fisher") {
    std::cout << "fisher: " << plan.model_count << " more buffers of that size for the Fisher tensors\n";
  }
  if (cki::needs_ties_prepass(options.method, options.method_parameters)) {
    std::cout << "ties scope model: a prepass reads every spliced tensor of every model up to "
              << (sizeof(Scalar) == 4 ? "3" : "5") << " times before the merge\n";
  }
  if (!plan.extra_files.empty() && !cki::is_file_output(options.output)) {
    std::cout << "files copied beside the weights:";
    for (const auto& file : plan.extra_files) std::cout << " " << file.filename().string();
    std::cout << "\n";
  }
}

/// Progress on stderr, one line rewritten in place: tensor i of n, bytes
/// written, rate.
class ProgressLine {
 public:
  void operator()(const cki::StreamProgress& step) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double rate = seconds > 0 ? static_cast<double>(step.bytes_done) / seconds : 0.0;
    std::fprintf(stderr, "\r\033[K[%zu/%zu] %s of %s, %s/s  %s", step.tensor, step.tensor_count,
                 human_bytes(step.bytes_done).c_str(), human_bytes(step.bytes_total).c_str(),
                 human_bytes(static_cast<std::uint64_t>(rate)).c_str(), step.name.c_str());
    if (step.tensor == step.tensor_count) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

/// True when any floating tensor of any checkpoint is stored as F64, so the
/// merge computes in double to keep its precision.
bool needs_double(const std::vector<cki::Checkpoint>& inputs) {
  for (const auto& input : inputs) {
    for (const auto& tensor : input.tensors()) {
      if (tensor.dtype() == cki::DType::F64) return true;
    }
  }
  return false;
}

/// Help text listing every method with its one-line summary.
std::string methods_help() {
  std::vector<std::pair<std::string, std::string>> methods = kCkiMethods;
  for (const auto& info : cki::merge_methods()) methods.emplace_back(info.name, info.summary);
  std::string text = "Methods (--method NAME), with the options each takes:\n";
  for (const auto& [name, summary] : methods) {
    const std::vector<std::string> accepted = options_of(name);
    text += "  " + name + std::string(name.size() < 17 ? 17 - name.size() : 1, ' ') + summary;
    text += accepted.empty() ? "\n" : "; " + join(accepted, " ") + "\n";
  }
  text += "  --assessment-maps FILE replays a learned CKI merge instead of --method.";
  return text;
}

/// True when a learned-maps file stores its maps as F64, because they were
/// learned in double; the replay then computes in double too. Learned
/// temperatures are rank-0 F64 tensors whatever the scalar, so they do not count.
bool maps_need_double(const std::string& path) {
  const cki::Checkpoint maps(path);
  for (const auto& tensor : maps.tensors()) {
    if (tensor.dtype() == cki::DType::F64 && !tensor.shape().empty()) return true;
  }
  return false;
}

/// Writes the report JSON atomically. Throws cki::IoError.
void write_report(const cki::SpliceReport& report, const ToolOptions& options) {
  const std::string text = report.to_json().dump(2) + "\n";
  cki::AtomicFile file(options.report, options.force);
  file.write(text.data(), text.size());
  file.commit();
}

/// Prints a warning on stderr for each tensor that the merge was to splice
/// but copied from the base under NaN policy copy-base, with the reason.
/// Under allow the report alone lists them, because models hold such
/// values on purpose (attention masks).
void warn_copied_tensors(const cki::StreamPlan& plan, const cki::SpliceReport& report, cki::NanPolicy nan_policy) {
  if (nan_policy != cki::NanPolicy::copy_base) return;
  for (std::size_t i = 0; i < plan.tensors.size() && i < report.tensors.size(); ++i) {
    if (plan.tensors[i].spliced && !report.tensors[i].spliced) {
      std::cerr << "cki-splice: warning: tensor '" << report.tensors[i].name << "': " << report.tensors[i].copy_reason
                << "\n";
    }
  }
}

/// Plans, checks and runs the merge in the compute scalar `Scalar`.
template <typename Scalar>
int run(const std::vector<cki::Checkpoint>& inputs, std::vector<cki::Checkpoint> fisher, const ToolOptions& options,
        cki::StreamOptions stream, const char* scalar_name) {
  // A learned merge takes its base and selection from the maps file.
  MethodInputs<Scalar> method_inputs;
  method_inputs.fisher = std::move(fisher);
  if (!options.assessment_maps.empty()) {
    method_inputs.maps = cki::load_learned_maps<Scalar>(options.assessment_maps);
    check_against_maps(options, *method_inputs.maps);
    const cki::NanPolicy nan_policy = stream.splice.nan_policy;
    stream.splice = method_inputs.maps->splice_options(options.threads);
    stream.splice.nan_policy = nan_policy;
  }

  const cki::StreamPlan plan = cki::plan_stream<Scalar>(inputs, stream);

  // Outputs: never an input, never an existing path without --force.
  std::vector<fs::path> protected_paths;
  for (const auto& input : inputs) {
    protected_paths.push_back(input.path());
    for (const auto& path : input.file_paths()) protected_paths.push_back(path);
  }
  cki::check_not_input(options.output, protected_paths);
  if (!options.force && cki::detail::path_exists(options.output)) {
    throw cki::IoError("output '" + options.output + "' already exists; pass --force to replace it");
  }
  if (!options.report.empty()) {
    cki::check_not_input(options.report, protected_paths);
    if (!options.force && cki::detail::path_exists(options.report)) {
      throw cki::IoError("report '" + options.report + "' already exists; pass --force to replace it");
    }
  }

  // Free space before a policy's prepass reads the inputs, so a full disk
  // fails in seconds (a dry run included).
  cki::check_free_space(options.output, cki::planned_output_size(plan));

  const cki::AnyPolicy<Scalar> policy = make_policy<Scalar>(options, method_inputs, inputs, stream, plan);
  try {
    policy.check(inputs.size());
  } catch (const std::invalid_argument& error) {
    throw UsageError(with_option_names(error.what()));
  }

  if (options.dry_run) {
    print_plan(plan, inputs, options, policy, scalar_name);
    return kExitSuccess;
  }

  cki::StreamOptions run_options = stream;
  if (!options.quiet && ::isatty(STDERR_FILENO)) run_options.on_progress = ProgressLine();
  const cki::SpliceReport report = cki::splice_checkpoints<Scalar>(inputs, options.output, policy, run_options);
  warn_copied_tensors(plan, report, stream.splice.nan_policy);
  if (!options.report.empty()) write_report(report, options);

  if (!options.quiet) {
    std::uint64_t clamped = 0;
    for (const auto& tensor : report.tensors) clamped += tensor.clamped;
    std::cout << "merged " << inputs.size() << " models with " << report.method << " into " << options.output
              << ": " << report.spliced_count() << " tensors spliced, "
              << report.tensors.size() - report.spliced_count() << " copied, " << human_bytes(plan.output_bytes);
    if (clamped > 0) std::cout << ", " << clamped << " values clamped to their output dtype";
    std::cout << "\n";
  }
  return kExitSuccess;
}

/// Checks option values CLI11 cannot check alone and builds the stream options.
/// Throws UsageError or std::invalid_argument.
cki::StreamOptions stream_options(ToolOptions& options) {
  check_method_options(options);
  options.params.rule = parse_rule(options.rule);
  options.params.check();
  if (options.base >= options.models.size()) {
    throw UsageError("--base must be in [0, " + std::to_string(options.models.size()) + ") for " +
                     std::to_string(options.models.size()) + " models, got " + std::to_string(options.base));
  }

  cki::StreamOptions stream;
  stream.splice.base = options.base;
  stream.splice.include = options.include;
  stream.splice.exclude = options.exclude;
  stream.splice.threads = options.threads;
  stream.splice.nan_policy = *cki::parse_nan_policy(options.nan_policy);
  stream.write.overwrite = options.force;
  stream.write.clamp = options.clamp;
  if (!options.out_dtype.empty()) stream.write.out_dtype = cki::parse_dtype(options.out_dtype);
  if (!options.max_shard_size.empty()) {
    stream.write.max_shard_size = parse_byte_size(options.max_shard_size);
    if (cki::is_file_output(options.output)) {
      throw UsageError("--max-shard-size needs a folder output, but '" + options.output +
                       "' ends in .safetensors; give a folder path");
    }
  }
  return stream;
}

}  // namespace

int main(int argc, char** argv) {
  ToolOptions options;
  CLI::App app{"Merge N safetensors checkpoints of one architecture into one with Compatibility-aware "
               "Knowledge Integration (CKI), a learned CKI merge or a baseline merge method. Tensors are read, "
               "spliced and written one at a time, so memory stays near (N + 1) times the largest tensor.",
               "cki-splice"};
  app.set_version_flag("--version", std::string("cki-splice ") + CKI_VERSION);
  app.footer(methods_help());

  app.add_option("models", options.models,
                 "Input checkpoints: .safetensors files or checkpoint folders (model.safetensors or a "
                 "sharded model.safetensors.index.json)")
      ->required();
  app.add_option("-o,--output", options.output,
                 "Output: a path ending in .safetensors writes one file; any other path writes a checkpoint "
                 "folder, with the base's config and tokenizer files when the base is a folder")
      ->required();
  app.add_option("--method", options.method, "Merge method; the list follows the options")
      ->check(CLI::IsMember(method_names()))
      ->capture_default_str();
  app.add_option("--assessment-maps", options.assessment_maps,
                 "Replay a learned CKI merge from this maps file (written by cki::save_learned_maps) instead of "
                 "--method; base, selection and CKI parameters come from the file, and the same options may "
                 "be given only with the file's values");
  app.add_option("--rule", options.rule, "Combination rule; blend and paired-softmax take exactly 2 models")
      ->check(CLI::IsMember({"softmax", "blend", "paired-softmax"}))
      ->capture_default_str();
  app.add_option("--base", options.base,
                 "Index of the base model (0-based, input order): ties in hard splicing and tensors that are "
                 "not spliced come from it, and the output keeps its dtypes and metadata")
      ->capture_default_str();
  app.add_option("--include", options.include,
                 "Splice only tensors whose name matches this glob (*, ?, [...]); repeatable. Others are "
                 "copied from the base")
      ->allow_extra_args(false);
  app.add_option("--exclude", options.exclude,
                 "Copy tensors whose name matches this glob from the base instead of splicing; repeatable")
      ->allow_extra_args(false);
  app.add_option("--bins", options.params.bins, "Histogram bins of the information content, in [1, 1000000]")
      ->capture_default_str();
  app.add_option("--a", options.params.a, "Amplitude a of the global weight, in (0, 1)")->capture_default_str();
  app.add_option("--c", options.params.c, "Steepness c of the global weight, per nat, in (0, 1e12]")
      ->capture_default_str();
  app.add_option("--scale", options.params.scale, "Scale s of the local uncertainty's logistic, in (0, 1e6]")
      ->capture_default_str();
  app.add_option("--temperature", options.params.temperature, "Softmax temperature, in (0, 1e6]")
      ->capture_default_str();
  app.add_option("--weights", options.weights,
                 "Per-model weights, comma-separated, one per model in input order, each finite; the base's "
                 "entry is ignored by methods built on deltas. Default: 1 for every model")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_option("--lambda", options.lambda, "Scale of the merged delta (task-arithmetic, ties, dare, dare-ties)")
      ->capture_default_str();
  app.add_option("--density", options.density, "Share of each delta's entries that TIES keeps, in [0, 1]")
      ->capture_default_str();
  app.add_option("--ties-scope", options.ties_scope,
                 "Rank the TIES trim within each tensor, or over the whole model (a streamed prepass reads the "
                 "models up to 3 more times, 5 when computing in double)")
      ->check(CLI::IsMember({"tensor", "model"}))
      ->capture_default_str();
  app.add_option("--drop-rate", options.drop_rate,
                 "Probability that DARE drops a delta entry, in [0, 1); kept entries are scaled by 1/(1 - p)")
      ->capture_default_str();
  app.add_option("--seed", options.seed, "Seed of DARE's drops, an integer in [0, 2^64)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--t", options.t, "SLERP position in [0, 1]: 0 returns the base, 1 the other model")
      ->capture_default_str();
  app.add_option("--fisher", options.fisher,
                 "Diagonal Fisher checkpoints for --method fisher, comma-separated, one per model in input "
                 "order, each holding the spliced tensors under the models' names and shapes")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_option("--fisher-floor", options.fisher_floor, "Lower bound on every Fisher value, finite and > 0")
      ->capture_default_str();
  app.add_option("--threshold", options.threshold,
                 "Magnitude at or below which prune sets an element of the base to 0, finite and >= 0")
      ->capture_default_str();
  app.add_option("--nan-policy", options.nan_policy,
                 "Tensors with NaN or infinity: error stops the merge; copy-base copies the tensor from the base "
                 "with a warning (an error when the base holds the value); allow copies it from the base as it "
                 "is, listed in the report")
      ->check(CLI::IsMember({"error", "copy-base", "allow"}))
      ->capture_default_str();
  app.add_flag("--clamp", options.clamp,
               "Write output values beyond the output dtype's range (above 65504 in F16, say) as its largest "
               "finite value, counted in the report; without it they are an error");
  app.add_option("--out-dtype", options.out_dtype,
                 "Storage dtype of every floating output tensor; default: each tensor keeps the base's dtype")
      ->check(CLI::IsMember({"F16", "BF16", "F32", "F64"}));
  app.add_option("--max-shard-size", options.max_shard_size,
                 "Shard a folder output into files of at most this many bytes of tensors; K, M, G, T are powers "
                 "of 1024 and KB, MB, GB, TB powers of 1000 (e.g. 5GB)");
  app.add_option("--threads", options.threads, "Threads for element loops; 0 uses all cores")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--report", options.report,
                 "Write the merge report as JSON to this file: per tensor the entropy, global weight and mean "
                 "weight of each model, or why it was copied");
  app.add_flag("--dry-run", options.dry_run,
               "Print the plan (tensors spliced and copied, dtypes, bytes, peak memory estimate) and write nothing");
  app.add_flag("--force", options.force, "Replace an existing output and report");
  app.add_flag("-q,--quiet", options.quiet, "Print no progress and no summary");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    const int status = app.exit(error);
    return status == 0 ? kExitSuccess : kExitUsage;
  }

  for (const CLI::Option* option : app.get_options()) {
    if (option->count() > 0) options.given_options.insert(option->get_name());
  }

  try {
    const cki::StreamOptions stream = stream_options(options);
    std::vector<cki::Checkpoint> inputs;
    for (const auto& model : options.models) inputs.emplace_back(model);
    std::vector<cki::Checkpoint> fisher;
    for (const auto& path : options.fisher) fisher.emplace_back(path);

    // Double when any model, Fisher checkpoint or learned map is stored as F64.
    const bool in_double = needs_double(inputs) || needs_double(fisher) ||
                           (!options.assessment_maps.empty() && maps_need_double(options.assessment_maps));
    if (in_double) return run<double>(inputs, std::move(fisher), options, stream, "double");
    return run<float>(inputs, std::move(fisher), options, stream, "float");
  } catch (const UsageError& error) {
    std::cerr << "cki-splice: error: " << error.what() << "\nRun with --help for more information.\n";
    return kExitUsage;
  } catch (const std::invalid_argument& error) {
    std::cerr << "cki-splice: error: " << error.what() << "\nRun with --help for more information.\n";
    return kExitUsage;
  } catch (const std::exception& error) {
    std::cerr << "cki-splice: error: " << error.what() << "\n";
    return kExitFailure;
  }
}
