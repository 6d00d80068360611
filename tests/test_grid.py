"""Grids of experiments: the grid file, its cells, staleness, and real DVC experiments end to end.

The unit tests check the grid file (one-line errors, a table that shows every varied
dimension), cell names from resolved params, the dvc.lock comparison that decides whether an
experiment stands for HEAD, the error line taken from a failed cell's log and the working-copy
check. The end-to-end tests build one tiny project (the real dvc.yaml, one loss, one seed, one
epoch) and run grids through `python -m pipeline grid run` (DVC's own queue): the grid's numbers
against a recomputation by brute force from the per-pair score files, a rerun that runs nothing,
an edited and committed base block, an edited `set:` block, an uncommitted code change and an
experiment run on uncommitted code (rerun or refused, never reused), a failed cell (exit 1, its
own error line, not queued again), and cells run on two "machines" (clones with a shared bare git
remote and a local DVC remote) that meet in one report, with the remote checks on the way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.experiments import (error_line, expected_stages, lock_differences, parse_lock, source_deps,
                                  without_run_cache, working_copy_changes)
from pipeline.grid import GridError, _current_entries, _value, load_grid

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
    # a margin x colour grid laid out by margin alone would show one colour per margin
    ("table drops a dimension", {"vary": {"loss.margin": [0.2, 0.5], "input": {
        "colour": {"model.grayscale": False}, "gray": {"model.grayscale": True}}}}, "dimension 'input' varies"),
    ("no table at all", {"table": {}}, "dimension 'loss.margin' varies"),
]


@pytest.mark.parametrize("label,content,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_grid_files_give_one_line_naming_the_file(tmp_path, label, content, needle):
    path = _write_grid(tmp_path / "grid.yaml", **content)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and needle in str(err.value)


def test_a_dimension_with_one_value_need_not_be_shown(tmp_path):
    grid = load_grid(_write_grid(tmp_path / "grid.yaml", vary={"loss.margin": [0.2], "train.lr": [0.1, 0.2]},
                                 table={"rows": ["train.lr"]}))
    assert grid.rows == ["train.lr"]


PARAMS = {"loss": {"margin": 0.5}, "model": {"grayscale": False}, "train": {"lr": 0.1},
          "train_losses": ["arcface"], "report": {"alpha": 0.05}}


def _params_dir(tmp_path: Path, params: dict) -> Path:
    folder = tmp_path / "ws"
    folder.mkdir(exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def test_cells_are_the_full_factorial_named_from_their_resolved_params(tmp_path):
    ws = _params_dir(tmp_path, PARAMS)
    vary = {"loss.margin": [0.2, 0.5], "input": {"colour": {"model.grayscale": False},
                                                   "gray": {"model.grayscale": True}}}
    table = {"rows": ["loss.margin"], "columns": ["input"]}
    path = _write_grid(tmp_path / "grid.yaml", set={"train_losses": ["cosface"]}, vary=vary, table=table)
    cells = load_grid(path).cells(ws)
    assert len(cells) == 4
    gray = {tuple(c.labels.values()): c for c in cells}[("0.2", "gray")]
    assert gray.overrides == {"train_losses": ["cosface"], "loss.margin": 0.2, "model.grayscale": True}
    # the resolved params are params.yaml with the overrides applied, as `dvc exp run -S` applies them
    assert gray.params == {**PARAMS, "loss": {"margin": 0.2}, "model": {"grayscale": True},
                           "train_losses": ["cosface"]}
    assert len({c.name for c in cells}) == 4 and all(c.name.startswith("g-margin") for c in cells)
    # adding a value keeps the names of the cells that exist
    vary["loss.margin"] = [0.2, 0.5, 0.8]
    grown = {c.name for c in load_grid(_write_grid(tmp_path / "grid.yaml", set={"train_losses": ["cosface"]},
                                                   vary=vary, table=table)).cells(ws)}
    assert {c.name for c in cells} < grown and len(grown) == 6
    # another set block, another base file, or another params.yaml: other params, other cells
    vary["loss.margin"] = [0.2, 0.5]
    other_set = load_grid(_write_grid(tmp_path / "grid.yaml", set={"train_losses": ["arcface"]}, vary=vary,
                                      table=table)).cells(ws)
    (ws / "base.yaml").write_text(yaml.safe_dump({"report": {"alpha": 0.01}}))
    with_base = load_grid(_write_grid(tmp_path / "grid.yaml", base="base.yaml", set={"train_losses": ["cosface"]},
                                      vary=vary, table=table)).cells(ws)
    assert {c.params["report"]["alpha"] for c in with_base} == {0.01}
    edited = _params_dir(tmp_path, {**PARAMS, "train": {"lr": 0.2}})
    edited_head = load_grid(_write_grid(tmp_path / "grid.yaml", set={"train_losses": ["cosface"]}, vary=vary,
                                        table=table)).cells(edited)
    names = [{c.name for c in group} for group in (cells, other_set, with_base, edited_head)]
    assert all(not (names[i] & names[j]) for i in range(4) for j in range(i + 1, 4))


def test_a_new_params_key_is_added_and_a_loss_column_is_required_for_several_losses(tmp_path):
    ws = _params_dir(tmp_path, PARAMS)
    grid = load_grid(_write_grid(tmp_path / "grid.yaml", set={"losses.combined": {"m1": 0.9, "m2": 0.4}}))
    cells = grid.cells(ws)
    assert {"+losses.combined.m1=0.9", "+losses.combined.m2=0.4"} <= set(cells[0].set_args)  # key by key
    assert cells[0].params["losses"] == {"combined": {"m1": 0.9, "m2": 0.4}}
    grid.check_table(cells)  # one loss per cell: the rows need no loss
    several = load_grid(_write_grid(tmp_path / "grid.yaml", set={"train_losses": ["arcface", "cosface"]}))
    with pytest.raises(GridError, match="dimension 'loss' is not shown"):
        several.check_table(several.cells(ws))
    shown = load_grid(_write_grid(tmp_path / "grid.yaml", set={"train_losses": ["arcface", "cosface"]},
                                  table={"rows": ["loss.margin", "loss"]}))
    shown.check_table(shown.cells(ws))


def test_values_in_dvc_set_param_syntax():
    assert _value(0.2) == "0.2" and _value(True) == "true" and _value(None) == "null"
    assert _value([0, 1, 2]) == "[0,1,2]" and _value("arcface") == "arcface"
    assert _value({"m1": 0.9, "m2": 0.4}) == "{m1:0.9,m2:0.4}"
    assert _value("a b") == "'a b'"


# ------------------------------------------------------------------ staleness
STAGES = {  # what HEAD's dvc.yaml resolves to for a cell, as experiments.expected_stages gives it
    "prepare": {"cmd": "python prep.py", "deps": ["src/prep.py"], "outs": ["data/prepared"],
                "params": {"params.yaml": ["prep"]}},
    "train": {"cmd": "python train.py", "deps": ["data/prepared", "src/models", "src/train.py"],
              "outs": ["data/model"], "params": {"params.yaml": ["train.lr"]}},
}
HEAD_HASHES = {"src/prep.py": "a" * 32, "src/models": "b" * 32 + ".dir", "src/train.py": "c" * 32}
CELL_PARAMS = {"prep": {"size": 64}, "train": {"lr": 0.1, "epochs": 2}}


def _lock(**changes) -> dict:
    lock = {"stages": {
        "prepare": {"cmd": "python prep.py", "deps": [{"path": "src/prep.py", "md5": "a" * 32}],
                    "params": {"params.yaml": {"prep": {"size": 64}}}, "outs": [{"path": "data/prepared", "md5": "x"}]},
        "train": {"cmd": "python train.py", "deps": [{"path": "data/prepared", "md5": "x"},
                                                     {"path": "src/models", "md5": "b" * 32 + ".dir"},
                                                     {"path": "src/train.py", "md5": "c" * 32}],
                  "params": {"params.yaml": {"train.lr": 0.1}}, "outs": [{"path": "data/model", "md5": "y"}]},
        # an entry of a stage HEAD no longer has (DVC keeps them in dvc.lock): ignored
        "old_stage": {"cmd": "python old.py", "deps": [{"path": "src/old.py", "md5": "0" * 32}]}}}
    for dotted, value in changes.items():
        node = lock["stages"]
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
    return lock


def _differences(lock, params=CELL_PARAMS, hashes=HEAD_HASHES):
    return lock_differences(lock, STAGES, params, hashes, lambda file: None)


def test_an_experiment_stands_only_for_the_code_and_params_it_ran_on():
    assert _differences(_lock()) == []
    # code run without a commit, or changed since: its hash in the lock is not HEAD's
    assert _differences(_lock(train__deps__2__md5="d" * 32)) == ["src/train.py"]
    assert _differences(_lock(), hashes={**HEAD_HASHES, "src/models": "e" * 32 + ".dir"}) == ["src/models"]
    # a dependency other stages write is not compared (it follows from the stages before it)
    assert _differences(_lock(train__deps__0__md5="z")) == []
    # the cell's resolved params (an edited base file or set block) differ from what the experiment ran with
    assert _differences(_lock(), params={**CELL_PARAMS, "train": {"lr": 0.2, "epochs": 2}}) == ["param train.lr"]
    assert _differences(_lock(), params={**CELL_PARAMS, "prep": {"size": 48}}) == ["param prep"]
    # a param the stage does not read changes nothing
    assert _differences(_lock(), params={**CELL_PARAMS, "train": {"lr": 0.1, "epochs": 9}}) == []
    # a stage missing from the lock, or run with another command or other dependencies
    lock = _lock()
    del lock["stages"]["train"]
    assert _differences(lock) == ["stage train"]
    assert _differences(_lock(train__cmd="python train.py --fast")) == ["stage train"]
    assert _differences(_lock(prepare__deps=[])) == ["stage prepare"]


def test_params_as_dvc_writes_them_in_a_lock_read_back_equal():
    """DVC writes 1e-06 without a dot; read as YAML 1.1 it would be a string and every cell stale."""
    from dvc.utils.serialize import dumps_yaml

    params = {**CELL_PARAMS, "train": {"lr": 1.0e-06, "epochs": 2}}
    lock = _lock(train__params={"params.yaml": {"train.lr": 1.0e-06}})
    text = dumps_yaml(lock)
    assert "1e-06" in text  # the form that tripped PyYAML
    assert _differences(parse_lock(text), params=params) == []
    assert parse_lock("a: 1e+20\nb: '1e-06'\nc: 10\nd: 1.5\n") == {"a": 1e20, "b": "1e-06", "c": 10, "d": 1.5}


def test_lock_entries_of_stages_dvc_yaml_no_longer_has_are_not_the_cells_outputs():
    """DVC keeps an earlier layout's entries in dvc.lock; their outputs are not looked for in the cache."""
    lock = _lock()
    lock["stages"]["score@softmax-0"] = {"cmd": "x", "outs": [{"path": "data/scores/softmax-0", "md5": "9" * 32}]}
    kept = _current_entries(lock, STAGES)
    assert set(kept["stages"]) == {"prepare", "train"} and "old_stage" in lock["stages"]


