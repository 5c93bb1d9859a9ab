// The element weights of the default assessment with the softmax rule, in
// float, from one polynomial per model instead of three exponentials.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "cki/assessment/context.hpp"

// Eigen's packet types carry vector attributes that GCC drops, with a
// warning, when they are template arguments; Eigen's own headers do the same.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace cki::detail {

/// With the softmax rule, model k's weight is w_k = u_k / sum_j u_j with
/// u_k = exp(e_k / tau) and e_k = g_k (1 - exp(-g_k t_k)), where
/// t_k = 1 - l_k = sigmoid(-s d_k) = q_k / (1 + q_k) with q_k = exp(-s d_k)
/// in (0, 1]. For fixed g_k and tau, u_k is a smooth function of q_k alone,
/// G_k(q) = exp(a_k (1 - exp(-g_k q / (1 + q)))) with a_k = g_k / tau, which
/// this class replaces by a polynomial fitted once per tensor:
/// G_k(q) ~ 1 + q P_k(2 q - 1), P_k of degree kDegree. Each element then
/// costs one exponential (for q) and kDegree + 2 multiply-adds per model,
/// and no division, rather than an exponential and a logistic in the local
/// uncertainty and two exponentials in the rule.
///
/// As the rule's softmax subtracts the largest score, weights() divides
/// every u_k by the largest of the element, so the largest weight is
/// exactly 1 before normalising. Equal u then give exactly equal weights,
/// and no sum of weighted values can overflow where the inputs do not.
///
/// fit() checks each polynomial, with its coefficients rounded to float and
/// evaluated in double, against G_k in double at 129 points of [0, 1]. It
/// accepts the curves only when every relative error is below
/// kMaxRelativeError (about 0.84 float ulp at G = 1). Otherwise the caller
/// keeps the separate stages. This check, not a bound on G, keeps the
/// curves safe for any global weight, negative ones from a custom functor
/// included. G_k(0) = 1 exactly, so models whose elements all lie
/// infinitely far from the others tie exactly, as they do in the rule.
class SoftmaxCurves {
 public:
  static constexpr int kDegree = 10;
  static constexpr double kMaxRelativeError = 1e-7;
  /// Elements per chunk of the weight loop: the chunk's weights and work
  /// columns stay in the first-level cache.
  static constexpr std::int64_t kChunk = 512;
  /// Work columns that weights() needs besides the weights.
  static constexpr Eigen::Index kScratchColumns = 4;

  /// Fits one curve per global weight (base first) for temperature tau and
  /// logistic scale s. Returns nothing when a weight is not finite or a
  /// curve misses the error bound (very low temperatures, large weights).
  static std::optional<SoftmaxCurves> fit(const std::vector<double>& global_weights, double temperature,
                                          double scale) {
    SoftmaxCurves curves;
    curves.negative_scale_log2e_ = static_cast<float>(-scale / std::log(2.0));
    for (double g : global_weights) {
      if (!std::isfinite(g)) return std::nullopt;
      const double a = g / temperature;
      if (!std::isfinite(a) || std::abs(a) > kMaxExponent) return std::nullopt;
      const std::optional<Coefficients> coefficients = fit_one(g, a);
      if (!coefficients) return std::nullopt;
      curves.coefficients_.push_back(*coefficients);
    }
    return curves;
  }

