// Saving and loading learned assessment maps as a safetensors file.
//
// A learned tensor NAME with K maps (1 shared, or N per model in input
// order) over its last dimension D is stored as these file tensors:
//   "NAME:map"          shape [K, D, D] for full maps (M row-major), [K, D] for diagonal maps
//   "NAME:bias"         shape [K, D]
//   "NAME:temperature"  rank 0, dtype F64, present only for a learned temperature
// Maps and biases use the compute scalar's dtype (F32 or F64).
// The metadata key "cki.learned_maps" contains JSON with the format version,
// the learn options, the model count, the base, the selection patterns and
// the names of every learned tensor. A rank-0 tensor has no map, so it may
// have no file tensor at all.
#pragma once

#include <cstddef>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "cki/errors.hpp"
#include "cki/io/safetensors.hpp"
#include "cki/learn/learned_maps.hpp"

namespace cki {

/// Metadata key of a learned-maps file.
inline constexpr const char* kLearnedMapsKey = "cki.learned_maps";
/// Version of the learned-maps layout that this code writes and reads.
inline constexpr int kLearnedMapsVersion = 1;

namespace detail {

inline constexpr const char* kMapSuffix = ":map";
inline constexpr const char* kBiasSuffix = ":bias";
inline constexpr const char* kTemperatureSuffix = ":temperature";

inline bool is_json_number(const nlohmann::json& value) { return value.is_number(); }
inline bool is_json_integer(const nlohmann::json& value) { return value.is_number_integer(); }
inline bool is_json_unsigned(const nlohmann::json& value) { return value.is_number_unsigned(); }
inline bool is_json_string(const nlohmann::json& value) { return value.is_string(); }
inline bool is_json_bool(const nlohmann::json& value) { return value.is_boolean(); }
inline bool is_json_object(const nlohmann::json& value) { return value.is_object(); }
inline bool is_json_array(const nlohmann::json& value) { return value.is_array(); }

/// Returns the JSON field `key` of `object`, throwing FormatError naming
/// `where` when it is missing or not of the type that `accepts` checks.
inline const nlohmann::json& json_field(const nlohmann::json& object, const char* key,
                                       bool (*accepts)(const nlohmann::json&), const char* expected,
                                       const std::string& where) {
  if (!object.is_object() || !object.contains(key)) {
    throw FormatError(where + " has no field '" + key + "'");
  }
  const nlohmann::json& value = object.at(key);
  if (!accepts(value)) {
    throw FormatError(where + " has field '" + key + "' = " + value.dump() + ", expected " + expected);
  }
  return value;
}

inline std::vector<std::string> json_strings(const nlohmann::json& object, const char* key, const std::string& where) {
  const auto& array = json_field(object, key, is_json_array, "an array of strings", where);
  std::vector<std::string> out;
  for (const auto& item : array) {
    if (!item.is_string()) throw FormatError(where + " has a non-string entry " + item.dump() + " in '" + key + "'");
    out.push_back(item.get<std::string>());
  }
  return out;
}

/// Parses LearnOptions as LearnOptions::to_json() writes them.
/// Throws FormatError naming `where` for a missing or invalid field.
inline LearnOptions learn_options_from_json(const nlohmann::json& json, const std::string& where) {
  LearnOptions options;
  const auto& params = json_field(json, "params", is_json_object, "an object", where);
  const std::string params_where = where + " options 'params'";
  options.params.bins = json_field(params, "bins", is_json_integer, "an integer", params_where).get<int>();
  options.params.a = json_field(params, "a", is_json_number, "a number", params_where).get<double>();
  options.params.c = json_field(params, "c", is_json_number, "a number", params_where).get<double>();
  options.params.scale = json_field(params, "scale", is_json_number, "a number", params_where).get<double>();
  options.params.temperature = json_field(params, "temperature", is_json_number, "a number", params_where).get<double>();
  const auto rule_text = json_field(params, "rule", is_json_string, "a rule name", params_where).get<std::string>();
  const auto rule = parse_rule(rule_text);
  if (!rule) throw FormatError(params_where + " has unknown rule '" + rule_text + "'");
  options.params.rule = *rule;

  const auto splice_text = json_field(json, "splice", is_json_string, "\"hard\" or \"soft\"", where).get<std::string>();
  if (splice_text != "hard" && splice_text != "soft") {
    throw FormatError(where + " has splice '" + splice_text + "', expected \"hard\" or \"soft\"");
  }
  options.hard = splice_text == "hard";
  const auto form_text = json_field(json, "map_form", is_json_string, "\"full\" or \"diagonal\"", where).get<std::string>();
  const auto form = parse_map_form(form_text);
  if (!form) throw FormatError(where + " has map_form '" + form_text + "', expected \"full\" or \"diagonal\"");
  options.map_form = *form;
  options.max_full_dim = json_field(json, "max_full_dim", is_json_integer, "an integer", where).get<std::int64_t>();
  options.per_model = json_field(json, "per_model", is_json_bool, "true or false", where).get<bool>();
  options.learn_temperature = json_field(json, "learn_temperature", is_json_bool, "true or false", where).get<bool>();
  return options;
}

/// Splits a file tensor name into the learned tensor's name and the suffix.
inline std::optional<std::pair<std::string, std::string>> split_learned_name(const std::string& name) {
  for (const char* suffix : {kMapSuffix, kBiasSuffix, kTemperatureSuffix}) {
    const std::string text(suffix);
    if (name.size() > text.size() && name.compare(name.size() - text.size(), text.size(), text) == 0) {
      return std::make_pair(name.substr(0, name.size() - text.size()), text);
    }
  }
  return std::nullopt;
}

}  // namespace detail

/// Writes `maps` to a safetensors file at `path`, built under a temporary
/// name and renamed into place. Throws std::invalid_argument when `maps`
/// fails LearnedMaps::check() or its maps within a tensor differ in form or
/// size, IoError when `path` exists and `overwrite` is false or the write
/// fails, and NumericError for a non-finite value.
template <typename Scalar>
void save_learned_maps(const std::filesystem::path& path, const LearnedMaps<Scalar>& maps, bool overwrite = false) {
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  maps.check();

  // Flatten every map and bias in row-major order, keyed by file tensor name.
  std::vector<TensorSpec> specs;
  std::map<std::string, std::vector<Scalar>> values;
  std::map<std::string, double> temperatures;
  nlohmann::json names = nlohmann::json::array();
  for (const auto& [name, tensor] : maps.tensors) {
    names.push_back(name);
    if (tensor.temperature) {
      specs.push_back({name + detail::kTemperatureSuffix, DType::F64, {}});
      temperatures.emplace(name + detail::kTemperatureSuffix, *tensor.temperature);
    }
    if (tensor.maps.empty()) continue;

    const auto count = static_cast<std::int64_t>(tensor.maps.size());
    const AssessmentMap<Scalar>& first = tensor.maps.front();
    const std::int64_t dim = first.weight.rows();
    std::vector<Scalar>& weights = values[name + detail::kMapSuffix];
    std::vector<Scalar>& biases = values[name + detail::kBiasSuffix];
    for (const AssessmentMap<Scalar>& map : tensor.maps) {
      map.check(dim, name);
      if (map.diagonal != first.diagonal) {
        throw std::invalid_argument("tensor '" + name + "' mixes full and diagonal learned maps");
      }
      const RowMatrix weight = map.weight;
      weights.insert(weights.end(), weight.data(), weight.data() + weight.size());
      if (map.bias.size() == 0) {
        biases.insert(biases.end(), static_cast<std::size_t>(dim), Scalar(0));
      } else {
        biases.insert(biases.end(), map.bias.data(), map.bias.data() + dim);
      }
    }
    const Shape map_shape = first.diagonal ? Shape{count, dim} : Shape{count, dim, dim};
    specs.push_back({name + detail::kMapSuffix, dtype_of<Scalar>(), map_shape});
    specs.push_back({name + detail::kBiasSuffix, dtype_of<Scalar>(), Shape{count, dim}});
  }

  // Metadata: everything needed to rebuild the learner or replay the merge.
  nlohmann::json header = {{"format_version", kLearnedMapsVersion},
                           {"options", maps.options.to_json()},
                           {"model_count", maps.model_count},
                           {"base", maps.base},
                           {"include", maps.include},
                           {"exclude", maps.exclude},
                           {"tensors", std::move(names)}};
  const std::map<std::string, std::string> metadata{{kLearnedMapsKey, header.dump()}};

  // Tensors in the order the writer lays them out.
  SafetensorsWriter writer(path, specs, metadata, overwrite);
  for (const TensorInfo& info : writer.layout()) {
    auto temperature = temperatures.find(info.name);
    if (temperature != temperatures.end()) {
      writer.write(info.name, &temperature->second, 1);
      continue;
    }
    const std::vector<Scalar>& data = values.at(info.name);
    writer.write(info.name, data.data(), data.size());
  }
  writer.commit();
}

/// Reads learned maps written by save_learned_maps(), converting the maps
/// to `Scalar`. Throws IoError when the file cannot be read, and FormatError
/// naming the file and the tensor or field for a file that is not a
/// learned-maps file, has another format version, or contains inconsistent
/// shapes or options.
template <typename Scalar>
LearnedMaps<Scalar> load_learned_maps(const std::filesystem::path& path) {
  using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const std::string where = "learned maps file '" + path.string() + "'";

  // Doubles hold F32 and F64 values exactly, so read as double, convert once.
  const WeightSet<double> file = load_safetensors<double>(path);
  auto found = file.metadata().find(kLearnedMapsKey);
  if (found == file.metadata().end()) {
    throw FormatError(where + " has no metadata key '" + kLearnedMapsKey + "'; it was not written by save_learned_maps");
  }
  const nlohmann::json header = detail::parse_json_strict(found->second, where + " metadata");
  const int version = detail::json_field(header, "format_version", detail::is_json_unsigned, "an integer", where).get<int>();
  if (version != kLearnedMapsVersion) {
    throw FormatError(where + " has format version " + std::to_string(version) + ", but this cki reads version " +
                      std::to_string(kLearnedMapsVersion));
  }

  // Options and selection from the metadata.
  LearnedMaps<Scalar> maps;
  const auto& options = detail::json_field(header, "options", detail::is_json_object, "an object", where);
  maps.options = detail::learn_options_from_json(options, where);
  maps.model_count = detail::json_field(header, "model_count", detail::is_json_unsigned, "an integer", where).get<std::size_t>();
  maps.base = detail::json_field(header, "base", detail::is_json_unsigned, "an integer", where).get<std::size_t>();
  maps.include = detail::json_strings(header, "include", where);
  maps.exclude = detail::json_strings(header, "exclude", where);
  for (const std::string& name : detail::json_strings(header, "tensors", where)) {
    if (!maps.tensors.emplace(name, LearnedTensor<Scalar>{}).second) {
      throw FormatError(where + " lists tensor '" + name + "' twice");
    }
  }

  // Tensors: every name must belong to a listed tensor.
  for (const auto& entry : file) {
    const auto parts = detail::split_learned_name(entry.name);
    if (!parts || maps.tensors.count(parts->first) == 0) {
      throw FormatError(where + " has an unexpected tensor '" + entry.name +
                        "'; expected NAME:map, NAME:bias or NAME:temperature for a NAME in the metadata's 'tensors'");
    }
    if (parts->second != detail::kTemperatureSuffix) continue;
    if (!entry.shape.empty()) {
      throw FormatError(where + " has temperature '" + entry.name + "' of shape " + shape_to_string(entry.shape) +
                        ", expected []");
    }
    maps.tensors[parts->first].temperature = file.view(entry.name)[0];
  }
  for (auto& [name, tensor] : maps.tensors) {
    const std::string map_name = name + detail::kMapSuffix;
    const std::string bias_name = name + detail::kBiasSuffix;
    if (!file.contains(map_name) && !file.contains(bias_name)) continue;
    if (!file.contains(map_name) || !file.contains(bias_name)) {
      throw FormatError(where + " has only one of '" + map_name + "' and '" + bias_name + "'");
    }
    const TensorView<double>& weight = file.view(map_name);
    const TensorView<double>& bias = file.view(bias_name);
    const Shape& shape = weight.shape();
    const bool diagonal = shape.size() == 2;
    const bool fits = (shape.size() == 2 || (shape.size() == 3 && shape[1] == shape[2])) &&
                      bias.shape() == Shape{shape[0], shape[1]};
    if (!fits) {
      throw FormatError(where + " has map '" + map_name + "' of shape " + shape_to_string(shape) + " and bias of shape " +
                        shape_to_string(bias.shape()) + ", expected [K, D, D] or [K, D] and [K, D]");
    }
    const std::int64_t count = shape[0];
    const std::int64_t dim = shape[1];
    const std::int64_t weight_size = diagonal ? dim : dim * dim;
    for (std::int64_t k = 0; k < count; ++k) {
      AssessmentMap<Scalar> map;
      map.diagonal = diagonal;
      const Eigen::Map<const RowMatrixD> stored(weight.data() + k * weight_size, dim, diagonal ? 1 : dim);
      map.weight = stored.template cast<Scalar>();
      map.bias = Eigen::Map<const Eigen::VectorXd>(bias.data() + k * dim, dim).template cast<Scalar>();
      tensor.maps.push_back(std::move(map));
    }
  }

  try {
    maps.check();
  } catch (const std::invalid_argument& error) {
    throw FormatError(where + " is inconsistent: " + error.what());
  }
  return maps;
}

}  // namespace cki
