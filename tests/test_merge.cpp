// Tests of the baseline merge methods: hand-derived merges, trim counts and
// ties, sign election, fallbacks, DARE's generator, thread independence,
// the whole-model TIES prepass, the registry and every parameter error.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include <cki/cki.hpp>

using Catch::Matchers::Contains;

namespace {

template <typename Scalar>
cki::Tensor<Scalar> make_tensor(cki::Shape shape, const std::vector<double>& values) {
  typename cki::Tensor<Scalar>::Array array(static_cast<Eigen::Index>(values.size()));
  for (std::size_t i = 0; i < values.size(); ++i) array[static_cast<Eigen::Index>(i)] = static_cast<Scalar>(values[i]);
  return cki::Tensor<Scalar>(std::move(shape), std::move(array));
}

/// Tensors of N models for one tensor name, and their views.
template <typename Scalar>
struct Inputs {
  std::vector<cki::Tensor<Scalar>> tensors;

  Inputs(const cki::Shape& shape, const std::vector<std::vector<double>>& models) {
    for (const auto& values : models) tensors.push_back(make_tensor<Scalar>(shape, values));
  }

  std::vector<cki::TensorView<Scalar>> views() const {
    std::vector<cki::TensorView<Scalar>> out;
    for (const auto& tensor : tensors) out.push_back(tensor.view());
    return out;
  }
};

/// Output of one splice_tensor() call and its report.
template <typename Scalar>
struct Merged {
  std::vector<Scalar> values;
  cki::TensorReport report;

  double operator[](std::size_t i) const { return static_cast<double>(values[i]); }
};

template <typename Scalar, typename Policy>
Merged<Scalar> merge_tensor(const Policy& policy, const Inputs<Scalar>& inputs, std::size_t base = 0,
                            int threads = 1, const std::string& name = "layer.weight") {
  Merged<Scalar> merged;
  merged.values.assign(static_cast<std::size_t>(inputs.tensors.front().size()), Scalar(-12345));
  merged.report = cki::splice_tensor(name, inputs.views(), base, policy, merged.values.data(), threads);
  return merged;
}

template <typename Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
}

template <typename Scalar>
std::vector<std::vector<double>> random_models(std::size_t n, std::int64_t numel, std::uint32_t seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, 0.1);
  std::vector<std::vector<double>> models(n, std::vector<double>(static_cast<std::size_t>(numel)));
  for (auto& model : models) {
    for (auto& value : model) value = normal(generator);
  }
  return models;
}

template <typename Scalar>
bool bit_identical(const std::vector<Scalar>& a, const std::vector<Scalar>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(Scalar)) == 0;
}

/// A FisherSource over fixed tensors in input order.
template <typename Scalar>
cki::FisherSource<Scalar> fisher_source(const cki::Shape& shape, const std::vector<std::vector<double>>& values) {
  auto inputs = std::make_shared<Inputs<Scalar>>(shape, values);
  return [inputs](const std::string&) {
    cki::FisherTensors<Scalar> tensors;
    tensors.models = inputs->views();
    tensors.storage = inputs;
    return tensors;
  };
}

}  // namespace

// ---------------------------------------------------------------- average

TEMPLATE_TEST_CASE("average hand-derived weighted", "[merge][average]", float, double) {
  const Inputs<TestType> inputs({3}, {{1, 2, 3}, {3, 4, 5}, {5, 0, 1}});
  cki::AverageParams params;
  params.weights = {1, 1, 2};
  const auto merged = merge_tensor(cki::AveragePolicy<TestType>(params), inputs);
  const std::vector<double> expected{3.5, 1.5, 2.5};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i);
    CHECK(merged[i] == Approx(expected[i]).epsilon(tolerance<TestType>()));
  }
  CHECK(*merged.report.models[2].mean_weight == Approx(0.5));
}

TEMPLATE_TEST_CASE("average weights follow input order", "[merge][average]", float, double) {
  const Inputs<TestType> inputs({2}, {{0, 0}, {4, 8}, {8, 0}});
  cki::AverageParams params;
  params.weights = {1, 3, 0};
  const auto merged = merge_tensor(cki::AveragePolicy<TestType>(params), inputs, /*base=*/2);
  INFO("the base is model 3; weights stay with their input models");
  CHECK(merged[0] == Approx(3.0));
  CHECK(merged[1] == Approx(6.0));
  CHECK(*merged.report.models[0].mean_weight == Approx(0.25));
  CHECK(*merged.report.models[1].mean_weight == Approx(0.75));
  CHECK(*merged.report.models[2].mean_weight == Approx(0.0));
}

TEMPLATE_TEST_CASE("average equal weights by default", "[merge][average]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, -1}, {2, -2}, {6, 0}});
  const auto merged = merge_tensor(cki::AveragePolicy<TestType>(), inputs);
  CHECK(merged[0] == Approx(3.0));
  CHECK(merged[1] == Approx(-1.0));
}

// ------------------------------------------------------- task arithmetic

TEMPLATE_TEST_CASE("task arithmetic hand-derived", "[merge][task-arithmetic]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, 1}, {2, 0}, {1, 3}});
  cki::TaskArithmeticParams params;
  params.weights = {7, 1, 0.5};
  params.lambda = 2;
  const auto merged = merge_tensor(cki::TaskArithmeticPolicy<TestType>(params), inputs);
  INFO("1 + 2 * (1 * (1, -1) + 0.5 * (0, 2))");
  CHECK(merged[0] == Approx(3.0));
  CHECK(merged[1] == Approx(1.0));
}

TEMPLATE_TEST_CASE("task arithmetic with another base", "[merge][task-arithmetic]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, 1}, {2, 0}, {1, 3}});
  cki::TaskArithmeticParams params;
  params.weights = {1, 100, 0.5};
  const auto merged = merge_tensor(cki::TaskArithmeticPolicy<TestType>(params), inputs, /*base=*/1);
  INFO("(2, 0) + 1 * (-1, 1) + 0.5 * (-1, 3); the base's weight 100 is ignored");
  CHECK(merged[0] == Approx(0.5));
  CHECK(merged[1] == Approx(2.5));
}

TEMPLATE_TEST_CASE("task arithmetic of identical models", "[merge][task-arithmetic]", float, double) {
  const Inputs<TestType> inputs({3}, {{0.1, -0.2, 0.3}, {0.1, -0.2, 0.3}, {0.1, -0.2, 0.3}});
  const auto merged = merge_tensor(cki::TaskArithmeticPolicy<TestType>(), inputs);
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("element " << i);
    CHECK(merged.values[i] == inputs.tensors[0][static_cast<std::int64_t>(i)]);
  }
}

// ------------------------------------ non-finite inputs of linear merges

// Average and task arithmetic test their output for NaN and infinity
// instead of scanning the inputs first. The error must stay the one the scan
// gave: the first model in input order that contains such a value, and its
// first index.
TEMPLATE_TEST_CASE("linear merges name first non-finite input", "[merge][average][task-arithmetic]", float,
                   double) {
  const TestType inf = std::numeric_limits<TestType>::infinity();
  // Model 1 contains +Inf at index 2 and model 3 NaN at index 0. With
  // model 2 as the base, model 1 still comes first in input order.
  Inputs<TestType> inputs({2, 2}, {{0, 0, 0, 0}, {1, 1, 1, 1}, {2, 2, 2, 2}});
  inputs.tensors[0].data()[2] = inf;
  inputs.tensors[2].data()[0] = std::numeric_limits<TestType>::quiet_NaN();
  const std::string expected = "tensor 'layer.weight' of shape [2, 2] holds +Inf at index 2 ([1, 0]) in model 1";
  CHECK_THROWS_WITH(merge_tensor(cki::AveragePolicy<TestType>(), inputs, 1), expected);
  CHECK_THROWS_WITH(merge_tensor(cki::TaskArithmeticPolicy<TestType>(), inputs, 1), expected);
  CHECK_THROWS_WITH(merge_tensor(cki::AveragePolicy<TestType>(), inputs, 1, 2), expected);
}

