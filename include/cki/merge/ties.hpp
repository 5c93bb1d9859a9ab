// TIES merging: trim each task vector to its largest entries, elect a sign
// per element, and average the entries that agree with it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/assessment/information_content.hpp"
#include "cki/detail/parallel.hpp"
#include "cki/errors.hpp"
#include "cki/merge/common.hpp"
#include "cki/splicing/report.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// Trim scope of TIES: the set of deltas whose magnitudes are ranked together.
enum class TiesScope {
  /// Each tensor on its own (as mergekit does).
  tensor,
  /// All spliced tensors of a model together (as the TIES authors' code
  /// does); needs the thresholds of a TiesModelScope prepass.
  model,
};

/// Returns the name of `scope`: "tensor" or "model".
inline const char* ties_scope_name(TiesScope scope) { return scope == TiesScope::model ? "model" : "tensor"; }

/// Parses "tensor" or "model"; returns nothing for another name.
inline std::optional<TiesScope> parse_ties_scope(std::string_view name) {
  if (name == "tensor") return TiesScope::tensor;
  if (name == "model") return TiesScope::model;
  return std::nullopt;
}

/// Returns how many of `count` entries a trim to `density` keeps:
/// floor(density * count + 1e-9), within [0, count]. The 1e-9 absorbs the
/// rounding of density * count, so 0.29 * 100 keeps 29, not 28.
inline std::int64_t trim_keep_count(double density, std::int64_t count) {
  const double kept = std::floor(density * static_cast<double>(count) + 1e-9);
  if (kept <= 0) return 0;
  if (kept >= static_cast<double>(count)) return count;
  return static_cast<std::int64_t>(kept);
}

/// Parameters of TIES merging.
struct TiesParams {
  /// One weight per model in input order, each finite and >= 0; the base's
  /// entry is ignored. Empty (the default) gives every fine-tune weight 1.
  std::vector<double> weights;
  /// Scale lambda of the merged delta; finite, default 1.
  double lambda = 1.0;
  /// Share of each task vector's entries kept by the trim, in [0, 1];
  /// default 0.2, the top 20% the TIES authors' README runs with.
  double density = 0.2;
  /// Trim per tensor (default) or over the whole model.
  TiesScope scope = TiesScope::tensor;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    detail::check_weight_values(weights, false);
    if (!std::isfinite(lambda)) detail::throw_out_of_range("lambda", "finite", lambda);
    if (!(density >= 0 && density <= 1)) detail::throw_out_of_range("density", "in [0, 1]", density);
  }

  nlohmann::json to_json() const {
    return {{"weights", weights}, {"lambda", lambda}, {"density", density}, {"scope", ties_scope_name(scope)}};
  }

  /// Reads the fields present in `json` over the defaults; the result is
  /// checked. Throws std::invalid_argument for an unknown key, a value of
  /// the wrong type or out of range.
  static TiesParams from_json(const nlohmann::json& json) {
    detail::reject_unknown_keys(json, {"weights", "lambda", "density", "scope"});
    TiesParams params;
    if (json.is_object()) {
      detail::read_number_list(json, "weights", params.weights);
      detail::read_number(json, "lambda", params.lambda);
      detail::read_number(json, "density", params.density);
      if (json.contains("scope")) {
        const nlohmann::json& item = json.at("scope");
        const std::optional<TiesScope> scope =
            item.is_string() ? parse_ties_scope(item.get<std::string>()) : std::nullopt;
        if (!scope) throw std::invalid_argument("'scope' must be \"tensor\" or \"model\", got " + item.dump());
        params.scope = *scope;
      }
    }
    params.check();
    return params;
  }
};

