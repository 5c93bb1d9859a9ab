// Tests of splice(), splice_tensor() and the splicing policies: hand-derived
// merges, the method's invariants, thread independence, report and errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>

#include <cki/cki.hpp>

using Catch::Matchers::Contains;

namespace {

template <typename Scalar>
cki::WeightSet<Scalar> one_tensor_set(const std::string& source, const std::string& name, cki::Shape shape,
                                      std::vector<double> values) {
  typename cki::Tensor<Scalar>::Array array(static_cast<Eigen::Index>(values.size()));
  for (std::size_t i = 0; i < values.size(); ++i) array[static_cast<Eigen::Index>(i)] = static_cast<Scalar>(values[i]);
  cki::WeightSet<Scalar> set(source);
  set.add(name, cki::Tensor<Scalar>(std::move(shape), std::move(array)));
  return set;
}

template <typename Scalar>
std::vector<cki::WeightSet<Scalar>> random_sets(std::size_t n, std::uint32_t seed, cki::Shape shape) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, 0.1);
  std::vector<cki::WeightSet<Scalar>> sets;
  for (std::size_t k = 0; k < n; ++k) {
    cki::Tensor<Scalar> tensor(shape);
    for (std::int64_t i = 0; i < tensor.size(); ++i) tensor[i] = static_cast<Scalar>(normal(generator));
    cki::Tensor<Scalar> bias({7});
    for (std::int64_t i = 0; i < bias.size(); ++i) bias[i] = static_cast<Scalar>(normal(generator));
    cki::WeightSet<Scalar> set("model" + std::to_string(k) + ".safetensors");
    set.add("layer.weight", std::move(tensor));
    set.add("layer.bias", std::move(bias));
    set.add_raw("layer.steps", cki::DType::I64, {1}, std::vector<std::uint8_t>(8, static_cast<std::uint8_t>(k)));
    set.add("layer.empty", cki::Tensor<Scalar>({0, 4}));
    set.metadata()["format"] = "pt";
    set.metadata()["seed"] = std::to_string(k);
    sets.push_back(std::move(set));
  }
  return sets;
}

template <typename Scalar>
cki::CkiParams params_with(cki::RuleKind rule) {
  cki::CkiParams params;
  params.rule = rule;
  return params;
}

template <typename Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
}

}  // namespace

TEMPLATE_TEST_CASE("splice matches hand-derived merge", "[splice]", float, double) {
  // Model 1: entropy ln 4 (one element in each of 4 bins); model 2: entropy of
  // shares (0.75, 0.25). g_1 = 1/2 + (0.4 / pi) arctan(500 (ln 4 - 0.5623...)).
  std::vector<cki::WeightSet<TestType>> sets{one_tensor_set<TestType>("a", "w", {2, 2}, {0, 1, 2, 3}),
                                             one_tensor_set<TestType>("b", "w", {2, 2}, {0, 0, 0, 3})};
  struct Case {
    cki::RuleKind rule;
    std::vector<double> soft;
    double mean_weight;
  };
  const std::vector<Case> cases{
      {cki::RuleKind::softmax, {0.0, 0.5241605936018415, 1.022711209163385, 3.0}, 0.5294176886504602},
      {cki::RuleKind::blend, {0.0, 0.8118241223054373, 1.8331895893090489, 3.0}, 0.7571819925934844},
      {cki::RuleKind::paired_softmax, {0.0, 0.563865414401777, 1.1544222851560912, 3.0}, 0.5558077783495324},
  };
  for (const auto& test : cases) {
    INFO("rule " << cki::rule_name(test.rule));
    const auto soft = cki::splice(sets, cki::CkiSoft<TestType>(params_with<TestType>(test.rule)));
    const auto& merged = soft.merged.view("w");
    for (int i = 0; i < 4; ++i) {
      INFO("element " << i);
      CHECK(merged[i] == Approx(test.soft[i]).epsilon(tolerance<TestType>()).margin(1e-6));
    }
    const auto& report = soft.report.tensors.at(0);
    REQUIRE(report.spliced);
    CHECK(*report.models[0].entropy == Approx(std::log(4.0)));
    CHECK(*report.models[1].entropy == Approx(0.5623351446188083));
    CHECK(*report.models[0].global_weight == Approx(0.699690946586024));
    CHECK(*report.models[0].mean_weight == Approx(test.mean_weight).epsilon(1e-5));
    CHECK(*report.models[1].mean_weight == Approx(1.0 - test.mean_weight).epsilon(1e-5));
    CHECK_FALSE(report.models[0].hard_share.has_value());

    // The base wins every element's hard splice here, so hard returns model 1.
    const auto hard = cki::splice(sets, cki::CkiHard<TestType>(params_with<TestType>(test.rule)));
    for (int i = 0; i < 4; ++i) CHECK(hard.merged.view("w")[i] == sets[0].view("w")[i]);
    CHECK(*hard.report.tensors[0].models[0].hard_share == 1.0);
    CHECK(*hard.report.tensors[0].models[1].hard_share == 0.0);
  }
}

