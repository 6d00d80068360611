"""Grids of experiments: one DVC experiment per cell, and one report across them.

A grid is a YAML file (``configs/grids/<name>.yaml``)::

    name: arcface-margins                 # report in reports/experiments/<name>/
    description: ArcFace margin x colour / grayscale input
    base: params.yaml                     # the params every cell starts from (optional)
    set:                                  # overrides shared by every cell (optional)
      train_losses: [arcface]
    vary:                                 # the grid: every combination of the values is a cell
      loss.margin: [0.2, 0.5, 0.8]        #   a params key and its values, or
      input:                              #   a named dimension whose values set several keys
        colour: {model.grayscale: false}
        gray: {model.grayscale: true}
    table:
      rows: [loss.margin]                 # dimensions as rows / columns; besides the varied
      columns: [input]                    #   ones: loss, variant (distance x norm), test_set
      metrics: [accuracy, fp, fn]         # one pivot table per metric and test set
      test_sets: [synth_closed, synth_open]
      variants: [cosine_norm]             # default: the primary variant
    plot: {x: loss.margin, hue: input}    # metric against a numeric param, with interval bars
    roc: [{loss.margin: 0.5, input: colour}]   # cells whose ROC curves are overlaid

``python -m pipeline grid run FILE -j N`` queues one experiment per cell that has not
run yet (``dvc exp run --queue -n NAME -S key=value ...``: every unchanged stage is
restored from the DVC cache), runs the queue with N workers, shows each cell's stages,
finishes and failures as they happen, and writes the report. A cell's params are
*resolved* (HEAD's params.yaml, the base file, ``set`` and the cell's values) and its
name ends in a hash of them, so an edited base file or ``set`` block makes new cells,
and adding a value to the grid runs only the new cells. A cell counts as done only when
its experiment ran on exactly what HEAD would run (:mod:`pipeline.experiments`: the
experiment's own dvc.lock against HEAD's code and the resolved params); ``grid run``
refuses a working copy whose tracked files differ from HEAD, naming them. A failed cell
is reported with its own error line and stays failed (it is not queued again) until its
inputs change or ``--retry-failed``; ``grid run`` then exits non-zero.

The report (``python -m pipeline grid report FILE``, :mod:`pipeline.grid_report`) reads the finished experiments
through DVC: their params from the experiment commits, the per-pair score files from
the DVC cache (``dvc.api``). It never trains. Each *model* is one loss in one cell, its
runs are the cell's training seeds, and the statistics are those of the single-pipeline
report (:mod:`pipeline.repeats`): mean and 95% interval over runs and test pairs, and
Holm-corrected verdicts over every pair of models in a table (same test pairs). The
table must show every dimension that varies (``table.rows`` / ``columns``, with
``loss`` where a cell trains several losses), else a slot would hold several cells.

Across machines (``grid commands FILE --remote R``, with a DVC remote configured): one
shell line per cell, ``dvc exp run --temp -n NAME -S ... && dvc exp push -r DVCREMOTE R
NAME``, to run anywhere (a cluster job array; the working copy stays clean); the report
machine then runs ``grid pull FILE --remote R`` (``dvc exp pull``, refs and data) and
``grid report FILE``, which names any cell whose data is not in the local cache.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline import experiments as exps
from pipeline.config import flatten_keys
from pipeline.experiments import GridError

PSEUDO_DIMENSIONS = ("loss", "variant", "test_set")
METRICS = {
    "auc": "AUC", "accuracy": "accuracy (LFW protocol)", "eer": "EER", "tpr@fpr_1e-02": "TPR@FPR≤1e-2",
    "tpr@fpr_1e-03": "TPR@FPR≤1e-3", "fp": "false positives (LFW protocol, mean over runs)",
    "fn": "false negatives (LFW protocol, mean over runs)", "rank1": "rank-1 identification",
}


# --------------------------------------------------------------------------- grid file
@dataclass(frozen=True)
class Cell:
    """One experiment: its name, the label of each dimension, its params overrides (``set`` and the
    cell's values), the ``-S`` arguments that make HEAD's params.yaml its params, and those params."""

    name: str
    labels: dict[str, str]
    overrides: dict[str, Any]
    set_args: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Grid:
    path: Path
    name: str
    description: str
    base: Path | None
    fixed: dict[str, Any]
    dimensions: dict[str, dict[str, dict[str, Any]]]   # dimension -> label -> overrides
    rows: list[str]
    columns: list[str]
    metrics: list[str]
    test_sets: list[str] | None
    variants: list[str] | None
    plot: dict[str, str] = field(default_factory=dict)
    roc: list[dict[str, str]] = field(default_factory=list)
    roc_by: str | None = None   # one ROC figure per value of this dimension: <value>_<distance>_<norm>.png

    def cells(self, workspace: Path) -> list[Cell]:
        """Every cell, its params resolved against HEAD's params.yaml in ``workspace`` (the file itself
        where the folder has no commit yet) by DVC's own ``-S`` code, and named from them."""
        head_text = exps.show(workspace, "HEAD", "params.yaml")
        if head_text is None:
            if not (workspace / "params.yaml").is_file():
                raise GridError(f"{workspace}: no params.yaml")
            head_text = (workspace / "params.yaml").read_text()
        head_tree = yaml.safe_load(head_text) or {}
        base = self._base_tree(workspace)
        out = []
        labels = [list(values) for values in self.dimensions.values()]
        for combo in itertools.product(*labels):
            chosen = dict(zip(self.dimensions, combo))
            overrides = dict(self.fixed)
            for dim, label in chosen.items():
                overrides.update(self.dimensions[dim][label])
            args = tuple(_set_args(head_tree, base, overrides))
            try:
                params = exps.resolve_params(head_text, list(args))
            except GridError as err:
                raise GridError(f"{self.path}: cell {chosen}: {err}") from None
            out.append(Cell(_cell_name(self.name, chosen, params), chosen, overrides, args, params))
        return out

    def _base_tree(self, workspace: Path) -> dict[str, Any]:
        if self.base is None:
            return {}
        path = self.base if self.base.is_absolute() else workspace / self.base
        if not path.is_file():
            raise GridError(f"{self.path}: base {self.base} not found")
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise GridError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise GridError(f"{path}: base params must be a mapping")
        return tree

    def check_table(self, cells: list[Cell]) -> None:
        """Refuse a table with a slot that would hold several cells' models: a loss pseudo-dimension that
        is not laid out while a cell trains several losses (varied dimensions are checked on loading)."""
        shown = set(self.rows or ["loss"]) | set(self.columns)
        several = [c for c in cells if len(c.params.get("train_losses") or []) > 1]
        if "loss" not in shown and several:
            raise GridError(f"{self.path}: table: dimension 'loss' is not shown but cell {several[0].name} trains "
                            f"{len(several[0].params['train_losses'])} losses; add 'loss' to table.rows or "
                            "table.columns")


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell_name(grid: str, labels: dict[str, str], params: dict[str, Any]) -> str:
    """``<grid>-<label>-<label>-<hash>``: readable, a valid git ref name, unique per resolved params."""
    digest = exps.params_digest(params)[:6]
    parts = [re.sub(r"[^A-Za-z0-9_.]+", "_", f"{dim.split('.')[-1]}{label}") for dim, label in labels.items()]
    name = "-".join([grid, *parts, digest])
    return name.replace("..", "_")


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; :class:`GridError` with one line naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: grid file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping with name, vary and table")
    unknown = set(raw) - {"name", "description", "base", "set", "vary", "table", "plot", "roc", "roc_by"}
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    name = raw.get("name") or path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(name)):
        raise GridError(f"{path}: name {name!r} must be letters, digits, '-' or '_'")
    vary = raw.get("vary")
    if not isinstance(vary, dict) or not vary:
        raise GridError(f"{path}: vary: expected a mapping of params keys (or named dimensions) to values")
    dimensions: dict[str, dict[str, dict[str, Any]]] = {}
    for dim, values in vary.items():
        if dim in PSEUDO_DIMENSIONS:
            raise GridError(f"{path}: vary.{dim}: {dim!r} is a built-in table dimension; choose another name")
        if isinstance(values, list) and values:
            dimensions[dim] = {_label(v): {dim: v} for v in values}
        elif isinstance(values, dict) and values and all(isinstance(v, dict) for v in values.values()):
            dimensions[dim] = {str(label): dict(sets) for label, sets in values.items()}
        else:
            raise GridError(f"{path}: vary.{dim}: expected a non-empty list of values, or labels mapping to "
                            "{params.key: value}")
        if len(dimensions[dim]) != (len(values)):
            raise GridError(f"{path}: vary.{dim}: values repeat")
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict):
        raise GridError(f"{path}: set: expected a mapping of params keys to values")
    table = raw.get("table") or {}
    known = set(dimensions) | set(PSEUDO_DIMENSIONS)
    rows, columns = list(table.get("rows") or []), list(table.get("columns") or [])
    for key in rows + columns:
        if key not in known:
            raise GridError(f"{path}: table: {key!r} is not a dimension (known: {', '.join(sorted(known))})")
    metrics = list(table.get("metrics") or ["auc"])
    for metric in metrics:
        if metric not in METRICS:
            raise GridError(f"{path}: table.metrics: {metric!r} unknown (known: {', '.join(METRICS)})")
    for dim, values in dimensions.items():
        if len(values) > 1 and dim not in rows + columns:
            raise GridError(f"{path}: table: dimension {dim!r} varies ({len(values)} values) but is in neither "
                            "table.rows nor table.columns, so its cells would share one slot; add it to one")
    plot = raw.get("plot") or {}
    if plot and plot.get("x") not in dimensions:
        raise GridError(f"{path}: plot.x: {plot.get('x')!r} is not a varied dimension")
    if plot.get("hue") not in (None, *known):
        raise GridError(f"{path}: plot.hue: {plot.get('hue')!r} is not a dimension")
    roc_by = raw.get("roc_by")
    if roc_by is not None and roc_by not in dimensions:
        raise GridError(f"{path}: roc_by: {roc_by!r} is not a varied dimension")
    roc = raw.get("roc") or []
    for choice in roc:
        for dim, label in choice.items():
            if dim not in dimensions or _label(label) not in dimensions[dim]:
                raise GridError(f"{path}: roc: {dim} = {label!r} is not a cell of the grid")
    base = raw.get("base")
    return Grid(path, str(name), str(raw.get("description") or ""), Path(base) if base else None, dict(fixed),
                dimensions, rows, columns, metrics, table.get("test_sets"), table.get("variants"), dict(plot),
                [{k: _label(v) for k, v in c.items()} for c in roc], roc_by)


