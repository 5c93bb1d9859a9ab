// Tests of the assessment functors against hand-derived values.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>

#include <cki/cki.hpp>

using Catch::Matchers::Contains;

namespace {

template <typename Scalar>
double entropy_of(std::vector<Scalar> values, cki::Shape shape, int bins = 10) {
  cki::TensorView<Scalar> view(values.data(), std::move(shape));
  return cki::InformationContent(cki::InformationContentParams{bins})(view, "t");
}

template <typename Scalar>
cki::BlockArray<Scalar> make_block(std::int64_t rows, Eigen::Index models) {
  cki::BlockArray<Scalar> block(rows, std::max<Eigen::Index>(models, 2));
  block.setConstant(Scalar(-7));
  return block;
}

// Local uncertainty of one block covering the whole of each model's values.
template <typename Scalar>
cki::BlockArray<Scalar> local_of(const cki::LocalUncertainty<Scalar>& local, const cki::TensorContext& context,
                                 const std::vector<std::vector<Scalar>>& models) {
  const auto count = static_cast<std::int64_t>(models.front().size());
  std::vector<const Scalar*> pointers;
  for (const auto& model : models) pointers.push_back(model.data());
  auto l = make_block<Scalar>(count, static_cast<Eigen::Index>(models.size()));
  auto scratch = make_block<Scalar>(count, static_cast<Eigen::Index>(models.size()));
  local.check_tensor(context);
  local(context, pointers.data(), count, l, scratch);
  return l;
}

cki::TensorContext context_of(const std::string& name, cki::Shape shape, std::size_t models) {
  cki::TensorContext context;
  context.name = name;
  context.shape = std::move(shape);
  for (std::size_t k = 0; k < models; ++k) context.order.push_back(k);
  return context;
}

}  // namespace

TEMPLATE_TEST_CASE("entropy of distinct values is ln B", "[information]", float, double) {
  // 0..9 over 10 bins: one element per bin, the maximum in the last bin.
  CHECK(entropy_of<TestType>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, {10}) == Approx(std::log(10.0)).epsilon(1e-12));
}

TEMPLATE_TEST_CASE("entropy counts the maximum in the last bin", "[information]", float, double) {
  // Two bins over [0, 1]: three zeros in bin 0 and the maximum in bin 1.
  const double expected = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25));
  CHECK(entropy_of<TestType>({0, 0, 0, 1}, {2, 2}, 2) == Approx(expected).epsilon(1e-12));
  CHECK(expected == Approx(0.5623351446188083));
}

TEMPLATE_TEST_CASE("entropy of constant or empty tensor is 0", "[information]", float, double) {
  CHECK(entropy_of<TestType>({3, 3, 3}, {3}) == 0.0);
  CHECK(entropy_of<TestType>({}, {0}) == 0.0);
  CHECK(entropy_of<TestType>({2.5}, {}) == 0.0);
  CHECK(entropy_of<TestType>({0, 1, 2}, {3}, 1) == 0.0);
}

TEST_CASE("entropy agrees in float and double", "[information]") {
  std::mt19937 generator(7);
  std::uniform_int_distribution<int> draw(-512, 512);
  std::vector<float> single;
  std::vector<double> twice;
  for (int i = 0; i < 20000; ++i) {
    const double value = draw(generator) / 64.0;  // exact in both scalars
    single.push_back(static_cast<float>(value));
    twice.push_back(value);
  }
  const double from_float = entropy_of<float>(single, {20000}, 37);
  const double from_double = entropy_of<double>(twice, {20000}, 37);
  CHECK(from_float == from_double);
}

TEMPLATE_TEST_CASE("entropy rejects non-finite values", "[information]", float, double) {
  std::vector<TestType> values{1, 2, std::numeric_limits<TestType>::quiet_NaN(), 4};
  cki::TensorView<TestType> view(values.data(), {2, 2});
  const cki::InformationContent information;
  CHECK_THROWS_AS(information(view, "layer.weight"), cki::NumericError);
  CHECK_THROWS_WITH(information(view, "layer.weight"),
                    Contains("'layer.weight'") && Contains("NaN") && Contains("index 2 ([1, 0])"));
  values[2] = -std::numeric_limits<TestType>::infinity();
  CHECK_THROWS_WITH(information(view, "layer.weight"), Contains("-Inf"));
}

