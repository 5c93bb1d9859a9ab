// Tests of the Fashion-MNIST experiment: the IDX reader, the MLP's
// backpropagation and weight-set layout, the Fisher and batch gradients of
// the tuned rows, and a small end-to-end run.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <zlib.h>

#include "fashion_mnist/baseline_methods.hpp"
#include "fashion_mnist/idx.hpp"
#include "fashion_mnist/methods.hpp"
#include "fashion_mnist/mlp.hpp"
#include "fashion_mnist/protocol.hpp"
#include "fashion_mnist/report.hpp"
#include "fashion_mnist/searched_methods.hpp"

using namespace fashion_mnist;

namespace {

/// Writes `bytes` gzip-compressed to `path`.
void write_gzip(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  gzFile file = gzopen(path.c_str(), "wb");
  REQUIRE(file != nullptr);
  REQUIRE(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(gzclose(file) == Z_OK);
}

/// IDX bytes of unsigned-byte elements with dimensions `dims`.
std::vector<std::uint8_t> idx_bytes(const std::vector<std::uint32_t>& dims, const std::vector<std::uint8_t>& values) {
  std::vector<std::uint8_t> bytes{0, 0, 0x08, static_cast<std::uint8_t>(dims.size())};
  for (std::uint32_t dim : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(static_cast<std::uint8_t>(dim >> shift));
  }
  bytes.insert(bytes.end(), values.begin(), values.end());
  return bytes;
}

/// Directory of the real data: $CKI_FASHION_MNIST_DIR or the Debian path.
std::string data_dir() {
  const char* from_environment = std::getenv("CKI_FASHION_MNIST_DIR");
  return from_environment != nullptr ? from_environment : kDefaultDataDir;
}

/// Fills a random batch: `count` examples of `features` values in [0, 1) and labels
/// below `classes`.
void random_batch(Rng& rng, int features, int classes, int count, Eigen::MatrixXf& inputs, std::vector<int>& labels) {
  inputs.resize(features, count);
  labels.resize(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    for (int f = 0; f < features; ++f) inputs(f, i) = rng.uniform(0.0f, 1.0f);
    labels[static_cast<std::size_t>(i)] = static_cast<int>(rng.below(static_cast<std::uint64_t>(classes)));
  }
}

}  // namespace

TEST_CASE("idx reader parses gzip files", "[fashion_mnist][idx]") {
  const std::string dir = CKI_TEST_BINARY_DIR;
  const std::string images_path = dir + "/tiny-images-idx3-ubyte.gz";
  const std::string labels_path = dir + "/tiny-labels-idx1-ubyte.gz";
  // Three 2 x 2 images with pixel values 0, 10, ..., 110.
  std::vector<std::uint8_t> pixels(12);
  for (std::size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<std::uint8_t>(10 * i);
  write_gzip(images_path, idx_bytes({3, 2, 2}, pixels));
  write_gzip(labels_path, idx_bytes({3}, {7, 0, 9}));

  const IdxArray images = read_idx_gz(images_path);
  CHECK(images.dims == std::vector<std::uint32_t>{3, 2, 2});
  CHECK(images.values == pixels);

  const Dataset data = make_dataset(images, read_idx_gz(labels_path), "tiny");
  REQUIRE(data.size() == 3);
  REQUIRE(data.features() == 4);
  CHECK(data.labels == std::vector<int>{7, 0, 9});
  // Example 1 contains pixels 4..7 (row-major), scaled to [0, 1].
  CHECK(data.images(0, 1) == Approx(40.0 / 255));
  CHECK(data.images(3, 1) == Approx(70.0 / 255));
  CHECK(data.images(3, 2) == Approx(110.0 / 255));
}

TEST_CASE("idx reader rejects malformed files", "[fashion_mnist][idx]") {
  SECTION("magic number must start with two zero bytes") {
    CHECK_THROWS_AS(parse_idx({1, 0, 0x08, 1, 0, 0, 0, 0}, "bad"), DataError);
  }
  SECTION("element type other than unsigned byte") {
    CHECK_THROWS_WITH(parse_idx({0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0}, "float"),
                      Catch::Contains("only 8 (unsigned byte)"));
  }
  SECTION("header shorter than its dimensions") {
    CHECK_THROWS_WITH(parse_idx({0, 0, 0x08, 3, 0, 0}, "short"), Catch::Contains("truncated"));
  }
  SECTION("data length differs from the dimensions") {
    CHECK_THROWS_WITH(parse_idx(idx_bytes({2, 2}, {1, 2, 3}), "length"), Catch::Contains("need 4"));
  }
  SECTION("label outside 0..9") {
    CHECK_THROWS_WITH(make_dataset(parse_idx(idx_bytes({1, 1, 1}, {0}), "i"), parse_idx(idx_bytes({1}, {12}), "l"), "x"),
                      Catch::Contains("label 12"));
  }
  SECTION("image and label counts differ") {
    CHECK_THROWS_WITH(make_dataset(parse_idx(idx_bytes({2, 1, 1}, {0, 0}), "i"), parse_idx(idx_bytes({1}, {1}), "l"), "x"),
                      Catch::Contains("2 images but 1 labels"));
  }
  SECTION("missing directory names the Debian package") {
    CHECK_THROWS_WITH(load_fashion_mnist_file(std::string(CKI_TEST_BINARY_DIR) + "/no-such-dir", "train"),
                      Catch::Contains("dataset-fashion-mnist"));
  }
}

TEST_CASE("backpropagation matches finite differences", "[fashion_mnist][mlp]") {
  // Two hidden layers, so the gradient passes through two ReLUs.
  const std::vector<int> sizes{6, 5, 4, 3};
  const Mlp mlp = Mlp::initialised(sizes, 11);
  Rng rng(12);
  Eigen::MatrixXf inputs;
  std::vector<int> labels;
  random_batch(rng, 6, 3, 8, inputs, labels);

  std::vector<Layer> gradients;
  loss_and_gradients(mlp, inputs, labels, gradients);
  REQUIRE(gradients.size() == 3);

  // Central differences on every weight and bias, in float, so the
  // tolerance allows float rounding of the logits.
  const float step = 1e-2f;
  auto loss_of = [&](const Mlp& model) { return softmax_cross_entropy(model.logits(inputs), labels); };
  for (std::size_t l = 0; l < mlp.layers.size(); ++l) {
    for (Eigen::Index i = 0; i < mlp.layers[l].weight.size(); ++i) {
      Mlp plus = mlp;
      Mlp minus = mlp;
      plus.layers[l].weight.data()[i] += step;
      minus.layers[l].weight.data()[i] -= step;
      const double numeric = (loss_of(plus) - loss_of(minus)) / (2 * step);
      INFO("layer " << l << ", weight element " << i);
      CHECK(gradients[l].weight.data()[i] == Approx(numeric).margin(2e-4).epsilon(1e-2));
    }
    for (Eigen::Index i = 0; i < mlp.layers[l].bias.size(); ++i) {
      Mlp plus = mlp;
      Mlp minus = mlp;
      plus.layers[l].bias(i) += step;
      minus.layers[l].bias(i) -= step;
      const double numeric = (loss_of(plus) - loss_of(minus)) / (2 * step);
      INFO("layer " << l << ", bias element " << i);
      CHECK(gradients[l].bias(i) == Approx(numeric).margin(2e-4).epsilon(1e-2));
    }
  }
}

TEST_CASE("training lowers the loss deterministically", "[fashion_mnist][mlp]") {
  Rng rng(21);
  Dataset data;
  random_batch(rng, 10, 3, 200, data.images, data.labels);
  // Make the label a simple function of the input, so the task is learnable.
  for (Eigen::Index i = 0; i < data.size(); ++i) {
    Eigen::Index strongest = 0;
    data.images.col(i).head(3).maxCoeff(&strongest);
    data.labels[static_cast<std::size_t>(i)] = static_cast<int>(strongest);
  }
  const Mlp start = Mlp::initialised({10, 16, 3}, 22);
  const double initial_loss = evaluate(start, data).log_loss;

  for (OptimizerKind kind : {OptimizerKind::sgd, OptimizerKind::adam}) {
    TrainParams params;
    params.epochs = 20;
    params.batch_size = 16;
    params.optimizer.kind = kind;
    params.optimizer.learning_rate = kind == OptimizerKind::sgd ? 0.05f : 0.01f;
    params.seed = 23;
    Mlp first = start;
    Mlp second = start;
    train(first, data, {}, params);
    train(second, data, {}, params);

    INFO((kind == OptimizerKind::sgd ? "sgd" : "adam"));
    CHECK(evaluate(first, data).log_loss < 0.5 * initial_loss);
    for (std::size_t l = 0; l < first.layers.size(); ++l) {
      CHECK(first.layers[l].weight == second.layers[l].weight);
      CHECK(first.layers[l].bias == second.layers[l].bias);
    }
  }
}

TEST_CASE("weight masks keep pruned weights at zero", "[fashion_mnist][mlp]") {
  Rng rng(31);
  Dataset data;
  random_batch(rng, 4, 2, 32, data.images, data.labels);
  Mlp mlp = Mlp::initialised({4, 3, 2}, 32);
  std::vector<Eigen::MatrixXf> masks;
  for (const Layer& layer : mlp.layers) masks.push_back(Eigen::MatrixXf::Ones(layer.weight.rows(), layer.weight.cols()));
  masks[0](1, 2) = 0;
  mlp.layers[0].weight(1, 2) = 0;

  TrainParams params;
  params.epochs = 3;
  params.batch_size = 8;
  train(mlp, data, {}, params, masks);
  CHECK(mlp.layers[0].weight(1, 2) == 0.0f);
  CHECK(mlp.layers[0].weight(0, 0) != 0.0f);
}

TEST_CASE("weight set uses the [out, in] row-major layout", "[fashion_mnist][mlp]") {
  const Mlp mlp = Mlp::initialised({5, 4, 3}, 41);
  const cki::WeightSet<float> set = to_weight_set(mlp, "model 1");

  REQUIRE(set.size() == 4);
  CHECK(set.view("fc1.weight").shape() == cki::Shape{4, 5});
  CHECK(set.view("fc1.bias").shape() == cki::Shape{4});
  CHECK(set.view("fc2.weight").shape() == cki::Shape{3, 4});
  CHECK(set.view("fc2.bias").shape() == cki::Shape{3});
  // Element (row 2, column 3) of fc1.weight sits at flat index 2 * 5 + 3.
  CHECK(set.view("fc1.weight")[2 * 5 + 3] == mlp.layers[0].weight(2, 3));
  CHECK(set.view("fc2.weight")[1 * 4 + 0] == mlp.layers[1].weight(1, 0));

  const Mlp back = from_weight_set(set, {5, 4, 3});
  for (std::size_t l = 0; l < mlp.layers.size(); ++l) {
    CHECK(back.layers[l].weight == mlp.layers[l].weight);
    CHECK(back.layers[l].bias == mlp.layers[l].bias);
  }
  CHECK_THROWS_AS(from_weight_set(set, {5, 6, 3}), std::invalid_argument);
}

TEST_CASE("class-skewed subset prefers its classes", "[fashion_mnist][protocol]") {
  Dataset train;
  train.images = Eigen::MatrixXf::Zero(1, 1000);
  for (int i = 0; i < 1000; ++i) train.labels.push_back(i % kClassCount);

  // Model 1 of 4 prefers classes 1, 5 and 9 (class % 4 == 1).
  const std::vector<int> subset = class_skewed_subset(train, 1, 4, 0.1, 51);
  std::vector<int> per_class(kClassCount, 0);
  for (int index : subset) ++per_class[static_cast<std::size_t>(train.labels[static_cast<std::size_t>(index)])];
  for (int c = 0; c < kClassCount; ++c) {
    INFO("class " << c);
    CHECK(per_class[static_cast<std::size_t>(c)] == (c % 4 == 1 ? 100 : 10));
  }
}

TEST_CASE("diagonal Fisher matches per-example gradients", "[fashion_mnist][fisher]") {
  const Mlp mlp = Mlp::initialised({6, 5, 3}, 61);
  Rng rng(62);
  Dataset data;
  random_batch(rng, 6, 3, 9, data.images, data.labels);
  const std::vector<int> indices{0, 2, 3, 7, 8};

  // Mean of the squared gradients of one-example batches.
  std::vector<Layer> expected;
  for (int index : indices) {
    std::vector<Layer> gradients;
    loss_and_gradients(mlp, data.images.col(index), {data.labels[static_cast<std::size_t>(index)]}, gradients);
    if (expected.empty()) {
      for (const Layer& layer : gradients) {
        expected.push_back({Eigen::MatrixXf::Zero(layer.weight.rows(), layer.weight.cols()),
                            Eigen::VectorXf::Zero(layer.bias.size())});
      }
    }
    for (std::size_t l = 0; l < gradients.size(); ++l) {
      expected[l].weight += gradients[l].weight.cwiseAbs2() / static_cast<float>(indices.size());
      expected[l].bias += gradients[l].bias.cwiseAbs2() / static_cast<float>(indices.size());
    }
  }

  const std::vector<Layer> fisher = diagonal_fisher(mlp, data, indices);
  REQUIRE(fisher.size() == expected.size());
  for (std::size_t l = 0; l < fisher.size(); ++l) {
    INFO("layer " << l);
    CHECK(fisher[l].weight.isApprox(expected[l].weight, 1e-5f));
    CHECK(fisher[l].bias.isApprox(expected[l].bias, 1e-5f));
  }
}

TEST_CASE("batch gradient split over threads", "[fashion_mnist][learned]") {
  const Mlp mlp = Mlp::initialised({6, 5, 3}, 71);
  Rng rng(72);
  Dataset data;
  random_batch(rng, 6, 3, 11, data.images, data.labels);
  // Seven examples, an odd count, so the two threads get parts of different sizes.
  const std::vector<int> batch{10, 0, 3, 4, 9, 1, 6};

  Eigen::MatrixXf inputs(6, static_cast<Eigen::Index>(batch.size()));
  std::vector<int> labels;
  for (std::size_t j = 0; j < batch.size(); ++j) {
    inputs.col(static_cast<Eigen::Index>(j)) = data.images.col(batch[j]);
    labels.push_back(data.labels[static_cast<std::size_t>(batch[j])]);
  }
  std::vector<Layer> whole;
  loss_and_gradients(mlp, inputs, labels, whole);
  Mlp whole_mlp;
  whole_mlp.layers = whole;
  const cki::WeightSet<float> expected = to_weight_set(whole_mlp);

  const cki::WeightSet<float> split = batch_gradient(mlp, data, batch, 2);
  for (const auto& entry : expected) {
    INFO(entry.name);
    CHECK(split.view(entry.name).array().isApprox(entry.values.array(), 1e-5f));
  }
}

TEST_CASE("pipeline runs end to end on a subset", "[fashion_mnist][smoke]") {
  // Setting A, N = 2, one repeat, on a small subset of the real data: a test
  // of the pipeline, not a benchmark.
  SplitSizes sizes;
  sizes.train = 3000;
  sizes.valid = 1000;
  sizes.test = 2000;
  const Splits data = load_splits(data_dir(), sizes, 0);
  REQUIRE(data.train.size() == 3000);
  REQUIRE(data.valid.size() == 1000);
  REQUIRE(data.test.size() == 2000);

  ProtocolParams params;
  params.sizes = {784, 64, 10};
  params.settings = {Setting::shared_start};
  params.model_counts = {2};
  params.repeats = 1;
  params.base_epochs = 2;
  params.finetune_epochs = 2;
  params.optimizer.learning_rate = 2e-3f;
  params.finetune_learning_rate = 1e-3f;
  params.threads = 2;
  // Small budgets for the tuned rows, so the test takes a few seconds.
  params.calibration_budget = 8;
  params.learn_epochs = 3;
  params.learn_examples = 1000;
  params.fisher_examples = 300;

  const std::vector<Method> methods = default_methods(2);
  std::ostringstream log;
  const std::vector<Block> blocks = run_protocol(methods, data, params, log);
  REQUIRE(blocks.size() == 1);
  REQUIRE(blocks[0].outcomes.size() == 1);
  const std::vector<RowOutcome>& rows = blocks[0].outcomes[0];
  REQUIRE(rows.size() == methods.size());

  for (std::size_t r = 0; r < methods.size(); ++r) {
    INFO(methods[r].label << ": test accuracy " << rows[r].test.accuracy << ", after the extra epoch "
                          << rows[r].test_extra.accuracy);
    const std::string& key = methods[r].key;
    const bool single = key.rfind("model_", 0) == 0 || key == "best_single";
    const bool cki_row = key.rfind("cki_", 0) == 0;
    REQUIRE(rows[r].applicable);
    CHECK(std::isfinite(rows[r].test.log_loss));
    CHECK(std::isfinite(rows[r].test_extra.log_loss));
    if (single || cki_row) {
      CHECK(rows[r].test.accuracy > 0.5);
      CHECK(rows[r].test_extra.accuracy > 0.5);
    }
  }

  // The tuned rows stay within their budgets and record their choices.
  const std::size_t calibrated = find_method(methods, "cki_calibrated");
  const std::size_t learned = find_method(methods, "cki_learned");
  REQUIRE(calibrated < methods.size());
  REQUIRE(learned < methods.size());
  const nlohmann::json& search = rows[calibrated].notes;
  INFO("calibration notes: " << search.dump());
  CHECK(search.at("evaluations").get<int>() == params.calibration_budget);
  CHECK(search.at("chosen").contains("rule"));
  const nlohmann::json& training = rows[learned].notes;
  INFO("learning notes: " << training.dump());
  // 1,000 examples in batches of 128 take 8 steps per epoch.
  CHECK(training.at("steps").get<int>() == 3 * 8);
  CHECK(training.at("best_epoch").get<int>() >= 0);
  CHECK(training.at("best_epoch").get<int>() <= params.learn_epochs);
  CHECK(training.at("valid_accuracy_per_epoch").size() == static_cast<std::size_t>(params.learn_epochs + 1));
}