TEMPLATE_TEST_CASE("linear merges check zero-weight inputs", "[merge][average][task-arithmetic]",
                   float, double) {
  // A weight of 0 keeps the model's values out of the output, so the output
  // is finite. The model is still checked, as every input is.
  Inputs<TestType> inputs({3}, {{1, 2, 3}, {4, 5, 6}, {7, 8, 9}});
  inputs.tensors[2].data()[1] = std::numeric_limits<TestType>::quiet_NaN();
  cki::AverageParams average;
  average.weights = {1, 1, 0};
  CHECK_THROWS_WITH(merge_tensor(cki::AveragePolicy<TestType>(average), inputs),
                    Contains("holds NaN at index 1 ([1]) in model 3"));
  cki::TaskArithmeticParams task;
  task.weights = {1, 1, 0};
  CHECK_THROWS_WITH(merge_tensor(cki::TaskArithmeticPolicy<TestType>(task), inputs),
                    Contains("holds NaN at index 1 ([1]) in model 3"));
}

TEMPLATE_TEST_CASE("task arithmetic overflow is no error", "[merge][task-arithmetic]",
                   float, double) {
  // base + (delta_1 + delta_2) with deltas of 0.75 x max overflows to +Inf
  // at element 0 only. The inputs are finite, so no input is blamed.
  const double big = 0.75 * static_cast<double>(std::numeric_limits<TestType>::max());
  const Inputs<TestType> inputs({2}, {{0, 0}, {big, 1}, {big, 2}});
  const auto merged = merge_tensor(cki::TaskArithmeticPolicy<TestType>(), inputs);
  CHECK(std::isinf(merged.values[0]));
  CHECK(merged[1] == Approx(3.0));
}

// ------------------------------------------------------------------ ties

TEST_CASE("trim keep count floors with slack", "[merge][ties]") {
  CHECK(cki::trim_keep_count(0.29, 100) == 29);
  CHECK(cki::trim_keep_count(0.57, 100) == 57);
  CHECK(cki::trim_keep_count(0.5, 5) == 2);
  CHECK(cki::trim_keep_count(0.0, 100) == 0);
  CHECK(cki::trim_keep_count(1.0, 100) == 100);
  CHECK(cki::trim_keep_count(0.3, 0) == 0);
}

TEMPLATE_TEST_CASE("ties hand-derived", "[merge][ties]", float, double) {
  // Deltas from a zero base: model 1 keeps -3 and 2, model 2 keeps 2 and 4.
  const Inputs<TestType> inputs({4}, {{0, 0, 0, 0}, {0.5, -3, 1, 2}, {-1, 2, 4, 0.1}});
  cki::TiesParams params;
  params.density = 0.5;
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  const std::vector<double> expected{0, -3, 4, 2};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i);
    CHECK(merged[i] == Approx(expected[i]));
  }
  INFO(merged.report.notes.dump());
  CHECK(merged.report.notes["kept"] == nlohmann::json({nullptr, 2, 2}));
}

TEMPLATE_TEST_CASE("ties weighted sign election", "[merge][ties]", float, double) {
  // Trimmed deltas (0, -3, 0, 2) and (0, 2, 4, 0) with weights 1 and 3.
  const Inputs<TestType> inputs({4}, {{0, 0, 0, 0}, {0.5, -3, 1, 2}, {-1, 2, 4, 0.1}});
  cki::TiesParams params;
  params.density = 0.5;
  params.weights = {0, 1, 3};
  params.lambda = 0.5;
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  INFO("element 1: -3 + 3 * 2 > 0 elects +, so only model 2's 2 counts");
  CHECK(merged[1] == Approx(0.5 * 2.0));
  CHECK(merged[2] == Approx(0.5 * 4.0));
  CHECK(merged[3] == Approx(0.5 * 2.0));
}

TEMPLATE_TEST_CASE("ties disjoint weighted mean", "[merge][ties]", float, double) {
  const Inputs<TestType> inputs({1}, {{1}, {3}, {5}});
  cki::TiesParams params;
  params.density = 1;
  params.weights = {0, 1, 3};
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  INFO("1 + (1 * 2 + 3 * 4) / (1 + 3)");
  CHECK(merged[0] == Approx(4.5));
}

TEMPLATE_TEST_CASE("ties weights follow input order", "[merge][ties]", float, double) {
  // The base is model 2. Deltas: model 1 (1, 2) with weight 1, model 3
  // (-1, 4) with weight 3. The base's weight 5 is ignored.
  const Inputs<TestType> inputs({2}, {{11, 12}, {10, 10}, {9, 14}});
  cki::TiesParams params;
  params.density = 1;
  params.weights = {1, 5, 3};
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs, /*base=*/1);
  INFO("element 0: 1 * 1 + 3 * (-1) < 0 elects -, so only model 3's -1 counts");
  CHECK(merged[0] == Approx(9.0));
  INFO("element 1: 10 + (1 * 2 + 3 * 4) / (1 + 3)");
  CHECK(merged[1] == Approx(13.5));
  CHECK(merged.report.notes["kept"] == nlohmann::json({2, nullptr, 2}));
}

TEMPLATE_TEST_CASE("ties density 1 keeps every delta", "[merge][ties]", float, double) {
  const Inputs<TestType> inputs({4}, {{0, 0, 0, 0}, {0.5, -3, 1, 2}, {-1, 2, 4, 0.1}});
  cki::TiesParams params;
  params.density = 1;
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  const std::vector<double> expected{-1, -3, 2.5, 1.05};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i);
    CHECK(merged[i] == Approx(expected[i]).epsilon(tolerance<TestType>()));
  }
}

TEMPLATE_TEST_CASE("ties density 0 returns the base", "[merge][ties]", float, double) {
  const Inputs<TestType> inputs({4}, {{0.25, -1, 7, 0}, {0.5, -3, 1, 2}, {-1, 2, 4, 0.1}});
  cki::TiesParams params;
  params.density = 0;
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  for (std::size_t i = 0; i < 4; ++i) {
    INFO("element " << i);
    CHECK(merged.values[i] == inputs.tensors[0][static_cast<std::int64_t>(i)]);
  }
  CHECK(merged.report.notes["kept"] == nlohmann::json({nullptr, 0, 0}));
}

TEMPLATE_TEST_CASE("ties zero sum elects positive", "[merge][ties]", float, double) {
  const Inputs<TestType> inputs({1}, {{10}, {8}, {12}});
  cki::TiesParams params;
  params.density = 1;
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  INFO("deltas -2 and +2 sum to 0, which counts as positive");
  CHECK(merged[0] == Approx(12.0));
}

TEMPLATE_TEST_CASE("ties threshold ties go to lower index", "[merge][ties]", float, double) {
  const Inputs<TestType> inputs({5}, {{0, 0, 0, 0, 0}, {1, -1, 3, 1, -1}});
  cki::TiesParams params;
  params.density = 0.6;
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  INFO("keep 3: the 3, then the first two of the four tied magnitudes");
  const std::vector<double> expected{1, -1, 3, 0, 0};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i);
    CHECK(merged[i] == expected[i]);
  }
}

TEMPLATE_TEST_CASE("ties threshold ties across blocks", "[merge][ties]", float, double) {
  // 10,000 equal magnitudes span three blocks; the first 5,000 are kept
  // whatever the thread count.
  const std::int64_t numel = 10000;
  std::vector<double> base(numel, 0.0), model(numel);
  for (std::int64_t i = 0; i < numel; ++i) model[static_cast<std::size_t>(i)] = i % 3 == 0 ? -0.5 : 0.5;
  const Inputs<TestType> inputs({numel}, {base, model});
  cki::TiesParams params;
  params.density = 0.5;
  const auto one = merge_tensor(cki::TiesPolicy<TestType>(params), inputs, 0, 1);
  const auto two = merge_tensor(cki::TiesPolicy<TestType>(params), inputs, 0, 2);
  CHECK(bit_identical(one.values, two.values));
  std::int64_t first_zero = -1;
  std::int64_t nonzero = 0;
  for (std::int64_t i = 0; i < numel; ++i) {
    if (one.values[static_cast<std::size_t>(i)] != 0) ++nonzero;
    if (one.values[static_cast<std::size_t>(i)] == 0 && first_zero < 0) first_zero = i;
  }
  CHECK(nonzero == 5000);
  CHECK(first_zero == 5000);
}

