#!/usr/bin/env bash
# Trains one example in fp32, bf16 mixed and fp16 mixed (its three builds) and prints accuracy,
# time per epoch, throughput and peak memory side by side.
#
#   scripts/compare-precisions.sh [fashion_mnist_mlp|fashion_mnist_cnn] [example options...]
#   scripts/compare-precisions.sh fashion_mnist_cnn --epochs 2      # a quick look
#
# Builds the example in build/ (or $BUILD_DIR) first. Each run's full output and CSV log are
# kept in $OUT_DIR (default: a fresh directory under /tmp), named <example>_<precision>.{txt,csv}.
set -euo pipefail
cd "$(dirname "$0")/.."
example=${1:-fashion_mnist_mlp}
shift || true
case "$example" in
  fashion_mnist_mlp|fashion_mnist_cnn) ;;
  *) echo "compare-precisions: unknown example '$example' (fashion_mnist_mlp or fashion_mnist_cnn)" >&2; exit 2 ;;
esac
build=${BUILD_DIR:-build}
out=${OUT_DIR:-$(mktemp -d /tmp/trident-compare.XXXXXX)}
mkdir -p "$out"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --parallel "$(nproc)" --target "${example}_fp32" "${example}_bf16" "${example}_fp16" >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} OMP_PROC_BIND=${OMP_PROC_BIND:-true}

for p in fp32 bf16 fp16; do
  echo "== ${example}_$p $*" >&2
  "$build/examples/${example}_$p" --no-progress --csv "$out/${example}_$p.csv" "$@" | tee "$out/${example}_$p.txt" >&2
done

echo
echo "$example, $OMP_NUM_THREADS threads, options: ${*:-(defaults)}"
awk '
  /^RESULT / {
    for (i = 2; i <= NF; ++i) { split($i, kv, "="); r[kv[1]] = kv[2] }
    p = r["precision"]; order[++n] = p
    acc[p] = r["test_accuracy"]; spe[p] = r["seconds_per_epoch"]; sps[p] = r["samples_per_s"]
    gf[p] = r["gflops"]; mem[p] = r["peak_rss_mib"]; sk[p] = r["skipped_steps"]
  }
  END {
    if (n != 3) { print "compare-precisions: a run did not finish (see the logs)" > "/dev/stderr"; exit 1 }
    printf "| precision | test accuracy | vs fp32 (points) | s/epoch | samples/s | GFLOP/s | peak memory (MiB) | skipped steps |\n"
    printf "|---|---|---|---|---|---|---|---|\n"
    for (i = 1; i <= n; ++i) {
      p = order[i]
      printf "| %s | %.4f | %+.2f | %.2f | %d | %.1f | %.1f | %d |\n", p, acc[p], 100 * (acc[p] - acc["fp32"]), spe[p], sps[p], gf[p], mem[p], sk[p]
    }
  }' "$out/${example}_fp32.txt" "$out/${example}_bf16.txt" "$out/${example}_fp16.txt"
echo "logs: $out (curves: scripts/plot-log.py $out/${example}_*.csv -o curves.png)"