TEMPLATE_TEST_CASE("single model returns input", "[splice][invariant]", float, double) {
  auto sets = random_sets<TestType>(1, 3, {5, 6});
  for (auto rule : {cki::RuleKind::softmax, cki::RuleKind::blend, cki::RuleKind::paired_softmax}) {
    for (bool hard : {false, true}) {
      const auto result = hard ? cki::splice(sets, cki::CkiHard<TestType>(params_with<TestType>(rule)))
                               : cki::splice(sets, cki::CkiSoft<TestType>(params_with<TestType>(rule)));
      const auto& in = sets[0].view("layer.weight");
      const auto& out = result.merged.view("layer.weight");
      CHECK(std::memcmp(in.data(), out.data(), sizeof(TestType) * in.size()) == 0);
      CHECK(result.report.tensors[0].copy_reason == "single model");
    }
  }
}

TEMPLATE_TEST_CASE("identical models return input", "[splice][invariant]", float, double) {
  auto one = random_sets<TestType>(1, 5, {9, 13});
  std::vector<cki::WeightSet<TestType>> sets{one[0], one[0], one[0]};
  const auto& input = one[0].view("layer.weight");

  const auto hard = cki::splice(sets, cki::CkiHard<TestType>());
  CHECK(std::memcmp(hard.merged.view("layer.weight").data(), input.data(), sizeof(TestType) * input.size()) == 0);

  const auto soft = cki::splice(sets, cki::CkiSoft<TestType>());
  const auto& merged = soft.merged.view("layer.weight");
  for (std::int64_t i = 0; i < input.size(); ++i) {
    CHECK(merged[i] == Approx(input[i]).epsilon(tolerance<TestType>()));
  }
  for (const auto& model : soft.report.tensors[0].models) CHECK(*model.mean_weight == Approx(1.0 / 3.0));
}

TEMPLATE_TEST_CASE("mean weights sum to one", "[splice][invariant]", float, double) {
  const auto sets = random_sets<TestType>(4, 17, {33, 21});
  const auto result = cki::splice(sets, cki::CkiSoft<TestType>());
  double total = 0;
  for (const auto& model : result.report.tensors[0].models) total += *model.mean_weight;
  CHECK(total == Approx(1.0).epsilon(1e-6));
}

TEMPLATE_TEST_CASE("hard emits only input values", "[splice][invariant]", float, double) {
  for (std::size_t n : {2, 3, 5}) {
    const auto sets = random_sets<TestType>(n, static_cast<std::uint32_t>(40 + n), {64, 50});
    for (auto rule : {cki::RuleKind::softmax, cki::RuleKind::blend, cki::RuleKind::paired_softmax}) {
      if (n > 2 && rule != cki::RuleKind::softmax) continue;
      const auto result = cki::splice(sets, cki::CkiHard<TestType>(params_with<TestType>(rule)));
      const auto& merged = result.merged.view("layer.weight");
      std::int64_t foreign = 0;
      for (std::int64_t i = 0; i < merged.size(); ++i) {
        bool found = false;
        for (const auto& set : sets) found = found || set.view("layer.weight")[i] == merged[i];
        foreign += found ? 0 : 1;
      }
      INFO("N = " << n << ", rule " << cki::rule_name(rule));
      CHECK(foreign == 0);
      double shares = 0;
      for (const auto& model : result.report.tensors[0].models) shares += *model.hard_share;
      CHECK(shares == Approx(1.0));
    }
  }
}