TEMPLATE_TEST_CASE("ties keeps floor of density times count", "[merge][ties]", float, double) {
  std::vector<double> base(100, 0.0), model(100);
  for (std::size_t i = 0; i < 100; ++i) model[i] = static_cast<double>(i + 1) / 100.0;
  const Inputs<TestType> inputs({10, 10}, {base, model});
  cki::TiesParams params;
  params.density = 0.29;
  const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
  INFO(merged.report.notes.dump());
  CHECK(merged.report.notes["kept"][1] == 29);
  CHECK(merged[70] == 0.0);
  CHECK(merged[71] == Approx(0.72));
}

TEMPLATE_TEST_CASE("ties constant and all-zero deltas", "[merge][ties]", float, double) {
  const Inputs<TestType> inputs({3}, {{0.5, 0.5, 0.5}, {0.5, 0.5, 0.5}, {0.5, 0.5, 0.5}});
  for (double density : {0.0, 0.5, 1.0}) {
    cki::TiesParams params;
    params.density = density;
    const auto merged = merge_tensor(cki::TiesPolicy<TestType>(params), inputs);
    for (std::size_t i = 0; i < 3; ++i) {
      INFO("density " << density << ", element " << i);
      CHECK(merged[i] == 0.5);
    }
  }
}

// ---------------------------------------------------- ties, model scope

TEMPLATE_TEST_CASE("ties model scope hand-derived", "[merge][ties]", float, double) {
  cki::WeightSet<TestType> base("base"), model("model");
  base.add("a", make_tensor<TestType>({2}, {0, 0}));
  base.add("b", make_tensor<TestType>({3}, {0, 0, 0}));
  model.add("a", make_tensor<TestType>({2}, {4, 1}));
  model.add("b", make_tensor<TestType>({3}, {3, 2, 0.5}));
  const std::vector<cki::WeightSet<TestType>> sets{base, model};

  cki::TiesParams params;
  params.density = 0.4;
  params.scope = cki::TiesScope::model;
  const auto thresholds = cki::ties_model_thresholds(sets, params.density);
  INFO("5 deltas, keep 2: magnitudes 4 and 3");
  CHECK(thresholds->keep_count == 2);
  CHECK(thresholds->threshold[1] == 3.0);

  const auto model_scope = cki::splice(sets, cki::TiesPolicy<TestType>(params, thresholds));
  CHECK(model_scope.merged.view("a")[0] == 4);
  CHECK(model_scope.merged.view("a")[1] == 0);
  CHECK(model_scope.merged.view("b")[0] == 3);
  CHECK(model_scope.merged.view("b")[1] == 0);

  params.scope = cki::TiesScope::tensor;
  const auto tensor_scope = cki::splice(sets, cki::TiesPolicy<TestType>(params));
  INFO("per tensor, 'a' keeps floor(0.8) = 0 and 'b' keeps floor(1.2) = 1");
  CHECK(tensor_scope.merged.view("a")[0] == 0);
  CHECK(tensor_scope.merged.view("b")[0] == 3);
}

TEMPLATE_TEST_CASE("ties model scope ties go to earlier tensor", "[merge][ties]", float, double) {
  cki::WeightSet<TestType> base("base"), model("model");
  base.add("a", make_tensor<TestType>({2}, {0, 0}));
  base.add("b", make_tensor<TestType>({3}, {0, 0, 0}));
  model.add("a", make_tensor<TestType>({2}, {1, -1}));
  model.add("b", make_tensor<TestType>({3}, {1, 1, -1}));
  const std::vector<cki::WeightSet<TestType>> sets{base, model};
  cki::TiesParams params;
  params.density = 0.6;
  params.scope = cki::TiesScope::model;
  const auto thresholds = cki::ties_model_thresholds(sets, params.density);
  CHECK_FALSE(thresholds->keeps_all_ties[1]);
  CHECK(thresholds->tied_keep.at("a")[1] == 2);
  CHECK(thresholds->tied_keep.at("b")[1] == 1);

  const auto result = cki::splice(sets, cki::TiesPolicy<TestType>(params, thresholds));
  const std::vector<double> a{1, -1}, b{1, 0, 0};
  for (std::int64_t i = 0; i < 2; ++i) CHECK(result.merged.view("a")[i] == a[static_cast<std::size_t>(i)]);
  for (std::int64_t i = 0; i < 3; ++i) {
    INFO("element " << i << " of 'b'");
    CHECK(result.merged.view("b")[i] == b[static_cast<std::size_t>(i)]);
  }
}

TEMPLATE_TEST_CASE("ties model scope matches a full sort", "[merge][ties]", float, double) {
  // Several tensors, one larger than the parallel counting threshold. The
  // magnitudes repeat, so the tie pass runs. The prepass must equal a sort
  // of all deltas for 1 and 2 threads.
  std::mt19937 generator(7);
  std::uniform_int_distribution<int> level(-40, 40);
  const std::vector<std::pair<std::string, std::int64_t>> shapes{{"a", 300}, {"b", 70000}, {"c", 5}};
  std::vector<cki::WeightSet<TestType>> sets(3);
  for (std::size_t k = 0; k < 3; ++k) {
    for (const auto& [name, numel] : shapes) {
      std::vector<double> values(static_cast<std::size_t>(numel));
      for (auto& value : values) value = k == 0 ? 0.0 : level(generator) / 16.0;
      sets[k].add(name, make_tensor<TestType>({numel}, values));
    }
  }
  const double density = 0.37;
  std::int64_t total = 0;
  for (const auto& shape : shapes) total += shape.second;
  const std::int64_t keep = cki::trim_keep_count(density, total);

  cki::SpliceOptions one_thread;
  one_thread.threads = 1;
  cki::SpliceOptions two_threads;
  two_threads.threads = 2;
  const auto thresholds = cki::ties_model_thresholds(sets, density, one_thread);
  const auto thresholds_two = cki::ties_model_thresholds(sets, density, two_threads);
  for (std::size_t k = 1; k < 3; ++k) {
    std::vector<double> magnitudes;
    for (const auto& shape : shapes) {
      const auto view = sets[k].view(shape.first);
      for (std::int64_t i = 0; i < view.size(); ++i) magnitudes.push_back(std::abs(static_cast<double>(view[i])));
    }
    std::sort(magnitudes.begin(), magnitudes.end(), std::greater<double>());
    INFO("model " << k);
    CHECK(thresholds->threshold[k] == magnitudes[static_cast<std::size_t>(keep - 1)]);
    CHECK(thresholds_two->threshold[k] == thresholds->threshold[k]);
    for (const auto& shape : shapes) {
      CHECK(thresholds_two->tied_keep.at(shape.first)[k] == thresholds->tied_keep.at(shape.first)[k]);
    }
  }

  // The merge keeps exactly `keep` deltas per model over the whole model.
  cki::TiesParams params;
  params.density = density;
  params.scope = cki::TiesScope::model;
  const auto one = cki::splice(sets, cki::TiesPolicy<TestType>(params, thresholds), one_thread);
  const auto two = cki::splice(sets, cki::TiesPolicy<TestType>(params, thresholds), two_threads);
  for (std::size_t k = 1; k < 3; ++k) {
    std::int64_t kept = 0;
    for (const auto& tensor : one.report.tensors) kept += tensor.notes["kept"][k].template get<std::int64_t>();
    INFO("model " << k);
    CHECK(kept == keep);
  }
  for (const auto& shape : shapes) {
    const auto a = one.merged.view(shape.first);
    const auto b = two.merged.view(shape.first);
    INFO("tensor " << shape.first);
    CHECK(std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(TestType)) == 0);
  }
}

TEST_CASE("ties model scope skips copied tensors", "[merge][ties]") {
  std::vector<cki::WeightSet<float>> sets(3);
  const std::vector<std::vector<double>> a{{0, 0}, {1, 2}, {2, 1}};
  const std::vector<std::vector<double>> c{{0, 0}, {1, 1}, {NAN, 1}};
  for (std::size_t k = 0; k < 3; ++k) {
    sets[k].add("a", make_tensor<float>({2}, a[k]));
    sets[k].add("c", make_tensor<float>({2}, c[k]));
  }
  cki::SpliceOptions options;
  options.nan_policy = cki::NanPolicy::copy_base;
  const auto thresholds = cki::ties_model_thresholds(sets, 0.5, options);
  CHECK(thresholds->tied_keep.count("a") == 1);
  CHECK(thresholds->tied_keep.count("c") == 0);
  CHECK(thresholds->total_count == 2);

  cki::TiesParams params;
  params.density = 0.5;
  params.scope = cki::TiesScope::model;
  const auto result = cki::splice(sets, cki::TiesPolicy<float>(params, thresholds), options);
  CHECK(result.report.tensors[0].spliced);
  CHECK_FALSE(result.report.tensors[1].spliced);
  CHECK(result.merged.view("a")[0] == Approx(2.0));
  CHECK(result.merged.view("a")[1] == Approx(2.0));

  CHECK_THROWS_AS(cki::ties_model_thresholds(sets, 0.5), cki::NumericError);
}

