// End-to-end tests of the cki-splice tool: its output equals splice(), a
// baseline method or a learned merge in memory, and its exit status,
// messages and numeric checks follow the documented rules.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "cki/cki.hpp"
#include "cki/io/sharded.hpp"
#include "cki/io/streaming.hpp"
#include "cki/learn/learn.hpp"
#include "io_test_support.hpp"

using Catch::Matchers::Contains;
using cki::DType;
using namespace cki_test;

namespace {

struct ToolRun {
  int status = -1;
  std::string out;
  std::string err;
};

#if defined(CKI_SPLICE_TOOL)
constexpr const char* kTool = CKI_SPLICE_TOOL;
#else
constexpr const char* kTool = nullptr;
#endif

/// Runs cki-splice with `arguments` (already quoted) and captures its output.
ToolRun run_tool(const TempDir& dir, const std::string& arguments) {
  const auto out = dir / "tool.stdout";
  const auto err = dir / "tool.stderr";
  ToolRun run;
  run.status = run_command(shell_quote(kTool) + " " + arguments + " > " + shell_quote(out.string()) + " 2> " +
                           shell_quote(err.string()));
  run.out = read_file(out);
  run.err = read_file(err);
  return run;
}

std::string quoted(const fs::path& path) { return shell_quote(path.string()); }

const std::vector<std::pair<std::string, cki::Shape>> kLayers = {
    {"embed.weight", {12, 6}}, {"layer.0.weight", {6, 6}}, {"layer.0.bias", {6}}, {"head.weight", {3, 6}},
};

cki::WeightSet<float> model(unsigned seed, DType dtype) {
  auto set = random_set<float>(seed, kLayers, dtype);
  set.add_raw("step", DType::I64, {}, {7, 0, 0, 0, 0, 0, 0, 0});
  set.metadata()["seed"] = std::to_string(seed);
  return set;
}

/// Splices the checkpoints in memory and writes the result, for comparison.
template <typename Policy>
cki::SpliceReport splice_in_memory(const std::vector<fs::path>& paths, const Policy& policy,
                                   const cki::SpliceOptions& options, const fs::path& output,
                                   const cki::WriteOptions& write = {}) {
  std::vector<cki::WeightSet<float>> sets;
  for (const auto& path : paths) sets.push_back(cki::load_checkpoint<float>(path));
  const auto result = cki::splice(sets, policy, options);
  cki::save_checkpoint(result.merged, output, write);
  return result.report;
}

#define SKIP_WITHOUT_TOOL()                                                            \
  if (kTool == nullptr) {                                                              \
    WARN("skipped: cki-splice is not built (configure with CKI_BUILD_EXAMPLES=ON)");   \
    return;                                                                            \
  }

}  // namespace

TEST_CASE("cki-splice on two files equals splice()", "[io][tool]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  cki::save_checkpoint(model(1, DType::F32), a);
  cki::save_checkpoint(model(2, DType::BF16), b);
  const auto out = dir / "merged.safetensors";
  const auto report_path = dir / "report.json";

  const ToolRun run = run_tool(dir, quoted(a) + " " + quoted(b) + " -o " + quoted(out) + " --report " + quoted(report_path));
  INFO(run.err);
  REQUIRE(run.status == 0);
  CHECK_THAT(run.out, Contains("merged 2 models with cki-soft"));
  CHECK(run.err.empty());  // no progress when stderr is not a terminal

  const auto expected_path = dir / "expected.safetensors";
  const auto expected_report = splice_in_memory({a, b}, cki::CkiSoft<float>(cki::CkiParams{}), {}, expected_path);
  require_same_tensors(cki::load_checkpoint<float>(out), cki::load_checkpoint<float>(expected_path));
  CHECK(nlohmann::json::parse(read_file(report_path)) == expected_report.to_json());

  const auto merged = cki::load_checkpoint<float>(out);
  CHECK(merged.metadata().at("seed") == "1");
  CHECK(merged.metadata().at("cki_method") == "cki-soft");
  CHECK(merged.at("embed.weight").dtype == DType::F32);

  SECTION("an existing output needs --force") {
    const ToolRun again = run_tool(dir, quoted(a) + " " + quoted(b) + " -o " + quoted(out));
    CHECK(again.status == 1);
    CHECK_THAT(again.err, Contains("output '" + out.string() + "' already exists; pass --force"));
    const ToolRun forced = run_tool(dir, quoted(a) + " " + quoted(b) + " -o " + quoted(out) + " --force -q");
    CHECK(forced.status == 0);
    CHECK(forced.out.empty());
  }
  SECTION("an input is never the output, even with --force") {
    const ToolRun run_over = run_tool(dir, quoted(a) + " " + quoted(b) + " -o " + quoted(b) + " --force");
    CHECK(run_over.status == 1);
    CHECK_THAT(run_over.err, Contains("is the input '" + b.string() + "'"));
    CHECK(cki::load_checkpoint<float>(b).at("embed.weight").dtype == DType::BF16);
  }
  SECTION("--dry-run prints the plan and writes nothing") {
    const auto planned = dir / "planned.safetensors";
    const ToolRun dry = run_tool(dir, quoted(a) + " " + quoted(b) + " -o " + quoted(planned) + " --dry-run --exclude 'head.*'");
    INFO(dry.err);
    CHECK(dry.status == 0);
    CHECK_THAT(dry.out, Contains("embed.weight\t[12, 6]\tF32,BF16\tF32\t288\tspliced"));
    CHECK_THAT(dry.out, Contains("head.weight\t[3, 6]\tF32,BF16\tF32\t72\tcopied (excluded by pattern 'head.*')"));
    CHECK_THAT(dry.out, Contains("step\t[]\tI64,I64\tI64\t8\tcopied (dtype I64 is not spliced)"));
    CHECK_THAT(dry.out, Contains("tensors: 3 spliced, 2 copied"));
    CHECK_THAT(dry.out, Contains("peak memory estimate"));
    CHECK_FALSE(fs::exists(planned));
  }
}

