// Fault injection for checkpoint outputs: failed and short writes through
// the injectable write function, the free-space pre-flight check, and the
// cki-splice tool killed with SIGKILL or stopped by a file-size limit. A
// failed output must leave nothing at the output path, no temporary file
// after a handled failure, and every input byte for byte as it was.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "cki/cki.hpp"
#include "cki/io/atomic_file.hpp"
#include "cki/io/sharded.hpp"
#include "cki/io/streaming.hpp"
#include "io_test_support.hpp"

using Catch::Matchers::Contains;
using cki::DType;
using namespace cki_test;

namespace {

#if defined(CKI_SPLICE_TOOL)
constexpr const char* kTool = CKI_SPLICE_TOOL;
#else
constexpr const char* kTool = nullptr;
#endif

#define SKIP_WITHOUT_TOOL()                                                          \
  if (kTool == nullptr) {                                                            \
    WARN("skipped: cki-splice is not built (configure with CKI_BUILD_EXAMPLES=ON)"); \
    return;                                                                          \
  }

/// Name and bytes of every file under `folder`, recursively, hidden files
/// included; paths are relative to `folder`.
std::map<std::string, std::string> snapshot(const fs::path& folder) {
  std::map<std::string, std::string> files;
  for (const auto& item : fs::recursive_directory_iterator(folder)) {
    const std::string name = fs::relative(item.path(), folder).string();
    files[name] = item.is_regular_file() ? read_file(item.path()) : std::string("<folder>");
  }
  return files;
}

/// Name and bytes of an output: every file of a folder output, or the
/// one file of a file output under the empty name.
std::map<std::string, std::string> output_contents(const fs::path& output) {
  if (fs::is_directory(output)) return snapshot(output);
  return {{"", read_file(output)}};
}

/// Names of the entries of `folder` that start with "." (temporary files
/// and folders of AtomicFile and AtomicFolder).
std::vector<std::string> hidden_entries(const fs::path& folder) {
  std::vector<std::string> names;
  for (const auto& item : fs::directory_iterator(folder)) {
    const std::string name = item.path().filename().string();
    if (!name.empty() && name.front() == '.') names.push_back(name);
  }
  return names;
}

/// Installs a write function for the life of the object and restores the
/// previous one after.
class ScopedWriteFunction {
 public:
  explicit ScopedWriteFunction(cki::WriteFunction function) : previous_(cki::set_write_function(std::move(function))) {}
  ScopedWriteFunction(const ScopedWriteFunction&) = delete;
  ScopedWriteFunction& operator=(const ScopedWriteFunction&) = delete;
  ~ScopedWriteFunction() { cki::set_write_function(std::move(previous_)); }

 private:
  cki::WriteFunction previous_;
};

/// Installs a free-space function for the life of the object.
class ScopedFreeSpace {
 public:
  explicit ScopedFreeSpace(cki::FreeSpaceFunction function)
      : previous_(cki::set_free_space_function(std::move(function))) {}
  ScopedFreeSpace(const ScopedFreeSpace&) = delete;
  ScopedFreeSpace& operator=(const ScopedFreeSpace&) = delete;
  ~ScopedFreeSpace() { cki::set_free_space_function(std::move(previous_)); }

