// Splicing policies: hard and soft splicing composed with an assessment.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/compatibility_assessment.hpp"
#include "cki/assessment/context.hpp"
#include "cki/detail/kernels.hpp"
#include "cki/detail/parallel.hpp"
#include "cki/detail/traits.hpp"
#include "cki/splicing/report.hpp"
#include "cki/tensor.hpp"

// Eigen's packet types carry vector attributes that GCC drops, with a
// warning, when they are template arguments; Eigen's own headers do the same.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace cki {

namespace detail {

/// Largest model count whose sums and tallies the vector paths of the
/// splices keep on the stack.
inline constexpr Eigen::Index kMaxVectorModels = 16;

/// Adds sum_i u(i, k) * scale[i] over the first `count` rows to
/// weight_sums[k] for each of the `n` models.
template <typename Scalar>
void add_scaled_sums(const BlockArray<Scalar>& u, const Scalar* scale, std::int64_t count, Eigen::Index n,
                     double* weight_sums) {
  const Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> factor(scale, count);
  for (Eigen::Index k = 0; k < n; ++k) {
    weight_sums[k] += static_cast<double>((u.col(k).head(count) * factor).sum());
  }
}

/// Returns the sum of the lanes of `packet` in double, in lane order.
template <typename Packet>
double sum_lanes_as_double(const Packet& packet) {
  constexpr int kSize = Eigen::internal::unpacket_traits<Packet>::size;
  float lanes[kSize];
  Eigen::internal::pstoreu(lanes, packet);
  double sum = 0.0;
  for (float lane : lanes) sum += static_cast<double>(lane);
  return sum;
}

/// Eigen's widest float packet, the vector type of the fused splices.
using FloatPacket = typename Eigen::internal::packet_traits<float>::type;

#if defined(EIGEN_VECTORIZE) && (defined(__GNUC__) || defined(__clang__))
/// A FloatPacket as a vector of the GCC and Clang vector extensions, the
/// lane mask of the same width, and unsigned counts (which wrap, as signed
/// lanes must not).
inline constexpr int kFloatVectorWidth = static_cast<int>(sizeof(FloatPacket) / sizeof(float));
typedef float FloatVector __attribute__((vector_size(sizeof(FloatPacket))));
typedef std::int32_t FloatVectorMask __attribute__((vector_size(sizeof(FloatPacket))));
typedef std::uint32_t FloatVectorCount __attribute__((vector_size(sizeof(FloatPacket))));
#endif

/// Weighs the first `count` elements of kN models (`block`, base first)
/// with `curves` and splices them with `step`, a local copy of `prototype`.
/// Calls step.splice(i, theta, w) for each whole packet of elements from i
/// on (std::array of kN FloatPacket) and for each remaining element
/// (std::array of kN float), with theta holding the values and w the
/// weights. Calls step.flush() after every SoftmaxCurves::kChunk elements
/// and at the end, so that the steps' float partial sums stay short.
template <int kN, typename Step>
void for_each_weighted(const SoftmaxCurves& curves, const float* const* block, std::int64_t count,
                       const Step& prototype) {
  Step step = prototype;
  constexpr std::int64_t kSize = Eigen::internal::unpacket_traits<FloatPacket>::size;
  const SoftmaxCurves::Weigher<kN, FloatPacket> packets(curves);
  const SoftmaxCurves::Weigher<kN, float> singles(curves);
  typename SoftmaxCurves::Weigher<kN, FloatPacket>::Values theta, w, next_theta, next_w;
  typename SoftmaxCurves::Weigher<kN, float>::Values single_theta, single_w;
  for (std::int64_t start = 0; start < count; start += SoftmaxCurves::kChunk) {
    const std::int64_t end = std::min(count, start + SoftmaxCurves::kChunk);
    std::int64_t i = start;
    // Two packets at a time: the second packet's curves run while the first
    // waits on its divisions (3 to 7 % faster in the block_stage benchmarks
    // curves_soft and curves_hard, docs/benchmarks.md).
    for (; i + 2 * kSize <= end; i += 2 * kSize) {
      packets.weigh(block, i, theta, w);
      packets.weigh(block, i + kSize, next_theta, next_w);
      step.splice(i, theta, w);
      step.splice(i + kSize, next_theta, next_w);
    }
    for (; i + kSize <= end; i += kSize) {
      packets.weigh(block, i, theta, w);
      step.splice(i, theta, w);
    }
    for (; i < end; ++i) {
      singles.weigh(block, i, single_theta, single_w);
      step.splice(i, single_theta, single_w);
    }
    step.flush();
  }
}

}  // namespace detail

