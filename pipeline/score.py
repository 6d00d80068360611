"""Stage ``score@RUN``: score every test pair under every distance variant.

For each test set and each variant (distance in ``score.distances`` x test-time L2
normalisation in ``score.normalize``), writes one per-pair file
``OUT/<set>/<distance>_<norm|raw>.csv`` with ``fold, image_id1, image_id2, same,
path1, path2, score, prediction, decision, status`` and computes the verification
metrics of :func:`pipeline.metrics.verification_report` (AUC, EER, LFW-protocol
accuracy, TPR@FPR, FP/FN, bootstrap intervals). Pairs whose image was dropped at
detection keep a row with ``status = missing`` and no score: they are counted and
reported, never scored. ``prediction`` is the LFW protocol's decision (threshold chosen
on the other folds), ``decision`` the one at the run's fixed threshold (below).

Higher score = more likely the same person; for L2 the score is minus the distance.

**Fixed threshold** (``score.threshold``): per variant, one threshold is chosen on the
source pairs by the rule (:func:`pipeline.metrics.choose_threshold`) and applied
unchanged to every test set. The source is ``validation``, the run's own validation
pairs (embedded by the embed stage from the training split, ``_validation.npz`` and
``_validation_pairs.csv``; their per-pair scores go to ``OUT/validation/``), or a
labelled test set. A run without validation pairs (a pretrained model) takes it from
``score.threshold.fallback`` (null: the first labelled test set, alphabetically), and
every record of it says so. ``OUT/thresholds.json`` holds each variant's threshold and
where it came from; the metrics JSON holds, per test set and variant, the accuracy,
TP/FP/TN/FN, TPR and FPR at it (``fixed_threshold``, with ``chosen_on_itself`` when
the set is its own source: an optimistic figure).

**Unlabelled sets** (a pairs CSV without ``same``) are scored and decided at the fixed
threshold with no metrics: their per-pair files have an empty ``same`` and
``prediction``, their metrics entry only counts pairs and decisions.

**Prediction files** (:mod:`pipeline.predictions`): ``OUT/predict/<set>_<RUN>_predict.txt``
for every test set, primary variant (``report.primary_distance`` /
``report.primary_normalize``): both image paths, the score, the decision at the fixed
threshold and the label where there is one.

Identification: ``rank1`` per test set (leave-one-out 1:N from the embeddings, every model)
and, for a closed-set test of a classifier loss, ``n_way_accuracy`` of the classifier head
(:func:`n_way_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import VALIDATION_SOURCE, ConfigError, ScoreParams, ThresholdParams
from pipeline.distances import PairDistance
from pipeline.io import atomic_dir, write_csv, write_json
from pipeline.metrics import (_json_float, apply_threshold, choose_threshold, min_negatives_for_fpr,
                              protocol_predictions, rank1_identification, threshold_report, verification_report)
from pipeline.paths import PREDICT as PREDICT_DIR
from pipeline.paths import THRESHOLDS as THRESHOLDS_FILE
from pipeline.paths import VALIDATION_EMBEDDINGS, VALIDATION_PAIRS
from pipeline.predictions import file_name, write_predictions
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


def is_labelled(pairs: pd.DataFrame) -> bool:
    """False when the pairs carry no labels at all (an unlabelled pairs CSV: ``same`` empty)."""
    return "same" in pairs and not pairs["same"].isna().all()


@dataclass
class ScoredSet:
    """One set's per-pair tables (one per variant), metrics, and what the fixed threshold needs."""

    labelled: bool
    complete: np.ndarray                      # [N] bool: both images embedded
    tables: dict[str, pd.DataFrame]
    metrics: dict[str, Any]
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> [n complete]
    labels: np.ndarray | None = None          # [n complete] 0/1, None without labels


