// Tests of detail::SoftmaxCurves, which computes the default assessment's
// softmax weights in float from one polynomial per model. The weights are
// checked against the stage-wise functors in double, and splice() with the
// curves against splice() without them.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <cki/cki.hpp>

namespace {

/// Combination rule of a type other than CombinationRule. An assessment
/// built with it offers no fitted curves, so splice() runs the stage-wise
/// functors.
struct StagewiseRule : cki::CombinationRule {
  using CombinationRule::CombinationRule;
};

template <typename Splice>
using StagewisePolicy =
    cki::SplicingPolicy<float,
                        cki::CompatibilityAssessment<float, cki::InformationContent, cki::GlobalWeight,
                                                     cki::LocalUncertainty<float>, StagewiseRule>,
                        Splice>;

cki::TensorContext context_of(std::size_t models, std::int64_t count) {
  cki::TensorContext context;
  context.name = "layer.weight";
  context.shape = {count};
  for (std::size_t k = 0; k < models; ++k) context.order.push_back(k);
  return context;
}

/// Returns N models of `count` values: a shared base with per-model
/// deviations. Elements 0 to 3 cover the edge cases: all models equal
/// (d = 0), one model far out (t near 0), huge values, and small steps.
std::vector<std::vector<float>> test_models(std::size_t n, std::int64_t count, std::uint32_t seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> base(0.0f, 0.05f);
  std::normal_distribution<float> deviation(0.0f, 0.2f);
  std::vector<std::vector<float>> models(n, std::vector<float>(static_cast<std::size_t>(count)));
  for (std::int64_t i = 0; i < count; ++i) {
    const float shared = base(generator);
    for (std::size_t k = 0; k < n; ++k) models[k][static_cast<std::size_t>(i)] = shared + deviation(generator);
  }
  for (std::size_t k = 0; k < n; ++k) {
    models[k][0] = 0.25f;                                   // every model equal
    models[k][1] = k == 1 ? 1e6f : 0.5f;                    // one outlier
    models[k][2] = (k % 2 == 0 ? 1.0f : -1.0f) * 3e37f;     // huge values
    models[k][3] = 0.01f * static_cast<float>(k);           // small steps
  }
  return models;
}

/// Weights of the stage-wise functors computed in double from the same
/// float inputs: the reference the float paths are held to.
Eigen::ArrayXXd reference_weights(const std::vector<std::vector<float>>& models, const std::vector<double>& global,
                                  const cki::CkiParams& params) {
  const auto n = static_cast<Eigen::Index>(models.size());
  const auto count = static_cast<std::int64_t>(models.front().size());
  std::vector<std::vector<double>> wide;
  for (const auto& model : models) wide.emplace_back(model.begin(), model.end());
  std::vector<const double*> pointers;
  for (const auto& model : wide) pointers.push_back(model.data());
  const cki::LocalUncertainty<double> local(params.local());
  const cki::CombinationRule rule(params.combination());
  cki::BlockArray<double> l(count, n), w(count, n), scratch(count, std::max<Eigen::Index>(n, 2));
  local(context_of(models.size(), count), pointers.data(), count, l, scratch);
  rule(global, count, l, w, scratch);
  return w;
}

/// Weights from the curves: u_k times the returned scale.
Eigen::ArrayXXd curve_weights(const cki::detail::SoftmaxCurves& curves, const std::vector<std::vector<float>>& models) {
  const auto n = static_cast<Eigen::Index>(models.size());
  const auto count = static_cast<std::int64_t>(models.front().size());
  REQUIRE(count <= cki::detail::SoftmaxCurves::kChunk);
  std::vector<const float*> pointers;
  for (const auto& model : models) pointers.push_back(model.data());
  cki::BlockArray<float> u(cki::detail::SoftmaxCurves::kChunk, n);
  cki::BlockArray<float> scratch(cki::detail::SoftmaxCurves::kChunk, cki::detail::SoftmaxCurves::kScratchColumns);
  u.setConstant(-7.0f);
  const float* scale = curves.weights(pointers.data(), count, u, scratch);
  Eigen::ArrayXXd out(count, n);
  for (Eigen::Index k = 0; k < n; ++k) {
    for (std::int64_t i = 0; i < count; ++i) out(i, k) = static_cast<double>(u(i, k)) * scale[i];
  }
  return out;
}

std::vector<cki::Tensor<float>> tensors_of(const std::vector<std::vector<float>>& models, const cki::Shape& shape) {
  std::vector<cki::Tensor<float>> tensors;
  for (const auto& values : models) {
    cki::Tensor<float> tensor(shape);
    std::copy(values.begin(), values.end(), tensor.data());
    tensors.push_back(std::move(tensor));
  }
  return tensors;
}

/// N random models of 512 values for the splice tests, and their pointers.
struct RandomBlock {
  std::vector<std::vector<float>> values;
  std::vector<const float*> pointers;