TEMPLATE_TEST_CASE("softmax soft output ignores model order", "[splice][invariant]", float, double) {
  const auto sets = random_sets<TestType>(4, 23, {30, 40});
  const auto forward = cki::splice(sets, cki::CkiSoft<TestType>());
  std::vector<cki::WeightSet<TestType>> reversed(sets.rbegin(), sets.rend());
  cki::SpliceOptions options;
  options.base = 3;  // the same base model, now last
  const auto backward = cki::splice(reversed, cki::CkiSoft<TestType>(), options);
  const auto& a = forward.merged.view("layer.weight");
  const auto& b = backward.merged.view("layer.weight");
  for (std::int64_t i = 0; i < a.size(); ++i) {
    CHECK(a[i] == Approx(b[i]).epsilon(tolerance<TestType>()).margin(1e-7));
  }
  const std::vector<cki::WeightSet<TestType>> rotated{sets[2], sets[0], sets[3], sets[1]};
  const auto other_base = cki::splice(rotated, cki::CkiSoft<TestType>());
  for (std::int64_t i = 0; i < a.size(); ++i) {
    CHECK(a[i] == Approx(other_base.merged.view("layer.weight")[i]).epsilon(tolerance<TestType>()).margin(1e-7));
  }
}

TEMPLATE_TEST_CASE("outlier never wins hard splice", "[splice][invariant]", float, double) {
  // Each model has one element in the lowest and one in the highest bin, so
  // all entropies are ln 2 and the global weights are equal.
  std::vector<cki::WeightSet<TestType>> sets{one_tensor_set<TestType>("a", "w", {2}, {0, 5}),
                                             one_tensor_set<TestType>("b", "w", {2}, {0, 5}),
                                             one_tensor_set<TestType>("c", "w", {2}, {10, 5})};
  for (std::size_t base : {0, 1, 2}) {
    cki::SpliceOptions options;
    options.base = base;
    const auto result = cki::splice(sets, cki::CkiHard<TestType>(), options);
    INFO("base " << base);
    CHECK(result.merged.view("w")[0] == 0);
    CHECK(result.merged.view("w")[1] == 5);
  }
}

TEMPLATE_TEST_CASE("ties go to the base", "[splice][invariant]", float, double) {
  // Permutations of one another: equal entropies, and at N = 2 both models
  // share l, so every element's weights tie exactly.
  std::vector<cki::WeightSet<TestType>> sets{one_tensor_set<TestType>("a", "w", {4}, {0, 1, 2, 3}),
                                             one_tensor_set<TestType>("b", "w", {4}, {3, 2, 1, 0})};
  for (std::size_t base : {0, 1}) {
    cki::SpliceOptions options;
    options.base = base;
    const auto result = cki::splice(sets, cki::CkiHard<TestType>(), options);
    INFO("base " << base);
    for (int i = 0; i < 4; ++i) CHECK(result.merged.view("w")[i] == sets[base].view("w")[i]);
    CHECK(*result.report.tensors[0].models[base].hard_share == 1.0);
    CHECK(result.report.base == base);
  }
}

TEMPLATE_TEST_CASE("results do not depend on threads", "[splice][threads]", float, double) {
  // Large enough for many blocks; rows of 300 do not divide the block size.
  const auto sets = random_sets<TestType>(3, 99, {700, 300});
  for (bool hard : {false, true}) {
    cki::SpliceOptions one, two;
    one.threads = 1;
    two.threads = 2;
    const auto a = hard ? cki::splice(sets, cki::CkiHard<TestType>(), one) : cki::splice(sets, cki::CkiSoft<TestType>(), one);
    const auto b = hard ? cki::splice(sets, cki::CkiHard<TestType>(), two) : cki::splice(sets, cki::CkiSoft<TestType>(), two);
    const auto& x = a.merged.view("layer.weight");
    const auto& y = b.merged.view("layer.weight");
    INFO((hard ? "hard" : "soft"));
    CHECK(std::memcmp(x.data(), y.data(), sizeof(TestType) * x.size()) == 0);
    CHECK(a.report.to_json() == b.report.to_json());
  }
}

