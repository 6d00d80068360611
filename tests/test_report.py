"""Report: accuracy and FP/FN at each run's fixed threshold beside the LFW-protocol accuracy,
the threshold's source named (and marked where a set is its own source), unlabelled sets
listed as predicted only and kept out of the statistics, and the prediction files listed.

Runs are scored by the real score stage on made-up embeddings; the expected numbers are
recomputed here from the per-pair score files and each run's thresholds.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import paths
from pipeline.config import Params
from pipeline.report import run_report
from pipeline.report.tables import WorkspaceRuns
from pipeline.score import run_score, threshold_source
from tests.test_score import _embeddings, _pairs

SETS = {"alpha": (10, 4, 160, True), "beta": (8, 5, 120, True), "web": (6, 3, 30, False)}
RUNS = {"softmax": ["softmax-0", "softmax-1"], "arcface": ["arcface-0", "arcface-1"], "ext": ["ext"]}


def _project(root: Path, threshold: dict) -> Params:
    params = Params.model_validate({
        "seeds": {"data": 0, "train": [0, 1]},
        "train_losses": ["softmax", "arcface"],
        "pretrained": {"ext": {"kind": "facepipe", "path": "elsewhere/model.pt"}},
        "data": {"train": {"kind": "synthetic", "set": "train"},
                 "tests": {name: {"kind": "synthetic", "set": "synth_open"} for name in SETS}},
        "score": {"bootstrap": 0, "threshold": {"min_pairs": 20, **threshold}},
        "report": {"in_domain": "alpha", "cross_domain": ["beta"], "bootstrap": 100},
    })
    identities, pairs = {}, {}
    for name, (n_ids, per, n_pairs, labelled) in SETS.items():
        ids = [f"{name}{k}" for k in range(n_ids * per)]
        identities[name] = (ids, [f"{name}-id{k // per}" for k in range(n_ids * per)])
        pairs[name] = _pairs(*identities[name], n_pairs, 11, labelled=labelled)
    val_ids = [f"v{k}" for k in range(40)]
    val_identities = [f"v-id{k // 4}" for k in range(40)]
    val_pairs = _pairs(val_ids, val_identities, 120, 12, folds=1)
    for k, run in enumerate(run for runs in RUNS.values() for run in runs):
        pretrained = run == "ext"
        for name, (ids, ident) in identities.items():
            folder = paths.set_embeddings(run, name, pretrained=pretrained)
            folder.mkdir(parents=True)
            pairs[name].to_csv(folder / "pairs.csv", index=False)
            np.savez(folder / "embeddings.npz", **_embeddings(ids, ident, 100 + 7 * k + len(name)))
        if not pretrained:  # a pretrained model has no validation pairs
            folder = paths.set_embeddings(run, "validation")
            folder.mkdir(parents=True)
            val_pairs[["fold", "image_id1", "image_id2", "same"]].to_csv(folder / "pairs.csv", index=False)
            np.savez(folder / "embeddings.npz", **_embeddings(val_ids, val_identities, 300 + k))
        model = run if pretrained else run.rsplit("-", 1)[0]
        for name in SETS:
            run_score(params.score, name, paths.set_embeddings(run, name, pretrained=pretrained),
                      threshold_source(params, model, run), paths.set_scores(run, name, pretrained=pretrained),
                      paths.metrics_file(run, name, pretrained=pretrained), seed=0, run=run, primary=("cosine", True))
    return params


def _expected(model: str, test_set: str, variant: str) -> dict:
    """Fixed-threshold figures of a model, from its runs' per-pair files, on the pairs every run scored."""
    frames = {run: pd.read_csv(paths.set_scores(run, test_set, pretrained=run == "ext") / f"{variant}.csv")
              for runs in RUNS.values() for run in runs}
    common = np.logical_and.reduce([(f["status"] == "scored").to_numpy() for f in frames.values()])
    acc, fp, fn, thresholds, sources = [], [], [], [], set()
    for run in RUNS[model]:
        entry = json.loads(paths.thresholds_file(run, test_set, pretrained=run == "ext").read_text())[variant]
        t = float(entry["threshold"])
        frame = frames[run][common]
        decided = [(s > t, int(y)) for s, y in zip(frame["score"], frame["same"])]
        acc.append(sum(d == bool(y) for d, y in decided) / len(decided))
        fp.append(decided.count((True, 0)))
        fn.append(decided.count((False, 1)))
        thresholds.append(t)
        sources.add(entry["source"])
    return {"accuracy": np.mean(acc), "per_run": acc, "fp": np.mean(fp), "fn": np.mean(fn), "sources": sources}


