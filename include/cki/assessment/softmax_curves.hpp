// The element weights of the default assessment with the softmax rule, in
// float, from one polynomial per model instead of three exponentials.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
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
/// t_k = 1 - l_k = sigmoid(-s d_k) lies in (0, 1/2]. For fixed g_k and tau,
/// u_k is a smooth function of t_k alone, G_k(t) = exp(a_k (1 - exp(-g_k t)))
/// with a_k = g_k / tau, which this class replaces by a polynomial fitted
/// once per tensor: G_k(t) ~ 1 + t P_k(4 t - 1), P_k of degree kDegree. Each
/// element then costs one exponential (for t) and kDegree + 2 multiply-adds
/// per model rather than an exponential and a logistic in the local
/// uncertainty and two exponentials in the rule.
///
/// As the rule's softmax subtracts the largest score, weights() divides
/// every u_k by the largest of the element, so the largest weight is
/// exactly 1 before normalising. Equal u then give exactly equal weights,
/// and no sum of weighted values can overflow where the inputs do not.
///
/// fit() checks each polynomial, with its coefficients rounded to float and
/// evaluated in double, against G_k in double at 129 points of [0, 1/2]. It
/// accepts the curves only when every relative error is below
/// kMaxRelativeError (about 0.84 float ulp at G = 1). Otherwise the caller
/// keeps the separate stages. This check, not a bound on G, keeps the
/// curves safe for any global weight, negative ones from a custom functor
/// included. G_k(0) = 1 exactly, so models whose elements all lie
/// infinitely far from the others tie exactly, as they do in the rule.
class SoftmaxCurves {
 public:
  static constexpr int kDegree = 8;
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
    curves.scale_ = static_cast<float>(scale);
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
  /// v_k = G_k(t_k) / max_j G_j(t_j) into the first `count` rows of `w`,
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
    float* shared_x = scratch.col(2).data();
    float* total = scratch.col(3).data();

