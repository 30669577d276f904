#pragma once
/// @file config/deepspeed.hpp
/// DeepSpeed's JSON configuration, parsed into typed options that trident's optimizers,
/// schedulers, loss scaler, step and distributed step take, and mapped onto the policies a
/// binary was compiled with. Needs nlohmann/json (link trident::json, or have
/// <nlohmann/json.hpp> on the include path); not included by trident.hpp.
///
///   #include <trident/config/deepspeed.hpp>
///   using namespace trident;
///
///   auto cfg = config::load_deepspeed_config("ds_config.json", {.world_size = comm.size()});
///   std::puts(cfg.str().c_str());                        // the effective config, defaults included
///   config::dispatch<policy<fp32, cpu, single>, policy<bf16_mixed, cpu, zero<2>>>(cfg, [&]<class P>(config::type_tag<P>) {
///     nn::parameter_store<P> store;                      // ... the model ...
///     auto opt = config::make_optimizer(cfg);            // std::variant of optim::adam, adamw, sgd, lamb, adagrad
///     std::visit([&](auto& o) { auto s = config::make_scheduler(cfg, o); /* ... train ... */ }, opt);
///     parallel::distributed_step<P, decltype(comm)> step(store, comm, cfg.distributed_options());
///   });
///
/// What is read, by DeepSpeed's key names and defaults:
///
/// | section | keys | maps onto |
/// |---|---|---|
/// | batch | train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps | train = micro × accumulation × world size; resolve_batch_sizes |
/// | optimizer | type (Adam, AdamW, SGD, Lamb, Adagrad; any case), params | optim::*_options |
/// | scheduler | type (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest), params | sched::*_options |
/// | fp16 | enabled, loss_scale, initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis, min_loss_scale | train::step_options, dynamic_loss_scaler_options |
/// | bf16 | enabled | the precision |
/// | zero_optimization | stage, reduce_bucket_size, allgather_bucket_size, overlap_comm, contiguous_gradients, stage3_prefetch_bucket_size, stage3_param_persistence_threshold | the strategy, parallel::distributed_options |
/// | top level | gradient_clipping, steps_per_print, wall_clock_breakdown | train::step_options, the trainer |
///
/// DeepSpeed's other common keys (flops_profiler, activation_checkpointing, checkpoint,
/// tensorboard, ... and zero_optimization's offload_optimizer, reduce_scatter, ...) are accepted
/// and recorded as given (deepspeed_config::recorded, zero_config::recorded); any other key is
/// an error. Every problem is one trident::config::config_error whose message names the key
/// path: `deepspeed config: zero_optimization.stage: 4 is not a ZeRO stage (0-3)`.

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../optim/optim.hpp"
#include "../parallel/strategy.hpp"
#include "../parallel/zero.hpp"
#include "../precision/loss_scaler.hpp"
#include "../sched/sched.hpp"
#include "../train/step.hpp"

namespace trident::config {

/// A configuration that cannot be used; the message names the key path and the value.
class config_error : public error {
 public:
  using error::error;
};

/// The training precision a config asks for (fp16.enabled, bf16.enabled).
enum class precision_kind {
  fp32,        ///< neither fp16 nor bf16 enabled
  bf16_mixed,  ///< bf16.enabled
  fp16_mixed   ///< fp16.enabled
};

/// The name of a precision_kind, as trident's precision policies are named.
inline const char* to_string(precision_kind p) noexcept {
  switch (p) {
    case precision_kind::bf16_mixed: return "bf16_mixed";
    case precision_kind::fp16_mixed: return "fp16_mixed";
    default: return "fp32";
  }
}

/// The three batch sizes, consistent: train_batch_size = micro × accumulation × world size.
struct batch_sizes {
  std::int64_t train_batch_size = 0;                ///< samples per optimizer step, over all ranks
  std::int64_t train_micro_batch_size_per_gpu = 0;  ///< samples per forward/backward on one rank
  std::int64_t gradient_accumulation_steps = 0;     ///< micro-batches per optimizer step
};

/// The optimizers a config can name.
enum class optimizer_kind { adam, adamw, sgd, lamb, adagrad };

/// The typed hyperparameters of one optimizer.
using optimizer_options =
    std::variant<optim::adam_options, optim::adamw_options, optim::sgd_options, optim::lamb_options, optim::adagrad_options>;

/// The "optimizer" section.
struct optimizer_config {
  /// DeepSpeed's spelling of the type: "Adam", "AdamW", "SGD", "Lamb" or "Adagrad".
  std::string type;
  /// What runs: DeepSpeed's "Adam" is AdamW (decoupled weight decay) unless params.adam_w_mode
  /// is false, as its FusedAdam does.
  optimizer_kind kind = optimizer_kind::adamw;
  /// params.adam_w_mode ("Adam" only; DeepSpeed's default true).
  bool adam_w_mode = true;
  /// The hyperparameters, DeepSpeed's defaults filled in (FusedAdam's weight_decay is 0).
  optimizer_options options;
};

/// The schedulers a config can name.
enum class scheduler_kind { warmup_lr, warmup_decay_lr, warmup_cosine_lr, one_cycle, lr_range_test };

/// The typed parameters of one scheduler (DeepSpeed's names, as sched:: uses them).
using scheduler_options = std::variant<sched::warmup_lr_options, sched::warmup_decay_lr_options, sched::warmup_cosine_lr_options,
                                       sched::one_cycle_options, sched::lr_range_test_options>;

/// The "scheduler" section.
struct scheduler_config {
  std::string type;  ///< "WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle" or "LRRangeTest"
  scheduler_kind kind = scheduler_kind::warmup_lr;
  scheduler_options options;  ///< the parameters, DeepSpeed's defaults filled in
};

/// The "fp16" section (DeepSpeed's names and defaults).
struct fp16_config {
  bool enabled = false;
  double loss_scale = 0.0;  ///< 0: dynamic loss scaling; > 0: this static scale
  dynamic_loss_scaler_options dynamic{};  ///< initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis, min_loss_scale
  bool auto_cast = false;  ///< recorded (DeepSpeed casts the model's inputs to fp16)
};

/// The "bf16" section.
struct bf16_config {
  bool enabled = false;
};

/// The "zero_optimization" section.
struct zero_config {
  int stage = 0;  ///< 0 (data parallel), 1, 2 or 3
  /// Elements per gradient collective. DeepSpeed's default, 5e8, is sized for GPUs; when the
  /// key is absent this is parallel::distributed_options' default (2^21).
  std::int64_t reduce_bucket_size = parallel::distributed_options{}.reduce_bucket_size;
  std::int64_t allgather_bucket_size = 500000000;  ///< recorded (ZeRO-1/2 all-gather the parameters in one pass)
  bool overlap_comm = false;                       ///< recorded (data parallel always launches its all-reduces during backward)
  bool contiguous_gradients = true;                ///< recorded (the gradients are one flat buffer anyway)
  std::int64_t stage3_prefetch_bucket_size = 50000000;       ///< ZeRO-3: 0 turns the prefetch of the next unit off
  std::int64_t stage3_param_persistence_threshold = 100000;  ///< ZeRO-3: units of at most this many elements stay gathered
  /// DeepSpeed's other zero_optimization keys (offload_optimizer, reduce_scatter, ...), as given.
  nlohmann::json recorded = nlohmann::json::object();
};

/// Options of the parser.
struct parse_options {
  int world_size = 1;  ///< ranks of the run: the batch rule and the strategy depend on it
};

/// A parsed DeepSpeed configuration, defaults filled in.
struct deepspeed_config {
  int world_size = 1;  ///< the world size it was resolved for
  std::int64_t train_batch_size = 0;
  std::int64_t train_micro_batch_size_per_gpu = 0;
  std::int64_t gradient_accumulation_steps = 0;
  std::optional<optimizer_config> optimizer{};  ///< absent: the program builds its own
  std::optional<scheduler_config> scheduler{};  ///< absent: a constant lr
  fp16_config fp16{};
  bf16_config bf16{};
  zero_config zero_optimization{};
  double gradient_clipping = 0.0;   ///< max global L2 norm; 0 = off
  std::int64_t steps_per_print = 10;
  bool wall_clock_breakdown = false;
  /// DeepSpeed's other accepted top-level keys (flops_profiler, activation_checkpointing,
  /// checkpoint, ...), as given.
  nlohmann::json recorded = nlohmann::json::object();