TEST_CASE("cki-splice on three folders equals splice()", "[io][tool]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  std::vector<fs::path> inputs;
  for (unsigned k = 0; k < 3; ++k) {
    const auto folder = dir / ("model" + std::to_string(k));
    cki::WriteOptions options;
    options.max_shard_size = k == 0 ? 200 : 0;  // the first model is sharded
    cki::save_checkpoint(model(10 + k, k == 2 ? DType::F16 : DType::F32), folder, options);
    write_file(folder / "config.json", "{\"hidden_size\": 6, \"model\": " + std::to_string(k) + "}");
    write_file(folder / "tokenizer.json", "{}");
    inputs.push_back(folder);
  }
  const auto out = dir / "merged";

  const ToolRun run = run_tool(dir, quoted(inputs[0]) + " " + quoted(inputs[1]) + " " + quoted(inputs[2]) + " -o " +
                                        quoted(out) +
                                        " --method cki-hard --base 1 --a 0.3 --c 100 --bins 7 --exclude '*.bias' "
                                        "--out-dtype BF16 --max-shard-size 100 --threads 2");
  INFO(run.err);
  REQUIRE(run.status == 0);

  cki::CkiParams params;
  params.a = 0.3;
  params.c = 100;
  params.bins = 7;
  cki::SpliceOptions splice_options;
  splice_options.base = 1;
  splice_options.exclude = {"*.bias"};
  cki::WriteOptions write;
  write.out_dtype = DType::BF16;
  const auto expected_path = dir / "expected.safetensors";
  splice_in_memory(inputs, cki::CkiHard<float>(params), splice_options, expected_path, write);
  require_same_tensors(cki::load_checkpoint<float>(out), cki::load_checkpoint<float>(expected_path));

  // A sharded folder that loads as a model: the base's config and tokenizer.
  const auto index = nlohmann::json::parse(read_file(out / "model.safetensors.index.json"));
  std::set<std::string> shards;
  for (const auto& item : index["weight_map"].items()) shards.insert(item.value().get<std::string>());
  CHECK(shards.size() == 4);  // 100-byte shards: [step], [embed], [head, bias], [layer.0.weight]
  CHECK(shards.count(cki::shard_file_name(3, 4)) == 1);
  CHECK(read_file(out / "config.json") == "{\"hidden_size\": 6, \"model\": 1}");
  CHECK(fs::exists(out / "tokenizer.json"));
  const auto merged = cki::load_checkpoint<float>(out);
  CHECK(merged.metadata().at("seed") == "11");
  CHECK(nlohmann::json::parse(merged.metadata().at("cki_parameters"))["bins"] == 7);
}

