// A multilayer perceptron with ReLU hidden layers, hand-written
// backpropagation, SGD and Adam, and conversion to and from cki weight sets.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <cki/weight_set.hpp>

#include "fashion_mnist/idx.hpp"
#include "fashion_mnist/random.hpp"

namespace fashion_mnist {

/// One fully connected layer, y = weight * x + bias, with weight of shape
/// [out, in] as PyTorch's nn.Linear stores it.
struct Layer {
  Eigen::MatrixXf weight;
  Eigen::VectorXf bias;
};

/// Multilayer perceptron: fully connected layers with ReLU between them and
/// raw logits at the output.
class Mlp {
 public:
  Mlp() = default;

  /// Network with layer widths `sizes` (input first, classes last, at least
  /// two entries), initialised as PyTorch initialises nn.Linear: weights and
  /// biases uniform in +-1/sqrt(fan_in).
  /// Throws std::invalid_argument for fewer than two sizes or a size < 1.
  static Mlp initialised(const std::vector<int>& sizes, std::uint64_t seed) {
    if (sizes.size() < 2) {
      throw std::invalid_argument("an MLP needs at least an input and an output size, got " +
                                  std::to_string(sizes.size()) + " sizes");
    }
    for (int size : sizes) {
      if (size < 1) throw std::invalid_argument("layer sizes must be >= 1, got " + std::to_string(size));
    }

    Rng rng(seed);
    Mlp mlp;
    for (std::size_t l = 0; l + 1 < sizes.size(); ++l) {
      const float bound = 1.0f / std::sqrt(static_cast<float>(sizes[l]));
      Layer layer;
      layer.weight.resize(sizes[l + 1], sizes[l]);
      layer.bias.resize(sizes[l + 1]);
      // Row-major fill, so the values match the [out, in] flat order.
      for (Eigen::Index r = 0; r < layer.weight.rows(); ++r) {
        for (Eigen::Index c = 0; c < layer.weight.cols(); ++c) layer.weight(r, c) = rng.uniform(-bound, bound);
      }
      for (Eigen::Index r = 0; r < layer.bias.size(); ++r) layer.bias(r) = rng.uniform(-bound, bound);
      mlp.layers.push_back(std::move(layer));
    }
    return mlp;
  }

  /// Layer widths, input first.
  std::vector<int> sizes() const {
    std::vector<int> out;
    if (layers.empty()) return out;
    out.push_back(static_cast<int>(layers.front().weight.cols()));
    for (const Layer& layer : layers) out.push_back(static_cast<int>(layer.weight.rows()));
    return out;
  }

  /// Logits (classes x examples) of the examples in the columns of `inputs`.
  Eigen::MatrixXf logits(const Eigen::Ref<const Eigen::MatrixXf>& inputs) const {
    Eigen::MatrixXf activation = inputs;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      Eigen::MatrixXf pre = layers[l].weight * activation;
      pre.colwise() += layers[l].bias;
      if (l + 1 < layers.size()) pre = pre.cwiseMax(0.0f);
      activation = std::move(pre);
    }
    return activation;
  }

  std::vector<Layer> layers;
};

/// Returns the mean softmax cross-entropy (natural log) of `logits` (classes
/// x examples) against `labels`, computed with the log-sum-exp shift.
/// When `probabilities` is given it receives the softmax of each column.
inline double softmax_cross_entropy(const Eigen::MatrixXf& logits, const std::vector<int>& labels,
                                    Eigen::MatrixXf* probabilities = nullptr) {
  double total = 0;
  if (probabilities != nullptr) probabilities->resize(logits.rows(), logits.cols());
  for (Eigen::Index i = 0; i < logits.cols(); ++i) {
    const float shift = logits.col(i).maxCoeff();
    const Eigen::VectorXf exps = (logits.col(i).array() - shift).exp().matrix();
    const float sum = exps.sum();
    const int label = labels[static_cast<std::size_t>(i)];
    total += std::log(static_cast<double>(sum)) - (logits(label, i) - shift);
    if (probabilities != nullptr) probabilities->col(i) = exps / sum;
  }
  return logits.cols() > 0 ? total / static_cast<double>(logits.cols()) : 0.0;
}