// Entropy from a histogram built element by element with the bin formula,
// to check the library's counting against.
template <typename Scalar>
double reference_entropy(const std::vector<Scalar>& values, int bins) {
  const Scalar lowest = *std::min_element(values.begin(), values.end());
  const Scalar highest = *std::max_element(values.begin(), values.end());
  if (!(highest > lowest)) return 0.0;
  const double low = static_cast<double>(lowest);
  const double range = static_cast<double>(highest) - low;
  std::vector<std::int64_t> counts(static_cast<std::size_t>(bins), 0);
  for (Scalar value : values) {
    const double position = (static_cast<double>(value) - low) / range * bins;
    ++counts[static_cast<std::size_t>(std::min<std::int64_t>(bins - 1, static_cast<std::int64_t>(position)))];
  }
  double entropy = 0.0;
  for (std::int64_t count : counts) {
    if (count == 0) continue;
    const double share = static_cast<double>(count) / static_cast<double>(values.size());
    entropy -= share * std::log(share);
  }
  return entropy;
}

TEMPLATE_TEST_CASE("entropy counts match bin formula", "[information]", float, double) {
  // Normal values over several blocks, integers that fall on bin edges, and
  // a range of a few adjacent representable values.
  std::mt19937 generator(11);
  std::normal_distribution<double> normal(0.0, 0.02);
  std::vector<TestType> spread, edges, narrow;
  for (int i = 0; i < 10007; ++i) spread.push_back(static_cast<TestType>(normal(generator)));
  for (int i = 0; i < 10007; ++i) edges.push_back(static_cast<TestType>(i % 331));
  TestType next = TestType(1);
  for (int i = 0; i < 10007; ++i) {
    if (i % 1000 == 0) next = std::nextafter(next, TestType(2));
    narrow.push_back(i % 3 == 0 ? TestType(1) : next);
  }
  const std::vector<std::pair<const char*, const std::vector<TestType>*>> data_sets{
      {"spread", &spread}, {"edges", &edges}, {"narrow", &narrow}};
  // The thresholds are counted in groups of up to 8 per pass: these bin
  // counts give every group size from 1 to 8 and several groups.
  for (int bins : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 31, 32, 33, 100}) {
    for (const auto& [label, values] : data_sets) {
      INFO("bins " << bins << ", data set " << label);
      const double expected = reference_entropy(*values, bins);
      CHECK(entropy_of<TestType>(*values, {static_cast<std::int64_t>(values->size())}, bins) == expected);
    }
  }
}

TEMPLATE_TEST_CASE("entropy names first non-finite index", "[information]", float, double) {
  std::vector<TestType> values(20000, TestType(0.5));
  values[12000] = std::numeric_limits<TestType>::infinity();
  values[9000] = std::numeric_limits<TestType>::quiet_NaN();
  cki::TensorView<TestType> view(values.data(), {20000});
  CHECK_THROWS_WITH(cki::InformationContent()(view, "w", 2), Contains("NaN") && Contains("index 9000"));
}

TEST_CASE("information params are range checked", "[information]") {
  CHECK_THROWS_WITH(cki::InformationContent(cki::InformationContentParams{0}),
                    Contains("'bins' must be in [1, 1000000], got 0"));
}

TEST_CASE("global weight of two models", "[global]") {
  const cki::GlobalWeight global;
  const auto weights = global({1.0, 0.999});
  REQUIRE(weights.size() == 2);
  // g_1 = 1/2 + (0.4 / pi) arctan(500 * 0.001)
  CHECK(weights[0] == Approx(0.5590334470601733).epsilon(1e-12));
  CHECK(weights[1] == Approx(1.0 - 0.5590334470601733).epsilon(1e-12));
  CHECK(weights[0] + weights[1] == 1.0);
}

TEST_CASE("global weight of three models", "[global]") {
  const cki::GlobalWeight global;
  const auto weights = global({1.0, 0.999, 0.998});
  REQUIRE(weights.size() == 3);
  // Gaps +0.0015, 0, -0.0015: 1/3 + (0.8 / (3 pi)) arctan(+-0.75), already summing to 1.
  CHECK(weights[0] == Approx(0.3879554039197689).epsilon(1e-9));
  CHECK(weights[1] == Approx(1.0 / 3.0).epsilon(1e-9));
  CHECK(weights[2] == Approx(0.2787112627468977).epsilon(1e-9));
}

