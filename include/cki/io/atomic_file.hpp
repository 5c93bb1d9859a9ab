// Crash-safe output files and folders: written under a temporary name in the
// target folder, synced, then renamed into place.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "cki/errors.hpp"

namespace cki {

/// A function with the contract of POSIX write(2): writes up to `size`
/// bytes to `fd` and returns how many, or -1 with errno set.
using WriteFunction = std::function<ssize_t(int fd, const void* data, std::size_t size)>;

/// A function returning the bytes available to unprivileged users in the
/// file system that contains `folder`, or nothing when that is unknown.
using FreeSpaceFunction = std::function<std::optional<std::uint64_t>(const std::filesystem::path& folder)>;

namespace detail {

/// The write function AtomicFile uses; empty means ::write.
inline WriteFunction& installed_write_function() {
  static WriteFunction function;
  return function;
}

/// The free-space function check_free_space uses; empty means statvfs.
inline FreeSpaceFunction& installed_free_space_function() {
  static FreeSpaceFunction function;
  return function;
}

/// The text of an errno value, for messages.
inline std::string errno_text(int error) { return std::generic_category().message(error); }

/// Writes all `size` bytes to `fd` through the installed write function,
/// retrying short writes and EINTR. Throws IoError naming `path` when a
/// write fails or writes nothing.
inline void write_all(int fd, const void* data, std::size_t size, const std::string& path) {
  const WriteFunction& write_function = installed_write_function();
  const auto* bytes = static_cast<const std::uint8_t*>(data);
  while (size > 0) {
    const ssize_t written = write_function ? write_function(fd, bytes, size) : ::write(fd, bytes, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      throw IoError("cannot write " + std::to_string(size) + " bytes to '" + path +
                    "': " + errno_text(errno));
    }
    // A regular file never takes zero bytes of a non-empty write, and
    // retrying would loop forever.
    if (written == 0) {
      throw IoError("cannot write " + std::to_string(size) + " bytes to '" + path +
                    "': the write stored no bytes");
    }
    bytes += written;
    size -= static_cast<std::size_t>(written);
  }
}

/// Reads exactly `size` bytes at `offset` of `fd`, retrying short reads and
/// EINTR. Throws IoError naming `path` on failure or early end of file.
inline void pread_all(int fd, void* data, std::size_t size, std::uint64_t offset,
                      const std::string& path) {
  auto* bytes = static_cast<std::uint8_t*>(data);
  while (size > 0) {
    const ssize_t got = ::pread(fd, bytes, size, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError("cannot read " + std::to_string(size) + " bytes at offset " +
                    std::to_string(offset) + " of '" + path + "': " + errno_text(errno));
    }
    if (got == 0) {
      throw IoError("'" + path + "' ended at byte " + std::to_string(offset) + " while " +
                    std::to_string(size) + " more bytes were expected; was it truncated while being read?");
    }
    bytes += got;
    size -= static_cast<std::size_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
}

/// Flushes `fd` to storage. Throws IoError naming `path`.
inline void fsync_fd(int fd, const std::string& path) {
  if (::fsync(fd) != 0) throw IoError("cannot sync '" + path + "' to disk: " + errno_text(errno));
}

/// Flushes a folder's entries (a rename inside it, say) to storage.
/// Throws IoError naming the folder.
inline void fsync_folder(const std::filesystem::path& folder) {
  const std::string name = folder.empty() ? std::string(".") : folder.string();
  const int fd = ::open(name.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open folder '" + name + "' to sync it: " + errno_text(errno));
  const int result = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (result != 0) throw IoError("cannot sync folder '" + name + "' to disk: " + errno_text(error));
}

/// Returns the folder that contains `path`, or "." for a bare file name.
inline std::filesystem::path parent_folder(const std::filesystem::path& path) {
  std::filesystem::path parent = std::filesystem::absolute(path).parent_path();
  return parent.empty() ? std::filesystem::path(".") : parent;
}

/// True when `path` exists, without following a final symbolic link.
inline bool path_exists(const std::filesystem::path& path) {
  std::error_code error;
  return std::filesystem::exists(std::filesystem::symlink_status(path, error));
}

}  // namespace detail

/// Installs `function` as the write function of every AtomicFile, in place
/// of ::write, and returns the one it replaces; an empty function restores
/// ::write. Tests use it to inject ENOSPC and short writes.
/// NOTE: the function is process-wide and not synchronised, so install it
/// only while no other thread writes a cki output.
inline WriteFunction set_write_function(WriteFunction function) {
  std::swap(detail::installed_write_function(), function);
  return function;
}

/// Installs `function` as the source of free space for check_free_space,
/// in place of statvfs, and returns the one it replaces; an empty function
/// restores statvfs. Process-wide and not synchronised, as
/// set_write_function is.
inline FreeSpaceFunction set_free_space_function(FreeSpaceFunction function) {
  std::swap(detail::installed_free_space_function(), function);
  return function;
}

/// Returns the bytes available to unprivileged users in the file system
/// that contains `folder` (statvfs: f_bavail blocks of f_frsize bytes), or
/// nothing when statvfs fails, or as the installed free-space function
/// reports.
inline std::optional<std::uint64_t> free_space(const std::filesystem::path& folder) {
  if (const FreeSpaceFunction& function = detail::installed_free_space_function()) return function(folder);
  struct statvfs status {};
  if (::statvfs(folder.c_str(), &status) != 0) return std::nullopt;
  return static_cast<std::uint64_t>(status.f_bavail) * static_cast<std::uint64_t>(status.f_frsize);
}

/// Checks, before anything is written, that the folder that will hold
/// `output` has `bytes_needed` bytes free. Throws IoError naming the folder,
/// the bytes needed and the bytes free when it has fewer. Does nothing when
/// the free space is unknown (the folder is missing, say), so the write
/// itself reports that.
/// NOTE: other writers can fill the disk after this check, so a write can
/// still fail with ENOSPC; the output is then discarded as for any failure.
inline void check_free_space(const std::filesystem::path& output, std::uint64_t bytes_needed) {
  const std::filesystem::path folder = detail::parent_folder(output);
  const std::optional<std::uint64_t> available = free_space(folder);
  if (!available || *available >= bytes_needed) return;
  throw IoError("not enough free space in folder '" + folder.string() + "' for output '" + output.string() +
                "': it needs " + std::to_string(bytes_needed) + " bytes, but " + std::to_string(*available) +
                " bytes are free; free some space or choose an output on another file system");
}

/// True when `a` and `b` name the same existing file or folder (same device
/// and inode, so hard links and symbolic links count as the same file).
inline bool same_file(const std::filesystem::path& a, const std::filesystem::path& b) {
  struct stat stat_a {};
  struct stat stat_b {};
  if (::stat(a.c_str(), &stat_a) != 0 || ::stat(b.c_str(), &stat_b) != 0) return false;
  return stat_a.st_dev == stat_b.st_dev && stat_a.st_ino == stat_b.st_ino;
}

/// Throws IoError when writing `output` would replace or delete one of
/// `inputs`: when `output` is an input, or is a folder that contains one
/// (compared by inode and by canonical path, so links are seen through).
inline void check_not_input(const std::filesystem::path& output,
                            const std::vector<std::filesystem::path>& inputs) {
  namespace fs = std::filesystem;
  std::error_code error;
  auto normal = [&error](const fs::path& path) {
    fs::path result = fs::weakly_canonical(fs::absolute(path), error).lexically_normal();
    if (!result.has_filename() && result.has_parent_path()) result = result.parent_path();
    return result;
  };
  const fs::path output_canonical = normal(output);
  for (const fs::path& input : inputs) {
    if (same_file(output, input)) {
      throw IoError("output '" + output.string() + "' is the input '" + input.string() +
                    "'; choose another output path");
    }
    const fs::path input_canonical = normal(input);
    const auto mismatch = std::mismatch(output_canonical.begin(), output_canonical.end(),
                                        input_canonical.begin(), input_canonical.end());
    if (mismatch.first == output_canonical.end()) {
      throw IoError("output '" + output.string() + "' contains the input '" + input.string() +
                    "', which replacing it would delete; choose another output path");
    }
  }
}

/// A file written under a temporary name beside its target and renamed into
/// place by `commit()`. Until then the target is untouched. Destroying an
/// uncommitted AtomicFile removes the temporary file, so a failure never
/// leaves a partial file at the target path.
/// NOTE: a process killed by SIGKILL (or a power loss) leaves its temporary
/// file, named ".<target name>.tmp-XXXXXX", behind. Later writes pick new
/// random names and never read it, so only the disk space is lost.
class AtomicFile {
 public:
  /// Creates the temporary file in the folder of `target`.
  /// Throws IoError when the folder is missing or not writable, and when
  /// `target` exists and `overwrite` is false.
  explicit AtomicFile(std::filesystem::path target, bool overwrite = false)
      : target_(std::move(target)), overwrite_(overwrite) {
    check_target();
    const std::filesystem::path folder = detail::parent_folder(target_);
    std::string pattern = (folder / ("." + target_.filename().string() + ".tmp-XXXXXX")).string();
    fd_ = ::mkostemp(pattern.data(), O_CLOEXEC);
    if (fd_ < 0) {
      throw IoError("cannot create a temporary file in '" + folder.string() + "' for '" +
                    target_.string() + "': " + detail::errno_text(errno));
    }
    temp_ = pattern;
    ::fchmod(fd_, 0644);
  }

  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  ~AtomicFile() { discard(); }

  /// Appends `size` bytes. Throws IoError naming the temporary file.
  void write(const void* data, std::size_t size) { detail::write_all(fd_, data, size, temp_.string()); }

  /// Syncs the file, renames it to the target and syncs the folder.
  /// Throws IoError; the target is then unchanged.
  void commit() {
    detail::fsync_fd(fd_, temp_.string());
    if (::close(fd_) != 0) {
      fd_ = -1;
      throw IoError("cannot close '" + temp_.string() + "': " + detail::errno_text(errno));
    }
    fd_ = -1;

    // NOTE: a file created at the target between this check and the rename
    // is replaced even without `overwrite`.
    check_target();
    if (::rename(temp_.c_str(), target_.c_str()) != 0) {
      throw IoError("cannot rename '" + temp_.string() + "' to '" + target_.string() +
                    "': " + detail::errno_text(errno));
    }
    temp_.clear();
    detail::fsync_folder(detail::parent_folder(target_));
  }

  /// Closes and removes the temporary file; the target stays as it was.
  void discard() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!temp_.empty()) ::unlink(temp_.c_str());
    temp_.clear();
  }

