// Replays every input the fuzz targets ever crashed on through the same
// reader calls: each must now load or fail with cki::FormatError.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "exercise.hpp"
#include "io_test_support.hpp"

using namespace cki_test;

namespace {

/// Files of `folder` in name order.
std::vector<fs::path> files_in(const fs::path& folder) {
  std::vector<fs::path> files;
  for (const auto& item : fs::directory_iterator(folder)) {
    if (item.is_regular_file()) files.push_back(item.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

const fs::path kRegressions = fs::path(CKI_TEST_DATA_DIR) / "fuzz_regressions";

}  // namespace

TEST_CASE("fuzz regressions of the safetensors reader", "[io][fuzz]") {
  const auto files = files_in(kRegressions / "safetensors");
  REQUIRE_FALSE(files.empty());
  for (const auto& path : files) {
    INFO("input " << path.filename().string());
    try {
      cki_fuzz::read_safetensors(path);
      SUCCEED("loaded");
    } catch (const cki::FormatError& error) {
      CHECK_THAT(error.what(), Catch::Matchers::Contains(path.string()));
    }
  }
}

TEST_CASE("fuzz regressions of the shard index reader", "[io][fuzz]") {
  const auto files = files_in(kRegressions / "shard_index");
  REQUIRE_FALSE(files.empty());
  TempDir dir;
  const cki_fuzz::IndexFixture fixture(dir.path());
  for (const auto& path : files) {
    INFO("input " << path.filename().string());
    const std::string bytes = read_file(path);
    fixture.store(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    try {
      cki_fuzz::read_checkpoint(fixture.folder());
      SUCCEED("loaded");
    } catch (const cki::FormatError& error) {
      CHECK_THAT(error.what(), Catch::Matchers::Contains(fixture.folder().string()));
    }
  }
}

TEST_CASE("deeply nested JSON is rejected", "[io][fuzz]") {
  // A million levels: before the depth limit, the error message's dump of
  // such a value overflowed the stack. Too large to keep as a file.
  const std::size_t depth = 1'000'000;
  const std::string nested = std::string(depth, '[') + std::string(depth, ']');
  const std::vector<std::pair<std::string, std::string>> headers = {
      {"tensor entry", "{\"w\":" + nested + "}"},
      {"shape", "{\"w\":{\"dtype\":\"F32\",\"shape\":" + nested + ",\"data_offsets\":[0,0]}}"},
      {"metadata", "{\"__metadata__\":" + nested + "}"},
  };
  TempDir dir;
  for (const auto& [name, header] : headers) {
    INFO("nested " << name);
    const fs::path path = dir / "deep.safetensors";
    write_file(path, safetensors_bytes(header, ""));
    CHECK_THAT(error_message<cki::FormatError>([&] { cki::SafetensorsFile file(path); }),
               Catch::Matchers::Contains("more than 64 levels deep"));
  }

  const cki_fuzz::IndexFixture fixture(dir.path());
  const std::string index = "{\"weight_map\":{},\"metadata\":" + nested + "}";
  fixture.store(reinterpret_cast<const std::uint8_t*>(index.data()), index.size());
  CHECK_THAT(error_message<cki::FormatError>([&] { cki::Checkpoint checkpoint(fixture.folder()); }),
             Catch::Matchers::Contains("more than 64 levels deep"));

  // Exactly 64 levels parse; 65 do not.
  const std::string deepest = std::string(64, '[') + std::string(64, ']');
  CHECK_NOTHROW(cki::detail::parse_json_strict(deepest, "text"));
  const std::string too_deep = std::string(65, '[') + std::string(65, ']');
  CHECK_THROWS_AS(cki::detail::parse_json_strict(too_deep, "text"), cki::FormatError);
}
