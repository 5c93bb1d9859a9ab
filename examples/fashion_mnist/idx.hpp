// Reading gzip-compressed IDX files (the MNIST file format) and the
// Fashion-MNIST train, validation and test splits built from them.
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <zlib.h>

#include "fashion_mnist/random.hpp"

namespace fashion_mnist {

/// Directory where Debian's dataset-fashion-mnist package installs the files.
inline constexpr const char* kDefaultDataDir = "/usr/share/datasets/fashion-mnist";

/// A data file that is missing, unreadable or malformed.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Contents of one IDX file: the dimensions (outermost first) and the
/// unsigned-byte elements in row-major order.
struct IdxArray {
  std::vector<std::uint32_t> dims;
  std::vector<std::uint8_t> values;
};

/// Reads a whole gzip file into memory. A file that is not gzip-compressed is
/// read as is, because zlib passes plain files through.
/// Throws DataError when the file cannot be opened or read.
inline std::vector<std::uint8_t> read_gzip_file(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    throw DataError("cannot open '" + path + "'");
  }

  std::vector<std::uint8_t> bytes;
  std::vector<std::uint8_t> chunk(1 << 16);
  for (;;) {
    const int count = gzread(file, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (count < 0) {
      int code = 0;
      const std::string message = gzerror(file, &code);
      gzclose(file);
      throw DataError("failed to decompress '" + path + "': " + message);
    }
    if (count == 0) break;
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + count);
  }
  gzclose(file);
  return bytes;
}

/// Parses IDX bytes of element type unsigned byte (type code 0x08), the only
/// type the MNIST files use. `source` names the file in error messages.
/// Throws DataError for a bad magic number, another element type, or a length
/// that does not match the dimensions.
inline IdxArray parse_idx(const std::vector<std::uint8_t>& bytes, const std::string& source) {
  if (bytes.size() < 4) {
    throw DataError("'" + source + "' is not an IDX file: " + std::to_string(bytes.size()) +
                    " bytes, shorter than the 4-byte magic number");
  }
  if (bytes[0] != 0 || bytes[1] != 0) {
    throw DataError("'" + source + "' is not an IDX file: the magic number must start with two "
                    "zero bytes");
  }
  if (bytes[2] != 0x08) {
    throw DataError("'" + source + "' has IDX element type code " + std::to_string(bytes[2]) +
                    "; only 8 (unsigned byte) is supported");
  }

  // Dimensions follow the magic number as big-endian 32-bit integers.
  const std::size_t rank = bytes[3];
  const std::size_t header_size = 4 + 4 * rank;
  if (bytes.size() < header_size) {
    throw DataError("'" + source + "' is truncated: " + std::to_string(rank) +
                    " dimensions need a " + std::to_string(header_size) + "-byte header, got " +
                    std::to_string(bytes.size()) + " bytes");
  }
  IdxArray array;
  std::uint64_t count = 1;
  for (std::size_t d = 0; d < rank; ++d) {
    const std::size_t at = 4 + 4 * d;
    const std::uint32_t dim = (std::uint32_t{bytes[at]} << 24) | (std::uint32_t{bytes[at + 1]} << 16) |
                              (std::uint32_t{bytes[at + 2]} << 8) | std::uint32_t{bytes[at + 3]};
    array.dims.push_back(dim);
    count *= dim;
  }

  if (bytes.size() - header_size != count) {
    throw DataError("'" + source + "' has " + std::to_string(bytes.size() - header_size) +
                    " data bytes, but its dimensions need " + std::to_string(count));
  }
  array.values.assign(bytes.begin() + static_cast<std::ptrdiff_t>(header_size), bytes.end());
  return array;
}

/// Reads and parses one gzip-compressed IDX file.
inline IdxArray read_idx_gz(const std::string& path) { return parse_idx(read_gzip_file(path), path); }

/// Labelled images: one column per example, pixels scaled to [0, 1].
struct Dataset {
  /// Pixels, features x examples (784 x n for 28 x 28 images).
  Eigen::MatrixXf images;
  /// Class of each example, 0 to 9.
  std::vector<int> labels;

  Eigen::Index size() const { return images.cols(); }
  Eigen::Index features() const { return images.rows(); }
};

/// Number of classes in Fashion-MNIST.
inline constexpr int kClassCount = 10;