def test_expected_stages_follow_the_cells_params_and_name_the_stages_without_run_cache():
    dvc_yaml = {"stages": {
        "align": {"cmd": "python align.py", "deps": ["src/align.py"],
                  "outs": ["data/aligned", {"reports/sheet.png": {"cache": False}}],
                  "metrics": [{"reports/align.json": {"cache": False}}]},
        "detect": {"cmd": "python detect.py", "deps": ["src/detect.py"], "outs": ["data/detect"],
                   "metrics": [{"reports/detect.json": {"cache": False}}], "params": ["detect", {"other.yaml": None}]},
        "train": {"matrix": {"loss": "${losses}", "seed": "${seeds}"},
                  "cmd": "python train.py ${item.loss} ${item.seed}",
                  "deps": ["data/aligned", "src/train.py"], "outs": ["data/models/${item.loss}-${item.seed}"]}}}
    stages = expected_stages(dvc_yaml, {"losses": ["arcface", "cosface"], "seeds": [0], "detect": {"size": 1}})
    assert sorted(stages) == ["align", "detect", "train@arcface-0", "train@cosface-0"]
    assert stages["train@cosface-0"]["cmd"] == "python train.py cosface 0"
    assert stages["align"]["outs"] == ["data/aligned", "reports/align.json", "reports/sheet.png"]
    assert stages["detect"]["params"] == {"params.yaml": ["detect"], "other.yaml": None}
    assert source_deps(stages) == {"src/align.py", "src/detect.py", "src/train.py"}
    # DVC saves no run-cache for a stage with a plain uncached output; uncached metrics and plots are fine
    assert without_run_cache(stages) == ["align"]


