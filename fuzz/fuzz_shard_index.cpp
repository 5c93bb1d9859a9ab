// libFuzzer target for the reader of sharded checkpoints. Each input is the
// text of model.safetensors.index.json, optionally followed by a NUL byte
// and the bytes of the shard model-00002-of-00002.safetensors (see
// cki_fuzz::IndexFixture). The target writes both into a checkpoint folder
// whose other shards are valid, then opens the folder, reads every tensor
// and loads it as a weight set. cki::FormatError is the expected outcome for
// a malformed index or shard; any other exception, crash or sanitizer report
// is a finding.
#include <cstddef>
#include <cstdint>
#include <filesystem>

#include "exercise.hpp"

namespace {

/// Returns the checkpoint folder, created once under /dev/shm when it
/// exists, so that the writes of each input stay in memory.
const cki_fuzz::IndexFixture& fixture() {
  static const cki_fuzz::IndexFixture instance(std::filesystem::is_directory("/dev/shm")
                                                   ? std::filesystem::path("/dev/shm")
                                                   : std::filesystem::temp_directory_path());
  return instance;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const cki_fuzz::IndexFixture& checkpoint = fixture();
  checkpoint.store(data, size);
  try {
    cki_fuzz::read_checkpoint(checkpoint.folder());
  } catch (const cki::FormatError&) {
    // A malformed index or shard, rejected with a message: the expected outcome.
  }
  return 0;
}