  RandomBlock(Eigen::Index n, std::mt19937& generator) : values(static_cast<std::size_t>(n), std::vector<float>(512)) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& model : values) {
      for (auto& value : model) value = normal(generator);
      pointers.push_back(model.data());
    }
  }
};

/// Calls check(n, count, models, generator) for each case of the scaled
/// splice tests, with new random models of 512 values each time. Up to 16
/// models take the vector path and 17 the other. Counts of 1 to 33 leave
/// tails after whole vectors of 4 or 8 floats.
template <typename Check>
void for_each_scaled_case(std::uint32_t seed, Check check) {
  std::mt19937 generator(seed);
  for (Eigen::Index n : {2, 3, 4, 8, 16, 17}) {
    for (std::int64_t count : {1, 7, 8, 9, 33, 512}) {
      INFO("N = " << n << ", count = " << count);
      const RandomBlock models(n, generator);
      check(n, count, models, generator);
    }
  }
}

}  // namespace

TEST_CASE("fitted curves match softmax weights", "[assessment][curves]") {
  struct Case {
    std::size_t models;
    std::vector<double> global;
    double temperature;
    double scale;
  };
  // Global weights as the two-model and N-model forms give them (summing
  // to 1) and larger ones, with temperatures and scales off the defaults.
  // Each case has 77 elements: four whole packets of 16 floats and a
  // remainder (19 packets of 4 and a remainder with SSE), so both loops run.
  const std::vector<Case> cases{
      {2, {0.6, 1.4}, 1.0, 1.0},
      {2, {1.0, 1.0}, 0.5, 20.0},
      {3, {0.2, 0.3, 0.5}, 1.0, 1.0},
      {4, {0.25, 0.25, 0.25, 0.25}, 1.0, 1.0},
      {4, {0.1, 0.4, 0.3, 0.2}, 0.2, 3.0},
      {8, {0.05, 0.1, 0.1, 0.15, 0.1, 0.2, 0.2, 0.1}, 1.0, 1.0},
  };
  for (const Case& test : cases) {
    INFO("N = " << test.models << ", tau = " << test.temperature << ", s = " << test.scale);
    const auto models = test_models(test.models, 77, static_cast<std::uint32_t>(test.models * 31));
    cki::CkiParams params;
    params.temperature = test.temperature;
    params.scale = test.scale;
    const auto curves = cki::detail::SoftmaxCurves::fit(test.global, test.temperature, test.scale);
    REQUIRE(curves.has_value());

    const Eigen::ArrayXXd expected = reference_weights(models, test.global, params);
    const Eigen::ArrayXXd actual = curve_weights(*curves, models);
    // Float weights carry a few units in the last place from the inputs'
    // deviations alone; the curves add at most kMaxRelativeError.
    CHECK((actual - expected).abs().maxCoeff() <= 2e-6);
    for (Eigen::Index i = 0; i < actual.rows(); ++i) CHECK(actual.row(i).sum() == Approx(1.0).epsilon(2e-6));

    // All models equal: every weight is the softmax of the global terms
    // alone, and with equal global weights the models tie exactly.
    const Eigen::ArrayXXd equal_row = actual.row(0);
    CHECK((equal_row - expected.row(0)).abs().maxCoeff() <= 2e-6);
  }
}