def test_the_error_of_a_failed_cell_is_its_own_line_not_dvcs_wrapper():
    log = ("Reproducing experiment 'g-scale-1'\nStage 'data' didn't change, skipping\nRunning stage 'detect':\n"
           "> python -m pipeline detect --no-progress\n"
           "error: params.yaml: detect.scale_factor = -1.0: Input should be greater than 0.1\n"
           "ERROR: failed to reproduce 'detect': failed to run: python -m pipeline detect, exited with 2\n"
           "ERROR: failed to reproduce 'detect': failed to run: python -m pipeline detect, exited with 2\n\n")
    assert error_line(log) == "error: params.yaml: detect.scale_factor = -1.0: Input should be greater than 0.1"
    traceback = ("Running stage 'train@arcface-0':\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "ValueError: loss is NaN at epoch 1\nERROR: failed to reproduce 'train@arcface-0': exited with 1\n")
    assert error_line(traceback) == "ValueError: loss is NaN at epoch 1"
    assert error_line("Running stage 'x':\nKilled\nERROR: failed to reproduce 'x': exited with 137\n") == "Killed"


def test_working_copy_changes_name_what_a_queued_cell_would_carry(tmp_path):
    def run(*args):
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)

    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.org")
    run("git", "config", "user.name", "t")
    for name in ("src/train.py", "README.md", "reports/experiments/g/index.md", "configs/grids/g.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "c")
    allowed = ["reports/experiments", "configs/grids"]
    assert working_copy_changes(tmp_path, {"src"}, allowed) == []
    for name in ("src/train.py", "reports/experiments/g/index.md", "configs/grids/g.yaml"):
        (tmp_path / name).write_text("y\n")
    (tmp_path / "src" / "new.py").write_text("z\n")
    (tmp_path / "scratch.txt").write_text("untracked, outside the code\n")
    assert sorted(working_copy_changes(tmp_path, {"src"}, allowed)) == ["src/new.py", "src/train.py"]


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
    "score": {"threshold": {"min_pairs": 4}},  # the tiny sets' pairs are few
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


def _grid(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "pipeline", "grid", *args], project, check=check)


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
    shutil.copy(ROOT / "configs" / "dvc-defaults.yaml", where / "configs" / "dvc-defaults.yaml")
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                 ["git", "config", "user.name", "t"], ["dvc", "init", "-q"]):
        _run(args, where)
    shutil.copy(ROOT / ".dvcignore", where / ".dvcignore")  # bytecode is no stage dependency
    for args in (["dvc", "repro"], ["git", "add", "-A"], ["git", "commit", "-qm", "base run"]):
        _run(args, where)
    return where