TEST_CASE("global weight N form matches two-model form", "[global]") {
  const cki::GlobalWeightParams params{0.3, 20.0};
  const cki::GlobalWeight global(params);
  const double h1 = 0.71, h2 = 0.64;
  const double pi = std::acos(-1.0);
  // N-model form at N = 2 before normalising.
  const double raw1 = 0.5 + 2 * params.a / (pi * 2) * std::atan(params.c * (h1 - h2));
  const double raw2 = 0.5 + 2 * params.a / (pi * 2) * std::atan(params.c * (h2 - h1));
  const auto weights = global({h1, h2});
  CHECK(weights[0] == Approx(raw1 / (raw1 + raw2)).epsilon(1e-14));
  CHECK(weights[1] == Approx(raw2 / (raw1 + raw2)).epsilon(1e-14));
}

TEST_CASE("global weight edge cases", "[global]") {
  const cki::GlobalWeight global;
  CHECK(global({0.7}) == std::vector<double>{1.0});
  const auto equal = global({0.5, 0.5, 0.5, 0.5});
  for (double weight : equal) CHECK(weight == Approx(0.25));
  CHECK_THROWS_AS(global({}), std::invalid_argument);
  CHECK_THROWS_WITH(cki::GlobalWeight(cki::GlobalWeightParams{1.0, 500}), Contains("'a' must be in (0, 1), got 1"));
  CHECK_THROWS_WITH(cki::GlobalWeight(cki::GlobalWeightParams{0.4, 0}), Contains("'c' must be in"));
}

TEMPLATE_TEST_CASE("local uncertainty of two models", "[local]", float, double) {
  const cki::LocalUncertainty<TestType> local;
  const auto l = local_of<TestType>(local, context_of("t", {2}, 2), {{1, 2}, {3, 2}});
  // d = |theta_1 - theta_2| = (2, 0) for both models.
  CHECK(l(0, 0) == Approx(0.8807970779778823));
  CHECK(l(1, 0) == Approx(0.5));
  CHECK(l(0, 1) == l(0, 0));
  CHECK(l(1, 1) == l(1, 0));

  const cki::LocalUncertainty<TestType> scaled(cki::LocalUncertaintyParams{2.0});
  const auto l2 = local_of<TestType>(scaled, context_of("t", {2}, 2), {{1, 2}, {3, 2}});
  CHECK(l2(0, 0) == Approx(0.9820137900379085));
}

TEMPLATE_TEST_CASE("local uncertainty leaves one out", "[local]", float, double) {
  const cki::LocalUncertainty<TestType> local;
  const auto l = local_of<TestType>(local, context_of("t", {1}, 3), {{0}, {0}, {6}});
  // Means of the others: 3, 3, 0, so d = (3, 3, 6).
  CHECK(l(0, 0) == Approx(0.9525741268224334));
  CHECK(l(0, 1) == Approx(0.9525741268224334));
  CHECK(l(0, 2) == Approx(0.9975273768433653));
}

TEMPLATE_TEST_CASE("local uncertainty applies a shared map", "[local]", float, double) {
  cki::LocalUncertainty<TestType> local;
  cki::AssessmentMap<TestType> map;
  map.weight.resize(2, 2);
  map.weight << 1, 2, 3, 4;
  map.bias.resize(2);
  map.bias << 0.5, -1;
  local.set_map("t", map);
  // d = (1, 0); z = d M^T + b = (1 + 0.5, 3 - 1).
  const auto l = local_of<TestType>(local, context_of("t", {1, 2}, 2), {{1, 0}, {0, 0}});
  CHECK(l(0, 0) == Approx(0.8175744761936437));
  CHECK(l(1, 0) == Approx(0.8807970779778823));
  CHECK(l(0, 1) == l(0, 0));
}

TEMPLATE_TEST_CASE("local uncertainty applies per-model maps", "[local]", float, double) {
  cki::LocalUncertainty<TestType> local;
  cki::AssessmentMap<TestType> identity, diagonal;
  identity.weight = Eigen::Matrix<TestType, Eigen::Dynamic, Eigen::Dynamic>::Identity(2, 2);
  diagonal.diagonal = true;
  diagonal.weight.resize(2, 1);
  diagonal.weight << 2, 3;
  local.set_maps("t", {identity, diagonal});
  // Two rows of d = (1, 0) and (0, 2); model 2 scales columns by (2, 3).
  const auto l = local_of<TestType>(local, context_of("t", {2, 2}, 2), {{1, 0, 0, 2}, {0, 0, 0, 0}});
  CHECK(l(0, 0) == Approx(0.7310585786300049));
  CHECK(l(3, 0) == Approx(0.8807970779778823));
  CHECK(l(0, 1) == Approx(0.8807970779778823));
  CHECK(l(3, 1) == Approx(0.9975273768433653));

  // Per-model maps follow the input order when the base is not the first input.
  auto context = context_of("t", {2, 2}, 2);
  context.order = {1, 0};
  const auto swapped = local_of<TestType>(local, context, {{1, 0, 0, 2}, {0, 0, 0, 0}});
  CHECK(swapped(0, 0) == Approx(0.8807970779778823));
  CHECK(swapped(0, 1) == Approx(0.7310585786300049));
}