TEST_CASE("ties model scope misuse errors", "[merge][ties]") {
  cki::TiesModelScope<float> scope(0.5, 2);
  const Inputs<float> first({2}, {{0, 0}, {1, 2}});
  const Inputs<float> second({2}, {{0, 0}, {3, 4}});
  CHECK_THROWS_AS(scope.thresholds(), std::logic_error);
  scope.add_tensor("a", first.views());
  scope.add_tensor("b", second.views());
  CHECK_THROWS_WITH(scope.add_tensor("a", first.views()), Contains("added twice"));
  scope.end_pass();
  CHECK(scope.needs_pass());
  CHECK_THROWS_WITH(scope.add_tensor("b", second.views()), Contains("same order every pass"));
  CHECK_THROWS_WITH(cki::TiesModelScope<float>(1.5, 2), Contains("'density' must be in [0, 1], got 1.5"));
  CHECK_THROWS_WITH(cki::TiesModelScope<float>(0.5, 2, 2), Contains("'base' must be in [0, 2), got 2"));

  const Inputs<float> wrong({3}, {{0, 0, 0}, {1, 2, 3}});
  cki::TiesModelScope<float> other(0.5, 2);
  other.add_tensor("a", first.views());
  CHECK_THROWS_AS(other.add_tensor("c", {first.views()[0], wrong.views()[1]}), cki::MismatchError);
}

TEST_CASE("ties model scope thresholds must fit", "[merge][ties]") {
  cki::WeightSet<float> base("base"), model("model");
  base.add("a", make_tensor<float>({2}, {0, 0}));
  model.add("a", make_tensor<float>({2}, {1, 2}));
  const std::vector<cki::WeightSet<float>> sets{base, model};
  const auto thresholds = cki::ties_model_thresholds(sets, 0.5);

  cki::TiesParams params;
  params.scope = cki::TiesScope::model;
  params.density = 0.5;
  CHECK_THROWS_WITH(cki::TiesPolicy<float>(params).check(2), Contains("needs whole-model thresholds"));
  CHECK_THROWS_WITH(cki::TiesPolicy<float>(params, thresholds).check(3), Contains("computed for 2 models"));
  params.density = 0.6;
  CHECK_THROWS_WITH(cki::TiesPolicy<float>(params, thresholds).check(2), Contains("density 0.5"));
  params.density = 0.5;
  CHECK_THROWS_WITH(cki::TiesPolicy<double>(params, thresholds).check(2), Contains("computed in float"));

  const Inputs<float> inputs({2}, {{0, 0}, {1, 2}});
  std::vector<float> out(2);
  CHECK_THROWS_WITH(cki::splice_tensor("missing", inputs.views(), 0, cki::TiesPolicy<float>(params, thresholds),
                                       out.data()),
                    Contains("was not in the whole-model TIES prepass"));
  CHECK_THROWS_WITH(cki::splice_tensor("a", inputs.views(), 1, cki::TiesPolicy<float>(params, thresholds),
                                       out.data()),
                    Contains("as the base"));
}

// ------------------------------------------------------------------ dare

TEMPLATE_TEST_CASE("dare matches the counter generator", "[merge][dare]", float, double) {
  const std::int64_t numel = 64;
  auto models = random_models<TestType>(3, numel, 11);
  const Inputs<TestType> inputs({8, 8}, models);
  cki::DareParams params;
  params.drop_rate = 0.5;
  params.seed = 42;
  params.weights = {0, 1, 0.5};
  params.lambda = 0.8;
  const auto merged = merge_tensor(cki::DarePolicy<TestType>(params), inputs, 0, 1, "dense.weight");

  // Expected value from the documented draw: entry i of model k is kept
  // when CounterGenerator(seed, k, name).uniform(i) >= p.
  const cki::CounterGenerator first(42, 1, "dense.weight");
  const cki::CounterGenerator second(42, 2, "dense.weight");
  std::int64_t kept_first = 0;
  for (std::int64_t i = 0; i < numel; ++i) {
    const auto index = static_cast<std::size_t>(i);
    const double base = static_cast<TestType>(models[0][index]);
    const double delta1 = static_cast<TestType>(models[1][index]) - base;
    const double delta2 = static_cast<TestType>(models[2][index]) - base;
    const bool keep1 = first.uniform(i) >= 0.5;
    const bool keep2 = second.uniform(i) >= 0.5;
    kept_first += keep1 ? 1 : 0;
    const double expected = base + 0.8 * (1.0 * (keep1 ? 2 * delta1 : 0.0) + 0.5 * (keep2 ? 2 * delta2 : 0.0));
    INFO("element " << i);
    CHECK(merged[index] == Approx(expected).margin(1e-6));
  }
  CHECK(merged.report.notes["kept"][1] == kept_first);
}

TEMPLATE_TEST_CASE("dare draws keyed by input index", "[merge][dare]", float, double) {
  // The base is model 2, so the fine-tunes' input indices (0 and 2) differ
  // from their positions after the base (1 and 2).
  const std::int64_t numel = 64;
  auto models = random_models<TestType>(3, numel, 13);
  const Inputs<TestType> inputs({numel}, models);
  cki::DareParams params;
  params.drop_rate = 0.5;
  params.seed = 42;
  params.weights = {0.5, 7, 1};
  const auto merged = merge_tensor(cki::DarePolicy<TestType>(params), inputs, /*base=*/1, 1, "dense.weight");

  const cki::CounterGenerator first(42, 0, "dense.weight");
  const cki::CounterGenerator third(42, 2, "dense.weight");
  std::int64_t kept_first = 0;
  std::int64_t kept_third = 0;
  for (std::int64_t i = 0; i < numel; ++i) {
    const auto index = static_cast<std::size_t>(i);
    const double base = static_cast<TestType>(models[1][index]);
    const double delta1 = static_cast<TestType>(models[0][index]) - base;
    const double delta3 = static_cast<TestType>(models[2][index]) - base;
    const bool keep1 = first.uniform(i) >= 0.5;
    const bool keep3 = third.uniform(i) >= 0.5;
    kept_first += keep1 ? 1 : 0;
    kept_third += keep3 ? 1 : 0;
    const double expected = base + 0.5 * (keep1 ? 2 * delta1 : 0.0) + 1.0 * (keep3 ? 2 * delta3 : 0.0);
    INFO("element " << i);
    CHECK(merged[index] == Approx(expected).margin(1e-6));
  }
  CHECK(merged.report.notes["kept"][0] == kept_first);
  CHECK(merged.report.notes["kept"][1] == nullptr);
  CHECK(merged.report.notes["kept"][2] == kept_third);
}

TEMPLATE_TEST_CASE("dare bit-identical for 1 and 2 threads", "[merge][dare]", float, double) {
  const Inputs<TestType> inputs({100, 500}, random_models<TestType>(3, 50000, 3));
  cki::DareParams params;
  params.drop_rate = 0.9;
  params.seed = 1234;
  const auto one = merge_tensor(cki::DarePolicy<TestType>(params), inputs, 0, 1);
  const auto two = merge_tensor(cki::DarePolicy<TestType>(params), inputs, 0, 2);
  const auto again = merge_tensor(cki::DarePolicy<TestType>(params), inputs, 0, 2);
  CHECK(bit_identical(one.values, two.values));
  CHECK(bit_identical(two.values, again.values));

  const auto ties_one = merge_tensor(cki::DareTiesPolicy<TestType>(params), inputs, 0, 1);
  const auto ties_two = merge_tensor(cki::DareTiesPolicy<TestType>(params), inputs, 0, 2);
  CHECK(bit_identical(ties_one.values, ties_two.values));

  params.seed = 1235;
  const auto reseeded = merge_tensor(cki::DarePolicy<TestType>(params), inputs, 0, 1);
  CHECK_FALSE(bit_identical(one.values, reseeded.values));
}