/// Computes the mean cross-entropy loss of `mlp` on a batch and its gradient
/// with respect to every weight and bias, by backpropagation.
/// `gradients` is resized to match `mlp`. Returns the loss.
inline double loss_and_gradients(const Mlp& mlp, const Eigen::MatrixXf& inputs, const std::vector<int>& labels,
                                 std::vector<Layer>& gradients) {
  const std::size_t depth = mlp.layers.size();
  const float batch = static_cast<float>(inputs.cols());

  // Forward pass, keeping every layer's input for the backward pass.
  std::vector<Eigen::MatrixXf> layer_inputs(depth);
  layer_inputs[0] = inputs;
  Eigen::MatrixXf output;
  for (std::size_t l = 0; l < depth; ++l) {
    Eigen::MatrixXf pre = mlp.layers[l].weight * layer_inputs[l];
    pre.colwise() += mlp.layers[l].bias;
    if (l + 1 < depth) {
      layer_inputs[l + 1] = pre.cwiseMax(0.0f);
    } else {
      output = std::move(pre);
    }
  }

  // Gradient of the mean cross-entropy with respect to the logits:
  // (softmax - one_hot) / batch size.
  Eigen::MatrixXf probabilities;
  const double loss = softmax_cross_entropy(output, labels, &probabilities);
  Eigen::MatrixXf delta = probabilities;
  for (Eigen::Index i = 0; i < delta.cols(); ++i) delta(labels[static_cast<std::size_t>(i)], i) -= 1.0f;
  delta /= batch;

  // Backward pass: dW = delta * input^T, db = row sums of delta; the delta of
  // the layer below is W^T * delta, zeroed where the ReLU was inactive.
  gradients.resize(depth);
  for (std::size_t l = depth; l-- > 0;) {
    gradients[l].weight.noalias() = delta * layer_inputs[l].transpose();
    gradients[l].bias = delta.rowwise().sum();
    if (l == 0) break;
    Eigen::MatrixXf below = mlp.layers[l].weight.transpose() * delta;
    delta = (layer_inputs[l].array() > 0.0f).select(below, 0.0f);
  }
  return loss;
}

/// Optimizer of the trainer.
enum class OptimizerKind { sgd, adam };

/// Settings of SGD (with optional momentum) or Adam.
struct OptimizerParams {
  OptimizerKind kind = OptimizerKind::adam;
  /// Step size, > 0.
  float learning_rate = 1e-3f;
  /// SGD momentum in [0, 1); 0 is plain SGD.
  float momentum = 0.9f;
  /// Adam decay rates of the first and second moment, each in [0, 1).
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  /// Adam denominator offset, > 0.
  float epsilon = 1e-8f;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    if (!(learning_rate > 0)) {
      throw std::invalid_argument("'learning_rate' must be > 0, got " + std::to_string(learning_rate));
    }
    if (!(momentum >= 0 && momentum < 1)) {
      throw std::invalid_argument("'momentum' must be in [0, 1), got " + std::to_string(momentum));
    }
    if (!(beta1 >= 0 && beta1 < 1)) {
      throw std::invalid_argument("'beta1' must be in [0, 1), got " + std::to_string(beta1));
    }
    if (!(beta2 >= 0 && beta2 < 1)) {
      throw std::invalid_argument("'beta2' must be in [0, 1), got " + std::to_string(beta2));
    }
    if (!(epsilon > 0)) throw std::invalid_argument("'epsilon' must be > 0, got " + std::to_string(epsilon));
  }
};

/// Optimizer state for one network: SGD velocity, or Adam's two moments.
class Optimizer {
 public:
  Optimizer(const Mlp& mlp, OptimizerParams params) : params_(params) {
    params_.check();
    for (const Layer& layer : mlp.layers) {
      Layer zero{Eigen::MatrixXf::Zero(layer.weight.rows(), layer.weight.cols()),
                 Eigen::VectorXf::Zero(layer.bias.size())};
      first_.push_back(zero);
      if (params_.kind == OptimizerKind::adam) second_.push_back(zero);
    }
  }

  /// Applies one update to `mlp` from the batch gradients.
  void step(Mlp& mlp, const std::vector<Layer>& gradients) {
    ++steps_;
    for (std::size_t l = 0; l < mlp.layers.size(); ++l) {
      update(mlp.layers[l].weight, gradients[l].weight, first_[l].weight,
             second_.empty() ? nullptr : &second_[l].weight);
      update(mlp.layers[l].bias, gradients[l].bias, first_[l].bias,
             second_.empty() ? nullptr : &second_[l].bias);
    }
  }