 private:
  cki::FreeSpaceFunction previous_;
};

/// Returns a write function for a disk that fills up after `capacity` bytes,
/// counted over all files written while it is installed. The write that
/// crosses the limit is short and every later one fails with ENOSPC, as on
/// a full file system.
cki::WriteFunction disk_of(std::uint64_t capacity, std::shared_ptr<std::uint64_t> written) {
  return [capacity, written](int fd, const void* data, std::size_t size) -> ssize_t {
    if (*written >= capacity) {
      errno = ENOSPC;
      return -1;
    }
    const auto allowed = static_cast<std::size_t>(std::min<std::uint64_t>(size, capacity - *written));
    const ssize_t result = ::write(fd, data, allowed);
    if (result > 0) *written += static_cast<std::uint64_t>(result);
    return result;
  };
}

const std::vector<std::pair<std::string, cki::Shape>> kLayers = {
    {"embed.weight", {64, 32}}, {"layer.0.weight", {32, 32}}, {"layer.0.bias", {32}}, {"head.weight", {8, 32}},
};

cki::WeightSet<float> model(unsigned seed, DType dtype = DType::F32) {
  auto set = random_set<float>(seed, kLayers, dtype);
  set.add_raw("step", DType::I64, {}, {7, 0, 0, 0, 0, 0, 0, 0});
  set.metadata()["seed"] = std::to_string(seed);
  return set;
}

std::vector<cki::Checkpoint> open_all(const std::vector<fs::path>& paths) {
  std::vector<cki::Checkpoint> checkpoints;
  for (const auto& path : paths) checkpoints.emplace_back(path);
  return checkpoints;
}

/// The ways a test writes an output: a weight set saved as one file or as
/// shards, and a streamed merge into one file or shards.
struct OutputCase {
  const char* name;
  bool streamed;
  bool sharded;
};

const OutputCase kOutputCases[] = {
    {"saved file", false, false},
    {"saved shards", false, true},
    {"streamed file", true, false},
    {"streamed shards", true, true},
};

/// Writes the output of `output_case` from the inputs a.safetensors and
/// b.safetensors in `folder`, to out.safetensors or the folder out.
fs::path write_output(const OutputCase& output_case, const fs::path& folder) {
  const fs::path out = folder / (output_case.sharded ? "out" : "out.safetensors");
  cki::WriteOptions write;
  if (output_case.sharded) write.max_shard_size = 4096;
  if (output_case.streamed) {
    cki::StreamOptions options;
    options.write = write;
    cki::splice_checkpoints<float>(open_all({folder / "a.safetensors", folder / "b.safetensors"}), out,
                                   cki::CkiSoft<float>(cki::CkiParams{}), options);
  } else {
    cki::save_checkpoint(cki::load_checkpoint<float>(folder / "a.safetensors"), out, write);
  }
  return out;
}

/// Writes the two input models a.safetensors (F32) and b.safetensors (BF16) into `folder`.
void write_inputs(const fs::path& folder) {
  cki::save_checkpoint(model(1), folder / "a.safetensors");
  cki::save_checkpoint(model(2, DType::BF16), folder / "b.safetensors");
}

/// Bytes the output of `output_case` takes when nothing fails.
std::uint64_t output_bytes(const OutputCase& output_case) {
  TempDir dir;
  write_inputs(dir.path());
  const fs::path out = write_output(output_case, dir.path());
  std::uint64_t total = 0;
  if (fs::is_directory(out)) {
    for (const auto& item : fs::directory_iterator(out)) total += fs::file_size(item.path());
  } else {
    total = fs::file_size(out);
  }
  return total;
}

}  // namespace

TEST_CASE("full disk leaves no output and inputs intact", "[io][faults]") {
  for (const OutputCase& output_case : kOutputCases) {
    const std::uint64_t total = output_bytes(output_case);
    REQUIRE(total > 100);

    // Capacities inside the length field, the header, the data, the last
    // byte, and (for shards) the index.
    for (const std::uint64_t capacity : {std::uint64_t{0}, std::uint64_t{5}, std::uint64_t{100}, total / 2, total - 1}) {
      INFO(output_case.name << ", disk full after " << capacity << " of " << total << " bytes");
      TempDir dir;
      write_inputs(dir.path());
      const auto before = snapshot(dir.path());

      const auto written = std::make_shared<std::uint64_t>(0);
      std::string message;
      {
        ScopedWriteFunction full_disk(disk_of(capacity, written));
        message = error_message<cki::IoError>([&] { write_output(output_case, dir.path()); });
      }
      CHECK_THAT(message, Contains("No space left on device"));
      CHECK_THAT(message, Contains("cannot write the output '" + (dir / (output_case.sharded ? "out" : "out.safetensors")).string() +
                                   "', which is left unchanged"));
      CHECK(*written == capacity);
      CHECK_FALSE(fs::exists(dir / "out"));
      CHECK_FALSE(fs::exists(dir / "out.safetensors"));
      CHECK(hidden_entries(dir.path()).empty());
      CHECK(snapshot(dir.path()) == before);
    }
  }
}

