// Safetensors files: a validating reader (pread for streaming, mmap for
// loading whole weight sets) and an atomic writer.
//
// Format: an 8-byte little-endian header length n, n bytes of JSON header,
// then the tensor data. The header maps each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end]}, offsets counted from the
// first byte after the header, plus an optional "__metadata__" map of
// strings to strings.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/dtype.hpp"
#include "cki/errors.hpp"
#include "cki/io/atomic_file.hpp"
#include "cki/io/half.hpp"
#include "cki/tensor.hpp"
#include "cki/weight_set.hpp"

namespace cki {

/// Largest header a reader accepts, in bytes, as the reference safetensors
/// implementation limits it.
inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

/// Key of the string-to-string metadata map in a safetensors header.
inline constexpr const char* kMetadataKey = "__metadata__";

/// One tensor of a safetensors file as its header describes it.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  /// Byte range [begin, end) relative to the start of the data section.
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  std::int64_t numel() const { return shape_numel(shape); }
  std::uint64_t byte_size() const { return end - begin; }
};

namespace detail {

/// Size of the chunks that streamed reads and writes convert at a time.
inline constexpr std::size_t kChunkBytes = std::size_t{1} << 20;

/// Returns the offset of the first byte that breaks UTF-8 in `text`, or
/// nothing when all of it is valid (no overlong forms, no surrogates, no
/// code point above U+10FFFF).
inline std::optional<std::size_t> find_invalid_utf8(const std::string& text) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t size = text.size();
  std::size_t i = 0;
  while (i < size) {
    const unsigned char lead = bytes[i];
    if (lead < 0x80) {
      ++i;
      continue;
    }

    // Sequence length and the allowed range of the second byte (RFC 3629).
    std::size_t length = 0;
    unsigned char low = 0x80;
    unsigned char high = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      if (lead == 0xE0) low = 0xA0;
      if (lead == 0xED) high = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      if (lead == 0xF0) low = 0x90;
      if (lead == 0xF4) high = 0x8F;
    } else {
      return i;
    }
    if (i + length > size) return i;
    if (bytes[i + 1] < low || bytes[i + 1] > high) return i + 1;
    for (std::size_t k = 2; k < length; ++k) {
      if (bytes[i + k] < 0x80 || bytes[i + k] > 0xBF) return i + k;
    }
    i += length;
  }
  return std::nullopt;
}

/// Deepest nesting of arrays and objects that parse_json_strict accepts.
/// Safetensors headers and shard indexes nest 3 levels. nlohmann::json
/// serialises recursively, so dumping a value nested a million levels (as
/// error messages do) would overflow the stack.
inline constexpr int kMaxJsonDepth = 64;

/// Parses JSON text, rejecting a key that repeats within one object, which
/// nlohmann::json would otherwise resolve silently to the last value, and
/// nesting deeper than kMaxJsonDepth.
/// `description` names the text in messages ("header of 'a.safetensors'").
/// Throws FormatError for invalid JSON, a duplicate key or deep nesting.
inline nlohmann::json parse_json_strict(const std::string& text, const std::string& description) {
  std::vector<std::set<std::string>> open_objects;
  auto check_keys = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if ((event == Event::object_start || event == Event::array_start) && depth >= kMaxJsonDepth) {
      throw FormatError(description + " nests arrays and objects more than " + std::to_string(kMaxJsonDepth) +
                        " levels deep");
    }
    if (event == Event::object_start) open_objects.emplace_back();
    if (event == Event::object_end && !open_objects.empty()) open_objects.pop_back();
    if (event == Event::key && !open_objects.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) {
        throw FormatError(description + " has the key '" + key + "' twice");
      }
    }
    return true;
  };
  // Besides parse_error, the parser throws out_of_range for a number beyond
  // double's range ("1e999"), so every json exception counts as invalid JSON.
  try {
    return nlohmann::json::parse(text, check_keys);
  } catch (const nlohmann::json::exception& error) {
    throw FormatError(description + " is not valid JSON: " + error.what());
  }
}

