"""End to end: the real dvc.yaml on a tiny synthetic config, in a fresh git+DVC project.

Checks what a user relies on: `dvc repro` builds the report; a second `dvc repro`
runs nothing; a run killed (SIGKILL) inside every stage in turn and restarted ends
with the same report as the clean run; changing the ArcFace margin reruns only
ArcFace's stages and the report; changing a scoring switch reruns only scoring and
the report.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "data": {
        "synthetic": {
            "train_identities": 8, "train_images_per_identity": 6, "closed_images_per_identity": 2,
            "open_identities": 6, "domain_identities": 6, "test_images_per_identity": 3,
            "image_size": 128, "folds": 2, "pairs_per_fold": 8,
        }
    },
    "detect": {"batch_size": 16},
    "align": {"contact_sheet": 16},
    "train": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0, "pk_identities": 4, "pk_images": 2},
    "model": {"embedding_size": 32},
    "score": {"bootstrap": 20},
    "train_losses": {"softmax": "losses.softmax", "arcface": "loss"},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "train_losses" else value
    return out


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(os.cpu_count() or 1))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_param(project: Path, dotted: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    node = params
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _new_project(where: Path, params: dict) -> Path:
    shutil.copytree(ROOT / "pipeline", where / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", where / "dvc.yaml")
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], where)
    _run(["dvc", "init", "-q"], where)
    return where


def _repro_killed_in(project: Path, stage: str, delay: float) -> bool:
    """Start `dvc repro`, SIGKILL it (and its stage process) `delay` s into `stage`.

    Returns False when the run finished before reaching the stage (nothing left to kill).
    """
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if f"Running stage '{stage}'" in line:
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True
        proc.wait(timeout=60)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    project = _new_project(tmp_path_factory.mktemp("facepipe"), params)
    first = _run(["dvc", "repro"], project)
    (project / "first_run.log").write_text(first.stdout)
    return project


def test_repro_builds_the_report(project):
    log = (project / "first_run.log").read_text()
    assert {"data", "detect", "align", "shard", "train@softmax", "train@arcface", "score@arcface", "report"} <= _ran(log)
    table = pd.read_csv(project / "reports" / "comparison.csv")
    assert set(table["loss"]) == {"softmax", "arcface"}
    assert set(table["test_set"]) == {"synth_open", "synth_closed", "synth_domain"}
    assert set(table["variant"]) == {"cosine_norm", "cosine_raw", "l2_norm", "l2_raw"}
    assert table["auc"].between(0, 1).all()
    index = (project / "reports" / "index.md").read_text()
    assert "## Readings" in index and "synth_domain" in index
    detection = json.loads((project / "reports" / "detection.json").read_text())
    assert detection["train"]["images"] == 8 * 6
    figures = list((project / "reports" / "figures" / "roc").rglob("*.png"))
    assert {f.name for f in figures} >= {"smallcnn_cosine_norm.png", "smallcnn_l2_raw.png"}
    metrics = json.loads((project / "reports" / "metrics" / "arcface.json").read_text())
    assert metrics["synth_open"]["cosine_norm"]["auc"] == pytest.approx(
        table.query("loss == 'arcface' and test_set == 'synth_open' and variant == 'cosine_norm'")["auc"].item()
    )


def test_second_repro_runs_nothing(project):
    status = _run(["dvc", "status"], project)
    assert "up to date" in status.stdout
    again = _run(["dvc", "repro"], project)
    assert _ran(again.stdout) == set()


def test_dvc_plots_and_metrics_load_without_errors(project):
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], project).stdout)
    assert not shown.get("errors"), shown.get("errors")
    names = set(shown["data"])
    assert {"reports/roc/arcface/synth_open.csv", "reports/roc/softmax/synth_domain.csv",
            "reports/train/arcface/history.csv"} <= names
    roc = shown["data"]["reports/roc/arcface/synth_open.csv"][0]["content"]
    assert {"fpr", "tpr"} <= set(roc["data"]["values"][0])
    assert "fpr" in json.dumps(roc["encoding"]["x"]) and "tpr" in json.dumps(roc["encoding"]["y"])
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert "reports/metrics/arcface.json" in json.dumps(metrics)


def test_killed_anywhere_then_rerun_gives_the_clean_report(project, tmp_path):
    """SIGKILL `dvc repro` at a random point inside each stage in turn, restart, compare."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    crashed = _new_project(tmp_path / "crashed", params)
    stages = ["data", "detect", "align", "shard", "train@softmax", "embed@softmax", "score@softmax",
              "train@arcface", "embed@arcface", "score@arcface", "report"]
    rng = random.Random(7)
    killed = [stage for stage in stages if _repro_killed_in(crashed, stage, rng.uniform(0.0, 2.5))]
    assert len(killed) >= 6, f"only killed inside {killed}"
    _run(["dvc", "repro"], crashed)
    assert "up to date" in _run(["dvc", "status"], crashed).stdout
    clean_table = pd.read_csv(project / "reports" / "comparison.csv")
    crashed_table = pd.read_csv(crashed / "reports" / "comparison.csv")
    pd.testing.assert_frame_equal(crashed_table, clean_table)
    for loss in ("softmax", "arcface"):
        name = f"reports/metrics/{loss}.json"
        assert json.loads((crashed / name).read_text()) == json.loads((project / name).read_text())
    # no temporary leftovers anywhere in the outputs
    leftovers = [p for p in (crashed / "data").rglob("*") if ".tmp" in p.name]
    leftovers += [p for p in (crashed / "reports").rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_margin_change_reruns_only_arcface(project):
    _set_param(project, "loss.margin", 0.8)
    result = _run(["dvc", "repro"], project)
    assert _ran(result.stdout) == {"train@arcface", "embed@arcface", "score@arcface", "report"}


def test_scoring_switch_reruns_only_scoring(project):
    _set_param(project, "score.bootstrap", 10)
    result = _run(["dvc", "repro"], project)
    assert _ran(result.stdout) == {"score@arcface", "score@softmax", "report"}
    assert "up to date" in _run(["dvc", "status"], project).stdout
