"""Does a stage's cost grow linearly? Time it on the first N rows of one run's detections, at two
sizes, interleaved (small, large, small, large, ...) so that load from other processes on a
shared machine hits both sizes alike.

Each measurement is a fresh process running the stage's function (``run_align``, then
``run_shard`` on what it wrote; ``run_detect`` with ``--detect``) on the first N rows of the
training set of ``--detections`` (a ``data/detect`` folder, e.g. kept from a
``bench_scale.py`` project): wall and CPU seconds and peak RSS of that process (``wait4``).
The growth exponent ``log(cost ratio) / log(size ratio)`` is 1 for a linear stage.

    .venv/bin/python bench/bench_growth.py --detections /tmp/keep50k/detect --sizes 10000 50000
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ALIGN = """
import pandas as pd, sys
from pathlib import Path
from pipeline.align import run_align
from pipeline.config import AlignParams
rows = pd.read_parquet(sys.argv[1]).iloc[: int(sys.argv[2])]
out = Path(sys.argv[3])
run_align(AlignParams(size=112), {"train": rows}, out / "aligned", out / "sheet.png", out / "stats.json",
          progress=False)
"""
SHARD = """
import sys
from pathlib import Path
from pipeline.config import ShardParams
from pipeline.shards import run_shard
out = Path(sys.argv[3])
run_shard(ShardParams(), out / "aligned", {"train": None}, out / "shards", progress=False)
"""
DETECT = """
import pandas as pd, sys
from pathlib import Path
from pipeline.config import DetectParams
from pipeline.detect import run_detect
rows = pd.read_parquet(sys.argv[1]).iloc[: int(sys.argv[2])][["image_id", "path", "identity"]]
out = Path(sys.argv[3])
run_detect(DetectParams(), {"train": rows}, out / "detect", out / "counts.json", progress=False,
           staging=out / "staging")
"""
SCRIPTS = {"detect": DETECT, "align": ALIGN, "shard": SHARD}


def measure(stage: str, table: Path, n: int, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "from pipeline import cpu; cpu.pin_instruction_set()\n" + SCRIPTS[stage]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(table), str(n), str(work)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench_growth: {stage} on {n} rows failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall": time.perf_counter() - started, "cpu": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss / 1024}


def train_helpers() -> None:
    """The trainer's per-run set-up on CASIA-shaped labels (long-tailed counts as in bench_scale):
    the train/validation split, the validation pairs and the P x K sampler, at 50,000 images of
    2,000 identities and at CASIA-WebFace's 494,414 images of 10,575."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from bench_scale import identity_counts

    from pipeline.samplers import PKBatchSampler
    from pipeline.train import split_train_val, validation_pairs

    print("trainer set-up on CASIA-shaped labels (in-process, best of 2):")
    for images, ids in [(50_000, 2_000), (494_414, 10_575)]:
        labels = np.repeat(np.arange(ids), identity_counts(images, ids))
        np.random.default_rng(0).shuffle(labels)
        times = {"split_train_val": [], "validation_pairs": [], "PKBatchSampler": []}
        for _ in range(2):
            t = time.perf_counter()
            train_idx, val_idx = split_train_val(labels, 0.1, 0)
            times["split_train_val"].append(time.perf_counter() - t)
            t = time.perf_counter()
            validation_pairs(labels[val_idx], 0)
            times["validation_pairs"].append(time.perf_counter() - t)
            t = time.perf_counter()
            PKBatchSampler(labels[train_idx].tolist(), 16, 4, seed=0)
            times["PKBatchSampler"].append(time.perf_counter() - t)
        print(f"  {images:>7} images, {ids:>6} identities ({len(val_idx)} validation images): "
              + ", ".join(f"{k} {min(v):.2f} s" for k, v in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detections", type=Path, required=True, help="a data/detect folder (train.parquet)")
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--detect", action="store_true", help="also time the detect stage (MTCNN: slow)")
    parser.add_argument("--train-helpers", action="store_true",
                        help="also time the trainer's set-up (split, validation pairs, sampler) on CASIA-shaped labels")
    args = parser.parse_args()
    table = args.detections / "train.parquet"
    stages = (["detect"] if args.detect else []) + ["align", "shard"]
    results: dict[tuple[str, int], list[dict]] = {}
    print(f"{table}: first {args.sizes[0]} vs {args.sizes[1]} rows, {args.repeats} interleaved repeats; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for repeat in range(args.repeats):
        for n in args.sizes:
            work = Path(tempfile.mkdtemp(prefix=f"growth-{n}-"))
            try:
                for stage in stages:
                    r = measure(stage, table, n, work)
                    results.setdefault((stage, n), []).append(r)
                    print(f"  repeat {repeat + 1} {stage:<6} {n:>6} rows: {r['wall']:7.1f} s wall "
                          f"{r['cpu']:7.1f} s CPU {r['rss']:6.0f} MiB", flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    small, large = args.sizes
    print(f"\n{'stage':<7} {'CPU s small':>12} {'CPU s large':>12} {'CPU x':>6} {'exponent':>9} {'wall x':>7} "
          f"{'MiB small':>10} {'MiB large':>10}   (best of the repeats)")
    for stage in stages:
        a = min(results[(stage, small)], key=lambda r: r["cpu"])
        b = min(results[(stage, large)], key=lambda r: r["cpu"])
        wall = min(r["wall"] for r in results[(stage, large)]) / min(r["wall"] for r in results[(stage, small)])
        print(f"{stage:<7} {a['cpu']:>12.1f} {b['cpu']:>12.1f} {b['cpu'] / a['cpu']:>6.2f} "
              f"{math.log(b['cpu'] / a['cpu']) / math.log(large / small):>9.2f} {wall:>7.2f} {a['rss']:>10.0f} "
              f"{b['rss']:>10.0f}")
    if args.train_helpers:  # last: a child's peak RSS (wait4) starts from this process's at fork time
        train_helpers()
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