/// Multiplies two sizes, returning nothing on overflow.
inline std::optional<std::uint64_t> checked_multiply(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

/// Validates one header entry and returns it as a TensorInfo.
/// Throws FormatError naming `path`, the tensor and the offending value.
inline TensorInfo parse_tensor_entry(const std::string& path, const std::string& name,
                                     const nlohmann::json& entry) {
  const std::string where = "tensor '" + name + "' in '" + path + "'";
  if (!entry.is_object()) {
    throw FormatError(where + " is described by " + std::string(entry.type_name()) +
                      " " + entry.dump() + ", not a JSON object");
  }
  for (const auto& field : entry.items()) {
    if (field.key() != "dtype" && field.key() != "shape" && field.key() != "data_offsets") {
      throw FormatError(where + " has the unknown field '" + field.key() +
                        "'; expected only dtype, shape and data_offsets");
    }
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(field)) throw FormatError(where + " has no '" + field + "' field");
  }

  TensorInfo info;
  info.name = name;

  // dtype: one of the format's names.
  const nlohmann::json& dtype = entry.at("dtype");
  if (!dtype.is_string()) {
    throw FormatError(where + " has dtype " + dtype.dump() + ", which is not a string");
  }
  const auto parsed_dtype = parse_dtype(dtype.get<std::string>());
  if (!parsed_dtype) {
    throw FormatError(where + " has the unknown dtype " + dtype.dump() +
                      "; expected BOOL, U8, I8, U16, I16, U32, I32, U64, I64, F8_E4M3, F8_E5M2, "
                      "F16, BF16, F32 or F64");
  }
  info.dtype = *parsed_dtype;

  // shape: non-negative integers whose product fits in 64 bits.
  const nlohmann::json& shape = entry.at("shape");
  if (!shape.is_array()) throw FormatError(where + " has shape " + shape.dump() + ", which is not an array");
  std::uint64_t numel = 1;
  for (const nlohmann::json& dim : shape) {
    if (!dim.is_number_integer()) {
      throw FormatError(where + " has shape " + shape.dump() + " with the non-integer dimension " + dim.dump());
    }
    if (!dim.is_number_unsigned()) {
      throw FormatError(where + " has shape " + shape.dump() + " with the negative dimension " + dim.dump());
    }
    const auto value = dim.get<std::uint64_t>();
    const auto product = checked_multiply(numel, value);
    if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) || !product ||
        *product > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      throw FormatError(where + " has shape " + shape.dump() + ", whose element count overflows 64 bits");
    }
    numel = *product;
    info.shape.push_back(static_cast<std::int64_t>(value));
  }

  // data_offsets: [begin, end] with begin <= end.
  const nlohmann::json& offsets = entry.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned()) {
    throw FormatError(where + " has data_offsets " + offsets.dump() +
                      "; expected two non-negative integers [begin, end]");
  }
  info.begin = offsets[0].get<std::uint64_t>();
  info.end = offsets[1].get<std::uint64_t>();
  if (info.begin > info.end) {
    throw FormatError(where + " has data_offsets " + offsets.dump() + " whose begin is past its end");
  }

  // Byte length: element count times dtype size.
  const auto expected = checked_multiply(numel, dtype_size(info.dtype));
  if (!expected) {
    throw FormatError(where + " has shape " + shape.dump() + " and dtype " + dtype_name(info.dtype) +
                      ", whose byte size overflows 64 bits");
  }
  if (*expected != info.byte_size()) {
    throw FormatError(where + " has shape " + shape_to_string(info.shape) + " and dtype " +
                      dtype_name(info.dtype) + ", which need " + std::to_string(*expected) +
                      " bytes, but data_offsets " + offsets.dump() + " span " +
                      std::to_string(info.byte_size()));
  }
  return info;
}

/// Checks that the byte ranges of `tensors`, sorted by begin, start at 0 and
/// follow each other with no gap or overlap. Throws FormatError.
inline void check_contiguous(const std::string& path, const std::vector<TensorInfo>& tensors) {
  std::uint64_t expected = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& info : tensors) {
    const std::string range = "[" + std::to_string(info.begin) + ", " + std::to_string(info.end) + ")";
    if (info.begin > expected) {
      throw FormatError("tensor '" + info.name + "' in '" + path + "' starts at byte " +
                        std::to_string(info.begin) + " of the data section, leaving a gap after " +
                        (previous ? "tensor '" + previous->name + "', which ends at byte " + std::to_string(expected)
                                  : std::string("the start of the data section")));
    }
    if (info.begin < expected) {
      throw FormatError("tensor '" + info.name + "' in '" + path + "' occupies bytes " + range +
                        ", overlapping tensor '" + previous->name + "', which ends at byte " +
                        std::to_string(expected));
    }
    expected = info.end;
    previous = &info;
  }
}