TEST_CASE("local uncertainty checks map shapes", "[local]") {
  cki::LocalUncertainty<double> local;
  cki::AssessmentMap<double> map;
  map.weight = Eigen::MatrixXd::Identity(3, 3);
  local.set_map("fc.weight", map);
  CHECK_THROWS_WITH(local.check_tensor(context_of("fc.weight", {4, 2}, 2)),
                    Contains("'fc.weight'") && Contains("[3, 3]") && Contains("expected [2, 2]"));
  CHECK_THROWS_WITH(local.check_tensor(context_of("fc.weight", {}, 2)), Contains("rank-0"));
  CHECK_NOTHROW(local.check_tensor(context_of("fc.weight", {5, 3}, 2)));

  map.bias = Eigen::VectorXd::Zero(2);
  local.set_map("fc.weight", map);
  CHECK_THROWS_WITH(local.check_tensor(context_of("fc.weight", {5, 3}, 2)), Contains("bias"));

  map.bias.resize(0);
  local.set_maps("fc.weight", {map, map});
  CHECK_THROWS_WITH(local.check_tensor(context_of("fc.weight", {5, 3}, 3)), Contains("2 assessment maps for 3 models"));
  CHECK_THROWS_WITH(cki::LocalUncertainty<double>(cki::LocalUncertaintyParams{-1}), Contains("'scale'"));
}

