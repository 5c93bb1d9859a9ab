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
