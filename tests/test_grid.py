"""Grids of experiments: the grid file, its cells, and real DVC experiments end to end.

The end-to-end tests build one tiny project (the real dvc.yaml, one loss, one seed, one
epoch), run a grid through `python -m pipeline grid run` (DVC's own queue), and check
that every number in the grid report equals what the experiment itself computed, that
rerunning runs nothing, that a new value runs only its cells, that a failing cell is
reported while the others still are, and that cells run on two "machines" (clones with
a shared bare git remote and a local DVC remote) come together in one report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.grid import Cell, GridError, _value, load_grid

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _write_grid(path: Path, **content) -> Path:
    base = {"name": "g", "vary": {"loss.margin": [0.2, 0.5]}, "table": {"rows": ["loss.margin"]}}
    base.update(content)
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


# ------------------------------------------------------------------- grid file
BAD = [
    ("no vary", {"vary": {}}, "vary"),
    ("empty values", {"vary": {"loss.margin": []}}, "vary.loss.margin"),
    ("pseudo dimension varied", {"vary": {"loss": [1, 2]}}, "built-in"),
    ("unknown row", {"table": {"rows": ["margin"]}}, "'margin' is not a dimension"),
    ("unknown metric", {"table": {"metrics": ["f1"]}}, "table.metrics"),
    ("plot x not varied", {"plot": {"x": "train.lr"}}, "plot.x"),
    ("roc of a missing cell", {"roc": [{"loss.margin": 0.9}]}, "roc"),
    ("unknown key", {"colums": ["x"]}, "unknown key"),
    ("bad name", {"name": "a b"}, "name"),
]


@pytest.mark.parametrize("label,content,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_grid_files_give_one_line_naming_the_file(tmp_path, label, content, needle):
    path = _write_grid(tmp_path / "grid.yaml", **content)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and needle in str(err.value)


def test_cells_are_the_full_factorial_with_stable_names(tmp_path):
    path = _write_grid(tmp_path / "grid.yaml", set={"train_losses": ["arcface"]}, vary={
        "loss.margin": [0.2, 0.5], "input": {"colour": {"model.grayscale": False}, "gray": {"model.grayscale": True}}})
    cells = load_grid(path).cells()
    assert len(cells) == 4
    by_labels = {tuple(c.labels.values()): c for c in cells}
    gray = by_labels[("0.2", "gray")]
    assert gray.overrides == {"train_losses": ["arcface"], "loss.margin": 0.2, "model.grayscale": True}
    assert len({c.name for c in cells}) == 4 and all(c.name.startswith("g-margin") for c in cells)
    # adding a value keeps the names of the cells that exist
    path = _write_grid(tmp_path / "grid.yaml", set={"train_losses": ["arcface"]}, vary={
        "loss.margin": [0.2, 0.5, 0.8], "input": {"colour": {"model.grayscale": False}, "gray": {"model.grayscale": True}}})
    grown = {c.name for c in load_grid(path).cells()}
    assert {c.name for c in cells} < grown and len(grown) == 6
    # the same labels with other overrides are another cell
    path = _write_grid(tmp_path / "grid.yaml", set={"train_losses": ["cosface"]}, vary={
        "loss.margin": [0.2, 0.5], "input": {"colour": {"model.grayscale": False}, "gray": {"model.grayscale": True}}})
    assert not {c.name for c in cells} & {c.name for c in load_grid(path).cells()}


def test_values_in_dvc_set_param_syntax():
    assert _value(0.2) == "0.2" and _value(True) == "true" and _value(None) == "null"
    assert _value([0, 1, 2]) == "[0,1,2]" and _value("arcface") == "arcface"
    assert _value({"m1": 0.9, "m2": 0.4}) == "{m1:0.9,m2:0.4}"
    assert _value("a b") == "'a b'"


# ------------------------------------------------------------------ end to end
TINY = {
    "data": {"synthetic": {"train_identities": 8, "train_images_per_identity": 5, "closed_images_per_identity": 2,
                           "open_identities": 6, "domain_identities": 6, "test_images_per_identity": 3,
                           "image_size": 96, "folds": 2, "pairs_per_fold": 8}},
    "detect": {"batch_size": 16},
    "align": {"contact_sheet": 4},
    "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "pk_identities": 3, "pk_images": 2},
    "model": {"embedding_size": 16},
    "report": {"bootstrap": 100},
    "seeds": {"data": 0, "train": [0]},
    "train_losses": ["arcface"],
}


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                PYTHONUNBUFFERED="1", FACEPIPE_THREADS="1")


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A committed tiny project whose default pipeline has run (the grids' base)."""
    where = tmp_path_factory.mktemp("gridproject")
    shutil.copytree(ROOT / "pipeline", where / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", where / "dvc.yaml")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (where / ".gitignore").write_text("/data/\n__pycache__/\n")
    (where / "configs" / "grids").mkdir(parents=True)
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                 ["git", "config", "user.name", "t"], ["dvc", "init", "-q"], ["dvc", "repro"],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "base run"]):
        _run(args, where)
    return where


def _grid_file(project: Path, margins: list, name: str = "margins") -> Path:
    path = project / "configs" / "grids" / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "description": "test grid", "vary": {"loss.margin": margins},
        "table": {"rows": ["loss.margin"], "metrics": ["auc", "accuracy", "fp"]}, "plot": {"x": "loss.margin"},
    }, sort_keys=False))
    return path


def _exp_metrics(project: Path) -> dict[str, dict]:
    """Each experiment's own reports/summary.json, as `dvc exp show` reads it."""
    rows = json.loads(_run(["dvc", "exp", "show", "--json", "-A"], project).stdout)
    out = {}
    for commit in rows:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name = rev.get("name")
                data = (rev.get("data") or {}).get("metrics", {}).get("reports/summary.json", {}).get("data")
                if name and data:
                    out[name] = data
    return out


