#pragma once
/// @file quant/convert.hpp
/// Post-training quantization (PTQ) and the conversion of QAT models, on trident's
/// compile-time models: a converted nn::sequential is another nn::sequential type in which
/// each linear layer became a qlinear of the chosen scheme and every other module is kept
/// (dropout is the identity in an eval context; activations, flatten, ... run as before).
///
/// Dynamic and weight-only schemes need no data:
///
///   auto qnet = quant::convert<quant::dynamic_int8<quant::per_row>>(net, store);
///   auto q4   = quant::convert<quant::weight_only<quant::int4_t, 32>>(net, store);
///
/// The static scheme needs the input range of every linear layer. Calibration is a model
/// state of its own: quant::calibrate<Observer>(net, store) returns a copy of the model in
/// which each linear is an observed_linear (the same layer, same weights, plus an observer of
/// its input); run forwards over a few batches in an eval context, then convert that model:
///
///   auto cal = quant::calibrate<quant::minmax_observer>(net, store);
///   for (auto& batch : calibration) { memory.reset(); nn::context<P> ctx{memory, false}; cal.forward(ctx, batch); }
///   auto qnet = quant::convert<quant::static_int8>(cal, store);
///
/// A model trained with quantization-aware training (qat_linear layers) converts the same
/// way, with its frozen activation parameters: quant::convert<quant::static_int8>(qat_net, store).
/// Converting a plain linear to static_int8 without calibration is a compile-time error.
///
/// copy_parameters(from, to) copies every tensor of one store into the same-named tensor of
/// another (fp32 weights into a QAT model, for fine-tuning).

#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#include "../nn/linear.hpp"
#include "../nn/module.hpp"
#include "../nn/parameters.hpp"
#include "fake_quant.hpp"
#include "observer.hpp"
#include "qlinear.hpp"
#include "scheme.hpp"

namespace trident::quant {

/// A linear layer that shows its input to an observer at every forward: the calibrating
/// state of a layer before static quantization. Computes exactly what the linear computes.
/// @tparam Policy the policy bundle
/// @tparam Observer the observer of the layer's input (quant::observer)
template <policy_bundle Policy, observer Observer = minmax_observer>
class observed_linear {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;
  using observer_type = Observer;

  /// Wraps a copy of `l` (it shares the weights in `store`).
  observed_linear(const nn::linear<Policy>& l, Observer obs = Observer{}) : linear_(l), observer_(std::move(obs)) {}

  tensor_view<S, D> forward(nn::context<Policy>& ctx, tensor_view<const S, D> x) {
    auto y = linear_.forward(ctx, x);  // checks the shape first
    observer_.observe(x);
    return y;
  }
  tensor_view<S, D> backward(nn::context<Policy>& ctx, tensor_view<const S, D> dy) { return linear_.backward(ctx, dy); }
  std::int64_t flops() const noexcept { return linear_.flops(); }

  const nn::linear<Policy>& linear() const noexcept { return linear_; }
  const Observer& observer() const noexcept { return observer_; }
  Observer& observer() noexcept { return observer_; }

 private:
  nn::linear<Policy> linear_;
  Observer observer_;
};

/// How one module converts under Scheme: the primary template keeps it as it is.
template <class Scheme, class M>
struct converter {
  template <class Store>
  static M apply(M& m, Store&) {
    return m;
  }
};

/// A linear becomes qlinear<P, Scheme>; static_int8 needs calibration first.
template <class Scheme, policy_bundle P>
struct converter<Scheme, nn::linear<P>> {
  static_assert(!Scheme::calibrated,
                "quant::convert<static_int8>: a plain nn::linear has no calibrated input range; calibrate first "
                "(auto cal = quant::calibrate<Observer>(net, store); run forwards on calibration batches; then "
                "quant::convert<quant::static_int8>(cal, store)) or train it with quant::qat_linear");
  static qlinear<P, Scheme> apply(nn::linear<P>& m, nn::parameter_store<P>& store) { return qlinear<P, Scheme>(m, store); }
};

/// An observed linear becomes qlinear<P, Scheme>, with its observer's parameters for
/// static_int8 (other schemes ignore the observer).
template <class Scheme, policy_bundle P, class O>
struct converter<Scheme, observed_linear<P, O>> {
  static qlinear<P, Scheme> apply(observed_linear<P, O>& m, nn::parameter_store<P>& store) {
    if constexpr (Scheme::calibrated) {
      if (m.observer().empty()) {
        throw error("quant::convert<static_int8>: the observer of '" + store.info(m.linear().weight()).name +
                    "' has seen no input; run forwards of the calibrated model over calibration batches first");
      }
      return qlinear<P, Scheme>(m.linear(), store, m.observer().template params<std::uint8_t>());
    } else {
      return qlinear<P, Scheme>(m.linear(), store);
    }
  }
};

/// A QAT layer becomes qlinear<P, static_int8> with its (frozen) activation parameters and
/// the same per-channel int8 weights its forward used.
template <class Scheme, policy_bundle P, class O>
struct converter<Scheme, qat_linear<P, O>> {
  static_assert(std::is_same_v<Scheme, static_int8>,
                "quant::convert: a qat_linear converts to quant::static_int8, the scheme it was trained for");
  static qlinear<P, Scheme> apply(qat_linear<P, O>& m, nn::parameter_store<P>& store) {
    auto w = detail::float_values(store, m.weight());
    auto b = m.bias().valid() ? detail::float_values(store, m.bias()) : std::vector<float>{};
    return qlinear<P, Scheme>(m.name(), w, m.out_features(), m.in_features(), b, m.act(), m.input_params());
  }
};

template <class Scheme, class M, class Store>
using converted_t = decltype(converter<Scheme, M>::apply(std::declval<M&>(), std::declval<Store&>()));

/// A nested sequential converts module by module.
template <class Scheme, policy_bundle P, class... Ms>
struct converter<Scheme, nn::sequential<P, Ms...>> {
  static auto apply(nn::sequential<P, Ms...>& net, nn::parameter_store<P>& store) {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
      return nn::sequential<P, converted_t<Scheme, Ms, nn::parameter_store<P>>...>(
          converter<Scheme, Ms>::apply(net.template get<I>(), store)...);
    }(std::index_sequence_for<Ms...>{});
  }
};