/// An open file descriptor, closed when the last owner lets go.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_ = -1;
};

}  // namespace detail

/// A whole file mapped read-only into memory, unmapped on destruction.
class MappedFile {
 public:
  MappedFile(int fd, std::uint64_t size, const std::string& path) : size_(size) {
    if (size_ == 0) return;
    void* address = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (address == MAP_FAILED) {
      throw IoError("cannot map '" + path + "' (" + std::to_string(size_) +
                    " bytes) into memory: " + detail::errno_text(errno));
    }
    data_ = static_cast<const std::uint8_t*>(address);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_);
  }

  const std::uint8_t* data() const { return data_; }
  std::uint64_t size() const { return size_; }

  /// Drops the pages wholly inside [offset, offset + size) from this
  /// process's resident memory. Later reads fault them back in from the file.
  void release(std::uint64_t offset, std::uint64_t size) const {
    const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    const std::uint64_t first = (offset + page - 1) / page * page;
    const std::uint64_t last = (offset + size) / page * page;
    if (data_ == nullptr || last <= first) return;
    ::madvise(const_cast<std::uint8_t*>(data_) + first, last - first, MADV_DONTNEED);
  }

 private:
  const std::uint8_t* data_ = nullptr;
  std::uint64_t size_ = 0;
};

/// A safetensors file, opened and validated in full before any tensor is
/// read: header length, UTF-8, JSON, every entry, offsets and file length.
/// Copies share the open file.
class SafetensorsFile {
 public:
  /// Opens and validates `path`.
  /// Throws IoError when the file cannot be opened or read, and FormatError
  /// naming the file, the tensor and the offending values for any breach of
  /// the format.
  explicit SafetensorsFile(std::filesystem::path path) : path_(std::move(path)) {
    const std::string name = path_.string();
    const int fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError("cannot open '" + name + "': " + detail::errno_text(errno));
    fd_ = std::make_shared<detail::FileDescriptor>(fd);

    struct stat status {};
    if (::fstat(fd, &status) != 0) throw IoError("cannot stat '" + name + "': " + detail::errno_text(errno));
    if (!S_ISREG(status.st_mode)) throw IoError("'" + name + "' is not a regular file");
    file_size_ = static_cast<std::uint64_t>(status.st_size);

    parse_header();
  }

  const std::filesystem::path& path() const { return path_; }
  std::uint64_t file_size() const { return file_size_; }
  /// Offset of the data section in the file: 8 plus the header length.
  std::uint64_t data_start() const { return data_start_; }
  /// Tensors in the order of their data in the file.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Returns the tensor named `name`, or null when the file has none.
  const TensorInfo* find(const std::string& name) const {
    auto found = index_.find(name);
    return found == index_.end() ? nullptr : &tensors_[found->second];
  }

  /// Reads `size` bytes of `info`'s data starting `offset` bytes into it.
  /// Throws std::out_of_range past the tensor's end, IoError on a failed read.
  void read_bytes(const TensorInfo& info, std::uint64_t offset, std::size_t size, std::uint8_t* out) const {
    if (offset > info.byte_size() || size > info.byte_size() - offset) {
      throw std::out_of_range("bytes [" + std::to_string(offset) + ", " + std::to_string(offset + size) +
                              ") lie outside tensor '" + info.name + "' of " + std::to_string(info.byte_size()) +
                              " bytes in '" + path_.string() + "'");
    }
    detail::pread_all(fd_->get(), out, size, data_start_ + info.begin + offset, path_.string());
  }