  /// Computes the weights of the first `count` (<= kChunk) elements of
  /// `block` (N pointers, base first) as w_k = v_k * scale: writes
  /// v_k = G_k(q_k) / max_j G_j(q_j) into the first `count` rows of `w`,
  /// which has N columns, and returns `scale` = 1 / sum_k v_k, one factor
  /// per element, which lives in `scratch` (kScratchColumns columns). The
  /// splices multiply as they go, which saves a pass over the weights.
  ///
  /// Each model's chain (deviation, exponential, polynomial) runs in one
  /// loop over Eigen's vector packets, so intermediate values stay in
  /// registers. The elements after the last whole packet run the same
  /// operations on single floats.
  const float* weights(const float* const* block, std::int64_t count, BlockArray<float>& w,
                       BlockArray<float>& scratch) const {
    using Packet = typename Eigen::internal::packet_traits<float>::type;
    constexpr std::int64_t kSize = Eigen::internal::packet_traits<float>::size;
    const std::int64_t whole = count - count % kSize;
    const auto n = static_cast<Eigen::Index>(coefficients_.size());
    float* sum = scratch.col(0).data();
    float* maximum = scratch.col(1).data();
    float* shared_q = scratch.col(2).data();
    float* total = scratch.col(3).data();

    if (n > 2) {
      for (std::int64_t i = 0; i < whole; i += kSize) sum_at<Packet>(block, n, i, sum);
      for (std::int64_t i = whole; i < count; ++i) sum_at<float>(block, n, i, sum);
    }
    for (Eigen::Index k = 0; k < n; ++k) {
      const Chain<Packet> packets(*this, k, n);
      const Chain<float> singles(*this, k, n);
      Pointers pointers{block[k], n == 2 ? block[1] : sum, shared_q, w.col(k).data(), maximum};
      // The deviation's source and whether `maximum` starts here are fixed per
      // model, so they select a loop rather than branch in it.
      const auto run = [&](auto source, auto first) {
        constexpr Source kSource = decltype(source)::value;
        constexpr bool kFirst = decltype(first)::value;
        for (std::int64_t i = 0; i < whole; i += kSize) packets.template at<kSource, kFirst>(pointers, i);
        for (std::int64_t i = whole; i < count; ++i) singles.template at<kSource, kFirst>(pointers, i);
      };
      using First = std::integral_constant<bool, true>;
      using Later = std::integral_constant<bool, false>;
      if (n > 2) {
        k == 0 ? run(SourceTag<Source::sum>{}, First{}) : run(SourceTag<Source::sum>{}, Later{});
      } else if (k == 0) {
        run(SourceTag<Source::pair>{}, First{});
      } else {
        run(SourceTag<Source::shared>{}, Later{});
      }
    }
    // Divide by the largest u, as the rule's softmax subtracts the largest
    // score: the largest weight becomes exactly 1, the others at most 1, so
    // identical models get exactly equal weights and no sum can overflow.
    float* inverse_maximum = sum;  // the sum is no longer needed
    auto reciprocal = scratch.col(0).head(count);
    // 1 / x rather than inverse(), which some Eigen versions compute with an
    // approximate reciprocal: Weigher divides in the same way.
    reciprocal = 1.0f / scratch.col(1).head(count);
    for (Eigen::Index k = 0; k < n; ++k) {
      float* u = w.col(k).data();
      for (std::int64_t i = 0; i < whole; i += kSize) {
        relative_at<Packet>(u, maximum, inverse_maximum, total, k == 0, i);
      }
      for (std::int64_t i = whole; i < count; ++i) relative_at<float>(u, maximum, inverse_maximum, total, k == 0, i);
    }
    auto inverse = scratch.col(3).head(count);
    inverse = 1.0f / inverse;
    return inverse.data();
  }

 private:
  // One model's chain of operations in packets of type P, defined below.
  template <typename P>
  struct Chain;

 public:
  /// Largest model count that Weigher and with_model_count() handle.
  static constexpr int kMaxFusedModels = 8;

  /// Calls f(std::integral_constant<int, n>{}) and returns true when
  /// 2 <= n <= kMaxFusedModels, or returns false without calling f.
  template <typename F>
  static bool with_model_count(Eigen::Index n, F&& f) {
    switch (n) {
      case 2: f(std::integral_constant<int, 2>{}); return true;
      case 3: f(std::integral_constant<int, 3>{}); return true;
      case 4: f(std::integral_constant<int, 4>{}); return true;
      case 5: f(std::integral_constant<int, 5>{}); return true;
      case 6: f(std::integral_constant<int, 6>{}); return true;
      case 7: f(std::integral_constant<int, 7>{}); return true;
      case 8: f(std::integral_constant<int, 8>{}); return true;
      default: return false;
    }
  }

  /// The weights of exactly kN models for one vector of elements at a time,
  /// P being an Eigen packet or float, without storing them to work
  /// columns. The operations are those of weights() followed by the scaling
  /// in the splices' apply_scaled(), so each weight is bitwise u_k * scale.
  template <int kN, typename P>
  class Weigher {
   public:
    using Values = std::array<P, kN>;

    /// Takes the chains of `curves`, which must have exactly kN models.
    explicit Weigher(const SoftmaxCurves& curves) : chains_(chains_of(curves, std::make_index_sequence<kN>{})) {
      eigen_assert(curves.models() == kN && "Weigher needs one curve per model");
    }

