#pragma once
/// @file prune.hpp
/// Pruning: masks (unstructured magnitude pruning, layer-wise and global; N:M), an optimizer
/// wrapper that keeps pruned weights zero through every step (ZeRO included), the gradual
/// (Zhu–Gupta) schedule, and structured pruning that builds a physically smaller model.

#include "prune/mask.hpp"
#include "prune/masked.hpp"
#include "prune/schedule.hpp"
#include "prune/structured.hpp"