  /// Reads the floating tensor `info` into `out` (`info.numel()` values),
  /// converting to the compute scalar chunk by chunk with pread, so neither
  /// the mapping nor a whole-tensor staging buffer adds to resident memory.
  /// Throws std::invalid_argument for a non-floating dtype, IoError on a
  /// failed read.
  template <typename Scalar>
  void read(const TensorInfo& info, Scalar* out) const {
    detail::require_spliceable(info.dtype, "read into the compute scalar");
    const std::size_t element = dtype_size(info.dtype);
    const auto count = static_cast<std::size_t>(info.numel());

    // Same dtype: read straight into the output.
    if (info.dtype == dtype_of<Scalar>()) {
      read_bytes(info, 0, count * element, reinterpret_cast<std::uint8_t*>(out));
      return;
    }

    // Other dtypes: stage one chunk of stored bytes at a time and convert.
    const std::size_t per_chunk = detail::kChunkBytes / element;
    std::vector<std::uint8_t> staging(std::min(count, per_chunk) * element);
    for (std::size_t done = 0; done < count; done += per_chunk) {
      const std::size_t n = std::min(per_chunk, count - done);
      read_bytes(info, done * element, n * element, staging.data());
      decode_values(info.dtype, staging.data(), n, out + done);
    }
  }

  /// Maps the whole file read-only. The mapping stays valid while any copy
  /// of the returned pointer lives. Throws IoError.
  std::shared_ptr<const MappedFile> map() const {
    return std::make_shared<const MappedFile>(fd_->get(), file_size_, path_.string());
  }