/// Soft splicing: the merged element is the weighted sum sum_k w_k theta_k.
struct SoftSplice {
  static constexpr bool is_hard = false;
  static constexpr const char* kName = "soft";

  /// Writes `count` merged elements to `out` and adds each model's weight
  /// sum to `weight_sums`. `hard_counts` is unused.
  template <typename Scalar>
  static void apply(const BlockArray<Scalar>& w, const Scalar* const* block, std::int64_t count,
                    Eigen::Index n, Scalar* out, double* weight_sums, std::int64_t* /*hard_counts*/) {
    Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> merged(out, count);
    weighted_sum(w, block, count, n, merged);
    for (Eigen::Index k = 0; k < n; ++k) weight_sums[k] += detail::sum_as_double(w.col(k).data(), count);
  }

  /// As apply(), with the weights given as w_k = u_k * scale: `u` unscaled,
  /// `scale` one factor per element (the reciprocal of the row total). The
  /// merged element is sum_k (u_k * scale) theta_k. The weight sums add up
  /// u_k * scale in Scalar within the call, so `count` should be small (a
  /// chunk of SoftmaxCurves::kChunk elements) to keep them accurate.
  template <typename Scalar>
  static void apply_scaled(const BlockArray<Scalar>& u, const Scalar* scale, const Scalar* const* block,
                           std::int64_t count, Eigen::Index n, Scalar* out, double* weight_sums,
                           std::int64_t* /*hard_counts*/) {
    // Each weight is scaled before it multiplies its value, so every term
    // is at most the value itself and the sum cannot overflow early.
#if defined(__GNUC__) || defined(__clang__)
    if (n <= detail::kMaxVectorModels) {
      weigh_vectors(u, scale, block, count, n, out, weight_sums);
      return;
    }
#endif
    using Column = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    const Column factor(scale, count);
    Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> merged(out, count);
    merged = (u.col(0).head(count) * factor) * Column(block[0], count);
    for (Eigen::Index k = 1; k < n; ++k) merged += (u.col(k).head(count) * factor) * Column(block[k], count);
    detail::add_scaled_sums(u, scale, count, n, weight_sums);
  }

#if defined(EIGEN_VECTORIZE)
  /// As apply_scaled() with the weights of `curves`, for exactly kN models
  /// (float only), without storing the weights to work columns. The
  /// weights are bitwise those of curves.weights(). A merged value may
  /// differ from apply_scaled()'s by a rounding per model, where the
  /// compiler fuses a multiply and an add in one path only.
  template <int kN>
  static void apply_curves(const detail::SoftmaxCurves& curves, const float* const* block, std::int64_t count,
                           float* out, double* weight_sums, std::int64_t* /*hard_counts*/) {
    detail::for_each_weighted<kN>(curves, block, count, CurveStep<kN>(out, weight_sums));
  }
#endif

 private:
#if defined(EIGEN_VECTORIZE)
  // The step of apply_curves(): the merged value of each element and
  // each model's weight sum.
  template <int kN>
  class CurveStep {
   public:
    using Packet = detail::FloatPacket;

    CurveStep(float* out, double* weight_sums) : out_(out), weight_sums_(weight_sums) {
      sums_.fill(Eigen::internal::pset1<Packet>(0.0f));
    }

