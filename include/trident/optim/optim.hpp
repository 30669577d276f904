#pragma once
/// @file optim/optim.hpp
/// Every trident optimizer, and gradient clipping: sgd, adam, adamw, lamb, adagrad
/// (each also includable on its own), grad_norm / clip_factor / first_nonfinite.

#include "adagrad.hpp"
#include "adam.hpp"
#include "clip.hpp"
#include "lamb.hpp"
#include "optimizer.hpp"
#include "sgd.hpp"
