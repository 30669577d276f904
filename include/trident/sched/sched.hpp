#pragma once
/// @file sched/sched.hpp
/// Every trident learning-rate scheduler (DeepSpeed's, with its names and step convention):
/// warmup_lr, warmup_decay_lr, warmup_cosine_lr, one_cycle, lr_range_test.

#include "lr_range_test.hpp"
#include "one_cycle.hpp"
#include "scheduler.hpp"
#include "warmup_cosine_lr.hpp"
#include "warmup_lr.hpp"