def score_set(pairs: pd.DataFrame, embeddings: dict[str, np.ndarray], params: ScoreParams, *, seed: int = 0,
              with_metrics: bool = True) -> ScoredSet:
    """Per-pair tables and metrics of one set, for every variant (no metrics without labels,
    nor with ``with_metrics=False``)."""
    i, j, complete = pair_indices(pairs, embeddings["image_ids"])
    emb = embeddings["embeddings"].astype(np.float64)
    labelled = is_labelled(pairs)
    labels = pairs["same"].to_numpy()[complete].astype(int) if labelled else None
    folds = pairs["fold"].to_numpy()[complete]
    metrics: dict[str, Any] = {
        "pairs": int(len(pairs)),
        "pairs_scored": int(complete.sum()),
        "pairs_missing": int((~complete).sum()),
        "labelled": labelled,
    }
    if labelled and with_metrics and (complete.sum() < 2 or len(np.unique(labels)) < 2):
        raise ValueError(
            f"only {int(complete.sum())} pairs have both images after detection; cannot score this test set"
        )
    if labelled and with_metrics:
        metrics["rank1"] = rank1_identification(emb, list(embeddings["identities"]))
    out = ScoredSet(labelled, complete, {}, metrics, {}, labels)
    for distance in params.distances:
        for normalize in params.normalize:
            name = variant_name(distance, normalize)
            scorer = PairDistance(kind=distance, normalize=normalize)
            scores = scorer.scores(emb[i[complete]], emb[j[complete]])
            columns = ["fold", "image_id1", "image_id2", "same"] + [c for c in ("path1", "path2") if c in pairs]
            table = pairs[columns].copy()
            table["same"] = pd.array(pairs["same"], dtype="Int64") if labelled else pd.array([pd.NA] * len(pairs),
                                                                                              dtype="Int64")
            table["score"] = np.nan
            table.loc[complete, "score"] = scores
            table["prediction"] = pd.array([pd.NA] * len(table), dtype="Int64")
            if labelled and with_metrics:
                metrics[name] = verification_report(scores, labels, folds, n_boot=params.bootstrap, seed=seed)
                table.loc[complete, "prediction"] = protocol_predictions(scores, labels, folds).astype(int)
            table["decision"] = pd.array([pd.NA] * len(table), dtype="Int64")
            table["status"] = np.where(complete, "scored", "missing")
            out.tables[name] = table
            out.scores[name] = scores
    return out


def read_validation(embeddings_dir: str | Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]] | None:
    """The run's validation pairs and embeddings, or None when the embed stage wrote none
    (a pretrained model, or ``train.val_fraction`` 0)."""
    npz, csv = Path(embeddings_dir) / VALIDATION_EMBEDDINGS, Path(embeddings_dir) / VALIDATION_PAIRS
    if not npz.is_file() or not csv.is_file():
        return None
    pairs = pd.read_csv(csv, dtype={"image_id1": str, "image_id2": str})
    return pairs, read_embeddings(npz)


def _usable(scored: ScoredSet) -> bool:
    """Labelled, with both classes among the scored pairs: a threshold can be chosen on it."""
    return scored.labelled and scored.labels is not None and len(np.unique(scored.labels)) == 2


def resolve_source(spec: ThresholdParams, validation: ScoredSet | None, sets: dict[str, ScoredSet]
                   ) -> tuple[str | None, str]:
    """Where this run's thresholds come from: ``(source, note)``; source None when nowhere.

    ``validation`` falls back (with a note) to ``spec.fallback`` or the first labelled test
    set in alphabetical order when the run has no usable validation pairs. A test set named
    as the source must be labelled (:class:`ConfigError` otherwise).
    """
    labelled = sorted(name for name, s in sets.items() if _usable(s))
    if spec.source != VALIDATION_SOURCE:
        if spec.source not in labelled:
            why = ("is not among the sharded test sets" if spec.source not in sets else
                   "has no labels" if not sets[spec.source].labelled else "has scored pairs of one class only")
            raise ConfigError(f"score.threshold.source = {spec.source!r}: that test set {why}; the threshold "
                              "must be chosen on labelled pairs of both classes")
        return spec.source, ""
    if validation is not None and _usable(validation):
        return VALIDATION_SOURCE, ""
    missing = "no validation pairs" if validation is None else "validation pairs without both classes"
    if spec.fallback is not None:
        if spec.fallback not in labelled:
            raise ConfigError(f"score.threshold.fallback = {spec.fallback!r}: that test set has no labels or is "
                              "not sharded")
        return spec.fallback, (f"{missing} for this model: threshold chosen on {spec.fallback} "
                               "(score.threshold.fallback)")
    if not labelled:
        return None, f"{missing} for this model and no labelled test set: no fixed threshold"
    return labelled[0], (f"{missing} for this model: threshold chosen on {labelled[0]}, the first labelled "
                         "test set (score.threshold.fallback: null)")


