#pragma once
/// @file trident.hpp
/// trident: header-only C++20 deep-learning training. This umbrella brings in everything that
/// compiles with a plain host compiler; it never includes MPI or CUDA headers. Opt in to
/// those with trident/mpi.hpp (link trident::mpi) and trident/cuda.hpp (nvcc, trident::cuda).

#include "version.hpp"
#include "config.hpp"
#include "fwd.hpp"

#include "precision/bfloat16.hpp"
#include "precision/convert.hpp"
#include "precision/half.hpp"
#include "precision/loss_scaler.hpp"
#include "precision/policy.hpp"

#include "core/activation.hpp"
#include "core/concepts.hpp"
#include "core/error.hpp"
#include "core/kernels.hpp"
#include "core/policy.hpp"
#include "core/rng.hpp"
#include "core/shape.hpp"
#include "core/tensor.hpp"

#include "parallel/strategy.hpp"

#include "backend/cpu/device.hpp"
#include "backend/cpu/kernels.hpp"

#include "ops/elementwise.hpp"
#include "ops/fill.hpp"
#include "ops/functors.hpp"
#include "ops/gemm.hpp"
#include "ops/reduce.hpp"
#include "ops/transfer.hpp"
#include "nn.hpp"
#include "optim/optim.hpp"
#include "sched/sched.hpp"
#include "train.hpp"
#include "prune.hpp"
#include "distill.hpp"
