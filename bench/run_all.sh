#!/usr/bin/env bash
# The benchmark suite: every figure in reports/benchmarks.md comes from this script.
#
#   bash bench/run_all.sh            # about 30 minutes on a 2-core CPU
#
# Needs the pipeline run on real photos first (it benchmarks the aligned faces and
# shards of that run):  .venv/bin/python scripts/run_config.py configs/lfw-dev.yaml
# Raw outputs go to reports/benchmarks/<name>.txt. Run it on an otherwise idle machine:
# on 2 cores any other busy process changes every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LFW_IMAGES=${LFW_IMAGES:-../shared/data/lfw-dev/images}
RUN=${RUN:-.runs/lfw-dev}
OUT=reports/benchmarks
for need in "$LFW_IMAGES" "$RUN/data/aligned/train" "$RUN/data/shards/train"; do
  [ -d "$need" ] || { echo "bench/run_all.sh: $need not found; run scripts/run_config.py configs/lfw-dev.yaml first (or set LFW_IMAGES / RUN)" >&2; exit 1; }
done
mkdir -p "$OUT"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)   commit: $(git rev-parse --short HEAD)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
  echo "python: $($PY --version 2>&1), torch $($PY -c 'import torch; print(torch.__version__)'), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"

step() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | grep -v "^\s*$" | tee "$OUT/$name.txt"; }

step detect      $PY bench/bench_detect.py --images-dir "$LFW_IMAGES" --n 500 --per-image-n 50 --coverage
step detect_overhead $PY bench/bench_detect_overhead.py --images-dir "$LFW_IMAGES" --n 96 --batch-size 32
step input       $PY bench/bench_input.py --aligned "$RUN/data/aligned/train" --shards "$RUN/data/shards/train" --epochs 3
step train_step  $PY bench/bench_train_step.py --shards "$RUN/data/shards" --params configs/lfw-dev.yaml --loss arcface
step scoring     $PY bench/bench_scoring.py --pairs 1000000
step incremental $PY bench/bench_incremental.py --queue
step dvc_cache   $PY bench/bench_dvc_cache.py --files 20000
# Not in the 30 minutes above (about an hour on 2 cores; see reports/benchmarks/scale.md):
#   $PY bench/bench_scale.py --images 10000 --identities 400 --out $OUT/scale_10000.txt
#   $PY bench/bench_scale.py --images 50000 --identities 2000 --out $OUT/scale_50000.txt
