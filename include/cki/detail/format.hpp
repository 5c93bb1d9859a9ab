// Parameter values in error messages, and the out-of-range error every
// parameter struct's check() throws.
#pragma once

#include <iomanip>
#include <sstream>
#include <stdexcept>
#include <string>

namespace cki::detail {

/// Formats a parameter value for an error message: "1.5", "1e-07".
inline std::string format_value(double value) {
  std::ostringstream text;
  text << std::setprecision(10) << value;
  return text.str();
}

/// Throws std::invalid_argument "'field' must be RANGE, got VALUE".
[[noreturn]] inline void throw_out_of_range(const std::string& field, const std::string& range, double value) {
  throw std::invalid_argument("'" + field + "' must be " + range + ", got " + format_value(value));
}

}  // namespace cki::detail