TEST_CASE("curves as accurate as float functors", "[assessment][curves]") {
  // Scales s from 1 to 1e6, temperatures from 0.1 to 1e6, deviations of
  // 0.2 and 0.001 between 4 models. The curves' largest error against the
  // stage-wise functors in double must stay within twice that of the
  // stage-wise functors in float, plus 5e-8. At tau = 0.01 the fit is
  // rejected, so the stage-wise functors run instead.
  const std::vector<double> global{0.1, 0.4, 0.3, 0.2};
  const std::int64_t count = 512;
  std::mt19937 generator(7);
  for (double scale : {1.0, 20.0, 1e3, 1e6}) {
    for (double temperature : {0.01, 0.1, 1.0, 100.0, 1e6}) {
      for (float spread : {0.2f, 1e-3f}) {
        INFO("s = " << scale << ", tau = " << temperature << ", deviation " << spread);
        std::normal_distribution<float> normal(0.0f, spread);
        std::vector<std::vector<float>> models(4, std::vector<float>(static_cast<std::size_t>(count)));
        for (std::size_t i = 0; i < static_cast<std::size_t>(count); ++i) {
          const float shared = normal(generator);
          for (auto& model : models) model[i] = shared + normal(generator);
        }
        cki::CkiParams params;
        params.scale = scale;
        params.temperature = temperature;
        std::vector<double> rounded;
        for (double weight : global) rounded.push_back(static_cast<float>(weight));
        const Eigen::ArrayXXd exact = reference_weights(models, rounded, params);

        std::vector<const float*> pointers;
        for (const auto& model : models) pointers.push_back(model.data());
        const std::vector<float> global_float(rounded.begin(), rounded.end());
        cki::BlockArray<float> l(count, 4), w(count, 4), scratch(count, 4);
        cki::LocalUncertainty<float>(params.local())(context_of(4, count), pointers.data(), count, l, scratch);
        cki::CombinationRule(params.combination())(global_float, count, l, w, scratch);
        const double stagewise = (w.cast<double>() - exact).abs().maxCoeff();

        const auto curves = cki::detail::SoftmaxCurves::fit(rounded, temperature, scale);
        CHECK(curves.has_value() == (temperature > 0.01));
        if (curves) CHECK((curve_weights(*curves, models) - exact).abs().maxCoeff() <= 2.0 * stagewise + 5e-8);
      }
    }
  }
}

TEST_CASE("fitted curves tie like the rule", "[assessment][curves]") {
  // Equal global weights give every model the same curve, so equal
  // deviations give bitwise equal weights: hard splicing then keeps the
  // base, as the stage-wise rule does.
  const std::vector<std::vector<float>> models{{0.1f, 2.0f, -3.0f}, {0.1f, 2.0f, -3.0f}, {0.1f, 2.0f, -3.0f}};
  const auto curves = cki::detail::SoftmaxCurves::fit({0.5, 0.5, 0.5}, 1.0, 1.0);
  REQUIRE(curves.has_value());
  const Eigen::ArrayXXd weights = curve_weights(*curves, models);
  for (Eigen::Index i = 0; i < weights.rows(); ++i) {
    CHECK(weights(i, 0) == weights(i, 1));
    CHECK(weights(i, 0) == weights(i, 2));
  }
}

TEST_CASE("inaccurate curve fits are rejected", "[assessment][curves]") {
  CHECK(cki::detail::SoftmaxCurves::fit({0.6, 1.4}, 1.0, 1.0).has_value());
  // tau = 1e-3 makes exp(e / tau) span about e^500 across q: no polynomial
  // of degree kDegree follows that, and it would overflow float.
  CHECK_FALSE(cki::detail::SoftmaxCurves::fit({0.6, 1.4}, 1e-3, 1.0).has_value());
  // g / tau = 40 still fits in float but bends too fast for the polynomial.
  CHECK_FALSE(cki::detail::SoftmaxCurves::fit({8.0, 8.0}, 0.2, 1.0).has_value());
  CHECK_FALSE(
      cki::detail::SoftmaxCurves::fit({0.5, std::numeric_limits<double>::quiet_NaN()}, 1.0, 1.0).has_value());
  CHECK_FALSE(
      cki::detail::SoftmaxCurves::fit({0.5, std::numeric_limits<double>::infinity()}, 1.0, 1.0).has_value());
}

