// Tests of checkpoints: sharded folders in and out, mismatches between
// models, and streamed merges against splice() in memory, peak memory included.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "cki/cki.hpp"
#include "cki/io/sharded.hpp"
#include "cki/io/streaming.hpp"
#include "io_test_support.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define CKI_TEST_UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define CKI_TEST_UNDER_SANITIZER 1
#endif
#endif

using Catch::Matchers::Contains;
using cki::DType;
using namespace cki_test;

namespace {

const std::vector<std::pair<std::string, cki::Shape>> kLayers = {
    {"embed.weight", {10, 8}}, {"lm_head.weight", {10, 8}}, {"layer.0.weight", {16, 8}},
    {"layer.0.bias", {8}},     {"layer.1.weight", {8, 16}}, {"norm.scale", {}},
    {"unused", {0, 8}},
};

/// A model of kLayers stored as `dtype`, plus an I64 buffer that is copied.
template <typename Scalar>
cki::WeightSet<Scalar> model(unsigned seed, DType dtype) {
  auto set = random_set<Scalar>(seed, kLayers, dtype);
  set.add_raw("position_ids", DType::I64, {1, 2}, {0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0});
  set.metadata()["format"] = "pt";
  set.metadata()["seed"] = std::to_string(seed);
  return set;
}

std::vector<cki::Checkpoint> open_all(const std::vector<fs::path>& paths) {
  std::vector<cki::Checkpoint> inputs;
  for (const auto& path : paths) inputs.emplace_back(path);
  return inputs;
}

/// Streams a merge of `paths` into `output` and checks that it equals
/// splice() on the loaded sets, written with the same options.
template <typename Scalar, typename Policy>
void require_stream_equals_memory(const std::vector<fs::path>& paths, const fs::path& output,
                                  const Policy& policy, const cki::StreamOptions& options) {
  const auto report = cki::splice_checkpoints<Scalar>(open_all(paths), output, policy, options);

  std::vector<cki::WeightSet<Scalar>> sets;
  for (const auto& path : paths) sets.push_back(cki::load_checkpoint<Scalar>(path));
  const auto result = cki::splice(sets, policy, options.splice);
  const auto memory_path = output.parent_path() / ("memory-" + output.filename().string() + ".safetensors");
  cki::WriteOptions memory_options = options.write;
  memory_options.max_shard_size = 0;
  cki::save_checkpoint(result.merged, memory_path, memory_options);

  require_same_tensors(cki::load_checkpoint<Scalar>(output), cki::load_checkpoint<Scalar>(memory_path));
  CHECK(report.to_json() == result.report.to_json());
  CHECK(report.spliced_count() > 0);

  // Metadata: the base's, plus the method and its parameters.
  const auto merged = cki::load_checkpoint<Scalar>(output);
  CHECK(merged.metadata().at("seed") == sets[options.splice.base].metadata().at("seed"));
  CHECK(merged.metadata().at(cki::kMethodMetadataKey) == policy.name());
  CHECK(nlohmann::json::parse(merged.metadata().at(cki::kParametersMetadataKey)) == policy.parameters());
}

}  // namespace