def _grid_file(project: Path, name: str, vary: dict, **content) -> Path:
    path = project / "configs" / "grids" / f"{name}.yaml"
    table = content.pop("table", {"rows": list(vary)})
    path.write_text(yaml.safe_dump({"name": name, "description": "test grid", **content, "vary": vary,
                                    "table": table}, sort_keys=False))
    return path.relative_to(project)


def _commit(project: Path, message: str) -> None:
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", message], project)


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


def _brute_force(scores: pd.DataFrame) -> dict[str, float]:
    """AUC over every (same, different) pair of pairs, and the LFW protocol written out: per held-out
    fold, the threshold among +inf, the midpoints of the other folds' distinct scores and -inf with the
    most correct other-fold pairs (the smallest on ties), 'same' iff score > threshold."""
    scores = scores[scores["status"] == "scored"]
    s, y, folds = scores["score"].to_numpy(float), scores["same"].to_numpy(int), scores["fold"].to_numpy()
    pos, neg = s[y == 1], s[y == 0]
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    accuracies, fp, fn = [], 0, 0
    for fold in sorted(set(folds)):
        train, test = folds != fold, folds == fold
        distinct = sorted(set(s[train]))
        candidates = [np.inf] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [-np.inf]
        best = min(candidates, key=lambda t: (-((s[train] > t) == (y[train] == 1)).sum(), t))
        predicted = s[test] > best
        accuracies.append(float((predicted == (y[test] == 1)).mean()))
        fp += int((predicted & (y[test] == 0)).sum())
        fn += int((~predicted & (y[test] == 1)).sum())
    return {"auc": auc, "accuracy": float(np.mean(accuracies)), "fp": fp, "fn": fn}