    void splice(std::int64_t i, const std::array<Packet, kN>& theta, const std::array<Packet, kN>& w) {
      namespace ei = Eigen::internal;
      Packet merged = ei::pset1<Packet>(0.0f);
      for (int k = 0; k < kN; ++k) {
        sums_[k] = ei::padd(sums_[k], w[k]);
        merged = ei::pmadd(w[k], theta[k], merged);
      }
      ei::pstoreu(out_ + i, merged);
    }

    void splice(std::int64_t i, const std::array<float, kN>& theta, const std::array<float, kN>& w) {
      float merged = 0.0f;
      for (int k = 0; k < kN; ++k) {
        single_sums_[k] += static_cast<double>(w[k]);
        merged += w[k] * theta[k];
      }
      out_[i] = merged;
    }

    void flush() {
      for (int k = 0; k < kN; ++k) {
        weight_sums_[k] += single_sums_[k] + detail::sum_lanes_as_double(sums_[k]);
        sums_[k] = Eigen::internal::pset1<Packet>(0.0f);
        single_sums_[k] = 0.0;
      }
    }

   private:
    float* out_;
    double* weight_sums_;
    std::array<Packet, kN> sums_;
    std::array<double, kN> single_sums_{};
  };
#endif

#if defined(__GNUC__) || defined(__clang__)
  // Runs apply_scaled() in one pass over the models per vector of elements,
  // with the GCC and Clang vector extensions: the merged value stays in a
  // register and the weight sums gather in vectors.
  template <typename Scalar>
  static void weigh_vectors(const BlockArray<Scalar>& u, const Scalar* scale, const Scalar* const* block,
                            std::int64_t count, Eigen::Index n, Scalar* out, double* weight_sums) {
    using V = detail::Vectors<Scalar>;
    typename V::Vector sums[detail::kMaxVectorModels];
    for (Eigen::Index k = 0; k < n; ++k) sums[k] = typename V::Vector{};
    const std::int64_t whole = count - count % V::kWidth;
    for (std::int64_t i = 0; i < whole; i += V::kWidth) {
      const typename V::Vector factor = V::load(scale + i);
      typename V::Vector merged = typename V::Vector{};
      for (Eigen::Index k = 0; k < n; ++k) {
        const typename V::Vector weight = V::load(u.col(k).data() + i) * factor;
        sums[k] += weight;
        merged += weight * V::load(block[k] + i);
      }
      V::store(out + i, merged);
    }
    double tail_sums[detail::kMaxVectorModels] = {};
    for (std::int64_t i = whole; i < count; ++i) {
      Scalar merged = 0;
      for (Eigen::Index k = 0; k < n; ++k) {
        const Scalar weight = u(i, k) * scale[i];
        tail_sums[k] += static_cast<double>(weight);
        merged += weight * block[k][i];
      }
      out[i] = merged;
    }
    for (Eigen::Index k = 0; k < n; ++k) {
      double sum = tail_sums[k];
      for (int lane = 0; lane < V::kWidth; ++lane) sum += static_cast<double>(sums[k][lane]);
      weight_sums[k] += sum;
    }
  }
#endif

  template <typename Scalar, typename Merged>
  static void weighted_sum(const BlockArray<Scalar>& w, const Scalar* const* block, std::int64_t count,
                           Eigen::Index n, Merged& merged) {
    using Column = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    merged = w.col(0).head(count) * Column(block[0], count);
    for (Eigen::Index k = 1; k < n; ++k) merged += w.col(k).head(count) * Column(block[k], count);
  }
};

/// Hard splicing: the merged element is the value of the model with the
/// highest weight, exact ties going to the lowest index (the base).
struct HardSplice {
  static constexpr bool is_hard = true;
  static constexpr const char* kName = "hard";

