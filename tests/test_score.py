"""Score stage: the fixed threshold (chosen on validation or a named set, applied unchanged),
prediction files, and unlabelled pair lists (scored and predicted, never evaluated).

References are written here: scores straight from the embeddings with numpy, thresholds by
brute force over every candidate, counts pair by pair, prediction files from the per-pair CSVs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, ScoreParams
from pipeline.predictions import read_predictions
from pipeline.score import run_score
from tests.test_metrics import _brute_best_accuracy, _brute_target_fpr

RNG_DIM = 8


def _embeddings(ids: list[str], identities: list[str], seed: int) -> dict[str, np.ndarray]:
    """Embeddings near one centre per identity (noisy enough that thresholds matter)."""
    rng = np.random.default_rng(seed)
    centres = {name: rng.normal(0, 1, RNG_DIM) for name in sorted(set(identities))}
    emb = np.stack([centres[name] + rng.normal(0, 0.9, RNG_DIM) for name in identities]) * rng.uniform(0.5, 2.0,
                                                                                                   (len(ids), 1))
    return {"image_ids": np.asarray(ids), "identities": np.asarray(identities), "embeddings": emb.astype(np.float32)}


def _pairs(ids: list[str], identities: list[str], n: int, seed: int, *, folds: int = 2,
           labelled: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    by_identity = {}
    for i, name in zip(ids, identities):
        by_identity.setdefault(name, []).append(i)
    names = sorted(by_identity)
    for k in range(n):
        if k % 2 == 0:
            name = names[rng.integers(len(names))]
            a, b = rng.choice(by_identity[name], 2, replace=False)
        else:
            x, z = rng.choice(len(names), 2, replace=False)
            a, b = rng.choice(by_identity[names[x]]), rng.choice(by_identity[names[z]])
        rows.append({"fold": 1 + (k // 2) % folds, "image_id1": str(a), "image_id2": str(b),
                     "same": int(k % 2 == 0) if labelled else pd.NA})
    table = pd.DataFrame(rows)
    table["path1"] = "/images/" + table["image_id1"] + ".jpg"
    table["path2"] = "/images/" + table["image_id2"] + ".jpg"
    return table


def _set(root: Path, emb_dir: Path, name: str, n_ids: int, per: int, n_pairs: int, seed: int, *,
         labelled: bool = True, drop: int = 0) -> None:
    """A test set: pairs.csv under root/name, embeddings at emb_dir/name.npz (``drop`` images left out)."""
    ids = [f"{name}{k}" for k in range(n_ids * per)]
    identities = [f"{name}-id{k // per}" for k in range(n_ids * per)]
    pairs = _pairs(ids, identities, n_pairs, seed, labelled=labelled)
    (root / name).mkdir(parents=True, exist_ok=True)
    pairs.to_csv(root / name / "pairs.csv", index=False)
    emb = _embeddings(ids, identities, seed)
    keep = np.arange(len(ids)) >= drop
    np.savez(emb_dir / f"{name}.npz", **{k: v[keep] for k, v in emb.items()})


def _validation(emb_dir: Path, seed: int = 99) -> None:
    ids = [f"v{k}" for k in range(40)]
    identities = [f"v-id{k // 4}" for k in range(40)]
    pairs = _pairs(ids, identities, 120, seed, folds=1)
    pairs[["fold", "image_id1", "image_id2", "same"]].to_csv(emb_dir / "_validation_pairs.csv", index=False)
    np.savez(emb_dir / "_validation.npz", **_embeddings(ids, identities, seed))


def _reference_scores(emb: dict[str, np.ndarray], pairs: pd.DataFrame, variant: str) -> np.ndarray:
    """Pair scores from the embeddings, one pair at a time (NaN where an image is missing)."""
    where = {i: k for k, i in enumerate(emb["image_ids"].tolist())}
    out = []
    for a, b in zip(pairs["image_id1"], pairs["image_id2"]):
        if a not in where or b not in where:
            out.append(math.nan)
            continue
        x = emb["embeddings"][where[a]].astype(np.float64)
        z = emb["embeddings"][where[b]].astype(np.float64)
        if variant.endswith("_norm"):
            x, z = x / np.linalg.norm(x), z / np.linalg.norm(z)
        if variant.startswith("cosine"):
            out.append(float(x @ z / (np.linalg.norm(x) * np.linalg.norm(z))))
        else:
            out.append(-float(np.linalg.norm(x - z)))
    return np.asarray(out)


def _load(emb_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(emb_dir / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


VARIANTS = ["cosine_norm", "cosine_raw", "l2_norm", "l2_raw"]


@pytest.fixture
def layout(tmp_path):
    shards, emb_dir = tmp_path / "shards", tmp_path / "emb"
    emb_dir.mkdir()
    _set(shards, emb_dir, "alpha", 10, 4, 160, 1)
    _set(shards, emb_dir, "beta", 8, 5, 120, 2, drop=3)   # pairs of 3 images without a face: missing
    _set(shards, emb_dir, "web", 6, 3, 30, 3, labelled=False)
    (shards / "train").mkdir()  # the training set has no pairs.csv: not a test set
    return tmp_path, shards, emb_dir


def _score(tmp_path, shards, emb_dir, threshold: dict, *, primary=("cosine", True), run="arcface-0"):
    params = ScoreParams(bootstrap=0, threshold=threshold)
    metrics = run_score(params, emb_dir, shards, tmp_path / "scores", tmp_path / "metrics.json", run=run,
                        primary=primary)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    return metrics


def test_threshold_chosen_on_validation_is_applied_unchanged_to_every_set(layout):
    tmp_path, shards, emb_dir = layout
    _validation(emb_dir)
    metrics = _score(tmp_path, shards, emb_dir, {"source": "validation", "rule": "best_accuracy"})
    thresholds = json.loads((tmp_path / "scores" / "thresholds.json").read_text())
    val_pairs = pd.read_csv(emb_dir / "_validation_pairs.csv", dtype=str)
    val_labels = val_pairs["same"].astype(int).to_numpy()
    for variant in VARIANTS:
        val_scores = _reference_scores(_load(emb_dir, "_validation"), val_pairs, variant)
        expected = _brute_best_accuracy(val_scores, val_labels)
        assert float(thresholds[variant]["threshold"]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert thresholds[variant]["source"] == "validation" and not thresholds[variant]["fallback"]
        assert metrics["thresholds"][variant] == thresholds[variant]
        t = float(thresholds[variant]["threshold"])
        for name in ("alpha", "beta"):
            pairs = pd.read_csv(shards / name / "pairs.csv", dtype={"image_id1": str, "image_id2": str})
            scores = _reference_scores(_load(emb_dir, name), pairs, variant)
            ok = ~np.isnan(scores)
            decided = [(bool(s > t), int(y)) for s, y in zip(scores[ok], pairs["same"][ok])]
            record = metrics[name][variant]["fixed_threshold"]
            assert (record["tp"], record["fp"], record["tn"], record["fn"]) == (
                decided.count((True, 1)), decided.count((True, 0)), decided.count((False, 0)),
                decided.count((False, 1)))
            assert record["accuracy"] == pytest.approx((decided.count((True, 1)) + decided.count((False, 0)))
                                                       / len(decided))
            assert record["n_pairs"] == int(ok.sum()) and record["source"] == "validation"
            assert record["chosen_on_itself"] is False and float(record["threshold"]) == t
            table = pd.read_csv(tmp_path / "scores" / name / f"{variant}.csv")
            np.testing.assert_allclose(table["score"].to_numpy(), scores, rtol=1e-12, atol=1e-12)
            assert table.loc[ok, "decision"].astype(int).tolist() == [int(s > t) for s in scores[ok]]
            assert table.loc[~ok, "decision"].isna().all() and (table.loc[~ok, "status"] == "missing").all()
    assert metrics["beta"]["pairs_missing"] > 0
    val_table = pd.read_csv(tmp_path / "scores" / "validation" / "cosine_norm.csv")
    assert len(val_table) == len(val_pairs)


def test_prediction_files_recomputed_from_the_per_pair_csv(layout):
    tmp_path, shards, emb_dir = layout
    _validation(emb_dir)
    _score(tmp_path, shards, emb_dir, {"source": "validation"}, primary=("l2", False), run="softmax-3")
    threshold = float(json.loads((tmp_path / "scores" / "thresholds.json").read_text())["l2_raw"]["threshold"])
    assert sorted(p.name for p in (tmp_path / "scores" / "predict").iterdir()) == [
        "alpha_softmax-3_predict.txt", "beta_softmax-3_predict.txt", "web_softmax-3_predict.txt"]
    for name in ("alpha", "beta", "web"):
        table = pd.read_csv(tmp_path / "scores" / name / "l2_raw.csv", dtype={"image_id1": str, "image_id2": str})
        lines = (tmp_path / "scores" / "predict" / f"{name}_softmax-3_predict.txt").read_text().splitlines()
        assert lines[0] == "path1\tpath2\tscore\tdecision\tsame"
        assert len(lines) == len(table) + 1
        for line, row in zip(lines[1:], table.itertuples()):
            path1, path2, score, decision, same = line.split("\t")
            assert (path1, path2) == (row.path1, row.path2)
            if row.status == "missing":
                assert (score, decision) == ("", "n/a")
            else:
                assert float(score) == row.score  # written so that it reads back exactly
                assert decision == ("1" if row.score > threshold else "0")
            assert same == ("" if pd.isna(row.same) else str(int(row.same)))
        back = read_predictions(tmp_path / "scores" / "predict" / f"{name}_softmax-3_predict.txt")
        assert back["same"].isna().all() == (name == "web")


def test_unlabelled_set_is_predicted_not_evaluated(layout):
    tmp_path, shards, emb_dir = layout
    _validation(emb_dir)
    metrics = _score(tmp_path, shards, emb_dir, {"source": "validation"})
    web = metrics["web"]
    assert web["labelled"] is False and web["pairs"] == 30
    assert "rank1" not in web
    for variant in VARIANTS:
        assert set(web[variant]) == {"fixed_threshold"}
        record = web[variant]["fixed_threshold"]
        assert "accuracy" not in record and record["predicted_same"] + record["predicted_different"] == 30
    table = pd.read_csv(tmp_path / "scores" / "web" / "cosine_norm.csv")
    assert table["same"].isna().all() and table["prediction"].isna().all()
    assert table["decision"].notna().all()
    assert metrics["alpha"]["labelled"] is True and "auc" in metrics["alpha"]["cosine_norm"]


def test_threshold_on_a_named_set_by_target_fpr_is_marked_as_chosen_on_itself(layout):
    tmp_path, shards, emb_dir = layout
    _validation(emb_dir)  # present, but the source is a test set
    metrics = _score(tmp_path, shards, emb_dir, {"source": "alpha", "rule": "target_fpr", "target_fpr": 0.05})
    pairs = pd.read_csv(shards / "alpha" / "pairs.csv", dtype={"image_id1": str, "image_id2": str})
    for variant in VARIANTS:
        scores = _reference_scores(_load(emb_dir, "alpha"), pairs, variant)
        expected = _brute_target_fpr(scores, pairs["same"].to_numpy(), 0.05)
        record = metrics["alpha"][variant]["fixed_threshold"]
        assert float(record["threshold"]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert record["fpr"] <= 0.05 and record["chosen_on_itself"] is True and record["rule"] == "target_fpr"
        assert metrics["beta"][variant]["fixed_threshold"]["chosen_on_itself"] is False
        assert metrics["thresholds"][variant]["min_negatives"] == 20
        assert metrics["thresholds"][variant]["target_resolvable"] is True  # 80 negatives >= 1 / 0.05


def test_without_validation_pairs_the_threshold_falls_back_visibly(layout):
    tmp_path, shards, emb_dir = layout  # no _validation files: a pretrained model
    metrics = _score(tmp_path, shards, emb_dir, {"source": "validation"}, run="dlib")
    entry = metrics["thresholds"]["cosine_norm"]
    assert entry["source"] == "alpha" and entry["fallback"] is True and entry["requested_source"] == "validation"
    assert "no validation pairs" in entry["note"] and "alpha" in entry["note"]
    assert metrics["alpha"]["cosine_norm"]["fixed_threshold"]["chosen_on_itself"] is True
    metrics = _score(tmp_path, shards, emb_dir, {"source": "validation", "fallback": "beta"}, run="dlib")
    assert metrics["thresholds"]["l2_raw"]["source"] == "beta"
    assert metrics["beta"]["l2_raw"]["fixed_threshold"]["chosen_on_itself"] is True


def test_an_unlabelled_set_cannot_be_the_source(layout):
    tmp_path, shards, emb_dir = layout
    with pytest.raises(ConfigError, match=r"score.threshold.source = 'web': that test set has no labels"):
        _score(tmp_path, shards, emb_dir, {"source": "web"})
    with pytest.raises(ConfigError, match="fallback = 'web'"):
        _score(tmp_path, shards, emb_dir, {"source": "validation", "fallback": "web"})
    assert not (tmp_path / "scores").exists()  # nothing written


def test_unlabelled_pairs_csv_through_data_shard_and_score(tmp_path):
    """A pairs CSV without labels: data stage -> shard stage -> score stage, at function level."""
    from pipeline.__main__ import _pairs_with_paths
    from pipeline.config import Params, ShardParams
    from pipeline.data import read_index, run_data
    from pipeline.shards import read_shards, run_shard
    from tests.conftest import write_image

    pixels = np.full((16, 16, 3), 128, np.uint8)
    for person in ("ann", "bob"):
        for k in range(3):
            write_image(tmp_path / "train" / person / f"{k}.jpg", pixels)
    names = ["p/a.jpg", "p/b.jpg", "q/c.jpg", "r/d.jpg"]
    for name in names:
        write_image(tmp_path / "web" / name, pixels)
    (tmp_path / "web" / "pairs.csv").write_text("path1,path2\np/a.jpg,p/b.jpg\np/a.jpg,q/c.jpg\nq/c.jpg,r/d.jpg\n")
    params = Params.model_validate({
        "seeds": {"data": 0, "train": [0]}, "train_losses": ["softmax"],
        "data": {"train": {"kind": "folder", "path": str(tmp_path / "train")},
                 "tests": {"web": {"kind": "pairs_csv", "path": str(tmp_path / "web" / "pairs.csv")}}},
        "score": {"distances": ["cosine"], "normalize": [True], "threshold": {"source": "validation"}},
    })
    run_data(params, tmp_path / "datasets", progress=False)
    # stand-in for detect + align: every image "aligned" as itself, except r/d.jpg (no face)
    for name in ("train", "web"):
        images = read_index(tmp_path / "datasets", name).images
        rows = []
        for image_id, identity, path in zip(images["image_id"], images["identity"], images["path"]):
            write_image(tmp_path / "aligned" / name / f"{image_id}", pixels)
            rows.append({"image_id": image_id, "identity": identity, "source_path": path, "file": image_id,
                         "residual": 0.0, "error": "no face" if image_id == "r/d.jpg" else ""})
        pd.DataFrame(rows).to_csv(tmp_path / "aligned" / name / "_index.csv", index=False)
    pairs = {name: _pairs_with_paths(read_index(tmp_path / "datasets", name)) for name in ("train", "web")}
    run_shard(ShardParams(), tmp_path / "aligned", pairs, tmp_path / "shards", progress=False)
    sharded = read_shards(tmp_path / "shards" / "web")
    assert sharded.pairs["same"].isna().all() and len(sharded.pairs) == 3
    emb_dir = tmp_path / "emb"
    emb_dir.mkdir()
    vectors = {"p/a.jpg": [1.0, 0.0], "p/b.jpg": [0.9, 0.1], "q/c.jpg": [0.0, 1.0]}
    np.savez(emb_dir / "web.npz", image_ids=np.asarray(sharded.image_ids), identities=np.asarray(sharded.identities),
             embeddings=np.asarray([vectors[i] for i in sharded.image_ids], np.float32))
    # no labelled set and no validation pairs: scored and listed, no threshold to decide with
    metrics = run_score(params.score, emb_dir, tmp_path / "shards", tmp_path / "scores", tmp_path / "m.json",
                        run="softmax-0", primary=("cosine", True))
    assert metrics["web"]["labelled"] is False and metrics["web"]["pairs_missing"] == 1
    assert metrics["thresholds"]["cosine_norm"]["threshold"] is None
    table = pd.read_csv(tmp_path / "scores" / "web" / "cosine_norm.csv")
    assert table["same"].isna().all() and table["status"].tolist() == ["scored", "scored", "missing"]
    assert table["score"].iloc[0] == pytest.approx(0.9 / math.hypot(0.9, 0.1))
    predicted = read_predictions(tmp_path / "scores" / "predict" / "web_softmax-0_predict.txt")
    assert predicted["decision"].tolist() == ["n/a"] * 3
    assert predicted["path1"].tolist() == [str(tmp_path / "web" / p) for p in ("p/a.jpg", "p/a.jpg", "q/c.jpg")]
    # with validation pairs the same set gets decisions at the validation threshold
    np.savez(emb_dir / "_validation.npz", image_ids=np.asarray(["v1", "v2", "v3"]),
             identities=np.asarray(["x", "x", "y"]), embeddings=np.asarray([[1, 0], [1, 0.2], [0, 1]], np.float32))
    pd.DataFrame({"fold": [1, 1], "image_id1": ["v1", "v1"], "image_id2": ["v2", "v3"], "same": [1, 0]}).to_csv(
        emb_dir / "_validation_pairs.csv", index=False)
    metrics = run_score(params.score, emb_dir, tmp_path / "shards", tmp_path / "scores", tmp_path / "m.json",
                        run="softmax-0", primary=("cosine", True))
    t = float(metrics["thresholds"]["cosine_norm"]["threshold"])
    assert 0 < t < 1 / math.hypot(1, 0.2)  # between the validation pairs' scores (0 and 0.98)
    predicted = read_predictions(tmp_path / "scores" / "predict" / "web_softmax-0_predict.txt")
    assert predicted["decision"].tolist() == ["1", "0", "n/a"]  # scores 0.99 and 0 around t