def test_grid_runs_each_cell_once_and_its_numbers_match_a_recomputation(project):
    import dvc.api

    grid = _grid_file(project, "margins", {"loss.margin": [0.5, 0.2]}, plot={"x": "loss.margin"},
                      table={"rows": ["loss.margin"], "metrics": ["auc", "accuracy", "fp"]})
    first = _grid(project, "run", str(grid), "-j", "1")
    assert len(_queued(first.stdout)) == 2
    assert "2/2 cells finished, 0 running, 0 failed, 0 queued" in first.stdout  # progress as cells finish
    assert sum(": finished" in line for line in first.stdout.splitlines()) == 2
    out = project / "reports" / "experiments" / "margins"
    results, cells = pd.read_csv(out / "results.csv"), pd.read_csv(out / "cells.csv")
    assert set(cells["status"]) == {"ran"}
    # plumbing: the grid reads the same numbers the experiment's own report wrote
    metrics = _exp_metrics(project)
    for row in results.itertuples():
        own = metrics[row.cell][row.test_set]["arcface"]
        assert row.auc == pytest.approx(own["auc"], abs=1e-6)  # summary.json rounds to 6 places
        assert (row.auc_low, row.auc_high) == pytest.approx((own["auc_low"], own["auc_high"]), abs=1e-6)
    # independent: every number recomputed by brute force from the experiment's per-pair score file
    for row in results.itertuples():
        text = dvc.api.read(f"data/scores/{row.test_set}/arcface-0/{row.variant}.csv", repo=str(project),
                            rev=row.experiment_rev)
        import io

        expected = _brute_force(pd.read_csv(io.StringIO(text)))
        assert row.auc == pytest.approx(expected["auc"], abs=1e-12)
        assert row.accuracy == pytest.approx(expected["accuracy"], abs=1e-12)
        assert (row.fp, row.fn) == (expected["fp"], expected["fn"])
    aucs = results[results["test_set"] == "synth_open"].set_index("loss.margin")["auc"]
    assert aucs.nunique() == 2  # the two margins trained different models

    again = _grid(project, "run", str(grid))
    assert _queued(again.stdout) == [] and "2 already ran, 0 to run" in again.stdout

    grid = _grid_file(project, "margins", {"loss.margin": [0.5, 0.2, 0.6]}, plot={"x": "loss.margin"},
                      table={"rows": ["loss.margin"], "metrics": ["auc", "accuracy", "fp"]})
    grown = _grid(project, "run", str(grid))
    assert len(_queued(grown.stdout)) == 1 and "margin0.6" in _queued(grown.stdout)[0]
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["loss.margin"].unique()) == [0.2, 0.5, 0.6]