 private:
  template <typename Tensor>
  void update(Tensor& value, const Tensor& gradient, Tensor& first, Tensor* second) {
    if (params_.kind == OptimizerKind::sgd) {
      first = params_.momentum * first + gradient;
      value -= params_.learning_rate * first;
      return;
    }

    // Adam with bias-corrected moments.
    first = params_.beta1 * first + (1.0f - params_.beta1) * gradient;
    *second = params_.beta2 * *second + (1.0f - params_.beta2) * gradient.cwiseAbs2();
    const float correction1 = 1.0f - std::pow(params_.beta1, static_cast<float>(steps_));
    const float correction2 = 1.0f - std::pow(params_.beta2, static_cast<float>(steps_));
    value.array() -= params_.learning_rate * (first.array() / correction1) /
                     ((second->array() / correction2).sqrt() + params_.epsilon);
  }

  OptimizerParams params_;
  std::vector<Layer> first_;
  std::vector<Layer> second_;
  long steps_ = 0;
};

/// Settings of one training run.
struct TrainParams {
  int epochs = 1;
  int batch_size = 128;
  OptimizerParams optimizer;
  /// Seed of the example order.
  std::uint64_t seed = 0;

  void check() const {
    if (epochs < 0) throw std::invalid_argument("'epochs' must be >= 0, got " + std::to_string(epochs));
    if (batch_size < 1) throw std::invalid_argument("'batch_size' must be >= 1, got " + std::to_string(batch_size));
    optimizer.check();
  }
};

/// Trains `mlp` in place on the examples of `data` at `indices` (all examples
/// when empty) with a fresh optimizer, reshuffling every epoch. When
/// `weight_masks` is non-empty it contains one 0/1 matrix per layer, multiplied
/// into the weights after every step, so pruned weights stay zero.
/// Returns the mean training loss of the last epoch.
inline double train(Mlp& mlp, const Dataset& data, std::vector<int> indices, const TrainParams& params,
                    const std::vector<Eigen::MatrixXf>& weight_masks = {}) {
  params.check();
  if (indices.empty()) {
    indices.resize(static_cast<std::size_t>(data.size()));
    for (std::size_t i = 0; i < indices.size(); ++i) indices[i] = static_cast<int>(i);
  }
  if (!weight_masks.empty() && weight_masks.size() != mlp.layers.size()) {
    throw std::invalid_argument("got " + std::to_string(weight_masks.size()) + " weight masks for " +
                                std::to_string(mlp.layers.size()) + " layers");
  }

  Rng rng(params.seed);
  Optimizer optimizer(mlp, params.optimizer);
  std::vector<Layer> gradients;
  Eigen::MatrixXf batch_inputs;
  std::vector<int> batch_labels;
  double epoch_loss = 0;

  for (int epoch = 0; epoch < params.epochs; ++epoch) {
    rng.shuffle(indices);
    epoch_loss = 0;
    for (std::size_t start = 0; start < indices.size(); start += static_cast<std::size_t>(params.batch_size)) {
      // Gather the batch's columns.
      const std::size_t stop = std::min(indices.size(), start + static_cast<std::size_t>(params.batch_size));
      const auto count = static_cast<Eigen::Index>(stop - start);
      batch_inputs.resize(data.features(), count);
      batch_labels.resize(stop - start);
      for (std::size_t j = start; j < stop; ++j) {
        batch_inputs.col(static_cast<Eigen::Index>(j - start)) = data.images.col(indices[j]);
        batch_labels[j - start] = data.labels[static_cast<std::size_t>(indices[j])];
      }

      // One optimizer step, then re-apply the pruning masks.
      epoch_loss += loss_and_gradients(mlp, batch_inputs, batch_labels, gradients) * static_cast<double>(count);
      optimizer.step(mlp, gradients);
      for (std::size_t l = 0; l < weight_masks.size(); ++l) {
        mlp.layers[l].weight.array() *= weight_masks[l].array();
      }
    }
    epoch_loss /= static_cast<double>(indices.size());
  }
  return epoch_loss;
}

/// Accuracy (share in [0, 1]) and mean log loss (nats) of a classifier.
struct Scores {
  double accuracy = 0;
  double log_loss = 0;
};

/// Sums over the examples of a range: log loss (nats) and correct predictions.
struct ScoreSums {
  double log_loss = 0;
  Eigen::Index correct = 0;
};

