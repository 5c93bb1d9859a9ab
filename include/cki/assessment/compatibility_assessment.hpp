// Compatibility assessment: information content, global weight, local
// uncertainty and a combination rule composed into per-element weights.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/combination_rule.hpp"
#include "cki/assessment/context.hpp"
#include "cki/assessment/global_weight.hpp"
#include "cki/assessment/information_content.hpp"
#include "cki/assessment/local_uncertainty.hpp"
#include "cki/assessment/softmax_curves.hpp"
#include "cki/detail/traits.hpp"

namespace cki {

/// Every parameter of data-free CKI in one struct, with the reference's
/// defaults. See the member structs for ranges.
struct CkiParams {
  /// Histogram bins B of the information content; range [1, 1e6].
  int bins = 10;
  /// Amplitude a of the global weight; range (0, 1).
  double a = 0.4;
  /// Steepness c of the global weight (per nat); range (0, 1e12].
  double c = 500.0;
  /// Scale s of the local uncertainty's logistic; range (0, 1e6].
  double scale = 1.0;
  /// Softmax temperature tau; range (0, 1e6].
  double temperature = 1.0;
  RuleKind rule = RuleKind::softmax;

  InformationContentParams information() const { return {bins}; }
  GlobalWeightParams global() const { return {a, c}; }
  LocalUncertaintyParams local() const { return {scale}; }
  CombinationRuleParams combination() const { return {rule, temperature}; }

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    information().check();
    global().check();
    local().check();
    combination().check();
  }

  nlohmann::json to_json() const {
    return {{"bins", bins}, {"a", a},         {"c", c},
            {"scale", scale}, {"temperature", temperature}, {"rule", rule_name(rule)}};
  }
};

/// Global assessment of one tensor: entropies and global weights per model,
/// base first.
struct GlobalAssessment {
  std::vector<double> entropy;
  std::vector<double> global_weight;
};

/// Compatibility assessment of N models: per tensor, the information content
/// of each model gives global weights; per element, the local uncertainty and
/// the combination rule give N weights that sum to 1.
///
/// Any part can be replaced by a user functor meeting the requirements listed
/// on the default type; a functor that lacks them fails to compile with a
/// message naming the missing member.
/// \tparam Scalar compute scalar, float or double.
/// \tparam Info information content, e.g. InformationContent.
/// \tparam Global global weight, e.g. GlobalWeight.
/// \tparam Local local uncertainty, e.g. LocalUncertainty<Scalar>.
/// \tparam Rule combination rule, e.g. CombinationRule.
template <typename Scalar, typename Info = InformationContent, typename Global = GlobalWeight,
          typename Local = LocalUncertainty<Scalar>, typename Rule = CombinationRule>