# ----------------------------------------------------------------------- DVC commands
GRID_OUTPUT = Path("reports/experiments")


def _value(value: Any) -> str:
    """A value in DVC's ``-S key=value`` (Hydra override) syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z0-9_./-]+", value) else "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    raise GridError(f"cannot pass {value!r} to dvc exp run -S")


def _exists(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_args(head: dict[str, Any], base: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """``key=value`` overrides that turn HEAD's params tree ``head`` into a cell's params: the keys where
    the base params differ from it, then the cell's overrides (``+key=value`` for a key params.yaml does
    not have yet, as DVC's ``-S`` requires)."""
    current = flatten_keys(head)
    wanted = {key: value for key, value in flatten_keys(base).items() if current.get(key, object()) != value}
    wanted.update(flatten_keys(overrides))  # a mapping sets its keys one by one (merged into the section)
    return [f"{'' if _exists(head, key) else '+'}{key}={_value(value)}" for key, value in wanted.items()]


def cell_command(cell: Cell, *, queue: bool = False, temp: bool = False) -> list[str]:
    """``dvc exp run [--queue | --temp] -n NAME -S ...`` for one cell."""
    args = ["dvc", "exp", "run"] + (["--queue"] if queue else []) + (["--temp"] if temp else []) + ["-n", cell.name]
    for item in cell.set_args:
        args += ["-S", item]
    return args


