// Adam optimiser for the parameters of learned assessments.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "cki/detail/format.hpp"

namespace cki {

/// Parameters of Adam (Kingma and Ba, 2015), with the usual defaults.
struct AdamParams {
  /// Step size; range (0, 1e3].
  double learning_rate = 1e-3;
  /// Decay of the first-moment (mean) estimate; range [0, 1).
  double beta1 = 0.9;
  /// Decay of the second-moment (uncentred variance) estimate; range [0, 1).
  double beta2 = 0.999;
  /// Term added to the root of the second moment to avoid division by zero;
  /// range (0, 1].
  double epsilon = 1e-8;

  /// Throws std::invalid_argument naming the first field out of range.
  void check() const {
    if (!(learning_rate > 0.0 && learning_rate <= 1e3)) {
      detail::throw_out_of_range("learning_rate", "in (0, 1e3]", learning_rate);
    }
    if (!(beta1 >= 0.0 && beta1 < 1.0)) detail::throw_out_of_range("beta1", "in [0, 1)", beta1);
    if (!(beta2 >= 0.0 && beta2 < 1.0)) detail::throw_out_of_range("beta2", "in [0, 1)", beta2);
    if (!(epsilon > 0.0 && epsilon <= 1.0)) detail::throw_out_of_range("epsilon", "in (0, 1]", epsilon);
  }

  nlohmann::json to_json() const {
    return {{"learning_rate", learning_rate}, {"beta1", beta1}, {"beta2", beta2}, {"epsilon", epsilon}};
  }
};

/// A contiguous run of parameters and the gradient of the loss with respect
/// to them, both of `size` elements, in memory the caller owns.
template <typename Scalar>
struct ParameterBlock {
  Scalar* values = nullptr;
  const Scalar* gradient = nullptr;
  Eigen::Index size = 0;
};

/// Adam optimiser over any number of parameter blocks. The moment estimates
/// are kept per element, in the order of the blocks, so every step must pass
/// blocks of the same sizes in the same order.
///
/// One step with gradient g at step count t (from 1):
///   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,
///   x -= lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps).
/// \tparam Scalar float or double.
template <typename Scalar>
class Adam {
 public:
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// Throws std::invalid_argument naming the first field of `params` out of range.
  explicit Adam(AdamParams params = {}) : params_(params) { params_.check(); }

  const AdamParams& params() const { return params_; }

  /// Changes the learning rate for the following steps (a schedule).
  /// Throws std::invalid_argument when it is out of range.
  void set_learning_rate(double learning_rate) {
    AdamParams changed = params_;
    changed.learning_rate = learning_rate;
    changed.check();
    params_ = changed;
  }

  /// Number of steps taken since construction or the last reset().
  std::int64_t step_count() const { return steps_; }

  /// Forgets the moment estimates and the step count.
  void reset() {
    steps_ = 0;
    block_sizes_.clear();
    first_moment_.resize(0);
    second_moment_.resize(0);
  }

  /// Updates every block in place from its gradient. Throws
  /// std::invalid_argument when the block sizes differ from those of the
  /// first step since construction or reset().
  void step(const std::vector<ParameterBlock<Scalar>>& blocks) {
    check_layout(blocks);
    ++steps_;
    const double lr = params_.learning_rate;
    const double correction1 = 1.0 - std::pow(params_.beta1, static_cast<double>(steps_));
    const double correction2 = 1.0 - std::pow(params_.beta2, static_cast<double>(steps_));
    const auto beta1 = static_cast<Scalar>(params_.beta1);
    const auto beta2 = static_cast<Scalar>(params_.beta2);
    const auto step_size = static_cast<Scalar>(lr / correction1);
    const auto root_correction2 = static_cast<Scalar>(std::sqrt(correction2));
    const auto epsilon = static_cast<Scalar>(params_.epsilon);

    // The moments of all blocks sit back to back, so `offset` walks them.
    Eigen::Index offset = 0;
    for (const auto& block : blocks) {
      Eigen::Map<Vector> values(block.values, block.size);
      Eigen::Map<const Vector> gradient(block.gradient, block.size);
      auto m = first_moment_.segment(offset, block.size);
      auto v = second_moment_.segment(offset, block.size);
      m = beta1 * m + (Scalar(1) - beta1) * gradient;
      v = beta2 * v + (Scalar(1) - beta2) * gradient.cwiseAbs2();
      values.array() -= step_size * m.array() / (v.array().sqrt() / root_correction2 + epsilon);
      offset += block.size;
    }
  }

  /// Updates one parameter vector in place from its gradient, a step over a
  /// single block.
  void step(Vector& values, const Vector& gradient) {
    if (values.size() != gradient.size()) {
      throw std::invalid_argument("Adam step has " + std::to_string(values.size()) + " parameters but " +
                                  std::to_string(gradient.size()) + " gradient entries");
    }
    step({ParameterBlock<Scalar>{values.data(), gradient.data(), values.size()}});
  }

 private:
  void check_layout(const std::vector<ParameterBlock<Scalar>>& blocks) {
    if (steps_ == 0 && block_sizes_.empty()) {
      Eigen::Index total = 0;
      for (const auto& block : blocks) {
        block_sizes_.push_back(block.size);
        total += block.size;
      }
      first_moment_ = Vector::Zero(total);
      second_moment_ = Vector::Zero(total);
      return;
    }
    bool same = blocks.size() == block_sizes_.size();
    for (std::size_t i = 0; same && i < blocks.size(); ++i) same = blocks[i].size == block_sizes_[i];
    if (!same) {
      throw std::invalid_argument("Adam step got " + std::to_string(blocks.size()) +
                                  " parameter blocks of other sizes than the " + std::to_string(block_sizes_.size()) +
                                  " blocks of its first step; pass the same blocks each step or call reset()");
    }
  }

  AdamParams params_;
  std::int64_t steps_ = 0;
  std::vector<Eigen::Index> block_sizes_;
  Vector first_moment_;
  Vector second_moment_;
};

}  // namespace cki