TEST_CASE("sharded output and input", "[io][sharded]") {
  TempDir dir;
  const auto set = model<float>(3, DType::F32);
  cki::WriteOptions options;
  options.max_shard_size = 400;  // bytes: several shards for this model
  const auto folder = dir / "sharded";
  cki::save_checkpoint(set, folder, options);

  // Shard names, index and sizes.
  const auto index = nlohmann::json::parse(read_file(folder / "model.safetensors.index.json"));
  std::uint64_t total = 0;
  for (const auto& entry : set) total += static_cast<std::uint64_t>(entry.numel()) * cki::dtype_size(entry.dtype);
  CHECK(index["metadata"]["total_size"] == total);
  std::set<std::string> shard_names;
  for (const auto& item : index["weight_map"].items()) shard_names.insert(item.value().get<std::string>());
  REQUIRE(shard_names.size() >= 3);
  const std::size_t count = shard_names.size();
  for (std::size_t s = 0; s < count; ++s) {
    const std::string name = cki::shard_file_name(s, count);
    INFO(name);
    CHECK(shard_names.count(name) == 1);
    const cki::SafetensorsFile shard(folder / name);
    std::uint64_t bytes = 0;
    for (const auto& info : shard.tensors()) bytes += info.byte_size();
    CHECK((bytes <= options.max_shard_size || shard.tensors().size() == 1));
    CHECK(shard.metadata().at("seed") == "3");
  }
  CHECK(cki::shard_file_name(0, 3) == "model-00001-of-00003.safetensors");
  CHECK_FALSE(fs::exists(folder / "model.safetensors"));

  // Reading the folder gives the set back.
  const auto loaded = cki::load_checkpoint<float>(folder);
  require_same_tensors(loaded, set);
  CHECK(loaded.metadata().at("seed") == "3");

  SECTION("a folder output that fits in one shard has no index") {
    cki::save_checkpoint(set, dir / "single");
    CHECK(fs::exists(dir / "single" / "model.safetensors"));
    CHECK_FALSE(fs::exists(dir / "single" / "model.safetensors.index.json"));
    require_same_tensors(cki::load_checkpoint<float>(dir / "single"), set);
  }
  SECTION("a single-file output cannot be sharded") {
    CHECK_THAT(error_message<std::invalid_argument>([&] { cki::save_checkpoint(set, dir / "one.safetensors", options); }),
               Contains("give a folder to shard into"));
  }
  SECTION("a missing shard names index and shard") {
    const std::string shard = cki::shard_file_name(1, count);
    fs::remove(folder / shard);
    const std::string message = error_message<cki::FormatError>([&] { cki::Checkpoint checkpoint(folder); });
    CHECK_THAT(message, Contains((folder / shard).string()));
    CHECK_THAT(message, Contains((folder / "model.safetensors.index.json").string()));
    CHECK_THAT(message, Contains("does not exist"));
  }
  SECTION("a tensor listed but absent names tensor, shard and index") {
    auto edited = index;
    edited["weight_map"]["ghost.weight"] = cki::shard_file_name(0, count);
    write_file(folder / "model.safetensors.index.json", edited.dump());
    const std::string message = error_message<cki::FormatError>([&] { cki::Checkpoint checkpoint(folder); });
    CHECK_THAT(message, Contains("tensor 'ghost.weight' is listed in index"));
    CHECK_THAT(message, Contains((folder / cki::shard_file_name(0, count)).string()));
    CHECK_THAT(message, Contains("has no such tensor"));
  }
  SECTION("a stored tensor the index does not list") {
    auto edited = index;
    edited["weight_map"].erase("layer.0.bias");
    write_file(folder / "model.safetensors.index.json", edited.dump());
    CHECK_THAT(error_message<cki::FormatError>([&] { cki::Checkpoint checkpoint(folder); }),
               Contains("tensor 'layer.0.bias' of shard"));
  }
  SECTION("a shard outside the folder") {
    auto edited = index;
    edited["weight_map"]["layer.0.bias"] = "../elsewhere.safetensors";
    write_file(folder / "model.safetensors.index.json", edited.dump());
    CHECK_THAT(error_message<cki::FormatError>([&] { cki::Checkpoint checkpoint(folder); }),
               Contains("a shard must be a file name inside the checkpoint folder"));
  }
  SECTION("an index without weight_map") {
    write_file(folder / "model.safetensors.index.json", "{\"metadata\": {}}");
    CHECK_THAT(error_message<cki::FormatError>([&] { cki::Checkpoint checkpoint(folder); }),
               Contains("has no 'weight_map'"));
  }
  SECTION("a folder with several files and no index") {
    fs::remove(folder / "model.safetensors.index.json");
    CHECK_THAT(error_message<cki::FormatError>([&] { cki::Checkpoint checkpoint(folder); }),
               Contains("contains several candidate checkpoints"));
  }
}

