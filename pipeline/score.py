"""Stage ``score@SET`` (and ``score_pretrained@NAME-SET``): score one test set, for every trained run.

For each variant (distance in ``score.distances`` x test-time L2 normalisation in
``score.normalize``) it writes one per-pair file ``data/scores/SET/RUN/<distance>_<norm|raw>.csv``
with ``fold, image_id1, image_id2, same, path1, path2, score, prediction, decision, status``
and computes the verification metrics of :func:`pipeline.metrics.verification_report` (AUC,
EER, LFW-protocol accuracy, TPR@FPR, FP/FN, bootstrap intervals) into
``reports/metrics/SET/RUN.json``. Pairs whose image was dropped at detection keep a row with
``status = missing`` and no score: they are counted and reported, never scored. ``prediction``
is the LFW protocol's decision (threshold chosen on the other folds), ``decision`` the one at
the run's fixed threshold (below).

Higher score = more likely the same person; for L2 the score is minus the distance.

**Fixed threshold** (``score.threshold``): per variant, one threshold is chosen on the source
pairs by the rule (:func:`pipeline.metrics.choose_threshold`) and applied unchanged to every
test set: each set's score stage chooses it again from the same source (cheap, and the same
numbers), so the stage depends on the set and on the source only (:func:`threshold_source`).
The source is ``validation``, the run's own validation pairs (``data/embeddings/validation/RUN``,
written by ``embed_train``), or a labelled test set; a pretrained model names its own
(``pretrained.NAME.threshold_source``, default ``report.in_domain``). A source needs at least
``score.threshold.min_pairs`` labelled pairs (a threshold chosen on a handful of
pairs is refused, not used). ``data/scores/SET/RUN/thresholds.json`` holds each variant's
threshold and where it came from; the metrics JSON holds, per variant, the accuracy,
TP/FP/TN/FN, TPR and FPR at it (``fixed_threshold``, with ``chosen_on_itself`` when the set is
its own source: an optimistic figure).

**Unlabelled sets** (a pairs CSV without ``same``) are scored and decided at the fixed
threshold with no metrics: their per-pair files have an empty ``same`` and ``prediction``,
their metrics only count pairs and decisions.

**Prediction file** (:mod:`pipeline.predictions`): ``data/scores/SET/RUN/<set>_<RUN>_predict.txt``,
primary variant (``report.primary_distance`` / ``report.primary_normalize``): both image paths,
the score, the decision at the fixed threshold and the label where there is one.

Identification: ``rank1`` (leave-one-out 1:N from the embeddings, every model) and, for a
closed-set test of a classifier loss, ``n_way_accuracy`` of the classifier head
(:func:`n_way_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import VALIDATION_SOURCE, ConfigError, Params, ScoreParams, ThresholdParams
from pipeline.datasets import DatasetError
from pipeline.distances import PairDistance
from pipeline.io import atomic_dir, write_csv, write_json
from pipeline.metrics import (_json_float, apply_threshold, choose_threshold, min_negatives_for_fpr,
                              protocol_predictions, rank1_identification, threshold_report, verification_report)
from pipeline.predictions import file_name, write_predictions


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
        raise DatasetError(f"only {int(complete.sum())} pairs have both images after detection (and both labels "
                           "among them); cannot score this test set: look at its detection counts and rejects.csv")
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


def read_set(set_dir: str | Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]] | None:
    """The pairs and embeddings an embed stage wrote in ``set_dir`` (``data/embeddings/SET/RUN``),
    or None when it holds no pairs (a run whose split left no validation image)."""
    csv = Path(set_dir) / paths.PAIRS_FILE
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: no pairs; run the embed stage of this run and set first (dvc repro)")
    pairs = pd.read_csv(csv, dtype={"image_id1": str, "image_id2": str})
    if pairs.empty:
        return None
    return pairs, read_embeddings(Path(set_dir) / paths.EMBEDDINGS_FILE)


def _usable(scored: ScoredSet) -> bool:
    """Labelled, with both classes among the scored pairs: a threshold can be chosen on it."""
    return scored.labelled and scored.labels is not None and len(np.unique(scored.labels)) == 2


def check_threshold_source(name: str, scored: ScoredSet | None, min_pairs: int) -> None:
    """ConfigError (one line) unless ``scored`` has at least ``min_pairs`` labelled pairs, a fifth of
    them of each class, to choose a fixed threshold on (``score.threshold.min_pairs``)."""
    if scored is None:
        raise ConfigError(f"threshold source {name!r} has no pairs to choose a fixed threshold on")
    if not scored.labelled:
        raise ConfigError(f"threshold source {name!r} has no same/different labels; choose a labelled set")
    labels = scored.labels if scored.labels is not None else np.zeros(0, dtype=int)
    same, different = int((labels == 1).sum()), int((labels == 0).sum())
    per_label = max(1, min_pairs // 5)
    if len(labels) < min_pairs or min(same, different) < per_label:
        raise ConfigError(f"threshold source {name!r} has {len(labels)} scored pairs ({same} same, {different} "
                          f"different); a fixed threshold needs at least {min_pairs} pairs with {per_label} of "
                          "each label (score.threshold.min_pairs): name another source (score.threshold.source, "
                          "score.threshold.fallback or pretrained.NAME.threshold_source)")


def choose_thresholds(spec: ThresholdParams, source: ThresholdSource, pairs: ScoredSet,
                      variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: the threshold chosen on ``pairs`` (the source's scored set) and where it came from."""
    out = {}
    for variant in variants:
        entry: dict[str, Any] = {"source": source.name, "requested_source": source.requested, "rule": spec.rule,
                                 "target_fpr": spec.target_fpr if spec.rule == "target_fpr" else None,
                                 "fallback": source.name != source.requested, "note": source.note}
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


