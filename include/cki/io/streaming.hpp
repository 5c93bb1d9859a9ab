// Streamed merges of checkpoints: tensors are read, spliced and written one
// at a time, so memory stays near (N + 1) times the largest spliced tensor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cki/dtype.hpp"
#include "cki/errors.hpp"
#include "cki/io/atomic_file.hpp"
#include "cki/io/safetensors.hpp"
#include "cki/io/sharded.hpp"
#include "cki/splicing/report.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Metadata keys a merge adds to the base's metadata in its output.
inline constexpr const char* kMethodMetadataKey = "cki_method";
inline constexpr const char* kParametersMetadataKey = "cki_parameters";

/// Progress of a streamed merge, reported after each tensor.
struct StreamProgress {
  /// Tensors finished so far, 1-based, and the total.
  std::size_t tensor = 0;
  std::size_t tensor_count = 0;
  std::string name;
  /// Bytes of output tensor data written so far, and the total.
  std::uint64_t bytes_done = 0;
  std::uint64_t bytes_total = 0;
};

/// Options of a streamed merge.
struct StreamOptions {
  /// Base model, tensor selection and threads, as for splice().
  SpliceOptions splice;
  /// Output dtype, sharding and replacing an existing output.
  WriteOptions write;
  /// When the base is a checkpoint folder and the output a folder, copy the
  /// base's other files (config.json, tokenizer and vocabulary files) beside
  /// the weights, so the output loads as a model.
  bool copy_extra_files = true;
  /// Called after each tensor; may be empty. The library never prints.
  std::function<void(const StreamProgress&)> on_progress;
};

/// Plan of a streamed merge for one tensor.
struct PlannedTensor {
  std::string name;
  Shape shape;
  /// Storage dtype in each input, in input order.
  std::vector<DType> input_dtypes;
  DType out_dtype = DType::F32;
  bool spliced = false;
  /// Reason the tensor is copied from the base; empty when spliced.
  std::string copy_reason;
  std::uint64_t out_bytes = 0;
};

/// The plan of a streamed merge: every tensor in the base's order, sizes,
/// the memory estimate and the extra files copied beside the weights.
struct StreamPlan {
  std::vector<PlannedTensor> tensors;
  std::size_t model_count = 0;
  std::size_t base = 0;
  /// Bytes of one compute-scalar element.
  std::size_t scalar_size = 4;
  /// Element count of the largest spliced tensor.
  std::int64_t largest_spliced = 0;
  std::uint64_t output_bytes = 0;
  /// Files of the base folder that are copied beside the output's weights.
  std::vector<std::filesystem::path> extra_files;

  std::size_t spliced_count() const {
    return static_cast<std::size_t>(
        std::count_if(tensors.begin(), tensors.end(), [](const PlannedTensor& t) { return t.spliced; }));
  }

  /// Estimate of the merge's peak memory in bytes: one compute-scalar buffer
  /// per model and one for the output, each the size of the largest spliced
  /// tensor, plus the conversion chunks. The policy's per-thread block
  /// workspace and the program itself come on top.
  std::uint64_t peak_memory_estimate() const {
    return static_cast<std::uint64_t>(model_count + 1) * static_cast<std::uint64_t>(largest_spliced) *
               scalar_size +
           2 * detail::kChunkBytes;
  }
};

/// Upper estimate of the bytes a streamed merge writes: the tensor data,
/// the extra files, a bound on each tensor's header entry (its name
/// JSON-escaped at up to 6 bytes a byte, 21 bytes per number) and 1 MiB for
/// metadata, padding and a shard index.
inline std::uint64_t planned_output_size(const StreamPlan& plan) {
  std::uint64_t bytes = plan.output_bytes + (std::uint64_t{1} << 20);
  for (const PlannedTensor& tensor : plan.tensors) bytes += 6 * tensor.name.size() + 21 * (tensor.shape.size() + 2) + 64;
  for (const auto& file : plan.extra_files) {
    std::error_code error;
    const std::uintmax_t size = std::filesystem::file_size(file, error);
    if (!error) bytes += size;
  }
  return bytes;
}

