#pragma once
/// @file train.hpp
/// Training runs: the optimizer step as the precision policy dictates (loss scaling, overflow
/// skipping, clipping), the classification trainer, progress bar, CSV log and memory figures.
/// Host-safe (included by trident.hpp).

#include "train/csv_log.hpp"
#include "train/memory.hpp"
#include "train/progress.hpp"
#include "train/step.hpp"
#include "train/trainer.hpp"