 private:
  void parse_header() {
    const std::string name = path_.string();

    // Header length: 8 bytes, little-endian, within the file and the limit.
    if (file_size_ < 8) {
      throw FormatError("'" + name + "' is " + std::to_string(file_size_) +
                        " bytes long, shorter than the 8-byte header length of a safetensors file");
    }
    std::uint8_t length_bytes[8];
    detail::pread_all(fd_->get(), length_bytes, 8, 0, name);
    const auto header_size = detail::load_unaligned<std::uint64_t>(length_bytes);
    if (header_size > kMaxHeaderSize) {
      throw FormatError("'" + name + "' declares a header of " + std::to_string(header_size) +
                        " bytes, more than the limit of " + std::to_string(kMaxHeaderSize));
    }
    if (header_size > file_size_ - 8) {
      throw FormatError("'" + name + "' declares a header of " + std::to_string(header_size) +
                        " bytes, but only " + std::to_string(file_size_ - 8) +
                        " bytes follow the header length; the file is truncated or not safetensors");
    }
    if (header_size < 2) {
      throw FormatError("'" + name + "' declares a header of " + std::to_string(header_size) +
                        " bytes, too short for a JSON object");
    }
    data_start_ = 8 + header_size;

    // Header text: UTF-8 JSON object with no repeated key.
    std::string header(static_cast<std::size_t>(header_size), '\0');
    detail::pread_all(fd_->get(), header.data(), header.size(), 8, name);
    if (auto bad = detail::find_invalid_utf8(header)) {
      throw FormatError("header of '" + name + "' is not valid UTF-8: byte " + std::to_string(*bad) +
                        " of the header has the value " +
                        std::to_string(static_cast<unsigned char>(header[*bad])));
    }
    if (header.front() != '{') {
      throw FormatError("header of '" + name + "' starts with '" + header.substr(0, 1) +
                        "'; a safetensors header must start with '{'");
    }
    const nlohmann::json root = detail::parse_json_strict(header, "header of '" + name + "'");
    if (!root.is_object()) {
      throw FormatError("header of '" + name + "' is a JSON " + std::string(root.type_name()) +
                        ", not an object");
    }

    // Entries: metadata and tensors.
    for (const auto& item : root.items()) {
      if (item.key() == kMetadataKey) {
        parse_metadata(item.value());
        continue;
      }
      tensors_.push_back(detail::parse_tensor_entry(name, item.key(), item.value()));
    }

    // Offsets: sorted, starting at 0, contiguous.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    detail::check_contiguous(name, tensors_);

    // File length: exactly header plus data, so truncation and trailing bytes both fail.
    const std::uint64_t data_size = tensors_.empty() ? 0 : tensors_.back().end;
    const std::uint64_t available = file_size_ - data_start_;
    if (data_size > available) {
      throw FormatError("'" + name + "' is " + std::to_string(file_size_) + " bytes long, but its header places " +
                        (tensors_.empty() ? std::string("data") : "tensor '" + tensors_.back().name + "'") +
                        " up to byte " + std::to_string(data_start_ + data_size) + "; the file is truncated");
    }
    if (data_size < available) {
      throw FormatError("'" + name + "' has " + std::to_string(available - data_size) +
                        " bytes after the end of its last tensor at byte " +
                        std::to_string(data_start_ + data_size) + "; expected the file to end there");
    }

    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  void parse_metadata(const nlohmann::json& metadata) {
    const std::string name = path_.string();
    if (!metadata.is_object()) {
      throw FormatError("'" + std::string(kMetadataKey) + "' in '" + name + "' is " + metadata.dump() +
                        ", not a JSON object of strings");
    }
    for (const auto& item : metadata.items()) {
      if (!item.value().is_string()) {
        throw FormatError("metadata entry '" + item.key() + "' in '" + name + "' is " + item.value().dump() +
                          ", not a string");
      }
      metadata_.emplace(item.key(), item.value().get<std::string>());
    }
  }

  std::filesystem::path path_;
  std::shared_ptr<detail::FileDescriptor> fd_;
  std::uint64_t file_size_ = 0;
  std::uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

/// Adds the tensors of `file` to `set`: a zero-copy view into `mapping`
/// where the dtype is the compute scalar's and the data is aligned for it,
/// a converted copy for other floating dtypes, raw bytes for the rest.
/// Mapped pages read for a copy are released right away.
template <typename Scalar>
void add_file_tensors(const SafetensorsFile& file, const std::shared_ptr<const MappedFile>& mapping,
                      WeightSet<Scalar>& set) {
  for (const TensorInfo& info : file.tensors()) {
    const std::uint64_t offset = file.data_start() + info.begin;
    const std::uint8_t* bytes = mapping->data() == nullptr ? nullptr : mapping->data() + offset;

    if (!is_spliceable(info.dtype)) {
      set.add_raw(info.name, info.dtype, info.shape, std::vector<std::uint8_t>(bytes, bytes + info.byte_size()));
      mapping->release(offset, info.byte_size());
      continue;
    }

    const bool aligned = reinterpret_cast<std::uintptr_t>(bytes) % alignof(Scalar) == 0;
    if (info.dtype == dtype_of<Scalar>() && aligned) {
      set.add_view(info.name, TensorView<Scalar>(reinterpret_cast<const Scalar*>(bytes), info.shape),
                   info.dtype, mapping);
      continue;
    }

    Tensor<Scalar> tensor(info.shape);
    decode_values(info.dtype, bytes, static_cast<std::size_t>(info.numel()), tensor.data());
    mapping->release(offset, info.byte_size());
    set.add(info.name, std::move(tensor), info.dtype);
  }
}

}  // namespace detail

/// Loads a safetensors file as a weight set in the compute scalar, tensors
/// in the order of their data. The file is memory-mapped, and tensors stored
/// as the compute scalar are views into the mapping (no copy). Other
/// floating dtypes are converted. Integer, BOOL and F8 tensors are kept as
/// raw bytes. The set's source is `path` and its metadata the file's.
/// Throws IoError and FormatError as SafetensorsFile does.
/// NOTE: a view faults (SIGBUS) when another process truncates the file
/// while the set lives. cki's own writers replace files by rename, which
/// leaves existing mappings intact.
template <typename Scalar>
WeightSet<Scalar> load_safetensors(const std::filesystem::path& path) {
  const SafetensorsFile file(path);
  WeightSet<Scalar> set(path.string());
  detail::add_file_tensors(file, file.map(), set);
  set.metadata() = file.metadata();
  return set;
}

/// Name, dtype and shape of one tensor to write.
struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
};

namespace detail {

/// Orders tensors for writing: larger elements first, then by name. With the
/// header padded to 8 bytes, every tensor's data then starts at a multiple of
/// its element size, so readers can view it in place.
inline void sort_for_writing(std::vector<TensorSpec>& tensors) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const TensorSpec& a, const TensorSpec& b) {
    const std::size_t size_a = dtype_size(a.dtype);
    const std::size_t size_b = dtype_size(b.dtype);
    return size_a != size_b ? size_a > size_b : a.name < b.name;
  });
}

}  // namespace detail