    if (n > 2) {
      for (std::int64_t i = 0; i < whole; i += kSize) sum_at<Packet>(block, n, i, sum);
      for (std::int64_t i = whole; i < count; ++i) sum_at<float>(block, n, i, sum);
    }
    for (Eigen::Index k = 0; k < n; ++k) {
      const Chain<Packet> packets(*this, k, n);
      const Chain<float> singles(*this, k, n);
      Pointers pointers{block[k], n == 2 ? block[1] : sum, shared_x, w.col(k).data(), maximum};
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
    reciprocal = scratch.col(1).head(count).inverse();
    for (Eigen::Index k = 0; k < n; ++k) {
      float* u = w.col(k).data();
      for (std::int64_t i = 0; i < whole; i += kSize) {
        relative_at<Packet>(u, maximum, inverse_maximum, total, k == 0, i);
      }
      for (std::int64_t i = whole; i < count; ++i) relative_at<float>(u, maximum, inverse_maximum, total, k == 0, i);
    }
    auto inverse = scratch.col(3).head(count);
    inverse = inverse.inverse();
    return inverse.data();
  }

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
  // the pair of models (N = 2, model 0, which also stores x), or x stored by
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
    float* shared_x;
    float* u;
    float* maximum;
  };

  // The constants of one model's chain, broadcast once to packets of type P.
  template <typename P>
  struct Chain {
    P one, three, quarter, negative_scale, inverse_others;
    std::array<P, kDegree + 1> c;

    Chain(const SoftmaxCurves& curves, Eigen::Index k, Eigen::Index n) {
      namespace ei = Eigen::internal;
      one = ei::pset1<P>(1.0f);
      three = ei::pset1<P>(3.0f);
      quarter = ei::pset1<P>(0.25f);
      negative_scale = ei::pset1<P>(-curves.scale_);
      inverse_others = ei::pset1<P>(1.0f / static_cast<float>(n - 1));
      const Coefficients& coefficients = curves.coefficients_[static_cast<std::size_t>(k)];
      for (int p = 0; p <= kDegree; ++p) c[p] = ei::pset1<P>(coefficients[p]);
    }

    // Element i: u = G_k(t), and the largest u so far in `maximum` (set at
    // the first model). x = 4 t - 1 = (3 q - 1) / (q + 1) with q = exp(-s d)
    // and t = q / (1 + q).
    template <Source source, bool first>
    void at(const Pointers& pointers, std::int64_t i) const {
      namespace ei = Eigen::internal;
      P x;
      if constexpr (source == Source::shared) {
        x = ei::ploadu<P>(pointers.shared_x + i);
      } else {
        const P theta = ei::ploadu<P>(pointers.theta + i);
        P deviation;
        if constexpr (source == Source::pair) {
          deviation = ei::psub(theta, ei::ploadu<P>(pointers.other + i));
        } else {
          deviation = ei::psub(theta, ei::pmul(ei::psub(ei::ploadu<P>(pointers.other + i), theta), inverse_others));
        }
        const P q = exp_of_non_positive(ei::pmul(ei::pabs(deviation), negative_scale));
        x = ei::pdiv(ei::psub(ei::pmul(q, three), one), ei::padd(q, one));
        if constexpr (source == Source::pair) ei::pstoreu(pointers.shared_x + i, x);
      }
      P polynomial = c[kDegree];
      for (int p = kDegree - 1; p >= 0; --p) polynomial = ei::pmadd(polynomial, x, c[p]);
      const P value = ei::pmadd(polynomial, ei::pmadd(x, quarter, quarter), one);
      ei::pstoreu(pointers.u + i, value);
      if constexpr (first) {
        ei::pstoreu(pointers.maximum + i, value);
      } else {
        ei::pstoreu(pointers.maximum + i, ei::pmax(ei::ploadu<P>(pointers.maximum + i), value));
      }
    }
  };

  // Returns exp(x) for x <= 0: Cephes' polynomial after the reduction
  // x = m ln 2 + r, as Eigen's pexp computes it, but scaling by 2^m with
  // Eigen's fast ldexp. That needs no care for overflow here, because x is
  // clamped at -87.3, where 2^m is still a normal float. Single floats (the
  // last elements of a chunk) use std::exp.
  template <typename P>
  static P exp_of_non_positive(const P& value) {
    if constexpr (std::is_same_v<P, float>) {
      return std::exp(value);
    } else {
      namespace ei = Eigen::internal;
      const P x = ei::pmax(value, ei::pset1<P>(-87.3f));
      // m = x / ln 2 rounded to an integer: adding 1.5 * 2^23 leaves no
      // fraction bits, which is much cheaper than a floor without SSE4.1.
      const P shift = ei::pset1<P>(12582912.0f);
      const P m = ei::psub(ei::pmadd(x, ei::pset1<P>(1.44269504088896341f), shift), shift);
      P r = ei::pmadd(m, ei::pset1<P>(-0.693359375f), x);
      r = ei::pmadd(m, ei::pset1<P>(2.12194440e-4f), r);
      const P r2 = ei::pmul(r, r);
      const P r3 = ei::pmul(r2, r);
      P y = ei::pmadd(ei::pset1<P>(1.9875691500E-4f), r, ei::pset1<P>(1.3981999507E-3f));
      P y1 = ei::pmadd(ei::pset1<P>(4.1665795894E-2f), r, ei::pset1<P>(1.6666665459E-1f));
      const P y2 = ei::padd(r, ei::pset1<P>(1.0f));
      y = ei::pmadd(y, r, ei::pset1<P>(8.3334519073E-3f));
      y1 = ei::pmadd(y1, r, ei::pset1<P>(5.0000001201E-1f));
      y = ei::pmadd(y, r3, y1);
      y = ei::pmadd(y, r2, y2);
      return ei::pldexp_fast_impl<P>::run(y, m);
    }
  }

  // |a| beyond this makes G span more than float's range in the worst case.
  static constexpr double kMaxExponent = 80.0;

  // (G(t) - 1) / t for t in (0, 1/2], without cancellation near t = 0.
  static double quotient(double t, double g, double a) { return std::expm1(-a * std::expm1(-g * t)) / t; }

  // Interpolates (G(t) - 1) / t at the Chebyshev points of x = 4 t - 1 in
  // [-1, 1], converts the series to powers of x, rounds the coefficients to
  // float and checks G against its value in double.
  static std::optional<Coefficients> fit_one(double g, double a) {
    constexpr int kPoints = kDegree + 1;
    const double pi = std::acos(-1.0);
    std::array<double, kPoints> nodes{}, values{};
    for (int j = 0; j < kPoints; ++j) {
      nodes[j] = std::cos(pi * (j + 0.5) / kPoints);
      values[j] = quotient((nodes[j] + 1.0) / 4.0, g, a);
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
      const double t = 0.5 * j / (kChecks - 1);
      const double x = 4.0 * t - 1.0;
      double polynomial = 0.0;
      for (int p = kDegree; p >= 0; --p) polynomial = polynomial * x + static_cast<double>(rounded[p]);
      const double exact = std::exp(-a * std::expm1(-g * t));
      const double fitted = 1.0 + t * polynomial;
      if (!(std::abs(fitted - exact) <= kMaxRelativeError * exact)) return std::nullopt;
    }
    return rounded;
  }

  std::vector<Coefficients> coefficients_;
  float scale_ = 1.0f;
};

}  // namespace cki::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
