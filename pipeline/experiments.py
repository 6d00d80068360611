"""The DVC side of a grid: which experiments stand for HEAD, the working copy, the queue, remotes, data.

**When an experiment stands for a cell.** A cell is done when an experiment of its name ran on
exactly what HEAD plus the grid file would run now. That is decided from the experiment's own
``dvc.lock``, stage by stage (:func:`lock_differences`):

* every *source* dependency of a stage (a path that no stage writes: code, configs) must carry
  the hash DVC gives HEAD's version of it, computed from HEAD's git tree with ``.dvcignore``
  applied (:func:`head_hashes`), so code edited and run without a commit, or code changed since,
  makes the experiment stale;
* every params entry of a stage must equal the cell's *resolved* params: HEAD's ``params.yaml``
  with the grid's base file, ``set`` block and the cell's values applied by DVC's own ``-S`` code
  (:func:`resolve_params`), so an edited base file or ``set`` block makes it stale too;
* the experiment's ``dvc.yaml`` must be HEAD's (same stages, commands, dependency lists).

Dependencies that other stages write (``data/...``) need no check of their own: they follow from
the stages before them. A stale experiment is never reported as a result; when its cell runs
again under the same name on the same commit it is first renamed to ``NAME-stale-<sha>``.

**The queue.** Failed cells stay failed for the inputs they failed on: a later ``grid run`` shows
their error (the end of the cell's log, not DVC's "failed to reproduce" wrapper) instead of
queueing them again, and runs them again only with ``--retry-failed`` or when their inputs
changed; their old failed tasks are removed from DVC's queue first, so ``dvc queue status`` keeps
one task per cell.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml


class GridError(ValueError):
    """A grid file that cannot be used, or a DVC / git state that stops a grid; one line for the user."""


# ----------------------------------------------------------------------------- git
def git(workspace: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True)
    if check and result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise GridError(f"git {' '.join(args[:2])} failed in {workspace}: {tail[0]}")
    return result.stdout


def head_rev(workspace: Path) -> str:
    return git(workspace, "rev-parse", "HEAD").strip()


def git_object(workspace: Path, rev: str, path: str) -> str:
    """The git object id of ``path`` at ``rev`` ('' where it does not exist)."""
    return git(workspace, "rev-parse", "-q", "--verify", f"{rev}:{path}", check=False).strip()


def show(workspace: Path, rev: str, path: str) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=workspace, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


class _LockLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's parser where present (a 120 kB lock takes 4 s in pure Python), reading floats as
    YAML 1.2 does: DVC writes ``1e-06`` (no dot), which YAML 1.1 and PyYAML take for a string."""


_LockLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_lock(text: str) -> dict[str, Any]:
    """A dvc.lock's text as DVC reads it (its floats included)."""
    return yaml.load(text or "{}", Loader=_LockLoader) or {}


def read_lock(workspace: Path, rev: str) -> dict[str, Any]:
    """The dvc.lock of commit ``rev`` ({} where none)."""
    return parse_lock(show(workspace, rev, "dvc.lock") or "{}")


# -------------------------------------------------------------------------- params
def resolve_params(params_text: str, overrides: list[str]) -> dict[str, Any]:
    """The params tree DVC's ``dvc exp run -S <overrides>`` makes of a params.yaml with ``params_text``:
    DVC's own Hydra code on a temporary copy, read back with DVC's YAML loader (a fresh copy per call)."""
    return json.loads(_resolved_json(params_text, tuple(overrides)))


