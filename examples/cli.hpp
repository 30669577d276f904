#pragma once
// What the examples' command lines share: reading option values with errors that name the
// option and what it takes, then printing the usage and exiting with status 2. And the median
// their reports quote.
//
//   example::cli args(argc, argv, [&](std::FILE* to) { usage(argv[0], defaults, to); });
//   for (int i = 1; i < argc; ++i) {
//     const std::string_view a = argv[i];
//     if (a == "--iters") s.iters = args.integer(i, 1);
//     else if (a == "--lr") s.lr = args.real(i, 0.0);
//     else args.help_or_unknown(a);   // --help / -h, or an unknown option
//   }

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace example {

/// Reads option values from argv; every error prints a message and the usage, then exits 2.
class cli {
 public:
  cli(int argc, char** argv, std::function<void(std::FILE*)> usage) : argc_(argc), argv_(argv), usage_(std::move(usage)) {}

  /// Prints `what` and the usage to stderr and exits with status 2.
  [[noreturn]] void fail(const std::string& what) const {
    std::fprintf(stderr, "%s: %s\n", argv_[0], what.c_str());
    usage_(stderr);
    std::exit(2);
  }

  /// The last branch of an option loop: --help or -h prints the usage to stdout and exits with
  /// status 0; anything else is an unknown option (fail). For a usage that only prints.
  [[noreturn]] void help_or_unknown(std::string_view option) const {
    if (option == "--help" || option == "-h") {
      usage_(stdout);
      std::exit(0);
    }
    fail("unknown option '" + std::string(option) + "'");
  }

  /// The value after option argv[i] (i moves onto it).
  std::string value(int& i) const {
    if (i + 1 >= argc_) fail(std::string("option ") + argv_[i] + " needs a value");
    return argv_[++i];
  }

  /// The integer value of option argv[i], which must be >= lo.
  long long integer(int& i, long long lo) const {
    const std::string opt = argv_[i], v = value(i);
    char* end = nullptr;
    const long long x = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || x < lo) {
      fail("option " + opt + " takes an integer >= " + std::to_string(lo) + ", got '" + v + "'");
    }
    return x;
  }

  /// The finite real value of option argv[i], which must be >= lo.
  double real(int& i, double lo) const {
    const std::string opt = argv_[i], v = value(i);
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !(x >= lo) || !std::isfinite(x)) {
      fail("option " + opt + " takes a finite number >= " + std::to_string(lo) + ", got '" + v + "'");
    }
    return x;
  }

 private:
  int argc_;
  char** argv_;
  std::function<void(std::FILE*)> usage_;
};

/// The median of v (the mean of the middle two for an even count; NaN when empty).
inline double median(std::vector<double> v) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

}  // namespace example