  /// Writes `count` merged elements to `out`, adds each model's weight sum to
  /// `weight_sums` and counts the elements taken from each in `hard_counts`.
  template <typename Scalar>
  static void apply(const BlockArray<Scalar>& w, const Scalar* const* block, std::int64_t count,
                    Eigen::Index n, Scalar* out, double* weight_sums, std::int64_t* hard_counts) {
    select<false>(w, static_cast<const Scalar*>(nullptr), block, count, n, out, hard_counts);
    for (Eigen::Index k = 0; k < n; ++k) weight_sums[k] += detail::sum_as_double(w.col(k).data(), count);
  }

  /// As apply(), with the weights given as w_k = u_k * scale (see
  /// SoftSplice::apply_scaled). The weights compared are the products as
  /// computed in Scalar, so ties are decided on the same values apply()
  /// would see after scaling.
  template <typename Scalar>
  static void apply_scaled(const BlockArray<Scalar>& u, const Scalar* scale, const Scalar* const* block,
                           std::int64_t count, Eigen::Index n, Scalar* out, double* weight_sums,
                           std::int64_t* hard_counts) {
#if defined(__GNUC__) || defined(__clang__)
    if (n <= detail::kMaxVectorModels) {
      select_vectors(u, scale, block, count, n, out, weight_sums, hard_counts);
      return;
    }
#endif
    select<true>(u, scale, block, count, n, out, hard_counts);
    detail::add_scaled_sums(u, scale, count, n, weight_sums);
  }

#if defined(EIGEN_VECTORIZE) && (defined(__GNUC__) || defined(__clang__))
  /// As apply_scaled() with the weights of `curves`, for exactly kN models
  /// (float only), without storing the weights to work columns. The choice
  /// is bitwise the one of curves.weights() and apply_scaled().
  template <int kN>
  static void apply_curves(const detail::SoftmaxCurves& curves, const float* const* block, std::int64_t count,
                           float* out, double* weight_sums, std::int64_t* hard_counts) {
    detail::for_each_weighted<kN>(curves, block, count, CurveStep<kN>(out, weight_sums, hard_counts));
  }
#endif

 private:
#if defined(EIGEN_VECTORIZE) && (defined(__GNUC__) || defined(__clang__))
  // The step of apply_curves(): the value of the model with the highest
  // weight, each model's weight sum and how often each model is taken. The
  // selections use the vector extensions, as select_vectors() does, because
  // their masks compile to fewer instructions than Eigen's pselect.
  template <int kN>
  class CurveStep {
   public:
    using Packet = detail::FloatPacket;
    using Vector = detail::FloatVector;
    using Mask = detail::FloatVectorMask;
    using Count = detail::FloatVectorCount;

    CurveStep(float* out, double* weight_sums, std::int64_t* hard_counts)
        : out_(out), weight_sums_(weight_sums), hard_counts_(hard_counts) {
      sums_.fill(Eigen::internal::pset1<Packet>(0.0f));
      tallies_.fill(Count{});
    }

    void splice(std::int64_t i, const std::array<Packet, kN>& theta, const std::array<Packet, kN>& w) {
      namespace ei = Eigen::internal;
      Vector best = vector(w[0]);
      Vector merged = vector(theta[0]);
      // The chosen model k as k, or with few models as 1 << 8 k, a one in
      // model k's 8-bit field, so that one addition counts every model.
      Mask best_model = kPacked ? Mask{} + 1 : Mask{};
      sums_[0] = ei::padd(sums_[0], w[0]);
      for (int k = 1; k < kN; ++k) {
        sums_[k] = ei::padd(sums_[k], w[k]);
        const Vector current = vector(w[k]);
        const Mask higher = current > best;
        best = detail::pick_lanes(higher, current, best);
        merged = detail::pick_lanes(higher, vector(theta[k]), merged);
        best_model = (best_model & ~higher) | (higher & (kPacked ? 1 << (8 * k) : k));
      }
      std::memcpy(out_ + i, &merged, sizeof merged);
      if constexpr (kPacked) {
        tallies_[0] += reinterpret_cast<Count>(best_model);
      } else {
        // A vector compare gives -1 (all ones) where true, so subtracting it
        // counts.
        for (int k = 0; k < kN; ++k) tallies_[k] -= reinterpret_cast<Count>(best_model == k);
      }
    }