TEST_CASE("mismatched checkpoints name tensor, values and files", "[io][mismatch]") {
  TempDir dir;
  const auto a = dir / "a.safetensors";
  cki::save_checkpoint(model<float>(1, DType::F32), a);

  SECTION("a missing tensor, with the tied-embeddings hint") {
    auto set = model<float>(2, DType::F32);
    cki::WeightSet<float> tied;
    for (const auto& entry : set) {
      if (entry.name != "lm_head.weight") tied.insert(entry);
    }
    const auto b = dir / "b.safetensors";
    cki::save_checkpoint(tied, b);
    const std::string message = error_message<cki::MismatchError>([&] { cki::check_compatible(open_all({a, b})); });
    CHECK_THAT(message, Contains("tensor 'lm_head.weight'"));
    CHECK_THAT(message, Contains(a.string()));
    CHECK_THAT(message, Contains("is missing from model 2 ('" + b.string() + "')"));
    CHECK_THAT(message, Contains("it has 'embed.weight' of the same shape [10, 8]"));

    const std::string reverse = error_message<cki::MismatchError>([&] { cki::check_compatible(open_all({b, a})); });
    CHECK_THAT(reverse, Contains("tensor 'lm_head.weight' of model 2 ('" + a.string() + "') is missing from model 1"));
  }
  SECTION("a shape mismatch") {
    auto set = random_set<float>(4, {{"embed.weight", {10, 8}}, {"lm_head.weight", {10, 9}}});
    const auto b = dir / "b.safetensors";
    cki::save_checkpoint(set, b);
    const auto c = dir / "c.safetensors";
    cki::save_checkpoint(random_set<float>(4, {{"embed.weight", {10, 8}}, {"lm_head.weight", {10, 8}}}), c);
    const std::string message = error_message<cki::MismatchError>([&] { cki::check_compatible(open_all({c, b})); });
    CHECK_THAT(message, Contains("tensor 'lm_head.weight' has shape [10, 8] in model 1 ('" + c.string() + "')"));
    CHECK_THAT(message, Contains("but [10, 9] in model 2 ('" + b.string() + "')"));
  }
  SECTION("a dtype-kind mismatch") {
    auto set = model<float>(2, DType::F32);
    cki::WeightSet<float> changed;
    for (const auto& entry : set) {
      if (entry.name != "layer.0.bias") changed.insert(entry);
    }
    changed.add_raw("layer.0.bias", DType::I32, {8}, std::vector<std::uint8_t>(32, 0));
    const auto b = dir / "b.safetensors";
    cki::save_checkpoint(changed, b);
    const std::string message = error_message<cki::MismatchError>([&] { cki::check_compatible(open_all({a, b})); });
    CHECK_THAT(message, Contains("tensor 'layer.0.bias' has dtype F32 in model 1"));
    CHECK_THAT(message, Contains("but I32 in model 2 ('" + b.string() + "')"));
  }
  SECTION("an extra tensor") {
    auto set = model<float>(2, DType::F32);
    set.add("extra", cki::Tensor<float>(cki::Shape{3}));
    const auto b = dir / "b.safetensors";
    cki::save_checkpoint(set, b);
    const std::string message = error_message<cki::MismatchError>([&] { cki::check_compatible(open_all({a, b})); });
    CHECK_THAT(message, Contains("tensor 'extra' of model 2 ('" + b.string() + "') is missing from model 1"));
  }
  SECTION("streamed merges check before writing") {
    auto set = random_set<float>(4, {{"embed.weight", {10, 8}}});
    const auto b = dir / "b.safetensors";
    cki::save_checkpoint(set, b);
    const auto out = dir / "out.safetensors";
    CHECK_THROWS_AS(cki::splice_checkpoints<float>(open_all({a, b}), out, cki::CkiSoft<float>(cki::CkiParams{})),
                    cki::MismatchError);
    CHECK_FALSE(fs::exists(out));
  }
}

TEMPLATE_TEST_CASE("streamed merge of two models equals splice()", "[io][streaming]", float, double) {
  TempDir dir;
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  cki::save_checkpoint(model<TestType>(11, DType::F32), a);
  cki::save_checkpoint(model<TestType>(12, DType::F16), b);  // mixed dtypes
  cki::CkiParams params;

  SECTION("soft, defaults") {
    require_stream_equals_memory<TestType>({a, b}, dir / "soft.safetensors", cki::CkiSoft<TestType>(params), {});
  }
  SECTION("hard, base 2, excluding biases, as BF16") {
    cki::StreamOptions options;
    options.splice.base = 1;
    options.splice.exclude = {"*.bias"};
    options.write.out_dtype = DType::BF16;
    require_stream_equals_memory<TestType>({a, b}, dir / "hard.safetensors", cki::CkiHard<TestType>(params), options);
    const auto merged = cki::load_checkpoint<TestType>(dir / "hard.safetensors");
    CHECK(merged.at("layer.0.weight").dtype == DType::BF16);
    CHECK(merged.at("position_ids").dtype == DType::I64);
  }
  SECTION("blend rule through AnyPolicy, include pattern") {
    params.rule = cki::RuleKind::blend;
    cki::StreamOptions options;
    options.splice.include = {"layer.*"};
    const cki::AnyPolicy<TestType> policy = cki::CkiSoft<TestType>(params);
    require_stream_equals_memory<TestType>({a, b}, dir / "blend.safetensors", policy, options);
  }
}

