// Learned CKI and calibration: learnable assessments with their backward
// pass, Adam, the whole-model learner, the learned-maps file and calibrate().
#pragma once

#include "cki/learn/adam.hpp"
#include "cki/learn/calibrate.hpp"
#include "cki/learn/learnable_assessment.hpp"
#include "cki/learn/learnable_splice.hpp"
#include "cki/learn/learned_maps.hpp"
#include "cki/learn/maps_file.hpp"