def _shell(args: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in args)


def _dvc(args: list[str], workspace: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], cwd=workspace, capture_output=True, text=True)
    if check and result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise GridError(f"dvc {' '.join(args[:3])} failed in {workspace}: {tail[0]}")
    return result


@dataclass
class CellState:
    cell: Cell
    status: str          # done | ran | failed | stale | queued | running | missing
    rev: str | None = None
    error: str = ""


@dataclass
class Survey:
    """What exists for each cell now: its experiments, judged against HEAD, and its tasks in DVC's queue."""

    cells: list[Cell]
    experiments: dict[str, list[exps.Experiment]]
    tasks: dict[str, list[exps.Task]]
    head: str
    code: list[str]      # dvc.yaml and the source dependencies of every cell's stages
    stages: dict[str, dict[str, dict[str, Any]]]   # cell name -> its expected stages

    def current(self, cell: Cell) -> exps.Experiment | None:
        """The experiment that stands for the cell (HEAD's own first), or None."""
        fresh = [e for e in self.experiments.get(cell.name, []) if not e.stale]
        return min(fresh, key=lambda e: e.baseline != self.head, default=None)

    def stale(self, cell: Cell) -> list[exps.Experiment]:
        return [e for e in self.experiments.get(cell.name, []) if e.stale]

    def tasks_of(self, cell: Cell, *status: str) -> list[exps.Task]:
        return [t for t in self.tasks.get(cell.name, []) if t.status in status]


