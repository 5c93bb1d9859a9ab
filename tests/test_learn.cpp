// Tests of learned CKI: the learnable assessment against data-free CKI and
// against central finite differences, Adam, the whole-model learner, replay
// of learned maps through splice(), the learned-maps file, and calibrate().
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <cki/learn/learn.hpp>
#include <cki/splicing/splice.hpp>

#include "temp_dir.hpp"

using Catch::Matchers::Contains;

namespace {

namespace fs = std::filesystem;
using cki_test::TempDir;

template <typename Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
}

/// `n` tensors of `shape` with random values: normal, uniform and
/// exponential in turn, and for k >= 1 an outlier of (-1)^k (1 + k) as
/// element 0, so that the models differ in their histograms (hence in their
/// entropies and global weights) and in their deviations. With a dozen
/// elements, distributions alone often give equal histogram entropies.
template <typename Scalar>
std::vector<cki::Tensor<Scalar>> random_tensors(std::size_t n, const cki::Shape& shape, std::uint32_t seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, 0.3);
  std::uniform_real_distribution<double> uniform(-0.5, 0.5);
  std::exponential_distribution<double> exponential(4.0);
  std::vector<cki::Tensor<Scalar>> tensors;
  for (std::size_t k = 0; k < n; ++k) {
    cki::Tensor<Scalar> tensor(shape);
    for (std::int64_t i = 0; i < tensor.size(); ++i) {
      double value = 0.0;
      switch (k % 3) {
        case 0: value = normal(generator); break;
        case 1: value = uniform(generator); break;
        default: value = exponential(generator) - 0.25; break;
      }
      tensor[i] = static_cast<Scalar>(value);
    }
    if (k >= 1 && tensor.size() > 1) tensor[0] = static_cast<Scalar>((k % 2 == 1 ? 1.0 : -1.0) * (1.0 + k));
    tensors.push_back(std::move(tensor));
  }
  return tensors;
}

template <typename Scalar>
std::vector<cki::TensorView<Scalar>> views_of(const std::vector<cki::Tensor<Scalar>>& tensors) {
  std::vector<cki::TensorView<Scalar>> views;
  for (const auto& tensor : tensors) views.push_back(tensor.view());
  return views;
}

/// N weight sets with a matrix, a vector, a rank-0 scalar, an integer tensor
/// and an empty tensor, each set named "modelK.safetensors".
template <typename Scalar>
std::vector<cki::WeightSet<Scalar>> random_sets(std::size_t n, std::uint32_t seed) {
  const auto matrices = random_tensors<Scalar>(n, {4, 3}, seed);
  const auto vectors = random_tensors<Scalar>(n, {4}, seed + 1);
  const auto scalars = random_tensors<Scalar>(n, {}, seed + 2);
  std::vector<cki::WeightSet<Scalar>> sets;
  for (std::size_t k = 0; k < n; ++k) {
    cki::WeightSet<Scalar> set("model" + std::to_string(k) + ".safetensors");
    set.add("fc.weight", matrices[k]);
    set.add("fc.bias", vectors[k]);
    set.add("gain", scalars[k]);
    set.add_raw("steps", cki::DType::I64, {1}, std::vector<std::uint8_t>(8, static_cast<std::uint8_t>(k + 1)));
    set.add("unused", cki::Tensor<Scalar>({0, 3}));
    set.metadata()["seed"] = std::to_string(k);
    sets.push_back(std::move(set));
  }
  return sets;
}

cki::CkiParams params_for(cki::RuleKind rule) {
  cki::CkiParams params;
  params.rule = rule;
  params.c = 5.0;
  params.scale = 3.0;
  params.temperature = 0.5;
  return params;
}

/// Moves every parameter away from the identity start by seeded noise, so a
/// gradient check does not sit at a special point.
template <typename Scalar>
void perturb(cki::LearnableAssessment<Scalar>& assessment, std::uint32_t seed, double spread = 0.3) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, spread);
  auto& parameters = assessment.parameters();
  for (Eigen::Index j = 0; j < parameters.size(); ++j) parameters[j] += static_cast<Scalar>(normal(generator));
}

template <typename Scalar>
void check_same_values(const cki::TensorView<Scalar>& actual, const cki::TensorView<Scalar>& expected, double margin) {
  REQUIRE(actual.shape() == expected.shape());
  for (std::int64_t i = 0; i < actual.size(); ++i) {
    INFO("element " << i);
    CHECK(static_cast<double>(actual[i]) == Approx(static_cast<double>(expected[i])).margin(margin));
  }
}

/// Checks two weight sets tensor by tensor: floating values within `margin`,
/// raw tensors byte for byte, same names, order and dtypes.
template <typename Scalar>
void check_same_sets(const cki::WeightSet<Scalar>& actual, const cki::WeightSet<Scalar>& expected, double margin) {
  REQUIRE(actual.size() == expected.size());
  for (std::size_t t = 0; t < expected.size(); ++t) {
    const auto& want = expected[t];
    const auto& got = actual[t];
    INFO("tensor " << want.name);
    REQUIRE(got.name == want.name);
    CHECK(got.dtype == want.dtype);
    REQUIRE(got.shape == want.shape);
    if (want.spliceable()) {
      check_same_values(got.values, want.values, margin);
    } else {
      CHECK(*got.raw == *want.raw);
    }
  }
  CHECK(actual.metadata() == expected.metadata());
}

struct GradientCase {
  cki::RuleKind rule;
  std::size_t models;
  cki::MapForm form;
  bool per_model;
  bool learn_temperature;
  std::size_t base;
};

std::string describe(const GradientCase& c) {
  return std::string(cki::rule_name(c.rule)) + ", N = " + std::to_string(c.models) + ", " +
         cki::map_form_name(c.form) + " map, " + (c.per_model ? "per model" : "shared") + ", " +
         (c.learn_temperature ? "learned" : "fixed") + " temperature, base " + std::to_string(c.base);
}

