// Helpers shared by the checkpoint I/O tests: temporary folders, raw file
// bytes, seeded weight sets, running programs and comparing weight sets.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "cki/cki.hpp"
#include "cki/io/streaming.hpp"
#include "temp_dir.hpp"

namespace cki_test {

namespace fs = std::filesystem;

inline void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

inline std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

/// Bytes of a safetensors file: the 8-byte little-endian `declared_length`
/// (the header's size unless given), the header text and the data.
inline std::string safetensors_bytes(const std::string& header, const std::string& data,
                                     std::uint64_t declared_length = UINT64_MAX) {
  const std::uint64_t length = declared_length == UINT64_MAX ? header.size() : declared_length;
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((length >> (8 * i)) & 0xFF);
  return bytes + header + data;
}

/// A weight set with one float tensor per shape, values drawn from a normal
/// distribution with a fixed seed, stored as `dtype`.
template <typename Scalar>
cki::WeightSet<Scalar> random_set(unsigned seed, const std::vector<std::pair<std::string, cki::Shape>>& tensors,
                                  cki::DType dtype = cki::DType::F32, const std::string& source = "") {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  cki::WeightSet<Scalar> set(source);
  for (const auto& [name, shape] : tensors) {
    cki::Tensor<Scalar> tensor(shape);
    for (std::int64_t i = 0; i < tensor.size(); ++i) tensor[i] = static_cast<Scalar>(normal(generator));
    set.add(name, std::move(tensor), dtype);
  }
  return set;
}

/// Exit status of a shell command (127 when it could not run, 128 + n when
/// killed by signal n).
inline int run_command(const std::string& command) {
  const int status = std::system(command.c_str());
  if (status == -1) return 127;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return status;
}

/// Quotes `text` for a POSIX shell.
inline std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

/// The Python interpreter the generator runs under, and whether it has numpy.
inline const char* kPython = "/usr/bin/python3";
inline bool numpy_available() {
  static const bool available =
      run_command(std::string(kPython) + " -c 'import numpy' >/dev/null 2>&1") == 0;
  return available;
}
inline std::string generator_script() {
  return (fs::path(CKI_TEST_DATA_DIR).parent_path() / "gen_safetensors.py").string();
}

/// The message of the exception `action` throws as type `Exception`; fails
/// the test when it throws nothing or another type.
template <typename Exception, typename Action>
std::string error_message(Action&& action) {
  try {
    action();
  } catch (const Exception& error) {
    return error.what();
  } catch (const std::exception& error) {
    FAIL("expected " << typeid(Exception).name() << ", got " << typeid(error).name() << ": " << error.what());
  }
  FAIL("expected an exception, none was thrown");
  return "";
}

/// Checks that two weight sets hold the same tensors in any order: names,
/// shapes and dtypes, values bit for bit, raw bytes equal.
template <typename Scalar>
void require_same_tensors(const cki::WeightSet<Scalar>& actual, const cki::WeightSet<Scalar>& expected) {
  REQUIRE(actual.size() == expected.size());
  for (const auto& entry : expected) {
    INFO("tensor " << entry.name);
    REQUIRE(actual.contains(entry.name));
    const auto& other = actual.at(entry.name);
    CHECK(other.shape == entry.shape);
    CHECK(cki::dtype_name(other.dtype) == std::string(cki::dtype_name(entry.dtype)));
    if (entry.spliceable()) {
      REQUIRE(other.spliceable());
      const auto count = static_cast<std::size_t>(entry.numel());
      if (count > 0) CHECK(std::memcmp(other.values.data(), entry.values.data(), count * sizeof(Scalar)) == 0);
    } else {
      REQUIRE(other.raw);
      CHECK(*other.raw == *entry.raw);
    }
  }
}

/// Peak resident memory (VmHWM) or current resident memory (VmRSS) of this
/// process in bytes, from /proc/self/status; 0 when unavailable.
inline std::uint64_t proc_status_bytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      std::istringstream values(line.substr(field.size() + 1));
      std::uint64_t kilobytes = 0;
      values >> kilobytes;
      return kilobytes * 1024;
    }
  }
  return 0;
}

/// Resets VmHWM to the current resident size (Linux 4.0 and later).
inline bool reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  return clear.good();
}

}  // namespace cki_test