def test_edited_base_set_block_and_code_rerun_the_cells_never_reuse_them(project):
    """Each step changes only report inputs, so a rerun restores every other stage and costs one report."""
    base = project / "configs" / "grids" / "base-alpha.yaml"
    base.write_text(yaml.safe_dump({"report": {"alpha": 0.05}}))
    grid = _grid_file(project, "stale", {"report.bootstrap": [100]}, base="configs/grids/base-alpha.yaml",
                      table={"rows": ["loss"]})
    _commit(project, "stale grid")
    first = _grid(project, "run", str(grid))
    [cell] = _queued(first.stdout)

    # an edited and committed base block: a new cell, run
    base.write_text(yaml.safe_dump({"report": {"alpha": 0.1}}))
    _commit(project, "base alpha 0.1")
    edited = _grid(project, "run", str(grid))
    [new_cell] = _queued(edited.stdout)
    assert new_cell != cell
    rev = pd.read_csv(project / "reports" / "experiments" / "stale" / "cells.csv")["experiment_rev"].item()
    ran_with = yaml.safe_load(_run(["git", "show", f"{rev}:params.yaml"], project).stdout)
    assert ran_with["report"]["alpha"] == 0.1  # the reported experiment ran with the edited base

    # an edited set block: a new cell, run
    grid = _grid_file(project, "stale", {"report.bootstrap": [100]}, base="configs/grids/base-alpha.yaml",
                      set={"report.alpha": 0.2}, table={"rows": ["loss"]})
    with_set = _grid(project, "run", str(grid))
    [set_cell] = _queued(with_set.stdout)
    assert set_cell not in (cell, new_cell)

    # an uncommitted code change: refused, naming the file; nothing queued
    repeats_py = project / "pipeline" / "repeats.py"
    committed = repeats_py.read_text()
    repeats_py.write_text(committed + "# an edit\n")
    refused = _grid(project, "run", str(grid), check=False)
    assert refused.returncode == 2 and "pipeline/repeats.py" in refused.stderr and _queued(refused.stdout) == []
    assert len(refused.stderr.strip().splitlines()) == 1

    # an experiment that ran on that uncommitted code (as `dvc exp run --queue` captures it): stale, so
    # the report does not count it, and `grid run` runs the cell again on HEAD's code
    grid = _grid_file(project, "stale", {"report.bootstrap": [101]}, base="configs/grids/base-alpha.yaml",
                      set={"report.alpha": 0.2}, table={"rows": ["loss"]})
    [dirty_cell] = load_grid(project / grid).cells(project)
    _run(["dvc", "exp", "run", "--temp", "-n", dirty_cell.name, *[a for s in dirty_cell.set_args for a in ("-S", s)]],
         project)
    repeats_py.write_text(committed)
    report = _grid(project, "report", str(grid), check=False)
    assert report.returncode == 2 and "no cell has finished" in report.stderr
    rerun = _grid(project, "run", str(grid))
    assert _queued(rerun.stdout) == [dirty_cell.name]
    assert "is stale (pipeline/repeats.py differs" in rerun.stdout
    assert f"kept as {dirty_cell.name}-stale-" in rerun.stdout
    cells = pd.read_csv(project / "reports" / "experiments" / "stale" / "cells.csv")
    assert cells["status"].tolist() == ["ran"]

    # a committed code change: the cell's experiment no longer stands for HEAD
    repeats_py.write_text(committed + "# a committed edit\n")
    _commit(project, "edit repeats.py")
    after = _grid(project, "run", str(grid))
    assert _queued(after.stdout) == [dirty_cell.name] and "pipeline/repeats.py differs" in after.stdout
    repeats_py.write_text(committed)
    _commit(project, "undo the edit of repeats.py")


def _failed_tasks(project: Path, name: str) -> int:
    status = _run(["dvc", "queue", "status"], project).stdout
    return sum(1 for line in status.splitlines() if name in line and "Failed" in line)


