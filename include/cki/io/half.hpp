// Conversion of stored tensor elements (F16, BF16, F32, F64 bytes) to and
// from the compute scalar, using Eigen::half and Eigen::bfloat16.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "cki/dtype.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "cki reads and writes safetensors data, which is little-endian, on little-endian hosts only"
#endif

namespace cki {

namespace detail {

template <typename T>
T load_unaligned(const std::uint8_t* bytes) {
  T value;
  std::memcpy(&value, bytes, sizeof(T));
  return value;
}

template <typename T>
void store_unaligned(std::uint8_t* bytes, T value) {
  std::memcpy(bytes, &value, sizeof(T));
}

inline void require_spliceable(DType dtype, const char* action) {
  if (!is_spliceable(dtype)) {
    throw std::invalid_argument(std::string("cannot ") + action + " dtype " + dtype_name(dtype) +
                                "; only F16, BF16, F32 and F64 convert to the compute scalar");
  }
}

}  // namespace detail

/// Converts `count` elements stored as `dtype` (little-endian, any alignment)
/// at `bytes` to the compute scalar, writing them to `out`.
/// Widening conversions are exact. F64 to float rounds to nearest.
/// Throws std::invalid_argument when `dtype` is not F16, BF16, F32 or F64.
template <typename Scalar>
void decode_values(DType dtype, const std::uint8_t* bytes, std::size_t count, Scalar* out) {
  detail::require_spliceable(dtype, "decode");
  switch (dtype) {
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i) {
        const auto bits = detail::load_unaligned<std::uint16_t>(bytes + 2 * i);
        out[i] = static_cast<Scalar>(static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits)));
      }
      break;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i) {
        const auto bits = detail::load_unaligned<std::uint16_t>(bytes + 2 * i);
        out[i] = static_cast<Scalar>(static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits)));
      }
      break;
    case DType::F32:
      for (std::size_t i = 0; i < count; ++i) {
        out[i] = static_cast<Scalar>(detail::load_unaligned<float>(bytes + 4 * i));
      }
      break;
    default:  // F64
      for (std::size_t i = 0; i < count; ++i) {
        out[i] = static_cast<Scalar>(detail::load_unaligned<double>(bytes + 8 * i));
      }
      break;
  }
}

/// Converts `count` compute-scalar values to `dtype`, rounding to nearest
/// even, and writes them little-endian to `bytes` (any alignment).
/// Returns the index of the first finite value that rounded to infinity
/// because it lies beyond the range of `dtype` (F16 above 65504, say), or
/// nothing when every value fits. Values past that index are still written.
/// Throws std::invalid_argument when `dtype` is not F16, BF16, F32 or F64.
///
/// A double reaches F16 and BF16 through float. That double rounding is
/// harmless because float carries at least 2p + 2 significant bits for a
/// target of p bits (24 >= 2 * 11 + 2 for F16, 24 >= 2 * 8 + 2 for BF16).
template <typename Scalar>
std::optional<std::size_t> encode_values(const Scalar* values, std::size_t count, DType dtype,
                                         std::uint8_t* bytes) {
  detail::require_spliceable(dtype, "encode to");
  std::optional<std::size_t> first_overflow;
  auto note_overflow = [&](std::size_t i, bool stored_is_inf) {
    if (stored_is_inf && std::isfinite(values[i]) && !first_overflow) first_overflow = i;
  };

  switch (dtype) {
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i) {
        const Eigen::half stored(static_cast<float>(values[i]));
        detail::store_unaligned(bytes + 2 * i, Eigen::numext::bit_cast<std::uint16_t>(stored));
        note_overflow(i, (Eigen::numext::isinf)(stored));
      }
      break;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i) {
        const Eigen::bfloat16 stored(static_cast<float>(values[i]));
        detail::store_unaligned(bytes + 2 * i, Eigen::numext::bit_cast<std::uint16_t>(stored));
        note_overflow(i, (Eigen::numext::isinf)(stored));
      }
      break;
    case DType::F32:
      for (std::size_t i = 0; i < count; ++i) {
        const auto stored = static_cast<float>(values[i]);
        detail::store_unaligned(bytes + 4 * i, stored);
        note_overflow(i, std::isinf(stored));
      }
      break;
    default:  // F64
      for (std::size_t i = 0; i < count; ++i) {
        detail::store_unaligned(bytes + 8 * i, static_cast<double>(values[i]));
      }
      break;
  }
  return first_overflow;
}

/// Returns the largest finite value of the spliceable `dtype`, as a double.
inline double dtype_max(DType dtype) {
  detail::require_spliceable(dtype, "bound");
  switch (dtype) {
    case DType::F16: return static_cast<double>(static_cast<float>((Eigen::NumTraits<Eigen::half>::highest)()));
    case DType::BF16: return static_cast<double>(static_cast<float>((Eigen::NumTraits<Eigen::bfloat16>::highest)()));
    case DType::F32: return static_cast<double>((std::numeric_limits<float>::max)());
    default: return (std::numeric_limits<double>::max)();
  }
}

/// Converts as encode_values() does, except that a finite value beyond the
/// range of `dtype` is written as the dtype's largest finite value with the
/// value's sign (saturation) rather than as infinity. NaN and infinite
/// values are written as they are. Returns the number of values saturated.
/// Throws std::invalid_argument when `dtype` is not F16, BF16, F32 or F64.
template <typename Scalar>
std::uint64_t encode_values_saturated(const Scalar* values, std::size_t count, DType dtype, std::uint8_t* bytes) {
  const std::optional<std::size_t> first_overflow = encode_values(values, count, dtype, bytes);
  if (!first_overflow) return 0;

  // Re-encode from the first overflow on, one value at a time, so each
  // overflowing value is found and replaced by the signed maximum.
  const std::size_t element = dtype_size(dtype);
  const double highest = dtype_max(dtype);
  std::uint64_t saturated = 0;
  for (std::size_t i = *first_overflow; i < count; ++i) {
    std::uint8_t* slot = bytes + i * element;
    if (!encode_values(values + i, 1, dtype, slot)) continue;
    const auto bound = static_cast<Scalar>(std::copysign(highest, static_cast<double>(values[i])));
    encode_values(&bound, 1, dtype, slot);
    ++saturated;
  }
  return saturated;
}

}  // namespace cki