TEMPLATE_TEST_CASE("dare preserves the mean", "[merge][dare]", float, double) {
  // Every delta is 1, so each output is 0 or 1 / (1 - p). The mean of n
  // outputs has standard deviation sqrt(p (1 - p) / n) / (1 - p), about
  // 0.0034 here, and the bound is six times that.
  const std::int64_t numel = 200000;
  const Inputs<TestType> inputs({numel}, {std::vector<double>(numel, 0.0), std::vector<double>(numel, 1.0)});
  cki::DareParams params;
  params.drop_rate = 0.7;
  params.seed = 99;
  const auto merged = merge_tensor(cki::DarePolicy<TestType>(params), inputs);
  double sum = 0;
  for (TestType value : merged.values) sum += static_cast<double>(value);
  const double mean = sum / static_cast<double>(numel);
  INFO("mean " << mean);
  CHECK(std::abs(mean - 1.0) < 0.02);
  const double kept_share = merged.report.notes["kept"][1].template get<double>() / static_cast<double>(numel);
  CHECK(std::abs(kept_share - 0.3) < 0.006);
}

TEMPLATE_TEST_CASE("dare drop rate 0 is task arithmetic", "[merge][dare]", float, double) {
  const Inputs<TestType> inputs({40}, random_models<TestType>(3, 40, 5));
  cki::DareParams params;
  params.drop_rate = 0;
  params.lambda = 1.5;
  cki::TaskArithmeticParams arithmetic;
  arithmetic.lambda = 1.5;
  const auto dare = merge_tensor(cki::DarePolicy<TestType>(params), inputs);
  const auto reference = merge_tensor(cki::TaskArithmeticPolicy<TestType>(arithmetic), inputs);
  for (std::size_t i = 0; i < 40; ++i) {
    INFO("element " << i);
    CHECK(dare[i] == Approx(reference[i]).margin(tolerance<TestType>()));
  }

  cki::TiesParams ties;
  ties.density = 1;
  ties.lambda = 1.5;
  const auto dare_ties = merge_tensor(cki::DareTiesPolicy<TestType>(params), inputs);
  const auto ties_reference = merge_tensor(cki::TiesPolicy<TestType>(ties), inputs);
  INFO("dare-ties at p = 0 runs TIES's election on the same deltas");
  CHECK(bit_identical(dare_ties.values, ties_reference.values));
}

TEMPLATE_TEST_CASE("dare-ties elects signs of rescaled deltas", "[merge][dare]", float, double) {
  const Inputs<TestType> inputs({1}, {{0}, {-1}, {3}});
  cki::DareParams params;
  params.drop_rate = 0;
  const auto merged = merge_tensor(cki::DareTiesPolicy<TestType>(params), inputs);
  CHECK(merged[0] == Approx(3.0));
}

TEMPLATE_TEST_CASE("dare all-zero deltas return the base", "[merge][dare]", float, double) {
  const Inputs<TestType> inputs({3}, {{1, 2, 3}, {1, 2, 3}, {1, 2, 3}});
  cki::DareParams params;
  params.drop_rate = 0.5;
  const auto merged = merge_tensor(cki::DarePolicy<TestType>(params), inputs);
  const auto ties = merge_tensor(cki::DareTiesPolicy<TestType>(params), inputs);
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("element " << i);
    CHECK(merged.values[i] == inputs.tensors[0][static_cast<std::int64_t>(i)]);
    CHECK(ties.values[i] == inputs.tensors[0][static_cast<std::int64_t>(i)]);
  }
}

TEST_CASE("counter generator depends on every key", "[merge][dare]") {
  const cki::CounterGenerator reference(1, 2, "w");
  CHECK(reference.bits(5) == cki::CounterGenerator(1, 2, "w").bits(5));
  CHECK(reference.bits(5) != cki::CounterGenerator(2, 2, "w").bits(5));
  CHECK(reference.bits(5) != cki::CounterGenerator(1, 3, "w").bits(5));
  CHECK(reference.bits(5) != cki::CounterGenerator(1, 2, "v").bits(5));
  CHECK(reference.bits(5) != reference.bits(6));
  for (std::int64_t i = 0; i < 1000; ++i) {
    const double u = reference.uniform(i);
    INFO("draw " << i);
    CHECK(u >= 0.0);
    CHECK(u < 1.0);
  }
}

TEST_CASE("counter generator published test vectors", "[merge][dare]") {
  // SplitMix64 seeded with 1234567: the first five outputs as published on
  // Rosetta Code ("Pseudo-random numbers/Splitmix64"). Output i is
  // mix64(seed + i * 0x9E3779B97F4A7C15).
  const std::uint64_t splitmix[] = {6457827717110365317ULL, 3203168211198807973ULL, 9817491932198370423ULL,
                                    4593380528125082431ULL, 16408922859458223821ULL};
  for (std::uint64_t i = 1; i <= 5; ++i) {
    INFO("output " << i);
    CHECK(cki::detail::mix64(1234567ULL + i * cki::detail::kSplitMixIncrement) == splitmix[i - 1]);
  }

  // FNV-1a, 64 bits: the offset basis and the published hashes of "a" and "foobar".
  CHECK(cki::detail::fnv1a64("") == 0xCBF29CE484222325ULL);
  CHECK(cki::detail::fnv1a64("a") == 0xAF63DC4C8601EC8CULL);
  CHECK(cki::detail::fnv1a64("foobar") == 0x85944171F73967E8ULL);

  // A draw composed from those pieces as documented: the key mixes the
  // seed, then (model index + 1) times the increment, then the name's hash,
  // and draw i is the (i + 1)-th SplitMix64 output from the key.
  const std::uint64_t increment = cki::detail::kSplitMixIncrement;
  std::uint64_t key = cki::detail::mix64(9 + increment);
  key = cki::detail::mix64(key ^ (3 + 1) * increment);
  key = cki::detail::mix64(key ^ 0x85944171F73967E8ULL);
  CHECK(cki::CounterGenerator(9, 3, "foobar").bits(5) == cki::detail::mix64(key + 6 * increment));
}

TEST_CASE("counter generator integer threshold", "[merge][dare]") {
  const cki::CounterGenerator generator(3, 1, "w");
  for (double p : {0.0, 1e-9, 0.25, 0.5, 0.7, 0.9, 0.999999}) {
    const std::uint64_t threshold = cki::CounterGenerator::uniform_threshold(p);
    std::int64_t mismatches = 0;
    for (std::int64_t i = 0; i < 20000; ++i) {
      mismatches += generator.uniform_at_least(i, threshold) != (generator.uniform(i) >= p) ? 1 : 0;
    }
    INFO("p " << p);
    CHECK(mismatches == 0);
  }
  INFO("the draw just below and at the threshold");
  const std::uint64_t threshold = cki::CounterGenerator::uniform_threshold(0.3);
  CHECK(static_cast<double>(threshold) * 0x1.0p-53 >= 0.3);
  CHECK(static_cast<double>(threshold - 1) * 0x1.0p-53 < 0.3);
}

// ----------------------------------------------------------------- slerp

TEMPLATE_TEST_CASE("slerp hand-derived orthogonal", "[merge][slerp]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, 0}, {0, 1}});
  cki::SlerpParams params;
  params.t = 0.5;
  const auto merged = merge_tensor(cki::SlerpPolicy<TestType>(params), inputs);
  INFO("angle pi/2: both coefficients sin(pi/4)");
  CHECK(merged[0] == Approx(std::sqrt(0.5)));
  CHECK(merged[1] == Approx(std::sqrt(0.5)));
  CHECK(merged.report.notes["interpolation"] == "slerp");

  params.t = 1.0 / 3.0;
  const auto third = merge_tensor(cki::SlerpPolicy<TestType>(params), inputs);
  CHECK(third[0] == Approx(std::cos(M_PI / 6)));
  CHECK(third[1] == Approx(std::sin(M_PI / 6)));
}

TEMPLATE_TEST_CASE("slerp endpoints return the inputs", "[merge][slerp]", float, double) {
  const Inputs<TestType> inputs({3}, {{0.3, -0.7, 0.1}, {-0.2, 0.4, 0.9}});
  for (double t : {0.0, 1.0}) {
    cki::SlerpParams params;
    params.t = t;
    const auto merged = merge_tensor(cki::SlerpPolicy<TestType>(params), inputs);
    const auto& expected = inputs.tensors[t == 0.0 ? 0 : 1];
    for (std::size_t i = 0; i < 3; ++i) {
      INFO("t " << t << ", element " << i);
      CHECK(merged.values[i] == expected[static_cast<std::int64_t>(i)]);
    }
  }
}