static_assert(cki::detail::has_softmax_curves<cki::CompatibilityAssessment<float>>::value,
              "splice() must find the fitted curves of the default assessment");
static_assert(cki::detail::has_apply_scaled<cki::SoftSplice, float>::value &&
                  cki::detail::has_apply_scaled<cki::HardSplice, float>::value,
              "splice() must find the scaled splices");
#if defined(EIGEN_VECTORIZE) && (defined(__GNUC__) || defined(__clang__))
static_assert(cki::detail::has_apply_curves<cki::SoftSplice>::value &&
                  cki::detail::has_apply_curves<cki::HardSplice>::value,
              "splice() must find the fused splices");
#endif

TEST_CASE("curves only for float softmax", "[assessment][curves]") {
  const cki::TensorContext context = context_of(2, 8);
  const std::vector<double> global{0.6, 1.4};
  CHECK(cki::CompatibilityAssessment<float>().softmax_curves(context, global).has_value());
  CHECK_FALSE(cki::CompatibilityAssessment<double>().softmax_curves(context, global).has_value());
  cki::CkiParams blend;
  blend.rule = cki::RuleKind::blend;
  CHECK_FALSE(cki::CompatibilityAssessment<float>(blend).softmax_curves(context, global).has_value());
  // One model has nothing to weigh against.
  CHECK_FALSE(cki::CompatibilityAssessment<float>().softmax_curves(context_of(1, 8), {1.0}).has_value());
  // A tensor with an assessment map takes the stage-wise path.
  cki::CompatibilityAssessment<float> mapped;
  cki::AssessmentMap<float> map;
  map.weight = Eigen::MatrixXf::Identity(8, 8);
  mapped.local_uncertainty().set_map("layer.weight", map);
  CHECK_FALSE(mapped.softmax_curves(context, global).has_value());
}

TEST_CASE("curves splice like stage-wise functors", "[splice][curves]") {
  // 3 x 4100 elements: three blocks of 4096 elements and one of 12, with
  // chunks of 512 inside them, the last chunk of each block short.
  const cki::Shape shape{3, 4100};
  const std::int64_t count = 3 * 4100;
  // Up to 8 models splice one vector of elements at a time, 9 chunk by chunk.
  for (std::size_t n : {2u, 4u, 9u}) {
    INFO("N = " << n);
    const auto values = test_models(n, count, static_cast<std::uint32_t>(7 + n));
    const auto tensors = tensors_of(values, shape);
    std::vector<cki::TensorView<float>> views;
    for (const auto& tensor : tensors) views.push_back(tensor.view());

    std::vector<float> fast(static_cast<std::size_t>(count)), stagewise(fast.size());
    const auto fast_soft = cki::splice_tensor("layer.weight", views, 0, cki::CkiSoft<float>(), fast.data(), 1);
    const auto slow_soft =
        cki::splice_tensor("layer.weight", views, 0, StagewisePolicy<cki::SoftSplice>(), stagewise.data(), 1);
    double worst = 0.0;
    for (std::size_t i = 0; i < fast.size(); ++i) {
      const double scale = std::max(1.0, static_cast<double>(std::abs(stagewise[i])));
      worst = std::max(worst, std::abs(static_cast<double>(fast[i]) - stagewise[i]) / scale);
    }
    CHECK(worst <= 1e-5);
    for (std::size_t k = 0; k < n; ++k) {
      CHECK(*fast_soft.models[k].mean_weight == Approx(*slow_soft.models[k].mean_weight).epsilon(1e-5));
      CHECK(*fast_soft.models[k].entropy == *slow_soft.models[k].entropy);
    }

    // Hard splicing: every element comes from an input, and the shares of
    // the two paths agree but for near-ties, which are rare in this data.
    const auto fast_hard = cki::splice_tensor("layer.weight", views, 0, cki::CkiHard<float>(), fast.data(), 1);
    const auto slow_hard =
        cki::splice_tensor("layer.weight", views, 0, StagewisePolicy<cki::HardSplice>(), stagewise.data(), 1);
    std::int64_t differing = 0;
    for (std::size_t i = 0; i < fast.size(); ++i) differing += fast[i] != stagewise[i] ? 1 : 0;
    CHECK(differing <= count / 1000);
    double shares = 0.0;
    for (std::size_t k = 0; k < n; ++k) {
      shares += *fast_hard.models[k].hard_share;
      CHECK(*fast_hard.models[k].hard_share == Approx(*slow_hard.models[k].hard_share).margin(1e-3));
    }
    CHECK(shares == Approx(1.0));
  }
}