    void splice(std::int64_t i, const std::array<float, kN>& theta, const std::array<float, kN>& w) {
      float best = w[0];
      int best_model = 0;
      single_sums_[0] += static_cast<double>(w[0]);
      for (int k = 1; k < kN; ++k) {
        single_sums_[k] += static_cast<double>(w[k]);
        if (w[k] > best) {
          best = w[k];
          best_model = k;
        }
      }
      out_[i] = theta[best_model];
      ++single_tallies_[best_model];
    }

    void flush() {
      for (int k = 0; k < kN; ++k) {
        weight_sums_[k] += single_sums_[k] + detail::sum_lanes_as_double(sums_[k]);
        hard_counts_[k] += single_tallies_[k];
        for (int lane = 0; lane < detail::kFloatVectorWidth; ++lane) {
          hard_counts_[k] += kPacked ? (tallies_[0][lane] >> (8 * k)) & 0xffu : tallies_[k][lane];
        }
        sums_[k] = Eigen::internal::pset1<Packet>(0.0f);
        single_sums_[k] = 0.0;
        single_tallies_[k] = 0;
      }
      tallies_.fill(Count{});
    }

   private:
    // With up to four models, one tally counts them all in four 8-bit
    // fields. A chunk of SoftmaxCurves::kChunk elements adds at most
    // kChunk / kFloatVectorWidth to a field (128 with SSE, 32 with
    // AVX-512), so no field carries into the next.
    static constexpr bool kPacked = kN <= 4 && detail::SoftmaxCurves::kChunk / detail::kFloatVectorWidth < 256;

    static Vector vector(const Packet& packet) {
      Vector value;
      std::memcpy(&value, &packet, sizeof value);
      return value;
    }

    float* out_;
    double* weight_sums_;
    std::int64_t* hard_counts_;
    std::array<Packet, kN> sums_;
    std::array<Count, kN> tallies_;
    std::array<double, kN> single_sums_{};
    std::array<std::int64_t, kN> single_tallies_{};
  };
#endif

#if defined(__GNUC__) || defined(__clang__)
  // Runs apply_scaled() in one pass over the models per vector of elements,
  // with the GCC and Clang vector extensions. The best weight, its model and
  // the merged value stay in registers, and the weight sums and per-model
  // counts gather in vectors. The comparison is the one select() makes, so
  // ties still keep the lower index.
  template <typename Scalar>
  static void select_vectors(const BlockArray<Scalar>& u, const Scalar* scale, const Scalar* const* block,
                             std::int64_t count, Eigen::Index n, Scalar* out, double* weight_sums,
                             std::int64_t* hard_counts) {
    using V = detail::Vectors<Scalar>;
    using Bits = typename V::Bits;
    using Vector = typename V::Vector;
    using Mask = typename V::Mask;
    constexpr int kWidth = V::kWidth;
    const auto load = [](const Scalar* from) { return V::load(from); };

    Vector sums[detail::kMaxVectorModels];
    Mask tallies[detail::kMaxVectorModels];
    for (Eigen::Index k = 0; k < n; ++k) {
      sums[k] = Vector{};
      tallies[k] = Mask{};
    }
    const std::int64_t whole = count - count % kWidth;
    for (std::int64_t i = 0; i < whole; i += kWidth) {
      const Vector factor = load(scale + i);
      Vector best = load(u.col(0).data() + i) * factor;
      Vector merged = load(block[0] + i);
      Mask best_model = Mask{};
      sums[0] += best;
      for (Eigen::Index k = 1; k < n; ++k) {
        const Vector current = load(u.col(k).data() + i) * factor;
        sums[k] += current;
        const Mask higher = current > best;
        best = detail::pick_lanes(higher, current, best);
        merged = detail::pick_lanes(higher, load(block[k] + i), merged);
        best_model = (best_model & ~higher) | (higher & static_cast<Bits>(k));
      }
      V::store(out + i, merged);
      // A vector compare gives -1 where true, so subtracting it counts.
      for (Eigen::Index k = 0; k < n; ++k) tallies[k] -= best_model == static_cast<Bits>(k);
    }
    double tail_sums[detail::kMaxVectorModels] = {};
    for (std::int64_t i = whole; i < count; ++i) {
      Scalar best = u(i, 0) * scale[i];
      Eigen::Index best_model = 0;
      tail_sums[0] += static_cast<double>(best);
      for (Eigen::Index k = 1; k < n; ++k) {
        const Scalar current = u(i, k) * scale[i];
        tail_sums[k] += static_cast<double>(current);
        if (current > best) {
          best = current;
          best_model = k;
        }
      }
      out[i] = block[best_model][i];
      ++hard_counts[best_model];
    }
    for (Eigen::Index k = 0; k < n; ++k) {
      double sum = tail_sums[k];
      std::int64_t taken = 0;
      for (int lane = 0; lane < kWidth; ++lane) {
        sum += static_cast<double>(sums[k][lane]);
        taken += tallies[k][lane];
      }
      weight_sums[k] += sum;
      hard_counts[k] += taken;
    }
  }
#endif