def survey(grid: Grid, workspace: Path) -> Survey:
    cells = grid.cells(workspace)
    grid.check_table(cells)
    names = {c.name for c in cells}
    dvc_yaml = exps.head_dvc_yaml(workspace)
    stages = {c.name: exps.expected_stages(dvc_yaml, c.params) for c in cells}
    found = exps.list_experiments(workspace, names)
    exps.judge(workspace, found, stages, {c.name: c.params for c in cells})
    experiments: dict[str, list[exps.Experiment]] = {}
    for exp in found:
        experiments.setdefault(exp.name, []).append(exp)
    tasks: dict[str, list[exps.Task]] = {}
    for task in exps.queue_tasks(workspace):
        if task.name in names:
            tasks.setdefault(task.name, []).append(task)
    return Survey(cells, experiments, tasks, exps.head_rev(workspace), exps.code_paths(list(stages.values())), stages)


def _short(stages: list[str]) -> list[str]:
    """Stage names with matrix / foreach items folded: ['train@*', 'score@*', 'report']."""
    return list(dict.fromkeys(name.split("@")[0] + ("@*" if "@" in name else "") for name in stages))


def _failures(survey_: Survey, cell: Cell, workspace: Path) -> tuple[exps.Task | None, list[str]]:
    """The cell's failed task that failed on the inputs the cell has now (its newest), and the revs of its
    other failed tasks (older duplicates, or failures on other code or params), to remove."""
    failed = sorted(survey_.tasks_of(cell, "Failed"), key=lambda t: exps.git(workspace, "log", "-1", "--format=%ct",
                                                                              t.rev, check=False).strip())
    current = [t for t in failed if exps.same_inputs(workspace, t.rev, survey_.code)
               and exps.resolve_params(exps.show(workspace, t.rev, "params.yaml") or "", []) == cell.params]
    keep = current[-1] if current else None
    return keep, [t.rev for t in failed if t is not keep]


def _refuse_changes(grid: Grid, workspace: Path, code: list[str], out_root: Path) -> None:
    allowed = [str(out_root), "configs/grids", str(grid.path)] + ([str(grid.base)] if grid.base else [])
    folders = {p.split("/")[0] for p in code if "/" in p}
    changed = exps.working_copy_changes(workspace, folders, allowed)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise GridError(f"the working copy differs from HEAD in {shown}: a queued cell would run on these changes "
                        "while its result is reported for HEAD; commit them (or `git stash`) and run again")


