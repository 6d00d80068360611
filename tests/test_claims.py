"""The claims scoreboard is computed from the reports it names: parts judged from the verdict tables
(by hand here), a missing experiment is "not run", and changing one grid's result changes its row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.claims import (CONTRADICTED, NOT_DISTINGUISHABLE, NOT_RUN, SUPPORTED, Part, Report, judge_part,
                             run_claims)


def _grid(root: Path, name: str, rows: list[dict], verdicts: list[dict]) -> Path:
    folder = root / "experiments" / name
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    pd.DataFrame(verdicts).to_csv(folder / "verdicts.csv", index=False)
    (folder / "index.md").write_text("Scale of the base params: 8 identities, smallcnn. The same grid file ...\n")
    return folder


def _center_start(root: Path, late_low: float, late_high: float, late_verdict: str) -> Path:
    models = {("first-step", "softmax"): 0.95, ("first-step", "center"): 0.98, ("half-way", "softmax"): 0.95,
              ("half-way", "center"): 0.96}
    rows = [{"model": f"c-{start}/{loss}", "cell": f"c-{start}", "start": start, "loss": loss,
             "test_set": "synth_open", "variant": "cosine_norm", "auc": auc, "auc_low": auc - 0.01,
             "auc_high": auc + 0.01} for (start, loss), auc in models.items()]
    verdicts = [
        {"test_set": "synth_open", "variant": "cosine_norm", "a": "c-first-step/center", "b": "c-first-step/softmax",
         "auc_diff": 0.03, "holm_low": 0.01, "holm_high": 0.05, "verdict": "start=first-step center beats softmax"},
        {"test_set": "synth_open", "variant": "cosine_norm", "a": "c-half-way/center", "b": "c-half-way/softmax",
         "auc_diff": 0.01, "holm_low": late_low, "holm_high": late_high, "verdict": late_verdict},
    ]
    return _grid(root, "center-start", rows, verdicts)


def test_parts_are_judged_from_the_holm_intervals_of_the_verdict_table(tmp_path):
    folder = _center_start(tmp_path, -0.02, 0.04, "not distinguishable")
    report = Report(folder, grid=True)
    early = judge_part(report, Part("better", {"start": "first-step", "loss": "center"},
                                    {"start": "first-step", "loss": "softmax"}))
    assert (early.effect, early.low, early.high, early.verdict) == (pytest.approx(0.03), 0.01, 0.05, SUPPORTED)
    reverse = judge_part(report, Part("better", {"start": "first-step", "loss": "softmax"},
                                      {"start": "first-step", "loss": "center"}))
    assert reverse.effect == pytest.approx(-0.03) and (reverse.low, reverse.high) == (-0.05, -0.01)
    assert reverse.verdict == CONTRADICTED  # the other model wins
    late = judge_part(report, Part("not_better", {"start": "half-way", "loss": "center"},
                                   {"start": "half-way", "loss": "softmax"}))
    assert late.verdict == SUPPORTED  # no significant difference: "does not beat" holds
    assert judge_part(report, Part("better", {"start": "half-way", "loss": "center"},
                                   {"start": "half-way", "loss": "softmax"})).verdict == NOT_DISTINGUISHABLE


def test_the_board_follows_the_grid_reports(tmp_path):
    _center_start(tmp_path, -0.02, 0.04, "not distinguishable")
    rows = {row.claim.key: row for row in run_claims(tmp_path)}
    assert rows["center-start"].verdict == SUPPORTED
    assert rows["subcenter"].verdict == NOT_RUN  # its grid has no report here
    board = (tmp_path / "claims.md").read_text()
    line = next(ln for ln in board.splitlines() if ln.startswith("| Center loss added from the start"))
    assert "**supported**" in line and "synthetic; 8 identities, smallcnn" in line
    # late center loss now significantly better than softmax: the claim's second part fails
    folder = tmp_path / "experiments" / "center-start"
    verdicts = pd.read_csv(folder / "verdicts.csv")
    verdicts.loc[1, ["holm_low", "holm_high", "verdict"]] = [0.004, 0.016, "start=half-way center beats softmax"]
    verdicts.to_csv(folder / "verdicts.csv", index=False)
    rows = {row.claim.key: row for row in run_claims(tmp_path)}
    assert rows["center-start"].verdict == CONTRADICTED
    changed = next(ln for ln in (tmp_path / "claims.md").read_text().splitlines()
                   if ln.startswith("| Center loss added from the start"))
    assert changed != line and "**contradicted**" in changed


def test_a_run_report_of_real_faces_gives_its_own_rows(tmp_path):
    """reports/lfw-dev (a whole run's report, not a grid) answers the real-faces rows on its own test set."""
    folder = tmp_path / "lfw-dev"
    folder.mkdir()
    aucs = {"arcface": 0.95, "cosface": 0.94, "sphereface": 0.93, "softmax": 0.92, "center": 0.95}
    pd.DataFrame([{"model": loss, "test_set": "lfw_test", "variant": "cosine_norm", "auc": auc}
                  for loss, auc in aucs.items()]).to_csv(folder / "comparison.csv", index=False)
    verdicts = pd.DataFrame([
        {"test_set": "lfw_test", "variant": "cosine_norm", "a": "arcface", "b": "cosface", "auc_diff": 0.01,
         "holm_low": -0.01, "holm_high": 0.03, "verdict": "not distinguishable"},
        {"test_set": "lfw_test", "variant": "cosine_norm", "a": "sphereface", "b": "cosface", "auc_diff": 0.03,
         "holm_low": 0.01, "holm_high": 0.05, "verdict": "sphereface beats cosface"},
        {"test_set": "lfw_test", "variant": "cosine_norm", "a": "center", "b": "softmax", "auc_diff": 0.03,
         "holm_low": 0.01, "holm_high": 0.05, "verdict": "center beats softmax"}])
    verdicts.to_csv(folder / "verdicts.csv", index=False)
    (folder / "index.md").write_text("# report\n\nBackbone `smallcnn`, 978 identities. Regenerated by dvc repro\n")
    (folder / "params.yaml").write_text("loss: {scale: auto, margin: 0.5}\nlosses: {cosface: {scale: auto, margin: 0.25}, "
                                        "sphereface: {margin: 3}}\ntuning: {arcface: {grid: tune-arcface}}\n")
    rows = {row.claim.key: row for row in run_claims(tmp_path)}
    assert rows["ranking-lfw"].verdict == CONTRADICTED  # SphereFace beats CosFace on these pairs
    assert rows["center-lfw"].verdict == SUPPORTED
    assert rows["ranking"].verdict == NOT_RUN  # the synthetic default run has no report here
    line = next(ln for ln in (tmp_path / "claims.md").read_text().splitlines()
                if ln.startswith("| The same ranking on real faces"))
    assert ("real faces (LFW photos); Backbone `smallcnn`, 978 identities; each loss at the recipe its tuning grid "
            "selected (ArcFace s = auto, m = 0.5; CosFace s = auto, m = 0.25; SphereFace m = 3)") in line
    assert "sphereface vs cosface (lfw_test): ΔAUC +0.0300 [+0.0100, +0.0500] (contradicted)" in line
    # the row follows the report: no significant difference any more, and the ranking holds
    verdicts.loc[1, ["holm_low", "verdict"]] = [-0.01, "not distinguishable"]
    verdicts.to_csv(folder / "verdicts.csv", index=False)
    assert {row.claim.key: row for row in run_claims(tmp_path)}["ranking-lfw"].verdict == SUPPORTED


def test_the_grayscale_row_names_the_count_that_goes_against_the_claim(tmp_path):
    rows = [{"model": f"m-{inp}/arcface", "cell": f"m-{inp}", "loss.margin": "0.5", "input": inp, "loss": "arcface",
             "test_set": "synth_open", "variant": "cosine_norm", "auc": 0.99, "fn": fn, "fp": fp, "accuracy": 0.95,
             "accuracy_low": 0.94, "accuracy_high": 0.96} for inp, fn, fp in (("colour", 40.0, 90.0),
                                                                              ("gray", 45.0, 95.0))]
    _grid(tmp_path, "arcface-margins", rows, [{"test_set": "synth_open", "variant": "cosine_norm", "a": "x", "b": "y",
                                              "auc_diff": 0.0, "verdict": "not distinguishable"}])
    row = {r.claim.key: r for r in run_claims(tmp_path)}["grayscale"]
    assert row.verdict == NOT_DISTINGUISHABLE  # similar accuracy, but counts carry no interval
    assert "FN 40.0 → 45.0, FP 90.0 → 95.0" in row.outcomes[0].text
    assert row.outcomes[0].text.endswith("against the claim: FN does not fall")  # FP rises as claimed
