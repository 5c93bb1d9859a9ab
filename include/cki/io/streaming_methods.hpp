// Inputs of baseline merge methods for streamed merges: Fisher tensors read
// from checkpoints on demand, and the whole-model TIES prepass read from the
// checkpoints tensor by tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cki/errors.hpp"
#include "cki/io/sharded.hpp"
#include "cki/io/streaming.hpp"
#include "cki/merge/fisher.hpp"
#include "cki/merge/ties.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Checks that `fisher` contains one Fisher checkpoint per model of `plan`,
/// each with every tensor the plan splices, of the same shape and a
/// floating dtype (F16, BF16, F32 or F64). Fisher checkpoint k belongs to
/// input model k. Throws std::invalid_argument for a wrong count, and
/// MismatchError naming the tensor, the Fisher file and both shapes.
inline void check_fisher_checkpoints(const StreamPlan& plan, const std::vector<Checkpoint>& fisher) {
  if (fisher.size() != plan.model_count) {
    throw std::invalid_argument("fisher needs one Fisher checkpoint per model (" + std::to_string(plan.model_count) +
                                " in input order), got " + std::to_string(fisher.size()));
  }
  for (std::size_t k = 0; k < fisher.size(); ++k) {
    const std::string label = "the Fisher checkpoint of model " + std::to_string(k + 1) + " ('" +
                              fisher[k].path().string() + "')";
    for (const PlannedTensor& planned : plan.tensors) {
      if (!planned.spliced) continue;
      const CheckpointTensor* tensor = fisher[k].find(planned.name);
      if (tensor == nullptr) {
        throw MismatchError("tensor '" + planned.name + "' is missing from " + label);
      }
      if (tensor->shape() != planned.shape) {
        throw MismatchError("tensor '" + planned.name + "' has shape " + shape_to_string(planned.shape) +
                            " in the models but " + shape_to_string(tensor->shape()) + " in " + label);
      }
      if (!is_spliceable(tensor->dtype())) {
        throw MismatchError("tensor '" + planned.name + "' has dtype " + dtype_name(tensor->dtype()) + " in " +
                            label + "; Fisher values must be F16, BF16, F32 or F64");
      }
    }
  }
}

/// Returns a FisherSource that reads tensor `name` of every Fisher
/// checkpoint, one per model in input order, when the policy requests it.
/// Only one tensor's Fisher values are in memory at a time, so a streamed
/// Fisher merge keeps about 2N + 1 buffers of the largest tensor in memory.
/// Run check_fisher_checkpoints() first, so a missing tensor is found before
/// the merge starts. The source throws MismatchError for a tensor missing
/// from a Fisher checkpoint and IoError for a failed read.
template <typename Scalar>
FisherSource<Scalar> fisher_from_checkpoints(std::vector<Checkpoint> fisher) {
  auto checkpoints = std::make_shared<const std::vector<Checkpoint>>(std::move(fisher));
  return [checkpoints](const std::string& name) {
    FisherTensors<Scalar> tensors;
    std::vector<std::shared_ptr<Scalar[]>> buffers;
    for (const Checkpoint& checkpoint : *checkpoints) {
      const CheckpointTensor* tensor = checkpoint.find(name);
      if (tensor == nullptr) {
        throw MismatchError("tensor '" + name + "' is missing from the Fisher checkpoint '" +
                            checkpoint.path().string() + "'");
      }
      const auto count = static_cast<std::size_t>(shape_numel(tensor->shape()));
      std::shared_ptr<Scalar[]> buffer(new Scalar[count > 0 ? count : 1]);
      checkpoint.read(*tensor, buffer.get());
      tensors.models.emplace_back(buffer.get(), tensor->shape());
      buffers.push_back(std::move(buffer));
    }
    tensors.storage = std::make_shared<const std::vector<std::shared_ptr<Scalar[]>>>(std::move(buffers));
    return tensors;
  };
}

/// Runs the whole-model TIES prepass (TiesModelScope) over checkpoints,
/// reading each tensor with pread, on the tensors splice_checkpoints() will
/// splice with `options`. A tensor with NaN or infinity in some model is left
/// out under NaN policies copy-base and allow, because the merge copies it
/// from the base. Each pass reads every such tensor of every model once
/// (2 passes for float, 4 for double, plus one when ties at the threshold
/// must be split), and memory stays at N buffers of the largest tensor.
/// Throws std::invalid_argument for a density outside [0, 1] or invalid
/// options, MismatchError for incompatible inputs, NumericError naming the
/// tensor, index and file of a non-finite element that the NaN policy
/// rejects, and IoError for a failed read.
template <typename Scalar>
std::shared_ptr<const TiesModelThresholds> stream_ties_thresholds(const std::vector<Checkpoint>& inputs,
                                                                  double density, const StreamOptions& options = {}) {
  const StreamPlan plan = plan_stream<Scalar>(inputs, options);
  TiesModelScope<Scalar> scope(density, inputs.size(), plan.base, options.splice.threads);
  const auto capacity = static_cast<std::size_t>(plan.largest_spliced);
  std::vector<std::unique_ptr<Scalar[]>> buffers;
  for (std::size_t k = 0; k < inputs.size() && capacity > 0; ++k) buffers.emplace_back(new Scalar[capacity]);

  // Reads tensor `name` of every model into the buffers.
  const auto read_all = [&](const std::string& name) {
    std::vector<TensorView<Scalar>> views;
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      const CheckpointTensor& tensor = *inputs[k].find(name);
      inputs[k].read(tensor, buffers[k].get());
      views.emplace_back(buffers[k].get(), tensor.shape());
    }
    return views;
  };

  // First pass: choose the tensors the merge splices, then count them.
  std::vector<std::string> names;
  for (const PlannedTensor& planned : plan.tensors) {
    if (!planned.spliced) continue;
    const std::vector<TensorView<Scalar>> views = read_all(planned.name);
    bool finite = true;
    for (std::size_t k : detail::base_first_order(inputs.size(), plan.base)) {
      const std::int64_t bad = detail::first_non_finite(views[k], options.splice.threads);
      if (bad < 0) continue;
      const bool base_rejected = options.splice.nan_policy == NanPolicy::copy_base && k == plan.base;
      if (options.splice.nan_policy == NanPolicy::error || base_rejected) {
        detail::throw_non_finite(planned.name, detail::tensor_location(inputs[k], k, *inputs[k].find(planned.name)),
                                 views[k], bad);
      }
      finite = false;
      break;
    }
    if (!finite) continue;
    names.push_back(planned.name);
    scope.add_tensor(planned.name, views);
  }
  scope.end_pass();

  // Later passes over the same tensors until the thresholds are exact.
  while (scope.needs_pass()) {
    for (const std::string& name : names) scope.add_tensor(name, read_all(name));
    scope.end_pass();
  }
  return scope.thresholds();
}

}  // namespace cki