def run_grid(grid: Grid, workspace: Path, *, jobs: int = 1, poll: float = 5.0, retry_failed: bool = False,
             out_root: Path = GRID_OUTPUT, echo=print) -> list[CellState]:
    """Queue the cells that have no current experiment, run the queue with ``jobs`` workers and follow it;
    returns each cell's state. Cells that failed on their current inputs are not queued again unless
    ``retry_failed``; stale experiments of a cell's name on HEAD's commit are renamed out of the way."""
    now = survey(grid, workspace)
    _refuse_changes(grid, workspace, now.code, out_root)
    todo, waiting, remove, kept = [], [], [], []
    for cell in now.cells:
        if now.current(cell):
            continue
        active = now.tasks_of(cell, "Queued", "Running")
        failed, others = _failures(now, cell, workspace)
        remove += others
        if active:
            waiting += active
        elif failed and not retry_failed:
            kept.append((cell, failed))
        else:
            remove += [failed.rev] if failed else []
            todo.append(cell)
    done = sum(now.current(c) is not None for c in now.cells)
    echo(f"grid {grid.name}: {len(now.cells)} cells, {done} already ran, {len(todo)} to run"
         + (f", {len(waiting)} already queued" if waiting else "")
         + (f", {len(kept)} failed before (not run again)" if kept else ""))
    for cell, task in kept:
        echo(f"  {cell.name} failed: {exps.task_error(task)} (retry with --retry-failed once fixed)")
    exps.remove_tasks(workspace, remove)
    for cell in todo:
        for exp in now.stale(cell):
            echo(f"  {cell.name}: experiment {exp.rev[:7]} is stale ({exps.describe_stale(exp.stale)}); running again")
            if exp.baseline == now.head:
                echo(f"    (kept as {exps.rename_stale(workspace, exp)})")
    revs = {t.rev: t.name for t in waiting}
    uncacheable = exps.without_run_cache(now.stages[todo[0].name]) if todo else []
    if uncacheable:
        echo(f"  note: DVC keeps no run-cache for {', '.join(_short(uncacheable))} (an output with cache: false that "
             "is not a metric or plot), so a cell whose params or code differ from HEAD's dvc.lock reruns them")
    before = {t.rev for t in exps.queue_tasks(workspace)}
    for cell in todo:
        _dvc(cell_command(cell, queue=True)[1:], workspace)
        echo(f"  queued {cell.name}")
    # the new tasks (a worker still alive from an earlier run may have started one already)
    revs.update({t.rev: t.name for t in exps.queue_tasks(workspace)
                 if t.rev not in before and t.name in {c.name for c in todo}})
    if revs:
        exps.start_queue(workspace, jobs)
        try:
            exps.watch(workspace, revs, jobs=jobs, poll=poll, echo=echo)
        except KeyboardInterrupt:
            echo(f"stopped following: the queued cells go on in the background (`dvc queue status`, `dvc queue kill "
                 f"NAME`); `python -m pipeline grid run {grid.path}` follows them again and writes the report")
            raise
    return cell_states(grid, workspace, ran={c.name for c in todo})


def cell_states(grid: Grid, workspace: Path, ran: set[str] | None = None) -> list[CellState]:
    """Each cell's state now; GridError naming the cell (and how to fetch it) where a finished cell's
    score files are not in the local DVC cache."""
    now = survey(grid, workspace)
    states = []
    for cell in now.cells:
        exp = now.current(cell)
        if exp:
            states.append(CellState(cell, "ran" if ran and cell.name in ran else "done", exp.rev))
            continue
        active = now.tasks_of(cell, "Running", "Queued")
        failed, _ = _failures(now, cell, workspace) if now.tasks_of(cell, "Failed") else (None, [])
        stale = now.stale(cell)
        if active:
            states.append(CellState(cell, active[0].status.lower()))
        elif failed:
            states.append(CellState(cell, "failed", error=exps.task_error(failed)))
        elif stale:
            states.append(CellState(cell, "stale", error=f"experiment {stale[0].rev[:7]}: "
                                                         + exps.describe_stale(stale[0].stale)))
        else:
            states.append(CellState(cell, "missing"))
    locks = {s.cell.name: _current_entries(next(e.lock for e in now.experiments[s.cell.name] if e.rev == s.rev),
                                           now.stages[s.cell.name])
             for s in states if s.rev}
    for name, missing in exps.missing_outputs(workspace, locks).items():
        if missing:
            raise GridError(f"cell {name}: its score files ({', '.join(missing[:2])}"
                            f"{' ...' if len(missing) > 2 else ''}) are not in the local DVC cache; fetch them with "
                            f"`python -m pipeline grid pull {grid.path} --remote <git remote>`")
    return states


def _current_entries(lock: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any]:
    """``lock`` with only the entries of ``stages``: DVC keeps the entries of stages that dvc.yaml no
    longer has (an earlier layout's outputs, never in this cache), which say nothing about the cell."""
    return {**lock, "stages": {k: v for k, v in ((lock or {}).get("stages") or {}).items() if k in stages}}


def _require_git_remote(workspace: Path, remote: str) -> None:
    if not exps.git(workspace, "remote", "get-url", remote, check=False).strip():
        raise GridError(f"no git remote named {remote!r}; add it with `git remote add {remote} URL`")


def cluster_commands(grid: Grid, workspace: Path, remote: str, dvc_remote: str | None = None) -> list[str]:
    """One shell line per cell: run it in a temporary workspace (the working copy stays as it is), then push
    the experiment's git ref to the git remote ``remote`` and its data to the DVC remote (explicitly)."""
    _require_git_remote(workspace, remote)
    store = exps.require_dvc_remote(workspace, dvc_remote)
    return [f"{_shell(cell_command(cell, temp=True))} && dvc exp push -r {store} {remote} {cell.name}"
            for cell in grid.cells(workspace)]