/// Whole-model trim thresholds of TIES, one per fine-tune, as TiesModelScope
/// computes them. Immutable once built; policies share it.
struct TiesModelThresholds {
  /// Compute scalar the magnitudes were ranked in: "float" or "double".
  std::string scalar;
  double density = 0;
  /// Input index of the base model and number of models.
  std::size_t base = 0;
  std::size_t model_count = 0;
  /// Elements per model over all tensors of the prepass, and how many of
  /// them each fine-tune keeps: floor(density * total + 1e-9).
  std::int64_t total_count = 0;
  std::int64_t keep_count = 0;
  /// Per model in input order: the magnitude of the keep_count-th largest
  /// delta (entries above it are kept); 0 for the base.
  std::vector<double> threshold;
  /// Per model in input order: true when every delta whose magnitude equals
  /// the threshold is kept, false when only the first ones in the prepass's
  /// order (tensor order, then element index) are.
  std::vector<bool> keeps_all_ties;
  /// Per tensor of the prepass: for each model in input order, how many of
  /// the tensor's deltas equal to the threshold are kept (first by element
  /// index). Used only for models whose keeps_all_ties is false.
  std::unordered_map<std::string, std::vector<std::int64_t>> tied_keep;
};

namespace detail {

/// Unsigned integer with the bits of a Scalar.
template <typename Scalar>
using MagnitudeKey = std::conditional_t<sizeof(Scalar) == 4, std::uint32_t, std::uint64_t>;

/// Order-preserving integer key of a non-negative magnitude: for x, y >= 0,
/// x < y exactly when key(x) < key(y) (IEEE 754 bit patterns).
template <typename Scalar>
MagnitudeKey<Scalar> magnitude_key(Scalar magnitude) {
  MagnitudeKey<Scalar> key;
  std::memcpy(&key, &magnitude, sizeof key);
  return key;
}

template <typename Scalar>
Scalar magnitude_from_key(MagnitudeKey<Scalar> key) {
  Scalar magnitude;
  std::memcpy(&magnitude, &key, sizeof magnitude);
  return magnitude;
}

template <typename Scalar>
const char* scalar_name() {
  return std::is_same_v<Scalar, float> ? "float" : "double";
}

/// Trim rule of one fine-tune: the test a delta must pass to be kept.
template <typename Scalar>
struct TrimRule {
  enum class Mode { keep_all, keep_none, threshold };
  Mode mode = Mode::keep_all;
  /// Deltas whose magnitude exceeds this are kept.
  Scalar threshold = 0;
  /// True: deltas equal to the threshold are kept too. False: only the first
  /// `tied_keep` of them in element order are.
  bool keeps_all_ties = true;
  std::int64_t tied_keep = 0;
};

/// Returns the trim rule that keeps the `keep` largest magnitudes of
/// |model - base| within one tensor, ties at the threshold going to the
/// lower index. `buffer` is scratch space, grown to the tensor's size.
template <typename Scalar>
TrimRule<Scalar> tensor_trim_rule(const TensorView<Scalar>& base, const TensorView<Scalar>& model,
                                  std::int64_t keep, std::vector<Scalar>& buffer, int threads) {
  using Rule = TrimRule<Scalar>;
  const std::int64_t numel = base.size();
  Rule rule;
  if (keep <= 0) {
    rule.mode = Rule::Mode::keep_none;
    return rule;
  }
  if (keep >= numel) return rule;

  // Magnitudes of the deltas, computed as the merge pass computes them.
  buffer.resize(static_cast<std::size_t>(numel));
  const BlockPlan plan = element_plan(numel);
  for_each_block(
      plan.block_count, threads, [](int) {},
      [&](std::int64_t block, int) {
        for (std::int64_t i = plan.begin(block); i < plan.end(block); ++i) {
          buffer[static_cast<std::size_t>(i)] = std::abs(model[i] - base[i]);
        }
      });

  // The keep-th largest magnitude is the threshold. After nth_element the
  // entries before it are >= it and those after are <= it.
  const auto nth = buffer.begin() + (keep - 1);
  std::nth_element(buffer.begin(), nth, buffer.end(), std::greater<Scalar>());
  const Scalar threshold = *nth;
  std::int64_t greater = 0;
  std::int64_t equal = 0;
  for (auto it = buffer.begin(); it != buffer.end(); ++it) {
    if (*it > threshold) ++greater;
    if (*it == threshold) ++equal;
  }

  rule.mode = Rule::Mode::threshold;
  rule.threshold = threshold;
  rule.tied_keep = keep - greater;
  rule.keeps_all_ties = rule.tied_keep >= equal;
  return rule;
}

/// Returns TIES's sign election and disjoint mean for one element. The
/// elected sign is that of sum_k w_k d_k, and a zero sum counts as positive.
/// The result is sum w_k d_k / sum w_k over the non-zero d_k of that sign,
/// or 0 where none has it. Reads `deltas[k]` and `weights[k]` for k in [1, n).
template <typename Scalar>
Scalar disjoint_mean(const Scalar* deltas, const Scalar* weights, std::size_t n) {
  Scalar sum = 0;
  for (std::size_t k = 1; k < n; ++k) sum += weights[k] * deltas[k];
  const bool positive = sum >= 0;

  Scalar numerator = 0;
  Scalar denominator = 0;
  for (std::size_t k = 1; k < n; ++k) {
    const Scalar delta = deltas[k];
    if (delta == 0 || (delta > 0) != positive) continue;
    numerator += weights[k] * delta;
    denominator += weights[k];
  }
  return denominator != 0 ? numerator / denominator : Scalar(0);
}

/// Trims every fine-tune's delta with its rule, elects signs, and writes
/// theta_base + lambda * disjoint mean to `out`. `models` and `rules` are
/// base first (rules[0] unused). Returns per model the number of deltas the
/// trim kept (0 for the base).
template <typename Scalar>
std::vector<std::int64_t> ties_merge_pass(const std::vector<TensorView<Scalar>>& models,
                                          const std::vector<TrimRule<Scalar>>& rules,
                                          const std::vector<Scalar>& weights, Scalar lambda, Scalar* out,
                                          int threads) {
  using Rule = TrimRule<Scalar>;
  const std::size_t n = models.size();
  const std::int64_t numel = models.front().size();
  const BlockPlan plan = element_plan(numel);
  const auto blocks = static_cast<std::size_t>(plan.block_count);
  const Scalar* base = models[0].data();

  // Where only some ties are kept, each block needs the number of ties in
  // the blocks before it, so the first tied_keep in element order win.
  std::vector<std::int64_t> tie_offsets(blocks * n, 0);
  for (std::size_t k = 1; k < n; ++k) {
    const Rule& rule = rules[k];
    if (rule.mode != Rule::Mode::threshold || rule.keeps_all_ties) continue;
    const Scalar* values = models[k].data();
    std::vector<std::int64_t> ties(blocks, 0);
    for_each_block(
        plan.block_count, threads, [](int) {},
        [&](std::int64_t block, int) {
          std::int64_t count = 0;
          for (std::int64_t i = plan.begin(block); i < plan.end(block); ++i) {
            count += std::abs(values[i] - base[i]) == rule.threshold ? 1 : 0;
          }
          ties[static_cast<std::size_t>(block)] = count;
        });
    std::int64_t running = 0;
    for (std::size_t b = 0; b < blocks; ++b) {
      tie_offsets[b * n + k] = running;
      running += ties[b];
    }
  }

  // One pass: trim, elect, average, write.
  std::vector<std::int64_t> kept_per_block(blocks * n, 0);
  struct Workspace {
    std::vector<Scalar> deltas;
    std::vector<std::int64_t> tie_rank;
  };
  std::vector<Workspace> workspaces(static_cast<std::size_t>(thread_count(threads)));
  for_each_block(
      plan.block_count, threads,
      [&](int thread) {
        workspaces[static_cast<std::size_t>(thread)].deltas.assign(n, Scalar(0));
        workspaces[static_cast<std::size_t>(thread)].tie_rank.assign(n, 0);
      },
      [&](std::int64_t block, int thread) {
        Workspace& work = workspaces[static_cast<std::size_t>(thread)];
        const auto offset = static_cast<std::size_t>(block) * n;
        for (std::size_t k = 1; k < n; ++k) work.tie_rank[k] = tie_offsets[offset + k];
        for (std::int64_t i = plan.begin(block); i < plan.end(block); ++i) {
          for (std::size_t k = 1; k < n; ++k) {
            const Rule& rule = rules[k];
            const Scalar delta = models[k][i] - base[i];
            bool keep = true;
            if (rule.mode == Rule::Mode::keep_none) {
              keep = false;
            } else if (rule.mode == Rule::Mode::threshold) {
              const Scalar magnitude = std::abs(delta);
              if (magnitude > rule.threshold) {
                keep = true;
              } else if (magnitude == rule.threshold) {
                keep = rule.keeps_all_ties || work.tie_rank[k] < rule.tied_keep;
                ++work.tie_rank[k];
              } else {
                keep = false;
              }
            }
            work.deltas[k] = keep ? delta : Scalar(0);
            kept_per_block[offset + k] += keep ? 1 : 0;
          }
          out[i] = base[i] + lambda * disjoint_mean(work.deltas.data(), weights.data(), n);
        }
      });

  std::vector<std::int64_t> kept(n, 0);
  for (std::size_t b = 0; b < blocks; ++b) {
    for (std::size_t k = 1; k < n; ++k) kept[k] += kept_per_block[b * n + k];
  }
  return kept;
}

/// Report notes of a trim: the number of deltas each model kept, in input
/// order (null for the base).
inline nlohmann::json kept_notes(const std::vector<std::int64_t>& kept, const TensorContext& context) {
  nlohmann::json base_first = nlohmann::json::array();
  base_first.push_back(nullptr);
  for (std::size_t k = 1; k < kept.size(); ++k) base_first.push_back(kept[k]);
  return {{"kept", to_input_order(base_first, context)}};
}

}  // namespace detail