TEMPLATE_TEST_CASE("block boundaries respect maps", "[splice][threads]", float, double) {
  // A map along a last dimension of 5000 (over one block) must see whole rows.
  auto sets = random_sets<TestType>(2, 5, {3, 5000});
  cki::CkiSoft<TestType> policy;
  cki::AssessmentMap<TestType> map;
  map.diagonal = true;
  map.weight = Eigen::Matrix<TestType, Eigen::Dynamic, Eigen::Dynamic>::Constant(5000, 1, TestType(3));
  policy.assessment().local_uncertainty().set_map("layer.weight", map);
  cki::SpliceOptions one, two;
  one.threads = 1;
  two.threads = 2;
  const auto a = cki::splice(sets, policy, one);
  const auto b = cki::splice(sets, policy, two);
  const auto& x = a.merged.view("layer.weight");
  CHECK(std::memcmp(x.data(), b.merged.view("layer.weight").data(), sizeof(TestType) * x.size()) == 0);

  // Diagonal 3 equals scale 3 without a map.
  cki::CkiParams scaled;
  scaled.scale = 3;
  const auto c = cki::splice(sets, cki::CkiSoft<TestType>(scaled), one);
  for (std::int64_t i = 0; i < x.size(); i += 997) {
    CHECK(x[i] == Approx(c.merged.view("layer.weight")[i]).epsilon(tolerance<TestType>()));
  }
}

TEMPLATE_TEST_CASE("unselected tensors are copied from base", "[splice][selection]", float, double) {
  const auto sets = random_sets<TestType>(3, 8, {4, 5});
  cki::SpliceOptions options;
  options.base = 1;
  options.include = {"layer.*"};
  options.exclude = {"*.bias"};
  const auto result = cki::splice(sets, cki::CkiSoft<TestType>(), options);

  REQUIRE(result.merged.size() == 4);
  CHECK(result.merged[0].name == "layer.weight");
  CHECK(result.merged.view("layer.bias").data() == sets[1].view("layer.bias").data());
  CHECK(*result.merged.at("layer.steps").raw == *sets[1].at("layer.steps").raw);
  CHECK(result.merged.at("layer.empty").shape == cki::Shape{0, 4});
  CHECK(result.merged.metadata().at("seed") == "1");

  const auto& tensors = result.report.tensors;
  CHECK(tensors[0].spliced);
  CHECK(tensors[1].copy_reason == "excluded by pattern '*.bias'");
  CHECK(tensors[2].copy_reason == "dtype I64 is not spliced");
  CHECK(tensors[3].copy_reason == "empty tensor");

  options.include = {"head.*"};
  const auto none = cki::splice(sets, cki::CkiSoft<TestType>(), options);
  CHECK(none.report.tensors[0].copy_reason == "matches no include pattern");
  CHECK(none.report.spliced_count() == 0);
}

TEST_CASE("glob patterns follow fnmatch", "[splice][selection]") {
  CHECK(cki::glob_match("*.weight", "encoder.layer.0.weight"));
  CHECK(cki::glob_match("layer.?.bias", "layer.3.bias"));
  CHECK(cki::glob_match("layer.[0-2].*", "layer.1.weight"));
  CHECK_FALSE(cki::glob_match("layer.[0-2].*", "layer.7.weight"));
  CHECK_FALSE(cki::glob_match("*.weight", "fc.bias"));
}

TEST_CASE("output keeps base dtype", "[splice]") {
  auto sets = random_sets<float>(2, 4, {3, 3});
  cki::WeightSet<float> half("half");
  for (const auto& entry : sets[1]) {
    if (entry.spliceable() && entry.numel() > 0) {
      half.add(entry.name, cki::Tensor<float>::copy_of(entry.values), cki::DType::F16);
    } else {
      half.insert(entry);
    }
  }
  std::vector<cki::WeightSet<float>> mixed{half, sets[0]};
  const auto result = cki::splice(mixed, cki::CkiSoft<float>());
  CHECK(result.merged.at("layer.weight").dtype == cki::DType::F16);
  CHECK(result.report.tensors[0].dtype == cki::DType::F16);
}

