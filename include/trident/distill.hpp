#pragma once
/// @file distill.hpp
/// Knowledge distillation: Hinton's loss (distill/loss.hpp) with its CPU kernel, and the
/// teacher–student trainer (distill/trainer.hpp). Host-safe (included by trident.hpp).

#include "distill/cpu_kernels.hpp"
#include "distill/kernels.hpp"
#include "distill/loss.hpp"
#include "distill/trainer.hpp"