TEST_CASE("curves splice identically across threads", "[splice][curves][threads]") {
  const cki::Shape shape{5, 3001};
  const auto values = test_models(4, 5 * 3001, 99);
  const auto tensors = tensors_of(values, shape);
  std::vector<cki::TensorView<float>> views;
  for (const auto& tensor : tensors) views.push_back(tensor.view());
  for (bool hard : {false, true}) {
    std::vector<float> one(5 * 3001), two(one.size());
    cki::TensorReport a, b;
    if (hard) {
      a = cki::splice_tensor("w", views, 2, cki::CkiHard<float>(), one.data(), 1);
      b = cki::splice_tensor("w", views, 2, cki::CkiHard<float>(), two.data(), 2);
    } else {
      a = cki::splice_tensor("w", views, 2, cki::CkiSoft<float>(), one.data(), 1);
      b = cki::splice_tensor("w", views, 2, cki::CkiSoft<float>(), two.data(), 2);
    }
    CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
    for (std::size_t k = 0; k < 4; ++k) CHECK(*a.models[k].mean_weight == *b.models[k].mean_weight);
  }
}

TEST_CASE("scaled hard splice matches hard splice", "[splice][curves]") {
  // apply_scaled() with weights u * scale must pick what apply() picks on
  // the products, ties to the lower index included. Every fifth element
  // ties all models.
  for_each_scaled_case(3, [](Eigen::Index n, std::int64_t count, const RandomBlock& models,
                             std::mt19937& generator) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    cki::BlockArray<float> u(512, n), w(512, n);
    std::vector<float> scale(512, 1.0f / 3.0f);
    for (Eigen::Index i = 0; i < 512; ++i) {
      for (Eigen::Index k = 0; k < n; ++k) {
        u(i, k) = i % 5 == 0 ? 1.0f : 1.0f + std::abs(normal(generator));
        w(i, k) = u(i, k) * scale[static_cast<std::size_t>(i)];
      }
    }

    std::vector<float> scaled(512), plain(512);
    std::vector<double> scaled_sums(static_cast<std::size_t>(n)), plain_sums(scaled_sums.size());
    std::vector<std::int64_t> scaled_counts(scaled_sums.size()), plain_counts(scaled_sums.size());
    cki::HardSplice::apply_scaled(u, scale.data(), models.pointers.data(), count, n, scaled.data(),
                                  scaled_sums.data(), scaled_counts.data());
    cki::HardSplice::apply(w, models.pointers.data(), count, n, plain.data(), plain_sums.data(),
                           plain_counts.data());
    for (std::size_t i = 0; i < static_cast<std::size_t>(count); ++i) CHECK(scaled[i] == plain[i]);
    CHECK(scaled_counts == plain_counts);
    for (std::size_t k = 0; k < scaled_sums.size(); ++k) CHECK(scaled_sums[k] == Approx(plain_sums[k]).epsilon(1e-6));
    // Tied elements (i % 5 == 0) go to the base.
    for (std::size_t i = 0; i < static_cast<std::size_t>(count); i += 5) CHECK(scaled[i] == models.values[0][i]);
  });
}