/// Prepass of whole-model TIES: finds, for each fine-tune, the magnitude
/// threshold that keeps the top `density` share of its deltas over all
/// spliced tensors together, streaming the tensors as often as needed.
///
/// The threshold is an exact order statistic, found by radix selection on
/// the magnitudes' bit patterns 16 bits per pass. That takes 2 passes for
/// float and 4 for double, plus one more when only some of the deltas equal
/// to the threshold are kept. Memory is 65,536 counters per fine-tune plus
/// 65,536 per thread, whatever the model size. Usage:
///
///     TiesModelScope<float> scope(density, n_models, base);
///     while (scope.needs_pass()) {
///       for (each spliced tensor, in the same order every pass)
///         scope.add_tensor(name, views_in_input_order);
///       scope.end_pass();
///     }
///     TiesPolicy<float> policy(params, scope.thresholds());
///
/// Add exactly the tensors the merge will splice: a tensor the NaN policy
/// copies from the base must be left out, because a non-finite input is
/// an error here. Ties at the threshold go to the earlier tensor in the
/// prepass's order, then to the lower element index. Results do not depend
/// on `threads`.
/// \tparam Scalar compute scalar the merge will use, float or double.
template <typename Scalar>
class TiesModelScope {
  using Key = detail::MagnitudeKey<Scalar>;
  static constexpr int kDigitBits = 16;
  static constexpr std::size_t kBins = std::size_t{1} << kDigitBits;
  static constexpr int kKeyBits = static_cast<int>(8 * sizeof(Key));
  static constexpr int kDigitPasses = kKeyBits / kDigitBits;
  /// Tensors smaller than this are counted on one thread.
  static constexpr std::int64_t kParallelCountMin = std::int64_t{1} << 16;