/// Builds a dataset from an IDX image array (n x rows x cols) and an IDX label
/// array (n). Throws DataError when the shapes do not fit together or a label
/// is outside 0..9.
inline Dataset make_dataset(const IdxArray& images, const IdxArray& labels, const std::string& source) {
  if (images.dims.size() != 3) {
    throw DataError(source + ": image file has " + std::to_string(images.dims.size()) +
                    " dimensions, expected 3 (count, rows, columns)");
  }
  if (labels.dims.size() != 1) {
    throw DataError(source + ": label file has " + std::to_string(labels.dims.size()) +
                    " dimensions, expected 1 (count)");
  }
  if (images.dims[0] != labels.dims[0]) {
    throw DataError(source + ": " + std::to_string(images.dims[0]) + " images but " +
                    std::to_string(labels.dims[0]) + " labels");
  }

  const Eigen::Index count = images.dims[0];
  const Eigen::Index features = Eigen::Index{images.dims[1]} * images.dims[2];
  Dataset data;
  data.images.resize(features, count);
  data.labels.resize(static_cast<std::size_t>(count));
  for (Eigen::Index i = 0; i < count; ++i) {
    const std::uint8_t* pixels = images.values.data() + i * features;
    for (Eigen::Index f = 0; f < features; ++f) data.images(f, i) = pixels[f] / 255.0f;

    const int label = labels.values[static_cast<std::size_t>(i)];
    if (label >= kClassCount) {
      throw DataError(source + ": label " + std::to_string(label) + " of example " +
                      std::to_string(i) + " is outside 0.." + std::to_string(kClassCount - 1));
    }
    data.labels[static_cast<std::size_t>(i)] = label;
  }
  return data;
}

/// Returns the examples of `data` at `indices`, in that order.
inline Dataset select(const Dataset& data, const std::vector<int>& indices) {
  Dataset out;
  out.images.resize(data.features(), static_cast<Eigen::Index>(indices.size()));
  out.labels.resize(indices.size());
  for (std::size_t j = 0; j < indices.size(); ++j) {
    out.images.col(static_cast<Eigen::Index>(j)) = data.images.col(indices[j]);
    out.labels[j] = data.labels[static_cast<std::size_t>(indices[j])];
  }
  return out;
}

/// The three splits of the experiment. Validation chooses models and
/// settings; the test split only reports final numbers.
struct Splits {
  Dataset train;
  Dataset valid;
  Dataset test;
};

/// Sizes of the splits; zero for a test size means the whole test file.
struct SplitSizes {
  int train = 50000;
  int valid = 10000;
  int test = 0;
};

/// Reads one split (file prefix "train" or "t10k") from `data_dir`.
/// Throws DataError naming the Debian package when a file is missing.
inline Dataset load_fashion_mnist_file(const std::string& data_dir, const std::string& prefix) {
  const std::string image_path = data_dir + "/" + prefix + "-images-idx3-ubyte.gz";
  const std::string label_path = data_dir + "/" + prefix + "-labels-idx1-ubyte.gz";
  for (const std::string& path : {image_path, label_path}) {
    std::FILE* probe = std::fopen(path.c_str(), "rb");
    if (probe == nullptr) {
      throw DataError("Fashion-MNIST file not found: '" + path +
                      "'. Install the Debian package dataset-fashion-mnist "
                      "(apt-get install dataset-fashion-mnist) or pass the directory that "
                      "holds the IDX .gz files");
    }
    std::fclose(probe);
  }
  return make_dataset(read_idx_gz(image_path), read_idx_gz(label_path), data_dir + "/" + prefix);
}

/// Loads Fashion-MNIST and splits the training file, shuffled with
/// `split_seed`, into `sizes.train` training and the next `sizes.valid`
/// validation examples. The test split is the first `sizes.test` examples of
/// the test file (all of them when 0).
/// Throws DataError for missing or malformed files, std::invalid_argument when
/// the sizes exceed the files.
inline Splits load_splits(const std::string& data_dir, SplitSizes sizes, std::uint64_t split_seed) {
  const Dataset full_train = load_fashion_mnist_file(data_dir, "train");
  const Dataset full_test = load_fashion_mnist_file(data_dir, "t10k");

  if (sizes.train <= 0 || sizes.valid <= 0 || sizes.test < 0 ||
      sizes.train + sizes.valid > full_train.size()) {
    throw std::invalid_argument("training size " + std::to_string(sizes.train) + " plus validation size " +
                                std::to_string(sizes.valid) + " must be positive and at most the " +
                                std::to_string(full_train.size()) + " examples of the training file");
  }
  if (sizes.test > full_test.size()) {
    throw std::invalid_argument("test size " + std::to_string(sizes.test) + " exceeds the " +
                                std::to_string(full_test.size()) + " examples of the test file");
  }

  Rng rng(split_seed);
  const std::vector<int> order = rng.permutation(static_cast<int>(full_train.size()));
  const std::vector<int> train_indices(order.begin(), order.begin() + sizes.train);
  const std::vector<int> valid_indices(order.begin() + sizes.train,
                                       order.begin() + sizes.train + sizes.valid);

  Splits splits;
  splits.train = select(full_train, train_indices);
  splits.valid = select(full_train, valid_indices);
  if (sizes.test == 0 || sizes.test == full_test.size()) {
    splits.test = full_test;
  } else {
    std::vector<int> test_indices(static_cast<std::size_t>(sizes.test));
    for (int i = 0; i < sizes.test; ++i) test_indices[static_cast<std::size_t>(i)] = i;
    splits.test = select(full_test, test_indices);
  }
  return splits;
}

}  // namespace fashion_mnist