  /// The precision the fp16 and bf16 sections ask for.
  precision_kind precision() const noexcept {
    return fp16.enabled ? precision_kind::fp16_mixed : bf16.enabled ? precision_kind::bf16_mixed : precision_kind::fp32;
  }
  /// The strategy's name (as parallel strategies name themselves): "single" (stage 0, one
  /// rank), "data_parallel" (stage 0, more), "zero_1", "zero_2", "zero_3".
  std::string strategy_name() const {
    if (zero_optimization.stage == 0) return world_size == 1 ? "single" : "data_parallel";
    return "zero_" + std::to_string(zero_optimization.stage);
  }
  /// The batch sizes.
  batch_sizes batches() const noexcept { return {train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps}; }
  /// Clipping and loss scaling, as train::step_control and the trainer take them.
  train::step_options step_options() const {
    return {.gradient_clipping = gradient_clipping, .loss_scale = fp16.loss_scale, .dynamic_scaler = fp16.dynamic};
  }
  /// The options of parallel::distributed_step.
  parallel::distributed_options distributed_options() const {
    parallel::distributed_options o;
    o.reduce_bucket_size = zero_optimization.reduce_bucket_size;
    o.param_persistence_threshold = zero_optimization.stage3_param_persistence_threshold;
    o.prefetch = zero_optimization.stage3_prefetch_bucket_size > 0;
    o.step = step_options();
    return o;
  }
  /// The effective configuration, defaults included, as DeepSpeed JSON: parsing it again (with
  /// the same world size) gives this configuration back.
  nlohmann::json effective() const;
  /// effective(), pretty-printed (2-space indent), to print at the start of a run.
  std::string str() const { return effective().dump(2); }
};

namespace detail {

using nlohmann::json;

inline std::string join_path(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}

[[noreturn]] inline void fail(const std::string& path, const std::string& what) { throw config_error(path + ": " + what); }

inline std::string lower(std::string_view s) {
  std::string r(s);
  for (auto& c : r) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

/// Levenshtein distance, case-insensitive.
inline std::size_t edit_distance(std::string_view a0, std::string_view b0) {
  const std::string a = lower(a0), b = lower(b0);
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

/// The closest of `candidates` to `s`, when close enough to be a slip.
inline std::optional<std::string> nearest(std::string_view s, const std::vector<std::string_view>& candidates) {
  std::optional<std::string> best;
  std::size_t best_d = std::numeric_limits<std::size_t>::max();
  const std::string ls = lower(s);
  for (auto c : candidates) {
    // A truncated name (gradient_clip for gradient_clipping) counts as one slip.
    const std::string lc = lower(c);
    const bool prefix = ls.size() >= 4 && lc.size() > ls.size() && lc.compare(0, ls.size(), ls) == 0;
    const std::size_t d = prefix ? 1 : edit_distance(s, c);
    if (d < best_d) best_d = d, best = std::string(c);
  }
  if (best && best_d <= std::max<std::size_t>(2, s.size() / 4)) return best;
  return std::nullopt;
}

inline std::string list(const std::vector<std::string_view>& names) {
  std::string r;
  for (std::size_t i = 0; i < names.size(); ++i) r += (i ? ", " : "") + std::string(names[i]);
  return r;
}

inline std::string describe(const json& v) {
  std::string d = v.dump();
  if (d.size() > 60) d = d.substr(0, 57) + "...";
  return std::string(v.type_name()) + " " + d;
}

[[noreturn]] inline void wrong_type(const std::string& path, const char* expected, const json& v) {
  std::string msg = std::string("expected ") + expected + ", got " + describe(v);
  if (v.is_string() && v.get<std::string>() == "auto") {
    msg += " (\"auto\" is filled in by Hugging Face's Trainer, not by DeepSpeed; give a value)";
  }
  fail(path, msg);
}

/// Refuses keys of `obj` that are neither in `known` nor in `recorded`, with a "did you mean".
inline void check_keys(const json& obj, const std::string& path, const std::vector<std::string_view>& known,
                       const std::vector<std::string_view>& recorded = {}) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    const std::string& k = it.key();
    const bool ok = std::find(known.begin(), known.end(), k) != known.end() ||
                    std::find(recorded.begin(), recorded.end(), k) != recorded.end();
    if (ok) continue;
    std::vector<std::string_view> all(known);
    all.insert(all.end(), recorded.begin(), recorded.end());
    std::string msg = "unknown key";
    if (auto n = nearest(k, all)) {
      msg += "; did you mean '" + *n + "'?";
    } else {
      msg += " (known here: " + list(known) + ")";
    }
    fail(join_path(path, k), msg);
  }
}

inline const json& require_object(const json& v, const std::string& path) {
  if (!v.is_object()) wrong_type(path, "an object", v);
  return v;
}

inline bool to_bool(const json& v, const std::string& path) {
  if (!v.is_boolean()) wrong_type(path, "a boolean (true or false)", v);
  return v.get<bool>();
}

/// An integer; DeepSpeed configs also write them as floats (5e8), which are taken when integral.
inline std::int64_t to_int(const json& v, const std::string& path) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) fail(path, v.dump() + " is too large");
    return static_cast<std::int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<std::int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && std::trunc(d) == d && std::fabs(d) < 9.2e18) return static_cast<std::int64_t>(d);
    fail(path, "expected an integer, got " + v.dump());
  }
  wrong_type(path, "an integer", v);
}

