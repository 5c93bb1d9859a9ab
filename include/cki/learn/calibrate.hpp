// Calibration of data-free CKI: a search over rule, hard or soft splicing,
// a, c, s, tau and bins against a caller's validation score.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/combination_rule.hpp"
#include "cki/assessment/compatibility_assessment.hpp"
#include "cki/splicing/policy.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// One point of the calibration space: every CKI parameter and the splicing.
struct CalibrationPoint {
  CkiParams params;
  bool hard = false;

  nlohmann::json to_json() const {
    nlohmann::json out = params.to_json();
    out["splice"] = hard ? "hard" : "soft";
    return out;
  }
};

/// Values to try per parameter. The grid is their Cartesian product, in the
/// nesting order rule, hard, a, c, scale, temperature, bins (bins varies
/// fastest). Every list must be non-empty and every value within the range
/// that CkiParams documents.
struct CalibrationSpace {
  std::vector<RuleKind> rules{RuleKind::softmax, RuleKind::blend, RuleKind::paired_softmax};
  /// false for soft splicing, true for hard splicing.
  std::vector<bool> hard{false, true};
  std::vector<double> a{0.2, 0.4, 0.6, 0.8};
  std::vector<double> c{5.0, 50.0, 500.0, 5000.0};
  std::vector<double> scale{1.0, 10.0, 100.0, 1000.0};
  std::vector<double> temperature{0.01, 0.1, 1.0};
  std::vector<int> bins{10, 30, 100};

  /// Number of grid points, valid or not.
  std::size_t grid_size() const {
    return rules.size() * hard.size() * a.size() * c.size() * scale.size() * temperature.size() * bins.size();
  }

  /// Throws std::invalid_argument for an empty list, naming it, or for a
  /// value out of range, naming the field and the value.
  void check() const {
    const auto require = [](bool non_empty, const char* field) {
      if (!non_empty) {
        throw std::invalid_argument(std::string("calibration space '") + field + "' is empty; give at least one value");
      }
    };
    require(!rules.empty(), "rules");
    require(!hard.empty(), "hard");
    require(!a.empty(), "a");
    require(!c.empty(), "c");
    require(!scale.empty(), "scale");
    require(!temperature.empty(), "temperature");
    require(!bins.empty(), "bins");
    for (double value : a) GlobalWeightParams{value, GlobalWeightParams{}.c}.check();
    for (double value : c) GlobalWeightParams{GlobalWeightParams{}.a, value}.check();
    for (double value : scale) LocalUncertaintyParams{value}.check();
    for (double value : temperature) CombinationRuleParams{RuleKind::softmax, value}.check();
    for (int value : bins) InformationContentParams{value}.check();
  }
};

/// Order of the trials when the budget covers only part of the grid.
enum class SearchOrder {
  /// Grid order: the first `budget` valid points.
  grid,
  /// A random subset: the valid points shuffled with `seed` (mt19937_64,
  /// which the C++ standard defines bit for bit, so every platform draws the
  /// same points).
  random,
};

/// Options of calibrate() that are not part of the space.
struct CalibrationOptions {
  SearchOrder order = SearchOrder::random;
  std::uint64_t seed = 0;
  /// Tries the reference parameters (CkiParams defaults, soft splicing)
  /// first when the space contains them, so the best score is never below
  /// that of data-free CKI with the defaults.
  bool defaults_first = true;
  /// Base, selection and threads of every trial's splice().
  SpliceOptions splice;
};

/// One evaluated point.
struct CalibrationTrial {
  CalibrationPoint point;
  /// The caller's score, higher is better. A NaN score never wins.
  double score = std::numeric_limits<double>::quiet_NaN();
  /// Wall time of the merge and the evaluation, in seconds.
  double seconds = 0.0;
};

/// Result of calibrate(): every trial in the order run, and the best.
struct CalibrationResult {
  std::vector<CalibrationTrial> trials;
  /// Index in `trials` of the highest finite score (the first on ties), or
  /// nothing when no trial scored a finite value.
  std::optional<std::size_t> best_index;
  /// Valid, distinct grid points, of which the budget covered `trials.size()`.
  std::size_t valid_points = 0;
  /// Grid points skipped without evaluation: blend and paired-softmax for a
  /// model count other than 2, and blend at every temperature after the
  /// first (blend uses no temperature).
  std::size_t skipped_points = 0;
  /// Wall time of the whole search, in seconds.
  double seconds = 0.0;

  /// Returns the best trial. Throws std::logic_error when no trial scored a
  /// finite value.
  const CalibrationTrial& best() const {
    if (!best_index) throw std::logic_error("calibration has no trial with a finite score");
    return trials[*best_index];
  }

  nlohmann::json to_json() const {
    nlohmann::json table = nlohmann::json::array();
    for (const auto& trial : trials) {
      nlohmann::json row = trial.point.to_json();
      row["score"] = std::isfinite(trial.score) ? nlohmann::json(trial.score) : nlohmann::json(nullptr);
      row["seconds"] = trial.seconds;
      table.push_back(std::move(row));
    }
    nlohmann::json out = {{"trials", std::move(table)},
                          {"valid_points", valid_points},
                          {"skipped_points", skipped_points},
                          {"seconds", seconds}};
    out["best"] = best_index ? nlohmann::json(*best_index) : nlohmann::json(nullptr);
    return out;
  }
};

