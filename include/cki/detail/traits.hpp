// Detection traits that turn a missing member of a user-supplied functor
// into a readable compile error.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/tensor.hpp"

namespace cki::detail {

template <typename Info, typename Scalar, typename = void>
struct is_information_content : std::false_type {};
template <typename Info, typename Scalar>
struct is_information_content<
    Info, Scalar,
    std::enable_if_t<std::is_convertible_v<
        decltype(std::declval<const Info&>()(std::declval<const TensorView<Scalar>&>(),
                                             std::declval<const std::string&>(), 0)),
        double>>> : std::true_type {};

template <typename Global, typename = void>
struct is_global_weight : std::false_type {};
template <typename Global>
struct is_global_weight<
    Global, std::enable_if_t<std::is_convertible_v<
                decltype(std::declval<const Global&>()(std::declval<const std::vector<double>&>())),
                std::vector<double>>>> : std::true_type {};

template <typename Local, typename Scalar, typename = void>
struct is_local_uncertainty : std::false_type {};
template <typename Local, typename Scalar>
struct is_local_uncertainty<
    Local, Scalar,
    std::void_t<decltype(std::declval<const Local&>().check_tensor(std::declval<const TensorContext&>())),
                decltype(std::declval<const Local&>()(
                    std::declval<const TensorContext&>(), std::declval<const Scalar* const*>(),
                    std::int64_t{}, std::declval<BlockArray<Scalar>&>(),
                    std::declval<BlockArray<Scalar>&>()))>> : std::true_type {};

template <typename Rule, typename Scalar, typename = void>
struct is_combination_rule : std::false_type {};
template <typename Rule, typename Scalar>
struct is_combination_rule<
    Rule, Scalar,
    std::void_t<decltype(std::declval<const Rule&>().check(std::size_t{})),
                decltype(std::declval<const Rule&>()(
                    std::declval<const std::vector<Scalar>&>(), std::int64_t{},
                    std::declval<const BlockArray<Scalar>&>(), std::declval<BlockArray<Scalar>&>(),
                    std::declval<BlockArray<Scalar>&>()))>> : std::true_type {};

template <typename T, typename = void>
struct has_needs_whole_rows : std::false_type {};
template <typename T>
struct has_needs_whole_rows<
    T, std::void_t<decltype(bool(std::declval<const T&>().needs_whole_rows(std::declval<const TensorContext&>())))>>
    : std::true_type {};

/// The functor's `needs_whole_rows(context)`, or true when it has none: a
/// functor that does not say otherwise gets blocks of whole rows of the
/// last dimension.
template <typename T>
bool needs_whole_rows(const T& functor, const TensorContext& context) {
  if constexpr (has_needs_whole_rows<T>::value) {
    return functor.needs_whole_rows(context);
  } else {
    return true;
  }
}

template <typename T, typename = void>
struct has_softmax_curves : std::false_type {};
template <typename T>
struct has_softmax_curves<T, std::void_t<decltype(std::declval<const T&>().softmax_curves(
                                 std::declval<const TensorContext&>(), std::declval<const std::vector<double>&>()))>>
    : std::true_type {};

template <typename Splice, typename Scalar, typename = void>
struct has_apply_scaled : std::false_type {};
template <typename Splice, typename Scalar>
struct has_apply_scaled<Splice, Scalar,
                        std::void_t<decltype(Splice::apply_scaled(
                            std::declval<const BlockArray<Scalar>&>(), std::declval<const Scalar*>(),
                            std::declval<const Scalar* const*>(), std::int64_t{}, Eigen::Index{},
                            std::declval<Scalar*>(), std::declval<double*>(), std::declval<std::int64_t*>()))>>
    : std::true_type {};

class SoftmaxCurves;

template <typename Splice, typename = void>
struct has_apply_curves : std::false_type {};
template <typename Splice>
struct has_apply_curves<Splice, std::void_t<decltype(Splice::template apply_curves<2>(
                                    std::declval<const SoftmaxCurves&>(), std::declval<const float* const*>(),
                                    std::int64_t{}, std::declval<float*>(), std::declval<double*>(),
                                    std::declval<std::int64_t*>()))>> : std::true_type {};

template <typename T, typename = void>
struct has_parameters : std::false_type {};
template <typename T>
struct has_parameters<T, std::void_t<decltype(std::declval<const T&>().parameters())>>
    : std::true_type {};

/// The functor's `parameters()` as JSON, or an empty object when it has none.
template <typename T>
nlohmann::json parameters_of(const T& functor) {
  if constexpr (has_parameters<T>::value) {
    return functor.parameters();
  } else {
    return nlohmann::json::object();
  }
}

}  // namespace cki::detail