 public:
  /// Throws std::invalid_argument for a density outside [0, 1], no models,
  /// or a base index out of range.
  TiesModelScope(double density, std::size_t n_models, std::size_t base = 0, int threads = 0)
      : threads_(threads) {
    if (!(density >= 0 && density <= 1)) detail::throw_out_of_range("density", "in [0, 1]", density);
    if (n_models == 0) throw std::invalid_argument("'n_models' must be >= 1, got 0");
    if (base >= n_models) {
      throw std::invalid_argument("'base' must be in [0, " + std::to_string(n_models) + "), got " +
                                  std::to_string(base));
    }
    if (threads < 0) throw std::invalid_argument("'threads' must be >= 0, got " + std::to_string(threads));
    result_.scalar = detail::scalar_name<Scalar>();
    result_.density = density;
    result_.base = base;
    result_.model_count = n_models;
    result_.threshold.assign(n_models, 0.0);
    result_.keeps_all_ties.assign(n_models, true);
    models_.resize(n_models);
    for (std::size_t k = 0; k < n_models; ++k) {
      if (k != base) models_[k].histogram.assign(kBins, 0);
    }
  }

  /// True while another pass over the tensors is needed.
  bool needs_pass() const { return phase_ != Phase::finished; }

  /// Number of the current pass, from 1.
  int pass() const { return pass_ + 1; }

