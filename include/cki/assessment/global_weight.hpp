// Global weight of each model for one tensor, from the gaps between entropies.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/detail/format.hpp"

namespace cki {

/// Parameters of the global weight.
struct GlobalWeightParams {
  /// Amplitude a of the arctan term; range (0, 1). At a -> 1 a model with a
  /// much higher entropy takes all of the global weight.
  double a = 0.4;
  /// Steepness c of the arctan in the entropy gap (per nat); range (0, 1e12].
  double c = 500.0;

  /// Throws std::invalid_argument naming the field when it is out of range.
  void check() const {
    if (!(a > 0.0 && a < 1.0)) {
      detail::throw_out_of_range("a", "in (0, 1)", a);
    }
    if (!(c > 0.0 && c <= 1e12)) {
      detail::throw_out_of_range("c", "in (0, 1e12]", c);
    }
  }

  nlohmann::json to_json() const { return {{"a", a}, {"c", c}}; }
};

/// Global weight: arctan of the entropy gap between a model and the others.
/// For N models with entropies H_k,
///   g_k proportional to 1/N + (2a / (pi N)) arctan(c (H_k - mean_{j != k} H_j)),
/// normalised to sum to 1. At N = 2 this is g_1 = 1/2 + (a/pi) arctan(c (H_1 - H_2))
/// and g_2 = 1 - g_1; at N = 1, g_1 = 1. Every term is positive because a < 1.
///
/// Requirements of a substitute functor: `std::vector<double> operator()(const
/// std::vector<double>& entropies) const` returning N weights that sum to 1.
class GlobalWeight {
 public:
  GlobalWeight() = default;
  explicit GlobalWeight(GlobalWeightParams params) : params_(params) { params_.check(); }

  const GlobalWeightParams& params() const { return params_; }
  nlohmann::json parameters() const { return params_.to_json(); }

  /// Returns one weight per model, in the order of `entropies`.
  /// Throws std::invalid_argument when `entropies` is empty.
  std::vector<double> operator()(const std::vector<double>& entropies) const {
    const std::size_t n = entropies.size();
    if (n == 0) throw std::invalid_argument("global weight needs at least one entropy");
    if (n == 1) return {1.0};

    const double pi = std::acos(-1.0);
    if (n == 2) {
      // The two-model form, evaluated directly so that g_2 = 1 - g_1 exactly.
      const double first = 0.5 + params_.a / pi * std::atan(params_.c * (entropies[0] - entropies[1]));
      return {first, 1.0 - first};
    }

    double total_entropy = 0.0;
    for (double entropy : entropies) total_entropy += entropy;

    std::vector<double> weights(n);
    double total = 0.0;
    for (std::size_t k = 0; k < n; ++k) {
      const double others_mean = (total_entropy - entropies[k]) / static_cast<double>(n - 1);
      const double gap = entropies[k] - others_mean;
      weights[k] = 1.0 / static_cast<double>(n) +
                   2.0 * params_.a / (pi * static_cast<double>(n)) * std::atan(params_.c * gap);
      total += weights[k];
    }
    for (double& weight : weights) weight /= total;
    return weights;
  }

 private:
  GlobalWeightParams params_;
};

}  // namespace cki