@pytest.fixture
def reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _project(tmp_path, {"source": "validation", "rule": "best_accuracy"})
    run_report(params)
    return tmp_path, params


def test_fixed_threshold_columns_equal_a_recomputation(reported):
    root, _ = reported
    table = pd.read_csv(root / "reports" / "comparison.csv")
    assert set(table["test_set"]) == {"alpha", "beta"}  # the unlabelled set is in no table
    for model in RUNS:
        for test_set in ("alpha", "beta"):
            for variant in ("cosine_norm", "l2_raw"):
                row = table.query("model == @model and test_set == @test_set and variant == @variant")
                want = _expected(model, test_set, variant)
                assert row["fixed_accuracy"].item() == pytest.approx(want["accuracy"], abs=1e-12)
                assert row["fixed_accuracy_per_run"].item() == " / ".join(f"{a:.4f}" for a in want["per_run"])
                assert row["fixed_fp"].item() == pytest.approx(want["fp"]) and row["fixed_fn"].item() == pytest.approx(
                    want["fn"])
                assert row["fixed_accuracy_low"].item() <= row["fixed_accuracy"].item() <= row[
                    "fixed_accuracy_high"].item()
                assert {row["threshold_from"].item()} == want["sources"]
                assert row["threshold_on_itself"].item() == (test_set in want["sources"])
    ext = table.query("model == 'ext' and variant == 'cosine_norm'").set_index("test_set")
    assert ext.loc["alpha", "threshold_from"] == "alpha" and bool(ext.loc["alpha", "threshold_on_itself"])
    assert not table.query("model != 'ext'")["threshold_on_itself"].any()
    runs = pd.read_csv(root / "reports" / "runs.csv")
    row = runs.query("run == 'arcface-1' and test_set == 'beta' and variant == 'l2_raw'")
    assert row["fixed_accuracy"].item() == pytest.approx(_expected("arcface", "beta", "l2_raw")["per_run"][1])
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert set(summary) == {"alpha", "beta"}
    assert summary["alpha"]["arcface"]["accuracy_fixed"] == pytest.approx(
        _expected("arcface", "alpha", "cosine_norm")["accuracy"], abs=1e-6)


def test_index_names_the_source_marks_fallbacks_and_lists_predictions(reported):
    root, params = reported
    index = (root / "reports" / "index.md").read_text()
    assert "accuracy @ threshold from validation (best accuracy) [95%]" in index
    assert "FP / FN @ threshold" in index and "FP / FN (LFW protocol)" in index
    alpha = index[index.index("### alpha"):index.index("### beta")]
    beta = index[index.index("### beta"):index.index("## Cross-domain")]
    ext_alpha = next(line for line in alpha.splitlines() if line.startswith("| ext"))
    ext_beta = next(line for line in beta.splitlines() if line.startswith("| ext"))
    assert "†‡" in ext_alpha and "†" in ext_beta and "‡" not in ext_beta
    assert "‡ threshold chosen on alpha itself (ext)" in alpha
    assert "† ext: no validation pairs (pretrained), so the threshold was chosen on alpha" in beta
    assert "- **web**: predicted only, 30 pairs (0 with an image without a face)" in index
    section = index[index.index("## Prediction files"):]
    assert "DVC outputs of the score stages" in section
    for run in ("softmax-0", "arcface-1", "ext"):
        for test_set in SETS:
            name = (f"data/scores/pretrained/{run}/{test_set}" if run == "ext" else f"data/scores/{test_set}/{run}"
                    ) + f"/{test_set}_{run}_predict.txt"
            assert f"- `{name}`" in section and (root / name).is_file()
    comparison = (root / "reports" / "comparison.md").read_text()
    assert comparison.count("accuracy @ threshold from validation (best accuracy)") == 2 * 4
    assert "web" not in pd.read_csv(root / "reports" / "verdicts.csv")["test_set"].tolist()


