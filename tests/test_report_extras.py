"""Report additions: train-norm labels, the checkpoint-choice warning, N-way accuracy, angle figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
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
    _write_json("reports/metrics/synth_closed/softmax-0.json", {"rank1": 0.9, "n_way_accuracy": 0.5})
    _write_json("reports/metrics/synth_closed/softmax-1.json", {"rank1": 0.8, "n_way_accuracy": 0.7})
    _write_json("reports/metrics/synth_closed/triplet-0.json", {"rank1": 0.6})
    _write_json("reports/metrics/synth_closed/triplet-1.json", {"rank1": 0.7})
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
        path = Path(f"data/embeddings/train/{run}/angles.npz")
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


# ------------------------------------------------------------ intervals beside verdicts
def _graded_table(seed: int = 0, n_pairs: int = 400) -> report.Table:
    """Six models of three runs each, their score gaps graded so that some pairs differ clearly, some not."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([1, 0], n_pairs // 2)
    shifts = {"m0": 1.0, "m1": 1.12, "m2": 1.2, "m3": 1.35, "m4": 1.6, "m5": 2.2}
    scores = {m: np.stack([labels * (s + rng.normal(0, 0.03)) + rng.normal(0, 1, n_pairs) for _ in range(3)])
              for m, s in shifts.items()}
    return report.Table("set", "cosine_norm", scores, labels, np.tile(np.arange(4), n_pairs // 4), n_pairs, 0)


def _excludes_zero(text: str) -> bool:
    """Whether a printed interval "[+0.0010, +0.0040]" excludes 0: both bounds on one side (the sign
    survives rounding)."""
    low, high = text.strip("[]").split(", ")
    return low[0] == high[0] == "+" or low[0] == high[0] == "-"


def test_every_printed_interval_agrees_with_its_verdict():
    import re

    from pipeline.report.render import cross_domain_markdown, verdict_sentences, verdicts_markdown

    table = _graded_table()
    v = report.verdict_table(table, alpha=0.05)
    verdicts = set(v["verdict"])
    assert "not distinguishable" in verdicts and len(verdicts) > 2  # both kinds of verdict are printed
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in verdicts_markdown(v).splitlines()]
    header, body = rows[0], rows[2:]
    holm, unadjusted, verdict = header.index("Holm interval"), header.index("ΔAUC [unadjusted 95%]"), header.index(
        "verdict")
    misleading = 0
    for row in body:
        interval = re.search(r"\[[^]]+\]", row[holm]).group(0)
        assert _excludes_zero(interval) == (row[verdict] != "not distinguishable"), row
        misleading += _excludes_zero(re.search(r"\[[^]]+\]", row[unadjusted]).group(0)) and row[
            verdict] == "not distinguishable"
    assert misleading > 0  # the unadjusted interval alone would have misled: hence the Holm column
    order = sorted(table.scores, key=lambda m: -table.scores[m].mean())
    text = " ".join(verdict_sentences(v, order, 0.05))
    printed = re.findall(r"Holm interval (\[[^]]+\])", text)
    assert len(printed) == (v["verdict"] != "not distinguishable").sum() and all(map(_excludes_zero, printed))
    assert "Holm within this table, family-wise α = 0.05" in text

    # the cross-domain drops: the same model on a second, harder set
    harder = report.Table("hard", "cosine_norm", {m: s * np.where(table.labels == 1, 0.6 + 0.1 * k, 1.0)[None, :]
                                                  for k, (m, s) in enumerate(table.scores.items())},
                          table.labels, table.folds, table.pairs_total, 0)
    stats = report.table_statistics([table, harder], {m: [f"{m}-{k}" for k in range(3)] for m in table.scores},
                                    {m: [{}] * 3 for m in table.scores}, alpha=0.05, n_boot=0, seed=0,
                                    primary="cosine_norm")
    xd = report.cross_domain_drops(stats, in_domain="set", targets=["hard"], primary="cosine_norm",
                                   models=list(table.scores), alpha=0.05)
    assert {"drops", "no clear change"} <= set(xd["reading"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in cross_domain_markdown(xd).splitlines()]
    holm, reading = rows[0].index("Holm interval"), rows[0].index("reading")
    for row in rows[2:]:
        assert _excludes_zero(re.search(r"\[[^]]+\]", row[holm]).group(0)) == (row[reading] != "no clear change")


def test_a_zero_drop_that_nothing_varies_is_no_clear_change():
    from pipeline.repeats import Interval

    def stats_of(per_run):
        auc = Interval(float(np.mean(per_run)), 0, 1, 0.0, math.inf, tuple(per_run), 0.0, 0.0)
        return report.ModelStats("m", ["m-0", "m-1"], auc, auc, np.zeros((2, 1)), auc, {}, {}, 0.0, 0.0, None)

    stats = report.Statistics([], {("in", "cosine_norm"): {"m": stats_of([0.9, 0.9])},
                                   ("out", "cosine_norm"): {"m": stats_of([0.9, 0.9])}}, None)
    xd = report.cross_domain_drops(stats, in_domain="in", targets=["out"], primary="cosine_norm", models=["m"],
                                   alpha=0.05)
    assert xd["drop"].item() == 0 and xd["p"].item() == 1.0 and xd["reading"].item() == "no clear change"


# ------------------------------------------------------------------- one run
def test_one_run_prints_no_interval_for_rank1_and_n_way(project):
    from pipeline.grid_report import _pivot
    from pipeline.grid import Grid

    _write_json("reports/metrics/pretrained/ext/synth_closed.json", {"rank1": 0.8, "n_way_accuracy": 0.7})
    labels = np.repeat([0, 1], 50)
    table = report.Table("synth_closed", "cosine_norm", {"ext": np.random.default_rng(0).normal(size=(1, 100))
                                                         + labels}, labels, np.tile([1, 2], 50), 100, 0)
    st = report.model_stats(table, "ext", ["ext"], alpha=0.05, n_boot=0, seed=0,
                            run_metrics=[report.WorkspaceRuns(["synth_closed"], ["ext"]).metrics("ext")])
    for iv in (st.rank1, st.n_way):
        assert iv.mean == pytest.approx(0.8 if iv is st.rank1 else 0.7) and math.isnan(iv.low) and math.isnan(
            iv.high)
    grid = Grid(Path("g.yaml"), "g", "", None, {}, {}, ["loss"], [], ["rank1"], None, None)
    view = pd.DataFrame([{"loss": "ext", "rank1": st.rank1.mean, "rank1_low": st.rank1.low,
                          "rank1_high": st.rank1.high}])
    assert _pivot(view, grid, "rank1").iloc[0, 0] == "0.8000"  # the mean, no "[0.8000, 0.8000]"


# ------------------------------------------------------------------- the data sets
def test_index_says_how_each_set_was_split_prepared_and_rejected(project):
    from pipeline.report import datasets

    summaries = {
        "train": {"kind": "synthetic", "images": 1600, "identities": 80, "pairs": None, "folds": None},
        "synth_open": {"kind": "synthetic", "images": 700, "identities": 100, "pairs": 3000, "folds": 10},
        "lfw": {"kind": "lfw", "images": 13233, "identities": 5749, "pairs": 6000, "folds": 10,
                "folds_assigned": "from file"},
        "apd": {"kind": "pairs_csv", "images": 40, "identities": 8, "pairs": 60, "folds": 10,
                "folds_assigned": "stratified by label, seed 0"},
        "web": {"kind": "pairs_csv", "images": 12, "identities": 4, "pairs": 30, "folds": 1, "labelled": False,
                "folds_assigned": "none (no labels)"},
        "cfp": {"kind": "lfw", "images": 97, "identities": 20, "pairs": 50, "folds": 1, "folds_assigned": "from file",
                "precropped": True, "crop": "resize", "crop_fraction": 1.0}}
    for name, record in summaries.items():
        _write_json(f"data/datasets/{name}/summary.json", record)
    detection = {
        "train": {"images": 1600, "faces": 1584, "dropped": 16, "reasons": {"no face found": 16}},
        "synth_open": {"images": 700, "faces": 697, "dropped": 3, "reasons": {"no face found": 3}},
        "cfp": {"images": 97, "faces": 97, "dropped": 0, "reasons": {}, "precropped": True,
                "source_sizes": {"110x110": 97}}}
    for name, record in detection.items():
        _write_json(f"reports/detection/{name}.json", record)
    alignment = {
        "synth_open": {"aligned": 697, "failed": 0, "residual_mean_px": 1.16, "residual_p95_px": 2.0},
        "cfp": {"aligned": 97, "failed": 0, "residual_mean_px": None, "residual_p95_px": None, "precropped": True,
                "crop": "resize", "crop_fraction": 1.0, "source_sizes": {"110x110": 97}, "output_size": 64}}
    for name, record in alignment.items():
        _write_json(f"reports/alignment/{name}.json", record)
    rejected = [("synth_open", f"synth_open/id{k}/img.jpg", "no face found") for k in range(5)]
    Path("data/detect/synth_open").mkdir(parents=True)
    pd.DataFrame(rejected, columns=["set", "path", "reason"]).to_csv("data/detect/synth_open/rejects.csv", index=False)
    lines = datasets.test_sets_section(["synth_open", "lfw", "apd", "cfp", "web"], {"synth_open": (2975, 3000)})
    by_set = {name: next(ln for ln in lines if ln.startswith(f"- **{name}**"))
              for name in ("synth_open", "lfw", "apd", "cfp", "web")}
    assert "10 folds, identity-disjoint" in by_set["synth_open"] and "2975 scored" in by_set["synth_open"]
    assert "detected and aligned: 697 of 700 images kept a face" in by_set["synth_open"]
    assert "folds assigned by stratified split (stratified by label, seed 0)" in by_set["apd"]
    assert "not identity-disjoint" in by_set["apd"] and "as given in the pairs file" in by_set["lfw"]
    assert "pre-cropped: not detected or aligned, scored at 64 px" in by_set["cfp"]
    assert "detected and aligned" not in by_set["cfp"]
    assert "no labels, so no folds are used (predicted only)" in by_set["web"]
    sentence = datasets.folds_sentence(["synth_open", "apd", "lfw"])
    assert "identity-disjoint for synth_open" in sentence and "label-stratified random for apd" in sentence
    everything = ["train", "synth_open", "lfw", "apd", "cfp", "web"]
    det = datasets.detection_table(everything).set_index("set")
    assert det.loc["cfp", "faces kept"] == "97 pre-cropped, not detected"
    assert det.loc["cfp", "mean landmark residual (px)"] == "– (not aligned)"
    assert det.loc["synth_open", "faces kept"] == 697
    rejects = "\n".join(datasets.rejects_lines(everything))
    assert "(all in `data/detect/synth_open/rejects.csv`)" in rejects
    assert ("- synth_open: 5 rejected: `synth_open/id0/img.jpg` (no face found), `synth_open/id1/img.jpg` (no face "
            "found), `synth_open/id2/img.jpg` (no face found) and 2 more") in rejects


def test_bin_sets_get_the_papers_table_of_accuracy_mean_and_fold_std(project):
    """Two .bin benchmarks and one other set: the table lists the .bin sets only, each model's mean over
    runs of its fold-mean accuracy and of its fold standard deviation, in %."""
    from pipeline.config import Params
    from pipeline.report.index import papers_table_section
    from pipeline.report.tables import WorkspaceRuns

    params = Params.model_validate({
        "seeds": {"data": 0, "train": [0, 1]}, "train_losses": ["softmax", "arcface"],
        "data": {"train": {"kind": "synthetic", "set": "train"},
                 "tests": {"lfw": {"kind": "insightface_bin", "path": "x.bin"},
                           "cfp_fp": {"kind": "insightface_bin", "path": "y.bin"},
                           "synth_open": {"kind": "synthetic", "set": "synth_open"}}}})
    for name, kind in (("lfw", "insightface_bin"), ("cfp_fp", "insightface_bin"), ("synth_open", "synthetic")):
        _write_json(f"data/datasets/{name}/summary.json", {"kind": kind})
    values = {"softmax-0": (0.97, 0.010), "softmax-1": (0.98, 0.012), "arcface-0": (0.99, 0.004),
              "arcface-1": (0.995, 0.006)}
    for run, (mean, std) in values.items():
        for name in ("lfw", "cfp_fp", "synth_open"):
            _write_json(f"reports/metrics/{name}/{run}.json",
                        {"cosine_norm": {"accuracy_mean": mean - (0.05 if name == "cfp_fp" else 0.0),
                                         "accuracy_std": std}})
    lines = papers_table_section(params, WorkspaceRuns(list(params.data.tests)), "cosine_norm")
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| model | lfw | cfp_fp |"  # the .bin sets only, in params order
    assert table[1] == "| softmax (2 runs) | 97.50 ± 1.10 | 92.50 ± 1.10 |"
    assert table[2] == "| arcface (2 runs) | 99.25 ± 0.50 | 94.25 ± 0.50 |"
    params_without = params.model_copy(update={"data": params.data.model_copy(update={"tests": {
        "synth_open": params.data.tests["synth_open"]}})})
    assert papers_table_section(params_without, WorkspaceRuns(["synth_open"]), "cosine_norm") == []
