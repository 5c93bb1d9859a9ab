// A comparison row that merges through files, as a user of the command-line
// tool would: the N models written as safetensors files, merged by
// cki-splice, and the merged file read back.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <cki/cki.hpp>
#include <cki/io/safetensors.hpp>

#include "fashion_mnist/methods.hpp"
#include "fashion_mnist/mlp.hpp"
#include "fashion_mnist/protocol.hpp"

namespace fashion_mnist {

/// Writes the tensors of `set` as an F32 safetensors file at `path`,
/// replacing an existing file. Throws cki::IoError when writing fails.
inline void write_safetensors(const cki::WeightSet<float>& set, const std::filesystem::path& path) {
  std::vector<cki::TensorSpec> specs;
  for (const auto& entry : set) specs.push_back({entry.name, cki::DType::F32, entry.shape});

  cki::SafetensorsWriter writer(path, specs, set.metadata(), /*overwrite=*/true);
  for (const cki::TensorInfo& info : writer.layout()) {
    const cki::TensorView<float>& view = set.view(info.name);
    writer.write(info.name, view.data(), static_cast<std::size_t>(view.size()));
  }
  writer.commit();
}

/// Returns `text` in single quotes for a POSIX shell.
inline std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) {
    if (c == '\'') {
      quoted += "'\\''";
    } else {
      quoted += c;
    }
  }
  return quoted + "'";
}

/// Largest absolute difference between the floating tensors of two weight
/// sets with the same names and shapes.
inline double max_abs_difference(const cki::WeightSet<float>& a, const cki::WeightSet<float>& b) {
  double largest = 0;
  for (const auto& entry : a) {
    const auto difference = (entry.values.array() - b.view(entry.name).array()).abs();
    if (difference.size() > 0) largest = std::max(largest, static_cast<double>(difference.maxCoeff()));
  }
  return largest;
}

/// Row "CKI soft via cki-splice": writes the N models to `work_dir` as
/// safetensors files, runs the cki-splice executable `tool` on them with its
/// defaults (soft splicing, softmax rule, model 1 as the base) and reads the
/// merged file back. Those are the parameters of the in-process row
/// "CKI soft, softmax rule", so both rows must score the same. The notes
/// record the largest absolute weight difference to the in-process splice.
/// Throws std::runtime_error when the tool fails.
inline Method cki_splice_tool_method(std::string tool, std::filesystem::path work_dir) {
  return {"cki_soft_softmax_tool", "CKI soft, softmax rule, via safetensors files and cki-splice",
          [tool, work_dir](const MergeInputs& in) -> std::optional<Candidate> {
            // Write the models, model 1 first.
            std::vector<std::string> inputs;
            for (std::size_t k = 0; k < in.model_count(); ++k) {
              const std::filesystem::path path = work_dir / ("model_" + std::to_string(k + 1) + ".safetensors");
              write_safetensors((*in.sets)[k], path);
              inputs.push_back(path.string());
            }

            // Run the tool with its default method and parameters.
            const std::filesystem::path output = work_dir / "merged.safetensors";
            std::string command = shell_quote(tool) + " --quiet --force";
            for (const std::string& input : inputs) command += " " + shell_quote(input);
            command += " -o " + shell_quote(output.string());
            const int status = std::system(command.c_str());
            if (status != 0) {
              throw std::runtime_error("cki-splice failed with status " + std::to_string(status) +
                                       "; command: " + command);
            }

            // Read the result back and compare it with the in-process splice.
            const cki::WeightSet<float> merged = cki::load_safetensors<float>(output);
            const cki::SpliceResult<float> in_process = cki::splice(*in.sets, cki::CkiSoft<float>(cki::CkiParams{}));
            nlohmann::json notes = {{"max_abs_difference_to_in_process", max_abs_difference(merged, in_process.merged)},
                                    {"command", command}};
            return Candidate::merged(from_weight_set(merged, in.params->sizes), std::move(notes));
          }};
}

}  // namespace fashion_mnist