    /// Loads element i (a vector of them when P is a packet) of each model
    /// into `theta` and writes the models' weights into `w`.
    void weigh(const float* const* block, std::int64_t i, Values& theta, Values& w) const {
      namespace ei = Eigen::internal;
      for (int k = 0; k < kN; ++k) theta[k] = ei::ploadu<P>(block[k] + i);
      Values u;
      if constexpr (kN == 2) {
        // Both models share the deviation, so they share q.
        const P q = chains_[0].q_of(ei::psub(theta[0], theta[1]));
        u[0] = chains_[0].value(q);
        u[1] = chains_[1].value(q);
      } else {
        P sum = theta[0];
        for (int k = 1; k < kN; ++k) sum = ei::padd(sum, theta[k]);
        for (int k = 0; k < kN; ++k) {
          u[k] = chains_[k].value(chains_[k].q_of(chains_[k].deviation_from_sum(theta[k], sum)));
        }
      }
      P maximum = u[0];
      for (int k = 1; k < kN; ++k) maximum = ei::pmax(maximum, u[k]);
      const P one = ei::pset1<P>(1.0f);
      const P inverse_maximum = ei::pdiv(one, maximum);
      P total = one;
      for (int k = 0; k < kN; ++k) {
        u[k] = where_equal(u[k], maximum, one, ei::pmul(u[k], inverse_maximum));
        total = k == 0 ? u[0] : ei::padd(total, u[k]);
      }
      const P scale = ei::pdiv(one, total);
      for (int k = 0; k < kN; ++k) w[k] = ei::pmul(u[k], scale);
    }

   private:
    template <std::size_t... K>
    static std::array<Chain<P>, kN> chains_of(const SoftmaxCurves& curves, std::index_sequence<K...>) {
      return {Chain<P>(curves, static_cast<Eigen::Index>(K), kN)...};
    }

    std::array<Chain<P>, kN> chains_;
  };

  /// Returns the number of models, which have one curve each.
  Eigen::Index models() const { return static_cast<Eigen::Index>(coefficients_.size()); }

 private:
  using Coefficients = std::array<float, kDegree + 1>;

  // Writes sum_k theta_k at element i.
  template <typename P>
  static void sum_at(const float* const* block, Eigen::Index n, std::int64_t i, float* sum) {
    namespace ei = Eigen::internal;
    P value = ei::ploadu<P>(block[0] + i);
    for (Eigen::Index k = 1; k < n; ++k) value = ei::padd(value, ei::ploadu<P>(block[k] + i));
    ei::pstoreu(sum + i, value);
  }

  // Returns `equal` where a == b and `other` elsewhere. Eigen's pselect
  // converts AVX-512 lane masks to vectors and back, while the vector
  // extensions of GCC and Clang select with the mask as is.
  template <typename P>
  static P where_equal(const P& a, const P& b, const P& equal, const P& other) {
#if defined(__GNUC__) || defined(__clang__)
    if constexpr (!std::is_same_v<P, float>) {
      typedef std::int32_t Mask __attribute__((vector_size(sizeof(P))));
      const Mask same = a == b;
      // The same select as detail::pick_lanes(), written out: through that
      // call the fused splices measured 7 % slower here.
      return reinterpret_cast<P>((reinterpret_cast<Mask>(equal) & same) | (reinterpret_cast<Mask>(other) & ~same));
    }
#endif
    namespace ei = Eigen::internal;
    return ei::pselect(ei::pcmp_eq(a, b), equal, other);
  }

  // Replaces u by u / maximum at element i, exactly 1 where u is the
  // maximum and u * (1 / maximum) elsewhere, and adds it to `total` (or
  // starts it).
  template <typename P>
  static void relative_at(float* u, const float* maximum, const float* inverse_maximum, float* total, bool first,
                          std::int64_t i) {
    namespace ei = Eigen::internal;
    const P value = ei::ploadu<P>(u + i);
    const P largest = ei::pcmp_eq(value, ei::ploadu<P>(maximum + i));
    const P relative = ei::pselect(largest, ei::pset1<P>(1.0f), ei::pmul(value, ei::ploadu<P>(inverse_maximum + i)));
    ei::pstoreu(u + i, relative);
    ei::pstoreu(total + i, first ? relative : ei::padd(ei::ploadu<P>(total + i), relative));
  }