/// Handling of values that SafetensorsWriter::write cannot store as they
/// are in the output dtype.
struct ValueChecks {
  /// Write a finite value beyond the dtype's range as the dtype's largest
  /// finite value with the value's sign, and count it. Without it, such a
  /// value raises NumericError.
  bool clamp = false;
  /// Write NaN and infinity as they are. Without it, they raise NumericError.
  bool allow_non_finite = true;
};

/// Writes one safetensors file tensor by tensor, so no whole model has to be
/// in memory. The header is written first, tensors then follow in the order
/// `layout()` gives, each in one or more `write` or `write_bytes` calls
/// (one call with no values for an empty tensor).
/// The file is built under a temporary name beside `path` and only
/// `commit()` renames it into place (see AtomicFile).
class SafetensorsWriter {
 public:
  /// Creates the temporary file and writes the header. Tensors are ordered
  /// by element size, then name; the header is padded with spaces to a
  /// multiple of 8 bytes. `metadata` is written as `__metadata__` when not
  /// empty. Throws std::invalid_argument for a duplicate tensor name or a
  /// reserved name, and IoError when `path` exists and `overwrite` is false
  /// or the file cannot be created.
  SafetensorsWriter(std::filesystem::path path, std::vector<TensorSpec> tensors,
                    const std::map<std::string, std::string>& metadata, bool overwrite = false)
      : file_(std::move(path), overwrite) {
    detail::sort_for_writing(tensors);
    nlohmann::json header = nlohmann::json::object();
    if (!metadata.empty()) header[kMetadataKey] = metadata;

    // Offsets follow the sorted order, each tensor right after the previous.
    std::uint64_t offset = 0;
    for (TensorSpec& spec : tensors) {
      if (spec.name == kMetadataKey) {
        throw std::invalid_argument("a tensor cannot be named '" + spec.name + "', which safetensors reserves");
      }
      if (header.contains(spec.name)) {
        throw std::invalid_argument("tensor '" + spec.name + "' is listed twice for '" + target().string() + "'");
      }
      TensorInfo info;
      info.name = spec.name;
      info.dtype = spec.dtype;
      info.shape = spec.shape;
      info.begin = offset;
      info.end = offset + static_cast<std::uint64_t>(shape_numel(spec.shape)) * dtype_size(spec.dtype);
      offset = info.end;
      header[info.name] = {{"dtype", dtype_name(info.dtype)}, {"shape", info.shape},
                           {"data_offsets", {info.begin, info.end}}};
      layout_.push_back(std::move(info));
    }

    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    std::uint8_t length[8];
    detail::store_unaligned<std::uint64_t>(length, text.size());
    file_.write(length, sizeof length);
    file_.write(text.data(), text.size());
    file_size_ = 8 + text.size() + offset;
  }

  /// Tensors in the order they must be written, with their offsets.
  const std::vector<TensorInfo>& layout() const { return layout_; }
  const std::filesystem::path& target() const { return file_.target(); }
  /// The next tensor not yet complete, or null when all are.
  const TensorInfo* due() const { return next_ < layout_.size() ? &layout_[next_] : nullptr; }
  /// Size the finished file will have, in bytes.
  std::uint64_t file_size() const { return file_size_; }

