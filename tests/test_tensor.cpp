// Tests of shapes, tensor views, owning tensors and weight sets.
#include <catch2/catch.hpp>

#include <cki/tensor.hpp>
#include <cki/weight_set.hpp>

using Catch::Matchers::Contains;

TEST_CASE("shape numel and formatting", "[tensor]") {
  CHECK(cki::shape_numel({}) == 1);
  CHECK(cki::shape_numel({0}) == 0);
  CHECK(cki::shape_numel({2, 3, 4}) == 24);
  CHECK(cki::shape_numel({5, 0, 7}) == 0);
  CHECK(cki::shape_to_string({}) == "[]");
  CHECK(cki::shape_to_string({2, 3}) == "[2, 3]");
  CHECK(cki::last_dim({}) == 1);
  CHECK(cki::last_dim({4, 7}) == 7);
  CHECK_THROWS_WITH(cki::shape_numel({2, -1}), Contains("negative"));
  CHECK_THROWS_WITH(cki::shape_numel({1LL << 40, 1LL << 40}), Contains("64 bits"));
}

TEMPLATE_TEST_CASE("tensor view maps caller memory", "[tensor]", float, double) {
  std::vector<TestType> memory{1, 2, 3, 4, 5, 6};
  cki::TensorView<TestType> view(memory.data(), {2, 3});
  CHECK(view.size() == 6);
  CHECK(view.rank() == 2);
  CHECK(view.data() == memory.data());
  memory[4] = 50;
  CHECK(view[4] == 50);
  CHECK(view.array().sum() == Approx(1 + 2 + 3 + 4 + 50 + 6));
  CHECK_THROWS_AS(cki::TensorView<TestType>(nullptr, {2}), std::invalid_argument);
  cki::TensorView<TestType> empty(nullptr, {0, 3});
  CHECK(empty.empty());
}

TEMPLATE_TEST_CASE("tensor owns zeroed or given values", "[tensor]", float, double) {
  cki::Tensor<TestType> zeros({2, 2});
  CHECK(zeros.size() == 4);
  CHECK(zeros.array().abs().sum() == 0);

  cki::Tensor<TestType> scalar;
  CHECK(scalar.rank() == 0);
  CHECK(scalar.size() == 1);

  typename cki::Tensor<TestType>::Array values(3);
  values << 1, 2, 3;
  cki::Tensor<TestType> vector({3}, values);
  CHECK(vector.view()[2] == 3);
  CHECK_THROWS_WITH(cki::Tensor<TestType>({4}, values), Contains("needs 4 values, got 3"));

  auto copy = cki::Tensor<TestType>::copy_of(vector.view());
  copy[0] = 9;
  CHECK(vector[0] == 1);
}

namespace {

cki::WeightSet<float> make_set(const std::string& source, const cki::Shape& weight_shape) {
  cki::WeightSet<float> set(source);
  set.add("fc.weight", cki::Tensor<float>(weight_shape));
  set.add("fc.bias", cki::Tensor<float>({2}), cki::DType::BF16);
  set.add_raw("steps", cki::DType::I64, {}, std::vector<std::uint8_t>(8, 1));
  return set;
}

}  // namespace

TEST_CASE("weight set keeps insertion order", "[weight_set]") {
  auto set = make_set("a.safetensors", {2, 3});
  REQUIRE(set.size() == 3);
  CHECK(set[0].name == "fc.weight");
  CHECK(set[1].name == "fc.bias");
  CHECK(set[2].name == "steps");
  CHECK(set.at("fc.bias").dtype == cki::DType::BF16);
  CHECK(set.at("steps").raw->size() == 8);
  CHECK_FALSE(set.at("steps").spliceable());
  CHECK(set.view("fc.weight").shape() == cki::Shape{2, 3});
}

TEST_CASE("weight set rejects bad entries", "[weight_set]") {
  auto set = make_set("a.safetensors", {2, 3});
  CHECK_THROWS_WITH(set.add("fc.bias", cki::Tensor<float>({2})), Contains("already has a tensor named 'fc.bias'"));
  CHECK_THROWS_WITH(set.add("ids", cki::Tensor<float>({2}), cki::DType::I32), Contains("add_raw"));
  CHECK_THROWS_WITH(set.add_raw("mask", cki::DType::BOOL, {4}, std::vector<std::uint8_t>(3)),
                    Contains("needs 4 bytes, got 3"));
  CHECK_THROWS_WITH(set.add_raw("w", cki::DType::F32, {1}, std::vector<std::uint8_t>(4)), Contains("add or add_view"));
  CHECK_THROWS_WITH(set.at("missing"), Contains("no tensor named 'missing'"));
  CHECK_THROWS_WITH(set.view("steps"), Contains("no floating values"));
}

TEST_CASE("weight set copies share storage", "[weight_set]") {
  auto set = make_set("a", {2, 3});
  auto copy = set;
  CHECK(copy.view("fc.weight").data() == set.view("fc.weight").data());
}

TEST_CASE("compatible sets pass the check", "[weight_set]") {
  std::vector<cki::WeightSet<float>> sets{make_set("a", {2, 3}), make_set("b", {2, 3})};
  CHECK_NOTHROW(cki::check_compatible(sets));
}

TEST_CASE("check names shape mismatch", "[weight_set]") {
  std::vector<cki::WeightSet<float>> sets{make_set("a.st", {2, 3}), make_set("b.st", {3, 2})};
  CHECK_THROWS_AS(cki::check_compatible(sets), cki::MismatchError);
  CHECK_THROWS_WITH(cki::check_compatible(sets), Contains("'fc.weight'") && Contains("[2, 3]") &&
                                                     Contains("[3, 2]") && Contains("a.st") && Contains("b.st"));
}

TEST_CASE("check names missing and extra tensors", "[weight_set]") {
  auto full = make_set("full.st", {2, 3});
  cki::WeightSet<float> partial("partial.st");
  partial.add("fc.weight", cki::Tensor<float>({2, 3}));
  partial.add_raw("steps", cki::DType::I64, {}, std::vector<std::uint8_t>(8));

  std::vector<cki::WeightSet<float>> missing{full, partial};
  CHECK_THROWS_WITH(cki::check_compatible(missing),
                    Contains("'fc.bias'") && Contains("missing from model 2 ('partial.st')"));

  auto extra = full;
  extra.add("head.weight", cki::Tensor<float>({1}));
  std::vector<cki::WeightSet<float>> extra_sets{full, extra};
  CHECK_THROWS_WITH(cki::check_compatible(extra_sets),
                    Contains("'head.weight'") && Contains("missing from model 1 ('full.st')"));
}

TEST_CASE("check names dtype kind mismatch", "[weight_set]") {
  cki::WeightSet<float> first("a"), second("b");
  first.add("x", cki::Tensor<float>({2}));
  second.add_raw("x", cki::DType::I32, {2}, std::vector<std::uint8_t>(8));
  std::vector<cki::WeightSet<float>> sets{first, second};
  CHECK_THROWS_WITH(cki::check_compatible(sets), Contains("F32") && Contains("I32"));
}

TEST_CASE("check rejects zero sets", "[weight_set]") {
  std::vector<cki::WeightSet<float>> none;
  CHECK_THROWS_AS(cki::check_compatible(none), std::invalid_argument);
}