  // Source of model k's deviation: the running sum of all models (N > 2),
  // the pair of models (N = 2, model 0, which also stores q), or q stored by
  // model 0 (N = 2, model 1, because both models share the deviation).
  enum class Source { sum, pair, shared };
  template <Source value_>
  struct SourceTag {
    static constexpr Source value = value_;
  };

  // The arrays one model's loop reads and writes.
  struct Pointers {
    const float* theta;  // this model
    const float* other;  // the running sum (N > 2) or model 1 (N = 2)
    float* shared_q;
    float* u;
    float* maximum;
  };

  // The constants of one model's chain, broadcast once to packets of type P.
  template <typename P>
  struct Chain {
    P one, two, minus_one, negative_scale_log2e, inverse_others;
    std::array<P, kDegree + 1> c;

    Chain(const SoftmaxCurves& curves, Eigen::Index k, Eigen::Index n) {
      namespace ei = Eigen::internal;
      one = ei::pset1<P>(1.0f);
      two = ei::pset1<P>(2.0f);
      minus_one = ei::pset1<P>(-1.0f);
      negative_scale_log2e = ei::pset1<P>(curves.negative_scale_log2e_);
      inverse_others = ei::pset1<P>(1.0f / static_cast<float>(n - 1));
      const Coefficients& coefficients = curves.coefficients_[static_cast<std::size_t>(k)];
      for (int p = 0; p <= kDegree; ++p) c[p] = ei::pset1<P>(coefficients[p]);
    }

    // Model k's deviation from the mean of the others, given the sum of all
    // models (N > 2).
    P deviation_from_sum(const P& theta, const P& sum) const {
      namespace ei = Eigen::internal;
      return ei::psub(theta, ei::pmul(ei::psub(sum, theta), inverse_others));
    }

    // q = exp(-s |d|), computed as 2^(-s |d| / ln 2).
    P q_of(const P& deviation) const {
      namespace ei = Eigen::internal;
      return exp2_of_non_positive(ei::pmul(ei::pabs(deviation), negative_scale_log2e));
    }

    // u = G_k(q) = 1 + q P_k(2 q - 1).
    P value(const P& q) const {
      namespace ei = Eigen::internal;
      const P x = ei::pmadd(q, two, minus_one);
      P polynomial = c[kDegree];
      for (int p = kDegree - 1; p >= 0; --p) polynomial = ei::pmadd(polynomial, x, c[p]);
      return ei::pmadd(polynomial, q, one);
    }

    // Element i: u = G_k(q), and the largest u so far in `maximum` (set at
    // the first model).
    template <Source source, bool first>
    void at(const Pointers& pointers, std::int64_t i) const {
      namespace ei = Eigen::internal;
      P q;
      if constexpr (source == Source::shared) {
        q = ei::ploadu<P>(pointers.shared_q + i);
      } else {
        const P theta = ei::ploadu<P>(pointers.theta + i);
        const P other = ei::ploadu<P>(pointers.other + i);
        q = q_of(source == Source::pair ? ei::psub(theta, other) : deviation_from_sum(theta, other));
        if constexpr (source == Source::pair) ei::pstoreu(pointers.shared_q + i, q);
      }
      const P u = value(q);
      ei::pstoreu(pointers.u + i, u);
      ei::pstoreu(pointers.maximum + i, first ? u : ei::pmax(ei::ploadu<P>(pointers.maximum + i), u));
    }
  };

  // Returns 2^y for y <= 0 as 2^m 2^f, with m = y rounded to an integer
  // and f = y - m in [-1/2, 1/2]: a degree-6 polynomial for 2^f, fitted at
  // Chebyshev points (relative error about 8e-8 with float coefficients and
  // fused multiply-adds, in an offline check at 400001 points), and 2^m
  // added to its exponent bits. Adding 1.5 * 2^23 rounds y and leaves m in the low bits
  // of the sum, so shifting those bits by 23 gives the exponent step. y is
  // clamped at -125 so that 2^m 2^f stays a normal float. Single floats
  // (the last elements of a chunk) use std::exp2.
  // NOTE: -ffast-math (-fassociative-math) may fold (y + c) - c into y and
  // so f into 0, which would return 2^m alone. Do not build with it.
  template <typename P>
  static P exp2_of_non_positive(const P& value) {
    if constexpr (std::is_same_v<P, float>) {
      return std::exp2(value);
    } else {
      namespace ei = Eigen::internal;
      using Integers = typename ei::unpacket_traits<P>::integer_packet;
      const P y = ei::pmax(value, ei::pset1<P>(-125.0f));
      const P shift = ei::pset1<P>(12582912.0f);
      const P shifted = ei::padd(y, shift);
      const P f = ei::psub(y, ei::psub(shifted, shift));
      P power = ei::pset1<P>(1.5461445e-4f);
      power = ei::pmadd(power, f, ei::pset1<P>(1.3400428e-3f));
      power = ei::pmadd(power, f, ei::pset1<P>(9.618057e-3f));
      power = ei::pmadd(power, f, ei::pset1<P>(5.550327e-2f));
      power = ei::pmadd(power, f, ei::pset1<P>(0.2402265f));
      power = ei::pmadd(power, f, ei::pset1<P>(0.6931472f));
      power = ei::pmadd(power, f, ei::pset1<P>(1.0f));
      const Integers step = ei::plogical_shift_left<23>(ei::preinterpret<Integers>(shifted));
      return ei::preinterpret<P>(ei::padd(ei::preinterpret<Integers>(power), step));
    }
  }