TEST_CASE("report serialises to JSON", "[splice][report]") {
  const auto sets = random_sets<double>(2, 12, {6, 2});
  cki::CkiParams params;
  params.rule = cki::RuleKind::blend;
  params.bins = 12;
  const auto result = cki::splice(sets, cki::CkiHard<double>(params));
  const auto json = result.report.to_json();
  CHECK(json["method"] == "cki-hard");
  CHECK(json["parameters"]["rule"] == "blend");
  CHECK(json["parameters"]["bins"] == 12);
  CHECK(json["parameters"]["a"] == 0.4);
  CHECK(json["models"].size() == 2);
  CHECK(json["models"][0]["base"] == true);
  CHECK(json["models"][1]["source"] == "model1.safetensors");
  const auto& weight = json["tensors"][0];
  CHECK(weight["name"] == "layer.weight");
  CHECK(weight["action"] == "spliced");
  CHECK(weight["shape"] == nlohmann::json::array({6, 2}));
  CHECK(weight["dtype"] == "F64");
  CHECK(weight["models"][0]["hard_share"].is_number());
  CHECK(weight["models"][1]["entropy"].get<double>() == Approx(*result.report.tensors[0].models[1].entropy));
  CHECK(json["tensors"][2]["action"] == "copied");
  CHECK(json["tensors"][2]["reason"] == "dtype I64 is not spliced");
}

TEST_CASE("any policy wraps a policy", "[splice][policy]") {
  const auto sets = random_sets<float>(3, 21, {8, 8});
  const cki::AnyPolicy<float> any = cki::CkiHard<float>();
  CHECK(any.name() == "cki-hard");
  const auto direct = cki::splice(sets, cki::CkiHard<float>());
  const auto erased = cki::splice(sets, any);
  const auto& a = direct.merged.view("layer.weight");
  CHECK(std::memcmp(a.data(), erased.merged.view("layer.weight").data(), sizeof(float) * a.size()) == 0);
  const cki::AnyPolicy<float> empty;
  CHECK_FALSE(static_cast<bool>(empty));
  CHECK_THROWS_AS(empty.name(), std::logic_error);
}

// A user functor replacing the global weight: every model weighs the same.
struct UniformGlobal {
  std::vector<double> operator()(const std::vector<double>& entropies) const {
    return std::vector<double>(entropies.size(), 1.0 / static_cast<double>(entropies.size()));
  }
};

TEST_CASE("custom global weight functor", "[splice][policy]") {
  using Assessment = cki::CompatibilityAssessment<double, cki::InformationContent, UniformGlobal>;
  const cki::SplicingPolicy<double, Assessment, cki::SoftSplice> policy(
      Assessment({}, UniformGlobal{}, cki::LocalUncertainty<double>(), cki::CombinationRule()));
  // Different entropies, but uniform global weights and shared l at N = 2
  // make the softmax weights equal: the plain average.
  std::vector<cki::WeightSet<double>> sets{one_tensor_set<double>("a", "w", {4}, {0, 1, 2, 3}),
                                           one_tensor_set<double>("b", "w", {4}, {0, 0, 0, 3})};
  const auto result = cki::splice(sets, policy);
  const std::vector<double> average{0, 0.5, 1, 3};
  for (int i = 0; i < 4; ++i) CHECK(result.merged.view("w")[i] == Approx(average[i]));
  CHECK(*result.report.tensors[0].models[0].global_weight == 0.5);
}

