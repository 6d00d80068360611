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

from pipeline import paths
from pipeline.config import ConfigError, Params
from pipeline.predictions import read_predictions
from pipeline.score import ThresholdSource, run_score, threshold_source
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


def _set(emb_root: Path, name: str, n_ids: int, per: int, n_pairs: int, seed: int, *,
         labelled: bool = True, drop: int = 0) -> None:
    """A test set as its embed stage leaves it: ``emb_root/name/{pairs.csv, embeddings.npz}``
    (``drop`` images left out: no face)."""
    ids = [f"{name}{k}" for k in range(n_ids * per)]
    identities = [f"{name}-id{k // per}" for k in range(n_ids * per)]
    pairs = _pairs(ids, identities, n_pairs, seed, labelled=labelled)
    (emb_root / name).mkdir(parents=True, exist_ok=True)
    pairs.to_csv(emb_root / name / "pairs.csv", index=False)
    emb = _embeddings(ids, identities, seed)
    keep = np.arange(len(ids)) >= drop
    np.savez(emb_root / name / "embeddings.npz", **{k: v[keep] for k, v in emb.items()})


def _validation(emb_root: Path, seed: int = 99, *, empty: bool = False) -> None:
    ids = [f"v{k}" for k in range(40)]
    identities = [f"v-id{k // 4}" for k in range(40)]
    pairs = _pairs(ids, identities, 120, seed, folds=1)[["fold", "image_id1", "image_id2", "same"]]
    (emb_root / "validation").mkdir(parents=True, exist_ok=True)
    (pairs.iloc[:0] if empty else pairs).to_csv(emb_root / "validation" / "pairs.csv", index=False)
    np.savez(emb_root / "validation" / "embeddings.npz", **_embeddings(ids, identities, seed))


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