@dataclass
class ThresholdSource:
    """Where one run's fixed thresholds are chosen: the set's name (``validation`` or a test set),
    its embeddings folder, the source params asked for, and a note when that is a fallback."""

    name: str
    folder: Path
    requested: str
    note: str = ""


def threshold_source(params: Params, model: str, run: str) -> ThresholdSource:
    """Where run ``run`` of ``model`` chooses its fixed thresholds.

    A trained run: ``score.threshold.source``, its own validation pairs by default; when those are
    empty (``train.val_fraction: 0``) ``score.threshold.fallback`` or else ``report.in_domain``,
    with a note. A pretrained model: ``pretrained.NAME.threshold_source`` (default
    ``report.in_domain``). ConfigError (one line) when there is nowhere to choose it.
    """
    requested = params.score.threshold.source
    if model in params.pretrained:
        name = params.pretrained_threshold_source(model)
        if name is None:
            raise ConfigError(f"pretrained.{model}.threshold_source: not set and report.in_domain is null; name the "
                              "labelled test set whose pairs choose this model's fixed threshold")
        note = "" if name == requested else f"no validation pairs (pretrained): threshold chosen on {name}"
        return ThresholdSource(name, paths.set_embeddings(run, name, pretrained=True), requested, note)
    folder = paths.set_embeddings(run, requested)
    if requested != VALIDATION_SOURCE or read_set(folder) is not None:
        return ThresholdSource(requested, folder, requested)
    fallback = params.score.threshold.fallback or params.report.in_domain
    if fallback is None:
        raise ConfigError(f"{run} has no validation pairs (train.val_fraction leaves none) and neither "
                          "score.threshold.fallback nor report.in_domain names a test set to choose its fixed "
                          "threshold on; set one of them")
    key = "score.threshold.fallback" if params.score.threshold.fallback else "report.in_domain"
    return ThresholdSource(fallback, paths.set_embeddings(run, fallback), requested,
                           f"no validation pairs for this run: threshold chosen on {fallback} ({key})")