TEST_CASE("scaled soft splice matches soft splice", "[splice][curves]") {
  // apply_scaled() with weights u * scale must merge as apply() does on the
  // products.
  for_each_scaled_case(4, [](Eigen::Index n, std::int64_t count, const RandomBlock& models,
                             std::mt19937& generator) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    cki::BlockArray<float> u(512, n), w(512, n);
    std::vector<float> scale(512);
    for (Eigen::Index i = 0; i < 512; ++i) {
      float total = 0.0f;
      for (Eigen::Index k = 0; k < n; ++k) {
        u(i, k) = std::abs(normal(generator));
        total += u(i, k);
      }
      scale[static_cast<std::size_t>(i)] = 1.0f / total;
      for (Eigen::Index k = 0; k < n; ++k) w(i, k) = u(i, k) * scale[static_cast<std::size_t>(i)];
    }

    std::vector<float> scaled(512), plain(512);
    std::vector<double> scaled_sums(static_cast<std::size_t>(n)), plain_sums(scaled_sums.size());
    std::vector<std::int64_t> unused(scaled_sums.size());
    cki::SoftSplice::apply_scaled(u, scale.data(), models.pointers.data(), count, n, scaled.data(),
                                  scaled_sums.data(), unused.data());
    cki::SoftSplice::apply(w, models.pointers.data(), count, n, plain.data(), plain_sums.data(), unused.data());
    for (std::size_t i = 0; i < static_cast<std::size_t>(count); ++i) {
      CHECK(scaled[i] == Approx(plain[i]).epsilon(1e-5).margin(1e-6));
    }
    for (std::size_t k = 0; k < scaled_sums.size(); ++k) {
      CHECK(scaled_sums[k] == Approx(plain_sums[k]).epsilon(1e-5));
    }
  });
}

#if defined(EIGEN_VECTORIZE) && (defined(__GNUC__) || defined(__clang__))
namespace {

/// Splices `count` elements of `models` through curves.weights() and the
/// splice's apply_scaled() in chunks of SoftmaxCurves::kChunk, as splice()
/// does for more than SoftmaxCurves::kMaxFusedModels models.
template <typename Splice>
void chunked_splice(const cki::detail::SoftmaxCurves& curves, const std::vector<const float*>& models,
                    std::int64_t count, float* out, double* weight_sums, std::int64_t* hard_counts) {
  using Curves = cki::detail::SoftmaxCurves;
  const auto n = static_cast<Eigen::Index>(models.size());
  cki::BlockArray<float> u(Curves::kChunk, n), scratch(Curves::kChunk, Curves::kScratchColumns);
  std::vector<const float*> chunk(models.size());
  for (std::int64_t start = 0; start < count; start += Curves::kChunk) {
    const std::int64_t length = std::min(Curves::kChunk, count - start);
    for (std::size_t k = 0; k < models.size(); ++k) chunk[k] = models[k] + start;
    const float* scale = curves.weights(chunk.data(), length, u, scratch);
    Splice::apply_scaled(u, scale, chunk.data(), length, n, out + start, weight_sums, hard_counts);
  }
}

}  // namespace

