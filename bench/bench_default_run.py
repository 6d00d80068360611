"""Time the default pipeline as a new user runs it: a fresh clone of HEAD, `dvc repro`, every stage.

    .venv/bin/python bench/bench_default_run.py [--threads 2] [--out reports/benchmarks/default_run.txt]

Each stage command records its own wall time (``FACEPIPE_STAGE_TIMES``, from the interpreter's start,
imports included); the rest of the run is DVC's own work (planning, hashing, caching, writing
dvc.lock after every stage). Prints the total, the time per kind of stage (count, sum, mean), DVC's
share, the machine and its load, and checks that `dvc status` is clean afterwards.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kind_of(command: list[str]) -> str:
    """``train``, ``embed``, ``embed-train``, ``score``, ``data`` ... of a logged command."""
    return command[0] if command else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="2", help="FACEPIPE_THREADS for the run (the committed runs: 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    parser.add_argument("--keep", action="store_true", help="keep the clone")
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    work = Path(tempfile.mkdtemp(prefix="facepipe-default-"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
    log = work / "stages.jsonl"
    env = dict(os.environ, PATH=f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
               FACEPIPE_THREADS=args.threads, FACEPIPE_STAGE_TIMES=str(log), DVC_NO_ANALYTICS="1")
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"dvc repro failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True).stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    for record in records:
        by_kind[kind_of(record["command"])].append(record["seconds"])
    stages = sum(len(v) for v in by_kind.values())
    in_stages = sum(sum(v) for v in by_kind.values())
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    say(f"date: {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}   commit: {commit.strip()}")
    say(f"machine: {cpu}, {os.cpu_count()} cores, FACEPIPE_THREADS={args.threads}; load average before "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say(f"dvc repro of the default params on a fresh clone: {total:.0f} s wall ({total / 60:.1f} min), "
        f"{stages} stage commands")
    say(f"in the stage commands: {in_stages:.0f} s; DVC's own work between and around them: "
        f"{total - in_stages:.0f} s ({(total - in_stages) / max(stages, 1):.2f} s per stage)")
    say("")
    say(f"{'stage kind':<16} {'count':>5} {'sum s':>8} {'mean s':>8} {'max s':>8}")
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        say(f"{kind:<16} {len(seconds):>5} {sum(seconds):>8.1f} {sum(seconds) / len(seconds):>8.2f} "
            f"{max(seconds):>8.2f}")
    say("")
    say(f"dvc status afterwards: {status.strip().splitlines()[-1] if status.strip() else '(nothing)'}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"kept: {clone}")


if __name__ == "__main__":
    main()