  /// Appends `count` values of tensor `name`, converting them to its dtype.
  /// `checks` sets whether values beyond the dtype's range are clamped and
  /// whether NaN and infinity may be written. Returns the number of values
  /// clamped. Throws std::logic_error when `name` is not the tensor due next
  /// or the values run past its end. Throws NumericError naming the tensor,
  /// the element index, the value and the file when a value lies beyond the
  /// range of the dtype and `checks.clamp` is clear, or is NaN or infinite
  /// and `checks.allow_non_finite` is clear. Throws IoError on a failed write.
  template <typename Scalar>
  std::uint64_t write(const std::string& name, const Scalar* values, std::size_t count,
                      const ValueChecks& checks = {}) {
    const TensorInfo& info = current(name, count * dtype_size(current_dtype(name)));
    detail::require_spliceable(info.dtype, "write values as");
    const std::size_t element = dtype_size(info.dtype);
    const std::size_t per_chunk = detail::kChunkBytes / element;
    const std::uint64_t first_index = written_ / element;
    staging_.resize(std::min(count, per_chunk) * element);
    if (count == 0) advance(nullptr, 0);

    std::uint64_t clamped = 0;
    for (std::size_t done = 0; done < count; done += per_chunk) {
      const std::size_t n = std::min(per_chunk, count - done);
      if (!checks.allow_non_finite) {
        for (std::size_t i = 0; i < n; ++i) {
          if (std::isfinite(values[done + i])) continue;
          throw NumericError("tensor '" + name + "' has the non-finite value " + format_value(values[done + i]) +
                             " at index " + std::to_string(first_index + done + i) + ", which may not be written to '" +
                             target().string() + "'");
        }
      }
      if (checks.clamp) {
        clamped += encode_values_saturated(values + done, n, info.dtype, staging_.data());
      } else if (auto overflow = encode_values(values + done, n, info.dtype, staging_.data())) {
        const std::size_t index = done + *overflow;
        throw NumericError("tensor '" + name + "' has the value " + format_value(values[index]) + " at index " +
                           std::to_string(first_index + index) + ", beyond the range of its output dtype " +
                           dtype_name(info.dtype) + " (largest finite value " + format_max(info.dtype) +
                           ") in '" + target().string() + "'; write it as a wider dtype or clamp it");
      }
      advance(staging_.data(), n * element);
    }
    return clamped;
  }

  /// Appends `size` bytes of tensor `name` exactly as given (stored
  /// little-endian in the tensor's dtype). Throws as `write` does.
  void write_bytes(const std::string& name, const std::uint8_t* bytes, std::size_t size) {
    current(name, size);
    advance(bytes, size);
  }

  /// Syncs the file and renames it into place. Throws std::logic_error when
  /// a tensor is incomplete, IoError when the rename fails.
  void commit() {
    if (next_ < layout_.size()) {
      throw std::logic_error("tensor '" + layout_[next_].name + "' of '" + target().string() +
                             "' is not complete: " + std::to_string(written_) + " of " +
                             std::to_string(layout_[next_].byte_size()) + " bytes written");
    }
    file_.commit();
  }

 private:
  DType current_dtype(const std::string& name) const {
    if (next_ >= layout_.size()) throw std::logic_error("tensor '" + name + "' written after the last tensor of '" + target().string() + "'");
    return layout_[next_].dtype;
  }

  const TensorInfo& current(const std::string& name, std::uint64_t size) {
    if (next_ >= layout_.size()) {
      throw std::logic_error("tensor '" + name + "' written after the last tensor of '" + target().string() + "'");
    }
    const TensorInfo& info = layout_[next_];
    if (info.name != name) {
      throw std::logic_error("tensor '" + name + "' written while tensor '" + info.name + "' of '" +
                             target().string() + "' is due");
    }
    if (size > info.byte_size() - written_) {
      throw std::logic_error("tensor '" + name + "' of '" + target().string() + "' has " +
                             std::to_string(info.byte_size()) + " bytes, but " +
                             std::to_string(written_ + size) + " were written");
    }
    return info;
  }

  void advance(const void* bytes, std::size_t size) {
    file_.write(bytes, size);
    written_ += size;
    if (written_ == layout_[next_].byte_size()) {
      ++next_;
      written_ = 0;
    }
  }

  template <typename Scalar>
  static std::string format_value(Scalar value) {
    std::ostringstream text;
    text.precision(17);
    text << value;
    return text.str();
  }

  static std::string format_max(DType dtype) {
    std::ostringstream text;
    text << dtype_max(dtype);
    return text.str();
  }

  AtomicFile file_;
  std::vector<TensorInfo> layout_;
  std::vector<std::uint8_t> staging_;
  std::uint64_t file_size_ = 0;
  std::size_t next_ = 0;
  std::uint64_t written_ = 0;
};

}  // namespace cki
