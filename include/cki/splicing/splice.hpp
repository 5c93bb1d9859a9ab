// splice(): merge N weight sets with a splicing policy, tensor by tensor.
#pragma once

#include <fnmatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cki/assessment/context.hpp"
#include "cki/assessment/information_content.hpp"
#include "cki/dtype.hpp"
#include "cki/errors.hpp"
#include "cki/splicing/policy.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// Handling of a tensor that contains NaN or infinity in some model.
enum class NanPolicy {
  /// Throw NumericError naming the tensor, model and first index.
  error,
  /// Copy the tensor from the base when another model holds the non-finite
  /// value, noting it in the report; still an error when the base holds it.
  copy_base,
  /// Copy the tensor from the base whichever model holds the non-finite
  /// value (attention masks hold -inf on purpose), noting it in the report.
  allow,
};

/// Returns the name of `policy` as the tool spells it: "error", "copy-base" or "allow".
inline const char* nan_policy_name(NanPolicy policy) {
  switch (policy) {
    case NanPolicy::error: return "error";
    case NanPolicy::copy_base: return "copy-base";
    case NanPolicy::allow: return "allow";
  }
  return "unknown";
}

/// Parses a NaN policy name; returns nothing for an unknown one.
inline std::optional<NanPolicy> parse_nan_policy(const std::string& name) {
  for (NanPolicy policy : {NanPolicy::error, NanPolicy::copy_base, NanPolicy::allow}) {
    if (name == nan_policy_name(policy)) return policy;
  }
  return std::nullopt;
}

/// Options of splice() that are not parameters of the method.
struct SpliceOptions {
  /// Input index of the base model: the formulas order the models with the
  /// base first, ties in hard splicing go to it, and unspliced tensors and
  /// metadata are copied from it.
  std::size_t base = 0;
  /// Glob patterns (fnmatch: *, ?, [...]) of tensor names to splice; empty
  /// selects every tensor.
  std::vector<std::string> include;
  /// Glob patterns of tensor names to copy from the base instead; applied
  /// after `include`.
  std::vector<std::string> exclude;
  /// Threads for element loops; 0 uses the OpenMP default. Results are
  /// bit-identical for every thread count.
  int threads = 0;
  /// Handling of tensors with NaN or infinite elements.
  NanPolicy nan_policy = NanPolicy::error;

  /// Throws std::invalid_argument naming the field when it is out of range.
  void check(std::size_t n_models) const {
    if (base >= n_models) {
      throw std::invalid_argument("'base' must be in [0, " + std::to_string(n_models) + "), got " +
                                  std::to_string(base));
    }
    if (threads < 0) throw std::invalid_argument("'threads' must be >= 0, got " + std::to_string(threads));
  }
};

/// Merged weight set and the report of the merge.
template <typename Scalar>
struct SpliceResult {
  WeightSet<Scalar> merged;
  SpliceReport report;
};

/// True when `name` matches the shell glob `pattern` (*, ?, [...]).
inline bool glob_match(const std::string& pattern, const std::string& name) {
  return fnmatch(pattern.c_str(), name.c_str(), 0) == 0;
}

/// Returns why tensor `name` is copied from the base rather than spliced,
/// or nothing when it is spliced. The rules, in order: a single model; a
/// dtype that is not F16, BF16, F32 or F64; an empty tensor; no include
/// pattern matches; an exclude pattern matches.
inline std::optional<std::string> copy_reason(const SpliceOptions& options, const std::string& name,
                                              DType dtype, std::int64_t numel, std::size_t n_models) {
  if (n_models == 1) return std::string("single model");
  if (!is_spliceable(dtype)) return std::string("dtype ") + dtype_name(dtype) + " is not spliced";
  if (numel == 0) return std::string("empty tensor");
  if (!options.include.empty()) {
    const bool included = std::any_of(options.include.begin(), options.include.end(),
                                      [&](const std::string& pattern) { return glob_match(pattern, name); });
    if (!included) return std::string("matches no include pattern");
  }
  for (const auto& pattern : options.exclude) {
    if (glob_match(pattern, name)) return "excluded by pattern '" + pattern + "'";
  }
  return std::nullopt;
}

