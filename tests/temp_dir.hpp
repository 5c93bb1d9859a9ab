// TempDir: a fresh temporary folder per test, removed with its contents.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace cki_test {

namespace fs = std::filesystem;

/// A fresh folder "cki-test-XXXXXX" under the system's temporary folder,
/// deleted with its contents when the object goes out of scope. Throws
/// std::runtime_error when mkdtemp fails.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "cki-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + pattern);
    path_ = pattern;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }

  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

}  // namespace cki_test