  const std::filesystem::path& target() const { return target_; }
  const std::filesystem::path& temp_path() const { return temp_; }

  /// Throws IoError when `target` exists and `overwrite` is false, or is a
  /// folder: the checks the constructor and commit() make.
  static void check_target(const std::filesystem::path& target, bool overwrite) {
    if (!overwrite && detail::path_exists(target)) {
      throw IoError("output '" + target.string() + "' already exists; remove it or allow replacing it");
    }
    if (overwrite && std::filesystem::is_directory(target)) {
      throw IoError("output '" + target.string() + "' is a folder, not a file");
    }
  }

 private:
  void check_target() const { check_target(target_, overwrite_); }

  std::filesystem::path target_;
  bool overwrite_ = false;
  std::filesystem::path temp_;
  int fd_ = -1;
};

/// A folder assembled under a temporary name beside its target and renamed
/// into place by `commit()`. Destroying an uncommitted AtomicFolder removes
/// the temporary folder and everything in it.
class AtomicFolder {
 public:
  /// Creates the temporary folder beside `target`.
  /// Throws IoError when the parent folder is missing or not writable, and
  /// when `target` exists and `overwrite` is false.
  explicit AtomicFolder(std::filesystem::path target, bool overwrite = false)
      : target_(std::move(target)), overwrite_(overwrite) {
    check_target();
    const std::filesystem::path parent = detail::parent_folder(target_);
    std::string pattern = (parent / ("." + target_.filename().string() + ".tmp-XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) {
      throw IoError("cannot create a temporary folder in '" + parent.string() + "' for '" +
                    target_.string() + "': " + detail::errno_text(errno));
    }
    temp_ = pattern;
    ::chmod(temp_.c_str(), 0755);
  }

  AtomicFolder(const AtomicFolder&) = delete;
  AtomicFolder& operator=(const AtomicFolder&) = delete;

  ~AtomicFolder() { discard(); }

  /// The temporary folder to write files into.
  const std::filesystem::path& path() const { return temp_; }
  const std::filesystem::path& target() const { return target_; }

  /// Syncs the folder and renames it to the target. With `overwrite`, an
  /// existing target is first renamed aside and deleted after the new
  /// folder is in place, so no partial folder ever appears at the target.
  /// Throws IoError; the target is then unchanged.
  void commit() {
    namespace fs = std::filesystem;
    detail::fsync_folder(temp_);
    check_target();

    fs::path aside;
    if (detail::path_exists(target_)) {
      std::string pattern = (detail::parent_folder(target_) /
                             ("." + target_.filename().string() + ".old-XXXXXX")).string();
      if (::mkdtemp(pattern.data()) == nullptr) {
        throw IoError("cannot create a folder beside '" + target_.string() +
                      "' to move the old output into: " + detail::errno_text(errno));
      }
      aside = fs::path(pattern) / "old";
      if (::rename(target_.c_str(), aside.c_str()) != 0) {
        const int error = errno;
        ::rmdir(pattern.c_str());
        throw IoError("cannot move the old output '" + target_.string() + "' aside: " +
                      detail::errno_text(error));
      }
    }

    if (::rename(temp_.c_str(), target_.c_str()) != 0) {
      const int error = errno;
      if (!aside.empty()) ::rename(aside.c_str(), target_.c_str());
      throw IoError("cannot rename '" + temp_.string() + "' to '" + target_.string() +
                    "': " + detail::errno_text(error));
    }
    temp_.clear();
    detail::fsync_folder(detail::parent_folder(target_));

    if (!aside.empty()) {
      std::error_code ignored;
      fs::remove_all(aside.parent_path(), ignored);
    }
  }

  /// Removes the temporary folder and its contents.
  void discard() noexcept {
    if (temp_.empty()) return;
    std::error_code ignored;
    std::filesystem::remove_all(temp_, ignored);
    temp_.clear();
  }

 private:
  void check_target() const {
    if (!detail::path_exists(target_)) return;
    if (!overwrite_) {
      throw IoError("output '" + target_.string() + "' already exists; remove it or allow replacing it");
    }
  }

  std::filesystem::path target_;
  bool overwrite_ = false;
  std::filesystem::path temp_;
};

}  // namespace cki
