# Sourced by the benchmarks/run-*.sh scripts: where things are, and the benchmark build.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#   bench_build <target>...      configure $build (Release, benchmarks only) and build the targets
#   log=$(bench_log_dir)         a temporary directory removed when the script exits
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build-bench}"
rounds="${ROUNDS:-5}"
threads=2
torch_python=/usr/bin/python3  # Debian's python3-torch lives there, not in a pyenv python

bench_build() {
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTRIDENT_BUILD_BENCHMARKS=ON \
    -DTRIDENT_BUILD_TESTS=OFF -DTRIDENT_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$build" --target "$@" >/dev/null
}
