"""Run the whole pipeline with another params file, without touching this workspace.

    python scripts/run_config.py configs/lfw-dev.yaml            # -> reports/lfw-dev/

The params file is run from the current commit in its own git worktree
(``.runs/<name>/``, ignored by git and DVC), so the default ``params.yaml``,
``dvc.lock`` and ``reports/`` here stay as they are. Relative dataset paths in the
params file are taken relative to this repository. Rerunning is incremental: the
worktree and its DVC cache are kept, so only stages whose inputs changed run again.

When ``dvc repro`` succeeds, the worktree's ``reports/`` is copied to
``reports/<name>/`` together with the ``params.yaml`` and ``dvc.lock`` that produced it
and ``run.json`` (commit, wall time, machine). The copy replaces the old one in a
single rename, so a failed run leaves the previous report as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PATH_KEYS = ("path", "pairs", "root")


def fail(message: str) -> None:
    print(f"run_config: {message}", file=sys.stderr)
    raise SystemExit(1)


def absolute_data_paths(params: dict) -> dict:
    """Make the dataset paths of a params file absolute (relative to the repository)."""
    data = params.get("data", {})
    sets = [data.get("train")] + list((data.get("tests") or {}).values())
    for spec in sets:
        if not isinstance(spec, dict):
            continue
        for key in PATH_KEYS:
            value = spec.get(key)
            if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
                spec[key] = str((REPO / value).resolve())
    return params


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def prepare_worktree(workdir: Path, commit: str) -> None:
    if (workdir / ".git").exists():
        # Keep the worktree (and its DVC cache and outputs) but move it to the commit.
        git("checkout", "--quiet", "--detach", "--force", commit, cwd=workdir)
        return
    workdir.parent.mkdir(parents=True, exist_ok=True)
    git("worktree", "prune")
    git("worktree", "add", "--quiet", "--detach", str(workdir), commit)


def report_outputs(lock_file: Path) -> list[str]:
    """The paths under reports/ that the run's stages wrote (from its dvc.lock)."""
    lock = yaml.safe_load(lock_file.read_text()) or {}
    paths = {out["path"] for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])}
    return sorted(p for p in paths if p.startswith("reports/"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", type=Path, help="params file to run, e.g. configs/lfw-dev.yaml")
    parser.add_argument("--name", help="run name (default: the params file's stem)")
    parser.add_argument("--force", action="store_true", help="rerun every stage (dvc repro -f)")
    args = parser.parse_args()

    if not args.params.is_file():
        fail(f"{args.params}: params file not found")
    name = args.name or args.params.stem
    try:
        params = yaml.safe_load(args.params.read_text())
    except yaml.YAMLError as exc:
        fail(f"{args.params}: not valid YAML ({exc})")
    if not isinstance(params, dict):
        fail(f"{args.params}: expected a mapping of params sections")
    if git("status", "--porcelain", "--untracked-files=no", "--", "pipeline", "dvc.yaml"):
        print("run_config: note: uncommitted changes in pipeline/ or dvc.yaml are NOT part of this run "
              "(it runs the current commit); commit them first", file=sys.stderr)

    commit = git("rev-parse", "HEAD")
    workdir = REPO / ".runs" / name
    prepare_worktree(workdir, commit)
    (workdir / "params.yaml").write_text(
        f"# {args.params} as run by scripts/run_config.py (dataset paths made absolute)\n"
        + yaml.safe_dump(absolute_data_paths(params), sort_keys=False)
    )

    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if subprocess.run([sys.executable, "-m", "pipeline", "validate"], cwd=workdir, env=env).returncode != 0:
        fail(f"{args.params}: invalid params (see the line above); nothing was run")

    started = time.time()
    start_stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cmd = ["dvc", "repro"] + (["--force"] if args.force else [])
    print(f"run_config: {' '.join(cmd)} in {workdir.relative_to(REPO)} (commit {commit[:10]})", flush=True)
    if subprocess.run(cmd, cwd=workdir, env=env).returncode != 0:
        fail(f"dvc repro failed in {workdir}; fix the cause and rerun this command (finished stages are kept)")
    wall = time.time() - started

    dest = REPO / "reports" / name
    staging = REPO / "reports" / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in report_outputs(workdir / "dvc.lock"):
        source, target = workdir / path, staging / Path(path).relative_to("reports")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            shutil.copy2(source, target)
    shutil.copy2(workdir / "params.yaml", staging / "params.yaml")
    shutil.copy2(workdir / "dvc.lock", staging / "dvc.lock")
    run = {
        "params_file": str(args.params),
        "commit": commit,
        "started": start_stamp,
        "repro_wall_s": round(wall, 1),
        "forced": args.force,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
    }
    (staging / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    old = REPO / "reports" / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f"run_config: report in {dest.relative_to(REPO)}/index.md ({wall / 60:.1f} min of dvc repro)")


if __name__ == "__main__":
    main()