namespace {

// Weights of one element from the rule functor, for given g and l per model.
template <typename Scalar>
std::vector<Scalar> rule_weights(const cki::CombinationRule& rule, std::vector<Scalar> global,
                                 std::vector<Scalar> local) {
  const auto n = static_cast<Eigen::Index>(global.size());
  auto l = make_block<Scalar>(1, n);
  auto w = make_block<Scalar>(1, n);
  auto scratch = make_block<Scalar>(1, n);
  for (Eigen::Index k = 0; k < n; ++k) l(0, k) = local[static_cast<std::size_t>(k)];
  rule(global, 1, l, w, scratch);
  std::vector<Scalar> out;
  for (Eigen::Index k = 0; k < n; ++k) out.push_back(w(0, k));
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("rules at reference defaults", "[rule]", float, double) {
  // Unequal entropies 1.0 and 0.999 at a = 0.4, c = 500 give g_1 below; d = 2.
  const TestType g1 = static_cast<TestType>(0.5590334470601733);
  const TestType l = static_cast<TestType>(0.8807970779778823);
  const std::vector<TestType> g{g1, TestType(1) - g1};

  const auto blend = rule_weights<TestType>(cki::CombinationRule({cki::RuleKind::blend, 1.0}), g, {l, l});
  CHECK(blend[0] == Approx(0.9333615796023306));
  CHECK(blend[1] == Approx(0.06663842039766943));

  const auto paired = rule_weights<TestType>(cki::CombinationRule({cki::RuleKind::paired_softmax, 1.0}), g, {l, l});
  CHECK(paired[0] == Approx(0.5485449818765331));
  CHECK(paired[1] == Approx(0.4514550181234669));

  const auto softmax = rule_weights<TestType>(cki::CombinationRule({cki::RuleKind::softmax, 1.0}), g, {l, l});
  CHECK(softmax[0] == Approx(0.5033645639259501));
  CHECK(softmax[1] == Approx(0.4966354360740499));

  const auto sharp = rule_weights<TestType>(cki::CombinationRule({cki::RuleKind::softmax, 0.5}), g, {l, l});
  CHECK(sharp[0] == Approx(0.5067288231629709));
}

TEMPLATE_TEST_CASE("rule weights sum to one", "[rule]", float, double) {
  std::mt19937 generator(11);
  std::uniform_real_distribution<double> unit(0.01, 0.99);
  for (auto kind : {cki::RuleKind::softmax, cki::RuleKind::blend, cki::RuleKind::paired_softmax}) {
    const std::size_t n = kind == cki::RuleKind::softmax ? 5 : 2;
    for (int trial = 0; trial < 50; ++trial) {
      std::vector<TestType> g(n), l(n);
      TestType total = 0;
      for (std::size_t k = 0; k < n; ++k) {
        g[k] = static_cast<TestType>(unit(generator));
        total += g[k];
        l[k] = static_cast<TestType>(unit(generator));
      }
      for (auto& value : g) value /= total;
      const auto w = rule_weights<TestType>(cki::CombinationRule({kind, 0.7}), g, l);
      TestType sum = 0;
      for (TestType value : w) {
        CHECK(value >= 0);
        sum += value;
      }
      INFO("rule " << cki::rule_name(kind) << ", trial " << trial);
      CHECK(sum == Approx(1.0).epsilon(std::is_same_v<TestType, float> ? 1e-6 : 1e-14));
    }
  }
}

TEST_CASE("single model gets weight one", "[rule]") {
  for (auto kind : {cki::RuleKind::softmax, cki::RuleKind::blend, cki::RuleKind::paired_softmax}) {
    const auto w = rule_weights<double>(cki::CombinationRule({kind, 1.0}), {1.0}, {0.9});
    CHECK(w[0] == 1.0);
  }
}

TEST_CASE("pairwise rules reject more than two models", "[rule]") {
  const cki::CombinationRule blend({cki::RuleKind::blend, 1.0});
  CHECK_NOTHROW(blend.check(1));
  CHECK_NOTHROW(blend.check(2));
  CHECK_THROWS_WITH(blend.check(3), Contains("'blend' combines exactly 2 models, got 3"));
  CHECK_THROWS_WITH(cki::CombinationRule({cki::RuleKind::paired_softmax, 1.0}).check(4),
                    Contains("'paired-softmax'"));
  CHECK_NOTHROW(cki::CombinationRule({cki::RuleKind::softmax, 1.0}).check(8));
  CHECK_THROWS_AS(cki::CombinationRule({cki::RuleKind::softmax, 1.0}).check(0), std::invalid_argument);
  CHECK_THROWS_WITH(cki::CombinationRule({cki::RuleKind::softmax, 0.0}), Contains("'temperature' must be in (0, 1e6]"));
}

TEST_CASE("rule names round trip", "[rule]") {
  for (auto kind : {cki::RuleKind::softmax, cki::RuleKind::blend, cki::RuleKind::paired_softmax}) {
    CHECK(cki::parse_rule(cki::rule_name(kind)) == kind);
  }
  CHECK_FALSE(cki::parse_rule("mean").has_value());
}

TEST_CASE("cki params check every field", "[params]") {
  CHECK_NOTHROW(cki::CkiParams{}.check());
  cki::CkiParams params;
  params.bins = 0;
  CHECK_THROWS_WITH(params.check(), Contains("'bins'"));
  params = {};
  params.a = 0;
  CHECK_THROWS_WITH(params.check(), Contains("'a'"));
  params = {};
  params.c = -2;
  CHECK_THROWS_WITH(params.check(), Contains("'c'"));
  params = {};
  params.scale = 0;
  CHECK_THROWS_WITH(params.check(), Contains("'scale'"));
  params = {};
  params.temperature = -1;
  CHECK_THROWS_WITH(params.check(), Contains("'temperature' must be in (0, 1e6], got -1"));
  params = {};
  params.a = -2.5e-9;  // small values keep their digits in the message
  CHECK_THROWS_WITH(params.check(), Contains("'a' must be in (0, 1), got -2.5e-09"));
}

// A user functor: global weights that ignore the entropies.
struct UniformGlobal {
  std::vector<double> operator()(const std::vector<double>& entropies) const {
    return std::vector<double>(entropies.size(), 1.0 / static_cast<double>(entropies.size()));
  }
};

TEST_CASE("detection traits recognise functors", "[traits]") {
  STATIC_REQUIRE(cki::detail::is_global_weight<UniformGlobal>::value);
  STATIC_REQUIRE(cki::detail::is_global_weight<cki::GlobalWeight>::value);
  STATIC_REQUIRE_FALSE(cki::detail::is_global_weight<int>::value);
  STATIC_REQUIRE(cki::detail::is_information_content<cki::InformationContent, float>::value);
  STATIC_REQUIRE_FALSE(cki::detail::is_information_content<UniformGlobal, float>::value);
  STATIC_REQUIRE(cki::detail::is_local_uncertainty<cki::LocalUncertainty<double>, double>::value);
  STATIC_REQUIRE_FALSE(cki::detail::is_local_uncertainty<cki::LocalUncertainty<float>, double>::value);
  STATIC_REQUIRE(cki::detail::is_combination_rule<cki::CombinationRule, float>::value);
}