namespace detail {

/// Name of input `index` in messages: "model 2 ('b.safetensors')".
inline std::string checkpoint_label(const Checkpoint& checkpoint, std::size_t index) {
  return "model " + std::to_string(index + 1) + " ('" + checkpoint.path().string() + "')";
}

/// Label of the file holding `tensor`, naming the shard when it differs
/// from the checkpoint path.
inline std::string tensor_location(const Checkpoint& checkpoint, std::size_t index, const CheckpointTensor& tensor) {
  std::string label = checkpoint_label(checkpoint, index);
  if (checkpoint.file_of(tensor) != checkpoint.path()) label += ", file '" + checkpoint.file_of(tensor).string() + "'";
  return label;
}

/// Returns a hint for a tensor missing from `checkpoint`: another tensor of
/// the same shape and kind there, as when a model ties its embeddings and the
/// checkpoint stores the shared tensor once. Empty when there is none.
inline std::string same_shape_hint(const Checkpoint& checkpoint, const CheckpointTensor& missing) {
  for (const CheckpointTensor& tensor : checkpoint.tensors()) {
    if (tensor.shape() == missing.shape() && is_floating(tensor.dtype()) == is_floating(missing.dtype())) {
      return "; it has '" + tensor.name() + "' of the same shape " + shape_to_string(missing.shape()) +
             ", so the model may tie these tensors and store them once";
    }
  }
  return "";
}

/// True for files of a checkpoint folder that hold weights (and so are not
/// copied beside merged weights) or are hidden.
inline bool is_weight_or_hidden_file(const std::string& name) {
  static const char* const weight_suffixes[] = {".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json",
                                                ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx"};
  if (name.empty() || name.front() == '.') return true;
  return std::any_of(std::begin(weight_suffixes), std::end(weight_suffixes),
                     [&](const char* suffix) { return has_suffix(name, suffix); });
}

}  // namespace detail

/// Checks that N checkpoints hold the same tensor names and shapes, each
/// tensor floating in all or in none (dtypes may otherwise differ).
/// Throws std::invalid_argument for N = 0, and MismatchError for the first
/// missing or extra tensor, shape or dtype-kind mismatch, naming the tensor,
/// both values and both files. A missing tensor's message names another
/// tensor of the same shape where the file has one (tied embeddings).
inline void check_compatible(const std::vector<Checkpoint>& inputs) {
  if (inputs.empty()) throw std::invalid_argument("no checkpoints given; need at least one");
  const Checkpoint& first = inputs.front();

  for (std::size_t k = 1; k < inputs.size(); ++k) {
    const Checkpoint& other = inputs[k];

    // Every tensor of the first checkpoint, with its shape and kind.
    for (const CheckpointTensor& tensor : first.tensors()) {
      const CheckpointTensor* match = other.find(tensor.name());
      if (match == nullptr) {
        throw MismatchError("tensor '" + tensor.name() + "' of " + detail::tensor_location(first, 0, tensor) +
                            " is missing from " + detail::checkpoint_label(other, k) +
                            detail::same_shape_hint(other, tensor));
      }
      if (match->shape() != tensor.shape()) {
        throw MismatchError("tensor '" + tensor.name() + "' has shape " + shape_to_string(tensor.shape()) + " in " +
                            detail::tensor_location(first, 0, tensor) + " but " + shape_to_string(match->shape()) +
                            " in " + detail::tensor_location(other, k, *match));
      }
      if (is_spliceable(match->dtype()) != is_spliceable(tensor.dtype())) {
        throw MismatchError("tensor '" + tensor.name() + "' has dtype " + dtype_name(tensor.dtype()) + " in " +
                            detail::tensor_location(first, 0, tensor) + " but " + dtype_name(match->dtype()) +
                            " in " + detail::tensor_location(other, k, *match) +
                            "; floating and non-floating tensors cannot be merged");
      }
    }

    // Tensors only the other checkpoint has.
    if (other.tensors().size() != first.tensors().size()) {
      for (const CheckpointTensor& tensor : other.tensors()) {
        if (first.find(tensor.name()) == nullptr) {
          throw MismatchError("tensor '" + tensor.name() + "' of " + detail::tensor_location(other, k, tensor) +
                              " is missing from " + detail::checkpoint_label(first, 0) +
                              detail::same_shape_hint(first, tensor));
        }
      }
    }
  }
}

/// Plans a streamed merge of `inputs` without reading tensor data: which
/// tensors are spliced or copied and why, output dtypes and sizes, the
/// memory estimate for compute scalar `Scalar`, and the extra files.
/// Throws std::invalid_argument for invalid options and MismatchError as
/// check_compatible does.
template <typename Scalar>
StreamPlan plan_stream(const std::vector<Checkpoint>& inputs, const StreamOptions& options) {
  if (inputs.empty()) throw std::invalid_argument("no checkpoints given; need at least one");
  options.splice.check(inputs.size());
  options.write.check();
  check_compatible(inputs);

  StreamPlan plan;
  plan.model_count = inputs.size();
  plan.base = options.splice.base;
  plan.scalar_size = sizeof(Scalar);
  const Checkpoint& base = inputs[plan.base];

  // Tensors in the base's order.
  for (const CheckpointTensor& tensor : base.tensors()) {
    PlannedTensor planned;
    planned.name = tensor.name();
    planned.shape = tensor.shape();
    for (const Checkpoint& input : inputs) planned.input_dtypes.push_back(input.find(tensor.name())->dtype());
    planned.out_dtype = tensor.dtype();
    if (options.write.out_dtype && is_spliceable(tensor.dtype())) planned.out_dtype = *options.write.out_dtype;
    const std::int64_t numel = shape_numel(tensor.shape());
    planned.out_bytes = static_cast<std::uint64_t>(numel) * dtype_size(planned.out_dtype);
    const auto reason = copy_reason(options.splice, tensor.name(), tensor.dtype(), numel, inputs.size());
    planned.spliced = !reason;
    if (reason) planned.copy_reason = *reason;
    if (planned.spliced) plan.largest_spliced = std::max(plan.largest_spliced, numel);
    plan.output_bytes += planned.out_bytes;
    plan.tensors.push_back(std::move(planned));
  }

  // Extra files: the base folder's non-weight files, for folder outputs.
  if (options.copy_extra_files && base.is_folder()) {
    for (const auto& item : std::filesystem::directory_iterator(base.path())) {
      if (item.is_regular_file() && !detail::is_weight_or_hidden_file(item.path().filename().string())) {
        plan.extra_files.push_back(item.path());
      }
    }
    std::sort(plan.extra_files.begin(), plan.extra_files.end());
  }
  return plan;
}

namespace detail {

/// Findings of copy_tensor() in one copied tensor.
struct CopyResult {
  /// Elements clamped to the output dtype's range.
  std::uint64_t clamped = 0;
  /// Index and value of the first NaN or infinite element; -1 when none.
  std::int64_t first_non_finite = -1;
  double non_finite_value = 0;
};

/// Records the first non-finite value of `values` (element `offset` on) in `result`.
template <typename Scalar>
void find_non_finite(const Scalar* values, std::size_t count, std::uint64_t offset, CopyResult& result) {
  if (result.first_non_finite >= 0) return;
  for (std::size_t i = 0; i < count; ++i) {
    if (std::isfinite(values[i])) continue;
    result.first_non_finite = static_cast<std::int64_t>(offset + i);
    result.non_finite_value = static_cast<double>(values[i]);
    return;
  }
}

/// Copies tensor `name` of the base to the output chunk by chunk: as raw
/// bytes when the output dtype is the stored one, converted otherwise.
/// F16, BF16, F32 and F64 elements are decoded to find non-finite values
/// either way, and written whatever they hold. The caller decides whether
/// a non-finite value is allowed. NOTE: F8 tensors are copied unchecked,
/// because cki does not decode F8.
template <typename Scalar>
CopyResult copy_tensor(const Checkpoint& base, const CheckpointTensor& tensor, DType out_dtype,
                       CheckpointWriter& writer) {
  CopyResult result;
  const std::uint64_t size = tensor.info.byte_size();
  const bool floating = is_spliceable(tensor.dtype());
  if (out_dtype == tensor.dtype() || size == 0) {
    std::vector<std::uint8_t> chunk(static_cast<std::size_t>(std::min<std::uint64_t>(size, kChunkBytes)));
    std::vector<Scalar> values;
    if (size == 0) writer.write_bytes(tensor.name(), chunk.data(), 0);
    for (std::uint64_t done = 0; done < size; done += chunk.size()) {
      const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), size - done));
      base.read_bytes(tensor, done, n, chunk.data());
      if (floating) {
        // kChunkBytes is a multiple of every element size, so chunks hold whole elements.
        const std::size_t element = dtype_size(tensor.dtype());
        values.resize(n / element);
        decode_values(tensor.dtype(), chunk.data(), values.size(), values.data());
        find_non_finite(values.data(), values.size(), done / element, result);
      }
      writer.write_bytes(tensor.name(), chunk.data(), n);
    }
    return result;
  }

  const std::size_t element = dtype_size(tensor.dtype());
  const std::size_t per_chunk = kChunkBytes / element;
  const auto count = static_cast<std::size_t>(shape_numel(tensor.shape()));
  std::vector<std::uint8_t> chunk(std::min(count, per_chunk) * element);
  std::vector<Scalar> values(std::min(count, per_chunk));
  for (std::size_t done = 0; done < count; done += per_chunk) {
    const std::size_t n = std::min(per_chunk, count - done);
    base.read_bytes(tensor, done * element, n * element, chunk.data());
    decode_values(tensor.dtype(), chunk.data(), n, values.data());
    find_non_finite(values.data(), n, done, result);
    result.clamped += writer.write(tensor.name(), values.data(), n);
  }
  return result;
}