TEST_CASE("fused splices match chunked splices", "[splice][curves]") {
  // For 2 to kMaxFusedModels models, splice() weighs and splices one
  // vector of elements at a time (apply_curves). Beyond that it stores the
  // weights of each chunk and splices them with apply_scaled(). Both must
  // choose the same hard values and counts bit for bit.
  // A soft value may differ by a rounding of each term, where the compiler
  // fuses a multiply and an add in one path only (GCC 12 does for N = 8
  // with -march=native), so the bound below allows that.
  // Counts cover a single element, tails after whole packets, and several
  // chunks with a short last one.
  for (int n = 2; n <= cki::detail::SoftmaxCurves::kMaxFusedModels; ++n) {
    for (bool equal : {false, true}) {
      std::vector<double> global;
      for (int k = 0; k < n; ++k) global.push_back(equal ? 1.0 / n : (1.0 + k) / (n * (n + 1) / 2.0));
      const auto curves = cki::detail::SoftmaxCurves::fit(global, 0.5, 2.0);
      REQUIRE(curves.has_value());

      const auto values = test_models(static_cast<std::size_t>(n), 1300, static_cast<std::uint32_t>(40 + n));
      std::vector<const float*> models;
      for (const auto& model : values) models.push_back(model.data());
      for (std::int64_t count : {1, 15, 17, 33, 512, 1300}) {
        INFO("N = " << n << ", equal global weights: " << equal << ", count = " << count);
        const auto size = static_cast<std::size_t>(count);
        std::vector<float> fused_soft(size), chunked_soft(size), fused_hard(size), chunked_hard(size);
        std::vector<double> sums[4];
        std::vector<std::int64_t> counts[4];
        for (int j = 0; j < 4; ++j) {
          sums[j].assign(static_cast<std::size_t>(n), 0.0);
          counts[j].assign(static_cast<std::size_t>(n), 0);
        }

        const bool fused = cki::detail::SoftmaxCurves::with_model_count(n, [&](auto models_count) {
          constexpr int kN = decltype(models_count)::value;
          cki::SoftSplice::apply_curves<kN>(*curves, models.data(), count, fused_soft.data(), sums[0].data(),
                                            counts[0].data());
          cki::HardSplice::apply_curves<kN>(*curves, models.data(), count, fused_hard.data(), sums[1].data(),
                                            counts[1].data());
        });
        REQUIRE(fused);
        chunked_splice<cki::SoftSplice>(*curves, models, count, chunked_soft.data(), sums[2].data(),
                                        counts[2].data());
        chunked_splice<cki::HardSplice>(*curves, models, count, chunked_hard.data(), sums[3].data(),
                                        counts[3].data());

        for (std::size_t i = 0; i < size; ++i) {
          double magnitude = 0.0;
          for (const auto& model : values) magnitude += std::abs(static_cast<double>(model[i]));
          CHECK(std::abs(static_cast<double>(fused_soft[i]) - chunked_soft[i]) <= 2.4e-7 * magnitude);
        }
        CHECK(std::memcmp(fused_hard.data(), chunked_hard.data(), size * sizeof(float)) == 0);
        CHECK(counts[1] == counts[3]);

        std::int64_t counted = 0;
        for (int k = 0; k < n; ++k) {
          counted += counts[1][static_cast<std::size_t>(k)];
          CHECK(sums[0][static_cast<std::size_t>(k)] == Approx(sums[2][static_cast<std::size_t>(k)]).epsilon(1e-6));
          CHECK(sums[1][static_cast<std::size_t>(k)] == Approx(sums[3][static_cast<std::size_t>(k)]).epsilon(1e-6));
        }
        CHECK(counted == count);
        if (equal && n == 2) CHECK(counts[1][0] == count);  // N = 2 shares q: every element ties
      }
    }
  }

  // Nine models take the chunked path.
  const auto nine = cki::detail::SoftmaxCurves::fit(std::vector<double>(9, 1.0 / 9), 1.0, 1.0);
  REQUIRE(nine.has_value());
  CHECK_FALSE(cki::detail::SoftmaxCurves::with_model_count(nine->models(), [](auto) {}));
}