inline double to_double(const json& v, const std::string& path) {
  if (!v.is_number()) wrong_type(path, "a number", v);
  return v.get<double>();
}

inline std::string to_string(const json& v, const std::string& path) {
  if (!v.is_string()) wrong_type(path, "a string", v);
  return v.get<std::string>();
}

inline std::string num(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

/// Reads the keys of one section into typed fields.
class section {
 public:
  section(const json& obj, std::string path) : obj_(obj), path_(std::move(path)) {}

  const json* find(std::string_view key) const {
    auto it = obj_.find(std::string(key));
    return it == obj_.end() ? nullptr : &*it;
  }
  std::string path(std::string_view key) const { return join_path(path_, key); }

  void get(std::string_view key, bool& out) const {
    if (auto v = find(key)) out = to_bool(*v, path(key));
  }
  template <class Int>
    requires(std::is_integral_v<Int> && !std::is_same_v<Int, bool>)
  void get(std::string_view key, Int& out, std::int64_t min = std::numeric_limits<std::int64_t>::min(),
           std::int64_t max = std::numeric_limits<std::int64_t>::max()) const {
    if (auto v = find(key)) {
      const std::int64_t x = to_int(*v, path(key));
      const std::int64_t lo = std::max<std::int64_t>(min, std::numeric_limits<Int>::min());
      const std::int64_t hi = std::min<std::int64_t>(max, std::numeric_limits<Int>::max());
      if (x < lo || x > hi) {
        fail(path(key), std::to_string(x) + " is out of range (" + (lo == std::numeric_limits<std::int64_t>::min() ? std::string("..") : std::to_string(lo)) +
                            " to " + std::to_string(hi) + ")");
      }
      out = static_cast<Int>(x);
    }
  }
  template <class Int>
  void get(std::string_view key, std::optional<Int>& out) const {
    if (auto v = find(key)) {
      Int x{};
      get(key, x);
      out = x;
    }
  }
  /// A finite number, at least `min` (when given).
  void get(std::string_view key, double& out, std::optional<double> min = std::nullopt) const {
    if (auto v = find(key)) {
      const double x = to_double(*v, path(key));
      if (!std::isfinite(x)) fail(path(key), "must be finite, got " + v->dump());
      if (min && x < *min) fail(path(key), num(x) + " must be >= " + num(*min));
      out = x;
    }
  }
  void get(std::string_view key, std::optional<double>& out, std::optional<double> min = std::nullopt) const {
    if (find(key)) {
      double x = 0;
      get(key, x, min);
      out = x;
    }
  }

 private:
  const json& obj_;
  std::string path_;
};

/// Runs a validation that throws trident::error (a constructor of trident's own types) and
/// turns its message into a config_error at `path`.
template <class F>
void validate(const std::string& path, F&& f) {
  try {
    f();
  } catch (const config_error&) {
    throw;
  } catch (const error& e) {
    fail(path, e.what());
  }
}

// --- batch ---------------------------------------------------------------------------------

inline std::optional<std::int64_t> read_batch_key(const json& root, const char* key) {
  auto it = root.find(key);
  if (it == root.end() || it->is_null()) return std::nullopt;
  const std::int64_t v = to_int(*it, key);
  if (v <= 0) fail(key, std::to_string(v) + " must be > 0");
  return v;
}

// --- optimizer -----------------------------------------------------------------------------

inline void read_betas(const section& s, double& b1, double& b2) {
  const json* v = s.find("betas");
  if (!v) return;
  const std::string p = s.path("betas");
  if (!v->is_array() || v->size() != 2) wrong_type(p, "an array of two numbers [beta1, beta2]", *v);
  b1 = to_double((*v)[0], p + "[0]");
  b2 = to_double((*v)[1], p + "[1]");
}

inline optimizer_config read_optimizer(const json& v) {
  require_object(v, "optimizer");
  check_keys(v, "optimizer", {"type", "params"});
  auto t = v.find("type");
  if (t == v.end()) fail("optimizer.type", "missing (one of Adam, AdamW, SGD, Lamb, Adagrad)");
  const std::string type = to_string(*t, "optimizer.type");
  static const json empty = json::object();
  auto pi = v.find("params");
  const json& params = pi == v.end() ? empty : require_object(*pi, "optimizer.params");
  const section s(params, "optimizer.params");
  optimizer_config c;
  const std::string l = lower(type);
  // DeepSpeed's FusedAdam/FusedLamb defaults: no weight decay unless asked.
  if (l == "adam" || l == "adamw") {
    check_keys(params, "optimizer.params", {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction", "amsgrad"});
    c.type = l == "adam" ? "Adam" : "AdamW";
    s.get("adam_w_mode", c.adam_w_mode);
    bool torch_adam = false, bias_correction = true, amsgrad = false;
    s.get("torch_adam", torch_adam);
    s.get("bias_correction", bias_correction);
    s.get("amsgrad", amsgrad);
    if (!bias_correction) fail(s.path("bias_correction"), "false is not supported (trident's Adam always corrects the bias)");
    if (amsgrad) fail(s.path("amsgrad"), "true is not supported (trident's Adam has no AMSGrad variant)");
    const bool decoupled = l == "adamw" || c.adam_w_mode;
    optim::adamw_options o{.weight_decay = 0.0};
    s.get("lr", o.lr, 0.0);
    read_betas(s, o.beta1, o.beta2);
    s.get("eps", o.eps);
    s.get("weight_decay", o.weight_decay, 0.0);
    if (decoupled) {
      c.kind = optimizer_kind::adamw;
      c.options = o;
      validate("optimizer.params", [&] { optim::adamw check(o); });
    } else {
      c.kind = optimizer_kind::adam;
      const optim::adam_options a{.lr = o.lr, .beta1 = o.beta1, .beta2 = o.beta2, .eps = o.eps, .weight_decay = o.weight_decay};
      c.options = a;
      validate("optimizer.params", [&] { optim::adam check(a); });
    }
  } else if (l == "sgd") {
    check_keys(params, "optimizer.params", {"lr", "momentum", "dampening", "weight_decay", "nesterov"});
    c.type = "SGD";
    c.kind = optimizer_kind::sgd;
    optim::sgd_options o;
    s.get("lr", o.lr, 0.0);
    s.get("momentum", o.momentum, 0.0);
    s.get("dampening", o.dampening);
    s.get("weight_decay", o.weight_decay, 0.0);
    s.get("nesterov", o.nesterov);
    c.options = o;
    validate("optimizer.params", [&] { optim::sgd check(o); });
  } else if (l == "lamb") {
    check_keys(params, "optimizer.params",
               {"lr", "betas", "eps", "weight_decay", "bias_correction", "eps_inside_sqrt", "max_coeff", "min_coeff"});
    c.type = "Lamb";
    c.kind = optimizer_kind::lamb;
    optim::lamb_options o;
    s.get("lr", o.lr, 0.0);
    read_betas(s, o.beta1, o.beta2);
    s.get("eps", o.eps);
    s.get("weight_decay", o.weight_decay, 0.0);
    s.get("bias_correction", o.bias_correction);
    s.get("eps_inside_sqrt", o.eps_inside_sqrt);
    s.get("max_coeff", o.max_coeff);
    s.get("min_coeff", o.min_coeff);
    c.options = o;
    validate("optimizer.params", [&] { optim::lamb check(o); });
  } else if (l == "adagrad") {
    check_keys(params, "optimizer.params", {"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"});
    c.type = "Adagrad";
    c.kind = optimizer_kind::adagrad;
    optim::adagrad_options o;
    s.get("lr", o.lr, 0.0);
    s.get("lr_decay", o.lr_decay, 0.0);
    s.get("weight_decay", o.weight_decay, 0.0);
    s.get("initial_accumulator_value", o.initial_accumulator_value, 0.0);
    s.get("eps", o.eps);
    c.options = o;
    validate("optimizer.params", [&] { optim::adagrad check(o); });
  } else {
    const std::vector<std::string_view> names{"Adam", "AdamW", "SGD", "Lamb", "Adagrad"};
    std::string msg = "'" + type + "' is not an optimizer trident has (" + list(names) + ")";
    if (auto n = nearest(type, names)) msg += "; did you mean '" + *n + "'?";
    fail("optimizer.type", msg);
  }
  return c;
}

inline double optimizer_lr(const optimizer_config& c) {
  return std::visit([](const auto& o) { return o.lr; }, c.options);
}

inline json optimizer_json(const optimizer_config& c) {
  json p = json::object();
  std::visit(
      [&]<class O>(const O& o) {
        p["lr"] = o.lr;
        p["weight_decay"] = o.weight_decay;
        if constexpr (std::is_same_v<O, optim::adam_options> || std::is_same_v<O, optim::adamw_options>) {
          p["betas"] = {o.beta1, o.beta2};
          p["eps"] = o.eps;
          if (c.type == "Adam") p["adam_w_mode"] = c.adam_w_mode;
        } else if constexpr (std::is_same_v<O, optim::sgd_options>) {
          p["momentum"] = o.momentum;
          p["dampening"] = o.dampening;
          p["nesterov"] = o.nesterov;
        } else if constexpr (std::is_same_v<O, optim::lamb_options>) {
          p["betas"] = {o.beta1, o.beta2};
          p["eps"] = o.eps;
          p["bias_correction"] = o.bias_correction;
          p["eps_inside_sqrt"] = o.eps_inside_sqrt;
          p["max_coeff"] = o.max_coeff;
          p["min_coeff"] = o.min_coeff;
        } else {
          p["lr_decay"] = o.lr_decay;
          p["initial_accumulator_value"] = o.initial_accumulator_value;
          p["eps"] = o.eps;
        }
      },
      c.options);
  return {{"type", c.type}, {"params", p}};
}

// --- scheduler -----------------------------------------------------------------------------

inline void read_warmup_type(const section& s, sched::warmup_kind& out) {
  if (auto v = s.find("warmup_type")) {
    const std::string str = to_string(*v, s.path("warmup_type"));
    if (str == "log") {
      out = sched::warmup_kind::log;
    } else if (str == "linear") {
      out = sched::warmup_kind::linear;
    } else {
      fail(s.path("warmup_type"), "'" + str + "' is not a warmup type (\"log\" or \"linear\")");
    }
  }
}

inline scheduler_config read_scheduler(const json& v, std::optional<double> optimizer_lr) {
  require_object(v, "scheduler");
  check_keys(v, "scheduler", {"type", "params"});
  auto t = v.find("type");
  if (t == v.end()) fail("scheduler.type", "missing (one of WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)");
  const std::string type = to_string(*t, "scheduler.type");
  static const json empty = json::object();
  auto pi = v.find("params");
  const json& params = pi == v.end() ? empty : require_object(*pi, "scheduler.params");
  const std::string p = "scheduler.params";
  const section s(params, p);
  const double base_lr = optimizer_lr.value_or(1e-3);
  scheduler_config c;
  c.type = type;
  auto require_key = [&](std::string_view key) {
    if (!s.find(key)) fail(s.path(key), "missing (" + type + " needs it)");
  };
  if (type == "WarmupLR") {
    check_keys(params, p, {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"});
    c.kind = scheduler_kind::warmup_lr;
    sched::warmup_lr_options o;
    s.get("warmup_min_lr", o.warmup_min_lr);
    s.get("warmup_max_lr", o.warmup_max_lr);
    s.get("warmup_num_steps", o.warmup_num_steps);
    read_warmup_type(s, o.warmup_type);
    s.get("last_batch_iteration", o.last_batch_iteration);
    c.options = o;
    validate(p, [&] {
      auto q = o;
      q.warmup_max_lr = o.warmup_max_lr.value_or(base_lr);
      sched::warmup_lr check(q);
    });
  } else if (type == "WarmupDecayLR") {
    check_keys(params, p, {"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"});
    c.kind = scheduler_kind::warmup_decay_lr;
    require_key("total_num_steps");
    sched::warmup_decay_lr_options o;
    s.get("total_num_steps", o.total_num_steps);
    s.get("warmup_min_lr", o.warmup_min_lr);
    s.get("warmup_max_lr", o.warmup_max_lr);
    s.get("warmup_num_steps", o.warmup_num_steps);
    read_warmup_type(s, o.warmup_type);
    s.get("last_batch_iteration", o.last_batch_iteration);
    c.options = o;
    validate(p, [&] { sched::warmup_decay_lr check(o); });
  } else if (type == "WarmupCosineLR") {
    check_keys(params, p, {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type", "last_batch_iteration"});
    c.kind = scheduler_kind::warmup_cosine_lr;
    require_key("total_num_steps");
    sched::warmup_cosine_lr_options o;
    s.get("total_num_steps", o.total_num_steps);
    s.get("warmup_min_ratio", o.warmup_min_ratio);
    s.get("warmup_num_steps", o.warmup_num_steps);
    s.get("cos_min_ratio", o.cos_min_ratio);
    read_warmup_type(s, o.warmup_type);
    s.get("last_batch_iteration", o.last_batch_iteration);
    c.options = o;
    validate(p, [&] { sched::warmup_cosine_lr check(o, base_lr); });
  } else if (type == "OneCycle") {
    check_keys(params, p,
               {"cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size", "cycle_second_step_size",
                "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "cycle_momentum", "cycle_min_mom",
                "cycle_max_mom", "decay_mom_rate", "last_batch_iteration"});
    c.kind = scheduler_kind::one_cycle;
    require_key("cycle_min_lr");
    require_key("cycle_max_lr");
    sched::one_cycle_options o;
    s.get("cycle_min_lr", o.cycle_min_lr);
    s.get("cycle_max_lr", o.cycle_max_lr);
    s.get("decay_lr_rate", o.decay_lr_rate);
    s.get("cycle_first_step_size", o.cycle_first_step_size);
    s.get("cycle_second_step_size", o.cycle_second_step_size);
    s.get("cycle_first_stair_count", o.cycle_first_stair_count);
    s.get("cycle_second_stair_count", o.cycle_second_stair_count);
    s.get("decay_step_size", o.decay_step_size);
    s.get("cycle_momentum", o.cycle_momentum);
    s.get("cycle_min_mom", o.cycle_min_mom);
    s.get("cycle_max_mom", o.cycle_max_mom);
    s.get("decay_mom_rate", o.decay_mom_rate);
    s.get("last_batch_iteration", o.last_batch_iteration);
    c.options = o;
    validate(p, [&] { sched::one_cycle check(o); });
  } else if (type == "LRRangeTest") {
    check_keys(params, p,
               {"lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate", "lr_range_test_staircase",
                "last_batch_iteration"});
    c.kind = scheduler_kind::lr_range_test;
    sched::lr_range_test_options o;
    s.get("lr_range_test_min_lr", o.lr_range_test_min_lr);
    s.get("lr_range_test_step_size", o.lr_range_test_step_size);
    s.get("lr_range_test_step_rate", o.lr_range_test_step_rate);
    s.get("lr_range_test_staircase", o.lr_range_test_staircase);
    s.get("last_batch_iteration", o.last_batch_iteration);
    c.options = o;
    validate(p, [&] { sched::lr_range_test check(o); });
  } else {
    const std::vector<std::string_view> names{"WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"};
    std::string msg = "'" + type + "' is not a scheduler trident has (" + list(names) + ")";
    if (auto n = nearest(type, names)) msg += "; did you mean '" + *n + "'?";
    fail("scheduler.type", msg);
  }
  return c;
}

inline const char* warmup_name(sched::warmup_kind k) { return k == sched::warmup_kind::linear ? "linear" : "log"; }

inline json scheduler_json(const scheduler_config& c) {
  json p = json::object();
  std::visit(
      [&]<class O>(const O& o) {
        if constexpr (std::is_same_v<O, sched::warmup_lr_options> || std::is_same_v<O, sched::warmup_decay_lr_options>) {
          if constexpr (std::is_same_v<O, sched::warmup_decay_lr_options>) p["total_num_steps"] = o.total_num_steps;
          p["warmup_min_lr"] = o.warmup_min_lr;
          if (o.warmup_max_lr) p["warmup_max_lr"] = *o.warmup_max_lr;  // absent: the optimizer's lr
          p["warmup_num_steps"] = o.warmup_num_steps;
          p["warmup_type"] = warmup_name(o.warmup_type);
        } else if constexpr (std::is_same_v<O, sched::warmup_cosine_lr_options>) {
          p["total_num_steps"] = o.total_num_steps;
          p["warmup_min_ratio"] = o.warmup_min_ratio;
          p["warmup_num_steps"] = o.warmup_num_steps;
          p["cos_min_ratio"] = o.cos_min_ratio;
          p["warmup_type"] = warmup_name(o.warmup_type);
        } else if constexpr (std::is_same_v<O, sched::one_cycle_options>) {
          p["cycle_min_lr"] = o.cycle_min_lr;
          p["cycle_max_lr"] = o.cycle_max_lr;
          p["decay_lr_rate"] = o.decay_lr_rate;
          p["cycle_first_step_size"] = o.cycle_first_step_size;
          p["cycle_second_step_size"] = o.cycle_second_step_size.value_or(o.cycle_first_step_size);
          p["cycle_first_stair_count"] = o.cycle_first_stair_count;
          p["cycle_second_stair_count"] = o.cycle_second_stair_count.value_or(o.cycle_first_stair_count);
          p["decay_step_size"] = o.decay_step_size;
          p["cycle_momentum"] = o.cycle_momentum;
          p["cycle_min_mom"] = o.cycle_min_mom;
          p["cycle_max_mom"] = o.cycle_max_mom;
          p["decay_mom_rate"] = o.decay_mom_rate;
        } else {
          p["lr_range_test_min_lr"] = o.lr_range_test_min_lr;
          p["lr_range_test_step_size"] = o.lr_range_test_step_size;
          p["lr_range_test_step_rate"] = o.lr_range_test_step_rate;
          p["lr_range_test_staircase"] = o.lr_range_test_staircase;
        }
        p["last_batch_iteration"] = o.last_batch_iteration;
      },
      c.options);
  return {{"type", c.type}, {"params", p}};
}

// --- the rest ------------------------------------------------------------------------------

inline const std::vector<std::string_view>& recorded_top_level_keys() {
  static const std::vector<std::string_view> k{
      "flops_profiler", "activation_checkpointing", "checkpoint", "tensorboard", "wandb", "csv_monitor", "comet",
      "comms_logger", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "prescale_gradients",
      "gradient_predivide_factor", "sparse_gradients", "memory_breakdown", "dump_state", "communication_data_type",
      "data_types", "elasticity", "aio", "autotuning", "compression_training", "data_efficiency", "amp",
      "disable_allgather", "dataloader_drop_last", "gradient_accumulation_dtype"};
  return k;
}

inline const std::vector<std::string_view>& recorded_zero_keys() {
  static const std::vector<std::string_view> k{
      "allgather_partitions", "reduce_scatter", "offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_params",
      "sub_group_size", "round_robin_gradients", "elastic_checkpoint", "load_from_fp32_weights", "ignore_unused_parameters",
      "legacy_stage1", "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
      "stage3_gather_fp16_weights_on_model_save", "zero_hpz_partition_size", "zero_quantized_weights",
      "zero_quantized_gradients", "mics_shard_size", "memory_efficient_linear"};
  return k;
}

inline fp16_config read_fp16(const json& v) {
  require_object(v, "fp16");
  check_keys(v, "fp16",
             {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "consecutive_hysteresis",
              "min_loss_scale", "auto_cast"});
  const section s(v, "fp16");
  fp16_config c;
  s.get("enabled", c.enabled);
  s.get("loss_scale", c.loss_scale, 0.0);
  s.get("initial_scale_power", c.dynamic.initial_scale_power, 0, 127);
  s.get("loss_scale_window", c.dynamic.loss_scale_window, 1);
  s.get("hysteresis", c.dynamic.hysteresis, 1);
  s.get("consecutive_hysteresis", c.dynamic.consecutive_hysteresis);
  if (auto m = s.find("min_loss_scale")) {
    c.dynamic.min_loss_scale = to_double(*m, "fp16.min_loss_scale");
    if (!(std::isfinite(c.dynamic.min_loss_scale) && c.dynamic.min_loss_scale > 0)) {
      fail("fp16.min_loss_scale", m->dump() + " must be finite and > 0");
    }
  }
  s.get("auto_cast", c.auto_cast);
  validate("fp16", [&] { dynamic_loss_scaler check(c.dynamic); });
  return c;
}

inline zero_config read_zero(const json& v) {
  require_object(v, "zero_optimization");
  check_keys(v, "zero_optimization",
             {"stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
              "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"},
             recorded_zero_keys());
  const section s(v, "zero_optimization");
  zero_config c;
  if (auto st = s.find("stage")) {
    const std::int64_t stage = to_int(*st, "zero_optimization.stage");
    if (stage < 0 || stage > 3) fail("zero_optimization.stage", std::to_string(stage) + " is not a ZeRO stage (0-3)");
    c.stage = static_cast<int>(stage);
  }
  s.get("reduce_bucket_size", c.reduce_bucket_size, 1);
  s.get("allgather_bucket_size", c.allgather_bucket_size, 1);
  s.get("overlap_comm", c.overlap_comm);
  s.get("contiguous_gradients", c.contiguous_gradients);
  s.get("stage3_prefetch_bucket_size", c.stage3_prefetch_bucket_size, 0);
  s.get("stage3_param_persistence_threshold", c.stage3_param_persistence_threshold, 0);
  for (auto k : recorded_zero_keys()) {
    if (auto r = s.find(k)) c.recorded[std::string(k)] = *r;
  }
  return c;
}

/// Parses JSON text, refusing duplicate keys (as DeepSpeed does) and reporting syntax errors
/// with nlohmann's position.
inline json parse_text(std::string_view text) {
  // One entry per open object: the keys seen so far.
  std::vector<std::set<std::string>> open;
  std::vector<std::string> path;  // key of each open container (or "" for arrays / the root)
  std::string last_key;
  auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        open.emplace_back();
        path.push_back(last_key);
        last_key.clear();
        break;
      case json::parse_event_t::array_start:
        open.emplace_back();
        path.push_back(last_key);
        last_key.clear();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        open.pop_back();
        path.pop_back();
        break;
      case json::parse_event_t::key: {
        last_key = parsed.get<std::string>();
        if (!open.empty() && !open.back().insert(last_key).second) {
          std::string full;
          for (std::size_t i = 1; i < path.size(); ++i) full = join_path(full, path[i]);
          fail(join_path(full, last_key), "duplicate key (DeepSpeed refuses duplicates too)");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), callback);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    if (auto pos = what.find("] "); pos != std::string::npos && what.rfind("[json.exception", 0) == 0) what = what.substr(pos + 2);
    throw config_error("malformed JSON: " + what);
  }
}

inline deepspeed_config parse_root(const json& root, const parse_options& po) {
  if (po.world_size < 1) throw config_error("world size " + std::to_string(po.world_size) + ": need at least 1 rank");
  if (!root.is_object()) throw config_error("expected a JSON object at the top level, got " + describe(root));
  check_keys(root, "",
             {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
              "fp16", "bf16", "bfloat16", "zero_optimization", "gradient_clipping", "steps_per_print", "wall_clock_breakdown"},
             recorded_top_level_keys());
  deepspeed_config c;
  c.world_size = po.world_size;
  const section s(root, "");

  if (auto v = s.find("optimizer")) c.optimizer = read_optimizer(*v);
  if (auto v = s.find("scheduler")) {
    c.scheduler = read_scheduler(*v, c.optimizer ? std::optional<double>(optimizer_lr(*c.optimizer)) : std::nullopt);
  }
  if (auto v = s.find("fp16")) c.fp16 = read_fp16(*v);
  if (s.find("bf16") && s.find("bfloat16")) fail("bfloat16", "give either bf16 or its alias bfloat16, not both");
  for (const char* key : {"bf16", "bfloat16"}) {
    if (auto v = s.find(key)) {
      require_object(*v, key);
      check_keys(*v, key, {"enabled"});
      section(*v, key).get("enabled", c.bf16.enabled);
    }
  }
  if (c.fp16.enabled && c.bf16.enabled) {
    throw config_error("fp16.enabled and bf16.enabled are both true: choose one precision (DeepSpeed refuses both too)");
  }
  if (auto v = s.find("zero_optimization")) c.zero_optimization = read_zero(*v);
  s.get("gradient_clipping", c.gradient_clipping, 0.0);
  s.get("steps_per_print", c.steps_per_print, 1);
  s.get("wall_clock_breakdown", c.wall_clock_breakdown);
  for (auto k : recorded_top_level_keys()) {
    if (auto r = s.find(k)) c.recorded[std::string(k)] = *r;
  }
  return c;
}

}  // namespace detail

/// DeepSpeed's batch rule (its _set_batch_related_parameters and _batch_assertion):
/// train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size.
/// Two given: the third is inferred (by integer division, as DeepSpeed does, then checked).
/// Only train_batch_size: accumulation 1, micro = train / world size. Only the micro-batch:
/// accumulation 1, train = micro × world size. None, or only the accumulation: an error. Every
/// given value must be > 0.
inline batch_sizes resolve_batch_sizes(std::optional<std::int64_t> train, std::optional<std::int64_t> micro,
                                       std::optional<std::int64_t> accumulation, int world_size) {
  if (world_size < 1) throw config_error("world size " + std::to_string(world_size) + ": need at least 1 rank");
  const std::int64_t w = world_size;
  for (auto [v, name] : {std::pair{train, "train_batch_size"}, std::pair{micro, "train_micro_batch_size_per_gpu"},
                         std::pair{accumulation, "gradient_accumulation_steps"}}) {
    if (v && *v <= 0) throw config_error(std::string(name) + ": " + std::to_string(*v) + " must be > 0");
  }
  batch_sizes b;
  const bool t = train.has_value(), m = micro.has_value(), a = accumulation.has_value();
  if (t && m && a) {
    b = {*train, *micro, *accumulation};
  } else if (t && m) {
    b = {*train, *micro, *train / *micro / w};
  } else if (t && a) {
    b = {*train, *train / w / *accumulation, *accumulation};
  } else if (m && a) {
    b = {*micro * *accumulation * w, *micro, *accumulation};
  } else if (t) {
    b = {*train, *train / w, 1};
  } else if (m) {
    b = {*micro * w, *micro, 1};
  } else {
    throw config_error(
        "batch size: give train_batch_size or train_micro_batch_size_per_gpu (or both); gradient_accumulation_steps alone "
        "cannot determine it");
  }
  if (b.train_micro_batch_size_per_gpu < 1 || b.gradient_accumulation_steps < 1 ||
      b.train_batch_size != b.train_micro_batch_size_per_gpu * b.gradient_accumulation_steps * w) {
    auto show = [](std::int64_t v, bool given) { return std::to_string(v) + (given ? "" : " (inferred)"); };
    throw config_error("batch size: train_batch_size " + show(b.train_batch_size, t) + " != train_micro_batch_size_per_gpu " +
                       show(b.train_micro_batch_size_per_gpu, m) + " × gradient_accumulation_steps " +
                       show(b.gradient_accumulation_steps, a) + " × world size " + std::to_string(w) + " = " +
                       std::to_string(b.train_micro_batch_size_per_gpu * b.gradient_accumulation_steps * w) +
                       "; DeepSpeed needs train = micro × accumulation × world size");
  }
  return b;
}

/// Parses a DeepSpeed config held as JSON.
/// @throws config_error naming the key path of the first problem
inline deepspeed_config parse_deepspeed_config(const nlohmann::json& j, const parse_options& o = {}) {
  try {
    deepspeed_config c = detail::parse_root(j, o);
    auto opt = [&](const char* key) -> std::optional<std::int64_t> { return detail::read_batch_key(j, key); };
    const batch_sizes b = resolve_batch_sizes(opt("train_batch_size"), opt("train_micro_batch_size_per_gpu"),
                                              opt("gradient_accumulation_steps"), o.world_size);
    c.train_batch_size = b.train_batch_size;
    c.train_micro_batch_size_per_gpu = b.train_micro_batch_size_per_gpu;
    c.gradient_accumulation_steps = b.gradient_accumulation_steps;
    return c;
  } catch (const config_error& e) {
    throw config_error(std::string("deepspeed config: ") + e.what());
  }
}

/// Parses a DeepSpeed config from JSON text.
/// @throws config_error on malformed JSON (with nlohmann's line and column), duplicate keys, or
/// any problem parse_deepspeed_config(json) reports
inline deepspeed_config parse_deepspeed_config(std::string_view text, const parse_options& o = {}) {
  nlohmann::json j;
  try {
    j = detail::parse_text(text);
  } catch (const config_error& e) {
    throw config_error(std::string("deepspeed config: ") + e.what());
  }
  return parse_deepspeed_config(j, o);
}

/// Overload for string literals (which would otherwise convert to nlohmann::json).
inline deepspeed_config parse_deepspeed_config(const char* text, const parse_options& o = {}) {
  return parse_deepspeed_config(std::string_view(text), o);
}

/// Overload for std::string text (which would otherwise convert to nlohmann::json too).
inline deepspeed_config parse_deepspeed_config(const std::string& text, const parse_options& o = {}) {
  return parse_deepspeed_config(std::string_view(text), o);
}

/// Reads and parses a DeepSpeed config file; messages start with the file's path.
/// @throws config_error when the file cannot be read, or as parse_deepspeed_config
inline deepspeed_config load_deepspeed_config(const std::string& path, const parse_options& o = {}) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw config_error("deepspeed config '" + path + "': cannot open the file (" + std::strerror(errno) + ")");
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    return parse_deepspeed_config(std::string_view(text), o);
  } catch (const config_error& e) {
    std::string what = e.what();
    const std::string prefix = "deepspeed config: ";
    if (what.rfind(prefix, 0) == 0) what = what.substr(prefix.size());
    throw config_error("deepspeed config '" + path + "': " + what);
  }
}

inline nlohmann::json deepspeed_config::effective() const {
  using nlohmann::json;
  json j = json::object();
  j["train_batch_size"] = train_batch_size;
  j["train_micro_batch_size_per_gpu"] = train_micro_batch_size_per_gpu;
  j["gradient_accumulation_steps"] = gradient_accumulation_steps;
  if (optimizer) j["optimizer"] = detail::optimizer_json(*optimizer);
  if (scheduler) j["scheduler"] = detail::scheduler_json(*scheduler);
  j["fp16"] = {{"enabled", fp16.enabled},
               {"loss_scale", fp16.loss_scale},
               {"initial_scale_power", fp16.dynamic.initial_scale_power},
               {"loss_scale_window", fp16.dynamic.loss_scale_window},
               {"hysteresis", fp16.dynamic.hysteresis},
               {"consecutive_hysteresis", fp16.dynamic.consecutive_hysteresis},
               {"min_loss_scale", fp16.dynamic.min_loss_scale},
               {"auto_cast", fp16.auto_cast}};
  j["bf16"] = {{"enabled", bf16.enabled}};
  json z = {{"stage", zero_optimization.stage},
            {"reduce_bucket_size", zero_optimization.reduce_bucket_size},
            {"allgather_bucket_size", zero_optimization.allgather_bucket_size},
            {"overlap_comm", zero_optimization.overlap_comm},
            {"contiguous_gradients", zero_optimization.contiguous_gradients},
            {"stage3_prefetch_bucket_size", zero_optimization.stage3_prefetch_bucket_size},
            {"stage3_param_persistence_threshold", zero_optimization.stage3_param_persistence_threshold}};
  for (auto it = zero_optimization.recorded.begin(); it != zero_optimization.recorded.end(); ++it) z[it.key()] = it.value();
  j["zero_optimization"] = z;
  j["gradient_clipping"] = gradient_clipping;
  j["steps_per_print"] = steps_per_print;
  j["wall_clock_breakdown"] = wall_clock_breakdown;
  for (auto it = recorded.begin(); it != recorded.end(); ++it) j[it.key()] = it.value();
  return j;
}

// --- run-time choice → compile-time policy -------------------------------------------------

/// Carries a type to a generic callable: `[]<class P>(type_tag<P>) { ... }`.
/// @tparam T the type carried
template <class T>
struct type_tag {
  using type = T;
};

namespace detail {

template <class Precision>
constexpr bool precision_is(precision_kind k) {
  if constexpr (std::is_same_v<Precision, fp32>) return k == precision_kind::fp32;
  else if constexpr (std::is_same_v<Precision, bf16_mixed>) return k == precision_kind::bf16_mixed;
  else if constexpr (std::is_same_v<Precision, fp16_mixed>) return k == precision_kind::fp16_mixed;
  else return false;
}

template <class Strategy>
bool strategy_is(const deepspeed_config& c) {
  const int stage = c.zero_optimization.stage;
  if constexpr (std::is_same_v<Strategy, single>) return stage == 0 && c.world_size == 1;
  else if constexpr (std::is_same_v<Strategy, data_parallel>) return stage == 0 && c.world_size > 1;
  else return Strategy::zero_stage >= 1 && stage == Strategy::zero_stage;
}

}  // namespace detail

/// Whether a policy runs what the config asks for: its precision (fp32, bf16_mixed from
/// bf16.enabled, fp16_mixed from fp16.enabled) and strategy (single for stage 0 on one rank,
/// data_parallel for stage 0 on more, zero<1> and zero<2> for stages 1 and 2). Any device.
/// @tparam P a policy bundle
template <policy_bundle P>
bool matches(const deepspeed_config& c) {
  return detail::precision_is<typename P::precision>(c.precision()) && detail::strategy_is<typename P::strategy>(c);
}

namespace detail {

template <class P>
std::string policy_name() {
  return std::string("policy<") + precision_traits<typename P::precision>::name + ", " + P::device::name + ", " +
         P::strategy::name + ">";
}

template <class F, class P, class... Rest>
auto dispatch_impl(const deepspeed_config& c, F& f) -> std::invoke_result_t<F&, type_tag<P>> {
  static_assert((std::is_same_v<std::invoke_result_t<F&, type_tag<P>>, std::invoke_result_t<F&, type_tag<Rest>>> && ...),
                "trident::config::dispatch: the callable must return the same type for every policy");
  if (matches<P>(c)) return f(type_tag<P>{});
  if constexpr (sizeof...(Rest) > 0) {
    return dispatch_impl<F, Rest...>(c, f);
  } else {
    throw config_error("unreachable");
  }
}

}  // namespace detail

/// Calls `f(type_tag<P>{})` with the first of `Policies` that matches the config, and returns
/// what it returns (the same type for every policy).
/// @tparam Policies the policy bundles this binary instantiates, in order of preference
/// @throws config_error when none of `Policies`
/// matches: the message names what the config asks for and what the binary has
template <class... Policies, class F>
auto dispatch(const deepspeed_config& c, F&& f) -> std::invoke_result_t<F&, type_tag<std::tuple_element_t<0, std::tuple<Policies...>>>> {
  static_assert(sizeof...(Policies) > 0, "trident::config::dispatch<Policies...>: name at least one policy");
  static_assert((policy_bundle<Policies> && ...), "trident::config::dispatch<Policies...>: every Policy must be a trident::policy<...>");
  const std::string asks = std::string(to_string(c.precision())) + " with " + c.strategy_name() + " (fp16.enabled " +
                           (c.fp16.enabled ? "true" : "false") + ", bf16.enabled " + (c.bf16.enabled ? "true" : "false") +
                           ", zero_optimization.stage " + std::to_string(c.zero_optimization.stage) + ", world size " +
                           std::to_string(c.world_size) + ")";
  if (!(matches<Policies>(c) || ...)) {
    std::string has;
    ((has += (has.empty() ? "" : ", ") + detail::policy_name<Policies>()), ...);
    throw config_error("deepspeed config: the config asks for " + asks + ", but this binary has only " + has);
  }
  return detail::dispatch_impl<F, Policies...>(c, f);
}

// --- builders ------------------------------------------------------------------------------

/// One of trident's optimizers.
using optimizer_variant = std::variant<optim::adam, optim::adamw, optim::sgd, optim::lamb, optim::adagrad>;

/// Builds the config's optimizer (with custom parameter groups when given).
/// @throws config_error when the config has no optimizer section
inline optimizer_variant make_optimizer(const deepspeed_config& c, std::vector<optim::group_spec> groups = {}) {
  if (!c.optimizer) throw config_error("deepspeed config: optimizer: the config has no optimizer section");
  return std::visit(
      [&]<class O>(const O& o) -> optimizer_variant {
        if constexpr (std::is_same_v<O, optim::adam_options>) {
          return optimizer_variant(std::in_place_type<optim::adam>, o, std::move(groups));
        } else if constexpr (std::is_same_v<O, optim::adamw_options>) {
          return optimizer_variant(std::in_place_type<optim::adamw>, o, std::move(groups));
        } else if constexpr (std::is_same_v<O, optim::sgd_options>) {
          return optimizer_variant(std::in_place_type<optim::sgd>, o, std::move(groups));
        } else if constexpr (std::is_same_v<O, optim::lamb_options>) {
          return optimizer_variant(std::in_place_type<optim::lamb>, o, std::move(groups));
        } else {
          return optimizer_variant(std::in_place_type<optim::adagrad>, o, std::move(groups));
        }
      },
      c.optimizer->options);
}

/// One of trident's schedulers, or none (std::monostate: the config has no scheduler section).
using scheduler_variant =
    std::variant<std::monostate, sched::warmup_lr, sched::warmup_decay_lr, sched::warmup_cosine_lr, sched::one_cycle, sched::lr_range_test>;

/// Builds the config's scheduler over `optimizer` the way DeepSpeed's engine does (reading its
/// lr where the config leaves it to the optimizer, and setting the first lr now).
/// @tparam Optimizer one of trident's optimizers
template <class Optimizer>
scheduler_variant make_scheduler(const deepspeed_config& c, Optimizer& optimizer) {
  if (!c.scheduler) return {};
  try {
    return std::visit(
        [&]<class O>(const O& o) -> scheduler_variant {
          if constexpr (std::is_same_v<O, sched::warmup_lr_options>) {
            return scheduler_variant(std::in_place_type<sched::warmup_lr>, optimizer, o);
          } else if constexpr (std::is_same_v<O, sched::warmup_decay_lr_options>) {
            return scheduler_variant(std::in_place_type<sched::warmup_decay_lr>, optimizer, o);
          } else if constexpr (std::is_same_v<O, sched::warmup_cosine_lr_options>) {
            return scheduler_variant(std::in_place_type<sched::warmup_cosine_lr>, optimizer, o);
          } else if constexpr (std::is_same_v<O, sched::one_cycle_options>) {
            return scheduler_variant(std::in_place_type<sched::one_cycle>, optimizer, o);
          } else {
            return scheduler_variant(std::in_place_type<sched::lr_range_test>, optimizer, o);
          }
        },
        c.scheduler->options);
  } catch (const config_error&) {
    throw;
  } catch (const error& e) {
    throw config_error(std::string("deepspeed config: scheduler: ") + e.what());
  }
}

}  // namespace trident::config
