// Model stock: move from the base toward the mean of the fine-tunes by a
// ratio set by the angle between their task vectors.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/merge/common.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Parameters of model stock. The method has none; the struct keeps the
/// interface of the other methods.
struct ModelStockParams {
  /// Does nothing, because model stock has no parameters.
  void check() const {}

  nlohmann::json to_json() const { return nlohmann::json::object(); }

  /// Throws std::invalid_argument for any key in `json`.
  static ModelStockParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {});
    return {};
  }
};

/// |1 + (N - 1) cos| at or below which model stock's ratio is treated as
/// undefined and the tensor falls back to the plain mean of the fine-tunes.
inline constexpr double kModelStockMinDenominator = 1e-6;

/// Model stock with N >= 2 fine-tunes: cos is the mean over pairs of the
/// cosine between their deltas tau_k = theta_k - theta_base (in double,
/// clamped to [-1, 1]), t = N cos / (1 + (N - 1) cos), and
/// theta = t * mean_k theta_k + (1 - t) theta_base. Where a delta is zero or
/// |1 + (N - 1) cos| <= 1e-6 the tensor is the plain mean of the fine-tunes,
/// and the report's notes give the reason.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class ModelStockPolicy {
 public:
  using scalar_type = Scalar;

  ModelStockPolicy() = default;
  explicit ModelStockPolicy(ModelStockParams params) : params_(params) { params_.check(); }

  std::string name() const { return "model-stock"; }
  nlohmann::json parameters() const { return params_.to_json(); }

  /// Throws std::invalid_argument for fewer than 3 models (the base and 2
  /// fine-tunes).
  void check(std::size_t n_models) const {
    params_.check();
    if (n_models < 3) {
      throw std::invalid_argument("model-stock needs the base and at least 2 fine-tunes (3 models), got " +
                                  std::to_string(n_models) + " models");
    }
  }

  /// Merges one tensor of N models (base first) into `out`. Each model's
  /// mean weight is its coefficient; the notes give cos and t, or the
  /// fallback and its reason.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const std::size_t n = models.size();
    const std::size_t fine_tunes = n - 1;
    const Eigen::MatrixXd gram = detail::gram_matrix(models, 1, true, context.threads);
    nlohmann::json notes;

    // A zero delta has no direction.
    std::string fallback;
    for (std::size_t a = 0; a < fine_tunes && fallback.empty(); ++a) {
      const auto index = static_cast<Eigen::Index>(a);
      if (gram(index, index) == 0) {
        fallback = "the delta of model " + std::to_string(context.order[a + 1] + 1) + " is zero";
      }
    }

    // Mean pairwise cosine and the interpolation ratio t.
    double t = 0;
    if (fallback.empty()) {
      double cosine_sum = 0;
      std::size_t pairs = 0;
      for (Eigen::Index a = 0; a < static_cast<Eigen::Index>(fine_tunes); ++a) {
        for (Eigen::Index b = a + 1; b < static_cast<Eigen::Index>(fine_tunes); ++b) {
          const double cosine = gram(a, b) / std::sqrt(gram(a, a) * gram(b, b));
          cosine_sum += std::clamp(cosine, -1.0, 1.0);
          ++pairs;
        }
      }
      const double cosine = cosine_sum / static_cast<double>(pairs);
      const double count = static_cast<double>(fine_tunes);
      const double denominator = 1.0 + (count - 1.0) * cosine;
      notes["cos"] = cosine;
      if (std::abs(denominator) <= kModelStockMinDenominator) {
        fallback = "1 + (N - 1) cos = " + detail::format_value(denominator) + " is too close to 0";
      } else {
        t = count * cosine / denominator;
        notes["t"] = t;
      }
    }

    // Coefficients: 1 - t for the base, t / N for each fine-tune; the
    // fallback gives the base 0 and each fine-tune 1 / N.
    std::vector<double> weights(n);
    if (fallback.empty()) {
      weights[0] = 1.0 - t;
      for (std::size_t k = 1; k < n; ++k) weights[k] = t / static_cast<double>(fine_tunes);
    } else {
      notes["fallback"] = "plain mean of the fine-tunes: " + fallback;
      weights[0] = 0.0;
      for (std::size_t k = 1; k < n; ++k) weights[k] = 1.0 / static_cast<double>(fine_tunes);
    }
    std::vector<Scalar> coefficients(weights.begin(), weights.end());
    detail::linear_combination(models, coefficients, out, context.threads);
    return {detail::stats_with_mean_weights(weights), std::move(notes)};
  }

 private:
  ModelStockParams params_;
};

}  // namespace cki