TEST_CASE("fused hard splice counts full chunks", "[splice][curves]") {
  // Identical models have d = 0 and q = 1 everywhere, so G_k(1) alone
  // decides. With equal global weights every element ties and the base
  // takes all of them. With rising global weights G_k(1) rises with k
  // and the last model takes all of them: its tally field gets the most a
  // chunk can give, over eight whole chunks and a tail.
  const std::int64_t count = 8 * cki::detail::SoftmaxCurves::kChunk + 7;
  // Moderate values: at huge ones the leave-one-out mean, taken from the
  // rounded sum of all models, differs from the value itself.
  std::mt19937 generator(61);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  std::vector<float> shared(static_cast<std::size_t>(count));
  for (auto& value : shared) value = normal(generator);
  for (int n = 2; n <= cki::detail::SoftmaxCurves::kMaxFusedModels; ++n) {
    const std::vector<std::vector<float>> values(static_cast<std::size_t>(n), shared);
    std::vector<const float*> models;
    for (const auto& model : values) models.push_back(model.data());
    for (bool rising : {false, true}) {
      INFO("N = " << n << ", rising global weights: " << rising);
      std::vector<double> global;
      for (int k = 0; k < n; ++k) global.push_back(rising ? (1.0 + k) / (n * (n + 1) / 2.0) : 1.0 / n);
      const auto curves = cki::detail::SoftmaxCurves::fit(global, 0.5, 2.0);
      REQUIRE(curves.has_value());

      std::vector<float> merged(static_cast<std::size_t>(count));
      std::vector<double> sums(static_cast<std::size_t>(n), 0.0);
      std::vector<std::int64_t> counts(static_cast<std::size_t>(n), 0);
      cki::detail::SoftmaxCurves::with_model_count(n, [&](auto models_count) {
        cki::HardSplice::apply_curves<decltype(models_count)::value>(*curves, models.data(), count, merged.data(),
                                                                     sums.data(), counts.data());
      });

      std::vector<std::int64_t> expected(static_cast<std::size_t>(n), 0);
      expected[rising ? static_cast<std::size_t>(n - 1) : 0] = count;
      CHECK(counts == expected);
      CHECK(std::memcmp(merged.data(), values[0].data(), merged.size() * sizeof(float)) == 0);
    }
  }
}

#endif

TEST_CASE("curves keep identical models exact", "[splice][curves]") {
  // The largest weight of an element is exactly 1 before normalising, as
  // in the rule's softmax. So N identical models (N a power of two) get
  // weights of exactly 1 / N and come back bit for bit, also at values near
  // the float maximum, where a sum of unnormalised weighted values would
  // overflow.
  std::mt19937 generator(5);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> values(5000);
  for (auto& value : values) value = normal(generator);
  values[1] = 2e38f;
  values[2] = -3e38f;
  for (std::size_t n : {2u, 4u}) {
    INFO("N = " << n);
    const auto tensors = tensors_of(std::vector<std::vector<float>>(n, values), {5000});
    std::vector<cki::TensorView<float>> views;
    for (const auto& tensor : tensors) views.push_back(tensor.view());
    for (double temperature : {1.0, 0.1}) {
      cki::CkiParams params;
      params.temperature = temperature;
      std::vector<float> merged(values.size());
      const auto report = cki::splice_tensor("w", views, 0, cki::CkiSoft<float>(params), merged.data(), 1);
      CHECK(std::memcmp(merged.data(), values.data(), values.size() * sizeof(float)) == 0);
      for (const auto& model : report.models) CHECK(*model.mean_weight == 1.0 / static_cast<double>(n));
    }
  }
}

TEST_CASE("splice output follows the curve weights", "[splice][curves]") {
  // splice_tensor() with CkiSoft<float> must compute sum_k w_k theta_k with
  // the weights of the fitted curves, not with the stage-wise functors.
  const auto values = test_models(3, 300, 17);
  const auto tensors = tensors_of(values, {300});
  std::vector<cki::TensorView<float>> views;
  for (const auto& tensor : tensors) views.push_back(tensor.view());
  std::vector<float> merged(300);
  const auto report = cki::splice_tensor("w", views, 0, cki::CkiSoft<float>(), merged.data(), 1);
  std::vector<double> global;
  for (const auto& model : report.models) global.push_back(static_cast<float>(*model.global_weight));
  const auto curves = cki::detail::SoftmaxCurves::fit(global, 1.0, 1.0);
  REQUIRE(curves.has_value());
  // Chunks of up to 512 elements, as splice() runs them.
  const Eigen::ArrayXXd weights = curve_weights(*curves, values);
  for (std::size_t i = 0; i < merged.size(); ++i) {
    double expected = 0.0;
    for (std::size_t k = 0; k < 3; ++k) expected += weights(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(k)) * values[k][i];
    CHECK(merged[i] == Approx(expected).margin(1e-6));
  }
}
