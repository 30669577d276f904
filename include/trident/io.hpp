#pragma once
/// @file io.hpp
/// Opt-in umbrella for data loading: the IDX reader, Fashion-MNIST and the batch loader.
/// Not part of trident.hpp because the IDX reader needs zlib: link trident::io (which
/// links ZLIB::ZLIB), or zlib yourself (-lz).

#include "io/batches.hpp"
#include "io/fashion_mnist.hpp"
#include "io/idx.hpp"
