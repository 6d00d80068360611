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
import tempfile
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
    """Make the dataset paths and the pretrained model paths of a params file absolute
    (relative to the repository)."""
    data = params.get("data", {})
    sets = [data.get("train")] + list((data.get("tests") or {}).values())
    sets += list((params.get("pretrained") or {}).values())  # a facepipe entry's model.pt
    for spec in sets:
        if not isinstance(spec, dict):
            continue
        for key in PATH_KEYS:
            value = spec.get(key)
            if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
                spec[key] = str((REPO / value).resolve())
    return params


def complete_params(path: Path) -> dict:
    """The params file at ``path`` with every default written out. dvc.yaml interpolates keys (such as
    ``score.threshold.source``) that a params file may leave out, and DVC cannot supply them itself
    (a ``vars`` file may not define a key that params.yaml also sets). Unset optional keys stay out
    (``null`` is their default, and some entries may not carry them at all)."""
    from pipeline.config import load_params

    return load_params(path, check_paths=False, check_models=False).model_dump(mode="json", exclude_none=True)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def prepare_worktree(workdir: Path, commit: str) -> None:
    """Create the run's worktree at ``commit``, or move an existing one there.

    An existing worktree keeps its DVC cache, ``data/`` and what its last run wrote:
    ``dvc.lock`` and the report files (tracked by git, so a checkout would reset them
    to the committed default run and DVC would then rerun every stage).
    """
    if (workdir / ".git").exists():
        lock = workdir / "dvc.lock"
        kept = [lock] + [workdir / p for p in (report_outputs(lock) if lock.is_file() else [])]
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp)
            for path in kept:
                if path.exists():
                    copy_path(path, saved / path.relative_to(workdir))
            git("checkout", "--quiet", "--detach", "--force", commit, cwd=workdir)
            for path in kept:
                backup = saved / path.relative_to(workdir)
                if backup.exists():
                    if path.is_dir():
                        shutil.rmtree(path)
                    copy_path(backup, path)
        return
    workdir.parent.mkdir(parents=True, exist_ok=True)
    git("worktree", "prune")
    git("worktree", "add", "--quiet", "--detach", str(workdir), commit)


def copy_path(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def report_outputs(lock_file: Path) -> list[str]:
    """The paths under reports/ that the run's stages wrote (from its dvc.lock)."""
    lock = yaml.safe_load(lock_file.read_text()) or {}
    paths = {out["path"] for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])}
    return sorted(p for p in paths if p.startswith("reports/"))


def stream_repro(cmd: list[str], workdir: Path, env: dict) -> dict[str, float]:
    """Run ``dvc repro``, echoing its output; seconds per stage it ran (from its log)."""
    seconds: dict[str, float] = {}
    current, since = None, time.time()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("Running stage '"):
            if current:
                seconds[current] = round(time.time() - since, 1)
            current, since = line.split("'")[1], time.time()
    if current:
        seconds[current] = round(time.time() - since, 1)
    if proc.wait() != 0:
        fail(f"dvc repro failed in {workdir}; fix the cause and rerun this command (finished stages are kept)")
    return seconds


def run_record(previous_file: Path, params_file: Path, this_run: dict) -> dict:
    """run.json: every run that built this report, newest last, and the latest time of each stage."""
    runs = []
    if previous_file.is_file() and not this_run["forced"]:
        runs = json.loads(previous_file.read_text()).get("runs", [])
    runs.append(this_run)
    latest: dict[str, float] = {}
    for run in runs:
        latest.update(run.get("stage_seconds", {}))
    return {
        "params_file": str(params_file),
        "runs": runs,
        "wall_s_all_runs": round(sum(run["repro_wall_s"] for run in runs), 1),
        "latest_stage_seconds": latest,
    }


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
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    if subprocess.run([python, "-m", "pipeline", "validate"], cwd=workdir, env=env).returncode != 0:
        fail(f"{args.params}: invalid params (see the line above); nothing was run")
    (workdir / "params.yaml").write_text(
        f"# {args.params} as run by scripts/run_config.py (dataset paths made absolute, every default written out)\n"
        + yaml.safe_dump(complete_params(workdir / "params.yaml"), sort_keys=False)
    )

    if "dlib" in (params.get("pretrained") or {}):
        check = "from pipeline.baselines.dlib_resnet import import_dlib, model_files; import_dlib(); model_files()"
        if subprocess.run([python, "-c", check], cwd=workdir, env=env).returncode != 0:
            fail(f"{args.params} scores the dlib baseline (pretrained.dlib): install the optional extra with "
                 f"'.venv/bin/pip install -r requirements-dlib.txt', or delete pretrained.dlib from the file")

    started = time.time()
    start_stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cmd = ["dvc", "repro"] + (["--force"] if args.force else [])
    print(f"run_config: {' '.join(cmd)} in {workdir.relative_to(REPO)} (commit {commit[:10]})", flush=True)
    stage_seconds = stream_repro(cmd, workdir, env)
    wall = time.time() - started

    dest = REPO / "reports" / name
    staging = REPO / "reports" / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in report_outputs(workdir / "dvc.lock"):
        if (workdir / path).exists():
            copy_path(workdir / path, staging / Path(path).relative_to("reports"))
    shutil.copy2(workdir / "params.yaml", staging / "params.yaml")
    shutil.copy2(workdir / "dvc.lock", staging / "dvc.lock")
    this_run = {
        "commit": commit,
        "started": start_stamp,
        "repro_wall_s": round(wall, 1),
        "forced": args.force,
        "stage_seconds": stage_seconds,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
    }
    (staging / "run.json").write_text(json.dumps(run_record(dest / "run.json", args.params, this_run), indent=2) + "\n")
    old = REPO / "reports" / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f"run_config: report in {dest.relative_to(REPO)}/index.md ({wall / 60:.1f} min of dvc repro)")


if __name__ == "__main__":
    main()
