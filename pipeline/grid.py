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
restored from the DVC cache), runs the queue with N workers and writes the report.
Cells are named from their values, with a short hash of their overrides, so a cell that
already ran (an experiment of that name on the current commit) is never run again, and
adding a value to the grid runs only the new cells. A failed cell is reported with the
end of its log; the others still report.

The report (``python -m pipeline grid report FILE``, :mod:`pipeline.grid_report`) reads the finished experiments
through DVC: their params from the experiment commits, the per-pair score files from
the DVC cache (``dvc.api``). It never trains. Each *model* is one loss in one cell, its
runs are the cell's training seeds, and the statistics are those of the single-pipeline
report (:mod:`pipeline.repeats`): mean and 95% interval over runs and test pairs, and
Holm-corrected verdicts over every pair of models in a table (same test pairs).

Across machines (``grid commands FILE --remote R``): one shell line per cell,
``dvc exp run -n NAME -S ... && dvc exp push R NAME``, to run anywhere (a cluster job
array); the report machine then runs ``grid pull FILE --remote R`` (``dvc exp pull``)
and ``grid report FILE``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

PSEUDO_DIMENSIONS = ("loss", "variant", "test_set")
METRICS = {
    "auc": "AUC", "accuracy": "accuracy (LFW protocol)", "eer": "EER", "tpr@fpr_1e-02": "TPR@FPR≤1e-2",
    "tpr@fpr_1e-03": "TPR@FPR≤1e-3", "fp": "false positives (LFW protocol, mean over runs)",
    "fn": "false negatives (LFW protocol, mean over runs)", "rank1": "rank-1 identification",
}


class GridError(ValueError):
    """A grid file that cannot be used, or a grid that cannot run; one line for the user."""


# --------------------------------------------------------------------------- grid file
@dataclass(frozen=True)
class Cell:
    """One experiment: its name, the label of each dimension, and its params overrides."""

    name: str
    labels: dict[str, str]
    overrides: dict[str, Any]


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

    def cells(self) -> list[Cell]:
        out = []
        labels = [list(values) for values in self.dimensions.values()]
        for combo in itertools.product(*labels):
            chosen = dict(zip(self.dimensions, combo))
            overrides = dict(self.fixed)
            for dim, label in chosen.items():
                overrides.update(self.dimensions[dim][label])
            out.append(Cell(_cell_name(self.name, chosen, overrides), chosen, overrides))
        return out


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell_name(grid: str, labels: dict[str, str], overrides: dict[str, Any]) -> str:
    """``<grid>-<label>-<label>-<hash>``: readable, a valid git ref name, unique per overrides."""
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
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
def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


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


def set_params(grid: Grid, cell: Cell, workspace: Path) -> list[str]:
    """``key=value`` overrides that turn the workspace's params.yaml into this cell's params
    (``+key=value`` for a key params.yaml does not have yet, as DVC's ``-S`` requires)."""
    current_tree = yaml.safe_load((workspace / "params.yaml").read_text())
    overrides: dict[str, Any] = {}
    if grid.base is not None:
        base_path = grid.base if grid.base.is_absolute() else workspace / grid.base
        if not base_path.is_file():
            raise GridError(f"{grid.path}: base {grid.base} not found")
        current = _flatten(current_tree)
        for key, value in _flatten(yaml.safe_load(base_path.read_text())).items():
            if current.get(key, object()) != value:
                overrides[key] = value
    overrides.update(cell.overrides)
    return [f"{'' if _exists(current_tree, key) else '+'}{key}={_value(value)}" for key, value in overrides.items()]


def cell_command(grid: Grid, cell: Cell, workspace: Path, *, queue: bool = False, remote: str | None = None) -> list[str]:
    args = ["dvc", "exp", "run"] + (["--queue"] if queue else []) + ["-n", cell.name]
    for item in set_params(grid, cell, workspace):
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


def _code_paths(repo) -> list[str]:
    """The git-tracked files and folders the stages depend on, with dvc.yaml and params.yaml:
    what decides an experiment's results besides its params overrides."""
    paths = {"dvc.yaml", "params.yaml"}
    for stage in repo.index.stages:
        for dep in stage.deps:
            path = str(getattr(dep, "def_path", ""))
            if path and not path.startswith(("data/", "reports/", "/", "..")) and "://" not in path:
                paths.add(path)
    return sorted(paths)


def _tree(workspace: Path, commit: str, paths: list[str]) -> tuple[str, ...]:
    def rev(path: str) -> str:
        out = subprocess.run(["git", "rev-parse", f"{commit}:{path}"], cwd=workspace, capture_output=True, text=True)
        return out.stdout.strip()

    return tuple(rev(p) for p in paths)


def finished_experiments(workspace: Path) -> dict[str, str]:
    """Name -> commit of the experiments that stand for the current commit (HEAD).

    An experiment counts when its baseline commit is HEAD, or another commit where every
    file the stages depend on (code listed in dvc.yaml's deps, ``dvc.yaml``, ``params.yaml``)
    is the same as at HEAD, so committing a report or a docs change does not make the cells
    run again, while a change to a stage's code does. HEAD's own experiment wins.
    """
    from dvc.repo import Repo

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True,
                          check=True).stdout.strip()
    with Repo(str(workspace)) as repo:
        by_baseline = repo.experiments.ls(all_commits=True)
        code = _code_paths(repo)
    wanted = _tree(workspace, head, code)
    out: dict[str, str] = {}
    for baseline in sorted(by_baseline, key=lambda b: b != head):  # HEAD first
        if baseline != head and _tree(workspace, baseline, code) != wanted:
            continue
        for name, sha in by_baseline[baseline]:
            if name and sha and name not in out:
                out[name] = sha
    return out


