// Checkpoints as users hand them over: one safetensors file, or a folder
// holding model.safetensors or shards listed in model.safetensors.index.json.
// Reading validates every shard up front; writing shards by a maximum size.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/dtype.hpp"
#include "cki/errors.hpp"
#include "cki/io/atomic_file.hpp"
#include "cki/io/safetensors.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// File name of the weights of an unsharded checkpoint folder.
inline constexpr const char* kSingleFileName = "model.safetensors";
/// File name of the index of a sharded checkpoint folder.
inline constexpr const char* kIndexFileName = "model.safetensors.index.json";

/// One tensor of a checkpoint and the shard that stores it.
struct CheckpointTensor {
  /// Index of the shard in `Checkpoint::files()`.
  std::size_t file = 0;
  TensorInfo info;

  const std::string& name() const { return info.name; }
  DType dtype() const { return info.dtype; }
  const Shape& shape() const { return info.shape; }
};

namespace detail {

inline bool has_suffix(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// Finds the index file or the single weights file of a checkpoint folder.
/// Prefers model.safetensors.index.json, then model.safetensors, then the
/// only *.safetensors.index.json or the only *.safetensors file.
/// Throws FormatError when the folder contains none or several candidates.
inline std::filesystem::path find_checkpoint_entry(const std::filesystem::path& folder, bool& is_index) {
  namespace fs = std::filesystem;
  if (fs::is_regular_file(folder / kIndexFileName)) {
    is_index = true;
    return folder / kIndexFileName;
  }
  if (fs::is_regular_file(folder / kSingleFileName)) {
    is_index = false;
    return folder / kSingleFileName;
  }

  std::vector<fs::path> indexes;
  std::vector<fs::path> files;
  for (const auto& item : fs::directory_iterator(folder)) {
    const std::string name = item.path().filename().string();
    if (!item.is_regular_file()) continue;
    if (has_suffix(name, ".safetensors.index.json")) indexes.push_back(item.path());
    if (has_suffix(name, ".safetensors")) files.push_back(item.path());
  }
  std::sort(indexes.begin(), indexes.end());
  std::sort(files.begin(), files.end());
  if (indexes.size() == 1) {
    is_index = true;
    return indexes.front();
  }
  if (indexes.empty() && files.size() == 1) {
    is_index = false;
    return files.front();
  }

  std::string found;
  for (const auto& path : indexes.empty() ? files : indexes) found += " '" + path.filename().string() + "'";
  if (found.empty()) {
    throw FormatError("folder '" + folder.string() + "' contains no safetensors checkpoint: neither '" +
                      kIndexFileName + "' nor any .safetensors file");
  }
  throw FormatError("folder '" + folder.string() + "' contains several candidate checkpoints (" + found.substr(1) +
                    ") and no '" + kIndexFileName + "'; pass one file instead");
}

}  // namespace detail

/// A checkpoint opened for reading: a single safetensors file, or a folder
/// (unsharded, or sharded with an index). Every file is validated when the
/// checkpoint opens. Tensors keep shard order (by file name), then data order.
class Checkpoint {
 public:
  /// Opens the checkpoint at `path`, a .safetensors file or a folder.
  /// Throws IoError when a file cannot be read. Throws FormatError for a
  /// malformed file or index, a missing shard (naming index and shard), a
  /// tensor listed in the index but absent from its shard (naming both), and
  /// a tensor in a shard that the index does not list.
  explicit Checkpoint(std::filesystem::path path) : path_(std::move(path)) {
    namespace fs = std::filesystem;
    if (!fs::exists(path_)) throw IoError("checkpoint '" + path_.string() + "' does not exist");
    if (!fs::is_directory(path_)) {
      add_file(path_);
      return;
    }

    folder_ = true;
    bool is_index = false;
    const fs::path entry = detail::find_checkpoint_entry(path_, is_index);
    if (is_index) {
      open_index(entry);
    } else {
      add_file(entry);
    }
  }

