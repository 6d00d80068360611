"""Stage ``score@LOSS``: score every test pair under every distance variant.

For each test set and each variant (distance in ``score.distances`` x test-time L2
normalisation in ``score.normalize``), writes one per-pair file
``OUT/<set>/<distance>_<norm|raw>.csv`` with ``fold, image_id1, image_id2, same,
path1, path2, score, prediction, status`` and computes the verification metrics of
:func:`pipeline.metrics.verification_report` (AUC, EER, LFW-protocol accuracy,
TPR@FPR, FP/FN, bootstrap intervals). Pairs whose image was dropped at detection
keep a row with ``status = missing`` and no score: they are counted and reported,
never scored.

Higher score = more likely the same person; for L2 the score is minus the distance.

Identification: ``rank1`` per test set (leave-one-out 1:N from the embeddings, every model)
and, for a closed-set test of a classifier loss, ``n_way_accuracy`` of the classifier head
(:func:`n_way_metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import ScoreParams
from pipeline.distances import PairDistance
from pipeline.io import atomic_dir, write_csv, write_json
from pipeline.metrics import protocol_predictions, rank1_identification, verification_report
from pipeline.shards import test_sets

def read_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """``image_ids`` [N], ``identities`` [N], ``embeddings`` [N, D] as written by the embed stages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no embeddings; run the embed stage of this run first")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in ("image_ids", "identities", "embeddings")}


def variant_name(distance: str, normalize: bool) -> str:
    return f"{distance}_{'norm' if normalize else 'raw'}"


def pair_indices(pairs: pd.DataFrame, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of both images of each pair into ``image_ids`` and a mask of complete pairs."""
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    first = pairs["image_id1"].map(position)
    second = pairs["image_id2"].map(position)
    complete = (first.notna() & second.notna()).to_numpy()
    return (first.fillna(-1).astype(int).to_numpy(), second.fillna(-1).astype(int).to_numpy(), complete)


def score_set(pairs: pd.DataFrame, embeddings: dict[str, np.ndarray], params: ScoreParams, *, seed: int = 0
              ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Per-pair tables and metrics of one test set, for every variant."""
    i, j, complete = pair_indices(pairs, embeddings["image_ids"])
    emb = embeddings["embeddings"].astype(np.float64)
    labels = pairs["same"].to_numpy()[complete]
    folds = pairs["fold"].to_numpy()[complete]
    tables: dict[str, pd.DataFrame] = {}
    metrics: dict[str, Any] = {
        "pairs": int(len(pairs)),
        "pairs_scored": int(complete.sum()),
        "pairs_missing": int((~complete).sum()),
    }
    if complete.sum() < 2 or len(np.unique(labels)) < 2:
        raise ValueError(
            f"only {int(complete.sum())} pairs have both images after detection; cannot score this test set"
        )
    rank1 = rank1_identification(emb, list(embeddings["identities"]))
    metrics["rank1"] = rank1
    for distance in params.distances:
        for normalize in params.normalize:
            name = variant_name(distance, normalize)
            scorer = PairDistance(kind=distance, normalize=normalize)
            scores = scorer.scores(emb[i[complete]], emb[j[complete]])
            report = verification_report(scores, labels, folds, n_boot=params.bootstrap, seed=seed)
            predictions = protocol_predictions(scores, labels, folds)
            columns = ["fold", "image_id1", "image_id2", "same"] + [c for c in ("path1", "path2") if c in pairs]
            table = pairs[columns].copy()
            table["score"] = np.nan
            table.loc[complete, "score"] = scores
            table["prediction"] = pd.array([pd.NA] * len(table), dtype="Int64")
            table.loc[complete, "prediction"] = predictions.astype(int)
            table["status"] = np.where(complete, "scored", "missing")
            tables[name] = table
            metrics[name] = report
    return tables, metrics


def n_way_metrics(head_path: str | Path, embeddings: dict[str, np.ndarray]) -> dict[str, Any]:
    """Closed-set identification by the classifier head: ``n_way_accuracy`` (fraction of images
    whose predicted training identity is theirs) and ``n_way_images``, from the head predictions
    the embed stage wrote for a closed-set test (see :mod:`pipeline.embed`); {} without them
    (not a closed-set test, or a loss without a classifier)."""
    head_path = Path(head_path)
    if not head_path.is_file():
        return {}
    with np.load(head_path, allow_pickle=False) as z:
        predicted = dict(zip(z["image_ids"], z["predicted"]))
    truth = dict(zip(embeddings["image_ids"], embeddings["identities"]))
    if set(predicted) != set(truth):
        raise ValueError(f"{head_path}: the head predictions are not for the embedded images; rerun the embed stage")
    hits = [predicted[image_id] == identity for image_id, identity in truth.items()]
    return {"n_way_accuracy": float(np.mean(hits)), "n_way_images": len(hits)}


def run_score(params: ScoreParams, embeddings_dir: str | Path, shards_dir: str | Path, out_dir: str | Path,
              metrics_path: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Score every test set of one run; write the per-pair files and the run's metrics JSON."""
    all_metrics: dict[str, Any] = {}
    first_variant = variant_name(params.distances[0], params.normalize[0])
    with atomic_dir(out_dir) as tmp:
        for name in test_sets(shards_dir):
            pairs = pd.read_csv(Path(shards_dir) / name / "pairs.csv", dtype={"image_id1": str, "image_id2": str})
            embeddings = read_embeddings(Path(embeddings_dir) / f"{name}.npz")
            tables, metrics = score_set(pairs, embeddings, params, seed=seed)
            for variant, table in tables.items():
                write_csv(Path(tmp) / name / f"{variant}.csv", table)
            metrics.update(n_way_metrics(Path(embeddings_dir) / "head" / f"{name}.npz", embeddings))
            all_metrics[name] = metrics
            summary = metrics[first_variant]
            print(f"{name}: {metrics['pairs_scored']} pairs ({metrics['pairs_missing']} missing)  "
                  f"{first_variant} AUC {summary['auc']:.4f}  acc {summary['accuracy_mean']:.4f}")
    write_json(metrics_path, all_metrics)
    return all_metrics