TEST_CASE("splice rejects bad input", "[splice][errors]") {
  const auto sets = random_sets<float>(3, 1, {4, 4});

  std::vector<cki::WeightSet<float>> none;
  CHECK_THROWS_WITH(cki::splice(none, cki::CkiSoft<float>()), Contains("no weight sets"));

  cki::CkiParams paired;
  paired.rule = cki::RuleKind::paired_softmax;
  CHECK_THROWS_WITH(cki::splice(sets, cki::CkiSoft<float>(paired)), Contains("combines exactly 2 models, got 3"));

  cki::SpliceOptions options;
  options.base = 3;
  CHECK_THROWS_WITH(cki::splice(sets, cki::CkiSoft<float>(), options), Contains("'base' must be in [0, 3), got 3"));

  cki::CkiParams bad;
  bad.bins = -3;
  CHECK_THROWS_WITH(cki::CkiSoft<float>(bad), Contains("'bins'"));

  auto renamed = sets;
  renamed[2] = one_tensor_set<float>("other.safetensors", "layer.weight", {4, 4}, std::vector<double>(16, 0.0));
  CHECK_THROWS_AS(cki::splice(renamed, cki::CkiSoft<float>()), cki::MismatchError);
  CHECK_THROWS_WITH(cki::splice(renamed, cki::CkiSoft<float>()), Contains("'layer.bias'") && Contains("other.safetensors"));

  auto reshaped = random_sets<float>(3, 1, {2, 8});
  std::vector<cki::WeightSet<float>> shapes{sets[0], reshaped[1]};
  CHECK_THROWS_WITH(cki::splice(shapes, cki::CkiSoft<float>()), Contains("[4, 4]") && Contains("[2, 8]"));
}

TEMPLATE_TEST_CASE("splice rejects non-finite input", "[splice][errors]", float, double) {
  std::vector<cki::WeightSet<TestType>> sets{
      one_tensor_set<TestType>("a.safetensors", "w", {2, 2}, {0, 1, 2, 3}),
      one_tensor_set<TestType>("b.safetensors", "w", {2, 2}, {0, std::numeric_limits<double>::infinity(), 0, 3})};
  CHECK_THROWS_AS(cki::splice(sets, cki::CkiSoft<TestType>()), cki::NumericError);
  CHECK_THROWS_WITH(cki::splice(sets, cki::CkiSoft<TestType>()),
                    Contains("'w'") && Contains("+Inf") && Contains("index 1 ([0, 1])") &&
                        Contains("model 2 ('b.safetensors')"));
}

namespace {

// A policy without its own finite check: the plain mean.
template <typename Scalar>
struct MeanPolicy {
  std::string name() const { return "mean"; }
  nlohmann::json parameters() const { return nlohmann::json::object(); }
  void check(std::size_t) const {}
  std::vector<cki::ModelTensorStats> merge(const cki::TensorContext& context,
                                           const std::vector<cki::TensorView<Scalar>>& models, Scalar* out) const {
    for (std::int64_t i = 0; i < models[0].size(); ++i) {
      Scalar total = 0;
      for (const auto& model : models) total += model[i];
      out[i] = total / static_cast<Scalar>(models.size());
    }
    return std::vector<cki::ModelTensorStats>(context.model_count());
  }
};

}  // namespace

TEST_CASE("splice tensor scans for non-finite input", "[splice][errors]") {
  std::vector<double> a{1, 2, 3}, b{1, std::nan(""), 3};
  std::vector<cki::TensorView<double>> views{cki::TensorView<double>(a.data(), {3}),
                                             cki::TensorView<double>(b.data(), {3})};
  std::vector<double> out(3);
  CHECK_THROWS_WITH(cki::splice_tensor("x", views, 0, MeanPolicy<double>{}, out.data(), 0, cki::DType::F64,
                                       {"a.st", "b.st"}),
                    Contains("'x'") && Contains("NaN") && Contains("model 2 ('b.st')"));
  b[1] = 4;
  const auto report = cki::splice_tensor("x", views, 1, MeanPolicy<double>{}, out.data());
  CHECK(report.spliced);
  CHECK(out[1] == 3.0);

  std::vector<double> c{1, 2};
  views.push_back(cki::TensorView<double>(c.data(), {2}));
  CHECK_THROWS_AS(cki::splice_tensor("x", views, 0, MeanPolicy<double>{}, out.data()), cki::MismatchError);
}