TEST_CASE("streamed merge of three folders equals splice()", "[io][streaming]") {
  TempDir dir;
  std::vector<fs::path> inputs;
  for (unsigned k = 0; k < 3; ++k) {
    const auto folder = dir / ("model" + std::to_string(k));
    cki::WriteOptions options;
    options.max_shard_size = k == 1 ? 300 : 0;  // the second model is sharded
    cki::save_checkpoint(model<float>(20 + k, k == 2 ? DType::BF16 : DType::F16), folder, options);
    write_file(folder / "config.json", "{\"model\": " + std::to_string(k) + "}");
    inputs.push_back(folder);
  }
  write_file(inputs[1] / "tokenizer.json", "{}");
  write_file(inputs[1] / "pytorch_model.bin", "not copied");
  write_file(inputs[1] / ".hidden", "not copied");

  cki::StreamOptions options;
  options.splice.base = 1;
  options.write.max_shard_size = 500;
  std::vector<std::size_t> progress;
  options.on_progress = [&](const cki::StreamProgress& step) {
    progress.push_back(step.tensor);
    CHECK(step.bytes_done <= step.bytes_total);
  };
  const auto out = dir / "merged";
  require_stream_equals_memory<float>(inputs, out, cki::CkiHard<float>(cki::CkiParams{}), options);

  CHECK(progress.size() == kLayers.size() + 1);
  CHECK(progress.back() == kLayers.size() + 1);
  CHECK(fs::exists(out / "model.safetensors.index.json"));
  CHECK(read_file(out / "config.json") == "{\"model\": 1}");
  CHECK(fs::exists(out / "tokenizer.json"));
  CHECK_FALSE(fs::exists(out / "pytorch_model.bin"));
  CHECK_FALSE(fs::exists(out / ".hidden"));

  SECTION("the plan lists spliced and copied tensors") {
    const auto plan = cki::plan_stream<float>(open_all(inputs), options);
    CHECK(plan.tensors.size() == kLayers.size() + 1);
    CHECK(plan.spliced_count() == 6);
    CHECK(plan.largest_spliced == 128);
    CHECK(plan.peak_memory_estimate() >= 4 * 128 * sizeof(float));
    CHECK(plan.extra_files.size() == 2);
  }
  SECTION("the output folder cannot be an input folder") {
    options.write.overwrite = true;
    CHECK_THAT(error_message<cki::IoError>([&] {
                 cki::splice_checkpoints<float>(open_all(inputs), inputs[0], cki::CkiSoft<float>(cki::CkiParams{}), options);
               }),
               Contains("is the input"));
    CHECK(fs::exists(inputs[0] / "model.safetensors"));
  }
}