  /// The path this checkpoint was opened from.
  const std::filesystem::path& path() const { return path_; }
  /// True when the checkpoint is a folder rather than a single file.
  bool is_folder() const { return folder_; }
  /// The index file of a sharded checkpoint; empty otherwise.
  const std::filesystem::path& index_path() const { return index_path_; }
  /// The safetensors files, in shard order.
  const std::vector<SafetensorsFile>& files() const { return files_; }
  const std::vector<CheckpointTensor>& tensors() const { return tensors_; }

  /// Metadata of the shards, merged in shard order; where shards disagree
  /// on a key, the first shard's value is kept.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Returns the tensor named `name`, or null when the checkpoint has none.
  const CheckpointTensor* find(const std::string& name) const {
    auto found = index_.find(name);
    return found == index_.end() ? nullptr : &tensors_[found->second];
  }

  /// Path of the file that stores `tensor`.
  const std::filesystem::path& file_of(const CheckpointTensor& tensor) const { return files_[tensor.file].path(); }

  /// Reads a floating tensor into `out` in the compute scalar (see
  /// SafetensorsFile::read).
  template <typename Scalar>
  void read(const CheckpointTensor& tensor, Scalar* out) const {
    files_[tensor.file].read(tensor.info, out);
  }

  /// Reads `size` raw bytes of `tensor` from `offset` on.
  void read_bytes(const CheckpointTensor& tensor, std::uint64_t offset, std::size_t size, std::uint8_t* out) const {
    files_[tensor.file].read_bytes(tensor.info, offset, size, out);
  }

  /// Total bytes of tensor data.
  std::uint64_t data_bytes() const {
    std::uint64_t total = 0;
    for (const auto& tensor : tensors_) total += tensor.info.byte_size();
    return total;
  }

  /// Returns every file of the checkpoint: shards and index.
  std::vector<std::filesystem::path> file_paths() const {
    std::vector<std::filesystem::path> paths;
    for (const auto& file : files_) paths.push_back(file.path());
    if (!index_path_.empty()) paths.push_back(index_path_);
    return paths;
  }

 private:
  void add_file(const std::filesystem::path& path) {
    files_.emplace_back(path);
    const std::size_t file = files_.size() - 1;
    for (const TensorInfo& info : files_.back().tensors()) {
      if (index_.count(info.name) != 0) {
        throw FormatError("tensor '" + info.name + "' is stored twice: in '" +
                          files_[tensors_[index_.at(info.name)].file].path().string() + "' and in '" +
                          path.string() + "'");
      }
      index_.emplace(info.name, tensors_.size());
      tensors_.push_back({file, info});
    }
    for (const auto& [key, value] : files_.back().metadata()) metadata_.emplace(key, value);
  }