TEST_CASE("cki-splice exit status and messages", "[io][tool]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  const auto c = dir / "c.safetensors";
  cki::save_checkpoint(model(1, DType::F32), a);
  cki::save_checkpoint(model(2, DType::F32), b);
  cki::save_checkpoint(model(3, DType::F32), c);
  const std::string two = quoted(a) + " " + quoted(b);
  const auto out = dir / "out.safetensors";

  SECTION("usage errors exit with 2") {
    struct UsageCase {
      std::string arguments;
      std::string expected;
    };
    const std::vector<UsageCase> cases = {
        {two, "--output is required"},
        {two + " -o x.safetensors --no-such-option", "--no-such-option"},
        {two + " -o x.safetensors --method nope", "nope not in {cki-soft,cki-hard,average,"},
        {two + " -o x.safetensors --base 2", "--base must be in [0, 2) for 2 models, got 2"},
        {two + " -o x.safetensors --a 1.5", "'a'"},
        {two + " -o x.safetensors --threads -1", "--threads"},
        {two + " " + quoted(c) + " -o x.safetensors --rule blend", "blend"},
        {two + " -o folder --max-shard-size 10X", "unknown unit 'X'"},
        {two + " -o x.safetensors --max-shard-size 10M", "needs a folder output"},
        {two + " -o x.safetensors --out-dtype I8", "I8 not in"},
    };
    for (const auto& item : cases) {
      INFO("arguments: " << item.arguments);
      const ToolRun run = run_tool(dir, item.arguments);
      CHECK(run.status == 2);
      CHECK_THAT(run.err, Contains(item.expected));
    }
    CHECK_FALSE(fs::exists(dir / "x.safetensors"));
  }
  SECTION("runtime failures exit with 1 and name the file") {
    const auto broken = dir / "broken.safetensors";
    write_file(broken, safetensors_bytes("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "1234"));
    ToolRun run = run_tool(dir, quoted(a) + " " + quoted(broken) + " -o " + quoted(out));
    CHECK(run.status == 1);
    CHECK_THAT(run.err, Contains("cki-splice: error: '" + broken.string() + "'"));
    CHECK_THAT(run.err, Contains("truncated"));

    run = run_tool(dir, quoted(a) + " " + quoted(dir / "missing.safetensors") + " -o " + quoted(out));
    CHECK(run.status == 1);
    CHECK_THAT(run.err, Contains("missing.safetensors' does not exist"));

    auto other = random_set<float>(5, {{"embed.weight", {12, 6}}});
    cki::save_checkpoint(other, dir / "other.safetensors");
    run = run_tool(dir, quoted(a) + " " + quoted(dir / "other.safetensors") + " -o " + quoted(out));
    CHECK(run.status == 1);
    CHECK_THAT(run.err, Contains("tensor 'step' of model 1 ('" + a.string() + "')"));
    CHECK_THAT(run.err, Contains("is missing from model 2 ('" + (dir / "other.safetensors").string() + "')"));
    CHECK_FALSE(fs::exists(out));
  }
  SECTION("--version and --help exit with 0") {
    ToolRun run = run_tool(dir, "--version");
    CHECK(run.status == 0);
    CHECK_THAT(run.out, Contains("cki-splice"));
    run = run_tool(dir, "--help");
    CHECK(run.status == 0);
    CHECK_THAT(run.out, Contains("--max-shard-size"));
    for (const auto& method : cki::merge_methods()) {
      INFO("method " << method.name);
      CHECK_THAT(run.out, Contains("  " + method.name + " ") && Contains(method.summary));
    }
  }
}

namespace {

/// Copy of `set` with element `index` of tensor `name` set to `value`.
cki::WeightSet<float> with_value(const cki::WeightSet<float>& set, const std::string& name, std::int64_t index,
                                 float value) {
  cki::WeightSet<float> out;
  out.metadata() = set.metadata();
  for (const auto& entry : set) {
    if (entry.name != name) {
      out.insert(entry);
      continue;
    }
    cki::Tensor<float> values = cki::Tensor<float>::copy_of(set.view(name));
    values[index] = value;
    out.add(name, std::move(values), entry.dtype);
  }
  return out;
}

/// Quotes each of `paths` for the shell and joins them with spaces.
std::string quoted_all(const std::vector<fs::path>& paths) {
  std::string text;
  for (const auto& path : paths) text += (text.empty() ? "" : " ") + quoted(path);
  return text;
}

/// Finds the entry of tensor `name` in a JSON report; fails the test when it is absent.
nlohmann::json report_entry(const nlohmann::json& report, const std::string& name) {
  for (const auto& tensor : report["tensors"]) {
    if (tensor["name"] == name) return tensor;
  }
  FAIL("tensor " << name << " is not in the report");
  return {};
}

}  // namespace

TEST_CASE("cki-splice baseline methods equal splice()", "[io][tool][merge]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  std::vector<fs::path> inputs;
  for (unsigned k = 0; k < 3; ++k) {
    inputs.push_back(dir / ("model" + std::to_string(k) + ".safetensors"));
    cki::save_checkpoint(model(20 + k, k == 2 ? DType::BF16 : DType::F32), inputs.back());
  }

  struct MethodCase {
    std::string method;
    std::string arguments;
    nlohmann::json parameters;
    std::size_t model_count;
  };
  const std::vector<MethodCase> cases = {
      {"average", "--weights 1,2,3", {{"weights", {1.0, 2.0, 3.0}}}, 3},
      {"task-arithmetic", "--weights 0,0.5,1.5 --lambda 0.8", {{"weights", {0.0, 0.5, 1.5}}, {"lambda", 0.8}}, 3},
      {"ties", "--density 0.3 --lambda 1.2 --ties-scope tensor", {{"density", 0.3}, {"lambda", 1.2}}, 3},
      {"dare", "--drop-rate 0.3 --seed 7", {{"drop_rate", 0.3}, {"seed", 7}}, 3},
      {"dare-ties", "--drop-rate 0.6 --seed 11 --weights 1,1,2",
       {{"drop_rate", 0.6}, {"seed", 11}, {"weights", {1.0, 1.0, 2.0}}}, 3},
      {"slerp", "--t 0.3", {{"t", 0.3}}, 2},
      {"model-stock", "", nlohmann::json::object(), 3},
      {"prune", "--threshold 0.5", {{"threshold", 0.5}}, 3},
  };
  for (const auto& item : cases) {
    INFO("method " << item.method << " " << item.arguments);
    const std::vector<fs::path> models(inputs.begin(), inputs.begin() + static_cast<std::ptrdiff_t>(item.model_count));
    const auto out = dir / (item.method + ".safetensors");
    const auto report_path = dir / (item.method + ".json");
    const ToolRun run = run_tool(dir, quoted_all(models) + " -o " + quoted(out) + " --method " + item.method + " " +
                                          item.arguments + " --base 1 --exclude '*.bias' --report " +
                                          quoted(report_path));
    INFO(run.err);
    REQUIRE(run.status == 0);
    CHECK_THAT(run.out, Contains("merged " + std::to_string(item.model_count) + " models with " + item.method));

    cki::SpliceOptions options;
    options.base = 1;
    options.exclude = {"*.bias"};
    const auto expected_path = dir / (item.method + "-expected.safetensors");
    const auto expected_report =
        splice_in_memory(models, cki::make_merge_policy<float>(item.method, item.parameters), options, expected_path);
    require_same_tensors(cki::load_checkpoint<float>(out), cki::load_checkpoint<float>(expected_path));
    CHECK(nlohmann::json::parse(read_file(report_path)) == expected_report.to_json());
    CHECK(cki::load_checkpoint<float>(out).metadata().at("cki_method") == item.method);
  }
}

TEST_CASE("cki-splice TIES with model scope", "[io][tool][merge]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  std::vector<fs::path> inputs;
  for (unsigned k = 0; k < 3; ++k) {
    inputs.push_back(dir / ("model" + std::to_string(k) + ".safetensors"));
    cki::save_checkpoint(model(40 + k, DType::F32), inputs.back());
  }
  const auto out = dir / "ties.safetensors";
  const std::string arguments = quoted_all(inputs) + " --method ties --ties-scope model --density 0.25 --base 2 "
                                                     "--exclude 'head.*' -o ";

  const ToolRun run = run_tool(dir, arguments + quoted(out));
  INFO(run.err);
  REQUIRE(run.status == 0);

  std::vector<cki::WeightSet<float>> sets;
  for (const auto& path : inputs) sets.push_back(cki::load_checkpoint<float>(path));
  cki::SpliceOptions options;
  options.base = 2;
  options.exclude = {"head.*"};
  cki::MergeResources<float> resources;
  resources.ties_thresholds = cki::ties_model_thresholds(sets, 0.25, options);
  const auto policy = cki::make_merge_policy<float>("ties", {{"density", 0.25}, {"scope", "model"}}, resources);
  const auto expected_path = dir / "expected.safetensors";
  splice_in_memory(inputs, policy, options, expected_path);
  require_same_tensors(cki::load_checkpoint<float>(out), cki::load_checkpoint<float>(expected_path));

  // Model scope ranks over the whole model, so it differs from tensor scope.
  const auto per_tensor = dir / "per-tensor.safetensors";
  splice_in_memory(inputs, cki::make_merge_policy<float>("ties", {{"density", 0.25}}), options, per_tensor);
  const auto merged = cki::load_checkpoint<float>(out);
  const auto tensor_scope = cki::load_checkpoint<float>(per_tensor);
  bool differs = false;
  for (const auto& entry : merged) {
    if (entry.spliceable()) differs = differs || !(entry.values.array() == tensor_scope.at(entry.name).values.array()).all();
  }
  CHECK(differs);

  const ToolRun dry = run_tool(dir, arguments + quoted(dir / "dry.safetensors") + " --dry-run");
  INFO(dry.err);
  CHECK(dry.status == 0);
  CHECK_THAT(dry.out, Contains("method: ties"));
  CHECK_THAT(dry.out, Contains("\"scope\":\"model\""));
  CHECK_THAT(dry.out, Contains("ties scope model: a prepass reads every spliced tensor"));
}

TEST_CASE("cki-splice Fisher merge reads Fisher checkpoints", "[io][tool][merge]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  std::vector<fs::path> inputs;
  std::vector<fs::path> fisher;
  std::vector<cki::WeightSet<float>> fisher_sets;
  for (unsigned k = 0; k < 3; ++k) {
    inputs.push_back(dir / ("model" + std::to_string(k) + ".safetensors"));
    cki::save_checkpoint(model(50 + k, DType::F32), inputs.back());

    // Fisher values are squared gradients, so non-negative.
    cki::WeightSet<float> values;
    for (const auto& entry : random_set<float>(60 + k, kLayers)) {
      values.add(entry.name, cki::Tensor<float>(entry.shape, entry.values.array().square()));
    }
    fisher.push_back(dir / ("fisher" + std::to_string(k) + ".safetensors"));
    cki::WriteOptions write;
    write.out_dtype = k == 1 ? DType::F16 : DType::F32;
    cki::save_checkpoint(values, fisher.back(), write);
    fisher_sets.push_back(cki::load_checkpoint<float>(fisher.back()));
  }
  const std::string fisher_list = fisher[0].string() + "," + fisher[1].string() + "," + fisher[2].string();
  const auto out = dir / "fisher.safetensors";

  const ToolRun run = run_tool(dir, quoted_all(inputs) + " -o " + quoted(out) + " --method fisher --fisher " +
                                        shell_quote(fisher_list) + " --fisher-floor 0.01 --weights 1,2,1");
  INFO(run.err);
  REQUIRE(run.status == 0);

  cki::MergeResources<float> resources;
  resources.fisher = cki::fisher_from_weight_sets(fisher_sets);
  const auto policy =
      cki::make_merge_policy<float>("fisher", {{"floor", 0.01}, {"weights", {1.0, 2.0, 1.0}}}, resources);
  const auto expected_path = dir / "expected.safetensors";
  splice_in_memory(inputs, policy, {}, expected_path);
  require_same_tensors(cki::load_checkpoint<float>(out), cki::load_checkpoint<float>(expected_path));

  SECTION("one Fisher checkpoint per model") {
    const ToolRun short_list = run_tool(dir, quoted_all(inputs) + " -o " + quoted(dir / "x.safetensors") +
                                                 " --method fisher --fisher " + quoted(fisher[0]));
    CHECK(short_list.status == 2);
    CHECK_THAT(short_list.err, Contains("one Fisher checkpoint per model (3 in input order), got 1"));
  }
  SECTION("a Fisher checkpoint without a spliced tensor") {
    auto partial = random_set<float>(70, {{"embed.weight", {12, 6}}});
    const auto partial_path = dir / "partial.safetensors";
    cki::save_checkpoint(partial, partial_path);
    const std::string list = fisher[0].string() + "," + partial_path.string() + "," + fisher[2].string();
    const ToolRun missing = run_tool(dir, quoted_all(inputs) + " -o " + quoted(dir / "x.safetensors") +
                                              " --method fisher --fisher " + shell_quote(list));
    CHECK(missing.status == 1);
    CHECK_THAT(missing.err, Contains("is missing from the Fisher checkpoint of model 2 ('" + partial_path.string()));
    CHECK_FALSE(fs::exists(dir / "x.safetensors"));
  }
}

TEST_CASE("cki-splice rejects options of other methods", "[io][tool]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  cki::save_checkpoint(model(1, DType::F32), a);
  cki::save_checkpoint(model(2, DType::F32), b);
  const std::string two = quoted(a) + " " + quoted(b) + " -o " + quoted(dir / "x.safetensors");

  struct UsageCase {
    std::string arguments;
    std::string expected;
  };
  const std::vector<UsageCase> cases = {
      {" --method average --density 0.3", "--density does not apply to --method average, which takes --weights"},
      {" --lambda 2", "--lambda does not apply to --method cki-soft, which takes --rule, --bins"},
      {" --method ties --a 0.3", "--a does not apply to --method ties, which takes --weights, --lambda, --density, "
                                 "--ties-scope"},
      {" --method model-stock --t 0.2", "--t does not apply to --method model-stock, which takes no method options"},
      {" --method slerp --fisher f.safetensors", "--fisher does not apply to --method slerp, which takes --t"},
      {" --method prune --seed 3", "--seed does not apply to --method prune, which takes --threshold"},
      {" --method fisher", "--method fisher needs --fisher F1,F2,..."},
      {" --method dare --drop-rate 1", "method 'dare': --drop-rate must be in [0, 1), got 1"},
      {" --method average --weights 1,-1", "--weights[1] must be >= 0, got -1"},
      {" --method average --weights 1,2,3", "--weights needs one value per model (2 in input order), got 3"},
      {" --method ties --ties-scope model --weights 1,2,3",
       "--weights needs one value per model (2 in input order), got 3"},
      {" --method slerp --t 1.5", "--t must be in [0, 1], got 1.5"},
      {" --method ties --ties-scope global", "global not in {tensor,model}"},
      {" --nan-policy ignore", "ignore not in {error,copy-base,allow}"},
      {" --method dare --seed -1", "--seed"},
      {" --assessment-maps m.safetensors --density 0.2", "--density does not apply to --assessment-maps"},
  };
  for (const auto& item : cases) {
    INFO("arguments: " << item.arguments);
    const ToolRun run = run_tool(dir, two + item.arguments);
    CHECK(run.status == 2);
    CHECK_THAT(run.err, Contains(item.expected));
  }
  CHECK_FALSE(fs::exists(dir / "x.safetensors"));
}

namespace {

/// Trains `learner` for a few Adam steps towards model `target` of `sets`
/// (loss 0.5 |theta* - theta_target|^2 over every learned tensor), so its
/// maps leave the identity.
void train_towards(cki::LearnableSplice<float>& learner, const std::vector<cki::WeightSet<float>>& sets,
                   std::size_t target, int steps) {
  cki::AdamParams params;
  params.learning_rate = 0.05;
  cki::Adam<float> adam(params);
  const auto names = learner.names();
  for (int step = 0; step < steps; ++step) {
    const cki::WeightSet<float> merged = learner.forward();
    std::vector<cki::Tensor<float>> residuals;
    for (const std::string& name : names) {
      const auto& value = merged.view(name);
      residuals.emplace_back(value.shape(), value.array() - sets[target].view(name).array());
    }
    std::map<std::string, cki::TensorView<float>> gradients;
    for (std::size_t t = 0; t < names.size(); ++t) gradients.emplace(names[t], residuals[t].view());
    learner.backward(gradients);
    learner.step(adam);
  }
}

}  // namespace

TEST_CASE("cki-splice replays learned maps", "[io][tool][learn]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  std::vector<fs::path> inputs;
  std::vector<cki::WeightSet<float>> sets;
  for (unsigned k = 0; k < 3; ++k) {
    inputs.push_back(dir / ("model" + std::to_string(k) + ".safetensors"));
    cki::save_checkpoint(model(80 + k, k == 0 ? DType::F16 : DType::F32), inputs.back());
    sets.push_back(cki::load_checkpoint<float>(inputs.back()));
  }

  // A few Adam steps with per-model maps and learned temperatures, base 1,
  // biases excluded.
  cki::LearnOptions learn;
  learn.per_model = true;
  learn.learn_temperature = true;
  cki::SpliceOptions selection;
  selection.base = 1;
  selection.exclude = {"*.bias"};
  cki::LearnableSplice<float> learner(sets, learn, selection);
  train_towards(learner, sets, 2, 5);
  const cki::LearnedMaps<float> maps = learner.learned_maps();
  REQUIRE(maps.tensors.size() == 3);
  const auto maps_path = dir / "maps.safetensors";
  cki::save_learned_maps(maps_path, maps);

  const auto out = dir / "learned.safetensors";
  const auto report_path = dir / "report.json";
  const std::string arguments = quoted_all(inputs) + " --assessment-maps " + quoted(maps_path);
  const ToolRun run = run_tool(dir, arguments + " -o " + quoted(out) + " --report " + quoted(report_path));
  INFO(run.err);
  REQUIRE(run.status == 0);
  CHECK_THAT(run.out, Contains("merged 3 models with cki-learned-soft"));

  const auto expected = cki::splice_learned(sets, maps);
  const auto expected_path = dir / "expected.safetensors";
  cki::save_checkpoint(expected.merged, expected_path);
  require_same_tensors(cki::load_checkpoint<float>(out), cki::load_checkpoint<float>(expected_path));
  CHECK(nlohmann::json::parse(read_file(report_path)) == expected.report.to_json());

  // The learned maps changed the merge: data-free CKI differs.
  const auto data_free = cki::splice(sets, cki::CkiSoft<float>(learn.params), selection);
  CHECK_FALSE((data_free.merged.view("head.weight").array() ==
               cki::load_checkpoint<float>(out).view("head.weight").array()).all());

  SECTION("options equal to the file's are accepted") {
    const ToolRun same = run_tool(dir, arguments + " -o " + quoted(dir / "same.safetensors") +
                                           " --base 1 --exclude '*.bias' --method cki-soft --rule softmax --a 0.4");
    INFO(same.err);
    CHECK(same.status == 0);
    require_same_tensors(cki::load_checkpoint<float>(dir / "same.safetensors"), cki::load_checkpoint<float>(out));
  }
  SECTION("options that conflict with the file are usage errors") {
    struct ConflictCase {
      std::string arguments;
      std::string expected;
    };
    const std::vector<ConflictCase> cases = {
        {" --base 0", "--base 0 conflicts with the learned maps file '" + maps_path.string() +
                          "', which was learned with 1"},
        {" --method cki-hard", "--method cki-hard conflicts with"},
        {" --include 'head.*'", "--include [\"head.*\"] conflicts with"},
        {" --exclude '*.weight'", "--exclude [\"*.weight\"] conflicts with"},
        {" --a 0.3", "--a 0.3 conflicts with"},
        {" --rule blend", "--rule blend conflicts with"},
    };
    for (const auto& item : cases) {
      INFO("arguments: " << item.arguments);
      const ToolRun conflict = run_tool(dir, arguments + " -o " + quoted(dir / "x.safetensors") + item.arguments);
      CHECK(conflict.status == 2);
      CHECK_THAT(conflict.err, Contains(item.expected));
    }
    CHECK_FALSE(fs::exists(dir / "x.safetensors"));
  }
  SECTION("the model count must match the file") {
    const ToolRun two = run_tool(dir, quoted(inputs[0]) + " " + quoted(inputs[1]) + " --assessment-maps " +
                                          quoted(maps_path) + " -o " + quoted(dir / "x.safetensors"));
    CHECK(two.status == 2);
    CHECK_THAT(two.err, Contains("learned maps are for 3 models, got 2"));
  }
  SECTION("a learned tensor the models lack is an error") {
    auto renamed = maps;
    auto node = renamed.tensors.extract("head.weight");
    node.key() = "classifier.weight";
    renamed.tensors.insert(std::move(node));
    const auto renamed_path = dir / "renamed.safetensors";
    cki::save_learned_maps(renamed_path, renamed);
    const ToolRun missing = run_tool(dir, quoted_all(inputs) + " --assessment-maps " + quoted(renamed_path) +
                                              " -o " + quoted(dir / "x.safetensors"));
    CHECK(missing.status == 1);
    CHECK_THAT(missing.err, Contains("tensor 'classifier.weight' has learned maps in '" + renamed_path.string() +
                                     "' but is missing from the base model"));
  }
}

TEST_CASE("cki-splice NaN policies", "[io][tool][numeric]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  const auto clean_a = model(1, DType::F32);
  const auto clean_b = model(2, DType::F32);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float infinity = std::numeric_limits<float>::infinity();
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  const auto out = dir / "out.safetensors";
  const auto report_path = dir / "report.json";

  SECTION("NaN in another model") {
    cki::save_checkpoint(clean_a, a);
    cki::save_checkpoint(with_value(clean_b, "layer.0.weight", 5, nan), b);
    const std::string two = quoted(a) + " " + quoted(b) + " -o " + quoted(out) + " --report " + quoted(report_path);

    ToolRun run = run_tool(dir, two);
    CHECK(run.status == 1);
    CHECK_THAT(run.err, Contains("tensor 'layer.0.weight'"));
    CHECK_THAT(run.err, Contains("NaN at index 5"));
    CHECK_THAT(run.err, Contains(b.string()));
    CHECK_FALSE(fs::exists(out));

    run = run_tool(dir, two + " --nan-policy copy-base");
    INFO(run.err);
    REQUIRE(run.status == 0);
    CHECK_THAT(run.err, Contains("cki-splice: warning: tensor 'layer.0.weight': NaN at index 5 ([0, 5])"));
    CHECK_THAT(run.err, Contains("copied from the base under nan policy copy-base"));
    CHECK(run.err.find("embed.weight") == std::string::npos);  // one warning line per affected tensor

    cki::SpliceOptions options;
    options.nan_policy = cki::NanPolicy::copy_base;
    const auto expected_path = dir / "expected.safetensors";
    const auto expected_report =
        splice_in_memory({a, b}, cki::CkiSoft<float>(cki::CkiParams{}), options, expected_path);
    require_same_tensors(cki::load_checkpoint<float>(out), cki::load_checkpoint<float>(expected_path));
    CHECK(nlohmann::json::parse(read_file(report_path)) == expected_report.to_json());
    const auto merged = cki::load_checkpoint<float>(out);
    CHECK((merged.view("layer.0.weight").array() == clean_a.view("layer.0.weight").array()).all());
  }
  SECTION("NaN in the base") {
    cki::save_checkpoint(with_value(clean_a, "layer.0.weight", 7, nan), a);
    cki::save_checkpoint(clean_b, b);
    const std::string two = quoted(a) + " " + quoted(b) + " -o " + quoted(out) + " --report " + quoted(report_path);

    ToolRun run = run_tool(dir, two + " --nan-policy copy-base");
    CHECK(run.status == 1);
    CHECK_THAT(run.err, Contains("tensor 'layer.0.weight'"));
    CHECK_THAT(run.err, Contains(a.string()));
    CHECK_FALSE(fs::exists(out));

    run = run_tool(dir, two + " --nan-policy allow");
    INFO(run.err);
    REQUIRE(run.status == 0);
    CHECK(run.err.empty());
    const auto merged = cki::load_checkpoint<float>(out);
    CHECK(std::isnan(merged.view("layer.0.weight")[7]));
    const auto entry = report_entry(nlohmann::json::parse(read_file(report_path)), "layer.0.weight");
    CHECK(entry["action"] == "copied");
    CHECK_THAT(entry["reason"].get<std::string>(), Contains("NaN at index 7"));
    CHECK_THAT(entry["reason"].get<std::string>(), Contains("nan policy allow"));
  }
  SECTION("infinity in a tensor copied from the base") {
    cki::save_checkpoint(with_value(clean_a, "head.weight", 2, -infinity), a);
    cki::save_checkpoint(clean_b, b);
    const std::string two = quoted(a) + " " + quoted(b) + " -o " + quoted(out) + " --report " +
                            quoted(report_path) + " --exclude 'head.*'";

    ToolRun run = run_tool(dir, two);
    CHECK(run.status == 1);
    CHECK_THAT(run.err, Contains("tensor 'head.weight' contains -Inf at index 2 ([0, 2]) in model 1 ('" + a.string()));
    CHECK_THAT(run.err, Contains("copied from the base (excluded by pattern 'head.*')"));
    CHECK_FALSE(fs::exists(out));

    run = run_tool(dir, two + " --nan-policy copy-base");
    CHECK(run.status == 1);

    run = run_tool(dir, two + " --nan-policy allow");
    INFO(run.err);
    REQUIRE(run.status == 0);
    CHECK(cki::load_checkpoint<float>(out).view("head.weight")[2] == -infinity);
    const auto entry = report_entry(nlohmann::json::parse(read_file(report_path)), "head.weight");
    CHECK_THAT(entry["reason"].get<std::string>(),
               Contains("excluded by pattern 'head.*'; -Inf at index 2 ([0, 2]) in model 1"));
    CHECK_THAT(entry["reason"].get<std::string>(), Contains("passed through under nan policy allow"));
  }
  SECTION("a merge that overflows the compute scalar") {
    // base + lambda * delta = 1e38 * 10 is infinite in float, though every
    // input is finite; no NaN policy lets that into the output.
    cki::WeightSet<float> base;
    base.add("w", cki::Tensor<float>(cki::Shape{4}, Eigen::ArrayXf::Zero(4)));
    cki::WeightSet<float> tuned;
    tuned.add("w", cki::Tensor<float>(cki::Shape{4}, Eigen::ArrayXf::Constant(4, 10.0f)));
    cki::save_checkpoint(base, a);
    cki::save_checkpoint(tuned, b);
    for (const std::string policy : {"error", "allow"}) {
      INFO("nan policy " << policy);
      const ToolRun run = run_tool(dir, quoted(a) + " " + quoted(b) + " -o " + quoted(out) +
                                            " --method task-arithmetic --lambda 1e38 --clamp --nan-policy " + policy);
      CHECK(run.status == 1);
      CHECK_THAT(run.err, Contains("tensor 'w' has the non-finite value inf at index 0"));
      CHECK_FALSE(fs::exists(out));
    }
  }
}

TEST_CASE("cki-splice clamps F16 overflow only when asked", "[io][tool][numeric]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;

  // DARE with drop rate 0.5 doubles each kept delta: +-40000 becomes
  // +-80000, beyond F16's largest finite value 65504.
  cki::WeightSet<float> base;
  base.add("w", cki::Tensor<float>(cki::Shape{4, 8}, Eigen::ArrayXf::Zero(32)), DType::F16);
  base.add("b", cki::Tensor<float>(cki::Shape{8}, Eigen::ArrayXf::LinSpaced(8, -1.0f, 1.0f)), DType::F16);
  cki::WeightSet<float> tuned;
  cki::Tensor<float> deltas(cki::Shape{4, 8});
  for (std::int64_t i = 0; i < deltas.size(); ++i) deltas[i] = i % 2 == 0 ? 40000.0f : -40000.0f;
  tuned.add("w", deltas, DType::F16);
  tuned.add("b", cki::Tensor<float>(cki::Shape{8}, Eigen::ArrayXf::LinSpaced(8, 0.0f, 1.0f)), DType::F16);
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  cki::save_checkpoint(base, a);
  cki::save_checkpoint(tuned, b);
  const auto out = dir / "out.safetensors";
  const auto report_path = dir / "report.json";
  const std::string arguments = quoted(a) + " " + quoted(b) + " -o " + quoted(out) + " --report " +
                                quoted(report_path) + " --method dare --drop-rate 0.5 --seed 3";

  // The merge in memory, in float: kept entries are +-80000.
  cki::DareParams params;
  params.drop_rate = 0.5;
  params.seed = 3;
  const auto expected = cki::splice(std::vector<cki::WeightSet<float>>{base, tuned}, cki::DarePolicy<float>(params));
  const auto& merged_w = expected.merged.view("w");
  std::uint64_t beyond = 0;
  std::int64_t first_beyond = -1;
  for (std::int64_t i = 0; i < merged_w.size(); ++i) {
    if (std::abs(merged_w[i]) <= 65504.0f) continue;
    ++beyond;
    if (first_beyond < 0) first_beyond = i;
  }
  REQUIRE(beyond > 0);

  ToolRun run = run_tool(dir, arguments);
  CHECK(run.status == 1);
  CHECK_THAT(run.err, Contains("tensor 'w' has the value " + std::string(merged_w[first_beyond] > 0 ? "" : "-") +
                               "80000 at index " + std::to_string(first_beyond)));
  CHECK_THAT(run.err, Contains("beyond the range of its output dtype F16 (largest finite value 65504)"));
  CHECK_THAT(run.err, Contains("in '" + out.string() + "'"));
  CHECK_FALSE(fs::exists(out));

  run = run_tool(dir, arguments + " --clamp");
  INFO(run.err);
  REQUIRE(run.status == 0);
  CHECK_THAT(run.out, Contains(std::to_string(beyond) + " values clamped to their output dtype"));
  const auto merged = cki::load_checkpoint<float>(out);
  REQUIRE(merged.at("w").dtype == DType::F16);
  for (std::int64_t i = 0; i < merged_w.size(); ++i) {
    INFO("element " << i << ", merged in memory " << merged_w[i]);
    CHECK(merged.view("w")[i] == std::clamp(merged_w[i], -65504.0f, 65504.0f));
  }
  const auto report = nlohmann::json::parse(read_file(report_path));
  CHECK(report_entry(report, "w")["clamped"] == beyond);
  CHECK_FALSE(report_entry(report, "b").contains("clamped"));
}
