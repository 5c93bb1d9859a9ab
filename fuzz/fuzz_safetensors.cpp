// libFuzzer target for the safetensors reader. Each input is one whole file:
// it is written to an in-memory file (memfd) and opened, validated, read with
// pread and loaded through a memory mapping. cki::FormatError is the expected
// outcome for a malformed file; any other exception, crash or sanitizer
// report is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "exercise.hpp"

namespace {

/// Returns the in-memory file, created once and reused for every input; the
/// reader opens it through /proc/self/fd.
int memory_file() {
  static const int fd = [] {
    const int created = ::memfd_create("cki-fuzz-safetensors", MFD_CLOEXEC);
    if (created < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    return created;
  }();
  return fd;
}

/// Replaces the contents of the in-memory file with `size` bytes at `data`.
void store(const std::uint8_t* data, std::size_t size) {
  const int fd = memory_file();
  if (::ftruncate(fd, 0) != 0) std::abort();
  std::size_t done = 0;
  while (done < size) {
    const ssize_t written = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (written <= 0) std::abort();
    done += static_cast<std::size_t>(written);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  store(data, size);
  const std::string path = "/proc/self/fd/" + std::to_string(memory_file());
  try {
    cki_fuzz::read_safetensors(path);
  } catch (const cki::FormatError&) {
    // A malformed file, rejected with a message: the expected outcome.
  }
  return 0;
}
