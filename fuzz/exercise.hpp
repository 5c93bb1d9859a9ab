// Drives the checkpoint readers over untrusted files the way the library
// uses them, for the libFuzzer targets and the regression test that replays
// their findings.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "cki/io/safetensors.hpp"
#include "cki/io/sharded.hpp"

namespace cki_fuzz {

/// Adds every byte of `size` bytes at `data` into a sum the optimiser must
/// keep, so each byte of a mapped tensor is really read.
inline void touch(const void* data, std::size_t size) {
  static volatile std::uint8_t sink = 0;
  const auto* bytes = static_cast<const std::uint8_t*>(data);
  std::uint8_t sum = 0;
  for (std::size_t i = 0; i < size; ++i) sum = static_cast<std::uint8_t>(sum + bytes[i]);
  sink = static_cast<std::uint8_t>(sink + sum);
}

/// Reads every tensor of a loaded weight set, values and raw bytes alike.
template <typename Scalar>
void touch_set(const cki::WeightSet<Scalar>& set) {
  for (const auto& entry : set) {
    if (entry.spliceable()) {
      touch(entry.values.data(), static_cast<std::size_t>(entry.numel()) * sizeof(Scalar));
    } else {
      touch(entry.raw->data(), entry.raw->size());
    }
  }
}

/// Opens the safetensors file at `path`, reads every tensor with pread (as
/// the streaming merge does) and loads the file through its memory mapping
/// in float and in double (as load_safetensors does).
/// Throws what the readers throw; for any input, that must be
/// cki::FormatError or nothing.
inline void read_safetensors(const std::filesystem::path& path) {
  const cki::SafetensorsFile file(path);
  std::vector<float> values;
  std::vector<std::uint8_t> bytes;
  for (const cki::TensorInfo& info : file.tensors()) {
    if (file.find(info.name) != &info) throw std::logic_error("find() misses tensor '" + info.name + "'");
    if (cki::is_spliceable(info.dtype)) {
      values.resize(static_cast<std::size_t>(info.numel()));
      file.read(info, values.data());
      touch(values.data(), values.size() * sizeof(float));
    } else {
      bytes.resize(static_cast<std::size_t>(info.byte_size()));
      file.read_bytes(info, 0, bytes.size(), bytes.data());
      touch(bytes.data(), bytes.size());
    }
  }

  touch_set(cki::load_safetensors<float>(path));
  touch_set(cki::load_safetensors<double>(path));
}

/// Opens the checkpoint (file or folder, sharded or not) at `path`, reads
/// every tensor with pread and loads it as one weight set in float.
/// Throws what the readers throw; for any input, that must be
/// cki::FormatError or nothing.
inline void read_checkpoint(const std::filesystem::path& path) {
  const cki::Checkpoint checkpoint(path);
  std::vector<float> values;
  std::vector<std::uint8_t> bytes;
  for (const cki::CheckpointTensor& tensor : checkpoint.tensors()) {
    if (checkpoint.find(tensor.name()) != &tensor) {
      throw std::logic_error("find() misses tensor '" + tensor.name() + "'");
    }
    if (cki::is_spliceable(tensor.dtype())) {
      values.resize(static_cast<std::size_t>(tensor.info.numel()));
      checkpoint.read(tensor, values.data());
      touch(values.data(), values.size() * sizeof(float));
    } else {
      bytes.resize(static_cast<std::size_t>(tensor.info.byte_size()));
      checkpoint.read_bytes(tensor, 0, bytes.size(), bytes.data());
      touch(bytes.data(), bytes.size());
    }
  }

  touch_set(cki::load_checkpoint<float>(path));
}

namespace detail {

/// Replaces the file at `path` with `size` bytes at `data`.
/// Throws std::runtime_error when it cannot.
inline void store_file(const std::filesystem::path& path, const char* data, std::size_t size) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  const bool written = file != nullptr && std::fwrite(data, 1, size, file) == size;
  if (file == nullptr || std::fclose(file) != 0 || !written) {
    throw std::runtime_error("cannot write '" + path.string() + "'");
  }
}

/// Bytes of a valid safetensors file holding `tensors`, each byte 1,
/// written through `scratch`.
inline std::string valid_shard(const std::vector<cki::TensorSpec>& tensors, const std::filesystem::path& scratch) {
  {
    cki::SafetensorsWriter writer(scratch, tensors, {{"format", "pt"}}, true);
    while (const cki::TensorInfo* due = writer.due()) {
      const std::vector<std::uint8_t> ones(static_cast<std::size_t>(due->byte_size()), 1);
      writer.write_bytes(due->name, ones.data(), ones.size());
    }
    writer.commit();
  }
  std::ifstream in(scratch, std::ios::binary);
  std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  std::filesystem::remove(scratch);
  return bytes;
}

}  // namespace detail

/// A sharded checkpoint folder whose index and second shard come from a
/// fuzz input. Shard model-00001-of-00002.safetensors contains "a" (F32
/// [2, 3]) and "b" (I64 [2]), the spare shard extra.safetensors contains "d"
/// (BF16 [4]), and the default second shard contains "c" (F16 [3]).
///
/// An input is the text of model.safetensors.index.json, optionally
/// followed by a NUL byte and the bytes of model-00002-of-00002.safetensors,
/// which otherwise keeps its default contents. JSON text never contains a
/// raw NUL byte, so the split is unambiguous.
class IndexFixture {
 public:
  /// Creates the folder with a unique name inside `parent`.
  /// Throws std::runtime_error when it cannot.
  explicit IndexFixture(const std::filesystem::path& parent) {
    std::string pattern = (parent / ("cki-fuzz-index-" + std::to_string(::getpid()) + "-XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("cannot create a folder like " + pattern);
    folder_ = pattern;
    const std::filesystem::path scratch = folder_ / ".scratch.safetensors";
    const std::string first =
        detail::valid_shard({{"a", cki::DType::F32, {2, 3}}, {"b", cki::DType::I64, {2}}}, scratch);
    const std::string extra = detail::valid_shard({{"d", cki::DType::BF16, {4}}}, scratch);
    default_second_ = detail::valid_shard({{"c", cki::DType::F16, {3}}}, scratch);
    detail::store_file(folder_ / "model-00001-of-00002.safetensors", first.data(), first.size());
    detail::store_file(folder_ / "extra.safetensors", extra.data(), extra.size());
  }
  IndexFixture(const IndexFixture&) = delete;
  IndexFixture& operator=(const IndexFixture&) = delete;
  ~IndexFixture() {
    std::error_code ignored;
    std::filesystem::remove_all(folder_, ignored);
  }

  const std::filesystem::path& folder() const { return folder_; }

  /// Writes the index and the second shard that the input `data` describes.
  void store(const std::uint8_t* data, std::size_t size) const {
    const char* text = reinterpret_cast<const char*>(data);
    const void* separator = size == 0 ? nullptr : std::memchr(data, '\0', size);
    const std::size_t index_size =
        separator == nullptr ? size : static_cast<std::size_t>(static_cast<const std::uint8_t*>(separator) - data);
    detail::store_file(folder_ / cki::kIndexFileName, text, index_size);
    const std::filesystem::path second = folder_ / "model-00002-of-00002.safetensors";
    if (separator == nullptr) {
      detail::store_file(second, default_second_.data(), default_second_.size());
    } else {
      detail::store_file(second, text + index_size + 1, size - index_size - 1);
    }
  }

 private:
  std::filesystem::path folder_;
  std::string default_second_;
};

}  // namespace cki_fuzz