/// Scores the mean of the logits of `members` on the examples `begin` to
/// `end` (exclusive) of `data`, as sums, so that ranges scored on different
/// threads add up. Throws std::invalid_argument when `members` is empty.
inline ScoreSums score_range(const std::vector<const Mlp*>& members, const Dataset& data, Eigen::Index begin,
                             Eigen::Index end) {
  if (members.empty()) throw std::invalid_argument("evaluate needs at least one model");
  constexpr Eigen::Index kChunk = 2000;
  ScoreSums sums;

  for (Eigen::Index start = begin; start < end; start += kChunk) {
    const Eigen::Index count = std::min(kChunk, end - start);
    const auto inputs = data.images.middleCols(start, count);
    Eigen::MatrixXf logits = members.front()->logits(inputs);
    for (std::size_t m = 1; m < members.size(); ++m) logits += members[m]->logits(inputs);
    logits /= static_cast<float>(members.size());

    const std::vector<int> labels(data.labels.begin() + start, data.labels.begin() + start + count);
    sums.log_loss += softmax_cross_entropy(logits, labels) * static_cast<double>(count);
    for (Eigen::Index i = 0; i < count; ++i) {
      Eigen::Index predicted = 0;
      logits.col(i).maxCoeff(&predicted);
      sums.correct += predicted == labels[static_cast<std::size_t>(i)] ? 1 : 0;
    }
  }
  return sums;
}

/// Scores the mean of the logits of `members` on `data`: one member is a
/// single model, several are an output ensemble.
/// Throws std::invalid_argument when `members` is empty.
inline Scores evaluate(const std::vector<const Mlp*>& members, const Dataset& data) {
  const ScoreSums sums = score_range(members, data, 0, data.size());
  Scores scores;
  scores.accuracy = static_cast<double>(sums.correct) / static_cast<double>(data.size());
  scores.log_loss = sums.log_loss / static_cast<double>(data.size());
  return scores;
}

/// Scores one model on `data`.
inline Scores evaluate(const Mlp& mlp, const Dataset& data) { return evaluate(std::vector<const Mlp*>{&mlp}, data); }

/// Row-major map of a [rows, cols] tensor, the layout of PyTorch and cki.
using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Converts `mlp` into a weight set named as PyTorch names an nn.Sequential of
/// Linear layers wrapped in a module with fields fc1, fc2, ...: "fc1.weight"
/// [out, in], "fc1.bias" [out], and so on.
inline cki::WeightSet<float> to_weight_set(const Mlp& mlp, const std::string& source = "") {
  cki::WeightSet<float> set(source);
  for (std::size_t l = 0; l < mlp.layers.size(); ++l) {
    const Layer& layer = mlp.layers[l];
    const std::string prefix = "fc" + std::to_string(l + 1);

    // Eigen stores the matrix column-major, so copy it through a row-major map.
    cki::Tensor<float> weight({layer.weight.rows(), layer.weight.cols()});
    Eigen::Map<RowMajorMatrix>(weight.data(), layer.weight.rows(), layer.weight.cols()) = layer.weight;
    set.add(prefix + ".weight", std::move(weight));

    cki::Tensor<float> bias({layer.bias.size()});
    Eigen::Map<Eigen::VectorXf>(bias.data(), layer.bias.size()) = layer.bias;
    set.add(prefix + ".bias", std::move(bias));
  }
  return set;
}

/// Builds an MLP with layer widths `sizes` from a weight set laid out as
/// `to_weight_set` writes it.
/// Throws cki::MismatchError for a missing tensor and std::invalid_argument
/// for a tensor of the wrong shape.
inline Mlp from_weight_set(const cki::WeightSet<float>& set, const std::vector<int>& sizes) {
  Mlp mlp;
  for (std::size_t l = 0; l + 1 < sizes.size(); ++l) {
    const std::string prefix = "fc" + std::to_string(l + 1);
    const cki::TensorView<float>& weight = set.view(prefix + ".weight");
    const cki::TensorView<float>& bias = set.view(prefix + ".bias");
    const cki::Shape weight_shape{sizes[l + 1], sizes[l]};
    const cki::Shape bias_shape{sizes[l + 1]};
    if (weight.shape() != weight_shape || bias.shape() != bias_shape) {
      throw std::invalid_argument("layer " + prefix + " has weight " + cki::shape_to_string(weight.shape()) +
                                  " and bias " + cki::shape_to_string(bias.shape()) + ", expected " +
                                  cki::shape_to_string(weight_shape) + " and " + cki::shape_to_string(bias_shape));
    }

    Layer layer;
    layer.weight = Eigen::Map<const RowMajorMatrix>(weight.data(), sizes[l + 1], sizes[l]);
    layer.bias = Eigen::Map<const Eigen::VectorXf>(bias.data(), sizes[l + 1]);
    mlp.layers.push_back(std::move(layer));
  }
  return mlp;
}

}  // namespace fashion_mnist