/// Merges `sets` with data-free CKI at `point` (CkiSoft or CkiHard).
/// Throws as splice() does.
template <typename Scalar>
SpliceResult<Scalar> splice_calibrated(const std::vector<WeightSet<Scalar>>& sets, const CalibrationPoint& point,
                                       const SpliceOptions& options = {}) {
  if (point.hard) return splice(sets, CkiHard<Scalar>(point.params), options);
  return splice(sets, CkiSoft<Scalar>(point.params), options);
}

namespace detail {

/// Uniform integer in [0, range) from raw mt19937_64 output, by rejection,
/// so the draw does not depend on the standard library's distributions.
inline std::uint64_t uniform_index(std::mt19937_64& generator, std::uint64_t range) {
  const std::uint64_t limit = std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % range;
  std::uint64_t draw = generator();
  while (draw >= limit) draw = generator();
  return draw % range;
}

/// Valid, distinct points of `space` for `n_models` models, in grid order.
/// Adds the number of skipped grid points to `skipped`.
inline std::vector<CalibrationPoint> valid_points(const CalibrationSpace& space, std::size_t n_models,
                                                 std::size_t& skipped) {
  std::vector<CalibrationPoint> points;
  const std::size_t per_rule = space.grid_size() / space.rules.size();
  for (RuleKind rule : space.rules) {
    // Blend and paired softmax combine exactly 2 models (or pass 1 through).
    if (rule != RuleKind::softmax && n_models != 1 && n_models != 2) {
      skipped += per_rule;
      continue;
    }
    for (bool hard : space.hard) {
      for (double a : space.a) {
        for (double c : space.c) {
          for (double scale : space.scale) {
            for (std::size_t t = 0; t < space.temperature.size(); ++t) {
              for (int bins : space.bins) {
                if (rule == RuleKind::blend && t > 0) {
                  ++skipped;
                  continue;
                }
                CalibrationPoint point;
                point.hard = hard;
                point.params.rule = rule;
                point.params.a = a;
                point.params.c = c;
                point.params.scale = scale;
                point.params.temperature = space.temperature[t];
                point.params.bins = bins;
                points.push_back(point);
              }
            }
          }
        }
      }
    }
  }
  return points;
}

inline bool is_reference_point(const CalibrationPoint& point) {
  const CkiParams reference;
  return !point.hard && point.params.rule == reference.rule && point.params.a == reference.a &&
         point.params.c == reference.c && point.params.scale == reference.scale &&
         point.params.temperature == reference.temperature && point.params.bins == reference.bins;
}

}  // namespace detail

/// Searches data-free CKI parameters for the highest validation score.
///
/// Each trial merges `models` with splice() at one point of `space` and
/// calls `evaluate(merged)`, which returns a score to maximise (accuracy on
/// validation data, say). Invalid points (blend and paired softmax for
/// N != 2) and duplicates (blend at other temperatures) are skipped before
/// the search, so they spend no budget. At most `budget` trials run, chosen
/// by `options.order`. The trials depend only on the space, the model count,
/// the budget and the options, never on timing.
/// \tparam Evaluate callable as `double(const WeightSet<Scalar>&)`.
/// Throws std::invalid_argument for an invalid space or splice options,
/// whatever splice() throws, and whatever `evaluate` throws (the search stops).
template <typename Scalar, typename Evaluate>
CalibrationResult calibrate(const std::vector<WeightSet<Scalar>>& models, Evaluate&& evaluate,
                            const CalibrationSpace& space, std::size_t budget, const CalibrationOptions& options = {}) {
  static_assert(std::is_invocable_r_v<double, Evaluate&, const WeightSet<Scalar>&>,
                "evaluate must be callable as double(const WeightSet<Scalar>&)");
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  if (models.empty()) throw std::invalid_argument("no weight sets given; need at least one");
  space.check();
  options.splice.check(models.size());
  check_compatible(models);

  // Valid points, in the order they will be tried.
  CalibrationResult result;
  std::vector<CalibrationPoint> points = detail::valid_points(space, models.size(), result.skipped_points);
  result.valid_points = points.size();
  if (options.order == SearchOrder::random) {
    std::mt19937_64 generator(options.seed);
    for (std::size_t i = points.size(); i > 1; --i) {
      std::swap(points[i - 1], points[detail::uniform_index(generator, i)]);
    }
  }
  if (options.defaults_first) {
    auto reference = std::find_if(points.begin(), points.end(), detail::is_reference_point);
    if (reference != points.end()) std::rotate(points.begin(), reference, reference + 1);
  }

  // Trials, within the budget.
  const std::size_t count = std::min(budget, points.size());
  for (std::size_t i = 0; i < count; ++i) {
    const auto trial_started = Clock::now();
    CalibrationTrial trial;
    trial.point = points[i];
    const SpliceResult<Scalar> merged = splice_calibrated(models, trial.point, options.splice);
    trial.score = static_cast<double>(evaluate(merged.merged));
    trial.seconds = std::chrono::duration<double>(Clock::now() - trial_started).count();
    const bool better = std::isfinite(trial.score) &&
                        (!result.best_index || trial.score > result.trials[*result.best_index].score);
    if (better) result.best_index = result.trials.size();
    result.trials.push_back(std::move(trial));
  }
  result.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  return result;
}

}  // namespace cki
