#pragma once
/// @file io.hpp
/// Datasets: the IDX reader (plain or gzip), Fashion-MNIST, shuffled and sharded batches, and
/// character-level text (io/char_text.hpp, which alone needs no zlib).
/// Needs zlib: link trident::io (find_package(trident COMPONENTS io)). Not included by
/// trident.hpp, whose users need no zlib.

#include "io/batches.hpp"
#include "io/char_text.hpp"
#include "io/fashion_mnist.hpp"
#include "io/idx.hpp"