std::vector<GradientCase> gradient_cases() {
  struct RuleCount {
    cki::RuleKind rule;
    std::size_t models;
  };
  const RuleCount rules[] = {{cki::RuleKind::softmax, 2},
                             {cki::RuleKind::softmax, 3},
                             {cki::RuleKind::blend, 2},
                             {cki::RuleKind::paired_softmax, 2}};
  std::vector<GradientCase> cases;
  for (const auto& rule : rules) {
    for (cki::MapForm form : {cki::MapForm::full, cki::MapForm::diagonal}) {
      for (bool per_model : {false, true}) {
        for (bool temperature : {false, true}) {
          if (rule.rule == cki::RuleKind::blend && temperature) continue;
          const std::size_t base = per_model ? rule.models - 1 : 0;
          cases.push_back({rule.rule, rule.models, form, per_model, temperature, base});
        }
      }
    }
  }
  return cases;
}

/// Loss L = sum_i r_i theta*_i of a fixed random direction r, so that
/// dL/dtheta* = r.
double linear_loss(const cki::Tensor<double>& merged, const cki::Tensor<double>& direction) {
  return (merged.array() * direction.array()).sum();
}

/// Compares backward() with central differences of the linear loss for
/// every parameter of `assessment`, in double. The gradient's norm must
/// exceed `minimum_norm`, so that a gradient of zero cannot pass unnoticed.
void check_gradient(cki::LearnableAssessment<double>& assessment, const std::vector<cki::Tensor<double>>& models,
                    std::uint32_t seed, double minimum_norm = 1e-4) {
  const auto views = views_of(models);
  const cki::Tensor<double> direction = random_tensors<double>(1, assessment.shape(), seed).front();

  assessment.forward(views);
  const Eigen::VectorXd analytic = assessment.backward(direction.view()).values;
  REQUIRE(analytic.size() == assessment.parameters().size());
  CHECK(analytic.norm() > minimum_norm);

  const double step = 1e-6;
  auto& parameters = assessment.parameters();
  for (Eigen::Index j = 0; j < parameters.size(); ++j) {
    const double saved = parameters[j];
    parameters[j] = saved + step;
    const double above = linear_loss(assessment.forward(views), direction);
    parameters[j] = saved - step;
    const double below = linear_loss(assessment.forward(views), direction);
    parameters[j] = saved;
    const double numeric = (above - below) / (2.0 * step);
    INFO("parameter " << j << " of " << parameters.size());
    CHECK(analytic[j] == Approx(numeric).epsilon(1e-6).margin(1e-8));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Learnable assessment of one tensor

TEMPLATE_TEST_CASE("initial forward equals data-free splice", "[learn][forward]", float, double) {
  struct Case {
    cki::RuleKind rule;
    std::size_t models;
  };
  for (const Case& c : {Case{cki::RuleKind::softmax, 2}, Case{cki::RuleKind::softmax, 3},
                        Case{cki::RuleKind::blend, 2}, Case{cki::RuleKind::paired_softmax, 2}}) {
    for (bool hard : {false, true}) {
      for (bool per_model : {false, true}) {
        for (cki::MapForm form : {cki::MapForm::full, cki::MapForm::diagonal}) {
          for (std::size_t base = 0; base < c.models; ++base) {
            INFO(cki::rule_name(c.rule) << ", N = " << c.models << (hard ? ", hard" : ", soft")
                                        << (per_model ? ", per model, " : ", shared, ")
                                        << cki::map_form_name(form) << ", base " << base);
            const auto models = random_tensors<TestType>(c.models, {5, 4}, 11);
            cki::LearnOptions options;
            options.params = params_for(c.rule);
            options.hard = hard;
            options.per_model = per_model;
            options.map_form = form;
            options.learn_temperature = c.rule != cki::RuleKind::blend;
            cki::LearnableAssessment<TestType> assessment("w", {5, 4}, c.models, options, base);

            const cki::Tensor<TestType> learned = assessment.forward(views_of(models));
            cki::Tensor<TestType> expected({5, 4});
            if (hard) {
              cki::splice_tensor("w", views_of(models), base, cki::CkiHard<TestType>(options.params), expected.data());
            } else {
              cki::splice_tensor("w", views_of(models), base, cki::CkiSoft<TestType>(options.params), expected.data());
            }
            check_same_values(learned.view(), expected.view(), tolerance<TestType>());
          }
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("initial maps are identity and zero", "[learn][forward]", float, double) {
  cki::LearnOptions options;
  options.per_model = true;
  cki::LearnableAssessment<TestType> full("w", {2, 3}, 2, options);
  REQUIRE(full.map_count() == 2);
  for (std::size_t map = 0; map < 2; ++map) {
    const auto value = full.map(map);
    CHECK_FALSE(value.diagonal);
    CHECK(value.weight.isIdentity());
    CHECK(value.bias.isZero());
  }
  CHECK(full.parameters().size() == 2 * (9 + 3));

  options.map_form = cki::MapForm::diagonal;
  options.per_model = false;
  options.learn_temperature = true;
  options.params.temperature = 0.25;
  cki::LearnableAssessment<TestType> diagonal("w", {2, 3}, 2, options);
  REQUIRE(diagonal.map_count() == 1);
  CHECK(diagonal.map(0).diagonal);
  CHECK(diagonal.map(0).weight.isOnes());
  CHECK(diagonal.parameters().size() == 3 + 3 + 1);
  CHECK(diagonal.temperature() == Approx(0.25).epsilon(1e-6));
}

TEST_CASE("wide tensors take diagonal maps", "[learn][forward]") {
  cki::LearnOptions options;
  options.max_full_dim = 4;
  cki::LearnableAssessment<double> narrow("narrow", {3, 4}, 2, options);
  cki::LearnableAssessment<double> wide("wide", {3, 5}, 2, options);
  cki::LearnableAssessment<double> scalar("scalar", {}, 2, options);
  CHECK_FALSE(narrow.layout().diagonal);
  CHECK(wide.layout().diagonal);
  CHECK(wide.parameters().size() == 10);
  CHECK(scalar.map_count() == 0);
  CHECK(scalar.parameters().size() == 0);
}

TEST_CASE("gradient matches central differences", "[learn][gradient]") {
  std::uint32_t seed = 100;
  for (const GradientCase& c : gradient_cases()) {
    INFO(describe(c));
    cki::LearnOptions options;
    options.params = params_for(c.rule);
    options.map_form = c.form;
    options.per_model = c.per_model;
    options.learn_temperature = c.learn_temperature;
    const auto models = random_tensors<double>(c.models, {3, 4}, seed);
    cki::LearnableAssessment<double> assessment("w", {3, 4}, c.models, options, c.base);
    perturb(assessment, seed + 1);
    check_gradient(assessment, models, seed + 2);
    seed += 10;
  }
}

TEST_CASE("gradient of rank-0 and rank-1 tensors", "[learn][gradient]") {
  for (const cki::Shape& shape : {cki::Shape{}, cki::Shape{6}}) {
    for (std::size_t n : {2, 3}) {
      INFO("shape " << cki::shape_to_string(shape) << ", N = " << n);
      cki::LearnOptions options;
      options.params = params_for(cki::RuleKind::softmax);
      options.per_model = true;
      options.learn_temperature = true;
      const auto models = random_tensors<double>(n, shape, 7);
      cki::LearnableAssessment<double> assessment("t", shape, n, options, 1);
      perturb(assessment, 8);
      // A rank-0 tensor has entropy 0 in every model, so the global weights
      // are equal, and at N = 2 the two scores are equal too: the gradient is 0.
      const double minimum_norm = !shape.empty() ? 1e-4 : (n == 2 ? -1.0 : 1e-7);
      check_gradient(assessment, models, 9, minimum_norm);
    }
  }
}

TEST_CASE("hard backward is the soft gradient", "[learn][gradient]") {
  for (const GradientCase& c : gradient_cases()) {
    INFO(describe(c));
    cki::LearnOptions options;
    options.params = params_for(c.rule);
    options.map_form = c.form;
    options.per_model = c.per_model;
    options.learn_temperature = c.learn_temperature;
    const auto models = random_tensors<double>(c.models, {3, 4}, 21);
    const auto direction = random_tensors<double>(1, {3, 4}, 22).front();
    cki::LearnableAssessment<double> soft("w", {3, 4}, c.models, options, c.base);
    options.hard = true;
    cki::LearnableAssessment<double> hard("w", {3, 4}, c.models, options, c.base);
    perturb(soft, 23);
    perturb(hard, 23);

    const auto soft_output = soft.forward(views_of(models));
    const auto hard_output = hard.forward(views_of(models));
    const Eigen::VectorXd soft_gradient = soft.backward(direction.view()).values;
    const Eigen::VectorXd hard_gradient = hard.backward(direction.view()).values;
    CHECK((soft_gradient - hard_gradient).norm() == 0.0);

    // Hard splicing emits only input values.
    for (std::int64_t i = 0; i < hard_output.size(); ++i) {
      bool found = false;
      for (const auto& model : models) found = found || model[i] == hard_output[i];
      INFO("element " << i);
      CHECK(found);
    }
    CHECK((soft_output.array() - hard_output.array()).abs().maxCoeff() > 0.0);
  }
}

TEST_CASE("gradient accessors follow the layout", "[learn][gradient]") {
  cki::LearnOptions options;
  options.params = params_for(cki::RuleKind::softmax);
  options.per_model = true;
  options.learn_temperature = true;
  const auto models = random_tensors<double>(3, {2, 3}, 31);
  const auto direction = random_tensors<double>(1, {2, 3}, 32).front();
  cki::LearnableAssessment<double> assessment("w", {2, 3}, 3, options);
  perturb(assessment, 33);
  assessment.forward(views_of(models));
  const auto& gradient = assessment.backward(direction.view());
  const auto& layout = gradient.layout;
  for (std::size_t map = 0; map < 3; ++map) {
    INFO("map " << map);
    CHECK(gradient.weight(map).rows() == 3);
    CHECK(gradient.weight(map).cols() == 3);
    CHECK(gradient.weight(map)(1, 2) == gradient.values[layout.weight_offset(map) + 1 * 3 + 2]);
    CHECK(gradient.bias(map)[2] == gradient.values[layout.bias_offset(map) + 2]);
  }
  CHECK(gradient.log_temperature() == gradient.values[layout.size() - 1]);
  CHECK(gradient.log_temperature() != 0.0);
}

TEST_CASE("learnable assessment rejects misuse", "[learn][errors]") {
  cki::LearnOptions options;
  const auto models = random_tensors<double>(2, {2, 3}, 41);

  SECTION("backward before forward") {
    cki::LearnableAssessment<double> assessment("w", {2, 3}, 2, options);
    CHECK_THROWS_AS(assessment.backward(models[0].view()), std::logic_error);
  }
  SECTION("gradient of another shape") {
    cki::LearnableAssessment<double> assessment("w", {2, 3}, 2, options);
    assessment.forward(views_of(models));
    const cki::Tensor<double> wrong({3, 2});
    CHECK_THROWS_WITH(assessment.backward(wrong.view()), Contains("[3, 2]") && Contains("[2, 3]"));
  }
  SECTION("wrong model count or shape") {
    cki::LearnableAssessment<double> assessment("w", {2, 3}, 3, options);
    CHECK_THROWS_AS(assessment.forward(views_of(models)), cki::MismatchError);
    cki::LearnableAssessment<double> other("w", {3, 2}, 2, options);
    CHECK_THROWS_WITH(other.forward(views_of(models)), Contains("'w'") && Contains("[2, 3]"));
  }
  SECTION("rule that cannot combine N") {
    options.params.rule = cki::RuleKind::paired_softmax;
    CHECK_THROWS_WITH(cki::LearnableAssessment<double>("w", {2, 3}, 3, options), Contains("paired-softmax"));
  }
  SECTION("learned temperature with blend") {
    options.params.rule = cki::RuleKind::blend;
    options.learn_temperature = true;
    CHECK_THROWS_WITH(options.check(), Contains("learn_temperature") && Contains("blend"));
  }
  SECTION("base out of range") {
    CHECK_THROWS_WITH(cki::LearnableAssessment<double>("w", {2, 3}, 2, options, 2), Contains("'base'"));
  }
  SECTION("map of the wrong form") {
    cki::LearnableAssessment<double> assessment("w", {2, 3}, 2, options);
    cki::AssessmentMap<double> map;
    map.weight = Eigen::MatrixXd::Ones(3, 1);
    map.diagonal = true;
    CHECK_THROWS_WITH(assessment.set_map(0, map), Contains("diagonal"));
    CHECK_THROWS_AS(assessment.map(1), std::out_of_range);
  }
  SECTION("temperature out of range") {
    options.learn_temperature = true;
    cki::LearnableAssessment<double> assessment("w", {2, 3}, 2, options);
    assessment.parameters()[assessment.layout().temperature_offset()] = 20.0;
    CHECK_THROWS_AS(assessment.forward(views_of(models)), cki::NumericError);
    CHECK_THROWS_AS(assessment.set_temperature(0.0), std::invalid_argument);
  }
  SECTION("non-finite input") {
    auto bad = models;
    bad[1][4] = std::numeric_limits<double>::quiet_NaN();
    cki::LearnableAssessment<double> assessment("w", {2, 3}, 2, options);
    CHECK_THROWS_WITH(assessment.forward(views_of(bad)), Contains("NaN") && Contains("model 2"));
    CHECK(assessment.entropies().empty());
    CHECK_THROWS_WITH(assessment.forward(views_of(bad)), Contains("NaN") && Contains("model 2"));
  }
  SECTION("negative thread count") {
    cki::LearnableAssessment<double> assessment("w", {2, 3}, 2, options);
    CHECK_THROWS_WITH(assessment.forward(views_of(models), -1), Contains("'threads'") && Contains("-1"));
  }
}

TEST_CASE("single model passes through", "[learn][forward]") {
  cki::LearnOptions options;
  options.per_model = true;
  const auto models = random_tensors<double>(1, {2, 3}, 51);
  cki::LearnableAssessment<double> assessment("w", {2, 3}, 1, options);
  const auto merged = assessment.forward(views_of(models));
  CHECK((merged.array() == models[0].array()).all());
  CHECK(assessment.backward(models[0].view()).values.isZero());
}

TEMPLATE_TEST_CASE("entropies equal information content", "[learn][global]", float, double) {
  // Base 1 of 3, so that input order and base-first order differ.
  const auto models = random_tensors<TestType>(3, {5, 4}, 56);
  cki::LearnOptions options;
  options.params = params_for(cki::RuleKind::softmax);
  cki::LearnableAssessment<TestType> assessment("w", {5, 4}, 3, options, 1);
  CHECK(assessment.entropies().empty());
  CHECK(assessment.global_weights().empty());
  assessment.forward(views_of(models));

  // By hand: the entropy of each model, and the global weights of the
  // base-first entropies put back in input order.
  const cki::InformationContent information(options.params.information());
  std::vector<double> entropies;
  for (const auto& model : models) entropies.push_back(information(model.view(), "w"));
  const std::vector<double> base_first =
      cki::GlobalWeight(options.params.global())({entropies[1], entropies[0], entropies[2]});
  const std::vector<double> global_weights{base_first[1], base_first[0], base_first[2]};
  REQUIRE(entropies[0] != entropies[1]);
  CHECK(assessment.entropies() == entropies);
  CHECK(assessment.global_weights() == global_weights);
}

TEST_CASE("forward reuses entropies until reset", "[learn][global]") {
  auto models = random_tensors<double>(2, {5, 4}, 57);
  const auto views = views_of(models);
  cki::LearnOptions options;
  options.params = params_for(cki::RuleKind::softmax);
  options.per_model = true;
  cki::LearnableAssessment<double> assessment("w", {5, 4}, 2, options);
  const cki::Tensor<double> first = assessment.forward(views);
  const std::vector<double> entropies = assessment.entropies();
  const std::vector<double> global_weights = assessment.global_weights();
  REQUIRE(entropies.size() == 2);

  // The same maps give the same merge, bit for bit.
  CHECK((assessment.forward(views).array() == first.array()).all());

  // Other maps change the merge but not the global level.
  perturb(assessment, 58);
  const cki::Tensor<double> moved = assessment.forward(views);
  CHECK_FALSE((moved.array() == first.array()).all());
  CHECK(assessment.entropies() == entropies);
  CHECK(assessment.global_weights() == global_weights);

  // Values changed in place keep the stored entropies until the reset.
  // Alternating 0 and 1 fill the first and last bins, so the entropy is ln 2.
  for (std::int64_t i = 0; i < models[1].size(); ++i) models[1][i] = static_cast<double>(i % 2);
  assessment.forward(views);
  CHECK(assessment.entropies() == entropies);
  assessment.reset_global_weights();
  CHECK(assessment.entropies().empty());
  CHECK(assessment.global_weights().empty());
  assessment.forward(views);
  const std::vector<double> recomputed = assessment.entropies();
  REQUIRE(recomputed.size() == 2);
  CHECK(recomputed[0] == entropies[0]);
  CHECK(recomputed[1] == Approx(std::log(2.0)));

  // Reused entropies still get the finite check: a NaN written in place is
  // an error naming the model, not a NaN merge.
  models[1][3] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(assessment.forward(views), Contains("holds NaN at index 3") && Contains("in model 2"));
  models[1][3] = 0.5;

  // Other tensors (other data pointers) are noticed without a reset.
  const auto others = random_tensors<double>(2, {5, 4}, 59);
  assessment.forward(views_of(others));
  const cki::InformationContent information(options.params.information());
  const std::vector<double> other_entropies = assessment.entropies();
  REQUIRE(other_entropies.size() == 2);
  CHECK(other_entropies[0] == information(others[0].view(), "w"));
  CHECK(other_entropies[1] == information(others[1].view(), "w"));
}

TEST_CASE("thread count leaves forward unchanged", "[learn][global]") {
  // 300 rows of 40 span several blocks of the information content's loops.
  const auto models = random_tensors<double>(3, {300, 40}, 60);
  const auto views = views_of(models);
  cki::LearnOptions options;
  options.params = params_for(cki::RuleKind::softmax);
  cki::LearnableAssessment<double> serial("w", {300, 40}, 3, options);
  cki::LearnableAssessment<double> parallel("w", {300, 40}, 3, options);
  const cki::Tensor<double> expected = serial.forward(views, 1);
  const cki::Tensor<double> actual = parallel.forward(views, 2);
  CHECK(parallel.entropies() == serial.entropies());
  CHECK((actual.array() == expected.array()).all());
}

// ---------------------------------------------------------------------------
// Adam

TEST_CASE("Adam defaults and parameter checks", "[learn][adam]") {
  const cki::AdamParams defaults;
  CHECK(defaults.learning_rate == 1e-3);
  CHECK(defaults.beta1 == 0.9);
  CHECK(defaults.beta2 == 0.999);
  CHECK(defaults.epsilon == 1e-8);

  cki::AdamParams bad;
  bad.learning_rate = 0.0;
  CHECK_THROWS_WITH(bad.check(), Contains("'learning_rate'"));
  bad = {};
  bad.beta1 = 1.0;
  CHECK_THROWS_WITH(bad.check(), Contains("'beta1'"));
  bad = {};
  bad.beta2 = -0.1;
  CHECK_THROWS_WITH(bad.check(), Contains("'beta2'"));
  bad = {};
  bad.epsilon = 0.0;
  CHECK_THROWS_WITH(bad.check(), Contains("'epsilon'"));

  // Small values keep their digits in the message.
  bad = {};
  bad.learning_rate = -1e-7;
  CHECK_THROWS_WITH(bad.check(), "'learning_rate' must be in (0, 1e3], got -1e-07");
  bad = {};
  bad.beta1 = -2.5e-9;
  CHECK_THROWS_WITH(bad.check(), "'beta1' must be in [0, 1), got -2.5e-09");
}

TEST_CASE("Adam first step moves by the learning rate", "[learn][adam]") {
  // With bias correction the first step is lr * g / (|g| + eps) per entry.
  cki::Adam<double> adam;
  Eigen::VectorXd values(3);
  values << 1.0, -2.0, 0.5;
  Eigen::VectorXd gradient(3);
  gradient << 4.0, -0.5, 0.0;
  adam.step(values, gradient);
  CHECK(adam.step_count() == 1);
  CHECK(values[0] == Approx(1.0 - 1e-3).epsilon(1e-9));
  CHECK(values[1] == Approx(-2.0 + 1e-3).epsilon(1e-9));
  CHECK(values[2] == 0.5);

  Eigen::VectorXd other(2);
  CHECK_THROWS_WITH(adam.step(other, Eigen::VectorXd::Zero(2).eval()), Contains("reset()"));
  adam.reset();
  CHECK(adam.step_count() == 0);
  CHECK_NOTHROW(adam.step(other, Eigen::VectorXd::Zero(2).eval()));
}

TEST_CASE("Adam bias correction at step two", "[learn][adam]") {
  // Gradients 4 then 2 on one parameter with the default parameters:
  // m = 0.9 * 0.4 + 0.1 * 2 = 0.56 and v = 0.999 * 0.016 + 0.001 * 4 =
  // 0.019984, corrected by 1 - 0.9^2 and 1 - 0.999^2.
  cki::Adam<double> adam;
  Eigen::VectorXd values = Eigen::VectorXd::Zero(1);
  adam.step(values, Eigen::VectorXd::Constant(1, 4.0));
  const double after_first = values[0];
  adam.step(values, Eigen::VectorXd::Constant(1, 2.0));
  const double first_moment = 0.56 / (1.0 - 0.81);
  const double second_moment = 0.019984 / (1.0 - 0.998001);
  const double expected_step = 1e-3 * first_moment / (std::sqrt(second_moment) + 1e-8);
  CHECK(adam.step_count() == 2);
  CHECK(after_first - values[0] == Approx(expected_step).epsilon(1e-9));
}

TEST_CASE("Adam minimises a quadratic", "[learn][adam]") {
  cki::AdamParams params;
  params.learning_rate = 0.05;
  cki::Adam<double> adam(params);
  Eigen::VectorXd values = Eigen::VectorXd::Constant(4, 1.0);
  const Eigen::VectorXd target = Eigen::VectorXd::LinSpaced(4, -1.0, 2.0);
  for (int step = 0; step < 500; ++step) {
    const Eigen::VectorXd gradient = values - target;
    adam.step(values, gradient);
  }
  CHECK((values - target).norm() < 1e-2);
}

TEST_CASE("Adam steps lower a quadratic loss on the merge", "[learn][adam]") {
  // Loss 0.5 |theta* - theta_2|^2: the maps should shift weight to model 2.
  for (cki::RuleKind rule : {cki::RuleKind::softmax, cki::RuleKind::blend, cki::RuleKind::paired_softmax}) {
    INFO(cki::rule_name(rule));
    cki::LearnOptions options;
    options.params = params_for(rule);
    options.per_model = true;
    options.learn_temperature = rule != cki::RuleKind::blend;
    const auto models = random_tensors<double>(2, {4, 3}, 61);
    cki::LearnableAssessment<double> assessment("w", {4, 3}, 2, options);
    cki::AdamParams params;
    params.learning_rate = 1e-2;
    cki::Adam<double> adam(params);

    std::vector<double> losses;
    for (int step = 0; step < 10; ++step) {
      const auto merged = assessment.forward(views_of(models));
      const cki::Tensor<double> residual({4, 3}, merged.array() - models[1].array());
      losses.push_back(0.5 * residual.array().square().sum());
      assessment.backward(residual.view());
      adam.step({assessment.parameter_block()});
    }
    INFO("first loss " << losses.front() << ", last loss " << losses.back());
    CHECK(losses.back() < losses.front());
    for (std::size_t i = 1; i < losses.size(); ++i) {
      INFO("step " << i);
      CHECK(losses[i] <= losses[i - 1]);
    }
  }
}

// ---------------------------------------------------------------------------
// Whole-model learner and replay

TEMPLATE_TEST_CASE("learner forward equals splice at start", "[learn][model]", float, double) {
  const auto sets = random_sets<TestType>(3, 71);
  cki::LearnOptions options;
  options.params = params_for(cki::RuleKind::softmax);
  options.per_model = true;
  cki::SpliceOptions selection;
  selection.base = 1;
  selection.exclude = {"*.bias"};
  cki::LearnableSplice<TestType> learner(sets, options, selection);
  CHECK(learner.names() == std::vector<std::string>{"fc.weight", "gain"});
  CHECK(learner.parameter_count() == 3 * (9 + 3));

  const auto learned = learner.forward();
  const auto expected = cki::splice(sets, cki::CkiSoft<TestType>(options.params), selection);
  check_same_sets(learned, expected.merged, tolerance<TestType>());

  // The learner's global level is the one splice() reports.
  for (const cki::TensorReport& tensor : expected.report.tensors) {
    if (!learner.contains(tensor.name)) continue;
    INFO("tensor " << tensor.name);
    const auto& assessment = learner.assessment(tensor.name);
    REQUIRE(assessment.entropies().size() == tensor.models.size());
    REQUIRE(assessment.global_weights().size() == tensor.models.size());
    for (std::size_t k = 0; k < tensor.models.size(); ++k) {
      INFO("model " << k);
      CHECK(assessment.entropies()[k] == tensor.models[k].entropy.value());
      CHECK(assessment.global_weights()[k] == tensor.models[k].global_weight.value());
    }
  }
}

TEST_CASE("learner rejects unknown gradients", "[learn][model]") {
  const auto sets = random_sets<double>(2, 81);
  cki::LearnableSplice<double> learner(sets, cki::LearnOptions{});
  const cki::Tensor<double> gradient({4});
  CHECK_THROWS_WITH(learner.backward("fc.weight", gradient.view()), Contains("before forward"));
  learner.forward();
  CHECK_THROWS_WITH(learner.backward("steps", gradient.view()), Contains("'steps'") && Contains("not learned"));
  CHECK_THROWS_WITH(learner.backward("fc.weight", gradient.view()), Contains("[4]"));
  CHECK_NOTHROW(learner.backward("fc.bias", gradient.view()));
}

namespace {

/// Trains `learner` for a few Adam steps towards model `target` of `sets`
/// (loss 0.5 |theta* - theta_target|^2 over every learned tensor), so its
/// maps leave the identity.
template <typename Scalar>
void train_towards(cki::LearnableSplice<Scalar>& learner, const std::vector<cki::WeightSet<Scalar>>& sets,
                   std::size_t target, int steps) {
  cki::AdamParams params;
  params.learning_rate = 0.05;
  cki::Adam<Scalar> adam(params);
  for (int step = 0; step < steps; ++step) {
    const cki::WeightSet<Scalar> merged = learner.forward();
    std::vector<cki::Tensor<Scalar>> residuals;
    std::map<std::string, cki::TensorView<Scalar>> gradients;
    for (const std::string& name : learner.names()) {
      const auto& value = merged.view(name);
      residuals.emplace_back(value.shape(), value.array() - sets[target].view(name).array());
    }
    const auto names = learner.names();
    for (std::size_t t = 0; t < names.size(); ++t) gradients.emplace(names[t], residuals[t].view());
    learner.backward(gradients);
    learner.step(adam);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("local uncertainty maps replay the learner", "[learn][replay]", float, double) {
  for (bool hard : {false, true}) {
    for (bool per_model : {false, true}) {
      for (cki::MapForm form : {cki::MapForm::full, cki::MapForm::diagonal}) {
        INFO((hard ? "hard, " : "soft, ") << (per_model ? "per model, " : "shared, ") << cki::map_form_name(form));
        const auto sets = random_sets<TestType>(3, 91);
        cki::LearnOptions options;
        options.params = params_for(cki::RuleKind::softmax);
        options.hard = hard;
        options.per_model = per_model;
        options.map_form = form;
        cki::SpliceOptions selection;
        selection.base = 2;
        cki::LearnableSplice<TestType> learner(sets, options, selection);
        train_towards(learner, sets, 0, 5);
        const cki::WeightSet<TestType> learned = learner.forward();
        const cki::LearnedMaps<TestType> maps = learner.learned_maps();
        CHECK_FALSE(maps.tensors.at("fc.weight").maps.front().weight.isIdentity());

        // The maps as a LocalUncertainty in the data-free policies.
        const cki::CompatibilityAssessment<TestType> assessment(
            cki::InformationContent(options.params.information()), cki::GlobalWeight(options.params.global()),
            maps.local_uncertainty(), cki::CombinationRule(options.params.combination()));
        cki::WeightSet<TestType> replayed;
        if (hard) {
          replayed = cki::splice(sets, cki::CkiHard<TestType>(assessment), maps.splice_options()).merged;
        } else {
          replayed = cki::splice(sets, cki::CkiSoft<TestType>(assessment), maps.splice_options()).merged;
        }
        check_same_sets(replayed, learned, tolerance<TestType>());
        check_same_sets(cki::splice_learned(sets, maps).merged, learned, tolerance<TestType>());
      }
    }
  }
}

TEMPLATE_TEST_CASE("learned temperatures replay per tensor", "[learn][replay]", float, double) {
  for (cki::RuleKind rule : {cki::RuleKind::softmax, cki::RuleKind::paired_softmax}) {
    INFO(cki::rule_name(rule));
    const auto sets = random_sets<TestType>(2, 101);
    cki::LearnOptions options;
    options.params = params_for(rule);
    options.per_model = true;
    options.learn_temperature = true;
    cki::LearnableSplice<TestType> learner(sets, options);
    train_towards(learner, sets, 1, 5);
    const cki::WeightSet<TestType> learned = learner.forward();
    const cki::LearnedMaps<TestType> maps = learner.learned_maps();
    const double first = *maps.tensors.at("fc.weight").temperature;
    const double second = *maps.tensors.at("gain").temperature;
    CHECK(first != Approx(0.5));
    CHECK(first != Approx(second));

    const auto result = cki::splice_learned(sets, maps);
    CHECK(result.report.method == "cki-learned-soft");
    CHECK(result.report.parameters.at("learned_temperatures").size() == 3);
    check_same_sets(result.merged, learned, tolerance<TestType>());

    const cki::AnyPolicy<TestType> policy = cki::make_learned_policy(maps);
    check_same_sets(cki::splice(sets, policy, maps.splice_options()).merged, learned, tolerance<TestType>());
  }
}

TEST_CASE("replay rejects another base or model count", "[learn][replay]") {
  const auto sets = random_sets<double>(2, 111);
  cki::LearnOptions options;
  options.per_model = true;
  cki::LearnableSplice<double> learner(sets, options);
  const auto maps = learner.learned_maps();
  cki::SpliceOptions other_base;
  other_base.base = 1;
  CHECK_THROWS_WITH(cki::splice(sets, cki::LearnedPolicy<double>(maps), other_base), Contains("base model 0"));
  const auto three = random_sets<double>(3, 112);
  CHECK_THROWS_WITH(cki::splice_learned(three, maps), Contains("2 models"));
}

// ---------------------------------------------------------------------------
// Learned-maps file

TEMPLATE_TEST_CASE("learned maps file round trip", "[learn][file]", float, double) {
  TempDir folder;
  const auto sets = random_sets<TestType>(3, 121);
  cki::LearnOptions options;
  options.params = params_for(cki::RuleKind::softmax);
  options.per_model = true;
  options.learn_temperature = true;
  options.max_full_dim = 3;
  cki::SpliceOptions selection;
  selection.base = 1;
  selection.include = {"fc.*", "gain"};
  selection.exclude = {"steps"};
  cki::LearnableSplice<TestType> learner(sets, options, selection);
  REQUIRE(learner.names() == std::vector<std::string>{"fc.weight", "fc.bias", "gain"});
  CHECK_FALSE(learner.assessment("fc.weight").layout().diagonal);
  CHECK(learner.assessment("fc.bias").layout().diagonal);
  train_towards(learner, sets, 2, 4);
  const auto maps = learner.learned_maps();
  const fs::path path = folder / "maps.safetensors";
  cki::save_learned_maps(path, maps);

  const auto loaded = cki::load_learned_maps<TestType>(path);
  CHECK(loaded.options.to_json() == options.to_json());
  CHECK(loaded.model_count == 3);
  CHECK(loaded.base == 1);
  CHECK(loaded.include == selection.include);
  CHECK(loaded.exclude == selection.exclude);
  REQUIRE(loaded.tensors.size() == maps.tensors.size());
  for (const auto& [name, tensor] : maps.tensors) {
    INFO("tensor " << name);
    const auto& other = loaded.tensors.at(name);
    REQUIRE(other.maps.size() == tensor.maps.size());
    for (std::size_t k = 0; k < tensor.maps.size(); ++k) {
      CHECK(other.maps[k].diagonal == tensor.maps[k].diagonal);
      CHECK(other.maps[k].weight == tensor.maps[k].weight);
      CHECK(other.maps[k].bias == tensor.maps[k].bias);
    }
    CHECK(other.temperature == tensor.temperature);
  }

  // Replay and resume from the file reproduce the learner.
  const cki::WeightSet<TestType> learned = learner.forward();
  check_same_sets(cki::splice_learned(sets, loaded).merged, learned, tolerance<TestType>());
  cki::LearnableSplice<TestType> resumed(sets, loaded);
  check_same_sets(resumed.forward(), learned, tolerance<TestType>());
  CHECK(resumed.parameter_count() == learner.parameter_count());

  // No silent overwrite.
  CHECK_THROWS_AS(cki::save_learned_maps(path, maps), cki::IoError);
  CHECK_NOTHROW(cki::save_learned_maps(path, maps, true));
}

TEST_CASE("learned maps file rejects other files", "[learn][file]") {
  TempDir folder;
  const auto sets = random_sets<double>(2, 131);
  const fs::path plain = folder / "model.safetensors";
  {
    std::vector<cki::TensorSpec> specs{{"w", cki::DType::F32, {2}}};
    cki::SafetensorsWriter writer(plain, specs, {});
    const float values[2] = {1.0F, 2.0F};
    writer.write("w", values, 2);
    writer.commit();
  }
  CHECK_THROWS_WITH(cki::load_learned_maps<double>(plain), Contains("cki.learned_maps"));

  cki::LearnableSplice<double> learner(sets, cki::LearnOptions{});
  const fs::path path = folder / "maps.safetensors";
  cki::save_learned_maps(path, learner.learned_maps());
  CHECK_NOTHROW(cki::load_learned_maps<double>(path));

  // A learner set up with other options or selection rejects the maps.
  cki::LearnOptions per_model;
  per_model.per_model = true;
  cki::LearnableSplice<double> other(sets, per_model);
  CHECK_THROWS_WITH(other.load_maps(cki::load_learned_maps<double>(path)), Contains("options"));
  cki::SpliceOptions fewer;
  fewer.exclude = {"gain"};
  cki::LearnableSplice<double> narrower(sets, cki::LearnOptions{}, fewer);
  CHECK_THROWS_WITH(narrower.load_maps(cki::load_learned_maps<double>(path)), Contains("selection"));
}

// ---------------------------------------------------------------------------
// Calibration

namespace {

/// Score: minus the squared distance of the merged "fc.weight" to that of
/// model `target`, and a count of calls.
template <typename Scalar>
struct DistanceScore {
  const std::vector<cki::WeightSet<Scalar>>* sets;
  std::size_t target;
  std::size_t* calls;

  double operator()(const cki::WeightSet<Scalar>& merged) const {
    ++*calls;
    const auto difference = merged.view("fc.weight").array() - sets->at(target).view("fc.weight").array();
    return -static_cast<double>(difference.square().sum());
  }
};

cki::CalibrationSpace small_space() {
  cki::CalibrationSpace space;
  space.a = {0.2, 0.4};
  space.c = {500.0};
  space.scale = {1.0, 100.0};
  space.temperature = {0.1, 1.0};
  space.bins = {10};
  return space;
}

}  // namespace

TEST_CASE("calibration never exceeds the budget", "[learn][calibrate]") {
  const auto sets = random_sets<double>(3, 141);
  std::size_t calls = 0;
  const DistanceScore<double> score{&sets, 1, &calls};
  const cki::CalibrationSpace space = small_space();

  // N = 3: blend and paired softmax are skipped without evaluation.
  const std::size_t per_rule = space.grid_size() / 3;
  for (std::size_t budget : {0, 1, 5, 1000}) {
    INFO("budget " << budget);
    calls = 0;
    const auto result = cki::calibrate(sets, score, space, budget);
    CHECK(result.valid_points == per_rule);
    CHECK(result.skipped_points == 2 * per_rule);
    CHECK(calls == std::min(budget, per_rule));
    CHECK(result.trials.size() == calls);
    for (const auto& trial : result.trials) CHECK(trial.point.params.rule == cki::RuleKind::softmax);
    CHECK(result.best_index.has_value() == (budget > 0));
  }
}

TEST_CASE("calibration finds the grid maximum", "[learn][calibrate]") {
  const auto sets = random_sets<double>(2, 151);
  std::size_t calls = 0;
  const DistanceScore<double> score{&sets, 1, &calls};
  const cki::CalibrationSpace space = small_space();

  // Blend is tried at the first temperature only.
  const std::size_t per_rule = space.grid_size() / 3;
  const std::size_t blend_duplicates = per_rule / 2;
  const auto result = cki::calibrate(sets, score, space, 1000);
  CHECK(result.skipped_points == blend_duplicates);
  CHECK(result.valid_points == 3 * per_rule - blend_duplicates);
  REQUIRE(result.trials.size() == result.valid_points);
  CHECK(calls == result.valid_points);

  // The reference parameters come first, and the best is the maximum.
  CHECK(result.trials.front().point.to_json() == cki::CalibrationPoint{}.to_json());
  double maximum = -1e300;
  for (const auto& trial : result.trials) {
    maximum = std::max(maximum, trial.score);
    CHECK(trial.seconds >= 0.0);
  }
  CHECK(result.best().score == maximum);

  // The best point reproduces its score.
  const auto merged = cki::splice_calibrated(sets, result.best().point);
  CHECK(score(merged.merged) == result.best().score);

  const auto json = result.to_json();
  CHECK(json.at("trials").size() == result.trials.size());
  CHECK(json.at("best") == *result.best_index);
}

TEST_CASE("calibration is deterministic", "[learn][calibrate]") {
  const auto sets = random_sets<double>(2, 161);
  std::size_t calls = 0;
  const DistanceScore<double> score{&sets, 0, &calls};
  const cki::CalibrationSpace space = small_space();
  const auto points_of = [](const cki::CalibrationResult& result) {
    std::vector<nlohmann::json> points;
    for (const auto& trial : result.trials) points.push_back(trial.point.to_json());
    return points;
  };

  cki::CalibrationOptions options;
  options.seed = 7;
  const auto first = cki::calibrate(sets, score, space, 6, options);
  const auto second = cki::calibrate(sets, score, space, 6, options);
  CHECK(points_of(first) == points_of(second));
  options.seed = 8;
  const auto reseeded = cki::calibrate(sets, score, space, 6, options);
  CHECK(points_of(first) != points_of(reseeded));
  CHECK(points_of(first).front() == points_of(reseeded).front());

  // Grid order without the reference first: the first points of the grid.
  options.order = cki::SearchOrder::grid;
  options.defaults_first = false;
  const auto grid = cki::calibrate(sets, score, space, 3, options);
  REQUIRE(grid.trials.size() == 3);
  CHECK(grid.trials[0].point.params.a == 0.2);
  CHECK(grid.trials[0].point.params.scale == 1.0);
  CHECK(grid.trials[0].point.params.temperature == 0.1);
  CHECK(grid.trials[1].point.params.temperature == 1.0);
  CHECK(grid.trials[2].point.params.scale == 100.0);
}

TEST_CASE("calibration space is checked", "[learn][calibrate]") {
  const auto sets = random_sets<double>(2, 171);
  std::size_t calls = 0;
  const DistanceScore<double> score{&sets, 0, &calls};
  cki::CalibrationSpace space = small_space();
  space.a.clear();
  CHECK_THROWS_WITH(cki::calibrate(sets, score, space, 4), Contains("'a'") && Contains("empty"));
  space = small_space();
  space.temperature = {1.0, -1.0};
  CHECK_THROWS_WITH(space.check(), Contains("'temperature'"));
  space = small_space();
  space.bins = {0};
  CHECK_THROWS_WITH(space.check(), Contains("'bins'"));
  CHECK(calls == 0);
}

TEST_CASE("calibration ignores NaN scores", "[learn][calibrate]") {
  const auto sets = random_sets<double>(2, 181);
  const auto nan_score = [](const cki::WeightSet<double>&) { return std::numeric_limits<double>::quiet_NaN(); };
  const auto result = cki::calibrate(sets, nan_score, small_space(), 3);
  CHECK(result.trials.size() == 3);
  CHECK_FALSE(result.best_index.has_value());
  CHECK_THROWS_AS(result.best(), std::logic_error);
  CHECK(result.to_json().at("best").is_null());
}
