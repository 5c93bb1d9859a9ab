// Learned assessment maps of a whole model, and the splicing policy that
// replays them on the original weight sets with no training code.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/combination_rule.hpp"
#include "cki/assessment/compatibility_assessment.hpp"
#include "cki/assessment/context.hpp"
#include "cki/assessment/local_uncertainty.hpp"
#include "cki/learn/learnable_assessment.hpp"
#include "cki/splicing/any_policy.hpp"
#include "cki/splicing/policy.hpp"
#include "cki/splicing/report.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// Learned values of one tensor.
template <typename Scalar>
struct LearnedTensor {
  /// One map shared by all models, or one per model in input order. Empty
  /// for a rank-0 tensor, which takes no map.
  std::vector<AssessmentMap<Scalar>> maps;
  /// Learned temperature, or nothing when the temperature was fixed.
  std::optional<double> temperature;
};

/// Learned assessment of a whole model: the options it was learned with,
/// the selection of tensors, and the maps per selected tensor. Enough to
/// replay the learned merge on the original weight sets.
template <typename Scalar>
struct LearnedMaps {
  LearnOptions options;
  /// Number of models the maps were learned for.
  std::size_t model_count = 0;
  /// Input index of the base model.
  std::size_t base = 0;
  /// Include and exclude glob patterns of the selection (see SpliceOptions).
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  /// Learned tensors by name.
  std::map<std::string, LearnedTensor<Scalar>> tensors;

  /// Splice options that select the same tensors with the same base.
  SpliceOptions splice_options(int threads = 0) const {
    SpliceOptions options;
    options.base = base;
    options.include = include;
    options.exclude = exclude;
    options.threads = threads;
    return options;
  }

  /// Local uncertainty with every learned map set (set_map for a shared map,
  /// set_maps for per-model maps) and `options.params.scale`. With it, CkiSoft
  /// or CkiHard reproduces the learned merge exactly when the temperature
  /// was not learned. LearnedPolicy also covers learned temperatures.
  LocalUncertainty<Scalar> local_uncertainty() const {
    LocalUncertainty<Scalar> local(options.params.local());
    for (const auto& [name, tensor] : tensors) add_maps(local, name, tensor);
    return local;
  }

  /// Throws std::invalid_argument when the options are invalid for
  /// `model_count`, `base` is out of range, or a tensor has a map count other
  /// than 0, 1 (shared) or `model_count`, or a learned temperature while
  /// `options.learn_temperature` is clear (or the reverse).
  void check() const {
    options.check(model_count);
    if (base >= model_count) {
      throw std::invalid_argument("learned maps name base model " + std::to_string(base) + " of " +
                                  std::to_string(model_count) + " models");
    }
    for (const auto& [name, tensor] : tensors) {
      const std::size_t count = tensor.maps.size();
      const std::size_t expected = options.per_model ? model_count : 1;
      if (count != 0 && count != expected) {
        throw std::invalid_argument("tensor '" + name + "' has " + std::to_string(count) +
                                    " learned maps, expected " + std::to_string(expected) +
                                    (options.per_model ? " (one per model)" : " (one shared)"));
      }
      if (tensor.temperature.has_value() != options.learn_temperature) {
        throw std::invalid_argument("tensor '" + name + "' " +
                                    (tensor.temperature ? "has a learned temperature although "
                                                        : "has no learned temperature although ") +
                                    "'learn_temperature' is " + (options.learn_temperature ? "set" : "clear"));
      }
      if (tensor.temperature) CombinationRuleParams{options.params.rule, *tensor.temperature}.check();
    }
  }

  /// Sets the maps of tensor `name` on `local`: one shared or one per model.
  static void add_maps(LocalUncertainty<Scalar>& local, const std::string& name, const LearnedTensor<Scalar>& tensor) {
    if (tensor.maps.size() == 1) {
      local.set_map(name, tensor.maps.front());
    } else if (!tensor.maps.empty()) {
      local.set_maps(name, tensor.maps);
    }
  }
};

/// Splicing policy that replays learned maps: data-free CKI with the learned
/// assessment map of each tensor and, when the temperature was learned, each
/// tensor's own temperature. Tensors without learned values use the
/// identity map and `options.params`. Use it with splice() and the options of
/// LearnedMaps::splice_options(), or call splice_learned().
/// \tparam Scalar compute scalar, float or double.
/// \tparam Splice SoftSplice or HardSplice.
template <typename Scalar, typename Splice = SoftSplice>
class LearnedPolicy {
 public:
  using scalar_type = Scalar;
  using Inner = SplicingPolicy<Scalar, CompatibilityAssessment<Scalar>, Splice>;

