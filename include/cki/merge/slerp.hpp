// SLERP: spherical linear interpolation between two models, tensor by tensor.
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

/// Parameters of SLERP.
struct SlerpParams {
  /// Interpolation position in [0, 1]: 0 returns the base, 1 the other
  /// model. Default 0.5.
  double t = 0.5;

  /// Throws std::invalid_argument naming the field when it is out of range.
  void check() const {
    if (!(t >= 0 && t <= 1)) detail::throw_out_of_range("t", "in [0, 1]", t);
  }

  nlohmann::json to_json() const { return {{"t", t}}; }

  /// Reads the fields present in `json` over the defaults; the result is
  /// checked. Throws std::invalid_argument for an unknown key, a value of
  /// the wrong type or out of range.
  static SlerpParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {"t"});
    SlerpParams params;
    if (json.is_object()) detail::read_number(json, "t", params.t);
    params.check();
    return params;
  }
};

/// |cos| above which SLERP interpolates linearly: the vectors are so close
/// to parallel that sin(angle) loses its precision.
inline constexpr double kSlerpParallelCosine = 0.9995;

/// SLERP of exactly two models, base v0 and other v1, each tensor flattened:
/// with cos(angle) = v0 . v1 / (|v0| |v1|) in double,
/// theta = sin((1 - t) angle) / sin(angle) v0 + sin(t angle) / sin(angle) v1.
/// When |cos| > 0.9995 or either vector has zero norm it falls back to
/// linear interpolation (1 - t) v0 + t v1, noted in the report.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class SlerpPolicy {
 public:
  using scalar_type = Scalar;

  SlerpPolicy() = default;
  /// Throws std::invalid_argument naming the field out of range.
  explicit SlerpPolicy(SlerpParams params) : params_(params) { params_.check(); }

  std::string name() const { return "slerp"; }
  nlohmann::json parameters() const { return params_.to_json(); }
  const SlerpParams& params() const { return params_; }

  /// Throws std::invalid_argument unless exactly two models are merged.
  void check(std::size_t n_models) const {
    params_.check();
    if (n_models != 2) {
      throw std::invalid_argument("slerp merges exactly 2 models, got " + std::to_string(n_models));
    }
  }

  /// Interpolates one tensor of two models (base first) into `out`. Each
  /// model's mean weight is its coefficient; the notes give the
  /// interpolation taken, the cosine, and the reason for a fallback.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const double t = params_.t;
    const Eigen::MatrixXd gram = detail::gram_matrix(models, 0, false, context.threads);
    const double norm0 = std::sqrt(gram(0, 0));
    const double norm1 = std::sqrt(gram(1, 1));

    // Linear interpolation unless both norms are positive and the vectors
    // are not near parallel.
    double coefficient0 = 1.0 - t;
    double coefficient1 = t;
    nlohmann::json notes;
    if (norm0 == 0 || norm1 == 0) {
      notes["interpolation"] = "linear";
      notes["fallback"] = norm0 == 0 ? "the base tensor has zero norm" : "the other tensor has zero norm";
    } else {
      const double cosine = std::clamp(gram(0, 1) / (norm0 * norm1), -1.0, 1.0);
      notes["cos"] = cosine;
      if (std::abs(cosine) > kSlerpParallelCosine) {
        notes["interpolation"] = "linear";
        notes["fallback"] = "|cos| > 0.9995: the tensors are near parallel";
      } else {
        const double angle = std::acos(cosine);
        const double sine = std::sin(angle);
        coefficient0 = std::sin((1.0 - t) * angle) / sine;
        coefficient1 = std::sin(t * angle) / sine;
        notes["interpolation"] = "slerp";
      }
    }

    const std::vector<Scalar> coefficients{static_cast<Scalar>(coefficient0), static_cast<Scalar>(coefficient1)};
    detail::linear_combination(models, coefficients, out, context.threads);
    return {detail::stats_with_mean_weights({coefficient0, coefficient1}), std::move(notes)};
  }

 private:
  SlerpParams params_;
};

}  // namespace cki