/// `net` with every linear layer (plain, observed or QAT) converted to qlinear<P, Scheme>;
/// the other modules are copied. The new model holds its own quantized weights.
/// @tparam Scheme the quantization scheme (quant/scheme.hpp)
template <scheme Scheme, policy_bundle P, class... Ms>
auto convert(nn::sequential<P, Ms...>& net, nn::parameter_store<P>& store) {
  return converter<Scheme, nn::sequential<P, Ms...>>::apply(net, store);
}

namespace detail {
template <class O, class M>
struct observe_one {
  template <class Store>
  static M apply(M& m, Store&) {
    return m;
  }
};
template <class O, policy_bundle P>
struct observe_one<O, nn::linear<P>> {
  static observed_linear<P, O> apply(nn::linear<P>& m, nn::parameter_store<P>&) { return observed_linear<P, O>(m); }
};
template <class O, policy_bundle P, class... Ms>
struct observe_one<O, nn::sequential<P, Ms...>> {
  static auto apply(nn::sequential<P, Ms...>& net, nn::parameter_store<P>& store) {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
      return nn::sequential<P, decltype(observe_one<O, Ms>::apply(std::declval<Ms&>(), store))...>(
          observe_one<O, Ms>::apply(net.template get<I>(), store)...);
    }(std::index_sequence_for<Ms...>{});
  }
};
}  // namespace detail

/// The calibrating state of `net`: a copy in which every linear is an observed_linear with a
/// fresh Observer (sharing the weights in `store`). Run eval forwards on calibration batches,
/// then convert<static_int8>.
/// @tparam Observer minmax_observer, moving_average_minmax_observer or percentile_observer
template <observer Observer = minmax_observer, policy_bundle P, class... Ms>
auto calibrate(nn::sequential<P, Ms...>& net, nn::parameter_store<P>& store) {
  return detail::observe_one<Observer, nn::sequential<P, Ms...>>::apply(net, store);
}

/// Copies every tensor of `to` from the tensor of the same name and shape in `from` (master
/// and params of `to`, converting the element type). Throws naming the first tensor missing
/// from `from` or of another shape.
template <policy_bundle From, policy_bundle To>
void copy_parameters(nn::parameter_store<From>& from, nn::parameter_store<To>& to) {
  for (std::size_t i = 0; i < to.infos().size(); ++i) {
    const auto& dst = to.infos()[i];
    const nn::parameter_info* src = nullptr;
    int src_index = -1;
    for (std::size_t k = 0; k < from.infos().size(); ++k) {
      if (from.infos()[k].name == dst.name) {
        src = &from.infos()[k];
        src_index = static_cast<int>(k);
        break;
      }
    }
    if (src == nullptr) throw error("quant::copy_parameters: '" + dst.name + "' is not in the source store");
    if (!(src->extents == dst.extents)) {
      throw shape_error("quant::copy_parameters: '" + dst.name + "' has shape " + src->extents.str() +
                        " in the source and " + dst.extents.str() + " in the destination");
    }
    const nn::parameter_handle hs{src_index}, hd{static_cast<int>(i)};
    copy(from.master(hs), to.master(hd));
  }
  to.params_from_master();
}

}  // namespace trident::quant