  /// Counts one tensor of the current pass. `models` are in input order and
  /// share one shape; every pass must add the same tensors in the same order.
  /// Throws std::logic_error after the last pass, std::invalid_argument for
  /// a tensor out of order or a wrong model count, MismatchError for
  /// differing shapes, and NumericError for a NaN or infinite input element.
  void add_tensor(const std::string& name, const std::vector<TensorView<Scalar>>& models) {
    if (phase_ == Phase::finished) throw std::logic_error("TiesModelScope: add_tensor after the last pass");
    check_models(name, models);
    if (pass_ == 0) {
      if (result_.tied_keep.count(name) != 0) {
        throw std::invalid_argument("TiesModelScope: tensor '" + name + "' added twice in one pass");
      }
      names_.push_back(name);
      result_.tied_keep.emplace(name, std::vector<std::int64_t>(result_.model_count, 0));
      result_.total_count += models.front().size();
      check_finite(name, models);
    } else {
      if (position_ >= names_.size() || names_[position_] != name) {
        throw std::invalid_argument("TiesModelScope: pass " + std::to_string(pass()) + " added tensor '" + name +
                                    "' at position " + std::to_string(position_ + 1) +
                                    ", but pass 1 added " +
                                    (position_ < names_.size() ? "'" + names_[position_] + "'" : "no tensor") +
                                    " there; add the same tensors in the same order every pass");
      }
    }
    ++position_;

    for (std::size_t k = 0; k < models.size(); ++k) {
      if (k == result_.base || models_[k].decided) continue;
      if (phase_ == Phase::digits) {
        count_digits(models[result_.base], models[k], models_[k]);
      } else if (!result_.keeps_all_ties[k]) {
        assign_ties(name, models[result_.base], models[k], k);
      }
    }
  }

  /// Ends the current pass. Throws std::invalid_argument when a later pass
  /// added fewer tensors than the first.
  void end_pass() {
    if (phase_ == Phase::finished) throw std::logic_error("TiesModelScope: end_pass after the last pass");
    if (pass_ > 0 && position_ != names_.size()) {
      throw std::invalid_argument("TiesModelScope: pass " + std::to_string(pass()) + " added " +
                                  std::to_string(position_) + " tensors, pass 1 added " +
                                  std::to_string(names_.size()));
    }
    if (pass_ == 0) start_selection();
    if (phase_ == Phase::digits) {
      select_digit();
    } else if (phase_ == Phase::ties) {
      phase_ = Phase::finished;
    }
    ++pass_;
    position_ = 0;
  }

  /// Returns the thresholds once needs_pass() is false. Throws
  /// std::logic_error before that.
  std::shared_ptr<const TiesModelThresholds> thresholds() const {
    if (phase_ != Phase::finished) {
      throw std::logic_error("TiesModelScope: thresholds are ready only when needs_pass() is false; add every "
                             "tensor and call end_pass() until then");
    }
    return std::make_shared<const TiesModelThresholds>(result_);
  }

 private:
  enum class Phase { digits, ties, finished };

  /// Selection state of one fine-tune.
  struct ModelState {
    /// True once the trim is decided without a threshold (keep all or none).
    bool decided = false;
    /// High bits of the threshold's key found so far.
    Key prefix = 0;
    /// Rank, from 1, of the threshold among keys that share the prefix.
    std::int64_t rank = 0;
    /// Keys strictly above the prefix's bucket so far.
    std::int64_t greater = 0;
    /// Ties still to hand out in the ties pass.
    std::int64_t ties_left = 0;
    std::vector<std::int64_t> histogram;
  };

  void check_models(const std::string& name, const std::vector<TensorView<Scalar>>& models) const {
    if (models.size() != result_.model_count) {
      throw std::invalid_argument("TiesModelScope: tensor '" + name + "' has " + std::to_string(models.size()) +
                                  " models, expected " + std::to_string(result_.model_count));
    }
    for (std::size_t k = 0; k < models.size(); ++k) {
      if (models[k].shape() != models[result_.base].shape()) {
        throw MismatchError("tensor '" + name + "' has shape " + shape_to_string(models[result_.base].shape()) +
                            " in model " + std::to_string(result_.base + 1) + " but " +
                            shape_to_string(models[k].shape()) + " in model " + std::to_string(k + 1));
      }
    }
  }