class CompatibilityAssessment {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "cki computes in float or double");
  static_assert(detail::is_information_content<Info, Scalar>::value,
                "Info needs 'double operator()(const TensorView<Scalar>&, const std::string&, int) const'");
  static_assert(detail::is_global_weight<Global>::value,
                "Global needs 'std::vector<double> operator()(const std::vector<double>&) const'");
  static_assert(detail::is_local_uncertainty<Local, Scalar>::value,
                "Local needs 'void check_tensor(const TensorContext&) const' and 'void operator()(const "
                "TensorContext&, const Scalar* const*, std::int64_t, BlockArray<Scalar>&, "
                "BlockArray<Scalar>&) const'");
  static_assert(detail::is_combination_rule<Rule, Scalar>::value,
                "Rule needs 'void check(std::size_t) const' and 'void operator()(const "
                "std::vector<Scalar>&, std::int64_t, const BlockArray<Scalar>&, BlockArray<Scalar>&, "
                "BlockArray<Scalar>&) const'");

 public:
  using scalar_type = Scalar;

  CompatibilityAssessment() = default;

  /// Builds the default parts from `params`. Throws std::invalid_argument
  /// naming the first field out of range.
  explicit CompatibilityAssessment(const CkiParams& params)
      : info_(params.information()),
        global_(params.global()),
        local_(params.local()),
        rule_(params.combination()) {}

  CompatibilityAssessment(Info info, Global global, Local local, Rule rule)
      : info_(std::move(info)), global_(std::move(global)), local_(std::move(local)), rule_(std::move(rule)) {}

  const Info& information_content() const { return info_; }
  const Global& global_weight() const { return global_; }
  const Local& local_uncertainty() const { return local_; }
  Local& local_uncertainty() { return local_; }
  const Rule& combination_rule() const { return rule_; }

  /// Throws std::invalid_argument when the parts cannot combine `n_models`.
  void check(std::size_t n_models) const { rule_.check(n_models); }

  /// True when the local uncertainty needs blocks of whole rows of the last
  /// dimension for this tensor (an assessment map; any local functor without
  /// `needs_whole_rows`).
  bool needs_whole_rows(const TensorContext& context) const { return detail::needs_whole_rows(local_, context); }

  nlohmann::json parameters() const {
    nlohmann::json out = nlohmann::json::object();
    for (const auto& part : {detail::parameters_of(info_), detail::parameters_of(global_),
                             detail::parameters_of(local_), detail::parameters_of(rule_)}) {
      if (part.is_object()) out.update(part);
    }
    return out;
  }

  /// Entropies and global weights of the N models of one tensor (base first).
  /// Throws NumericError for a non-finite element and std::invalid_argument
  /// for an assessment map that does not fit the tensor.
  GlobalAssessment assess_tensor(const TensorContext& context,
                                 const std::vector<TensorView<Scalar>>& models) const {
    local_.check_tensor(context);
    GlobalAssessment out;
    out.entropy.reserve(models.size());
    for (std::size_t k = 0; k < models.size(); ++k) {
      try {
        out.entropy.push_back(info_(models[k], context.name, context.threads));
      } catch (const NumericError& error) {
        if (k >= context.labels.size()) throw;
        throw NumericError(std::string(error.what()) + " in " + context.labels[k]);
      }
    }
    out.global_weight = global_(out.entropy);
    if (out.global_weight.size() != models.size()) {
      throw std::invalid_argument("global weight functor returned " + std::to_string(out.global_weight.size()) +
                                  " weights for " + std::to_string(models.size()) + " models");
    }
    return out;
  }

  /// Returns the element weights of this tensor as fitted curves (see
  /// detail::SoftmaxCurves) when the default local uncertainty and the
  /// softmax rule compute them in float and the tensor has no assessment
  /// map. Returns nothing otherwise, or when the curves miss their error
  /// bound.
  /// `global_weights` are base first, as assess_tensor() returns them.
  std::optional<detail::SoftmaxCurves> softmax_curves(const TensorContext& context,
                                                      const std::vector<double>& global_weights) const {
    if constexpr (std::is_same_v<Scalar, float> && std::is_same_v<Local, LocalUncertainty<float>> &&
                  std::is_same_v<Rule, CombinationRule>) {
      if (global_weights.size() >= 2 && rule_.params().rule == RuleKind::softmax &&
          local_.maps_for(context.name) == nullptr) {
        // The rule uses the global weights rounded to float, so the curves
        // start from the same values, and equal weights give equal curves.
        std::vector<double> rounded;
        for (double weight : global_weights) rounded.push_back(static_cast<float>(weight));
        return detail::SoftmaxCurves::fit(rounded, rule_.params().temperature, local_.params().scale);
      }
    } else {
      (void)context;
      (void)global_weights;
    }
    return std::nullopt;
  }

  /// Writes the element weights of one block into the first `count` rows of
  /// `w`. `block` holds N pointers (base first) to the block's first element;
  /// `l` and `scratch` are work buffers of the shape of `w`.
  void assess_block(const TensorContext& context, const std::vector<Scalar>& global_weights,
                    const Scalar* const* block, std::int64_t count, BlockArray<Scalar>& l,
                    BlockArray<Scalar>& w, BlockArray<Scalar>& scratch) const {
    local_(context, block, count, l, scratch);
    rule_(global_weights, count, l, w, scratch);
  }

 private:
  Info info_;
  Global global_;
  Local local_;
  Rule rule_;
};

}  // namespace cki