def choose_thresholds(spec: ThresholdParams, source: str | None, note: str, pairs: ScoredSet | None,
                      variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: the threshold chosen on ``pairs`` (the source's scored set) and where it came from."""
    out = {}
    for variant in variants:
        entry: dict[str, Any] = {"source": source, "requested_source": spec.source, "rule": spec.rule,
                                 "target_fpr": spec.target_fpr if spec.rule == "target_fpr" else None,
                                 "fallback": source is not None and source != spec.source, "note": note}
        if source is None or pairs is None:
            out[variant] = entry | {"threshold": None}
            continue
        scores, labels = pairs.scores[variant], pairs.labels
        threshold = choose_threshold(scores, labels, spec.rule, spec.target_fpr)
        on_source = threshold_report(scores, labels, threshold)
        entry |= {"threshold": _json_float(threshold),
                  "on_source": {k: on_source[k] for k in ("n_pairs", "accuracy", "tp", "fp", "tn", "fn", "tpr", "fpr")}}
        if spec.rule == "target_fpr":
            needed = min_negatives_for_fpr(spec.target_fpr)
            entry["min_negatives"] = needed
            entry["target_resolvable"] = bool(on_source["fp"] + on_source["tn"] >= needed)
        out[variant] = entry
    return out


def _threshold_value(entry: dict[str, Any]) -> float | None:
    value = entry.get("threshold")
    return None if value is None else float(value)


def apply_fixed_threshold(name: str, scored: ScoredSet, thresholds: dict[str, dict[str, Any]]) -> None:
    """Fill each table's ``decision`` and, for a labelled set, the metrics at the fixed threshold."""
    for variant, table in scored.tables.items():
        entry = thresholds[variant]
        threshold = _threshold_value(entry)
        record: dict[str, Any] = {"threshold": entry["threshold"], "source": entry["source"], "rule": entry["rule"],
                                  "target_fpr": entry["target_fpr"], "chosen_on_itself": entry["source"] == name}
        if threshold is not None:
            decisions = apply_threshold(scored.scores[variant], threshold)
            table.loc[scored.complete, "decision"] = decisions.astype(int)
            if scored.labelled and scored.labels is not None and len(np.unique(scored.labels)) == 2:
                record |= threshold_report(scored.scores[variant], scored.labels, threshold)
            else:
                record |= {"predicted_same": int(decisions.sum()), "predicted_different": int((~decisions).sum())}
        scored.metrics.setdefault(variant, {})["fixed_threshold"] = record


def write_prediction_file(path: Path, table: pd.DataFrame) -> None:
    """The prediction file of one set from its per-pair table (primary variant)."""
    first = table["path1"] if "path1" in table else table["image_id1"]
    second = table["path2"] if "path2" in table else table["image_id2"]
    decisions = [None if pd.isna(d) else int(d) for d in table["decision"]]
    labels = None if table["same"].isna().all() else list(table["same"])
    write_predictions(path, first.astype(str).tolist(), second.astype(str).tolist(), table["score"].tolist(),
                      decisions, labels)


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
              metrics_path: str | Path, *, seed: int = 0, run: str = "run",
              primary: tuple[str, bool] | None = None) -> dict[str, Any]:
    """Score every test set of one run; write the per-pair files, the run's thresholds, its
    prediction files (primary variant, default the first one) and its metrics JSON."""
    variants = [variant_name(d, n) for d in params.distances for n in params.normalize]
    primary_variant = variant_name(*primary) if primary is not None else variants[0]
    if primary_variant not in variants:
        raise ConfigError(f"the primary variant {primary_variant} is not among the scored ones ({', '.join(variants)})")
    scored: dict[str, ScoredSet] = {}
    for name in test_sets(shards_dir):
        pairs = pd.read_csv(Path(shards_dir) / name / "pairs.csv", dtype={"image_id1": str, "image_id2": str})
        scored[name] = score_set(pairs, read_embeddings(Path(embeddings_dir) / f"{name}.npz"), params, seed=seed)
    found = read_validation(embeddings_dir)
    validation = None if found is None else score_set(*found, params, with_metrics=False)
    source, note = resolve_source(params.threshold, validation, scored)
    source_pairs = validation if source == VALIDATION_SOURCE else scored.get(source or "")
    thresholds = choose_thresholds(params.threshold, source, note, source_pairs, variants)
    if validation is not None:
        apply_fixed_threshold(VALIDATION_SOURCE, validation, thresholds)
    for name, result in scored.items():
        apply_fixed_threshold(name, result, thresholds)
    if note:
        print(f"threshold: {note}")
    all_metrics: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for name, result in scored.items():
            for variant, table in result.tables.items():
                write_csv(Path(tmp) / name / f"{variant}.csv", table)
            write_prediction_file(Path(tmp) / PREDICT_DIR / file_name(name, run), result.tables[primary_variant])
            result.metrics.update(n_way_metrics(Path(embeddings_dir) / "head" / f"{name}.npz",
                                                read_embeddings(Path(embeddings_dir) / f"{name}.npz")))
            all_metrics[name] = result.metrics
            fixed = result.metrics[primary_variant]["fixed_threshold"]
            if result.labelled:
                summary = result.metrics[primary_variant]
                at = f"  fixed-threshold acc {fixed['accuracy']:.4f}" if "accuracy" in fixed else ""
                print(f"{name}: {result.metrics['pairs_scored']} pairs ({result.metrics['pairs_missing']} missing)  "
                      f"{primary_variant} AUC {summary['auc']:.4f}  acc {summary['accuracy_mean']:.4f}{at}")
            else:
                print(f"{name}: {result.metrics['pairs_scored']} pairs ({result.metrics['pairs_missing']} missing), "
                      f"no labels: predicted only ({fixed.get('predicted_same', 0)} same at the fixed threshold)")
        if validation is not None:
            for variant, table in validation.tables.items():
                write_csv(Path(tmp) / VALIDATION_SOURCE / f"{variant}.csv", table)
        write_json(Path(tmp) / THRESHOLDS_FILE, thresholds)
    all_metrics["thresholds"] = thresholds
    write_json(metrics_path, all_metrics)
    return all_metrics