  void check_finite(const std::string& name, const std::vector<TensorView<Scalar>>& models) const {
    for (std::size_t k = 0; k < models.size(); ++k) {
      const std::int64_t bad = detail::first_non_finite(models[k], threads_);
      if (bad >= 0) detail::throw_non_finite(name, "model " + std::to_string(k + 1), models[k], bad);
    }
  }

  int digit_shift() const { return kKeyBits - kDigitBits * (pass_ + 1); }

  /// Adds the current digit of every key that shares the prefix to the
  /// model's histogram.
  void count_digits(const TensorView<Scalar>& base, const TensorView<Scalar>& model, ModelState& state) {
    const int shift = digit_shift();
    const int prefix_shift = shift + kDigitBits;
    const Key prefix = state.prefix;
    const std::int64_t numel = base.size();
    auto count_range = [&](std::int64_t begin, std::int64_t end, std::int64_t* histogram) {
      for (std::int64_t i = begin; i < end; ++i) {
        const Key key = detail::magnitude_key<Scalar>(std::abs(model[i] - base[i]));
        if (prefix_shift < kKeyBits && (key >> prefix_shift) != prefix) continue;
        ++histogram[(key >> shift) & (kBins - 1)];
      }
    };

    if (numel < kParallelCountMin) {
      count_range(0, numel, state.histogram.data());
      return;
    }
    const std::size_t threads = static_cast<std::size_t>(detail::thread_count(threads_));
    thread_histograms_.assign(threads * kBins, 0);
    const detail::BlockPlan plan = detail::element_plan(numel);
    detail::for_each_block(
        plan.block_count, threads_, [](int) {},
        [&](std::int64_t block, int thread) {
          count_range(plan.begin(block), plan.end(block),
                      thread_histograms_.data() + static_cast<std::size_t>(thread) * kBins);
        });
    for (std::size_t t = 0; t < threads; ++t) {
      const std::int64_t* counts = thread_histograms_.data() + t * kBins;
      for (std::size_t bin = 0; bin < kBins; ++bin) state.histogram[bin] += counts[bin];
    }
  }

  /// Hands the model's remaining ties out to this tensor, first by index.
  void assign_ties(const std::string& name, const TensorView<Scalar>& base, const TensorView<Scalar>& model,
                   std::size_t k) {
    ModelState& state = models_[k];
    const Scalar threshold = static_cast<Scalar>(result_.threshold[k]);
    const detail::BlockPlan plan = detail::element_plan(base.size());
    std::vector<std::int64_t> ties(static_cast<std::size_t>(plan.block_count), 0);
    detail::for_each_block(
        plan.block_count, threads_, [](int) {},
        [&](std::int64_t block, int) {
          std::int64_t count = 0;
          for (std::int64_t i = plan.begin(block); i < plan.end(block); ++i) {
            count += std::abs(model[i] - base[i]) == threshold ? 1 : 0;
          }
          ties[static_cast<std::size_t>(block)] = count;
        });
    std::int64_t tied = 0;
    for (std::int64_t count : ties) tied += count;
    const std::int64_t tensor_tied_keep = std::min(tied, state.ties_left);
    state.ties_left -= tensor_tied_keep;
    result_.tied_keep.at(name)[k] = tensor_tied_keep;
  }

  /// After pass 1: the keep count, and which models need no threshold.
  void start_selection() {
    result_.keep_count = trim_keep_count(result_.density, result_.total_count);
    const bool keep_none = result_.keep_count == 0;
    const bool keep_all = result_.keep_count >= result_.total_count;
    for (std::size_t k = 0; k < models_.size(); ++k) {
      ModelState& state = models_[k];
      state.rank = result_.keep_count;
      if (k == result_.base || keep_none || keep_all) state.decided = true;
    }
    if (keep_none || keep_all) phase_ = Phase::finished;
  }