TEST_CASE("nan policy copies from base", "[splice][errors]") {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<cki::WeightSet<double>> sets{one_tensor_set<double>("a.st", "w", {3}, {0, 1, 2}),
                                           one_tensor_set<double>("b.st", "w", {3}, {0, std::nan(""), 2}),
                                           one_tensor_set<double>("c.st", "w", {3}, {-inf, 1, 2})};
  cki::SpliceOptions options;
  options.nan_policy = cki::NanPolicy::copy_base;
  std::vector<cki::WeightSet<double>> two{sets[0], sets[1]};
  const auto copied = cki::splice(two, cki::CkiSoft<double>(), options);
  CHECK_FALSE(copied.report.tensors[0].spliced);
  CHECK_THAT(copied.report.tensors[0].copy_reason,
             Contains("NaN at index 1 ([1])") && Contains("model 2 ('b.st')") && Contains("copy-base"));
  CHECK(copied.merged.view("w")[1] == 1.0);

  // copy-base still fails when the base itself is not finite.
  options.base = 1;
  CHECK_THROWS_WITH(cki::splice(two, cki::CkiSoft<double>(), options), Contains("model 2 ('b.st')"));

  // allow copies from the base even when the base holds -inf.
  options.nan_policy = cki::NanPolicy::allow;
  options.base = 2;
  const auto allowed = cki::splice(sets, cki::CkiHard<double>(), options);
  CHECK(allowed.merged.view("w")[0] == -inf);
  CHECK_THAT(allowed.report.tensors[0].copy_reason, Contains("infinity at index 0") && Contains("allow"));

  CHECK(cki::parse_nan_policy("copy-base") == cki::NanPolicy::copy_base);
  CHECK_FALSE(cki::parse_nan_policy("ignore").has_value());
}

TEST_CASE("splice checks copied tensors", "[splice][errors]") {
  // "mask" is excluded, so it is copied from the base. As in streamed
  // merges, its -inf reaches the output only under NaN policy allow, and
  // the other model's copy is not read.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<cki::WeightSet<double>> sets(2);
  sets[0].set_source("a.st");
  sets[1].set_source("b.st");
  sets[0].add("w", cki::Tensor<double>({2}, Eigen::ArrayXd::LinSpaced(2, 0, 1)));
  sets[1].add("w", cki::Tensor<double>({2}, Eigen::ArrayXd::LinSpaced(2, 1, 2)));
  sets[0].add("mask", cki::Tensor<double>({2, 2}, (Eigen::ArrayXd(4) << 0, -inf, 0, 0).finished()));
  sets[1].add("mask", cki::Tensor<double>({2, 2}, (Eigen::ArrayXd(4) << 0, 0, std::nan(""), 0).finished()));
  cki::SpliceOptions options;
  options.exclude = {"mask"};
  CHECK_THROWS_WITH(cki::splice(sets, cki::CkiSoft<double>(), options),
                    Contains("tensor 'mask' contains -Inf at index 1 ([0, 1]) in model 1 ('a.st')") &&
                        Contains("excluded by pattern 'mask'") && Contains("NaN policy error"));
  options.nan_policy = cki::NanPolicy::copy_base;
  CHECK_THROWS_WITH(cki::splice(sets, cki::CkiSoft<double>(), options), Contains("NaN policy copy-base"));

  options.nan_policy = cki::NanPolicy::allow;
  const auto allowed = cki::splice(sets, cki::CkiSoft<double>(), options);
  CHECK(allowed.merged.view("mask")[1] == -inf);
  CHECK_THAT(allowed.report.tensors[1].copy_reason,
             Contains("-Inf at index 1 ([0, 1]) in model 1 ('a.st')") && Contains("passed through"));

  // With model 2 as the base, its NaN is the one found.
  options.nan_policy = cki::NanPolicy::error;
  options.base = 1;
  CHECK_THROWS_WITH(cki::splice(sets, cki::CkiSoft<double>(), options),
                    Contains("NaN at index 2 ([1, 0]) in model 2 ('b.st')"));

  // One model comes back unchanged, -inf included.
  options.base = 0;
  const std::vector<cki::WeightSet<double>> one{sets[0]};
  const auto single = cki::splice(one, cki::CkiSoft<double>(), options);
  CHECK(single.merged.view("mask")[1] == -inf);
  CHECK(single.report.tensors[1].copy_reason == "single model");
}
