// Writes N synthetic safetensors checkpoints of one architecture for the
// end-to-end benchmark: each about 1 GiB of F32 tensors, the largest 64 MiB.
//
// Usage: cki_make_checkpoints DIRECTORY N
// Writes DIRECTORY/model_1.safetensors .. model_N.safetensors. The models
// share a base (standard deviation 0.02) and differ by per-model deviations
// (0.005), as fine-tunes of one pretrained model do.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <cki/io/safetensors.hpp>

#include "synthetic.hpp"

namespace {

constexpr std::int64_t kMebi = std::int64_t{1} << 20;

using cki_bench::pseudo_normal;

// 1 GiB of F32 tensors: 12 of 64 MiB, 8 of 16 MiB and 16 of 8 MiB.
std::vector<cki::TensorSpec> architecture() {
  std::vector<cki::TensorSpec> specs;
  for (int i = 0; i < 12; ++i) specs.push_back({"layers." + std::to_string(i) + ".mlp.weight", cki::DType::F32, {4096, 4096}});
  for (int i = 0; i < 8; ++i) specs.push_back({"layers." + std::to_string(i) + ".attention.weight", cki::DType::F32, {2048, 2048}});
  for (int i = 0; i < 16; ++i) specs.push_back({"layers." + std::to_string(i) + ".norm.weight", cki::DType::F32, {1024, 2048}});
  return specs;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: cki_make_checkpoints DIRECTORY N\n";
    return 2;
  }
  const std::filesystem::path directory = argv[1];
  const int models = std::atoi(argv[2]);
  if (models < 1 || models > 64) {
    std::cerr << "invalid model count '" << argv[2] << "': expected an integer in [1, 64]\n";
    return 2;
  }
  try {
    std::filesystem::create_directories(directory);
    const std::vector<cki::TensorSpec> specs = architecture();
    std::vector<float> values(static_cast<std::size_t>(16 * kMebi));
    for (int k = 1; k <= models; ++k) {
      const std::filesystem::path path = directory / ("model_" + std::to_string(k) + ".safetensors");
      cki::SafetensorsWriter writer(path, specs, {{"format", "pt"}}, true);
      std::uint64_t tensor_seed = 0;
      for (const cki::TensorInfo& info : writer.layout()) {
        const std::int64_t count = cki::shape_numel(info.shape);
        tensor_seed =
            cki::detail::mix64(tensor_seed + std::hash<std::string>{}(info.name) + cki::detail::kSplitMixIncrement);
        for (std::int64_t i = 0; i < count; ++i) {
          const auto index = static_cast<std::uint64_t>(i);
          const float base = 0.02f * pseudo_normal(tensor_seed + index);
          values[static_cast<std::size_t>(i)] =
              base + 0.005f * pseudo_normal(tensor_seed + index + static_cast<std::uint64_t>(k) * (std::uint64_t{1} << 40));
        }
        writer.write(info.name, values.data(), static_cast<std::size_t>(count));
      }
      writer.commit();
      std::cerr << "wrote " << path.string() << "\n";
    }
  } catch (const std::exception& error) {
    std::cerr << "cki_make_checkpoints failed: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