@functools.lru_cache(maxsize=256)
def _resolved_json(params_text: str, overrides: tuple[str, ...]) -> str:
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    with tempfile.TemporaryDirectory(prefix="facepipe-params-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(params_text)
        if overrides:
            try:
                apply_overrides(path, list(overrides))
            except Exception as err:  # DVC's InvalidArgumentError and Hydra's parse errors
                raise GridError(f"-S {' '.join(overrides)}: {err}") from None
        return json.dumps(load_yaml(path))


def params_digest(params: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def lookup(tree: Any, dotted: str) -> Any:
    """``tree['a']['b']`` for ``'a.b'``; a key with a dot in it is tried whole first. KeyError if absent."""
    if isinstance(tree, dict) and dotted in tree:
        return tree[dotted]
    head, _, rest = dotted.partition(".")
    if not rest or not isinstance(tree, dict) or head not in tree:
        raise KeyError(dotted)
    return lookup(tree[head], rest)


# ---------------------------------------------------------------------- staleness
def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml deps / outs list (a path, or ``{path: options}``), normalised."""
    out = []
    for entry in entries or []:
        for path in ([entry] if isinstance(entry, str) else list(entry)):
            out.append(os.path.normpath(str(path)))
    return out


def _param_keys(entries: list[Any] | None) -> dict[str, list[str] | None]:
    """File -> keys of a dvc.yaml params list (``key`` is in params.yaml; ``{file: [keys]}``; None: all)."""
    out: dict[str, list[str] | None] = {}
    for entry in entries or []:
        if isinstance(entry, str):
            out.setdefault("params.yaml", []).append(entry)  # type: ignore[union-attr]
        else:
            for file, keys in entry.items():
                out[file] = None if keys is None else list(keys)
    return out


def expected_stages(dvc_yaml: dict[str, Any], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stages ``dvc_yaml`` resolves to under ``params`` (matrix and foreach expanded by DVC's own
    parser): name -> {cmd, deps (paths), outs (paths, with metrics and plots), params (file -> keys)}."""
    from types import SimpleNamespace

    from dvc.fs import LocalFileSystem
    from dvc.parsing import DataResolver

    with tempfile.TemporaryDirectory(prefix="facepipe-stages-") as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for entry in dvc_yaml.get("vars") or []:  # the files dvc.yaml's `vars` names (defaults), as they are here
            name = entry.split(":")[0] if isinstance(entry, str) else None
            if name and Path(name).is_file():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_text(Path(name).read_text())
        try:
            resolved = DataResolver(SimpleNamespace(fs=LocalFileSystem(), config={}), tmp, dvc_yaml).resolve()
        except Exception as err:  # DVC's ResolveError: an interpolation the params cannot fill
            raise GridError(f"dvc.yaml does not resolve with the cell's params: {str(err).splitlines()[0]}") from None
    return {name: {"cmd": st.get("cmd"), "deps": _paths(st.get("deps")),
                   "outs": sorted(_paths(st.get("outs")) + _paths(st.get("metrics")) + _paths(st.get("plots"))),
                   "params": _param_keys(st.get("params")),
                   "uncached_outs": [p for entry in st.get("outs") or [] if isinstance(entry, dict)
                                     for p, opts in entry.items() if (opts or {}).get("cache") is False]}
            for name, st in (resolved.get("stages") or {}).items()}


def without_run_cache(stages: dict[str, dict[str, Any]]) -> list[str]:
    """The stages DVC never saves to its run-cache: those with an ``outs`` entry that has ``cache: false``
    (DVC 3 saves a run only when every uncached output is a metric or a plot). In a queued cell whose
    dvc.lock entry for such a stage differs (new params upstream, a stale cell run again), the stage
    runs again although an earlier cell ran it on the same inputs."""
    return [name for name, st in stages.items() if st.get("uncached_outs")]


def source_deps(stages: dict[str, dict[str, Any]]) -> set[str]:
    """The dependencies of ``stages`` (as :func:`expected_stages` gives them) that no stage writes: code,
    configs, outside data. A folder that holds an output counts as written."""
    outs = {o.rstrip("/") for st in stages.values() for o in st["outs"]}

    def written(path: str) -> bool:
        return any(path == o or path.startswith(o + "/") or o.startswith(path.rstrip("/") + "/") for o in outs)

    return {d for st in stages.values() for d in st["deps"] if not written(d)}


def head_hashes(workspace: Path, paths: set[str]) -> dict[str, str | None]:
    """DVC's hash (``md5``, ``<md5>.dir`` for a folder) of each path as HEAD has it: built from HEAD's
    git tree with ``.dvcignore`` applied, so neither uncommitted edits nor ``__pycache__`` count.
    A path that is not in HEAD's tree (outside data) is hashed as it is on disk; None where absent."""
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build

    def digest(repo, fs, path: str) -> str | None:
        try:
            _, _, obj = build(repo.cache.local, path, fs, "md5", ignore=repo.dvcignore, dry_run=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return obj.hash_info.value

    head = head_rev(workspace)
    tracked = {p for p in paths if not os.path.isabs(p) and git_object(workspace, head, p)}
    out: dict[str, str | None] = {}
    with Repo(str(workspace)) as repo:
        for path in sorted(paths - tracked):
            full = path if os.path.isabs(path) else str(workspace / path)
            out[path] = digest(repo, repo.fs, full) if os.path.exists(full) else None
        if tracked:
            with repo.switch(head):
                for path in sorted(tracked):
                    out[path] = digest(repo, repo.fs, repo.fs.join(repo.root_dir, path))
    return out


def lock_differences(lock: dict[str, Any], stages: dict[str, dict[str, Any]], params: dict[str, Any],
                     hashes: dict[str, str | None], other_params: Callable[[str], Any]) -> list[str]:
    """Why an experiment's dvc.lock does not stand for ``stages`` (HEAD's dvc.yaml under the cell's
    ``params``): one short item per stage that did not run as listed ('stage train@arcface-0'), per source
    dependency whose hash is not HEAD's ('pipeline/train.py') and per param that differs ('param
    loss.margin'); empty when it stands. Lock entries of stages HEAD does not have are ignored.
    ``hashes``: HEAD's hash of each source dependency; ``other_params(file)``: another params file at HEAD."""
    ran = (lock or {}).get("stages") or {}
    sources = source_deps(stages)
    reasons: list[str] = []

    def add(item: str) -> None:
        if item not in reasons:
            reasons.append(item)

    for name, want in stages.items():
        got = ran.get(name)
        deps = {os.path.normpath(d["path"]): d for d in (got or {}).get("deps") or []}
        outs = sorted(os.path.normpath(o["path"]) for o in (got or {}).get("outs") or [])
        if got is None or got.get("cmd") != want["cmd"] or set(deps) != set(want["deps"]) or outs != want["outs"]:
            add(f"stage {name}")
            continue
        for path in sorted(set(want["deps"]) & sources):
            if hashes.get(path) != deps[path].get("md5"):
                add(path)
        values = got.get("params") or {}
        for file, keys in want["params"].items():
            if keys is not None and set(keys) != set(values.get(file) or {}):
                add(f"stage {name}")
            tree = params if file == "params.yaml" else other_params(file)
            for key, value in (values.get(file) or {}).items():
                try:
                    expected = lookup(tree, key)
                except KeyError:
                    expected = KeyError
                if expected != value:
                    add(f"param {key}" if file == "params.yaml" else f"param {file}:{key}")
    return reasons


@dataclass
class Experiment:
    """One DVC experiment of a cell's name: its commit, its baseline, and why it is stale (empty: current)."""

    name: str
    rev: str
    baseline: str
    stale: list[str] = field(default_factory=list)
    lock: dict[str, Any] = field(default_factory=dict, repr=False)


def list_experiments(workspace: Path, names: set[str]) -> list[Experiment]:
    """Every experiment (on any baseline commit) whose name is in ``names``."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        by_baseline = repo.experiments.ls(all_commits=True)
    return [Experiment(name, sha, baseline) for baseline, exps in by_baseline.items() for name, sha in exps
            if name in names and sha]


def head_dvc_yaml(workspace: Path) -> dict[str, Any]:
    text = show(workspace, "HEAD", "dvc.yaml")
    if text is None:
        raise GridError(f"{workspace}: HEAD has no dvc.yaml")
    return yaml.safe_load(text) or {}


def judge(workspace: Path, experiments: list[Experiment], stages_of: dict[str, dict[str, dict[str, Any]]],
          params_of: dict[str, dict[str, Any]]) -> None:
    """Fill in ``stale`` (and ``lock``) of each experiment against HEAD: ``stages_of[name]`` and
    ``params_of[name]`` are its cell's expected stages (:func:`expected_stages`) and resolved params."""
    head = head_rev(workspace)
    for exp in experiments:
        exp.lock = read_lock(workspace, exp.rev)
    paths = set().union(*(source_deps(stages_of[e.name]) for e in experiments)) if experiments else set()
    hashes = head_hashes(workspace, paths) if paths else {}
    other: dict[str, Any] = {}

    def other_params(file: str) -> Any:
        if file not in other:
            text = show(workspace, head, file)
            other[file] = json.loads(json.dumps(yaml.safe_load(text))) if text is not None else None
        return other[file]

    for exp in experiments:
        exp.stale = lock_differences(exp.lock, stages_of[exp.name], params_of[exp.name], hashes, other_params)


def code_paths(stages_list: list[dict[str, dict[str, Any]]]) -> list[str]:
    """``dvc.yaml`` and every source dependency of the given stage sets (params files aside: params
    are compared by value), sorted."""
    return sorted({"dvc.yaml"}.union(*(source_deps(stages) for stages in stages_list)))


def describe_stale(reasons: list[str], limit: int = 4) -> str:
    shown = ", ".join(reasons[:limit]) + (f" and {len(reasons) - limit} more" if len(reasons) > limit else "")
    return shown + (" differ" if len(reasons) > 1 else " differs") + " from what HEAD would run"


def rename_stale(workspace: Path, exp: Experiment) -> str:
    """Move a stale experiment's ref out of its cell's way (``NAME-stale-<sha7>``); returns the new name."""
    old = f"refs/exps/{exp.baseline[:2]}/{exp.baseline[2:]}/{exp.name}"
    new_name = f"{exp.name}-stale-{exp.rev[:7]}"
    git(workspace, "update-ref", old[: -len(exp.name)] + new_name, exp.rev)
    git(workspace, "update-ref", "-d", old, exp.rev)
    return new_name


# ------------------------------------------------------------------- working copy
def working_copy_changes(workspace: Path, dependency_dirs: set[str], allowed: list[str]) -> list[str]:
    """Paths where the working copy differs from HEAD in a way a queued cell would carry into its run:
    modified, added or deleted tracked files, and untracked files inside ``dependency_dirs`` (the folders
    of the stages' code). Paths under ``allowed`` (the grid's own files and report) are left out."""
    out = git(workspace, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    entries = out.split("\0")
    changed: list[str] = []
    skip_next = False
    for entry in entries:
        if skip_next or len(entry) < 4:
            skip_next = False
            continue
        status, path = entry[:2], entry[3:]
        skip_next = status[0] in "RC"  # a rename's source path follows as its own entry
        if any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed):
            continue
        if status == "??" and not any(path.startswith(d.rstrip("/") + "/") for d in dependency_dirs):
            continue
        changed.append(path)
    return changed


# --------------------------------------------------------------------------- queue
@dataclass
class Task:
    """One task of DVC's experiment queue."""

    name: str
    rev: str          # the stash commit: the workspace the task runs on (its params applied)
    baseline: str
    status: str       # Queued | Running | Failed | Success
    log: str | None = None   # where its output goes, once started


@contextmanager
def _queue(workspace: Path) -> Iterator[Any]:
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        yield repo.experiments.celery_queue


def queue_tasks(workspace: Path) -> list[Task]:
    """Every task in DVC's experiment queue (what ``dvc queue status`` lists), read in-process (~0.1 s)."""
    tasks: list[Task] = []
    with _queue(workspace) as queue:
        def log(rev: str) -> str | None:
            try:
                return queue.proc[rev].stdout
            except KeyError:
                return None

        tasks += [Task(e.name or "", e.stash_rev, e.baseline_rev, "Running", log(e.stash_rev))
                  for e in queue.iter_active()]
        tasks += [Task(e.name or "", e.stash_rev, e.baseline_rev, "Queued") for e in queue.iter_queued()]
        tasks += [Task(r.entry.name or "", r.entry.stash_rev, r.entry.baseline_rev, "Failed", log(r.entry.stash_rev))
                  for r in queue.iter_failed()]
        tasks += [Task(r.entry.name or "", r.entry.stash_rev, r.entry.baseline_rev, "Success")
                  for r in queue.iter_success()]
    return tasks


_DVC_WRAPPER = re.compile(r"^(ERROR: failed to reproduce|ERROR: failed to run|ERROR: unexpected error|"
                          r"ERROR: Experiment|\s*$)")


def error_line(log: str) -> str:
    """The cell's own error from its log: the last line before DVC's 'failed to reproduce ...' wrapper
    (a pipeline 'error: ...' line, or a traceback's last line); the wrapper itself only when nothing else."""
    lines = log.splitlines()
    cut = next((k for k, line in enumerate(lines) if line.startswith("ERROR: failed to reproduce")), len(lines))
    before = [ln.strip() for ln in lines[:cut] if not _DVC_WRAPPER.match(ln)]
    own = [ln for ln in before if re.match(r"^(error:|[A-Za-z_.]*(Error|Exception)\b|Killed)", ln)]
    if own:
        return own[-1]
    if before and cut < len(lines):
        return before[-1]
    rest = [ln.strip() for ln in lines if ln.strip()]
    return rest[-1] if rest else "(empty log)"


def task_error(task: Task) -> str:
    if not task.log or not os.path.exists(task.log):
        return "(no log: the task failed before it started; see .dvc/tmp/exps/celery/*.out)"
    return error_line(Path(task.log).read_text(errors="replace"))


def same_inputs(workspace: Path, rev: str, paths: list[str]) -> bool:
    """Whether commit ``rev`` has HEAD's version of every path (git objects; '' for absent on both)."""
    head = head_rev(workspace)
    return all(git_object(workspace, rev, p) == git_object(workspace, head, p) for p in paths)


def remove_tasks(workspace: Path, revs: list[str]) -> None:
    if revs:
        result = subprocess.run(["dvc", "queue", "remove", *revs], cwd=workspace, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise GridError(f"dvc queue remove failed in {workspace}: {tail[0]}")


def start_queue(workspace: Path, jobs: int) -> None:
    """``dvc queue start -j N``: spawns the workers and returns (its output goes to no pipe, which the
    detached workers would hold open until the queue is done)."""
    with tempfile.TemporaryFile(mode="w+") as errors:
        result = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=workspace,
                                stdout=subprocess.DEVNULL, stderr=errors, text=True)
        if result.returncode != 0:
            errors.seek(0)
            tail = errors.read().strip().splitlines()[-1:] or ["(no output)"]
            raise GridError(f"dvc queue start failed in {workspace}: {tail[0]}")


def _stage_of(task: Task) -> str:
    """The stage a running task is in (its log's last 'Running stage' line), '' when unknown."""
    if not task.log or not os.path.exists(task.log):
        return ""
    stages = re.findall(r"Running stage '([^']+)'", Path(task.log).read_text(errors="replace"))
    return stages[-1] if stages else ""


def watch(workspace: Path, revs: dict[str, str], *, jobs: int = 1, poll: float = 5.0, heartbeat: float = 60.0,
          echo: Callable[[str], None] = print) -> dict[str, Task]:
    """Follow the queued tasks ``revs`` (stash rev -> cell name) until none is queued or running; one
    line whenever a cell starts a stage, finishes or fails, and a heartbeat line every ``heartbeat`` s.
    Tasks left queued with none running for 30 s get their workers started again. Returns the last
    state of each task by cell name."""
    started = time.monotonic()
    last_line, last_time, seen, idle_since = "", 0.0, {}, None
    while True:
        tasks = {t.rev: t for t in queue_tasks(workspace) if t.rev in revs}
        elapsed = time.monotonic() - started
        for rev, task in tasks.items():
            stage = _stage_of(task) if task.status == "Running" else ""
            state = (task.status, stage)
            if seen.get(rev) != state:
                seen[rev] = state
                if task.status == "Running":
                    echo(f"  [{elapsed:5.0f} s] {revs[rev]}: running{' ' + stage if stage else ''}")
                elif task.status in ("Success", "Failed"):
                    tail = "finished" if task.status == "Success" else f"FAILED: {task_error(task)}"
                    echo(f"  [{elapsed:5.0f} s] {revs[rev]}: {tail}")
        count = {s: sum(t.status == s for t in tasks.values()) for s in ("Success", "Running", "Failed", "Queued")}
        line = (f"{count['Success']}/{len(revs)} cells finished, {count['Running']} running, "
                f"{count['Failed']} failed, {count['Queued']} queued")
        if line != last_line or elapsed - last_time >= heartbeat:
            echo(f"  [{elapsed:5.0f} s] {line}")
            last_line, last_time = line, elapsed
        if not count["Running"] and not count["Queued"]:
            return {revs[rev]: task for rev, task in tasks.items()}
        idle_since = (idle_since or time.monotonic()) if not count["Running"] else None
        if idle_since and time.monotonic() - idle_since > 30:
            start_queue(workspace, jobs)  # DVC starts only the workers that are not running
            idle_since = None
        time.sleep(poll)


# -------------------------------------------------------------------- remotes, data
def dvc_remotes(workspace: Path) -> list[str]:
    result = subprocess.run(["dvc", "remote", "list"], cwd=workspace, capture_output=True, text=True)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def default_dvc_remote(workspace: Path) -> str | None:
    result = subprocess.run(["dvc", "remote", "default"], cwd=workspace, capture_output=True, text=True)
    name = result.stdout.strip()
    return name if result.returncode == 0 and name and " " not in name else None


def require_dvc_remote(workspace: Path, dvc_remote: str | None) -> str:
    """The DVC remote a cell's data goes to / comes from; one line saying how to add one where none is set."""
    remotes = dvc_remotes(workspace)
    if dvc_remote:
        if dvc_remote not in remotes:
            raise GridError(f"no DVC remote named {dvc_remote!r} (configured: {', '.join(remotes) or 'none'}); "
                                  "add it with `dvc remote add NAME URL`, commit .dvc/config")
        return dvc_remote
    default = default_dvc_remote(workspace)
    if default:
        return default
    if len(remotes) == 1:
        return remotes[0]
    raise GridError("no default DVC remote, so an experiment's data (models, scores) would stay behind: "
                          + ("choose one with --dvc-remote, or " if remotes else "")
                          + "add one with `dvc remote add -d NAME URL` (e.g. a shared folder or s3://bucket/path) "
                            "and commit .dvc/config")


def missing_outputs(workspace: Path, locks: dict[str, dict[str, Any]], prefix: str = "data/scores/"
                    ) -> dict[str, list[str]]:
    """For each experiment's dvc.lock (by name), its cached outputs under ``prefix`` whose data is not in
    the local DVC cache (a folder counts as missing when its listing or any file of it is)."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    out: dict[str, list[str]] = {}
    if not locks:
        return out
    with Repo(str(workspace)) as repo:
        odb = repo.cache.local
        for name, lock in locks.items():
            outs = [o for entry in ((lock or {}).get("stages") or {}).values() for o in entry.get("outs") or []
                    if o["path"].startswith(prefix) and o.get("md5")]
            out[name] = []
            for item in outs:
                oid = item["md5"]
                present = odb.exists(oid)
                if present and oid.endswith(".dir"):
                    tree = Tree.load(odb, HashInfo("md5", oid))
                    present = all(odb.exists(hi.value) for _, _, hi in tree)
                if not present:
                    out[name].append(item["path"])
    return out