def queue_status(workspace: Path) -> dict[str, str]:
    """Name -> status (Queued, Running, Success, Failed) of the DVC queue's tasks."""
    out = _dvc(["queue", "status"], workspace, check=False).stdout
    status = {}
    for line in out.splitlines():
        m = re.match(r"^\S+\s+(\S+)\s+.*\b(Queued|Running|Success|Failed)\b", line.strip())
        if m:
            status[m.group(1)] = m.group(2)
    return status


@dataclass
class CellState:
    cell: Cell
    status: str          # done | ran | failed | missing
    rev: str | None = None
    error: str = ""


def run_grid(grid: Grid, workspace: Path, *, jobs: int = 1, poll: float = 5.0, echo=print) -> list[CellState]:
    """Queue the cells that have not run, run the queue with ``jobs`` workers, wait; returns each cell's state."""
    done = finished_experiments(workspace)
    cells = grid.cells()
    todo = [c for c in cells if c.name not in done]
    echo(f"grid {grid.name}: {len(cells)} cells, {len(cells) - len(todo)} already ran, {len(todo)} to run")
    for cell in todo:
        _dvc(cell_command(grid, cell, workspace, queue=True)[1:], workspace)
        echo(f"  queued {cell.name}")
    if todo:
        _dvc(["queue", "start", "-j", str(jobs)], workspace)
        names = {c.name for c in todo}
        started = time.perf_counter()
        while True:
            status = {n: s for n, s in queue_status(workspace).items() if n in names}
            active = [n for n, s in status.items() if s in ("Queued", "Running")]
            if not active:
                break
            echo(f"  {len(names) - len(active)}/{len(names)} cells finished, {time.perf_counter() - started:.0f} s")
            time.sleep(poll)
    return cell_states(grid, workspace, ran={c.name for c in todo})


def cell_states(grid: Grid, workspace: Path, ran: set[str] | None = None) -> list[CellState]:
    done = finished_experiments(workspace)
    status = queue_status(workspace)
    states = []
    for cell in grid.cells():
        if cell.name in done:
            states.append(CellState(cell, "ran" if ran and cell.name in ran else "done", done[cell.name]))
        elif status.get(cell.name) == "Failed":
            log = _dvc(["queue", "logs", cell.name], workspace, check=False).stdout.strip().splitlines()
            errors = [ln for ln in log if "ERROR" in ln or "error:" in ln]
            states.append(CellState(cell, "failed", error=(errors or log or ["(no log)"])[-1].strip()))
        else:
            states.append(CellState(cell, "missing"))
    return states


def cluster_commands(grid: Grid, workspace: Path, remote: str) -> list[str]:
    """One shell line per cell: run it anywhere, then push the experiment (git + DVC cache) to ``remote``."""
    return [f"{_shell(cell_command(grid, cell, workspace))} && dvc exp push {remote} {cell.name}"
            for cell in grid.cells()]


def pull(grid: Grid, workspace: Path, remote: str, echo=print) -> None:
    names = [c.name for c in grid.cells()]
    result = _dvc(["exp", "pull", remote, *names], workspace, check=False)
    if result.returncode != 0:
        echo((result.stderr or result.stdout).strip().splitlines()[-1] if (result.stderr or result.stdout).strip()
             else "dvc exp pull failed")
    else:
        echo(f"pulled {len(names)} experiment(s) from {remote}")


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
        return yaml.safe_load(self._git_show("params.yaml"))

    def _git_show(self, path: str) -> str:
        result = subprocess.run(["git", "show", f"{self.rev}:{path}"], cwd=self.workspace, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise GridError(f"{path} is not in experiment commit {self.rev[:8]}")
        return result.stdout

    def test_sets(self, run: str) -> list[str]:
        from dvc.api import DVCFileSystem

        from pipeline.config import RESERVED_SET_NAMES

        fs = DVCFileSystem(str(self.workspace), rev=self.rev)
        return sorted(Path(p).name for p in fs.ls(f"data/scores/{run}", detail=False)
                      if fs.isdir(p) and Path(p).name not in RESERVED_SET_NAMES)

    def scores(self, run: str, test_set: str, variant: str) -> pd.DataFrame:
        import io

        return pd.read_csv(io.StringIO(self._text(f"data/scores/{run}/{test_set}/{variant}.csv")),
                           dtype={"image_id1": str, "image_id2": str})

    def metrics(self, run: str) -> dict:
        try:
            return json.loads(self._git_show(f"reports/metrics/{run}.json"))
        except GridError:
            return {}

    def thresholds(self, run: str) -> dict:
        return json.loads(self._text(f"data/scores/{run}/thresholds.json"))


# ---------------------------------------------------------------------------- report
def build_report(grid: Grid, workspace: Path, out_root: Path, *, states: list[CellState] | None = None,
                 echo=print) -> Path:
    """Write ``out_root/<grid>/``: index.md, cells.csv, results.csv, verdicts.csv, pivot CSVs, figures
    (:func:`pipeline.grid_report.write_grid_report`; ``states``: the cells' states, read when not given)."""
    from pipeline.grid_report import write_grid_report

    return write_grid_report(grid, workspace, out_root, states=states or cell_states(grid, workspace), echo=echo)