TEMPLATE_TEST_CASE("slerp near-parallel falls back to linear", "[merge][slerp]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, 0}, {2, 0.001}});
  cki::SlerpParams params;
  params.t = 0.25;
  const auto merged = merge_tensor(cki::SlerpPolicy<TestType>(params), inputs);
  CHECK(merged[0] == Approx(1.25));
  CHECK(merged[1] == Approx(0.00025));
  CHECK(merged.report.notes["interpolation"] == "linear");
  CHECK_THAT(merged.report.notes["fallback"].template get<std::string>(), Contains("near parallel"));

  const Inputs<TestType> opposite({2}, {{1, 0}, {-1, 0}});
  const auto anti = merge_tensor(cki::SlerpPolicy<TestType>(params), opposite);
  CHECK(anti.report.notes["interpolation"] == "linear");
  CHECK(anti[0] == Approx(0.5));
}

TEMPLATE_TEST_CASE("slerp zero norm falls back to linear", "[merge][slerp]", float, double) {
  const Inputs<TestType> inputs({2}, {{0, 0}, {1, 2}});
  const auto merged = merge_tensor(cki::SlerpPolicy<TestType>(), inputs);
  CHECK(merged[0] == Approx(0.5));
  CHECK(merged[1] == Approx(1.0));
  CHECK_THAT(merged.report.notes["fallback"].template get<std::string>(), Contains("zero norm"));
}

TEMPLATE_TEST_CASE("slerp constant tensors", "[merge][slerp]", float, double) {
  const Inputs<TestType> inputs({4}, {{0.5, 0.5, 0.5, 0.5}, {0.5, 0.5, 0.5, 0.5}});
  const auto merged = merge_tensor(cki::SlerpPolicy<TestType>(), inputs);
  for (std::size_t i = 0; i < 4; ++i) {
    INFO("element " << i);
    CHECK(merged[i] == Approx(0.5));
  }
}

// ----------------------------------------------------------- model stock

TEMPLATE_TEST_CASE("model stock hand-derived", "[merge][model-stock]", float, double) {
  // Deltas (1, 0) and (1, 1) from base (1, 1): cos = 1 / sqrt(2),
  // t = 2 cos / (1 + cos).
  const Inputs<TestType> inputs({2}, {{1, 1}, {2, 1}, {2, 2}});
  const auto merged = merge_tensor(cki::ModelStockPolicy<TestType>(), inputs);
  const double cosine = 1.0 / std::sqrt(2.0);
  const double t = 2 * cosine / (1 + cosine);
  INFO(merged.report.notes.dump());
  CHECK(merged[0] == Approx(t * 2.0 + (1 - t) * 1.0));
  CHECK(merged[1] == Approx(t * 1.5 + (1 - t) * 1.0));
  CHECK(merged.report.notes["t"].template get<double>() == Approx(t));
  CHECK(*merged.report.models[0].mean_weight == Approx(1 - t));
}

TEMPLATE_TEST_CASE("model stock orthogonal deltas keep the base", "[merge][model-stock]", float, double) {
  const Inputs<TestType> inputs({2}, {{0.5, -0.5}, {1.5, -0.5}, {0.5, 0.5}});
  const auto merged = merge_tensor(cki::ModelStockPolicy<TestType>(), inputs);
  INFO("cos = 0 gives t = 0");
  CHECK(merged[0] == Approx(0.5));
  CHECK(merged[1] == Approx(-0.5));
}

TEMPLATE_TEST_CASE("model stock anti-parallel falls back", "[merge][model-stock]", float, double) {
  const Inputs<TestType> inputs({2}, {{0, 0}, {1, 2}, {-1, -2}});
  const auto merged = merge_tensor(cki::ModelStockPolicy<TestType>(), inputs);
  INFO(merged.report.notes.dump());
  CHECK_THAT(merged.report.notes["fallback"].template get<std::string>(), Contains("plain mean of the fine-tunes"));
  CHECK(merged[0] == Approx(0.0).margin(1e-12));
  CHECK(merged[1] == Approx(0.0).margin(1e-12));
}

TEMPLATE_TEST_CASE("model stock zero delta falls back", "[merge][model-stock]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, 1}, {1, 1}, {3, 5}});
  const auto merged = merge_tensor(cki::ModelStockPolicy<TestType>(), inputs);
  CHECK_THAT(merged.report.notes["fallback"].template get<std::string>(), Contains("delta of model 2 is zero"));
  CHECK(merged[0] == Approx(2.0));
  CHECK(merged[1] == Approx(3.0));
}

TEMPLATE_TEST_CASE("model stock with another base", "[merge][model-stock]", float, double) {
  // The hand-derived case above with the base as model 3.
  const Inputs<TestType> inputs({2}, {{2, 1}, {2, 2}, {1, 1}});
  const auto merged = merge_tensor(cki::ModelStockPolicy<TestType>(), inputs, /*base=*/2);
  const double cosine = 1.0 / std::sqrt(2.0);
  const double t = 2 * cosine / (1 + cosine);
  CHECK(merged[0] == Approx(t * 2.0 + (1 - t) * 1.0));
  CHECK(merged[1] == Approx(t * 1.5 + (1 - t) * 1.0));
  CHECK(*merged.report.models[2].mean_weight == Approx(1 - t));
  CHECK(*merged.report.models[0].mean_weight == Approx(t / 2));

  const Inputs<TestType> zero({2}, {{1, 1}, {3, 5}, {1, 1}});
  const auto fallback = merge_tensor(cki::ModelStockPolicy<TestType>(), zero, /*base=*/2);
  INFO(fallback.report.notes.dump());
  CHECK_THAT(fallback.report.notes["fallback"].template get<std::string>(), Contains("delta of model 1 is zero"));
  CHECK(fallback[0] == Approx(2.0));
  CHECK(fallback[1] == Approx(3.0));
}

TEMPLATE_TEST_CASE("model stock three fine-tunes", "[merge][model-stock]", float, double) {
  // Pairwise cosines of (1, 0, 0), (1, 1, 0), (0, 1, 0): 1/sqrt(2), 0, 1/sqrt(2).
  const Inputs<TestType> inputs({3}, {{0, 0, 0}, {1, 0, 0}, {1, 1, 0}, {0, 1, 0}});
  const auto merged = merge_tensor(cki::ModelStockPolicy<TestType>(), inputs);
  const double cosine = (2.0 / std::sqrt(2.0)) / 3.0;
  const double t = 3 * cosine / (1 + 2 * cosine);
  CHECK(merged[0] == Approx(t * 2.0 / 3.0));
  CHECK(merged[1] == Approx(t * 2.0 / 3.0));
  CHECK(merged[2] == Approx(0.0).margin(1e-12));
}

// ---------------------------------------------------------------- fisher

TEMPLATE_TEST_CASE("fisher hand-derived", "[merge][fisher]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, 2}, {3, 4}});
  cki::FisherParams params;
  const cki::FisherPolicy<TestType> policy(params, fisher_source<TestType>({2}, {{1, 0}, {3, 1}}));
  const auto merged = merge_tensor(policy, inputs);
  INFO("element 1: the zero Fisher value is floored to 1e-6");
  CHECK(merged[0] == Approx(2.5));
  CHECK(merged[1] == Approx((1e-6 * 2 + 4) / (1 + 1e-6)).epsilon(tolerance<TestType>()));
  CHECK(*merged.report.models[0].mean_weight == Approx((0.25 + 1e-6 / (1 + 1e-6)) / 2));
}

TEMPLATE_TEST_CASE("fisher weights and base follow input order", "[merge][fisher]", float, double) {
  const Inputs<TestType> inputs({1}, {{1}, {3}, {10}});
  cki::FisherParams params;
  params.weights = {2, 1, 0};
  const cki::FisherPolicy<TestType> policy(params, fisher_source<TestType>({1}, {{1}, {4}, {5}}));
  const auto merged = merge_tensor(policy, inputs, /*base=*/2);
  INFO("(2 * 1 * 1 + 1 * 4 * 3) / (2 * 1 + 1 * 4)");
  CHECK(merged[0] == Approx(14.0 / 6.0));
}

