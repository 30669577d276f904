#pragma once
/// @file nn.hpp
/// Neural-network modules: parameters in flat buffers, activation arenas, module
/// composition and the layers, with backward passes. Host-safe (included by trident.hpp).

#include "nn/activations.hpp"
#include "nn/arena.hpp"
#include "nn/attention.hpp"
#include "nn/batch_norm.hpp"
#include "nn/conv2d.hpp"
#include "nn/embedding.hpp"
#include "nn/gpt.hpp"
#include "nn/kernels.hpp"
#include "nn/layer_norm.hpp"
#include "nn/linear.hpp"
#include "nn/loss.hpp"
#include "nn/module.hpp"
#include "nn/parameters.hpp"
#include "nn/pooling.hpp"
#include "nn/serialize.hpp"
#include "backend/cpu/conv_kernels.hpp"
#include "backend/cpu/nn_kernels.hpp"