TEST_CASE("short and interrupted writes give identical files", "[io][faults]") {
  for (const OutputCase& output_case : kOutputCases) {
    INFO(output_case.name);
    TempDir reference_dir;
    write_inputs(reference_dir.path());
    const auto reference = output_contents(write_output(output_case, reference_dir.path()));

    // Every call writes 1 to 7 bytes, and every third call fails with EINTR.
    TempDir dir;
    write_inputs(dir.path());
    auto calls = std::make_shared<std::uint64_t>(0);
    fs::path out;
    {
      ScopedWriteFunction choppy([calls](int fd, const void* data, std::size_t size) -> ssize_t {
        const std::uint64_t call = (*calls)++;
        if (call % 3 == 2) {
          errno = EINTR;
          return -1;
        }
        return ::write(fd, data, std::min<std::size_t>(size, 1 + call % 7));
      });
      out = write_output(output_case, dir.path());
    }
    CHECK(*calls > 1000);
    CHECK(output_contents(out) == reference);
    CHECK(hidden_entries(dir.path()).empty());
  }
}

TEST_CASE("write storing zero bytes fails, not hangs", "[io][faults]") {
  TempDir dir;
  write_inputs(dir.path());
  const auto before = snapshot(dir.path());
  std::string message;
  {
    ScopedWriteFunction stuck([](int, const void*, std::size_t) -> ssize_t { return 0; });
    message = error_message<cki::IoError>([&] { write_output(kOutputCases[2], dir.path()); });
  }
  CHECK_THAT(message, Contains("the write stored no bytes"));
  CHECK_FALSE(fs::exists(dir / "out.safetensors"));
  CHECK(snapshot(dir.path()) == before);
}

TEST_CASE("free-space check fails before writing", "[io][faults]") {
  for (const OutputCase& output_case : kOutputCases) {
    INFO(output_case.name);
    const std::uint64_t total = output_bytes(output_case);
    const fs::path out_name = output_case.sharded ? "out" : "out.safetensors";

    // Too little space: the error names the folder, the bytes needed and the
    // bytes free, and nothing is written.
    std::uint64_t needed = 0;
    {
      TempDir dir;
      write_inputs(dir.path());
      const auto before = snapshot(dir.path());
      std::vector<fs::path> asked;
      const auto calls = std::make_shared<std::uint64_t>(0);
      std::string message;
      {
        ScopedFreeSpace small([&asked](const fs::path& folder) -> std::optional<std::uint64_t> {
          asked.push_back(folder);
          return 1000;
        });
        ScopedWriteFunction counting([calls](int fd, const void* data, std::size_t size) -> ssize_t {
          ++*calls;
          return ::write(fd, data, size);
        });
        message = error_message<cki::IoError>([&] { write_output(output_case, dir.path()); });
      }
      REQUIRE(asked.size() == 1);
      CHECK(fs::equivalent(asked.front(), dir.path()));
      CHECK_THAT(message, Contains("not enough free space in folder '" + asked.front().string() + "'"));
      CHECK_THAT(message, Contains("for output '" + (dir / out_name).string() + "'"));
      CHECK_THAT(message, Contains("1000 bytes are free"));
      CHECK(*calls == 0);
      CHECK(snapshot(dir.path()) == before);

      const std::string marker = "it needs ";
      const auto start = message.find(marker);
      REQUIRE(start != std::string::npos);
      needed = std::stoull(message.substr(start + marker.size()));
    }

    // The planned size is an upper estimate, at most 2 MiB above the output.
    INFO("planned " << needed << " bytes, written " << total);
    CHECK(needed >= total);
    CHECK(needed <= total + 2 * 1024 * 1024);

    // Exactly the planned space, or an unknown amount, lets the write run.
    for (const std::optional<std::uint64_t> space : {std::optional<std::uint64_t>(needed), std::optional<std::uint64_t>()}) {
      TempDir dir;
      write_inputs(dir.path());
      {
        ScopedFreeSpace enough([space](const fs::path&) { return space; });
        write_output(output_case, dir.path());
      }
      CHECK(fs::exists(dir / out_name));
    }
  }
}

TEST_CASE("real free space of the temporary folder is known", "[io][faults]") {
  TempDir dir;
  const auto available = cki::free_space(dir.path());
  REQUIRE(available.has_value());
  CHECK(*available > 0);
  CHECK_FALSE(cki::free_space(dir / "missing" / "folder").has_value());
  CHECK_NOTHROW(cki::check_free_space(dir / "missing" / "folder" / "out.safetensors", UINT64_MAX));
}

