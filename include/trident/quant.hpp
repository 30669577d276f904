#pragma once
/// @file quant.hpp
/// Quantization, all of it: the ONNX element arithmetic, int8 and weight-only weights and
/// their kernels, schemes, observers, fake quantization and QAT, the quantized linear layer,
/// post-training conversion, and the quantized GPT.
///
///   #include <trident/quant.hpp>
///   auto qnet = quant::convert<quant::dynamic_int8<quant::per_row>>(net, store);

#include "quant/onnx.hpp"
#include "quant/packed_int8.hpp"
#include "quant/weight_only.hpp"
#include "quant/storage.hpp"
#include "quant/scheme.hpp"
#include "quant/observer.hpp"
#include "quant/fake_quant.hpp"
#include "quant/qlinear.hpp"
#include "quant/convert.hpp"
#include "quant/gpt.hpp"
