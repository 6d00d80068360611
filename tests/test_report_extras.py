"""Report additions: train-norm labels, the checkpoint-choice warning, N-way accuracy, angle figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import report
from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder with the default params (softmax, sphereface, ..., 3 seeds) as cwd."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seeds"]["train"] = [0, 1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return load_params(tmp_path / "params.yaml", check_paths=False, check_models=False)


def _write_json(path: str, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data))


def test_labels_say_when_a_loss_normalised_its_features_in_training(project):
    _write_json("data/recipes/softmax.json", {"loss_params": {"normalize": True, "scale": 64.0}})
    _write_json("data/recipes/sphereface.json", {"loss_params": {"normalize_features": False, "margin": 4}})
    _write_json("data/recipes/cosface.json", {"loss_params": {"normalize_features": True}})
    labels = report.model_labels(project)
    assert labels["softmax"] == "softmax (train-norm)" and labels["sphereface"] == "sphereface"
    assert labels["cosface"] == "cosface (train-norm)"
    assert labels["arcface"] == "arcface"  # no recipe file: the plain name


def test_warning_when_a_checkpoint_was_chosen_on_a_reported_test_set(project):
    reported = ["synth_closed", "synth_domain", "synth_open"]
    for run in ("softmax-0", "softmax-1", "arcface-0"):
        _write_json(f"reports/train/{run}/metrics.json", {"selected_on": "validation"})
    assert report.selection_warnings(project, reported) == []
    _write_json("reports/train/softmax-1/metrics.json", {"selected_on": "synth_closed"})
    lines = report.selection_warnings(project, reported)
    assert len([ln for ln in lines if ln]) == 1
    assert lines[0].startswith("> **Warning: checkpoint chosen on a test set.**")
    assert "softmax (softmax-1)" in lines[0] and "**synth_closed**" in lines[0] and "biased" in lines[0]
    assert report.selection_warnings(project, ["synth_open"]) == []  # a set the report does not show


def test_n_way_accuracy_is_the_mean_over_runs_and_a_dash_without_a_head(project):
    _write_json("reports/metrics/softmax-0/synth_closed.json", {"rank1": 0.9, "n_way_accuracy": 0.5})
    _write_json("reports/metrics/softmax-1/synth_closed.json", {"rank1": 0.8, "n_way_accuracy": 0.7})
    _write_json("reports/metrics/triplet-0/synth_closed.json", {"rank1": 0.6})
    _write_json("reports/metrics/triplet-1/synth_closed.json", {"rank1": 0.7})
    source = report.WorkspaceRuns(["synth_closed", "synth_open"])

    def n_way(runs, test_set):
        return report._n_way_interval([source.metrics(r).get(test_set, {}).get("n_way_accuracy") for r in runs],
                                      alpha=0.05)

    iv = n_way(["softmax-0", "softmax-1"], "synth_closed")
    assert iv.mean == pytest.approx(0.6) and iv.per_run == (0.5, 0.7)
    assert n_way(["triplet-0", "triplet-1"], "synth_closed") is None
    assert n_way(["softmax-0", "triplet-0"], "synth_closed") is None  # not every run
    assert n_way(["softmax-0"], "synth_open") is None

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    table = report.Table("synth_closed", "cosine_norm",
                         {m: rng.normal(size=(2, 100)) + labels for m in ("softmax", "triplet")},
                         labels, np.tile([1, 2], 50), 100, 0)
    stats = {m: report.model_stats(table, m, [f"{m}-0", f"{m}-1"], alpha=0.05, n_boot=100, seed=0,
                                   run_metrics=[source.metrics(f"{m}-{k}") for k in (0, 1)])
             for m in ("softmax", "triplet")}
    stats["softmax"].label = "softmax (train-norm)"
    lines = report.stats_markdown(stats).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    column = header.index("N-way (head)")
    assert header[column - 1] == "rank-1"  # next to rank-1
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[2:]}
    assert rows["softmax (train-norm) (2 runs)"][column] == "0.6000"
    assert rows["triplet (2 runs)"][column] == "–"


def test_angle_figures_pool_the_runs(project, tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for run, kind in (("softmax-0", "classifier weight"), ("softmax-1", "classifier weight"),
                      ("triplet-0", "mean embedding")):
        arrays = {"target": rng.uniform(0, 90, 40).astype(np.float32),
                  "between_centres": rng.uniform(60, 120, 28).astype(np.float32),
                  "nearest_centre": rng.uniform(50, 90, 8).astype(np.float32)}
        path = Path(f"data/embeddings/{run}/train/angles.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays, centre=np.asarray(kind))
        expected.setdefault(run.split("-")[0], []).append(arrays)
    out = tmp_path / "figures"
    out.mkdir()
    shown = report.plot_angles(project, {"softmax": "softmax (train-norm)"}, out)
    assert sorted(shown) == ["softmax", "triplet"]  # the losses without angle files are left out
    assert (out / "softmax.png").read_bytes()[:4] == b"\x89PNG"
    assert shown["softmax"]["runs"] == 2 and shown["triplet"]["runs"] == 1
    pooled = np.concatenate([a["target"] for a in expected["softmax"]])
    assert shown["softmax"]["target"] == pytest.approx(float(pooled.mean()))
    assert shown["softmax"]["centre"] == "classifier weight" and shown["triplet"]["centre"] == "mean embedding"
    text = "\n".join(report.angles_markdown(shown))
    assert "softmax (train-norm)" in text and "(figures/angles/triplet.png)" in text