  /// After a digit pass: narrows each model's prefix by one digit; after the
  /// last digit the threshold is exact.
  void select_digit() {
    const bool last = pass_ + 1 == kDigitPasses;
    bool partial_ties = false;
    for (std::size_t k = 0; k < models_.size(); ++k) {
      ModelState& state = models_[k];
      if (state.decided) continue;
      // Walk the bins from the largest digit down to the one holding the
      // rank-th largest key.
      std::int64_t above = 0;
      std::size_t bin = kBins - 1;
      while (above + state.histogram[bin] < state.rank) {
        if (bin == 0) {
          throw std::logic_error("TiesModelScope: pass " + std::to_string(pass()) +
                                 " counted fewer deltas than pass 1; the tensors changed between passes");
        }
        above += state.histogram[bin];
        --bin;
      }
      const std::int64_t in_bin = state.histogram[bin];
      state.greater += above;
      state.rank -= above;
      state.prefix = static_cast<Key>((state.prefix << kDigitBits) | static_cast<Key>(bin));
      std::fill(state.histogram.begin(), state.histogram.end(), 0);
      if (!last) continue;

      result_.threshold[k] = static_cast<double>(detail::magnitude_from_key<Scalar>(state.prefix));
      result_.keeps_all_ties[k] = state.rank >= in_bin;
      state.ties_left = state.rank;
      partial_ties = partial_ties || !result_.keeps_all_ties[k];
    }
    if (last) phase_ = partial_ties ? Phase::ties : Phase::finished;
  }

  int threads_ = 0;
  Phase phase_ = Phase::digits;
  int pass_ = 0;
  std::size_t position_ = 0;
  std::vector<std::string> names_;
  std::vector<ModelState> models_;
  std::vector<std::int64_t> thread_histograms_;
  TiesModelThresholds result_;

};

/// Runs the whole-model TIES prepass over in-memory weight sets, on the
/// tensors splice() would splice with `options`: selected, floating and
/// non-empty, and under a NaN policy other than error only those without
/// NaN or infinity. Throws as TiesModelScope and splice() do for invalid
/// input.
template <typename Scalar>
std::shared_ptr<const TiesModelThresholds> ties_model_thresholds(const std::vector<WeightSet<Scalar>>& sets,
                                                                 double density, const SpliceOptions& options = {}) {
  if (sets.empty()) throw std::invalid_argument("no weight sets given; need at least one");
  options.check(sets.size());
  check_compatible(sets);
  TiesModelScope<Scalar> scope(density, sets.size(), options.base, options.threads);

  // The tensors splice() will merge, in the base's order.
  std::vector<std::string> names;
  for (const auto& entry : sets[options.base]) {
    if (copy_reason(options, entry.name, entry.dtype, entry.numel(), sets.size())) continue;
    bool finite = true;
    for (std::size_t k = 0; options.nan_policy != NanPolicy::error && k < sets.size() && finite; ++k) {
      const std::int64_t bad = detail::first_non_finite(sets[k].view(entry.name), options.threads);
      if (bad >= 0 && options.nan_policy == NanPolicy::copy_base && k == options.base) {
        detail::throw_non_finite(entry.name, "model " + std::to_string(k + 1), sets[k].view(entry.name), bad);
      }
      finite = bad < 0;
    }
    if (finite) names.push_back(entry.name);
  }

  while (scope.needs_pass()) {
    for (const auto& name : names) {
      std::vector<TensorView<Scalar>> views;
      views.reserve(sets.size());
      for (const auto& set : sets) views.push_back(set.view(name));
      scope.add_tensor(name, views);
    }
    scope.end_pass();
  }
  return scope.thresholds();
}

