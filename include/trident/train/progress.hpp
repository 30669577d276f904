#pragma once
/// @file train/progress.hpp
/// A one-line progress bar for long runs: done/total, a bar, the latest metrics, throughput
/// and the estimated time left. Redrawn in place on a terminal (at most a few times a
/// second); on a pipe or file it writes a plain line every `log_every` seconds instead, so
/// logs stay readable.

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace trident::train {

/// Progress of a loop of known length.
class progress_bar {
 public:
  /// @param total   iterations in the run
  /// @param unit    what throughput counts ("samples", "tokens")
  /// @param out     where to draw (stderr by default)
  progress_bar(long long total, std::string unit, std::FILE* out = stderr, double log_every = 10.0)
      : total_(total > 0 ? total : 1), unit_(std::move(unit)), out_(out), tty_(isatty(fileno(out)) != 0),
        log_every_(log_every), start_(clock::now()), last_draw_(start_) {}

  /// Reports that `done` iterations are finished and `units` items were processed in all,
  /// with a free-form metrics string (e.g. "loss 0.4123"). Draws when due.
  void update(long long done, double units, const std::string& metrics) {
    const auto now = clock::now();
    const double since = std::chrono::duration<double>(now - last_draw_).count();
    if (done < total_ && since < (tty_ ? 0.2 : log_every_)) return;
    last_draw_ = now;
    draw(done, units, metrics, now);
  }

  /// Draws the final state and ends the line.
  void finish(long long done, double units, const std::string& metrics) {
    draw(done, units, metrics, clock::now());
    if (tty_) std::fputc('\n', out_);
    std::fflush(out_);
  }

  /// Seconds since the bar was created.
  double elapsed() const { return std::chrono::duration<double>(clock::now() - start_).count(); }

 private:
  using clock = std::chrono::steady_clock;

  static std::string hms(double s) {
    if (!(s >= 0) || s > 1e7) return "--:--";
    const long t = static_cast<long>(s + 0.5);
    char buf[32];
    if (t >= 3600) {
      std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    } else {
      std::snprintf(buf, sizeof buf, "%02ld:%02ld", t / 60, t % 60);
    }
    return buf;
  }

  void draw(long long done, double units, const std::string& metrics, clock::time_point now) {
    const double el = std::chrono::duration<double>(now - start_).count();
    const double frac = static_cast<double>(done) / static_cast<double>(total_);
    const double rate = el > 0 ? units / el : 0.0;
    const double eta = done > 0 ? el * (1.0 - frac) / frac : -1.0;
    constexpr int width = 24;
    std::string bar(width, ' ');
    const int filled = static_cast<int>(frac * width + 0.5);
    for (int i = 0; i < filled && i < width; ++i) bar[static_cast<std::size_t>(i)] = '#';
    std::fprintf(out_, "%s%lld/%lld [%s] %s | %.0f %s/s | %s elapsed, %s left%s", tty_ ? "\r" : "", done, total_, bar.c_str(),
                 metrics.c_str(), rate, unit_.c_str(), hms(el).c_str(), hms(eta).c_str(), tty_ ? "\033[K" : "\n");
    std::fflush(out_);
  }

  long long total_;
  std::string unit_;
  std::FILE* out_;
  bool tty_;
  double log_every_;
  clock::time_point start_, last_draw_;
};

}  // namespace trident::train