  void open_index(const std::filesystem::path& index_path) {
    namespace fs = std::filesystem;
    index_path_ = index_path;
    const std::string where = "index '" + index_path.string() + "'";

    // Index: a JSON object with a weight_map of tensor name to shard file.
    const nlohmann::json root = detail::parse_json_strict(read_text(index_path), where);
    if (!root.is_object()) throw FormatError(where + " is a JSON " + std::string(root.type_name()) + ", not an object");
    if (!root.contains("weight_map")) throw FormatError(where + " has no 'weight_map'");
    const nlohmann::json& weight_map = root.at("weight_map");
    if (!weight_map.is_object()) {
      throw FormatError(where + " has a 'weight_map' of type " + std::string(weight_map.type_name()) +
                        ", not an object of tensor name to shard file name");
    }
    if (root.contains("metadata")) {
      const nlohmann::json& metadata = root.at("metadata");
      if (!metadata.is_object()) throw FormatError(where + " has 'metadata' " + metadata.dump() + ", not an object");
      // NOTE: total_size is checked for type only. Writers disagree on what it
      // counts, so a value that differs from the tensor bytes is accepted.
      if (metadata.contains("total_size") &&
          !(metadata.at("total_size").is_number() && metadata.at("total_size") >= 0)) {
        throw FormatError(where + " has 'metadata.total_size' " + metadata.at("total_size").dump() +
                          ", not a non-negative number");
      }
    }

    // Shards: plain file names inside the folder, each opened once.
    std::map<std::string, std::vector<std::string>> listed;  // shard -> tensors
    for (const auto& item : weight_map.items()) {
      if (!item.value().is_string()) {
        throw FormatError(where + " maps tensor '" + item.key() + "' to " + item.value().dump() +
                          ", not a shard file name");
      }
      const std::string shard = item.value().get<std::string>();
      const fs::path shard_path(shard);
      if (shard.empty() || shard_path.has_parent_path() || shard == "." || shard == ".." ||
          shard.find('\0') != std::string::npos) {
        throw FormatError(where + " maps tensor '" + item.key() + "' to " + item.value().dump() +
                          "; a shard must be a file name inside the checkpoint folder");
      }
      listed[shard].push_back(item.key());
    }
    for (const auto& [shard, names] : listed) {
      const fs::path shard_path = index_path.parent_path() / shard;
      check_shard_file(shard_path, where, names.front());
      add_file(shard_path);
    }

    // Every tensor listed must be in its shard, and every stored tensor listed.
    for (const auto& [shard, names] : listed) {
      for (const std::string& name : names) {
        const CheckpointTensor* tensor = find(name);
        if (tensor == nullptr || files_[tensor->file].path().filename() != shard) {
          throw FormatError("tensor '" + name + "' is listed in " + where + " under shard '" +
                            (index_path.parent_path() / shard).string() + "', but that shard has no such tensor");
        }
      }
    }
    for (const CheckpointTensor& tensor : tensors_) {
      if (!weight_map.contains(tensor.name())) {
        throw FormatError("tensor '" + tensor.name() + "' of shard '" + files_[tensor.file].path().string() +
                          "' is not listed in " + where);
      }
    }
  }

  // Checks that the shard `path` listed in the index `where` for `tensor`
  // is an existing regular file. Throws FormatError for a missing shard, a
  // shard that is not a regular file and a name too long for the file
  // system, and IoError when the shard's status cannot be read.
  static void check_shard_file(const std::filesystem::path& path, const std::string& where,
                               const std::string& tensor) {
    namespace fs = std::filesystem;
    const std::string shard = "shard '" + path.string() + "' listed in " + where + " for tensor '" + tensor + "'";
    std::error_code error;
    const fs::file_status status = fs::status(path, error);
    if (error == std::errc::no_such_file_or_directory || error == std::errc::not_a_directory) {
      throw FormatError(shard + " does not exist");
    }
    if (error == std::errc::filename_too_long) throw FormatError(shard + " has a name too long for the file system");
    if (error) throw IoError("cannot read the status of " + shard + ": " + error.message());
    if (!fs::is_regular_file(status)) throw FormatError(shard + " is not a regular file");
  }

  static std::string read_text(const std::filesystem::path& path) {
    std::FILE* file = std::fopen(path.c_str(), "rb");
    if (file == nullptr) throw IoError("cannot open '" + path.string() + "': " + detail::errno_text(errno));
    std::string text;
    char buffer[65536];
    std::size_t got = 0;
    while ((got = std::fread(buffer, 1, sizeof buffer, file)) > 0) text.append(buffer, got);
    const bool failed = std::ferror(file) != 0;
    std::fclose(file);
    if (failed) throw IoError("cannot read '" + path.string() + "'");
    return text;
  }