/// TIES merging: each fine-tune's delta tau_k = theta_k - theta_base keeps
/// its floor(density * count + 1e-9) largest magnitudes (ties at the
/// threshold to the lower index), the rest set to 0; per element the elected
/// sign is that of sum_k w_k tau_k (zero counts as positive); the merged
/// delta is sum w_k tau_k / sum w_k over the kept entries of that sign (0
/// where none); theta = theta_base + lambda * merged delta.
///
/// With scope `tensor` the count is the tensor's element count. With scope
/// `model` the count is the whole model's and the thresholds come from a
/// TiesModelScope prepass passed to the constructor.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class TiesPolicy {
 public:
  using scalar_type = Scalar;

  TiesPolicy() = default;

  /// Throws std::invalid_argument naming the first field out of range.
  /// `thresholds` is required for scope `model` and ignored otherwise.
  explicit TiesPolicy(TiesParams params, std::shared_ptr<const TiesModelThresholds> thresholds = nullptr)
      : params_(std::move(params)), thresholds_(std::move(thresholds)) {
    params_.check();
  }

  std::string name() const { return "ties"; }
  nlohmann::json parameters() const { return params_.to_json(); }
  const TiesParams& params() const { return params_; }

  /// Throws std::invalid_argument when the weights do not fit `n_models`, or
  /// for scope `model` when the thresholds are missing or were computed for
  /// another model count, density or compute scalar.
  void check(std::size_t n_models) const {
    params_.check();
    detail::check_weight_count(params_.weights, n_models);
    if (params_.scope != TiesScope::model) return;
    if (!thresholds_) {
      throw std::invalid_argument("TIES with 'scope' model needs whole-model thresholds: run TiesModelScope (or "
                                  "ties_model_thresholds()) over the tensors and pass its result to TiesPolicy");
    }
    if (thresholds_->model_count != n_models) {
      throw std::invalid_argument("TIES thresholds were computed for " + std::to_string(thresholds_->model_count) +
                                  " models, but " + std::to_string(n_models) + " are merged");
    }
    if (thresholds_->density != params_.density) {
      throw std::invalid_argument("TIES thresholds were computed for density " +
                                  detail::format_value(thresholds_->density) + ", but 'density' is " +
                                  detail::format_value(params_.density));
    }
    if (thresholds_->scalar != detail::scalar_name<Scalar>()) {
      throw std::invalid_argument("TIES thresholds were computed in " + thresholds_->scalar +
                                  ", but the merge computes in " + detail::scalar_name<Scalar>());
    }
  }

  /// Merges one tensor of N models (base first) into `out`. The notes list
  /// how many deltas of each model the trim kept, in input order.
  /// Throws std::invalid_argument for scope `model` when the tensor or the
  /// base differs from the prepass's.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    const std::size_t n = models.size();
    const std::vector<double> weights = detail::weights_base_first(params_.weights, context);
    std::vector<Scalar> scalar_weights(weights.begin(), weights.end());
    std::vector<detail::TrimRule<Scalar>> rules(n);
    if (params_.scope == TiesScope::model) {
      rules = model_rules(context);
    } else {
      const std::int64_t keep = trim_keep_count(params_.density, models.front().size());
      std::vector<Scalar> buffer;
      for (std::size_t k = 1; k < n; ++k) {
        rules[k] = detail::tensor_trim_rule(models[0], models[k], keep, buffer, context.threads);
      }
    }
    const std::vector<std::int64_t> kept = detail::ties_merge_pass(
        models, rules, scalar_weights, static_cast<Scalar>(params_.lambda), out, context.threads);
    return {std::vector<ModelTensorStats>(n), detail::kept_notes(kept, context)};
  }

 private:
  std::vector<detail::TrimRule<Scalar>> model_rules(const TensorContext& context) const {
    using Rule = detail::TrimRule<Scalar>;
    check(context.model_count());
    if (context.order.front() != thresholds_->base) {
      throw std::invalid_argument("TIES thresholds were computed with model " +
                                  std::to_string(thresholds_->base + 1) + " as the base, but tensor '" +
                                  context.name + "' is merged with model " +
                                  std::to_string(context.order.front() + 1));
    }
    const auto found = thresholds_->tied_keep.find(context.name);
    if (found == thresholds_->tied_keep.end()) {
      throw std::invalid_argument("tensor '" + context.name +
                                  "' was not in the whole-model TIES prepass; run it over every spliced tensor");
    }
    std::vector<Rule> rules(context.model_count());
    for (std::size_t i = 1; i < rules.size(); ++i) {
      const std::size_t input = context.order[i];
      Rule& rule = rules[i];
      if (thresholds_->keep_count == 0) {
        rule.mode = Rule::Mode::keep_none;
      } else if (thresholds_->keep_count >= thresholds_->total_count) {
        rule.mode = Rule::Mode::keep_all;
      } else {
        rule.mode = Rule::Mode::threshold;
        rule.threshold = static_cast<Scalar>(thresholds_->threshold[input]);
        rule.keeps_all_ties = thresholds_->keeps_all_ties[input];
        rule.tied_keep = found->second[input];
      }
    }
    return rules;
  }

  TiesParams params_;
  std::shared_ptr<const TiesModelThresholds> thresholds_;
};

}  // namespace cki