  // The running argmax visits the models in order and replaces the best
  // only on a strictly higher weight, so ties keep the lower index. The
  // branch-free selects below vectorise; the chunk buffers live on the stack.
  template <bool kScaled, typename Scalar>
  static void select(const BlockArray<Scalar>& w, const Scalar* scale, const Scalar* const* block,
                     std::int64_t count, Eigen::Index n, Scalar* out, std::int64_t* hard_counts) {
    constexpr std::int64_t kChunk = 256;
    Scalar best_weight[kChunk];
    Scalar best_model[kChunk];  // model index, exact in Scalar
    for (std::int64_t start = 0; start < count; start += kChunk) {
      const std::int64_t length = std::min(kChunk, count - start);
      const Scalar* factor = kScaled ? scale + start : nullptr;
      const Scalar* first_weight = w.col(0).data() + start;
      const Scalar* first_value = block[0] + start;
      Scalar* merged = out + start;
      for (std::int64_t i = 0; i < length; ++i) {
        best_weight[i] = kScaled ? first_weight[i] * factor[i] : first_weight[i];
        best_model[i] = Scalar(0);
        merged[i] = first_value[i];
      }
      for (Eigen::Index k = 1; k < n; ++k) {
        const Scalar* weight = w.col(k).data() + start;
        const Scalar* value = block[k] + start;
        const auto model = static_cast<Scalar>(k);
        for (std::int64_t i = 0; i < length; ++i) {
          const Scalar current = kScaled ? weight[i] * factor[i] : weight[i];
          const bool higher = current > best_weight[i];
          best_weight[i] = higher ? current : best_weight[i];
          best_model[i] = higher ? model : best_model[i];
          merged[i] = higher ? value[i] : merged[i];
        }
      }
      for (Eigen::Index k = 0; k < n; ++k) {
        hard_counts[k] += detail::count_equal(best_model, length, static_cast<Scalar>(k));
      }
    }
  }
};

/// Splicing policy: an assessment that scores every element of every model,
/// composed with hard or soft splicing.
///
/// The policy interface, shared by the baseline merge methods:
/// - `std::string name() const`, the method name ("cki-soft");
/// - `nlohmann::json parameters() const`;
/// - `void check(std::size_t n_models) const`, throwing std::invalid_argument;
/// - `std::vector<ModelTensorStats> merge(const TensorContext&, const
///   std::vector<TensorView<Scalar>>& models, Scalar* out) const`, with the
///   models base first and `out` holding room for one tensor; returns stats
///   base first. A policy with report notes returns TensorMergeResult
///   (stats and notes) instead;
/// - optionally `bool checks_finite() const`, true when `merge` itself
///   throws NumericError for non-finite inputs, so splice_tensor need not scan.
/// \tparam Scalar compute scalar, float or double.
/// \tparam Assessment e.g. CompatibilityAssessment<Scalar>.
/// \tparam Splice SoftSplice or HardSplice.
template <typename Scalar, typename Assessment = CompatibilityAssessment<Scalar>,
          typename Splice = SoftSplice>