TEMPLATE_TEST_CASE("fisher from weight sets", "[merge][fisher]", float, double) {
  std::vector<cki::WeightSet<TestType>> models(2), fishers(2);
  models[0].add("w", make_tensor<TestType>({2}, {0, 0}));
  models[1].add("w", make_tensor<TestType>({2}, {1, 1}));
  fishers[0].add("w", make_tensor<TestType>({2}, {1, 3}));
  fishers[1].add("w", make_tensor<TestType>({2}, {3, 1}));
  const auto result =
      cki::splice(models, cki::FisherPolicy<TestType>(cki::FisherParams{}, cki::fisher_from_weight_sets(fishers)));
  CHECK(result.merged.view("w")[0] == Approx(0.75));
  CHECK(result.merged.view("w")[1] == Approx(0.25));
}

TEMPLATE_TEST_CASE("fisher rejects bad Fisher tensors", "[merge][fisher]", float, double) {
  const Inputs<TestType> inputs({2}, {{1, 2}, {3, 4}});
  const cki::FisherParams params;
  const cki::FisherPolicy<TestType> negative(params, fisher_source<TestType>({2}, {{1, 1}, {1, -0.5}}));
  CHECK_THROWS_WITH(merge_tensor(negative, inputs), Contains("contains -0.5 at index 1"));
  const cki::FisherPolicy<TestType> not_finite(params, fisher_source<TestType>({2}, {{NAN, 1}, {1, 1}}));
  CHECK_THROWS_AS(merge_tensor(not_finite, inputs), cki::NumericError);
  const cki::FisherPolicy<TestType> wrong_shape(params, fisher_source<TestType>({1}, {{1}, {1}}));
  CHECK_THROWS_AS(merge_tensor(wrong_shape, inputs), cki::MismatchError);
  const cki::FisherPolicy<TestType> too_few(params, fisher_source<TestType>({2}, {{1, 1}}));
  CHECK_THROWS_WITH(merge_tensor(too_few, inputs), Contains("expected one per model (2)"));
}

TEMPLATE_TEST_CASE("fisher finds bad value in later block", "[merge][fisher]", float, double) {
  // 10000 elements span three blocks. Model 2's Fisher tensor contains
  // infinity at 9000 and -1 at 9500, in the last block: the error names the
  // first of them.
  const std::size_t count = 10000;
  const std::vector<std::vector<double>> values(2, std::vector<double>(count, 0.5));
  std::vector<std::vector<double>> fisher(2, std::vector<double>(count, 1.0));
  fisher[1][9000] = std::numeric_limits<double>::infinity();
  fisher[1][9500] = -1.0;
  const Inputs<TestType> inputs({static_cast<std::int64_t>(count)}, values);
  const cki::FisherPolicy<TestType> policy(cki::FisherParams{}, fisher_source<TestType>({10000}, fisher));
  CHECK_THROWS_WITH(merge_tensor(policy, inputs), Contains("for model 2 contains inf at index 9000"));
}

// ----------------------------------------------------------------- prune

TEMPLATE_TEST_CASE("prune hand-derived", "[merge][prune]", float, double) {
  const Inputs<TestType> inputs({4}, {{0.01, -0.02, 0.03, -0.5}, {9, 9, 9, 9}});
  const auto merged = merge_tensor(cki::PrunePolicy<TestType>(), inputs);
  const std::vector<double> expected{0, 0, 0.03, -0.5};
  for (std::size_t i = 0; i < 4; ++i) {
    INFO("element " << i);
    CHECK(merged[i] == Approx(expected[i]));
  }
  CHECK(merged.report.notes["pruned"] == 2);
  CHECK(*merged.report.models[0].mean_weight == Approx(0.5));
  CHECK(*merged.report.models[1].mean_weight == 0.0);
}

TEMPLATE_TEST_CASE("prune one tensor directly", "[merge][prune]", float, double) {
  const auto tensor = make_tensor<TestType>({3}, {0.5, -0.1, 0.2});
  std::vector<TestType> out(3);
  CHECK(cki::magnitude_prune(tensor.view(), 0.2, out.data()) == 2);
  CHECK(out[0] == TestType(0.5));
  CHECK(out[1] == 0);
  CHECK(out[2] == 0);
}

// ------------------------------------------------------ shared behaviour

TEMPLATE_TEST_CASE("every method bit-identical across threads", "[merge]", float, double) {
  const std::int64_t numel = 30000;
  const Inputs<TestType> three({150, 200}, random_models<TestType>(3, numel, 21));
  const Inputs<TestType> two({150, 200}, random_models<TestType>(2, numel, 22));
  cki::MergeResources<TestType> resources;
  auto fisher_values = random_models<TestType>(3, numel, 23);
  for (auto& model : fisher_values) {
    for (auto& value : model) value = std::abs(value);
  }
  resources.fisher = fisher_source<TestType>({150, 200}, fisher_values);
  for (const auto& method : cki::merge_method_names()) {
    const auto policy = cki::make_merge_policy<TestType>(method, {}, resources);
    const Inputs<TestType>& inputs = method == "slerp" ? two : three;
    const auto one = merge_tensor(policy, inputs, 1, 1);
    const auto both = merge_tensor(policy, inputs, 1, 2);
    INFO("method " << method);
    CHECK(bit_identical(one.values, both.values));
    CHECK(one.report.spliced);
    CHECK(cki::to_json(one.report).dump() == cki::to_json(both.report).dump());
  }
}

TEMPLATE_TEST_CASE("every method handles an empty tensor", "[merge]", float, double) {
  std::vector<cki::TensorView<TestType>> views(3, cki::TensorView<TestType>(nullptr, {0, 4}));
  cki::MergeResources<TestType> resources;
  resources.fisher = [](const std::string&) {
    cki::FisherTensors<TestType> tensors;
    tensors.models.assign(3, cki::TensorView<TestType>(nullptr, {0, 4}));
    return tensors;
  };
  cki::TensorContext context;
  context.name = "empty";
  context.shape = {0, 4};
  context.order = {0, 1, 2};
  context.threads = 1;
  for (const auto& method : cki::merge_method_names()) {
    const auto policy = cki::make_merge_policy<TestType>(method, {}, resources);
    const std::size_t n = method == "slerp" ? 2 : 3;
    context.order.resize(n);
    const std::vector<cki::TensorView<TestType>> inputs(views.begin(), views.begin() + static_cast<long>(n));
    INFO("method " << method);
    CHECK_NOTHROW(policy.merge(context, inputs, nullptr));
  }

  // splice() copies empty tensors without calling the policy.
  std::vector<cki::WeightSet<TestType>> sets(3);
  for (auto& set : sets) set.add("empty", cki::Tensor<TestType>({0, 4}));
  const auto result = cki::splice(sets, cki::make_merge_policy<TestType>("average"));
  CHECK(result.report.tensors[0].copy_reason == "empty tensor");
}

TEST_CASE("merge result converts to stats", "[merge]") {
  const auto policy = cki::make_merge_policy<float>("model-stock");
  const Inputs<float> inputs({2}, {{0, 0}, {1, 2}, {-1, -2}});
  cki::TensorContext context;
  context.name = "w";
  context.shape = {2};
  context.order = {0, 1, 2};
  std::vector<float> out(2);
  const std::vector<cki::ModelTensorStats> stats = policy.merge(context, inputs.views(), out.data());
  CHECK(stats.size() == 3);
}

TEST_CASE("report notes reach the JSON report", "[merge]") {
  std::vector<cki::WeightSet<double>> sets(3);
  const std::vector<std::vector<double>> values{{0, 0}, {1, 2}, {-1, -2}};
  for (std::size_t k = 0; k < 3; ++k) sets[k].add("w", make_tensor<double>({2}, values[k]));
  const auto result = cki::splice(sets, cki::ModelStockPolicy<double>());
  const nlohmann::json report = result.report.to_json();
  INFO(report.dump());
  CHECK(report["method"] == "model-stock");
  CHECK_THAT(report["tensors"][0]["notes"]["fallback"].get<std::string>(), Contains("plain mean"));
}

// -------------------------------------------------------------- registry

