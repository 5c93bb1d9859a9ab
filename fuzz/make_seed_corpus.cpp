// Writes the seed corpora of the libFuzzer targets:
//   OUT/safetensors/   valid files of every dtype and malformed files
//   OUT/shard_index/   index texts, some followed by a NUL byte and shard 2
// Usage: make_seed_corpus OUT
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "cki/dtype.hpp"
#include "cki/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;

std::string read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_all(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write '" + path.string() + "'");
}

/// Bytes of a valid file holding `tensors`, written by cki's own writer with
/// byte `i` of each tensor set to `i * 37 + 11`.
std::string valid_file(const std::vector<cki::TensorSpec>& tensors, const fs::path& scratch,
                       const std::map<std::string, std::string>& metadata = {}) {
  {
    cki::SafetensorsWriter writer(scratch, tensors, metadata, true);
    while (const cki::TensorInfo* due = writer.due()) {
      std::vector<std::uint8_t> bytes(static_cast<std::size_t>(due->byte_size()));
      for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>(i * 37 + 11);
      writer.write_bytes(due->name, bytes.data(), bytes.size());
    }
    writer.commit();
  }
  std::string bytes = read_all(scratch);
  fs::remove(scratch);
  return bytes;
}

/// Bytes of a file: the 8-byte little-endian `length` (the header's size
/// unless given), the header text and the data.
std::string raw_file(const std::string& header, const std::string& data, std::uint64_t length = UINT64_MAX) {
  if (length == UINT64_MAX) length = header.size();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((length >> (8 * i)) & 0xFF);
  return bytes + header + data;
}