  std::filesystem::path path_;
  bool folder_ = false;
  std::filesystem::path index_path_;
  std::vector<SafetensorsFile> files_;
  std::vector<CheckpointTensor> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Loads a checkpoint (a .safetensors file or a checkpoint folder, sharded or
/// not) as one weight set in the compute scalar. Each dtype is kept as
/// load_safetensors keeps it, and the set's source is `path`.
/// Throws IoError and FormatError as Checkpoint does.
template <typename Scalar>
WeightSet<Scalar> load_checkpoint(const std::filesystem::path& path) {
  const Checkpoint checkpoint(path);
  WeightSet<Scalar> set(path.string());
  for (const SafetensorsFile& file : checkpoint.files()) detail::add_file_tensors(file, file.map(), set);
  set.metadata() = checkpoint.metadata();
  return set;
}

/// Options for writing a weight set or a merge.
struct WriteOptions {
  /// Storage dtype for every floating tensor (F16, BF16, F32 or F64);
  /// unset keeps each tensor's own dtype. Integer, BOOL and F8 tensors always
  /// keep their own.
  std::optional<DType> out_dtype;
  /// Maximum bytes of tensor data per shard of a folder output; 0 writes
  /// one file. A tensor larger than the limit gets a shard of its own.
  std::uint64_t max_shard_size = 0;
  /// Replace an existing output; without it an existing output is an error.
  bool overwrite = false;
  /// Write a finite value beyond its output dtype's range (above 65504 for
  /// F16, say) as the dtype's largest finite value with the value's sign.
  /// Without it such a value raises NumericError.
  bool clamp = false;

  /// Throws std::invalid_argument naming the field and the allowed values.
  void check() const {
    if (out_dtype && !is_spliceable(*out_dtype)) {
      throw std::invalid_argument(std::string("'out_dtype' must be F16, BF16, F32 or F64, got ") +
                                  dtype_name(*out_dtype));
    }
  }
};

/// True when `path` names a single-file output: its name ends in
/// ".safetensors". Any other path is written as a checkpoint folder.
inline bool is_file_output(const std::filesystem::path& path) {
  return detail::has_suffix(path.filename().string(), ".safetensors");
}

/// Name of shard `index` (0-based) of `count`: model-00001-of-00003.safetensors.
inline std::string shard_file_name(std::size_t index, std::size_t count) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

/// Writes a checkpoint tensor by tensor: one .safetensors file when the path
/// ends in ".safetensors", otherwise a folder holding model.safetensors, or
/// shards and model.safetensors.index.json when the data exceeds
/// `max_shard_size`. A folder is assembled under a temporary name beside the
/// target (see AtomicFolder) and a file likewise (see AtomicFile), so
/// nothing appears at the target before `commit()`.
///
/// Tensors are written in the order `order()` gives, each with one or more
/// `write` or `write_bytes` calls; see SafetensorsWriter.
class CheckpointWriter {
 public:
  /// Plans the shards and opens the first file.
  /// Throws std::invalid_argument for invalid options or for sharding a
  /// single-file output. Throws IoError when the output exists and
  /// `options.overwrite` is false, when the output is a folder that contains
  /// no safetensors checkpoint (replacing it would delete other files), and
  /// when the output cannot be created.
  CheckpointWriter(std::filesystem::path path, std::vector<TensorSpec> tensors,
                   std::map<std::string, std::string> metadata, const WriteOptions& options)
      : target_(std::move(path)), metadata_(std::move(metadata)), options_(options) {
    options_.check();
    if (options_.out_dtype) {
      for (TensorSpec& spec : tensors) {
        if (is_spliceable(spec.dtype)) spec.dtype = *options_.out_dtype;
      }
    }
    detail::sort_for_writing(tensors);

    // Shards: consecutive runs of the sorted tensors up to the size limit.
    std::uint64_t shard_bytes = 0;
    shards_.emplace_back();
    for (TensorSpec& spec : tensors) {
      const std::uint64_t bytes = static_cast<std::uint64_t>(shape_numel(spec.shape)) * dtype_size(spec.dtype);
      total_bytes_ += bytes;
      if (options_.max_shard_size > 0 && shard_bytes > 0 && shard_bytes + bytes > options_.max_shard_size) {
        shards_.emplace_back();
        shard_bytes = 0;
      }
      shard_bytes += bytes;
      order_.push_back(spec.name);
      shards_.back().push_back(std::move(spec));
    }

    if (is_file_output(target_)) {
      if (shards_.size() > 1) {
        throw std::invalid_argument("output '" + target_.string() + "' is a single file, but " +
                                    std::to_string(total_bytes_) + " bytes of tensors exceed the shard size of " +
                                    std::to_string(options_.max_shard_size) + " bytes; give a folder to shard into");
      }
      AtomicFile::check_target(target_, options_.overwrite);
      with_output_named([this] { open_shard(); });
      return;
    }

    check_replaceable_folder();
    folder_.emplace(target_, options_.overwrite);
    with_output_named([this] { open_shard(); });
  }

  /// Tensor names in the order they must be written.
  const std::vector<std::string>& order() const { return order_; }
  /// Total bytes of tensor data the checkpoint will hold.
  std::uint64_t total_bytes() const { return total_bytes_; }
  std::size_t shard_count() const { return shards_.size(); }
  const std::filesystem::path& target() const { return target_; }

  /// The temporary folder that becomes the output, for files written beside
  /// the weights; empty for a single-file output.
  std::filesystem::path folder() const { return folder_ ? folder_->path() : std::filesystem::path(); }

  /// Appends values of tensor `name`, converting them to its output dtype,
  /// and clamping values beyond its range when WriteOptions::clamp is set.
  /// NaN and infinity are written only when `allow_non_finite` is true.
  /// Returns the number of values clamped. Throws as SafetensorsWriter::write does.
  template <typename Scalar>
  std::uint64_t write(const std::string& name, const Scalar* values, std::size_t count, bool allow_non_finite = true) {
    std::uint64_t clamped = 0;
    with_output_named([&] {
      clamped = writer_->write(name, values, count, ValueChecks{options_.clamp, allow_non_finite});
      next_if_done();
    });
    return clamped;
  }

  /// Appends raw bytes of tensor `name`. Throws as SafetensorsWriter::write_bytes does.
  void write_bytes(const std::string& name, const std::uint8_t* bytes, std::size_t size) {
    with_output_named([&] {
      writer_->write_bytes(name, bytes, size);
      next_if_done();
    });
  }

  /// Returns the output dtype of tensor `name` (after `out_dtype` applies).
  /// Throws std::out_of_range for an unknown name.
  DType dtype_of_tensor(const std::string& name) const {
    for (const auto& shard : shards_) {
      for (const auto& spec : shard) {
        if (spec.name == name) return spec.dtype;
      }
    }
    throw std::out_of_range("tensor '" + name + "' is not part of the output '" + target_.string() + "'");
  }

  /// Finishes the last shard, writes the index of a sharded output and
  /// renames the output into place. Throws std::logic_error when tensors
  /// are missing, IoError when a write or rename fails.
  void commit() {
    next_if_done();
    if (const TensorInfo* missing = writer_->due()) {
      throw std::logic_error("tensor '" + missing->name + "' of output '" + target_.string() +
                             "' is not complete; write every tensor before commit");
    }
    if (!folder_) {
      writer_->commit();
      writer_.reset();
      return;
    }

    // The last shard and the index go into the temporary folder, which
    // becomes the output only at the rename.
    with_output_named([this] {
      writer_->commit();
      writer_.reset();
      if (shards_.size() > 1) write_index();
    });
    folder_->commit();
  }

 private:
  void open_shard() {
    std::filesystem::path path = target_;
    bool overwrite = options_.overwrite;
    if (folder_) {
      path = folder_->path() / (shards_.size() == 1 ? std::string(kSingleFileName)
                                                     : shard_file_name(shard_, shards_.size()));
      overwrite = false;
    }
    writer_.emplace(path, shards_[shard_], metadata_, overwrite);
  }

  void write_index() const {
    nlohmann::json index;
    index["metadata"] = {{"total_size", total_bytes_}};
    index["weight_map"] = nlohmann::json::object();
    for (std::size_t s = 0; s < shards_.size(); ++s) {
      for (const auto& spec : shards_[s]) index["weight_map"][spec.name] = shard_file_name(s, shards_.size());
    }
    const std::string text = index.dump(2) + "\n";
    AtomicFile file(folder_->path() / kIndexFileName);
    file.write(text.data(), text.size());
    file.commit();
  }

  // Runs `step`, naming the output in any IoError it throws. Until the
  // final rename the output exists only under a temporary name, so a failed
  // step leaves the output path as it was.
  template <typename Step>
  void with_output_named(Step&& step) {
    try {
      step();
    } catch (const IoError& error) {
      throw IoError("cannot write the output '" + target_.string() + "', which is left unchanged: " + error.what());
    }
  }

  // Commits a complete shard and opens the next. The last shard waits for
  // commit(), so a single-file output appears only then.
  void next_if_done() {
    while (writer_->due() == nullptr && shard_ + 1 < shards_.size()) {
      writer_->commit();
      writer_.reset();
      ++shard_;
      open_shard();
    }
  }

  // Replacing a folder deletes it, so only a checkpoint folder or an empty
  // one may be replaced.
  void check_replaceable_folder() const {
    namespace fs = std::filesystem;
    if (!options_.overwrite || !detail::path_exists(target_)) return;
    if (!fs::is_directory(target_)) return;
    bool empty = true;
    bool checkpoint = false;
    for (const auto& item : fs::directory_iterator(target_)) {
      empty = false;
      const std::string name = item.path().filename().string();
      checkpoint = checkpoint || detail::has_suffix(name, ".safetensors") ||
                   detail::has_suffix(name, ".safetensors.index.json");
    }
    if (!empty && !checkpoint) {
      throw IoError("output folder '" + target_.string() +
                    "' exists and contains no safetensors checkpoint, so it is not replaced; remove it or choose another output");
    }
  }

  std::filesystem::path target_;
  std::map<std::string, std::string> metadata_;
  WriteOptions options_;
  std::vector<std::vector<TensorSpec>> shards_;
  std::vector<std::string> order_;
  std::uint64_t total_bytes_ = 0;
  std::optional<AtomicFolder> folder_;
  std::optional<SafetensorsWriter> writer_;
  std::size_t shard_ = 0;
};

/// Writes a weight set as a checkpoint: a .safetensors file, or a folder
/// (sharded by `options.max_shard_size`); see CheckpointWriter. Floating
/// tensors are converted from the compute scalar to their dtype (or
/// `options.out_dtype`), other tensors written as their raw bytes. The
/// metadata is the set's. `inputs` lists paths the output must never
/// replace; the set's source is added when it names an existing path.
/// Throws std::invalid_argument for invalid options, IoError as
/// CheckpointWriter, check_not_input and check_free_space do, NumericError
/// naming the tensor, index and value when a value lies beyond its output
/// dtype.
template <typename Scalar>
void save_checkpoint(const WeightSet<Scalar>& set, const std::filesystem::path& path, const WriteOptions& options = {},
                     std::vector<std::filesystem::path> inputs = {}) {
  if (!set.source().empty() && detail::path_exists(set.source())) inputs.emplace_back(set.source());
  check_not_input(path, inputs);

  // Free space for the tensor data, their header entries and 1 MiB for
  // metadata and a shard index, as an upper estimate.
  std::vector<TensorSpec> specs;
  std::uint64_t planned_bytes = std::uint64_t{1} << 20;
  for (const auto& entry : set) {
    specs.push_back({entry.name, entry.dtype, entry.shape});
    const DType out_dtype = options.out_dtype && entry.spliceable() ? *options.out_dtype : entry.dtype;
    planned_bytes += static_cast<std::uint64_t>(entry.numel()) * dtype_size(out_dtype) + 6 * entry.name.size() +
                     21 * (entry.shape.size() + 2) + 64;
  }
  check_free_space(path, planned_bytes);

  CheckpointWriter writer(path, std::move(specs), set.metadata(), options);
  for (const std::string& name : writer.order()) {
    const auto& entry = set.at(name);
    if (entry.spliceable()) {
      writer.write(name, entry.values.data(), static_cast<std::size_t>(entry.numel()));
    } else {
      writer.write_bytes(name, entry.raw->data(), entry.raw->size());
    }
  }
  writer.commit();
}

}  // namespace cki
