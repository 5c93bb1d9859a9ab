// Umbrella header: everything a user of cki needs for in-memory merges.
#pragma once

#include "cki/assessment/combination_rule.hpp"
#include "cki/assessment/compatibility_assessment.hpp"
#include "cki/assessment/context.hpp"
#include "cki/assessment/global_weight.hpp"
#include "cki/assessment/information_content.hpp"
#include "cki/assessment/local_uncertainty.hpp"
#include "cki/dtype.hpp"
#include "cki/errors.hpp"
#include "cki/merge/registry.hpp"
#include "cki/splicing/any_policy.hpp"
#include "cki/splicing/policy.hpp"
#include "cki/splicing/report.hpp"
#include "cki/splicing/splice.hpp"
#include "cki/tensor.hpp"
#include "cki/weight_set.hpp"
