# Sourced by the benchmarks/run-*.sh scripts: where things are, and the benchmark build.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#   bench_build <target>...                 configure $build (Release, benchmarks only), build the targets
#   bench_rounds <benchmark> <peer> <args>  alternate rounds of ours and the PyTorch peer (below)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build-bench}"
rounds="${ROUNDS:-5}"
threads=2
torch_python=/usr/bin/python3  # Debian's python3-torch lives there, not in a pyenv python

bench_build() {
  # The CPU the figures come from (the development machine has been more than one kind).
  echo "# machine: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), family $(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')" \
    "model $(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), $(nproc) cores," \
    "AMX $(grep -q amx_bf16 /proc/cpuinfo && echo yes || echo no), AVX512-FP16 $(grep -q avx512_fp16 /proc/cpuinfo && echo yes || echo no)"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTRIDENT_BUILD_BENCHMARKS=ON \
    -DTRIDENT_BUILD_TESTS=OFF -DTRIDENT_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$build" --target "$@" >/dev/null
}

# Alternates $rounds rounds of our benchmark and its PyTorch peer, each in the environment
# docs/BENCHMARKS.md prescribes (ours: OpenMP threads bound; PyTorch: OpenBLAS told the CPU,
# passive OpenMP waits), both asked for JSON. Their JSON lines end up in $log/ours.jsonl and
# $log/torch.jsonl ($log is removed when the script exits); the rest of their output is shown.
#   bench_rounds <benchmark> <peer script in peers/> <arguments both take...>
bench_rounds() {
  local ours=$1 peer=$2 r
  shift 2
  log="$(mktemp -d)"
  trap 'rm -rf "$log"' EXIT
  for r in $(seq 1 "$rounds"); do
    echo "# round $r/$rounds: $ours"
    env OMP_NUM_THREADS=$threads OMP_PROC_BIND=true OPENBLAS_CORETYPE=SkylakeX \
      "$build/benchmarks/$ours" "$@" --rounds 3 --json | tee "$log/ours.$r.txt" | grep -v '^{' || true
    grep '^{' "$log/ours.$r.txt" >> "$log/ours.jsonl"
    echo "# round $r/$rounds: $peer"
    env OMP_NUM_THREADS=$threads OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE \
      "$torch_python" "$root/benchmarks/peers/$peer" "$@" --rounds 3 --threads $threads | tee -a "$log/torch.jsonl"
  done
}