def test_threshold_from_a_test_set_is_marked_on_that_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _project(tmp_path, {"source": "beta", "rule": "target_fpr", "target_fpr": 0.1})
    run_report(params)
    index = (tmp_path / "reports" / "index.md").read_text()
    assert "accuracy @ threshold from beta (FPR ≤ 0.1) [95%]" in index
    beta = index[index.index("### beta"):index.index("## Cross-domain")]
    rows = [line for line in beta.splitlines() if line.startswith("| ") and " run" in line.split("|")[1]]
    assert len(rows) == 3 and all("‡" in line for line in rows)
    alpha = index[index.index("### alpha"):index.index("### beta")]
    assert "‡" not in alpha and "†" not in alpha
    table = pd.read_csv(tmp_path / "reports" / "comparison.csv")
    assert set(table.query("test_set == 'beta'")["threshold_on_itself"]) == {True}
    assert set(table.query("test_set == 'alpha'")["threshold_on_itself"]) == {False}
    assert set(table["threshold_rule"]) == {"FPR ≤ 0.1"}
    assert (table.query("test_set == 'beta'")["fixed_fpr"] <= 0.1).all()


def _table_rows(markdown: str, first_column: str) -> list[dict[str, str]]:
    """Every Markdown table whose first header cell is ``first_column``, as dicts."""
    out, header = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells if cells[0] == first_column else []
        elif header and not set(line) <= set("|-"):
            out.append(dict(zip(header, cells)))
    return out


def test_printed_holm_intervals_agree_with_the_verdicts(reported):
    import re

    root, _ = reported
    verdicts = pd.read_csv(root / "reports" / "verdicts.csv")
    assert len(verdicts) == 2 * 4 * 3  # 2 sets x 4 variants x 3 pairs of models
    for text in ((root / "reports" / name).read_text() for name in ("comparison.md", "index.md")):
        rows = _table_rows(text, "A (higher mean AUC)")
        assert rows and all("ΔAUC [unadjusted 95%]" in r and "Holm interval" in r for r in rows)
        for r in rows:
            low, high = re.search(r"\[([^,]+), ([^]]+)\]", r["Holm interval"]).groups()
            assert (low[0] == high[0]) == (r["verdict"] != "not distinguishable"), r
        drops = _table_rows(text, "model") if "## Cross-domain" in text else []
        for r in [r for r in drops if "Holm interval" in r]:
            low, high = re.search(r"\[([^,]+), ([^]]+)\]", r["Holm interval"]).groups()
            assert (low[0] == high[0]) == (r["reading"] != "no clear change"), r
    # verdicts.csv: the Holm interval at its level, around the difference, excludes 0 exactly with a verdict
    from scipy import stats

    half = stats.t.ppf(1 - verdicts["holm_level"] / 2, verdicts["df"]) * (verdicts["diff_high"] - verdicts[
        "auc_diff"]) / stats.t.ppf(0.975, verdicts["df"])
    np.testing.assert_allclose(verdicts["holm_high"], verdicts["auc_diff"] + half, rtol=1e-9)
    excludes = (verdicts["holm_low"] > 0) | (verdicts["holm_high"] < 0)
    assert (excludes == (verdicts["verdict"] != "not distinguishable")).all()
    assert set(verdicts["pairing"]) == {"independent"}


def test_pairing_by_seed_pairs_the_trained_losses_only(reported):
    from pipeline.report.stage import compute

    _, params = reported
    paired = params.model_copy(update={"report": params.report.model_copy(update={"pairing": "seed"})})
    stats, _ = compute(paired, WorkspaceRuns(pretrained=["ext"]))
    v = stats.verdicts.assign(pair=lambda d: [frozenset(p) for p in zip(d["a"], d["b"])])
    assert set(v.loc[v["pair"] == frozenset({"softmax", "arcface"}), "pairing"]) == {"seed"}
    assert set(v.loc[v["pair"] != frozenset({"softmax", "arcface"}), "pairing"]) == {"independent"}  # ext: no seeds


