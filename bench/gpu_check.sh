#!/usr/bin/env bash
# GPU check: figures (not pass/fail) from a machine with an NVIDIA GPU, in at most 8 minutes.
#
#   bash scripts/setup.sh        # once, as in the README (needs the network)
#   bash bench/gpu_check.sh      # OUT=/some/dir also writes OUT/gpu_check.txt
#
# Parts, each under its own time limit, each run even when an earlier one failed:
#   1. device report: nvidia-smi, torch/CUDA/cuDNN versions, the trainer's device line
#   2. a 2-epoch ArcFace run on small synthetic data on the GPU (data, detect, align,
#      shard, recipes, train, embed stages in a temporary folder): wall times
#   3. training throughput (img/s, 112x112) of resnet50 and iresnet50, bf16, channels-last
#   4. MTCNN detection throughput on the GPU (and on the CPU cores, for comparison)
#   5. a 2-process DDP run (NCCL) and its rerun, which resumes from process 0's checkpoint
#      (sent to process 1 over NCCL), when the machine has two GPUs, else a line saying so
# Each part ends with a line "--- NAME: exit CODE after Ns"; 124 means it hit its limit.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY="${PYTHON:-$ROOT/.venv/bin/python}"
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for all parts together (the brief allows 480)
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.txt") 2>&1
fi
export ROOT PY PYTHONPATH="$ROOT" TF_CPP_MIN_LOG_LEVEL=3
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/facepipe-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export WORK

# seconds since a `date +%s%N` stamp, with a decimal (no bc needed)
ms_since() {
  local ms=$((($(date +%s%N) - $1) / 1000000))
  printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100))
}

# part NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (less if the budget is short)
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  echo
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, the ${BUDGET}s budget is spent ==="
    return
  fi
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S) UTC) ==="
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "--- $name: exit $rc after $(($(date +%s) - t0))s$([ "$rc" -eq 124 ] && echo ' (time limit)')"
}

echo "facepipe GPU check, $(date -u '+%Y-%m-%d %H:%M:%S') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ ! -x "$PY" ]; then
  echo "no Python at $PY: run bash scripts/setup.sh first (or set PYTHON)"
  exit 1
fi

# 1 ----------------------------------------------------------------------------------
device_report() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not installed"; fi
  "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
print(f"kernels for {torch.cuda.get_arch_list()}; is_available {torch.cuda.is_available()}, "
      f"device_count {torch.cuda.device_count()}")
from pipeline.train import TrainingError, amp_dtype_for, describe_device, device_capability, pick_device
try:
    device = pick_device("auto")
    print("trainer's line:", describe_device(device, amp_dtype_for(device.type, device_capability(device), True), 1))
except TrainingError as err:
    print("trainer's device decision:", err)
EOF
}
part "device report" 45 bash -c "$(declare -f device_report); device_report"

# 2 ----------------------------------------------------------------------------------
tiny_pipeline() {
  cd "$WORK" || return 1
  "$PY" - <<'EOF' || return 1
import os, yaml
params = yaml.safe_load(open(os.path.join(os.environ["ROOT"], "params.yaml")))
params["seeds"] = {"data": 0, "train": [0]}
params["data"]["synthetic"].update(train_identities=30, train_images_per_identity=10, closed_images_per_identity=2,
                                   open_identities=10, domain_identities=10, test_images_per_identity=3, folds=2,
                                   pairs_per_fold=10)
params["train_losses"] = ["arcface"]
params["pretrained"] = {}
params["train"].update(epochs=2, device="cuda", batch_size=64)
params["embed"]["device"] = "cuda"
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
print("params: 30 identities x 10 training images, 3 small test sets, arcface, 2 epochs, train.device cuda")
EOF
  local stage t0 rc
  for stage in "data --no-progress" "detect --no-progress" "align --no-progress" "shard --no-progress" recipes \
               "train arcface --seed 0 --no-progress" "embed arcface --seed 0"; do
    t0=$(date +%s%N)
    # shellcheck disable=SC2086
    "$PY" -m pipeline $stage 2>&1 | tail -n 8
    rc=${PIPESTATUS[0]}
    printf '  stage %-38s exit %s, %s s wall\n' "$stage" "$rc" "$(ms_since "$t0")"
    [ "$rc" -ne 0 ] && return "$rc"
  done
  echo "timing.json:"; cat reports/train/arcface-0/timing.json
  echo "metrics.json:"; cat reports/train/arcface-0/metrics.json
}
part "2-epoch ArcFace run on synthetic data (GPU)" 180 bash -c "$(declare -f ms_since tiny_pipeline); tiny_pipeline"

# 3 ----------------------------------------------------------------------------------
part "training throughput, resnet50 + iresnet50, bf16, channels-last" 100 \
  "$PY" bench/bench_train_step.py --devices cuda --backbones resnet50 iresnet50 --amp bf16 --channels-last \
  --batch-size 256 --steps 10 --warmup 3

# 4 ----------------------------------------------------------------------------------
# the 300 synthetic training photos of part 2 (160x160), or freshly generated faces if it failed early
FACES="$WORK/data/datasets/synthetic/images/train"
if [ -d "$FACES" ]; then IMAGES=(--images-dir "$FACES" --n 300); else IMAGES=(--synthetic 128); fi
part "MTCNN detection on the GPU" 50 \
  "$PY" bench/bench_detect.py "${IMAGES[@]}" --device cuda --torch-only --batch-size 64 --repeats 3
part "MTCNN detection on the CPU cores (reference)" 30 \
  "$PY" bench/bench_detect.py "${IMAGES[@]}" --device cpu --torch-only --batch-size 64 --repeats 1

# 5 ----------------------------------------------------------------------------------
ddp_run() {
  local gpus
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "${gpus:-0}" -lt 2 ]; then
    echo "DDP (NCCL, 2 processes): skipped, this machine has ${gpus:-0} GPU(s)"
    return 0
  fi
  cd "$WORK" || return 1
  if [ ! -f data/recipes/arcface.json ]; then
    echo "DDP: skipped, the single-GPU run (part 2) did not get as far as the recipes"
    return 1
  fi
  rm -rf data/checkpoints/arcface-0 data/models/arcface-0  # a fresh run, not a resume of part 2's
  local t0 rc
  t0=$(date +%s%N)
  FACEPIPE_NPROC=2 "$PY" -m pipeline train arcface --seed 0 --no-progress 2>&1 | tail -n 8
  rc=${PIPESTATUS[0]}
  printf '  FACEPIPE_NPROC=2 train: exit %s, %s s wall\n' "$rc" "$(ms_since "$t0")"
  cat reports/train/arcface-0/timing.json
  [ "$rc" -ne 0 ] && return "$rc"
  # the rerun resumes after the last epoch: process 0 reads last.pt and sends it to process 1 over NCCL
  t0=$(date +%s%N)
  FACEPIPE_NPROC=2 "$PY" -m pipeline train arcface --seed 0 --no-progress 2>&1 | grep -E "resuming|error" | tail -n 4
  rc=${PIPESTATUS[0]}
  printf '  FACEPIPE_NPROC=2 train again (resume over NCCL): exit %s, %s s wall\n' "$rc" "$(ms_since "$t0")"
  return "$rc"
}
part "2-process DDP run (NCCL) and its resume" 100 bash -c "$(declare -f ms_since ddp_run); ddp_run"

echo
echo "=== done in $(($(date +%s) - START))s ==="