namespace detail {

template <typename Policy, typename = void>
struct has_checks_finite : std::false_type {};
template <typename Policy>
struct has_checks_finite<Policy, std::void_t<decltype(std::declval<const Policy&>().checks_finite())>>
    : std::true_type {};

template <typename Policy, typename Scalar, typename = void>
struct is_splicing_policy : std::false_type {};
template <typename Policy, typename Scalar>
struct is_splicing_policy<
    Policy, Scalar,
    std::void_t<decltype(std::string(std::declval<const Policy&>().name())),
                decltype(nlohmann::json(std::declval<const Policy&>().parameters())),
                decltype(std::declval<const Policy&>().check(std::size_t{})),
                decltype(TensorMergeResult(std::declval<const Policy&>().merge(
                    std::declval<const TensorContext&>(), std::declval<const std::vector<TensorView<Scalar>>&>(),
                    std::declval<Scalar*>())))>> : std::true_type {};

template <typename Policy>
bool policy_checks_finite(const Policy& policy) {
  if constexpr (has_checks_finite<Policy>::value) {
    return policy.checks_finite();
  } else {
    return false;
  }
}

/// Input indices with the base first, the others in input order.
inline std::vector<std::size_t> base_first_order(std::size_t n_models, std::size_t base) {
  std::vector<std::size_t> order{base};
  for (std::size_t k = 0; k < n_models; ++k) {
    if (k != base) order.push_back(k);
  }
  return order;
}

}  // namespace detail

/// Splices one tensor of N models into `out`, the building block of splice()
/// and of streamed merges.
///
/// `models` are in input order and must share one shape; `out` has room for
/// that many elements and may not alias an input. With one model the tensor is
/// copied. `dtype` is the storage dtype recorded in the report; `labels` name
/// the models in messages (file paths), in input order. Under a `nan_policy`
/// other than error, a tensor with a non-finite element is copied from the
/// base and the report says where the value was. Returns the tensor's report, with per-model stats in input order.
/// Throws std::invalid_argument for a bad base index or a policy that cannot
/// take N models, MismatchError for differing shapes, and NumericError
/// naming the tensor and first index of a NaN or infinite input element.
template <typename Scalar, typename Policy>
TensorReport splice_tensor(const std::string& name, const std::vector<TensorView<Scalar>>& models,
                           std::size_t base, const Policy& policy, Scalar* out, int threads = 0,
                           DType dtype = dtype_of<Scalar>(), const std::vector<std::string>& labels = {},
                           NanPolicy nan_policy = NanPolicy::error) {
  static_assert(detail::is_splicing_policy<Policy, Scalar>::value,
                "Policy needs name(), parameters(), check(std::size_t) and merge(const TensorContext&, "
                "const std::vector<TensorView<Scalar>>&, Scalar*) returning std::vector<ModelTensorStats> or "
                "TensorMergeResult, as documented on SplicingPolicy");
  if (models.empty()) throw std::invalid_argument("tensor '" + name + "': no models given");
  if (base >= models.size()) {
    throw std::invalid_argument("'base' must be in [0, " + std::to_string(models.size()) + "), got " +
                                std::to_string(base));
  }
  for (std::size_t k = 0; k < models.size(); ++k) {
    if (models[k].shape() != models[base].shape()) {
      throw MismatchError("tensor '" + name + "' has shape " + shape_to_string(models[base].shape()) +
                          " in model " + std::to_string(base + 1) + " but " +
                          shape_to_string(models[k].shape()) + " in model " + std::to_string(k + 1));
    }
  }

  TensorReport report;
  report.name = name;
  report.shape = models[base].shape();
  report.dtype = dtype;
  const TensorView<Scalar>& base_view = models[base];

  // One model, or nothing to merge: the base is the result.
  if (models.size() == 1 || base_view.empty()) {
    std::copy(base_view.data(), base_view.data() + base_view.size(), out);
    report.copy_reason = models.size() == 1 ? "single model" : "empty tensor";
    return report;
  }
  policy.check(models.size());

  // Inputs must be finite; CKI's information content checks while it scans.
  auto label_of = [&](std::size_t k) {
    std::string label = "model " + std::to_string(k + 1);
    if (k < labels.size() && !labels[k].empty()) label += " ('" + labels[k] + "')";
    return label;
  };
  if (nan_policy != NanPolicy::error) {
    // The base is scanned first, so copy-base fails on a non-finite base
    // whatever the other models hold.
    for (std::size_t k : detail::base_first_order(models.size(), base)) {
      const std::int64_t bad = detail::first_non_finite(models[k], threads);
      if (bad < 0) continue;
      if (nan_policy == NanPolicy::copy_base && k == base) detail::throw_non_finite(name, label_of(k), models[k], bad);
      std::copy(base_view.data(), base_view.data() + base_view.size(), out);
      const Scalar value = models[k][bad];
      report.copy_reason = std::string(std::isnan(value) ? "NaN" : "infinity") + " at " +
                           detail::element_position(bad, models[k].shape()) + " in " + label_of(k) +
                           ", copied from the base under nan policy " + nan_policy_name(nan_policy);
      return report;
    }
  }
  if (!detail::policy_checks_finite(policy)) {
    for (std::size_t k = 0; k < models.size(); ++k) {
      const std::int64_t bad = detail::first_non_finite(models[k], threads);
      if (bad >= 0) detail::throw_non_finite(name, label_of(k), models[k], bad);
    }
  }

  // The policy receives the base first.
  TensorContext context;
  context.name = name;
  context.shape = report.shape;
  context.order = detail::base_first_order(models.size(), base);
  context.threads = threads;
  for (std::size_t index : context.order) context.labels.push_back(label_of(index));
  std::vector<TensorView<Scalar>> ordered;
  ordered.reserve(models.size());
  for (std::size_t index : context.order) ordered.push_back(models[index]);
  TensorMergeResult result = policy.merge(context, ordered, out);

  // Back to input order for the report.
  report.spliced = true;
  report.models.resize(models.size());
  for (std::size_t i = 0; i < result.models.size() && i < models.size(); ++i) {
    report.models[context.order[i]] = result.models[i];
  }
  report.notes = std::move(result.notes);
  return report;
}