class SplicingPolicy {
 public:
  using scalar_type = Scalar;

  SplicingPolicy() = default;
  explicit SplicingPolicy(Assessment assessment) : assessment_(std::move(assessment)) {}

  /// Builds the default assessment from `params`; throws std::invalid_argument
  /// naming the first field out of range.
  explicit SplicingPolicy(const CkiParams& params) : assessment_(params) {}

  std::string name() const { return std::string("cki-") + Splice::kName; }
  nlohmann::json parameters() const { return assessment_.parameters(); }
  void check(std::size_t n_models) const { assessment_.check(n_models); }
  bool checks_finite() const { return true; }

  const Assessment& assessment() const { return assessment_; }
  Assessment& assessment() { return assessment_; }

  /// Splices one tensor of N models (base first) into `out`.
  std::vector<ModelTensorStats> merge(const TensorContext& context,
                                      const std::vector<TensorView<Scalar>>& models, Scalar* out) const {
    const auto n = static_cast<Eigen::Index>(models.size());
    const std::int64_t numel = models.front().size();

    // Global level: entropies and global weights, once per tensor.
    const GlobalAssessment global = assessment_.assess_tensor(context, models);
    const std::vector<Scalar> global_weights(global.global_weight.begin(), global.global_weight.end());

    // Local level and splicing, block by block; per-block sums are added in
    // block order afterwards so the report does not depend on threads.
    // Blocks split rows unless the assessment maps along the last dimension.
    const std::int64_t row_length = detail::needs_whole_rows(assessment_, context) ? last_dim(context.shape) : 1;
    const detail::BlockPlan plan(numel, row_length);
    const std::int64_t capacity = plan.rows_per_block * plan.row_length;
    const auto blocks = static_cast<std::size_t>(plan.block_count);
    std::vector<double> weight_sums(blocks * static_cast<std::size_t>(n), 0.0);
    std::vector<std::int64_t> hard_counts(blocks * static_cast<std::size_t>(n), 0);
    std::vector<Workspace> workspaces(static_cast<std::size_t>(detail::thread_count(context.threads)));
    const std::optional<detail::SoftmaxCurves> curves = softmax_curves(context, global.global_weight);

    detail::for_each_block(
        plan.block_count, context.threads,
        [&](int thread) { workspaces[static_cast<std::size_t>(thread)].allocate(capacity, n, curves.has_value()); },
        [&](std::int64_t block, int thread) {
          Workspace& work = workspaces[static_cast<std::size_t>(thread)];
          const std::int64_t begin = plan.begin(block);
          const std::int64_t count = plan.end(block) - begin;
          const auto offset = static_cast<std::size_t>(block) * static_cast<std::size_t>(n);
          if constexpr (std::is_same_v<Scalar, float>) {
            if (curves) {
              if constexpr (detail::has_apply_curves<Splice>::value) {
                for (Eigen::Index k = 0; k < n; ++k) work.pointers[k] = models[k].data() + begin;
                const bool fused = detail::SoftmaxCurves::with_model_count(n, [&](auto models_count) {
                  Splice::template apply_curves<decltype(models_count)::value>(
                      *curves, work.pointers.data(), count, out + begin, weight_sums.data() + offset,
                      hard_counts.data() + offset);
                });
                if (fused) return;
              }
              // Chunks small enough that weights and work columns stay in
              // the first-level cache between computing and using them.
              for (std::int64_t start = 0; start < count; start += detail::SoftmaxCurves::kChunk) {
                const std::int64_t length = std::min(detail::SoftmaxCurves::kChunk, count - start);
                for (Eigen::Index k = 0; k < n; ++k) work.pointers[k] = models[k].data() + begin + start;
                const Scalar* scale = curves->weights(work.pointers.data(), length, work.w, work.scratch);
                apply_scaled(work.w, scale, work.pointers.data(), length, n, out + begin + start,
                             weight_sums.data() + offset, hard_counts.data() + offset);
              }
              return;
            }
          }
          for (Eigen::Index k = 0; k < n; ++k) work.pointers[k] = models[k].data() + begin;
          assessment_.assess_block(context, global_weights, work.pointers.data(), count, work.l, work.w,
                                   work.scratch);
          Splice::apply(work.w, work.pointers.data(), count, n, out + begin, weight_sums.data() + offset,
                        hard_counts.data() + offset);
        });

    // Per-model statistics for the report.
    std::vector<ModelTensorStats> stats(static_cast<std::size_t>(n));
    for (Eigen::Index k = 0; k < n; ++k) {
      double weight_total = 0.0;
      std::int64_t taken = 0;
      for (std::size_t b = 0; b < blocks; ++b) {
        weight_total += weight_sums[b * n + k];
        taken += hard_counts[b * n + k];
      }
      auto& model = stats[static_cast<std::size_t>(k)];
      model.entropy = global.entropy[k];
      model.global_weight = global.global_weight[k];
      model.mean_weight = weight_total / static_cast<double>(numel);
      if (Splice::is_hard) model.hard_share = static_cast<double>(taken) / static_cast<double>(numel);
    }
    return stats;
  }