/// Describes the non-finite element of a tensor copied from the base:
/// "NaN at index 3 ([0, 3]) in model 1 ('a.safetensors')".
inline std::string describe_non_finite(const CopyResult& found, const Shape& shape, const std::string& label) {
  return describe_non_finite(found.non_finite_value, found.first_non_finite, shape, label);
}

}  // namespace detail

/// Merges the checkpoints `inputs` with `policy` into `output`, streaming
/// one tensor at a time: every input tensor of a spliced tensor is read into
/// a compute-scalar buffer with pread, spliced with splice_tensor(), and
/// written converted to its output dtype. The result equals splice() on the
/// loaded weight sets, except that tensors copied from the base are copied
/// byte for byte rather than through the compute scalar.
///
/// `output` is a .safetensors file or a checkpoint folder (see
/// CheckpointWriter). Its metadata is the base's plus `cki_method` and
/// `cki_parameters` (JSON). Nothing appears at `output` unless the whole
/// merge succeeds. Returns the report, tensors in the base's order.
///
/// Non-finite values follow `options.splice.nan_policy`, for copied tensors
/// as well: no NaN or infinity is written unless the policy is allow and the
/// tensor is copied from the base, and the report's copy reason then names
/// the element. With `options.write.clamp`, values beyond the output dtype's
/// range are clamped and counted in TensorReport::clamped.
/// Throws std::invalid_argument for invalid options, IoError when `output`
/// is or contains an input or exists without `options.write.overwrite`,
/// when its folder has less free space than planned_output_size() (checked
/// before anything is written), or when a file operation fails, MismatchError for incompatible inputs, and
/// NumericError for a non-finite value that the NaN policy rejects or an
/// output value beyond its dtype without `options.write.clamp`.
/// \tparam Policy a splicing policy such as CkiSoft<Scalar> or AnyPolicy<Scalar>.
template <typename Scalar, typename Policy>
SpliceReport splice_checkpoints(const std::vector<Checkpoint>& inputs, const std::filesystem::path& output,
                                const Policy& policy, const StreamOptions& options = {}) {
  const StreamPlan plan = plan_stream<Scalar>(inputs, options);
  policy.check(inputs.size());

  // Inputs are never written over, nor deleted by replacing a folder.
  std::vector<std::filesystem::path> protected_paths;
  for (const Checkpoint& input : inputs) {
    protected_paths.push_back(input.path());
    for (const auto& path : input.file_paths()) protected_paths.push_back(path);
  }
  check_not_input(output, protected_paths);

  // Free space before any byte is written, so a full disk fails early.
  check_free_space(output, planned_output_size(plan));

  // Report header and output metadata.
  const Checkpoint& base = inputs[plan.base];
  SpliceReport report;
  report.method = policy.name();
  report.parameters = policy.parameters();
  report.base = plan.base;
  std::vector<std::string> labels;
  for (const Checkpoint& input : inputs) labels.push_back(input.path().string());
  report.models = labels;
  std::map<std::string, std::string> metadata = base.metadata();
  metadata[kMethodMetadataKey] = report.method;
  metadata[kParametersMetadataKey] = report.parameters.dump();

  // Writer over the base's tensors with their output dtypes.
  std::vector<TensorSpec> specs;
  std::unordered_map<std::string, std::size_t> position;
  for (std::size_t i = 0; i < plan.tensors.size(); ++i) {
    specs.push_back({plan.tensors[i].name, base.find(plan.tensors[i].name)->dtype(), plan.tensors[i].shape});
    position.emplace(plan.tensors[i].name, i);
  }
  CheckpointWriter writer(output, std::move(specs), metadata, options.write);

  // One buffer per model and one for the result, reused for every tensor.
  // They are allocated without initialisation, so only pages a tensor
  // touches become resident.
  const auto capacity = static_cast<std::size_t>(plan.largest_spliced);
  std::vector<std::unique_ptr<Scalar[]>> buffers;
  for (std::size_t k = 0; k < inputs.size() && capacity > 0; ++k) buffers.emplace_back(new Scalar[capacity]);
  std::unique_ptr<Scalar[]> merged(capacity > 0 ? new Scalar[capacity] : nullptr);

  report.tensors.resize(plan.tensors.size());
  std::uint64_t bytes_done = 0;
  std::size_t tensors_done = 0;
  for (const std::string& name : writer.order()) {
    const PlannedTensor& planned = plan.tensors[position.at(name)];
    const CheckpointTensor& base_tensor = *base.find(name);
    TensorReport& tensor_report = report.tensors[position.at(name)];

    if (!planned.spliced) {
      // Copied from the base: a non-finite value passes only under NaN policy allow.
      const detail::CopyResult copied = detail::copy_tensor<Scalar>(base, base_tensor, planned.out_dtype, writer);
      tensor_report.name = name;
      tensor_report.shape = planned.shape;
      tensor_report.dtype = base_tensor.dtype();
      tensor_report.copy_reason = planned.copy_reason;
      tensor_report.clamped = copied.clamped;
      if (copied.first_non_finite >= 0) {
        const std::string found = detail::describe_non_finite(copied, planned.shape,
                                                              detail::tensor_location(base, plan.base, base_tensor));
        if (options.splice.nan_policy != NanPolicy::allow) {
          throw NumericError("tensor '" + name + "' contains " + found + ". It is copied from the base (" +
                             planned.copy_reason + "), and NaN policy " + nan_policy_name(options.splice.nan_policy) +
                             " lets no non-finite value into the output; use NaN policy allow to copy it as it is");
        }
        tensor_report.copy_reason += "; " + found + ", passed through under nan policy allow";
      }
    } else {
      // Read every model's tensor, splice, write. Under NaN policy allow a
      // tensor with a non-finite input comes back copied from the base, and
      // only then may the output hold a non-finite value.
      std::vector<TensorView<Scalar>> views;
      for (std::size_t k = 0; k < inputs.size(); ++k) {
        const CheckpointTensor& tensor = *inputs[k].find(name);
        inputs[k].read(tensor, buffers[k].get());
        views.emplace_back(buffers[k].get(), tensor.shape());
      }
      tensor_report = splice_tensor(name, views, plan.base, policy, merged.get(), options.splice.threads,
                                    base_tensor.dtype(), labels, options.splice.nan_policy);
      const bool allow_non_finite = !tensor_report.spliced && options.splice.nan_policy == NanPolicy::allow;
      tensor_report.clamped =
          writer.write(name, merged.get(), static_cast<std::size_t>(shape_numel(planned.shape)), allow_non_finite);
    }

    bytes_done += planned.out_bytes;
    ++tensors_done;
    if (options.on_progress) {
      options.on_progress({tensors_done, plan.tensors.size(), name, bytes_done, plan.output_bytes});
    }
  }

  // Extra files beside the weights, then everything into place.
  if (!writer.folder().empty()) {
    for (const auto& file : plan.extra_files) {
      std::error_code error;
      std::filesystem::copy_file(file, writer.folder() / file.filename(), error);
      if (error) {
        throw IoError("cannot copy '" + file.string() + "' into the output '" + output.string() +
                      "': " + error.message());
      }
    }
  }
  writer.commit();
  return report;
}

}  // namespace cki
