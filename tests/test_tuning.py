"""Tuning: the selection rule (highest mean validation AUC, ties within TIE broken by the EER, then the
grid order), the validation figures against scikit-learn, and the recipes written into a params file
with its comments kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline.tuning import TIE, ConfigResult, apply_recipes, cosine_scores, select, validation_figures

ROOT = Path(__file__).resolve().parents[1]


def _result(name: str, aucs, eers) -> ConfigResult:
    return ConfigResult("arcface", name, {"loss.margin": 0.5}, ["arcface-0", "arcface-1"], list(aucs), list(eers),
                        [0.5] * len(aucs), 8)


def test_the_rule_takes_the_best_mean_auc_and_breaks_ties_by_the_eer_then_the_grid_order():
    a = _result("a", [0.990, 0.992], [0.05, 0.05])
    b = _result("b", [0.995, 0.996], [0.04, 0.04])          # best AUC
    c = _result("c", [0.9952 - TIE / 2, 0.9952], [0.03, 0.03])  # tied with b (within TIE), lower EER
    assert select([a, b]) is b
    assert select([a, b, c]) is c
    d = _result("d", [0.9955, 0.9955], [0.03, 0.03])        # tied on both: the earlier in the grid wins
    assert select([a, c, d]) is c and select([a, d, c]) is d
    unfinished = _result("e", [], [])
    assert select([unfinished, a]) is a
    with pytest.raises(ValueError, match="no configuration has finished runs"):
        select([unfinished])


def test_validation_figures_equal_scikit_learn_and_scores_are_cosines():
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], [300, 3000])
    scores = rng.normal(labels * 1.5, 1.0)
    auc, eer, tpr = validation_figures(scores, labels)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr_curve, _ = roc_curve(labels, scores)
    crossing = np.argmin(np.abs(fpr - (1 - tpr_curve)))
    assert abs(eer - fpr[crossing]) < 2e-3  # the interpolated crossing, next to sklearn's nearest point
    assert tpr == pytest.approx(tpr_curve[fpr <= 1e-2].max())
    embeddings = {"image_ids": np.array(["a", "b", "c"]), "embeddings": np.array([[3.0, 0], [1, 1], [0, 2]])}
    pairs = pd.DataFrame({"image_id1": ["a", "a", "x"], "image_id2": ["b", "c", "a"], "same": [1, 0, 1]})
    got, kept = cosine_scores(embeddings, pairs)
    np.testing.assert_allclose(got, [1 / np.sqrt(2), 0.0])  # the pair with an unknown image is left out
    assert kept.tolist() == [1, 0]


def test_recipes_are_written_into_params_with_comments_kept(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# top comment\nloss:\n  scale: 64.0   # the papers'\n  margin: 0.5  # radians\n\n"
                    "# the other losses\nlosses:\n  cosface:\n    scale: 64.0\n    margin: 0.35\n\n"
                    "# which losses to train\ntrain_losses: [arcface, cosface]\ninit_from: null\n")
    chosen = {"arcface": ConfigResult("arcface", "auto", {"loss.scale": "auto", "loss.train": {"lr": 0.03}},
                                      ["arcface-0", "arcface-1"], [1.0, 0.99], [0.0, 0.01], [1.0, 1.0], 8,
                                      grid="tune-arcface"),
              "cosface": ConfigResult("cosface", "auto", {"losses.cosface": {"scale": "auto", "train": {"lr": 0.1}}},
                                      ["cosface-0", "cosface-1"], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], 8,
                                      grid="tune-cosface")}
    other = ConfigResult("arcface", "s64", {"loss.scale": 64.0}, ["arcface-0", "arcface-1"], [0.8, 0.8], [0.2, 0.2],
                         [0.5, 0.5], 8, grid="tune-arcface")
    written = apply_recipes(path, chosen, {"arcface": [other, chosen["arcface"]], "cosface": [chosen["cosface"]]})
    text = path.read_text()
    assert "# top comment" in text and "# the papers'" in text and "margin: 0.5  # radians\n" in text
    # keys appended to a section go above the comment that introduces the next section, not below it
    assert "    lr: 0.03\n\n# the other losses\nlosses:\n" in text
    assert "      lr: 0.1\n\n# which losses to train\ntrain_losses:" in text
    assert "init_from: null\n" in text  # not left empty
    tree = yaml.safe_load(text)
    assert tree["loss"] == {"scale": "auto", "margin": 0.5, "train": {"lr": 0.03}}
    assert tree["losses"]["cosface"] == {"scale": "auto", "margin": 0.35, "train": {"lr": 0.1}}
    assert sorted(written) == ["loss.scale", "loss.train.lr", "losses.cosface.scale", "losses.cosface.train.lr"]
    # and where each recipe came from, for the report
    assert tree["tuning"]["arcface"] == {"grid": "tune-arcface", "config": "auto", "configurations": 2, "seeds": 2,
                                        "epochs": 8, "mean_val_auc": 0.995,
                                        "overrides": {"loss.scale": "auto", "loss.train": {"lr": 0.03}}}
    assert tree["tuning"]["cosface"]["configurations"] == 1


def _report_params(tuning: dict, **loss):
    from pipeline.config import Params

    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    tree.update(train_losses=["arcface", "cosface"], tuning=tuning)
    tree["loss"] = {"scale": 64.0, "margin": 0.5, **loss}
    tree["losses"]["cosface"] = {"scale": 64.0, "margin": 0.35}
    return Params.model_validate(tree)


def test_the_report_says_how_each_recipe_was_chosen_and_notices_an_edit():
    from pipeline.report.training import recipes_section

    def record(loss, overrides, configurations=6):
        return {"grid": f"tune-{loss}", "config": "picked", "overrides": overrides,
                "configurations": configurations, "seeds": 2, "epochs": 8, "mean_val_auc": 0.99}

    cosface = record("cosface", {"losses.cosface": {"scale": 64.0, "margin": 0.35}})
    tuned = _report_params({"arcface": record("arcface", {"loss.scale": "auto", "loss.margin": 0.5}),
                            "cosface": cosface}, scale="auto")
    text = "\n".join(recipes_section(tuned))
    assert "same budget: 6 configurations × 2 training seeds × 8 epochs" in text
    assert "| arcface | scale auto, margin 0.5, epochs 8," in text
    assert "tuning grid `tune-arcface`: `picked`, the best mean validation AUC 0.9900 of 6 configurations" in text
    # the margin edited by hand since the selection: said, and no claim of an equal budget
    edited = "\n".join(recipes_section(_report_params(
        {"arcface": record("arcface", {"loss.scale": "auto", "loss.margin": 0.5}), "cosface": cosface},
        scale="auto", margin=0.3)))
    assert "edited in params.yaml since tuning grid `tune-arcface` selected `picked` (loss.margin)" in edited
    assert "selected by its own tuning grid" not in edited and "Not every loss's recipe" in edited
    # unequal budgets, or a loss without a record, are not called equal either
    unequal = _report_params({"arcface": record("arcface", {"loss.scale": "auto"}, configurations=3),
                              "cosface": cosface}, scale="auto")
    assert "selected by its own tuning grid" not in "\n".join(recipes_section(unequal))
    untuned = "\n".join(recipes_section(_report_params({"cosface": cosface})))
    assert "| arcface | " in untuned and "as written in params.yaml (no tuning record)" in untuned