class _CellSource(WorkspaceRuns):
    """A finished cell read from this workspace: the cell's arcface runs are the runs of the loss `real` names."""

    real: dict[str, str] = {}
    tree: dict = {}

    def __init__(self, workspace, rev):
        super().__init__()
        self.loss = self.real[rev]

    def params(self):
        return self.tree

    def _run(self, run):
        return run.replace("arcface", self.loss)

    def test_sets(self, run):
        return super().test_sets(self._run(run))

    def scores(self, run, test_set, variant):
        return super().scores(self._run(run), test_set, variant)

    def metrics(self, run):
        return super().metrics(self._run(run))

    def thresholds(self, run):
        return super().thresholds(self._run(run))



def test_grid_report_shares_the_statistics_and_prints_agreeing_intervals(reported):
    """The grid report over two cells whose runs are this project's softmax and arcface runs (a stand-in
    for the DVC experiments): the same statistics per table as the report, the same Holm intervals."""
    import re

    import yaml

    from pipeline import grid as grids
    from pipeline.grid_report import write_grid_report

    root, params = reported
    path = root / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "set": {"train_losses": ["arcface"]},
                                    "vary": {"loss.margin": [0.2, 0.5]},
                                    "table": {"rows": ["loss.margin"], "metrics": ["auc", "rank1"]}}))
    grid = grids.load_grid(path)
    tree = yaml.safe_load(yaml.safe_dump(params.model_dump(mode="json"))) | {"train_losses": ["arcface"],
                                                                              "pretrained": {}}
    (root / "params.yaml").write_text(yaml.safe_dump(tree))  # the params the cells are resolved against
    cells = grid.cells(root)
    real = {cells[0].name: "softmax", cells[1].name: "arcface"}

    _CellSource.real, _CellSource.tree = real, tree
    saved = grids.ExperimentRuns
    grids.ExperimentRuns = _CellSource
    try:
        out = write_grid_report(grid, root, root / "experiments",
                                states=[grids.CellState(c, "done", c.name) for c in cells], echo=lambda *a: None)
    finally:
        grids.ExperimentRuns = saved
    results = pd.read_csv(out / "results.csv")
    comparison = pd.read_csv(root / "reports" / "comparison.csv").query("variant == 'cosine_norm'")
    for row in results.itertuples():
        same = comparison[(comparison["model"] == real[row.cell]) & (comparison["test_set"] == row.test_set)]
        assert row.auc == same["auc"].item() and (row.auc_low, row.auc_high) == (same["auc_low"].item(),
                                                                                  same["auc_high"].item())
    verdicts = pd.read_csv(out / "verdicts.csv")
    report_verdicts = pd.read_csv(root / "reports" / "verdicts.csv").query("variant == 'cosine_norm'")
    for v in verdicts.itertuples():  # one pair per table: Holm over one comparison is the comparison itself
        pair = report_verdicts[(report_verdicts["test_set"] == v.test_set)
                               & (report_verdicts["a"].isin(["softmax", "arcface"]))
                               & (report_verdicts["b"].isin(["softmax", "arcface"]))]
        assert v.p == pytest.approx(pair["p"].item(), rel=1e-12) and v.p_holm == v.p and v.holm_level == 0.05
    index = (out / "index.md").read_text()
    assert "Holm within this table" in index or "(α = 0.05)" in index
    for line in index.splitlines():
        for low, high in re.findall(r"Holm interval \[([^,]+), ([^]]+)\]", line):
            assert low[0] == high[0] and " beats " in line
    drops = _table_rows(index, "model")
    assert drops and all((r["Holm interval"][1] == r["Holm interval"].split(", ")[1][0])
                         == (r["reading"] != "no clear change") for r in drops)