def _queued(output: str) -> list[str]:
    return [line.split()[-1] for line in output.splitlines() if line.strip().startswith("queued ")]


def test_grid_runs_each_cell_once_and_reports_the_experiments_numbers(project):
    grid = _grid_file(project, [0.5, 0.2])  # 0.5 is the base params' margin: that cell restores everything from the cache
    first = _run([sys.executable, "-m", "pipeline", "grid", "run", str(grid.relative_to(project)), "-j", "1"], project)
    assert len(_queued(first.stdout)) == 2
    results = pd.read_csv(project / "reports" / "experiments" / "margins" / "results.csv")
    cells = pd.read_csv(project / "reports" / "experiments" / "margins" / "cells.csv")
    assert set(cells["status"]) == {"ran"}
    metrics = _exp_metrics(project)
    for row in results.itertuples():
        own = metrics[row.cell][row.test_set]["arcface"]
        assert row.auc == pytest.approx(own["auc"], abs=1e-6)  # summary.json rounds to 6 places
        assert row.accuracy == pytest.approx(own["accuracy"], abs=1e-6)
        assert (row.auc_low, row.auc_high) == pytest.approx((own["auc_low"], own["auc_high"]), abs=1e-6)
    # the two margins trained different models
    aucs = results[results["test_set"] == "synth_open"].set_index("loss.margin")["auc"]
    assert aucs.nunique() == 2

    again = _run([sys.executable, "-m", "pipeline", "grid", "run", str(grid.relative_to(project))], project)
    assert _queued(again.stdout) == [] and "2 already ran, 0 to run" in again.stdout

    grid = _grid_file(project, [0.5, 0.2, 0.6])
    grown = _run([sys.executable, "-m", "pipeline", "grid", "run", str(grid.relative_to(project))], project)
    assert len(_queued(grown.stdout)) == 1 and "margin0.6" in _queued(grown.stdout)[0]
    results = pd.read_csv(project / "reports" / "experiments" / "margins" / "results.csv")
    assert sorted(results["loss.margin"].unique()) == [0.2, 0.5, 0.6]


def test_a_failed_cell_is_reported_and_the_others_still_are(project):
    path = project / "configs" / "grids" / "failing.yaml"
    path.write_text(yaml.safe_dump({
        "name": "failing", "vary": {"train.lr": [0.1, 1.0e30]},  # the base lr, and one that diverges (NaN loss)
        "table": {"rows": ["train.lr"]},
    }))
    result = _run([sys.executable, "-m", "pipeline", "grid", "run", "configs/grids/failing.yaml"], project)
    cells = pd.read_csv(project / "reports" / "experiments" / "failing" / "cells.csv")
    status = dict(zip(cells["train.lr"].astype(float), cells["status"]))
    assert status == {0.1: "ran", 1e30: "failed"}
    error = cells.loc[cells["status"] == "failed", "error"].item()
    assert "failed" in error.lower() or "nan" in error.lower() or "error" in error.lower()
    assert "failed" in result.stderr
    results = pd.read_csv(project / "reports" / "experiments" / "failing" / "results.csv")
    assert set(results["train.lr"].astype(float)) == {0.1}
    index = (project / "reports" / "experiments" / "failing" / "index.md").read_text()
    assert "1 failed" in index


def test_cells_run_on_two_machines_and_meet_in_one_report(project, tmp_path):
    """A bare git repo and a local DVC remote stand in for the shared ones; two clones for two machines."""
    remote_git, remote_dvc = tmp_path / "shared.git", tmp_path / "shared-dvc"
    _run(["git", "init", "-q", "--bare", str(remote_git)], tmp_path)
    _run(["dvc", "remote", "add", "-d", "shared", str(remote_dvc)], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "shared remote"], project)
    _run(["git", "remote", "add", "origin", str(remote_git)], project)
    _run(["git", "push", "-q", "origin", "HEAD:main"], project)
    _run(["dvc", "push", "-q"], project)  # the base run's outputs, so the machines restore them instead of rerunning
    grid = _grid_file(project, [0.5, 0.7], name="spread")
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "grid"], project)
    _run(["git", "push", "-q", "origin", "HEAD:main"], project)
    lines = _run([sys.executable, "-m", "pipeline", "grid", "commands", str(grid.relative_to(project))], project).stdout
    commands = [ln for ln in lines.splitlines() if ln.startswith("dvc exp run")]
    assert len(commands) == 2 and all("&& dvc exp push origin" in c for c in commands)
    for k, command in enumerate(commands):  # each "machine" runs one cell, as a job array would
        machine = tmp_path / f"machine{k}"
        _run(["git", "clone", "-q", "-b", "main", str(remote_git), str(machine)], tmp_path)
        _run(["git", "config", "user.email", "t@example.org"], machine)
        _run(["git", "config", "user.name", "t"], machine)
        _run(["dvc", "pull", "-q"], machine)
        _run(["bash", "-c", command], machine)
    reporter = tmp_path / "reporter"
    _run(["git", "clone", "-q", "-b", "main", str(remote_git), str(reporter)], tmp_path)
    pulled = _run([sys.executable, "-m", "pipeline", "grid", "pull", "configs/grids/spread.yaml", "--remote", "origin"],
                  reporter)
    assert "pulled 2" in pulled.stdout
    _run([sys.executable, "-m", "pipeline", "grid", "report", "configs/grids/spread.yaml"], reporter)
    results = pd.read_csv(reporter / "reports" / "experiments" / "spread" / "results.csv")
    assert sorted(results["loss.margin"].unique()) == [0.5, 0.7]
