#!/usr/bin/env bash
# char_gpt's training against PyTorch's, step for step: trains char_gpt_fp32 (nanoGPT's CPU
# configuration) for ITERS iterations, then the same training in PyTorch from char_gpt's initial
# weights, on its batches, at its logged lrs (benchmarks/peers/torch_char_gpt.py --twin), and
# fails when one of the training losses differs by more than TOL. Exits 77 (CTest: skipped)
# when Debian's python3-torch, a benchmark peer (benchmarks/install-peers.sh), is not installed.
#   scripts/char-gpt-vs-pytorch.sh <char_gpt_fp32> <text file> [ITERS=100] [TOL=1e-5]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 <char_gpt_fp32> <text file> [iterations] [tolerance]" >&2
  exit 2
fi
bin=$1 text=$2 iters=${3:-100} tol=${4:-1e-5}
py=/usr/bin/python3
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "skipped: $py cannot import torch (python3-torch, installed by benchmarks/install-peers.sh)"
  exit 77
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$bin" --data "$text" --iters 0 --eval-batches 1 --save "$dir/init.bin" --no-progress > "$dir/init.log"
"$bin" --data "$text" --iters "$iters" --warmup 10 --eval-interval "$iters" --eval-batches 1 --csv "$dir/run.csv" \
  --no-progress > "$dir/run.log"
# (torch's OpenMP threads spin between its small ops otherwise: 3x slower on 2 cores)
OMP_WAIT_POLICY=PASSIVE "$py" "$(dirname "$0")/../benchmarks/peers/torch_char_gpt.py" --data "$text" \
  --twin "$dir/init.bin" --twin-log "$dir/run.csv" --check "$tol"