def _load(emb_root: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(emb_root / name / "embeddings.npz") as z:
        return {k: z[k] for k in z.files}


VARIANTS = ["cosine_norm", "cosine_raw", "l2_norm", "l2_raw"]
SETS = ("alpha", "beta", "web")


class RunFolders:
    """A run's per-set folders as the stages lay them out: ``view / SET`` is ``ROOT/SET/RUN`` for a
    trained run, ``ROOT/pretrained/RUN/SET`` for a pretrained model."""

    def __init__(self, root: Path, run: str, pretrained: bool = False) -> None:
        self.root, self.run, self.pretrained = root, run, pretrained

    def __truediv__(self, name: str) -> Path:
        return self.root / "pretrained" / self.run / name if self.pretrained else self.root / name / self.run

    def exists(self) -> bool:
        return any((self / name).exists() for name in SETS)


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A project folder (the working directory) with run ``RUN``'s embedded test sets under
    data/embeddings/SET/RUN, as the embed stages write them; returns a function giving a view of
    a run's folders."""
    monkeypatch.chdir(tmp_path)

    def runs_embeddings(run: str = "arcface-0", pretrained: bool = False) -> RunFolders:
        root = RunFolders(tmp_path / "data" / "embeddings", run, pretrained)
        if not root.exists():
            _set(root, "alpha", 10, 4, 160, 1)
            _set(root, "beta", 8, 5, 120, 2, drop=3)   # pairs of 3 images without a face: missing
            _set(root, "web", 6, 3, 30, 3, labelled=False)
        return root

    return tmp_path, runs_embeddings


def _params(threshold: dict, *, primary=("cosine", True), pretrained: dict | None = None) -> Params:
    sets = {name: {"kind": "pairs_csv", "path": f"/nowhere/{name}.csv"} for name in SETS}
    return Params.model_validate({
        "seeds": {"data": 0, "train": [0, 3]}, "train_losses": ["arcface", "softmax"],
        "data": {"train": {"kind": "folder", "path": "/nowhere"}, "tests": sets},
        "score": {"bootstrap": 0, "threshold": {"min_pairs": 20, **threshold}},
        "report": {"primary_distance": primary[0], "primary_normalize": primary[1], "in_domain": "alpha"},
        "pretrained": pretrained or {},
    })


def _score(tmp_path, threshold: dict, *, primary=("cosine", True), run="arcface-0", model="arcface",
           pretrained: dict | None = None, sets=SETS) -> dict:
    """Every set's score stage of one run, as DVC runs them; returns ``{set: metrics, "thresholds": ...}``."""
    params = _params(threshold, primary=primary, pretrained=pretrained)
    is_pretrained = model in params.pretrained
    out: dict = {}
    for name in sets:
        metrics_path = paths.metrics_file(run, name, pretrained=is_pretrained)
        metrics = run_score(params.score, name, paths.set_embeddings(run, name, pretrained=is_pretrained),
                            threshold_source(params, model, run), paths.set_scores(run, name, pretrained=is_pretrained),
                            metrics_path, run=run, primary=primary)
        assert json.loads(metrics_path.read_text()) == json.loads(json.dumps(metrics))
        out["thresholds"] = metrics.pop("thresholds")
        out[name] = metrics
    return out


def test_threshold_chosen_on_validation_is_applied_unchanged_to_every_set(layout):
    tmp_path, embeddings = layout
    emb = embeddings()
    _validation(emb)
    metrics = _score(tmp_path, {"source": "validation", "rule": "best_accuracy"})
    val_pairs = pd.read_csv(emb / "validation" / "pairs.csv", dtype=str)
    val_labels = val_pairs["same"].astype(int).to_numpy()
    for variant in VARIANTS:
        val_scores = _reference_scores(_load(emb, "validation"), val_pairs, variant)
        expected = _brute_best_accuracy(val_scores, val_labels)
        thresholds = {name: json.loads((tmp_path / "data/scores" / name / "arcface-0" / "thresholds.json").read_text())
                      for name in SETS}
        assert thresholds["alpha"] == thresholds["beta"] == thresholds["web"]  # the same on every set
        entry = thresholds["alpha"][variant]
        assert float(entry["threshold"]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert entry["source"] == "validation" and not entry["fallback"]
        assert metrics["thresholds"][variant] == entry
        t = float(entry["threshold"])
        for name in ("alpha", "beta"):
            pairs = pd.read_csv(emb / name / "pairs.csv", dtype={"image_id1": str, "image_id2": str})
            scores = _reference_scores(_load(emb, name), pairs, variant)
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
            table = pd.read_csv(tmp_path / "data/scores" / name / "arcface-0" / f"{variant}.csv")
            np.testing.assert_allclose(table["score"].to_numpy(), scores, rtol=1e-12, atol=1e-12)
            assert table.loc[ok, "decision"].astype(int).tolist() == [int(s > t) for s in scores[ok]]
            assert table.loc[~ok, "decision"].isna().all() and (table.loc[~ok, "status"] == "missing").all()
    assert metrics["beta"]["pairs_missing"] > 0


def test_prediction_files_recomputed_from_the_per_pair_csv(layout):
    tmp_path, embeddings = layout
    _validation(embeddings("softmax-3"))
    _score(tmp_path, {"source": "validation"}, primary=("l2", False), run="softmax-3", model="softmax")
    scores = RunFolders(tmp_path / "data/scores", "softmax-3")
    threshold = float(json.loads((scores / "alpha" / "thresholds.json").read_text())["l2_raw"]["threshold"])
    for name in SETS:
        assert (scores / name / f"{name}_softmax-3_predict.txt").is_file()
        table = pd.read_csv(scores / name / "l2_raw.csv", dtype={"image_id1": str, "image_id2": str})
        lines = (scores / name / f"{name}_softmax-3_predict.txt").read_text().splitlines()
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
        back = read_predictions(scores / name / f"{name}_softmax-3_predict.txt")
        assert back["same"].isna().all() == (name == "web")


def test_unlabelled_set_is_predicted_not_evaluated(layout):
    tmp_path, embeddings = layout
    _validation(embeddings())
    metrics = _score(tmp_path, {"source": "validation"})
    web = metrics["web"]
    assert web["labelled"] is False and web["pairs"] == 30
    assert "rank1" not in web
    for variant in VARIANTS:
        assert set(web[variant]) == {"fixed_threshold"}
        record = web[variant]["fixed_threshold"]
        assert "accuracy" not in record and record["predicted_same"] + record["predicted_different"] == 30
    table = pd.read_csv(tmp_path / "data/scores/web/arcface-0/cosine_norm.csv")
    assert table["same"].isna().all() and table["prediction"].isna().all()
    assert table["decision"].notna().all()
    assert metrics["alpha"]["labelled"] is True and "auc" in metrics["alpha"]["cosine_norm"]


def test_threshold_on_a_named_set_by_target_fpr_is_marked_as_chosen_on_itself(layout):
    tmp_path, embeddings = layout
    emb = embeddings()
    _validation(emb)  # present, but the source is a test set
    metrics = _score(tmp_path, {"source": "alpha", "rule": "target_fpr", "target_fpr": 0.05})
    pairs = pd.read_csv(emb / "alpha" / "pairs.csv", dtype={"image_id1": str, "image_id2": str})
    for variant in VARIANTS:
        scores = _reference_scores(_load(emb, "alpha"), pairs, variant)
        expected = _brute_target_fpr(scores, pairs["same"].to_numpy(), 0.05)
        record = metrics["alpha"][variant]["fixed_threshold"]
        assert float(record["threshold"]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert record["fpr"] <= 0.05 and record["chosen_on_itself"] is True and record["rule"] == "target_fpr"
        assert metrics["beta"][variant]["fixed_threshold"]["chosen_on_itself"] is False
        assert metrics["thresholds"][variant]["min_negatives"] == 20
        assert metrics["thresholds"][variant]["target_resolvable"] is True  # 80 negatives >= 1 / 0.05


def test_without_validation_pairs_the_threshold_falls_back_visibly(layout):
    tmp_path, embeddings = layout
    _validation(embeddings(), empty=True)  # train.val_fraction 0: an empty validation split
    metrics = _score(tmp_path, {"source": "validation"})
    entry = metrics["thresholds"]["cosine_norm"]
    assert entry["source"] == "alpha" and entry["fallback"] is True and entry["requested_source"] == "validation"
    assert "no validation pairs" in entry["note"] and "report.in_domain" in entry["note"]
    assert metrics["alpha"]["cosine_norm"]["fixed_threshold"]["chosen_on_itself"] is True
    metrics = _score(tmp_path, {"source": "validation", "fallback": "beta"})
    assert metrics["thresholds"]["l2_raw"]["source"] == "beta"
    assert metrics["beta"]["l2_raw"]["fixed_threshold"]["chosen_on_itself"] is True


def test_a_pretrained_model_takes_the_source_it_names_or_the_in_domain_set(layout):
    tmp_path, embeddings = layout
    embeddings("dlib", pretrained=True)  # no validation folder: a pretrained model has none
    metrics = _score(tmp_path, {"source": "validation"}, run="dlib", model="dlib", pretrained={"dlib": {}})
    assert metrics["thresholds"]["cosine_norm"]["source"] == "alpha"  # report.in_domain
    metrics = _score(tmp_path, {"source": "validation"}, run="dlib", model="dlib",
                     pretrained={"dlib": {"threshold_source": "beta"}})
    assert {entry["source"] for entry in metrics["thresholds"].values()} == {"beta"}


def test_a_source_without_labels_or_with_too_few_pairs_is_refused(layout):
    tmp_path, embeddings = layout
    emb = embeddings()
    with pytest.raises(ConfigError, match=r"threshold source 'web' has no same/different labels"):
        _score(tmp_path, {"source": "web"})
    _set(emb, "bad", 2, 2, 4, 9)  # 4 pairs: a threshold picked on them would move every decision
    with pytest.raises(ConfigError, match=r"threshold source 'bad' has 4 scored pairs \(2 same, 2 different\); a "
                                          r"fixed threshold needs at least 20 pairs"):
        run_score(_params({"source": "bad"}).score, "alpha", emb / "alpha", ThresholdSource("bad", emb / "bad", "bad"),
                  tmp_path / "out", tmp_path / "m.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()  # nothing written


def test_unlabelled_pairs_csv_through_data_shard_and_score(tmp_path, monkeypatch):
    """A pairs CSV without labels: data stage -> shard stage -> score stage, at function level."""
    from pipeline.__main__ import _pairs_with_paths
    from pipeline.config import ShardParams
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
        "score": {"distances": ["cosine"], "normalize": [True], "threshold": {"source": "validation", "min_pairs": 2}},
    })
    monkeypatch.chdir(tmp_path)
    for name in ("train", "web"):
        run_data(params, name, progress=False)
    # stand-in for detect + align: every image "aligned" as itself, except r/d.jpg (no face)
    for name in ("train", "web"):
        images = read_index(name).images
        rows = []
        for image_id, identity, path in zip(images["image_id"], images["identity"], images["path"]):
            write_image(tmp_path / "aligned" / name / f"{image_id}", pixels)
            rows.append({"image_id": image_id, "identity": identity, "source_path": path, "file": image_id,
                         "residual": 0.0, "error": "no face" if image_id == "r/d.jpg" else ""})
        pd.DataFrame(rows).to_csv(tmp_path / "aligned" / name / "_index.csv", index=False)
        run_shard(ShardParams(), name, tmp_path / "aligned" / name, _pairs_with_paths(read_index(name)),
                  tmp_path / "shards" / name, progress=False)
    sharded = read_shards(tmp_path / "shards" / "web")
    assert sharded.pairs["same"].isna().all() and len(sharded.pairs) == 3
    emb = paths.set_embeddings("softmax-0", "web")
    emb.mkdir(parents=True)
    vectors = {"p/a.jpg": [1.0, 0.0], "p/b.jpg": [0.9, 0.1], "q/c.jpg": [0.0, 1.0]}
    np.savez(emb / "embeddings.npz", image_ids=np.asarray(sharded.image_ids),
             identities=np.asarray(sharded.identities),
             embeddings=np.asarray([vectors[i] for i in sharded.image_ids], np.float32))
    (tmp_path / "shards" / "web" / "pairs.csv").replace(emb / "pairs.csv")
    # no validation pairs and no labelled test set to fall back on: one line saying what to set
    _validation_pairs = paths.set_embeddings("softmax-0", "validation")
    _validation_pairs.mkdir(parents=True)
    pd.DataFrame(columns=["fold", "image_id1", "image_id2", "same"]).to_csv(_validation_pairs / "pairs.csv",
                                                                           index=False)
    with pytest.raises(ConfigError, match="no validation pairs .* set one of them"):
        threshold_source(params, "softmax", "softmax-0")
    # with validation pairs the set gets decisions at the validation threshold
    np.savez(_validation_pairs / "embeddings.npz", image_ids=np.asarray(["v1", "v2", "v3"]),
             identities=np.asarray(["x", "x", "y"]), embeddings=np.asarray([[1, 0], [1, 0.2], [0, 1]], np.float32))
    pd.DataFrame({"fold": [1, 1], "image_id1": ["v1", "v1"], "image_id2": ["v2", "v3"], "same": [1, 0]}).to_csv(
        _validation_pairs / "pairs.csv", index=False)
    metrics = run_score(params.score, "web", emb, threshold_source(params, "softmax", "softmax-0"),
                        paths.set_scores("softmax-0", "web"), tmp_path / "m.json", run="softmax-0",
                        primary=("cosine", True))
    assert metrics["labelled"] is False and metrics["pairs_missing"] == 1
    t = float(metrics["thresholds"]["cosine_norm"]["threshold"])
    assert 0 < t < 1 / math.hypot(1, 0.2)  # between the validation pairs' scores (0 and 0.98)
    table = pd.read_csv(paths.set_scores("softmax-0", "web") / "cosine_norm.csv")
    assert table["same"].isna().all() and table["status"].tolist() == ["scored", "scored", "missing"]
    assert table["score"].iloc[0] == pytest.approx(0.9 / math.hypot(0.9, 0.1))
    predicted = read_predictions(paths.set_scores("softmax-0", "web") / "web_softmax-0_predict.txt")
    assert predicted["decision"].tolist() == ["1", "0", "n/a"]  # scores 0.99 and 0 around t
    assert predicted["path1"].tolist() == [str(tmp_path / "web" / p) for p in ("p/a.jpg", "p/a.jpg", "q/c.jpg")]
