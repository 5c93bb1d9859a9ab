// Exception types of cki, one per cause of failure.
#pragma once

#include <stdexcept>
#include <string>

namespace cki {

/// Base of every cki exception except `std::invalid_argument`, which cki
/// throws for out-of-range parameters and misuse of the API.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

/// Malformed input: a checkpoint file or index that breaks its format.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// Weight sets that do not fit together: missing or extra tensors, shape or
/// dtype-kind mismatches.
class MismatchError : public Error {
 public:
  using Error::Error;
};

/// An operating-system call on a file failed (open, read, map, write, rename).
class IoError : public Error {
 public:
  using Error::Error;
};

/// A value the computation cannot use or produce: NaN or infinity in an
/// input, or an output beyond the range of its dtype.
class NumericError : public Error {
 public:
  using Error::Error;
};

}  // namespace cki