  /// Throws std::invalid_argument when `maps` fails LearnedMaps::check().
  explicit LearnedPolicy(const LearnedMaps<Scalar>& maps)
      : params_(maps.options.params), model_count_(maps.model_count), base_(maps.base) {
    maps.check();
    shared_ = std::make_shared<const Inner>(make_inner(params_, maps.local_uncertainty()));
    for (const auto& [name, tensor] : maps.tensors) {
      if (!tensor.temperature) continue;
      CkiParams params = params_;
      params.temperature = *tensor.temperature;
      LocalUncertainty<Scalar> local(params.local());
      LearnedMaps<Scalar>::add_maps(local, name, tensor);
      own_temperature_.emplace(name, make_inner(params, std::move(local)));
    }
    learned_tensors_ = maps.tensors.size();
  }

  std::string name() const { return std::string("cki-learned-") + Splice::kName; }

  nlohmann::json parameters() const {
    nlohmann::json out = params_.to_json();
    out["learned_tensors"] = learned_tensors_;
    nlohmann::json temperatures = nlohmann::json::object();
    for (const auto& [name, policy] : own_temperature_) {
      temperatures[name] = policy.assessment().combination_rule().params().temperature;
    }
    if (!temperatures.empty()) out["learned_temperatures"] = std::move(temperatures);
    return out;
  }

  /// Throws std::invalid_argument unless `n_models` is the model count the
  /// maps were learned for.
  void check(std::size_t n_models) const {
    if (n_models != model_count_) {
      throw std::invalid_argument("learned maps are for " + std::to_string(model_count_) + " models, got " +
                                  std::to_string(n_models));
    }
    shared_->check(n_models);
  }

  bool checks_finite() const { return true; }

  /// Splices one tensor with its learned map and temperature. Throws
  /// std::invalid_argument when the merge's base model is not the one the
  /// maps were learned with, because per-model maps and the rule's model
  /// order depend on it.
  std::vector<ModelTensorStats> merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                                      Scalar* out) const {
    if (!context.order.empty() && context.order.front() != base_) {
      throw std::invalid_argument("learned maps were learned with base model " + std::to_string(base_) +
                                  ", but tensor '" + context.name + "' is merged with base model " +
                                  std::to_string(context.order.front()) + "; use LearnedMaps::splice_options()");
    }
    auto found = own_temperature_.find(context.name);
    const Inner& policy = found == own_temperature_.end() ? *shared_ : found->second;
    return policy.merge(context, models, out);
  }

 private:
  static Inner make_inner(const CkiParams& params, LocalUncertainty<Scalar> local) {
    return Inner(CompatibilityAssessment<Scalar>(InformationContent(params.information()),
                                                 GlobalWeight(params.global()), std::move(local),
                                                 CombinationRule(params.combination())));
  }

  CkiParams params_;
  std::size_t model_count_ = 0;
  std::size_t base_ = 0;
  std::size_t learned_tensors_ = 0;
  // Shared so that copies of the policy do not copy every map.
  std::shared_ptr<const Inner> shared_;
  std::unordered_map<std::string, Inner> own_temperature_;
};

/// Returns the replay policy of `maps` behind AnyPolicy, hard or soft as the
/// maps were learned, for tools that choose the method at run time.
/// Throws std::invalid_argument when `maps` fails LearnedMaps::check().
template <typename Scalar>
AnyPolicy<Scalar> make_learned_policy(const LearnedMaps<Scalar>& maps) {
  if (maps.options.hard) return AnyPolicy<Scalar>(LearnedPolicy<Scalar, HardSplice>(maps));
  return AnyPolicy<Scalar>(LearnedPolicy<Scalar, SoftSplice>(maps));
}

/// Replays a learned merge: splices `sets` (input order, as when learning)
/// with the learned maps, the learned selection and base. The result equals
/// LearnableSplice::forward() with the same maps, up to rounding.
/// Throws as splice() and LearnedMaps::check() do.
template <typename Scalar>
SpliceResult<Scalar> splice_learned(const std::vector<WeightSet<Scalar>>& sets, const LearnedMaps<Scalar>& maps,
                                    int threads = 0) {
  const SpliceOptions options = maps.splice_options(threads);
  if (maps.options.hard) return splice(sets, LearnedPolicy<Scalar, HardSplice>(maps), options);
  return splice(sets, LearnedPolicy<Scalar, SoftSplice>(maps), options);
}

}  // namespace cki