TEST_CASE("registry lists every method", "[merge][registry]") {
  const std::vector<std::string> expected{"average", "task-arithmetic", "ties",  "dare",  "dare-ties",
                                          "slerp",   "model-stock",     "fisher", "prune"};
  CHECK(cki::merge_method_names() == expected);
  for (const auto& name : expected) {
    INFO("method " << name);
    CHECK(cki::is_merge_method(name));
  }
  CHECK_FALSE(cki::is_merge_method("cki-soft"));
}

TEST_CASE("registry builds methods from JSON", "[merge][registry]") {
  const auto ties = cki::make_merge_policy<double>("ties", {{"density", 0.3}, {"lambda", 2}, {"weights", {1, 1}}});
  CHECK(ties.name() == "ties");
  CHECK(ties.parameters()["density"] == 0.3);
  CHECK(ties.parameters()["scope"] == "tensor");
  const auto dare = cki::make_merge_policy<float>("dare", {{"drop_rate", 0.25}, {"seed", 7}});
  CHECK(dare.parameters()["seed"] == 7);
  CHECK(cki::make_merge_policy<float>("dare-ties").name() == "dare-ties");
  CHECK(cki::make_merge_policy<float>("prune", {{"threshold", 0.1}}).parameters()["threshold"] == 0.1);
  CHECK(cki::make_merge_policy<float>("slerp", {{"t", 0.25}}).parameters()["t"] == 0.25);
  CHECK(cki::make_merge_policy<float>("average", nullptr).name() == "average");
  CHECK(cki::needs_ties_prepass("ties", {{"scope", "model"}}));
  CHECK_FALSE(cki::needs_ties_prepass("ties", {{"scope", "tensor"}}));
  CHECK_FALSE(cki::needs_ties_prepass("dare", {}));
}

TEST_CASE("registry errors name method and field", "[merge][registry]") {
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("tie"), Contains("unknown merge method 'tie'; known: average"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("ties", {{"densty", 0.3}}),
                    Contains("method 'ties': unknown parameter 'densty'; known: weights, lambda, density, scope"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("ties", {{"density", "high"}}),
                    Contains("'density' must be a number"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("ties", {{"scope", "global"}}),
                    Contains("'scope' must be \"tensor\" or \"model\""));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("ties", {{"scope", "model"}}),
                    Contains("run TiesModelScope"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("dare", {{"seed", -1}}),
                    Contains("'seed' must be an integer in [0, 2^64)"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("average", {{"weights", 1}}),
                    Contains("'weights' must be a list of numbers"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("model-stock", {{"t", 1}}), Contains("unknown parameter 't'"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("fisher"), Contains("Fisher tensors are missing"));
  CHECK_THROWS_WITH(cki::make_merge_policy<float>("average", nlohmann::json::array()),
                    Contains("parameters must be a JSON object"));
}

// ----------------------------------------------------- parameter checks

TEST_CASE("average and task arithmetic check errors", "[merge][check]") {
  cki::AverageParams average;
  average.weights = {1, -1};
  CHECK_THROWS_WITH(average.check(), "'weights[1]' must be >= 0, got -1");
  average.weights = {0, 0};
  CHECK_THROWS_WITH(average.check(), "'weights' must have a sum > 0, got 0");
  average.weights = {1, NAN};
  CHECK_THROWS_WITH(average.check(), Contains("'weights[1]' must be finite"));
  average.weights = {1, 2};
  CHECK_THROWS_WITH(cki::AveragePolicy<float>(average).check(3),
                    "'weights' needs one value per model (3 in input order), got 2");

  cki::TaskArithmeticParams arithmetic;
  arithmetic.weights = {1, -2};
  CHECK_NOTHROW(arithmetic.check());
  arithmetic.lambda = INFINITY;
  CHECK_THROWS_WITH(arithmetic.check(), "'lambda' must be finite, got inf");
  arithmetic.lambda = 1;
  arithmetic.weights = {1, INFINITY};
  CHECK_THROWS_WITH(arithmetic.check(), Contains("'weights[1]' must be finite"));
}

TEST_CASE("ties and dare check errors", "[merge][check]") {
  cki::TiesParams ties;
  ties.density = 1.5;
  CHECK_THROWS_WITH(ties.check(), "'density' must be in [0, 1], got 1.5");
  ties.density = -0.1;
  CHECK_THROWS_WITH(ties.check(), "'density' must be in [0, 1], got -0.1");
  ties.density = NAN;
  CHECK_THROWS_WITH(ties.check(), Contains("'density' must be in [0, 1]"));
  ties.density = 0.5;
  ties.weights = {1, -1};
  CHECK_THROWS_WITH(ties.check(), "'weights[1]' must be >= 0, got -1");
  ties.weights = {};
  ties.lambda = NAN;
  CHECK_THROWS_WITH(ties.check(), Contains("'lambda' must be finite"));

  cki::DareParams dare;
  dare.drop_rate = 1;
  CHECK_THROWS_WITH(dare.check(), "'drop_rate' must be in [0, 1), got 1");
  dare.drop_rate = -0.5;
  CHECK_THROWS_WITH(dare.check(), "'drop_rate' must be in [0, 1), got -0.5");
  dare.drop_rate = 0.5;
  dare.lambda = -INFINITY;
  CHECK_THROWS_WITH(dare.check(), "'lambda' must be finite, got -inf");
  dare.lambda = 1;
  dare.weights = {1, -1};
  CHECK_NOTHROW(cki::DarePolicy<float>(dare).check(2));
  CHECK_THROWS_WITH(cki::DareTiesPolicy<float>(dare), "'weights[1]' must be >= 0, got -1");
  dare.weights = {1, 1, 1};
  CHECK_THROWS_WITH(cki::DarePolicy<float>(dare).check(2), Contains("'weights' needs one value per model (2"));
}

TEST_CASE("slerp, model stock, fisher and prune check errors", "[merge][check]") {
  cki::SlerpParams slerp;
  slerp.t = 1.5;
  CHECK_THROWS_WITH(slerp.check(), "'t' must be in [0, 1], got 1.5");
  slerp.t = -0.25;
  CHECK_THROWS_WITH(slerp.check(), "'t' must be in [0, 1], got -0.25");
  CHECK_THROWS_WITH(cki::SlerpPolicy<float>().check(3), "slerp merges exactly 2 models, got 3");

  CHECK_THROWS_WITH(cki::ModelStockPolicy<float>().check(2),
                    "model-stock needs the base and at least 2 fine-tunes (3 models), got 2 models");
  CHECK_NOTHROW(cki::ModelStockPolicy<float>().check(3));

  cki::FisherParams fisher;
  fisher.floor = 0;
  CHECK_THROWS_WITH(fisher.check(), "'floor' must be finite and > 0, got 0");
  fisher.floor = INFINITY;
  CHECK_THROWS_WITH(fisher.check(), "'floor' must be finite and > 0, got inf");
  fisher.floor = 1e-6;
  fisher.weights = {0, 0};
  CHECK_THROWS_WITH(fisher.check(), "'weights' must have a sum > 0, got 0");
  fisher.weights = {};
  CHECK_THROWS_WITH(cki::FisherPolicy<float>(fisher, nullptr).check(2), Contains("needs the models' Fisher tensors"));

  cki::PruneParams prune;
  prune.threshold = -1;
  CHECK_THROWS_WITH(prune.check(), "'threshold' must be finite and >= 0, got -1");
  prune.threshold = NAN;
  CHECK_THROWS_WITH(prune.check(), Contains("'threshold' must be finite and >= 0"));
  CHECK_NOTHROW(cki::PrunePolicy<float>().check(1));
}

TEST_CASE("policies reject bad parameters at construction", "[merge][check]") {
  cki::TiesParams ties;
  ties.density = 2;
  CHECK_THROWS_AS(cki::TiesPolicy<float>(ties), std::invalid_argument);
  cki::SlerpParams slerp;
  slerp.t = 2;
  CHECK_THROWS_AS(cki::SlerpPolicy<float>(slerp), std::invalid_argument);
  cki::PruneParams prune;
  prune.threshold = -2;
  CHECK_THROWS_AS(cki::PrunePolicy<float>(prune), std::invalid_argument);
  cki::AverageParams average;
  average.weights = {-1};
  CHECK_THROWS_AS(cki::AveragePolicy<float>(average), std::invalid_argument);
}