 private:
  struct Workspace {
    BlockArray<Scalar> l, w, scratch;
    std::vector<const Scalar*> pointers;

    // With fitted curves the weights of one chunk need no `l`.
    void allocate(std::int64_t capacity, Eigen::Index n, bool curves) {
      if (curves) {
        w.resize(detail::SoftmaxCurves::kChunk, n);
        scratch.resize(detail::SoftmaxCurves::kChunk, detail::SoftmaxCurves::kScratchColumns);
      } else {
        l.resize(capacity, n);
        w.resize(capacity, n);
        scratch.resize(capacity, std::max<Eigen::Index>(n, 2));
      }
      pointers.resize(static_cast<std::size_t>(n));
    }
  };

  // Splices with weights u_k * scale: with the splice's apply_scaled() when
  // it has one, otherwise by scaling `u` in place and calling apply().
  static void apply_scaled(BlockArray<Scalar>& u, const Scalar* scale, const Scalar* const* block,
                           std::int64_t count, Eigen::Index n, Scalar* out, double* weight_sums,
                           std::int64_t* hard_counts) {
    if constexpr (detail::has_apply_scaled<Splice, Scalar>::value) {
      Splice::apply_scaled(u, scale, block, count, n, out, weight_sums, hard_counts);
    } else {
      const Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> factor(scale, count);
      for (Eigen::Index k = 0; k < n; ++k) u.col(k).head(count) *= factor;
      Splice::apply(u, block, count, n, out, weight_sums, hard_counts);
    }
  }

  // The assessment's fitted softmax curves for this tensor, when it offers
  // them (CompatibilityAssessment<float> with its default parts does).
  std::optional<detail::SoftmaxCurves> softmax_curves(const TensorContext& context,
                                                      const std::vector<double>& global_weights) const {
    if constexpr (detail::has_softmax_curves<Assessment>::value) {
      return assessment_.softmax_curves(context, global_weights);
    } else {
      (void)context;
      (void)global_weights;
      return std::nullopt;
    }
  }

  Assessment assessment_;
};

/// Data-free CKI with soft splicing (score-weighted sum).
template <typename Scalar>
using CkiSoft = SplicingPolicy<Scalar, CompatibilityAssessment<Scalar>, SoftSplice>;

/// Data-free CKI with hard splicing (value of the best-scoring model).
template <typename Scalar>
using CkiHard = SplicingPolicy<Scalar, CompatibilityAssessment<Scalar>, HardSplice>;

}  // namespace cki

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
