"""Incremental reruns and determinism of the default pipeline, on a fresh clone.

1. clones this repository's HEAD into a scratch directory (or ``--workdir``);
2. times a full ``dvc repro`` of the default pipeline there (the built-in synthetic data);
3. compares every metric the run wrote with the ones committed at HEAD (two clean runs
   on CPU must agree exactly) and prints any difference;
4. times ``dvc exp run -S loss.margin=0.8`` and prints it as a fraction of the full run,
   with the stages it ran and ``dvc metrics diff``;
5. with ``--queue``, queues two margin experiments and runs them side by side with
   ``dvc queue start -j 2``, then shows them with ``dvc exp show``.

    .venv/bin/python bench/bench_incremental.py [--queue] [--workdir /tmp/facepipe-bench]

Uses this repository's ``.venv`` (run ``scripts/setup.sh`` first). It takes as long as
two or three default runs; nothing in this workspace is modified.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRIC_GLOBS = ["reports/metrics/*/*.json", "reports/train/*/metrics.json", "reports/detection/*.json",
                "reports/summary.json", "reports/alignment/*.json", "reports/comparison.csv"]


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> tuple[float, str]:
    """(wall seconds, combined output) of a command, echoing a one-line summary."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        sys.exit(f"bench_incremental: {' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{output[-3000:]}")
    return wall, output


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def differing_metrics(clone: Path) -> list[str]:
    """Files among METRIC_GLOBS whose content differs from the committed version."""
    diffs = []
    for pattern in METRIC_GLOBS:
        for path in sorted(clone.glob(pattern)):
            rel = path.relative_to(clone).as_posix()
            committed = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=clone, capture_output=True, text=True)
            if committed.returncode != 0:
                diffs.append(f"{rel}: not committed")
            elif path.suffix == ".json" and json.loads(committed.stdout) != json.loads(path.read_text()):
                diffs.append(rel)
            elif path.suffix != ".json" and committed.stdout != path.read_text():
                diffs.append(rel)
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to clone (default: a new temporary directory)")
    parser.add_argument("--queue", action="store_true", help="also run two queued experiments with -j 2")
    parser.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    args = parser.parse_args()

    venv_bin = REPO / ".venv" / "bin"
    if not (venv_bin / "dvc").exists():
        sys.exit("bench_incremental: .venv/bin/dvc not found; run scripts/setup.sh first")
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="facepipe-bench-"))
    clone = workdir / "facepipe"
    if clone.exists():
        shutil.rmtree(clone)
    run(["git", "clone", "--quiet", "--no-local", str(REPO), str(clone)], workdir, env)
    commit = run(["git", "rev-parse", "--short", "HEAD"], clone, env)[1].strip()
    print(f"clone of {commit} in {clone}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)

    full_s, full_out = run(["dvc", "repro"], clone, env)
    print(f"full dvc repro: {full_s:.0f} s ({full_s / 60:.1f} min), {len(stages_run(full_out))} stages", flush=True)
    diffs = differing_metrics(clone)
    if diffs:
        print("determinism: metrics differ from the committed run in: " + ", ".join(diffs))
    else:
        print("determinism: every metric file equals the committed one (reports/metrics, train metrics, "
              "detection, alignment, comparison.csv)")

    # Commit this machine's run, so that experiments (queued ones run in fresh workspaces
    # checked out from HEAD) restore the unchanged stages from this clone's cache.
    run(["git", "add", "-A"], clone, env)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "--quiet",
         "--allow-empty", "-m", "bench: this machine's full run"], clone, env)

    exp_s, exp_out = run(["dvc", "exp", "run", "-S", "loss.margin=0.8"], clone, env)
    print(f"dvc exp run -S loss.margin=0.8: {exp_s:.0f} s = {exp_s / full_s:.2f} of the full run; "
          f"stages run: {', '.join(stages_run(exp_out))}", flush=True)
    _, diff = run(["dvc", "metrics", "diff", "--precision", "4"], clone, env)
    print("dvc metrics diff (after the experiment, against this machine's full run), ArcFace rows:")
    print("\n".join(line for line in diff.splitlines() if "arcface" in line or line.startswith("Path"))[:4000])

    _, plots = run(["dvc", "plots", "diff", "-o", str(workdir / "plots_diff"), "--json"], clone, env, check=False)
    html = workdir / "plots_diff" / "index.html"
    text = html.read_text() if html.is_file() else ""
    print(f"dvc plots diff: {html if html.is_file() else 'no index.html written'}; ArcFace ROC and training "
          f"curves present: {'reports/roc/arcface' in text or 'arcface' in plots}, "
          f"{'reports/train/arcface/history.csv' in text or 'reports/train/arcface/history.csv' in plots}; "
          f"revisions: workspace {'workspace' in text or 'workspace' in plots}, HEAD {'HEAD' in text or 'HEAD' in plots}")

    if args.queue:
        run(["git", "checkout", "--quiet", "--", "."], clone, env)
        run(["dvc", "checkout", "--quiet"], clone, env, check=False)
        for margin in ("0.2", "0.65"):
            run(["dvc", "exp", "run", "--queue", "-S", f"loss.margin={margin}"], clone, env)
        # two experiments at once: give each half the cores, or their torch threads fight
        half = str(max(1, (os.cpu_count() or 2) // 2))
        queue_env = dict(env, FACEPIPE_THREADS=half, OMP_NUM_THREADS=half)
        started = time.perf_counter()
        run(["dvc", "queue", "start", "-j", "2"], clone, queue_env)
        while True:
            time.sleep(10)
            _, status = run(["dvc", "queue", "status"], clone, env)
            if not re.search(r"\b(Queued|Running)\b", status):
                break
        queue_s = time.perf_counter() - started
        print(f"FACEPIPE_THREADS={half} dvc queue start -j 2 (margins 0.2 and 0.65): "
              f"{queue_s:.0f} s = {queue_s / full_s:.2f} of the full run")
        for name in re.findall(r"^\S+\s+(\S+)\s+\S+ [AP]M\s+Success", status, flags=re.M):
            _, logs = run(["dvc", "queue", "logs", name], clone, env, check=False)
            print(f"  {name}: stages run: {', '.join(stages_run(logs))}")
        print(status)
        _, show = run(["dvc", "exp", "show", "--no-pager", "--csv"], clone, env, check=False)
        auc = "reports/summary.json:synth_open.arcface.auc"
        print(f"{'experiment':<14}{'rev':<10}{'loss.margin':>12}{'ArcFace open-set AUC (mean over seeds)':>40}")
        for row in csv.DictReader(io.StringIO(show)):
            print(f"{row.get('Experiment') or '':<14}{row.get('rev', ''):<10}{row.get('loss.margin', ''):>12}"
                  f"{row.get(auc, ''):>40}")

    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
