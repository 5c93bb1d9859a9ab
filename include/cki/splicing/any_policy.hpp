// AnyPolicy: a splicing policy chosen at run time, for tools and registries.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cki/assessment/context.hpp"
#include "cki/splicing/report.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"

namespace cki {

/// Type-erased splicing policy: holds any policy (see SplicingPolicy for the
/// interface) behind one type, so a tool can pick the method by name.
/// Copies share the held policy, which is never modified.
/// \tparam Scalar compute scalar, float or double.
template <typename Scalar>
class AnyPolicy {
 public:
  AnyPolicy() = default;

  template <typename Policy, typename = std::enable_if_t<!std::is_same_v<std::decay_t<Policy>, AnyPolicy>>>
  AnyPolicy(Policy policy)  // NOLINT(google-explicit-constructor): a policy converts implicitly
      : held_(std::make_shared<const Model<Policy>>(std::move(policy))) {
    static_assert(detail::is_splicing_policy<Policy, Scalar>::value,
                  "Policy needs name(), parameters(), check(std::size_t) and merge(...) as documented "
                  "on SplicingPolicy");
  }

  explicit operator bool() const { return held_ != nullptr; }

  std::string name() const { return get().name(); }
  nlohmann::json parameters() const { return get().parameters(); }
  void check(std::size_t n_models) const { get().check(n_models); }
  bool checks_finite() const { return get().checks_finite(); }
  /// Returns the held policy's stats and notes; the result converts to the
  /// stats vector alone.
  TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                          Scalar* out) const {
    return get().merge(context, models, out);
  }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual std::string name() const = 0;
    virtual nlohmann::json parameters() const = 0;
    virtual void check(std::size_t n_models) const = 0;
    virtual bool checks_finite() const = 0;
    virtual TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                                    Scalar* out) const = 0;
  };

  template <typename Policy>
  struct Model final : Concept {
    explicit Model(Policy held) : policy(std::move(held)) {}
    std::string name() const override { return policy.name(); }
    nlohmann::json parameters() const override { return policy.parameters(); }
    void check(std::size_t n_models) const override { policy.check(n_models); }
    bool checks_finite() const override { return detail::policy_checks_finite(policy); }
    TensorMergeResult merge(const TensorContext& context, const std::vector<TensorView<Scalar>>& models,
                            Scalar* out) const override {
      return policy.merge(context, models, out);
    }
    Policy policy;
  };

  const Concept& get() const {
    if (!held_) throw std::logic_error("AnyPolicy holds no policy");
    return *held_;
  }

  std::shared_ptr<const Concept> held_;
};

}  // namespace cki