TEST_CASE("non-finite input names tensor and file", "[io][streaming]") {
  TempDir dir;
  auto set = model<float>(5, DType::F32);
  cki::WeightSet<float> broken;
  for (const auto& entry : set) {
    if (entry.name != "layer.1.weight") broken.insert(entry);
  }
  cki::Tensor<float> values = cki::Tensor<float>::copy_of(set.view("layer.1.weight"));
  values[17] = std::numeric_limits<float>::quiet_NaN();
  broken.add("layer.1.weight", values);
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  cki::save_checkpoint(model<float>(6, DType::F32), a);
  cki::save_checkpoint(broken, b);

  const auto out = dir / "out.safetensors";
  const std::string message = error_message<cki::NumericError>(
      [&] { cki::splice_checkpoints<float>(open_all({a, b}), out, cki::CkiSoft<float>(cki::CkiParams{})); });
  CHECK_THAT(message, Contains("tensor 'layer.1.weight'"));
  CHECK_THAT(message, Contains("NaN"));
  CHECK_THAT(message, Contains(b.string()));
  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("streamed merge output overflowing F16", "[io][streaming]") {
  TempDir dir;
  cki::WeightSet<float> big;
  cki::Tensor<float> values(cki::Shape{4});
  values.array() << 70000.0f, 1.0f, 2.0f, 3.0f;
  big.add("w", values);
  const auto a = dir / "a.safetensors";
  const auto b = dir / "b.safetensors";
  cki::save_checkpoint(big, a);
  cki::save_checkpoint(big, b);
  cki::StreamOptions options;
  options.write.out_dtype = DType::F16;
  const auto out = dir / "out.safetensors";
  const std::string message = error_message<cki::NumericError>(
      [&] { cki::splice_checkpoints<float>(open_all({a, b}), out, cki::CkiSoft<float>(cki::CkiParams{}), options); });
  CHECK_THAT(message, Contains("tensor 'w' has the value 70000 at index 0"));
  CHECK_THAT(message, Contains(out.string()));
  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("streamed merge peak memory stays near (N + 1) tensors", "[io][streaming][memory]") {
#if defined(CKI_TEST_UNDER_SANITIZER)
  WARN("skipped: a sanitizer's shadow memory and quarantine make resident memory meaningless");
  return;
#else
  TempDir dir;
  constexpr std::int64_t kRows = 2048;
  constexpr std::int64_t kColumns = 2048;  // 4 Mi elements, 16 MiB in float
  constexpr int kTensors = 8;
  constexpr std::size_t kModels = 3;

  // Inputs written tensor by tensor from one buffer, so building them needs
  // no whole model in memory either. The second model is F16.
  std::vector<fs::path> paths;
  {
    std::vector<float> buffer(static_cast<std::size_t>(kRows * kColumns));
    for (std::size_t k = 0; k < kModels; ++k) {
      std::vector<cki::TensorSpec> specs;
      const DType dtype = k == 1 ? DType::F16 : DType::F32;
      for (int t = 0; t < kTensors; ++t) specs.push_back({"block." + std::to_string(t) + ".weight", dtype, {kRows, kColumns}});
      specs.push_back({"block.bias", dtype, {kColumns}});
      paths.push_back(dir / ("model" + std::to_string(k) + ".safetensors"));
      cki::CheckpointWriter writer(paths.back(), specs, {}, cki::WriteOptions{});
      std::uint32_t state = 12345u + static_cast<std::uint32_t>(k);
      for (const std::string& name : writer.order()) {
        const auto count = static_cast<std::size_t>(name == "block.bias" ? kColumns : kRows * kColumns);
        for (std::size_t i = 0; i < count; ++i) {
          state = state * 1664525u + 1013904223u;
          buffer[i] = static_cast<float>(state >> 8) / 16777216.0f - 0.5f;
        }
        writer.write(name, buffer.data(), count);
      }
      writer.commit();
    }
  }
  std::uint64_t input_bytes = 0;
  for (const auto& path : paths) input_bytes += fs::file_size(path);
  REQUIRE(input_bytes > 300u * 1024 * 1024);

  const auto inputs = open_all(paths);
  const auto plan = cki::plan_stream<float>(inputs, {});
  if (!reset_peak_rss()) {
    WARN("skipped: this kernel cannot reset VmHWM through /proc/self/clear_refs");
    return;
  }
  const std::uint64_t before = proc_status_bytes("VmRSS");
  const auto report = cki::splice_checkpoints<float>(inputs, dir / "merged.safetensors", cki::CkiSoft<float>(cki::CkiParams{}));
  const std::uint64_t peak = proc_status_bytes("VmHWM");
  REQUIRE(peak > 0);

  // Allowance beyond the plan's estimate: thread stacks, per-thread block
  // workspaces and allocator slack, far below one 16 MiB tensor.
  const std::uint64_t allowance = 12u * 1024 * 1024;
  const std::uint64_t growth = peak > before ? peak - before : 0;
  INFO("peak RSS growth " << growth << " bytes, estimate " << plan.peak_memory_estimate() << " bytes, inputs "
                          << input_bytes << " bytes");
  CHECK(report.spliced_count() == kTensors + 1);
  CHECK(plan.peak_memory_estimate() <= (kModels + 1) * kRows * kColumns * sizeof(float) + 4u * 1024 * 1024);
  CHECK(growth <= plan.peak_memory_estimate() + allowance);
  CHECK(growth < input_bytes / 3);
#endif
}
