// Combination rules: per-element model weights from global weights and local uncertainty.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/detail/format.hpp"

namespace cki {

/// The combination rules of CKI.
enum class RuleKind {
  /// Any N: e_k = g_k (1 - exp(-g_k (1 - l_k))), w = softmax(e / tau).
  softmax,
  /// N = 2: w_1 = g_1 l + (1 - g_1), w_2 = 1 - w_1, with l = l_1.
  blend,
  /// N = 2: e_1 = g_1 (1 - exp(-g_1 l)), e_2 = g_2 (1 - exp(-g_2 (1 - l))),
  /// w = softmax(e / tau), with l = l_1.
  paired_softmax,
};

/// Returns the name of `rule` as the tool spells it: "softmax", "blend" or
/// "paired-softmax".
inline const char* rule_name(RuleKind rule) {
  switch (rule) {
    case RuleKind::softmax: return "softmax";
    case RuleKind::blend: return "blend";
    case RuleKind::paired_softmax: return "paired-softmax";
  }
  return "unknown";
}

/// Parses a rule name; returns nothing for an unknown one.
inline std::optional<RuleKind> parse_rule(std::string_view name) {
  for (RuleKind rule : {RuleKind::softmax, RuleKind::blend, RuleKind::paired_softmax}) {
    if (name == rule_name(rule)) return rule;
  }
  return std::nullopt;
}

/// Parameters of the combination rule.
struct CombinationRuleParams {
  RuleKind rule = RuleKind::softmax;
  /// Softmax temperature tau of the softmax and paired-softmax rules;
  /// range (0, 1e6]. Lower values sharpen the weights.
  double temperature = 1.0;

  /// Throws std::invalid_argument naming the field when it is out of range.
  void check() const {
    if (!(temperature > 0.0 && temperature <= 1e6)) {
      detail::throw_out_of_range("temperature", "in (0, 1e6]", temperature);
    }
  }

  nlohmann::json to_json() const { return {{"rule", rule_name(rule)}, {"temperature", temperature}}; }
};

/// Combination rule: turns the global weights g (one per model) and the local
/// uncertainties l (one per element and model) into element weights w that
/// sum to 1 over the models. Models are ordered base first, so "model 1" of
/// the blend and paired rules is the base. With one model, w = 1.
///
/// Requirements of a substitute functor: `void check(std::size_t n_models)
/// const` and `void operator()(const std::vector<Scalar>& global_weights,
/// std::int64_t count, const BlockArray<Scalar>& l, BlockArray<Scalar>& w,
/// BlockArray<Scalar>& scratch) const`, which writes the first `count` rows of
/// `w`; `scratch` has the shape of `w` and holds nothing on entry.
class CombinationRule {
 public:
  CombinationRule() = default;
  explicit CombinationRule(CombinationRuleParams params) : params_(params) { params_.check(); }

  const CombinationRuleParams& params() const { return params_; }
  nlohmann::json parameters() const { return params_.to_json(); }

  /// Throws std::invalid_argument when the rule cannot combine `n_models`.
  void check(std::size_t n_models) const {
    if (n_models == 0) throw std::invalid_argument("no models to combine; need at least one");
    if (params_.rule != RuleKind::softmax && n_models != 1 && n_models != 2) {
      throw std::invalid_argument(std::string("rule '") + rule_name(params_.rule) +
                                  "' combines exactly 2 models, got " + std::to_string(n_models) +
                                  "; use rule 'softmax' for more");
    }
  }

  template <typename Scalar>
  void operator()(const std::vector<Scalar>& global_weights, std::int64_t count,
                  const BlockArray<Scalar>& l, BlockArray<Scalar>& w, BlockArray<Scalar>& scratch) const {
    const auto n = static_cast<Eigen::Index>(global_weights.size());
    if (n == 1) {
      w.col(0).head(count).setOnes();
      return;
    }
    const Scalar g1 = global_weights[0];
    switch (params_.rule) {
      case RuleKind::blend: {
        // w_1 = g_1 l + (1 - g_1), so trust in the base falls as l rises.
        w.col(0).head(count) = l.col(0).head(count) * g1 + (Scalar(1) - g1);
        w.col(1).head(count) = Scalar(1) - w.col(0).head(count);
        return;
      }
      case RuleKind::paired_softmax: {
        const Scalar g2 = global_weights[1];
        const auto l1 = l.col(0).head(count);
        w.col(0).head(count) = g1 * (Scalar(1) - (-g1 * l1).exp());
        w.col(1).head(count) = g2 * (Scalar(1) - (-g2 * (Scalar(1) - l1)).exp());
        softmax_in_place(n, count, w, scratch);
        return;
      }
      case RuleKind::softmax: {
        // The row maximum for the softmax is gathered while the scores are
        // still in cache.
        auto maximum = scratch.col(0).head(count);
        for (Eigen::Index k = 0; k < n; ++k) {
          const Scalar g = global_weights[static_cast<std::size_t>(k)];
          w.col(k).head(count) = g * (Scalar(1) - (-g * (Scalar(1) - l.col(k).head(count))).exp());
          if (k == 0) {
            maximum = w.col(0).head(count);
          } else {
            maximum = maximum.max(w.col(k).head(count));
          }
        }
        softmax_in_place(n, count, w, scratch, true);
        return;
      }
    }
  }

 private:
  // Replaces the scores e in the first `count` rows of `w` by softmax(e / tau)
  // across the n columns, shifted by the row maximum so exp never overflows.
  // The maximum is in scratch column 0 when `has_maximum` is set. Each row
  // is scaled by the reciprocal of its total, one division per row rather
  // than one per weight.
  template <typename Scalar>
  void softmax_in_place(Eigen::Index n, std::int64_t count, BlockArray<Scalar>& w,
                        BlockArray<Scalar>& scratch, bool has_maximum = false) const {
    const Scalar inverse_temperature = Scalar(1) / static_cast<Scalar>(params_.temperature);
    auto maximum = scratch.col(0).head(count);
    auto total = scratch.col(1).head(count);
    if (!has_maximum) {
      maximum = w.col(0).head(count);
      for (Eigen::Index k = 1; k < n; ++k) maximum = maximum.max(w.col(k).head(count));
    }
    for (Eigen::Index k = 0; k < n; ++k) {
      w.col(k).head(count) = ((w.col(k).head(count) - maximum) * inverse_temperature).exp();
      if (k == 0) {
        total = w.col(0).head(count);
      } else {
        total += w.col(k).head(count);
      }
    }
    total = total.inverse();
    for (Eigen::Index k = 0; k < n; ++k) w.col(k).head(count) *= total;
  }

  CombinationRuleParams params_;
};

}  // namespace cki