/// Merges N weight sets of one architecture into one with `policy`.
///
/// The sets must hold the same tensor names and shapes (order may differ);
/// the result has the base's tensor order, names, shapes, dtypes and
/// metadata. Tensors that copy_reason() rejects are copied from the base
/// without copying their storage. Returns the merged set and the report.
/// Throws std::invalid_argument for N = 0 or bad options or parameters,
/// MismatchError naming the tensor, values and sets that differ, and
/// NumericError naming the tensor and index of a non-finite input.
/// \tparam Policy a splicing policy, e.g. CkiSoft<Scalar>; see SplicingPolicy.
template <typename Scalar, typename Policy>
SpliceResult<Scalar> splice(const std::vector<WeightSet<Scalar>>& sets, const Policy& policy,
                            const SpliceOptions& options = {}) {
  if (sets.empty()) throw std::invalid_argument("no weight sets given; need at least one");
  options.check(sets.size());
  policy.check(sets.size());
  check_compatible(sets);

  const WeightSet<Scalar>& base = sets[options.base];
  SpliceResult<Scalar> result;
  result.merged.metadata() = base.metadata();
  result.report.method = policy.name();
  result.report.parameters = policy.parameters();
  result.report.base = options.base;
  std::vector<std::string> labels;
  for (std::size_t k = 0; k < sets.size(); ++k) {
    labels.push_back(sets[k].source());
    result.report.models.push_back(sets[k].source().empty() ? "model " + std::to_string(k + 1)
                                                           : sets[k].source());
  }
  const auto label_of = [&](std::size_t k) {
    std::string label = "model " + std::to_string(k + 1);
    if (!labels[k].empty()) label += " ('" + labels[k] + "')";
    return label;
  };

  for (const auto& entry : base) {
    // Tensors that are not spliced share the base's storage.
    const auto reason = copy_reason(options, entry.name, entry.dtype, entry.numel(), sets.size());
    if (reason) {
      result.merged.insert(entry);
      TensorReport copied;
      copied.name = entry.name;
      copied.shape = entry.shape;
      copied.dtype = entry.dtype;
      copied.copy_reason = *reason;
      // As in streamed merges, a copied floating tensor may carry a NaN or
      // infinity into the output only under NaN policy allow. One model is
      // returned unchanged, as splice_tensor() returns it.
      if (is_spliceable(entry.dtype) && sets.size() > 1) {
        const TensorView<Scalar> values = base.view(entry.name);
        const std::int64_t bad = detail::first_non_finite(values, options.threads);
        if (bad >= 0) {
          const std::string found = detail::describe_non_finite(values[bad], bad, entry.shape,
                                                                label_of(options.base));
          if (options.nan_policy != NanPolicy::allow) {
            throw NumericError("tensor '" + entry.name + "' contains " + found + ". It is copied from the base (" +
                               *reason + "), and NaN policy " + nan_policy_name(options.nan_policy) +
                               " lets no non-finite value into the output; use NaN policy allow to copy it as "
                               "it is");
          }
          copied.copy_reason += "; " + found + ", passed through under nan policy allow";
        }
      }
      result.report.tensors.push_back(std::move(copied));
      continue;
    }

    std::vector<TensorView<Scalar>> views;
    views.reserve(sets.size());
    for (const auto& set : sets) views.push_back(set.view(entry.name));
    Tensor<Scalar> merged(entry.shape);
    result.report.tensors.push_back(splice_tensor(entry.name, views, options.base, policy, merged.data(),
                                                  options.threads, entry.dtype, labels, options.nan_policy));
    result.merged.add(entry.name, std::move(merged), entry.dtype);
  }
  return result;
}

}  // namespace cki