std::string f32_entry(const std::string& name, const std::string& shape, const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

/// Writes the seeds of the safetensors target into `out`.
void write_safetensors_seeds(const fs::path& out) {
  fs::create_directories(out);
  const fs::path scratch = out / ".scratch.safetensors";

  // Valid files: one per dtype, one of every dtype, metadata, empty tensors.
  for (const cki::DType dtype : cki::kAllDTypes) {
    const std::string name = cki::dtype_name(dtype);
    write_all(out / ("valid-" + name + ".safetensors"),
              valid_file({{"w", dtype, {2, 3}}, {"b", dtype, {3}}, {"s", dtype, {}}}, scratch));
  }
  std::vector<cki::TensorSpec> every;
  for (const cki::DType dtype : cki::kAllDTypes) every.push_back({std::string("t_") + cki::dtype_name(dtype), dtype, {2}});
  write_all(out / "valid-every-dtype.safetensors", valid_file(every, scratch, {{"format", "pt"}, {"note", "seed"}}));
  write_all(out / "valid-empty-tensors.safetensors",
            valid_file({{"empty", cki::DType::F32, {0, 4}}, {"one", cki::DType::F16, {1}}}, scratch));
  write_all(out / "valid-no-tensors.safetensors", raw_file("{}", ""));
  write_all(out / "valid-metadata-only.safetensors", raw_file("{\"__metadata__\":{\"k\":\"v\"}}", ""));
  write_all(out / "valid-unaligned.safetensors",
            raw_file("{" + f32_entry("w", "[2]", "[0,8]") + "}", std::string(8, '\x3f')));

  // Malformed files, one per check of the reader.
  const std::string data8(8, '\x01');
  const std::string valid = "{" + f32_entry("w", "[2]", "[0,8]") + "}";
  const std::vector<std::pair<std::string, std::string>> malformed = {
      {"empty-file", ""},
      {"short-length", std::string("\x05\x00\x00", 3)},
      {"header-above-limit", raw_file(valid, data8, 100'000'001)},
      {"header-past-end", raw_file(valid, data8, 1000)},
      {"header-one-byte", raw_file("{", "")},
      {"header-not-utf8", raw_file("{\"w\xff\":1}", "")},
      {"header-array", raw_file("[1, 2]", "")},
      {"header-not-json", raw_file("{\"w\": ", "")},
      {"header-trailing-text", raw_file(valid + " x", data8)},
      {"duplicate-tensor", raw_file("{" + f32_entry("w", "[2]", "[0,8]") + "," + f32_entry("w", "[2]", "[8,16]") + "}", data8 + data8)},
      {"duplicate-metadata-key", raw_file("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", "")},
      {"entry-not-object", raw_file("{\"w\":5}", "")},
      {"missing-dtype", raw_file("{\"w\":{\"shape\":[2],\"data_offsets\":[0,8]}}", data8)},
      {"unknown-field", raw_file("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", data8)},
      {"unknown-dtype", raw_file("{\"w\":{\"dtype\":\"F7\",\"shape\":[2],\"data_offsets\":[0,8]}}", data8)},
      {"negative-dimension", raw_file("{" + f32_entry("w", "[-2]", "[0,8]") + "}", data8)},
      {"fractional-dimension", raw_file("{" + f32_entry("w", "[1.5]", "[0,8]") + "}", data8)},
      {"element-count-overflow", raw_file("{" + f32_entry("w", "[4294967296,4294967296]", "[0,8]") + "}", data8)},
      {"byte-size-overflow", raw_file("{" + f32_entry("w", "[4611686018427387904]", "[0,8]") + "}", data8)},
      {"begin-past-end", raw_file("{" + f32_entry("w", "[0]", "[8,0]") + "}", data8)},
      {"byte-length-mismatch", raw_file("{" + f32_entry("w", "[3]", "[0,8]") + "}", data8)},
      {"gap", raw_file("{" + f32_entry("a", "[2]", "[0,8]") + "," + f32_entry("b", "[2]", "[12,20]") + "}", data8 + "1234" + data8)},
      {"overlap", raw_file("{" + f32_entry("a", "[2]", "[0,8]") + "," + f32_entry("b", "[2]", "[4,12]") + "}", data8 + "1234")},
      {"truncated-data", raw_file(valid, data8.substr(0, 5))},
      {"trailing-bytes", raw_file(valid, data8 + "xyz")},
      {"metadata-not-object", raw_file("{\"__metadata__\":[1]}", "")},
      {"metadata-value-number", raw_file("{\"__metadata__\":{\"k\":1}}", "")},
      {"lfs-pointer", "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1024\n"},
  };
  for (const auto& [name, bytes] : malformed) write_all(out / ("malformed-" + name + ".safetensors"), bytes);

  // A valid file cut short at several points, as a partial download is.
  const std::string full = valid_file({{"w", cki::DType::F32, {4, 4}}, {"b", cki::DType::BF16, {4}}}, scratch);
  for (const std::size_t cut : {std::size_t{4}, std::size_t{8}, std::size_t{20}, full.size() - 1}) {
    write_all(out / ("truncated-at-" + std::to_string(cut) + ".safetensors"), full.substr(0, cut));
  }
}

/// Writes the seeds of the index target. They describe the folder of
/// cki_fuzz::IndexFixture: shard 1 contains "a" (F32 [2, 3]) and "b" (I64
/// [2]), the default shard 2 contains "c" (F16 [3]) and the spare shard
/// extra.safetensors contains "d".
void write_index_seeds(const fs::path& out) {
  fs::create_directories(out);
  const fs::path scratch = out / ".scratch.safetensors";
  const std::string shard1 = "model-00001-of-00002.safetensors";
  const std::string shard2 = "model-00002-of-00002.safetensors";
  const std::string valid_map = "{\"a\":\"" + shard1 + "\",\"b\":\"" + shard1 + "\",\"c\":\"" + shard2 + "\"}";
  const std::string valid = "{\"metadata\":{\"total_size\":70},\"weight_map\":" + valid_map + "}";

  const std::vector<std::pair<std::string, std::string>> seeds = {
      {"valid", valid},
      {"valid-no-metadata", "{\"weight_map\":" + valid_map + "}"},
      {"valid-with-extra", "{\"weight_map\":{\"a\":\"" + shard1 + "\",\"b\":\"" + shard1 + "\",\"c\":\"" + shard2 +
                               "\",\"d\":\"extra.safetensors\"}}"},
      {"not-json", "{\"weight_map\":"},
      {"array", "[]"},
      {"no-weight-map", "{\"metadata\":{}}"},
      {"weight-map-array", "{\"weight_map\":[1]}"},
      {"shard-not-string", "{\"weight_map\":{\"a\":1}}"},
      {"shard-with-folder", "{\"weight_map\":{\"a\":\"../" + shard1 + "\"}}"},
      {"shard-absolute", "{\"weight_map\":{\"a\":\"/etc/passwd\"}}"},
      {"shard-dot-dot", "{\"weight_map\":{\"a\":\"..\"}}"},
      {"shard-missing", "{\"weight_map\":{\"a\":\"model-00003-of-00003.safetensors\"}}"},
      {"tensor-in-other-shard", "{\"weight_map\":{\"a\":\"" + shard2 + "\",\"b\":\"" + shard1 + "\",\"c\":\"" + shard2 + "\"}}"},
      {"tensor-unlisted", "{\"weight_map\":{\"a\":\"" + shard1 + "\",\"c\":\"" + shard2 + "\"}}"},
      {"total-size-negative", "{\"metadata\":{\"total_size\":-1},\"weight_map\":" + valid_map + "}"},
      {"total-size-string", "{\"metadata\":{\"total_size\":\"70\"},\"weight_map\":" + valid_map + "}"},
      {"duplicate-key", "{\"weight_map\":{\"a\":\"" + shard1 + "\",\"a\":\"" + shard2 + "\"}}"},
      {"index-as-shard", "{\"weight_map\":{\"a\":\"model.safetensors.index.json\"}}"},
  };
  for (const auto& [name, text] : seeds) write_all(out / ("index-" + name + ".json"), text);

  // Index plus a replacement shard 2 after a NUL byte.
  const std::string shard_c = valid_file({{"c", cki::DType::F16, {3}}}, scratch);
  const std::string shard_ca = valid_file({{"c", cki::DType::F16, {3}}, {"a", cki::DType::F32, {1}}}, scratch);
  const std::string shard_ce = valid_file({{"c", cki::DType::F64, {3}}, {"e", cki::DType::U8, {5}}}, scratch);
  write_all(out / "with-shard-valid.bin", valid + std::string(1, '\0') + shard_c);
  write_all(out / "with-shard-stored-twice.bin", valid + std::string(1, '\0') + shard_ca);
  write_all(out / "with-shard-unlisted-tensor.bin", valid + std::string(1, '\0') + shard_ce);
  write_all(out / "with-shard-truncated.bin", valid + std::string(1, '\0') + shard_c.substr(0, shard_c.size() - 2));
  write_all(out / "with-shard-empty.bin", valid + std::string(1, '\0'));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make_seed_corpus OUT\n";
    return 2;
  }
  try {
    write_safetensors_seeds(fs::path(argv[1]) / "safetensors");
    write_index_seeds(fs::path(argv[1]) / "shard_index");
  } catch (const std::exception& error) {
    std::cerr << "make_seed_corpus: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
