// Storage dtypes of tensors: names as safetensors spells them, sizes, kinds.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace cki {

/// Element type of a stored tensor. The names follow the safetensors format.
enum class DType {
  BOOL,
  U8,
  I8,
  U16,
  I16,
  U32,
  I32,
  U64,
  I64,
  F8_E4M3,
  F8_E5M2,
  F16,
  BF16,
  F32,
  F64,
};

/// Every dtype, in declaration order.
inline constexpr DType kAllDTypes[] = {
    DType::BOOL, DType::U8,      DType::I8,      DType::U16, DType::I16,
    DType::U32,  DType::I32,     DType::U64,     DType::I64, DType::F8_E4M3,
    DType::F8_E5M2, DType::F16,  DType::BF16,    DType::F32, DType::F64,
};

/// Returns the safetensors name of `dtype`, for example "BF16".
inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::BOOL: return "BOOL";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::U16: return "U16";
    case DType::I16: return "I16";
    case DType::U32: return "U32";
    case DType::I32: return "I32";
    case DType::U64: return "U64";
    case DType::I64: return "I64";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F32: return "F32";
    case DType::F64: return "F64";
  }
  return "unknown";
}

/// Parses a safetensors dtype name; returns nothing for an unknown name.
inline std::optional<DType> parse_dtype(std::string_view name) {
  for (DType dtype : kAllDTypes) {
    if (name == dtype_name(dtype)) return dtype;
  }
  return std::nullopt;
}

/// Returns the size of one element of `dtype` in bytes.
inline std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::BOOL:
    case DType::U8:
    case DType::I8:
    case DType::F8_E4M3:
    case DType::F8_E5M2: return 1;
    case DType::U16:
    case DType::I16:
    case DType::F16:
    case DType::BF16: return 2;
    case DType::U32:
    case DType::I32:
    case DType::F32: return 4;
    case DType::U64:
    case DType::I64:
    case DType::F64: return 8;
  }
  return 0;
}

/// True for the dtypes cki converts to the compute scalar and splices:
/// F16, BF16, F32 and F64. Integer, BOOL and F8 tensors are copied from the
/// base model byte for byte.
inline bool is_spliceable(DType dtype) {
  return dtype == DType::F16 || dtype == DType::BF16 || dtype == DType::F32 ||
         dtype == DType::F64;
}

/// True for every floating-point dtype, F8 variants included.
inline bool is_floating(DType dtype) {
  return is_spliceable(dtype) || dtype == DType::F8_E4M3 || dtype == DType::F8_E5M2;
}

/// The dtype that stores the compute scalar `Scalar` (float or double) as is.
template <typename Scalar>
constexpr DType dtype_of() {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "cki computes in float or double");
  return std::is_same_v<Scalar, float> ? DType::F32 : DType::F64;
}

}  // namespace cki