def test_a_failed_cell_exits_non_zero_with_its_own_error_and_is_not_queued_again(project):
    grid = _grid_file(project, "failing", {"detect.scale_factor": [0.709, -1.0]})  # the base value, and one refused
    result = _grid(project, "run", str(grid), check=False)
    assert result.returncode == 1 and "1 of 2 cells failed" in result.stderr
    out = project / "reports" / "experiments" / "failing"
    cells = pd.read_csv(out / "cells.csv")
    status = dict(zip(cells["detect.scale_factor"].astype(float), cells["status"]))
    assert status == {0.709: "ran", -1.0: "failed"}
    error = cells.loc[cells["status"] == "failed", "error"].item()
    assert error.startswith("error: params.yaml: detect.scale_factor = -1.0") and "failed to reproduce" not in error
    assert set(pd.read_csv(out / "results.csv")["detect.scale_factor"].astype(float)) == {0.709}
    assert "1 failed" in (out / "index.md").read_text()
    failed_name = cells.loc[cells["status"] == "failed", "cell"].item()

    again = _grid(project, "run", str(grid), check=False)
    assert again.returncode == 1 and _queued(again.stdout) == [] and "--retry-failed" in again.stdout + again.stderr
    assert error in again.stdout
    assert _failed_tasks(project, failed_name) == 1

    retried = _grid(project, "run", str(grid), "--retry-failed", check=False)
    assert retried.returncode == 1 and _queued(retried.stdout) == [failed_name]
    assert _failed_tasks(project, failed_name) == 1  # the old task was removed, not piled up


def test_cells_run_on_two_machines_and_meet_in_one_report(project, tmp_path):
    """A bare git repo and a local DVC remote stand in for the shared ones; two clones for two machines."""
    grid = _grid_file(project, "spread", {"loss.margin": [0.5, 0.7]})
    remote_git, remote_dvc = tmp_path / "shared.git", tmp_path / "shared-dvc"
    _run(["git", "init", "-q", "--bare", str(remote_git)], tmp_path)
    _run(["git", "remote", "add", "origin", str(remote_git)], project)
    no_remote = _grid(project, "commands", str(grid), "--remote", "origin", check=False)
    assert no_remote.returncode == 2 and "dvc remote add" in no_remote.stderr
    assert len(no_remote.stderr.strip().splitlines()) == 1 and no_remote.stdout == ""

    _run(["dvc", "remote", "add", "-d", "shared", str(remote_dvc)], project)
    _commit(project, "shared remote, spread grid")
    _run(["git", "push", "-q", "origin", "HEAD:main"], project)
    _run(["dvc", "push", "-q"], project)  # the base run's outputs, so the machines restore them instead of rerunning
    lines = _grid(project, "commands", str(grid), "--remote", "origin").stdout
    commands = [ln for ln in lines.splitlines() if ln.startswith("dvc exp run")]
    assert len(commands) == 2
    assert all("dvc exp run --temp " in c and "&& dvc exp push -r shared origin" in c for c in commands)
    for k, command in enumerate(commands):  # each "machine" runs one cell, as a job array would
        machine = tmp_path / f"machine{k}"
        _run(["git", "clone", "-q", "-b", "main", str(remote_git), str(machine)], tmp_path)
        _run(["git", "config", "user.email", "t@example.org"], machine)
        _run(["git", "config", "user.name", "t"], machine)
        _run(["dvc", "pull", "-q"], machine)
        _run(["bash", "-c", command], machine)
        assert _run(["git", "status", "--porcelain"], machine).stdout == ""  # the working copy stays clean
    reporter = tmp_path / "reporter"
    _run(["git", "clone", "-q", "-b", "main", str(remote_git), str(reporter)], tmp_path)
    # the experiments' git refs without their data: the report names the cell and how to fetch it
    _run(["git", "fetch", "-q", "origin", "refs/exps/*:refs/exps/*"], reporter)
    missing = _grid(reporter, "report", str(grid), check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "spread-margin" in missing.stderr and "grid pull" in missing.stderr
    pulled = _grid(reporter, "pull", str(grid), "--remote", "origin")
    assert "pulled 2 of 2" in pulled.stdout
    _grid(reporter, "report", str(grid))
    results = pd.read_csv(reporter / "reports" / "experiments" / "spread" / "results.csv")
    assert sorted(results["loss.margin"].unique()) == [0.5, 0.7]