def run_score(params: ScoreParams, name: str, set_dir: str | Path, source: ThresholdSource, out_dir: str | Path,
              metrics_path: str | Path, *, seed: int = 0, run: str = "run",
              primary: tuple[str, bool] | None = None) -> dict[str, Any]:
    """Score test set ``name`` of one run (its embeddings and pairs in ``set_dir``); choose the run's
    fixed thresholds on ``source`` and apply them; write the per-pair files, the thresholds, the
    prediction file (primary variant, default the first one) and the set's metrics JSON."""
    variants = [variant_name(d, n) for d in params.distances for n in params.normalize]
    primary_variant = variant_name(*primary) if primary is not None else variants[0]
    if primary_variant not in variants:
        raise ConfigError(f"the primary variant {primary_variant} is not among the scored ones ({', '.join(variants)})")
    found = read_set(set_dir)
    if found is None:
        raise FileNotFoundError(f"{set_dir}: the embedded set has no pairs to score")
    result = score_set(*found, params, seed=seed)
    if source.folder.resolve() == Path(set_dir).resolve():
        source_pairs = result
    else:
        source_found = read_set(source.folder)
        source_pairs = None if source_found is None else score_set(*source_found, params, with_metrics=False)
    check_threshold_source(source.name, source_pairs, params.threshold.min_pairs)
    thresholds = choose_thresholds(params.threshold, source, source_pairs, variants)
    apply_fixed_threshold(name, result, thresholds)
    if source.note:
        print(f"threshold: {source.note}")
    result.metrics.update(n_way_metrics(Path(set_dir) / paths.HEAD_FILE, found[1]))
    with atomic_dir(out_dir) as tmp:
        for variant, table in result.tables.items():
            write_csv(Path(tmp) / f"{variant}.csv", table)
        write_prediction_file(Path(tmp) / file_name(name, run), result.tables[primary_variant])
        write_json(Path(tmp) / paths.THRESHOLDS, thresholds)
    metrics = {**result.metrics, "thresholds": thresholds}
    write_json(metrics_path, metrics)
    _print_summary(f"{name} {run}", result, primary_variant)
    return metrics


def run_score_set(params: Params, name: str) -> dict[str, dict[str, Any]]:
    """Stage ``score@SET``: test set ``name`` scored for every trained run (:func:`run_score` per run,
    each with its own fixed thresholds) into ``data/scores/SET/RUN`` and ``reports/metrics/SET/RUN.json``,
    both folders written whole."""
    primary = (params.report.primary_distance, params.report.primary_normalize)
    out = {}
    with atomic_dir(paths.SCORES / name) as tmp, atomic_dir(paths.METRICS / name) as metrics_tmp:
        for loss in params.train_losses:
            for run in params.runs[loss]:
                out[run] = run_score(params.score, name, paths.set_embeddings(run, name),
                                     threshold_source(params, loss, run), Path(tmp) / run,
                                     Path(metrics_tmp) / f"{run}.json", seed=params.seeds.data, run=run,
                                     primary=primary)
    return out


def _print_summary(name: str, result: ScoredSet, primary_variant: str) -> None:
    fixed = result.metrics[primary_variant]["fixed_threshold"]
    if result.labelled:
        summary = result.metrics[primary_variant]
        at = f"  fixed-threshold acc {fixed['accuracy']:.4f}" if "accuracy" in fixed else ""
        print(f"{name}: {result.metrics['pairs_scored']} pairs ({result.metrics['pairs_missing']} missing)  "
              f"{primary_variant} AUC {summary['auc']:.4f}  acc {summary['accuracy_mean']:.4f}{at}")
    else:
        print(f"{name}: {result.metrics['pairs_scored']} pairs ({result.metrics['pairs_missing']} missing), "
              f"no labels: predicted only ({fixed.get('predicted_same', 0)} same at the fixed threshold)")