def pull(grid: Grid, workspace: Path, remote: str, dvc_remote: str | None = None, echo=print) -> int:
    """Fetch the grid's experiments that ``remote`` has (git refs, and their data from the DVC remote);
    GridError naming a pulled cell whose score files did not come with it. Returns how many were pulled."""
    _require_git_remote(workspace, remote)
    store = exps.require_dvc_remote(workspace, dvc_remote)
    names = {c.name for c in grid.cells(workspace)}
    listed = exps.git(workspace, "ls-remote", remote, "refs/exps/*").split()
    there = sorted({ref.rsplit("/", 1)[-1] for ref in listed if ref.startswith("refs/exps/")} & names)
    if not there:
        echo(f"no experiment of grid {grid.name} on {remote} yet ({len(names)} cells)")
        return 0
    _dvc(["exp", "pull", "-r", store, remote, *there], workspace)
    now = survey(grid, workspace)
    locks = {c.name: exp.lock for c in now.cells if c.name in there and (exp := now.current(c))}
    for name, missing in exps.missing_outputs(workspace, locks).items():
        if missing:
            raise GridError(f"cell {name}: pulled from {remote}, but its score files ({missing[0]}"
                            f"{' ...' if len(missing) > 1 else ''}) are not on DVC remote {store!r}; push them from "
                            f"the machine that ran it: `dvc exp push -r {store} {remote} {name}`")
    echo(f"pulled {len(there)} of {len(names)} experiment(s) of grid {grid.name} from {remote} "
         f"(data from DVC remote {store})")
    return len(there)


# --------------------------------------------------------------------------- reading
class ExperimentRuns:
    """Reads runs' outputs from one finished experiment: files in git at its commit,
    DVC outputs (per-pair score files) from the cache, through ``dvc.api``."""

    def __init__(self, workspace: Path, rev: str) -> None:
        self.workspace, self.rev = workspace, rev

    def _text(self, path: str) -> str:
        import dvc.api

        return dvc.api.read(path, repo=str(self.workspace), rev=self.rev)

    def params(self) -> dict[str, Any]:
        if getattr(self, "_params", None) is None:
            self._params = yaml.safe_load(self._git_show("params.yaml"))
        return self._params

    def _git_show(self, path: str) -> str:
        result = subprocess.run(["git", "show", f"{self.rev}:{path}"], cwd=self.workspace, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise GridError(f"{path} is not in experiment commit {self.rev[:8]}")
        return result.stdout

    def test_sets(self, run: str) -> list[str]:
        """The experiment's configured test sets (its params' data.tests)."""
        return sorted((self.params().get("data") or {}).get("tests") or {})

    def scores(self, run: str, test_set: str, variant: str) -> pd.DataFrame:
        import io

        return pd.read_csv(io.StringIO(self._text(f"data/scores/{test_set}/{run}/{variant}.csv")),
                           dtype={"image_id1": str, "image_id2": str})

    def metrics(self, run: str) -> dict:
        """``{set: metrics}`` of every test set the run scored, plus ``thresholds``."""
        from dvc.exceptions import PathMissingError

        out: dict = {}
        for name in self.test_sets(run):
            try:
                entry = json.loads(self._text(f"reports/metrics/{name}/{run}.json"))  # a cached output
            except (GridError, OSError, PathMissingError):
                continue
            out["thresholds"] = entry.pop("thresholds", out.get("thresholds"))
            out[name] = entry
        return out

    def thresholds(self, run: str) -> dict:
        return json.loads(self._text(f"data/scores/{self.test_sets(run)[0]}/{run}/thresholds.json"))


# ---------------------------------------------------------------------------- report
def build_report(grid: Grid, workspace: Path, out_root: Path, *, states: list[CellState] | None = None,
                 echo=print) -> Path:
    """Write ``out_root/<grid>/``: index.md, cells.csv, results.csv, verdicts.csv, pivot CSVs, figures
    (:func:`pipeline.grid_report.write_grid_report`; ``states``: the cells' states, read when not given)."""
    from pipeline.grid_report import write_grid_report

    return write_grid_report(grid, workspace, out_root, states=states or cell_states(grid, workspace), echo=echo)
