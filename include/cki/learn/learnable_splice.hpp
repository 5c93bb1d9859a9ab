// LearnableSplice: one learnable assessment per selected tensor of N weight
// sets, with a whole-model forward and backward pass for a training loop.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cki/learn/adam.hpp"
#include "cki/learn/learnable_assessment.hpp"
#include "cki/learn/learned_maps.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// Learned CKI over whole models. The N weight sets stay fixed, and every
/// tensor that the selection splices gets a LearnableAssessment. A training loop
/// calls forward() for the merged weight set, computes the loss and
/// dLoss/dtheta* per merged tensor, passes those to backward(), and updates
/// the maps with step():
///
///     cki::LearnableSplice<float> learner(models, options);
///     cki::Adam<float> adam;  // learning rate 1e-3
///     for (each batch) {
///       cki::WeightSet<float> merged = learner.forward();
///       ... loss and gradients of the merged weights ...
///       learner.backward({{"fc.weight", gradient_view}, ...});
///       learner.step(adam);
///     }
///     cki::save_learned_maps("maps.safetensors", learner.learned_maps());
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class LearnableSplice {
 public:
  /// Sets up a learnable assessment, at identity maps, for every tensor that
  /// `selection` splices. The selection takes the base, include and exclude
  /// patterns as splice() does. Its `threads` are the threads of the
  /// information content, which the first forward() computes once per tensor.
  /// The sets share their storage with the caller's.
  /// Throws std::invalid_argument for N = 0, bad options or a rule that
  /// cannot combine N models, and MismatchError when the sets do not fit
  /// together.
  LearnableSplice(std::vector<WeightSet<Scalar>> models, LearnOptions options, SpliceOptions selection = {})
      : models_(std::move(models)), options_(std::move(options)), selection_(std::move(selection)) {
    if (models_.empty()) throw std::invalid_argument("no weight sets given; need at least one");
    selection_.check(models_.size());
    options_.check(models_.size());
    check_compatible(models_);
    for (const auto& entry : models_[selection_.base]) {
      if (copy_reason(selection_, entry.name, entry.dtype, entry.numel(), models_.size())) continue;
      index_.emplace(entry.name, assessments_.size());
      assessments_.emplace_back(entry.name, entry.shape, models_.size(), options_, selection_.base);
    }
  }

  /// Resumes from learned maps (a saved file): takes their options, base and
  /// selection, then their maps and temperatures. Throws as the other
  /// constructor and load_maps() do.
  LearnableSplice(std::vector<WeightSet<Scalar>> models, const LearnedMaps<Scalar>& maps)
      : LearnableSplice(std::move(models), maps.options, maps.splice_options()) {
    load_maps(maps);
  }

  const LearnOptions& options() const { return options_; }
  const SpliceOptions& selection() const { return selection_; }
  std::size_t model_count() const { return models_.size(); }

  /// Names of the learned tensors, in the base's tensor order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& assessment : assessments_) out.push_back(assessment.name());
    return out;
  }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  /// The assessment of learned tensor `name`. Throws std::invalid_argument
  /// when `name` is not learned.
  LearnableAssessment<Scalar>& assessment(const std::string& name) { return assessments_[find(name)]; }
  const LearnableAssessment<Scalar>& assessment(const std::string& name) const { return assessments_[find(name)]; }

  /// Total number of learned parameters.
  std::int64_t parameter_count() const {
    std::int64_t count = 0;
    for (const auto& assessment : assessments_) count += assessment.parameters().size();
    return count;
  }

  /// Merges the models with the current maps. Learned tensors are new
  /// tensors in the base's dtype. The others share the base's storage, and
  /// the metadata is the base's, as in splice(). Clears every gradient, so
  /// a tensor that backward() then leaves out has a zero gradient. The
  /// entropies and global weights come from the first forward(), because
  /// the models stay fixed.
  /// Throws NumericError for a learned temperature outside (0, 1e6], or for
  /// a non-finite input element while the first forward() scans the models.
  WeightSet<Scalar> forward() {
    const WeightSet<Scalar>& base = models_[selection_.base];
    WeightSet<Scalar> merged;
    merged.metadata() = base.metadata();
    for (const auto& entry : base) {
      auto found = index_.find(entry.name);
      if (found == index_.end()) {
        merged.insert(entry);
        continue;
      }
      std::vector<TensorView<Scalar>> views;
      for (const auto& set : models_) views.push_back(set.view(entry.name));
      LearnableAssessment<Scalar>& assessment = assessments_[found->second];
      assessment.zero_gradient();
      merged.add(entry.name, assessment.forward(views, selection_.threads), entry.dtype);
    }
    return merged;
  }

  /// Computes the gradient of learned tensor `name` from `gradient` =
  /// dLoss/dtheta* of that tensor at the last forward(). Throws
  /// std::invalid_argument for a name that is not learned or a gradient of
  /// another shape, and std::logic_error before forward().
  void backward(const std::string& name, const TensorView<Scalar>& gradient) {
    assessments_[find(name)].backward(gradient);
  }

  /// Computes the gradients of the named learned tensors. Tensors absent
  /// from `gradients` keep a zero gradient. Throws as the single-tensor form.
  void backward(const std::map<std::string, TensorView<Scalar>>& gradients) {
    for (const auto& [name, gradient] : gradients) backward(name, gradient);
  }

  /// Parameters and gradients of every learned tensor, in the order of names().
  std::vector<ParameterBlock<Scalar>> parameter_blocks() {
    std::vector<ParameterBlock<Scalar>> blocks;
    for (auto& assessment : assessments_) blocks.push_back(assessment.parameter_block());
    return blocks;
  }

  /// Updates every learned parameter with one step of `adam`.
  void step(Adam<Scalar>& adam) { adam.step(parameter_blocks()); }

  /// Returns the learned maps and temperatures, with the options and
  /// selection, for save_learned_maps() and splice_learned().
  LearnedMaps<Scalar> learned_maps() const {
    LearnedMaps<Scalar> out;
    out.options = options_;
    out.model_count = models_.size();
    out.base = selection_.base;
    out.include = selection_.include;
    out.exclude = selection_.exclude;
    for (const auto& assessment : assessments_) {
      LearnedTensor<Scalar> tensor;
      for (std::size_t map = 0; map < assessment.map_count(); ++map) tensor.maps.push_back(assessment.map(map));
      if (assessment.layout().has_temperature) tensor.temperature = assessment.temperature();
      out.tensors.emplace(assessment.name(), std::move(tensor));
    }
    return out;
  }

  /// Sets the maps and temperatures of every learned tensor from `maps`.
  /// Throws std::invalid_argument when `maps` was learned with other options,
  /// model count, base or selection, or lacks a tensor that is learned here
  /// or has one that is not, naming the tensor.
  void load_maps(const LearnedMaps<Scalar>& maps) {
    maps.check();
    check_same_setup(maps);
    for (auto& assessment : assessments_) {
      auto found = maps.tensors.find(assessment.name());
      if (found == maps.tensors.end()) {
        throw std::invalid_argument("learned maps have no entry for tensor '" + assessment.name() + "'");
      }
      const LearnedTensor<Scalar>& tensor = found->second;
      if (tensor.maps.size() != assessment.map_count()) {
        throw std::invalid_argument("tensor '" + assessment.name() + "' has " + std::to_string(tensor.maps.size()) +
                                    " learned maps, expected " + std::to_string(assessment.map_count()));
      }
      for (std::size_t map = 0; map < tensor.maps.size(); ++map) assessment.set_map(map, tensor.maps[map]);
      if (tensor.temperature) assessment.set_temperature(*tensor.temperature);
    }
    for (const auto& [name, tensor] : maps.tensors) {
      if (!contains(name)) {
        throw std::invalid_argument("learned maps have an entry for tensor '" + name +
                                    "', which the selection does not splice");
      }
    }
  }

 private:
  std::size_t find(const std::string& name) const {
    auto found = index_.find(name);
    if (found == index_.end()) {
      throw std::invalid_argument("tensor '" + name + "' is not learned; the selection does not splice it");
    }
    return found->second;
  }

  void check_same_setup(const LearnedMaps<Scalar>& maps) const {
    const auto differs = [](const char* field, const std::string& learner_value, const std::string& maps_value) {
      return std::invalid_argument("learned maps have " + std::string(field) + " " + maps_value +
                                   ", but this learner has " + learner_value);
    };
    if (maps.model_count != models_.size()) {
      throw differs("model count", std::to_string(models_.size()), std::to_string(maps.model_count));
    }
    if (maps.base != selection_.base) {
      throw differs("base model", std::to_string(selection_.base), std::to_string(maps.base));
    }
    if (maps.options.to_json() != options_.to_json()) {
      throw differs("options", options_.to_json().dump(), maps.options.to_json().dump());
    }
    if (maps.include != selection_.include || maps.exclude != selection_.exclude) {
      const nlohmann::json learner_selection = {{"include", selection_.include}, {"exclude", selection_.exclude}};
      const nlohmann::json maps_selection = {{"include", maps.include}, {"exclude", maps.exclude}};
      throw differs("selection", learner_selection.dump(), maps_selection.dump());
    }
  }

  std::vector<WeightSet<Scalar>> models_;
  LearnOptions options_;
  SpliceOptions selection_;
  std::vector<LearnableAssessment<Scalar>> assessments_;
  std::unordered_map<std::string, std::size_t> index_;
};

}  // namespace cki