  // |a| beyond this makes G span more than float's range in the worst case.
  static constexpr double kMaxExponent = 80.0;

  // (G(q) - 1) / q for q in (0, 1], without cancellation near q = 0.
  static double quotient(double q, double g, double a) { return std::expm1(-a * std::expm1(-g * q / (1.0 + q))) / q; }

  // G(q) in double.
  static double curve(double q, double g, double a) { return std::exp(-a * std::expm1(-g * q / (1.0 + q))); }

  // Interpolates (G(q) - 1) / q at the Chebyshev points of x = 2 q - 1 in
  // [-1, 1], converts the series to powers of x, rounds the coefficients to
  // float and checks G against its value in double.
  static std::optional<Coefficients> fit_one(double g, double a) {
    constexpr int kPoints = kDegree + 1;
    const double pi = std::acos(-1.0);
    std::array<double, kPoints> nodes{}, values{};
    for (int j = 0; j < kPoints; ++j) {
      nodes[j] = std::cos(pi * (j + 0.5) / kPoints);
      values[j] = quotient((nodes[j] + 1.0) / 2.0, g, a);
    }
    // Chebyshev coefficients c_m = (2 - [m = 0]) / n sum_j f(x_j) T_m(x_j).
    std::array<double, kPoints> chebyshev{};
    for (int m = 0; m < kPoints; ++m) {
      double sum = 0.0;
      for (int j = 0; j < kPoints; ++j) sum += values[j] * std::cos(m * pi * (j + 0.5) / kPoints);
      chebyshev[m] = (m == 0 ? 1.0 : 2.0) * sum / kPoints;
    }
    // Powers of x: T_0 = 1, T_1 = x, T_{m+1} = 2 x T_m - T_{m-1}.
    std::array<double, kPoints> power{};
    std::array<double, kPoints> previous{}, current{}, next{};
    previous[0] = 1.0;
    current[1] = 1.0;
    power[0] += chebyshev[0];
    if (kPoints > 1) power[1] += chebyshev[1];
    for (int m = 1; m + 1 < kPoints; ++m) {
      next.fill(0.0);
      for (int p = 0; p < kPoints; ++p) {
        if (p + 1 < kPoints) next[p + 1] += 2.0 * current[p];
        next[p] -= previous[p];
      }
      for (int p = 0; p < kPoints; ++p) power[p] += chebyshev[m + 1] * next[p];
      previous = current;
      current = next;
    }
    Coefficients rounded{};
    for (int p = 0; p < kPoints; ++p) rounded[p] = static_cast<float>(power[p]);

    constexpr int kChecks = 129;
    for (int j = 0; j < kChecks; ++j) {
      const double q = static_cast<double>(j) / (kChecks - 1);
      const double x = 2.0 * q - 1.0;
      double polynomial = 0.0;
      for (int p = kDegree; p >= 0; --p) polynomial = polynomial * x + static_cast<double>(rounded[p]);
      const double exact = curve(q, g, a);
      const double fitted = 1.0 + q * polynomial;
      if (!(std::abs(fitted - exact) <= kMaxRelativeError * exact)) return std::nullopt;
    }
    return rounded;
  }

  std::vector<Coefficients> coefficients_;
  float negative_scale_log2e_ = -1.44269504f;  // -s / ln 2, here for s = 1
};

}  // namespace cki::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