namespace {

/// A running cki-splice child process, killed and reaped if the test ends
/// before it does.
class ToolProcess {
 public:
  /// Starts cki-splice with `arguments`, stdout and stderr into files in
  /// `folder`. With `file_size_limit`, the child runs under RLIMIT_FSIZE
  /// of that many bytes with SIGXFSZ ignored, so a write past the limit
  /// fails with EFBIG as a full disk fails with ENOSPC.
  ToolProcess(const fs::path& folder, const std::vector<std::string>& arguments,
              std::optional<rlim_t> file_size_limit = std::nullopt)
      : out_(folder / "tool.stdout"), err_(folder / "tool.stderr") {
    // Everything the child needs is built before fork, because only
    // async-signal-safe calls may run between fork and exec.
    std::vector<std::string> strings = {kTool};
    strings.insert(strings.end(), arguments.begin(), arguments.end());
    std::vector<char*> argv;
    for (auto& text : strings) argv.push_back(text.data());
    argv.push_back(nullptr);
    const std::string out = out_.string();
    const std::string err = err_.string();

    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      const int out_fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int err_fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (out_fd < 0 || err_fd < 0 || ::dup2(out_fd, 1) < 0 || ::dup2(err_fd, 2) < 0) ::_exit(126);
      if (file_size_limit) {
        ::signal(SIGXFSZ, SIG_IGN);
        const struct rlimit limit = {*file_size_limit, *file_size_limit};
        if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(126);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ToolProcess(const ToolProcess&) = delete;
  ToolProcess& operator=(const ToolProcess&) = delete;
  ~ToolProcess() {
    if (pid_ > 0 && !status_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  /// True while the child has not exited.
  bool running() {
    if (status_) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) status_ = status;
    return !status_;
  }

  void kill_now() { REQUIRE(::kill(pid_, SIGKILL) == 0); }

  /// Waits for the child and returns its raw wait status.
  int wait() {
    if (!status_) {
      int status = 0;
      REQUIRE(::waitpid(pid_, &status, 0) == pid_);
      status_ = status;
    }
    return *status_;
  }

  std::string err() const { return read_file(err_); }

 private:
  fs::path out_;
  fs::path err_;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

/// Writes a model of `tensors` F32 tensors of `rows` x `columns` to `path`
/// tensor by tensor, values from a seeded generator.
void write_large_model(const fs::path& path, unsigned seed, int tensors, std::int64_t rows, std::int64_t columns) {
  std::vector<cki::TensorSpec> specs;
  for (int t = 0; t < tensors; ++t) specs.push_back({"block." + std::to_string(t) + ".weight", DType::F32, {rows, columns}});
  cki::CheckpointWriter writer(path, specs, {}, cki::WriteOptions{});
  std::vector<float> buffer(static_cast<std::size_t>(rows * columns));
  std::uint32_t state = seed;
  for (const std::string& name : writer.order()) {
    for (float& value : buffer) {
      state = state * 1664525u + 1013904223u;
      value = static_cast<float>(state >> 8) / 16777216.0f - 0.5f;
    }
    writer.write(name, buffer.data(), buffer.size());
  }
  writer.commit();
}

/// Returns the first temporary file of the output out.safetensors in
/// `folder`, or an empty path while there is none.
fs::path temporary_output(const fs::path& folder) {
  for (const auto& name : hidden_entries(folder)) {
    if (name.rfind(".out.safetensors.tmp-", 0) == 0) return folder / name;
  }
  return {};
}

}  // namespace

TEST_CASE("cki-splice killed mid-write leaves no output", "[io][faults][tool]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  constexpr int kTensors = 6;
  constexpr std::int64_t kRows = 512;
  constexpr std::int64_t kColumns = 2048;  // 4 MiB of F32 per tensor
  write_large_model(dir / "a.safetensors", 11, kTensors, kRows, kColumns);
  write_large_model(dir / "b.safetensors", 12, kTensors, kRows, kColumns);
  const auto inputs_before = snapshot(dir.path());
  const std::vector<std::string> arguments = {(dir / "a.safetensors").string(), (dir / "b.safetensors").string(),
                                              "-o", (dir / "out.safetensors").string(), "--quiet"};

  // Kill the tool once its temporary file contains the header and at least
  // 1 MiB of tensor data, so the kill lands in the middle of the output.
  fs::path temporary;
  {
    ToolProcess tool(dir.path(), arguments);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
    bool killed = false;
    while (std::chrono::steady_clock::now() < deadline && tool.running()) {
      temporary = temporary_output(dir.path());
      std::error_code error;
      if (!temporary.empty() && fs::file_size(temporary, error) > (std::uint64_t{1} << 20) && !error) {
        tool.kill_now();
        killed = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const int status = tool.wait();
    INFO("stderr: " << tool.err());
    REQUIRE(killed);
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
  }

  // Nothing at the output path and the inputs unchanged. SIGKILL gives the
  // tool no chance to clean up, so its temporary file stays behind.
  CHECK_FALSE(fs::exists(dir / "out.safetensors"));
  CHECK(fs::exists(temporary));
  const std::uint64_t stray_size = fs::file_size(temporary);
  auto after = snapshot(dir.path());
  after.erase(temporary.filename().string());
  after.erase("tool.stdout");
  after.erase("tool.stderr");
  CHECK(after == inputs_before);

  // A second run is not confused by the stray temporary file: it writes a
  // complete output under its own temporary name and leaves the stray alone.
  {
    ToolProcess tool(dir.path(), arguments);
    const int status = tool.wait();
    INFO("stderr: " << tool.err());
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  const cki::Checkpoint merged(dir / "out.safetensors");
  CHECK(merged.tensors().size() == kTensors);
  CHECK(fs::file_size(temporary) == stray_size);
  CHECK(hidden_entries(dir.path()) == std::vector<std::string>{temporary.filename().string()});
}

TEST_CASE("cki-splice stopped by a file-size limit cleans up", "[io][faults][tool]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  write_large_model(dir / "a.safetensors", 21, 2, 256, 1024);
  write_large_model(dir / "b.safetensors", 22, 2, 256, 1024);
  const auto inputs_before = snapshot(dir.path());

  // Files of at most 256 KiB: the 2 MiB output fails part-way with EFBIG.
  ToolProcess tool(dir.path(),
                   {(dir / "a.safetensors").string(), (dir / "b.safetensors").string(), "-o",
                    (dir / "out.safetensors").string(), "--quiet"},
                   rlim_t{256 * 1024});
  const int status = tool.wait();
  const std::string err = tool.err();
  INFO("stderr: " << err);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK_THAT(err, Contains("File too large"));
  CHECK_THAT(err, Contains("cannot write the output '" + (dir / "out.safetensors").string() + "', which is left unchanged"));
  CHECK_FALSE(fs::exists(dir / "out.safetensors"));
  CHECK(hidden_entries(dir.path()).empty());
  auto after = snapshot(dir.path());
  after.erase("tool.stdout");
  after.erase("tool.stderr");
  CHECK(after == inputs_before);
}

TEST_CASE("cki-splice checks free space before reading", "[io][faults][tool]") {
  SKIP_WITHOUT_TOOL();
  TempDir dir;
  const auto available = cki::free_space(dir.path());
  REQUIRE(available.has_value());

  // Two sparse inputs whose one F32 tensor is larger than the free space:
  // the data is a hole, so they take almost no disk.
  const std::uint64_t elements = *available / 4 + (std::uint64_t{1} << 28);
  for (const char* name : {"a.safetensors", "b.safetensors"}) {
    const std::string header = "{\"w\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(elements) +
                               "],\"data_offsets\":[0," + std::to_string(elements * 4) + "]}}";
    write_file(dir / name, safetensors_bytes(header, ""));
    fs::resize_file(dir / name, 8 + header.size() + elements * 4);
  }

  ToolProcess tool(dir.path(), {(dir / "a.safetensors").string(), (dir / "b.safetensors").string(), "-o",
                                (dir / "out.safetensors").string()});
  const auto start = std::chrono::steady_clock::now();
  const int status = tool.wait();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string err = tool.err();
  INFO("stderr: " << err);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK_THAT(err, Contains("not enough free space in folder '" + dir.path().string() + "'"));
  CHECK_THAT(err, Contains("for output '" + (dir / "out.safetensors").string() + "'"));
  CHECK_THAT(err, Contains(" bytes are free"));
  CHECK(seconds < 30);
  CHECK_FALSE(fs::exists(dir / "out.safetensors"));
  CHECK(hidden_entries(dir.path()).empty());
}
