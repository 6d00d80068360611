"""The statistics of every table, as the report and the grid report both compute them.

:func:`table_statistics` is the one "statistics per table" step: every metric of every model
over its runs (:func:`model_stats`), and the Holm verdicts of every pair of models (one
family per table, :func:`verdict_table`). :func:`cross_domain_drops` adds the AUC drop of
each model from the in-domain set to each cross-domain set (one Holm family per target set).
The statistics themselves are those of :mod:`pipeline.repeats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Hashable, Sequence

import numpy as np
import pandas as pd

from pipeline.metrics import DEFAULT_FPRS, min_negatives_for_fpr, protocol_predictions, tpr_at_fpr
from pipeline.repeats import (Interval, accuracy_interval, auc_interval, combine, fixed_accuracy_interval,
                              holm_family, roc_stats, two_sided_p, verdicts)
from pipeline.report.tables import Table


@dataclass
class FixedStats:
    """A model at its runs' fixed thresholds on one table's pairs (means over runs).

    ``source``: where the runs' thresholds were chosen (a set name or ``validation``;
    several joined by ``/`` if the runs differ); ``requested``: ``score.threshold.source``;
    ``rule``: readable rule; ``on_itself``: chosen on this very test set (optimistic);
    ``fallback``: the model had no validation pairs and fell back to ``source``.
    """

    accuracy: Interval | None
    fp: float | None
    fn: float | None
    tpr: float | None
    fpr: float | None
    thresholds: tuple[float, ...]
    source: str
    requested: str
    rule: str
    on_itself: bool
    fallback: bool


@dataclass
class ModelStats:
    """Every metric of one model over its runs on one table."""

    model: str
    runs: list[Hashable]
    auc: Interval
    accuracy: Interval
    accuracy_folds: np.ndarray          # [R, K]
    eer: Interval
    tpr: dict[float, Interval | None]   # achieved: highest TPR with FPR <= target (None: too few negatives)
    tpr_interpolated: dict[float, float | None]
    fp: float
    fn: float
    rank1: Interval | None              # interval over runs only; none with one run
    fixed: FixedStats | None = None
    n_way: Interval | None = None       # N-way accuracy of the classifier head (closed-set test, classifier losses)
    label: str = ""                     # the model's display name (e.g. "softmax (train-norm)"); "" = the model


def _rule_text(entry: dict[str, Any]) -> str:
    if entry.get("rule") == "target_fpr":
        return f"FPR ≤ {entry.get('target_fpr'):g}"
    return str(entry.get("rule", "?")).replace("_", " ")


def fixed_stats(table: Table, model: str, *, alpha: float) -> FixedStats | None:
    """:class:`FixedStats` of ``model`` on ``table``; None when its score files carry no thresholds."""
    entries = table.thresholds.get(model) or []
    if not entries or any(not e for e in entries):
        return None
    sources = sorted({str(e.get("source")) for e in entries})
    info = dict(source="/".join(sources), requested=str(entries[0].get("requested_source", sources[0])),
                rule=_rule_text(entries[0]), on_itself=table.test_set in sources,
                fallback=any(bool(e.get("fallback")) for e in entries))
    if any(e.get("threshold") is None for e in entries):
        return FixedStats(None, None, None, None, None, (), **info)
    t = np.asarray([float(e["threshold"]) for e in entries])
    scores, y = table.scores[model], table.labels.astype(bool)
    decided = scores > t[:, None]
    fp = (decided & ~y).sum(axis=1)
    fn = (~decided & y).sum(axis=1)
    tp = (decided & y).sum(axis=1)
    accuracy = fixed_accuracy_interval(scores, t, table.labels, table.folds, alpha=alpha)
    return FixedStats(accuracy, float(fp.mean()), float(fn.mean()), float((tp / y.sum()).mean()),
                      float((fp / (~y).sum()).mean()), tuple(float(v) for v in t), **info)


def _runs_interval(values: list[float | None], *, alpha: float) -> Interval | None:
    """Mean over the runs of a per-run figure of the score stage (rank-1, N-way accuracy), with an
    interval over the runs only (none with one run); None unless every run has the figure."""
    if not values or any(v is None for v in values):
        return None
    return combine([float(v) for v in values], 0.0, alpha=alpha)


def _n_way_interval(values: list[float | None], *, alpha: float) -> Interval | None:
    """Mean (over the runs) N-way accuracy of the classifier head on a closed-set test, from the
    score stage's metrics; None unless every run has one (other sets, losses without a classifier)."""
    return _runs_interval(values, alpha=alpha)


def _protocol_errors(scores: np.ndarray, y: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    """Mean over runs of the false positives and false negatives at the LFW-protocol thresholds."""
    fp, fn = [], []
    for s in scores:
        pred = protocol_predictions(s, y, folds)
        fp.append(int((pred & (y == 0)).sum()))
        fn.append(int((~pred & (y == 1)).sum()))
    return float(np.mean(fp)), float(np.mean(fn))


def model_stats(table: Table, model: str, runs: Sequence[Hashable], *, alpha: float, n_boot: int, seed: int,
                run_metrics: list[dict] | None = None) -> ModelStats:
    """Every metric of one model over its runs on one table (``run_metrics``: each run's metrics
    JSON from the score stage, for rank-1 and the head's N-way accuracy). ``n_boot < 2``: no
    pair bootstrap, so EER and TPR@FPR get their mean over runs and no interval."""
    run_metrics = run_metrics or [{} for _ in runs]
    scores, y, folds = table.scores[model], table.labels, table.folds
    n_neg = int((y == 0).sum())
    available = [f for f in DEFAULT_FPRS if n_neg >= min_negatives_for_fpr(f)]
    roc = roc_stats(scores, y, available, n_boot=n_boot, seed=seed)

    def with_pairs(per_run: np.ndarray, boot: np.ndarray) -> Interval:
        if n_boot < 2:  # no pair resampling asked for: the mean and the runs, no interval
            return replace(combine(per_run, 0.0, alpha=alpha), low=math.nan, high=math.nan)
        return combine(per_run, float(np.var(boot, ddof=1)), alpha=alpha)

    interpolated = {}
    for f in DEFAULT_FPRS:
        values = [tpr_at_fpr(s, y, [f], interpolate=True)[f] for s in scores]
        interpolated[f] = None if any(v is None for v in values) else float(np.mean(values))
    accuracy, per_fold = accuracy_interval(scores, y, folds, alpha=alpha)
    per_set = [m.get(table.test_set, {}) for m in run_metrics]
    return ModelStats(
        model, list(runs), auc_interval(scores, y, alpha=alpha), accuracy, per_fold, with_pairs(roc.eer, roc.boot_eer),
        {f: (with_pairs(roc.tpr[f], roc.boot_tpr[f]) if f in available else None) for f in DEFAULT_FPRS},
        interpolated, *_protocol_errors(scores, y, folds),
        _runs_interval([m.get("rank1") for m in per_set], alpha=alpha), fixed_stats(table, model, alpha=alpha),
        n_way=_n_way_interval([m.get("n_way_accuracy") for m in per_set], alpha=alpha))


VERDICT_COLUMNS = ["test_set", "variant", "a", "b", "auc_diff", "diff_low", "diff_high", "df", "p", "p_holm", "verdict",
                   "holm_low", "holm_high", "holm_level", "pairing"]


def verdict_table(table: Table, *, alpha: float, pairing: str = "independent",
                  seeds: dict[str, tuple | None] | None = None) -> pd.DataFrame:
    """Every pair of models of one table (none with a single model), Holm-corrected within the table.

    ``diff_low``, ``diff_high``: the unadjusted ``1 - alpha`` interval; ``holm_low``, ``holm_high``:
    the Holm interval at level ``holm_level`` (it excludes 0 exactly when the verdict is "beats");
    ``pairing``: how that pair's run variance was taken (``seed`` or ``independent``).
    """
    rows = []
    for d in verdicts(table.scores, table.labels, alpha=alpha, pairing=pairing, seeds=seeds):
        rows.append({"test_set": table.test_set, "variant": table.variant, "a": d.a, "b": d.b, "auc_diff": d.diff,
                     "diff_low": d.low, "diff_high": d.high, "df": d.df, "p": d.p, "p_holm": d.p_holm,
                     "verdict": d.verdict, "holm_low": d.holm_low, "holm_high": d.holm_high,
                     "holm_level": d.holm_level, "pairing": "seed" if d.paired else "independent"})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


@dataclass
class Statistics:
    """Every table's statistics: ``models[(test set, variant)][model]`` and all verdicts (one
    Holm family per table)."""

    tables: list[Table]
    models: dict[tuple[str, str], dict[str, ModelStats]]
    verdicts: pd.DataFrame

    def of(self, table: Table) -> dict[str, ModelStats]:
        return self.models[(table.test_set, table.variant)]

    def verdicts_of(self, test_set: str, variant: str) -> pd.DataFrame:
        v = self.verdicts
        if v.empty:
            return v
        return v[(v["test_set"] == test_set) & (v["variant"] == variant)]


def table_statistics(tables: list[Table], runs: dict[str, list], run_metrics: dict[str, list[dict]], *,
                     alpha: float, n_boot: int, seed: int, primary: str, pairing: str = "independent",
                     seeds: dict[str, tuple | None] | None = None, labels: dict[str, str] | None = None
                     ) -> Statistics:
    """The statistics of every table: each model's metrics over its runs and the table's verdicts.

    ``runs``: model -> its runs; ``run_metrics``: model -> each run's score-stage metrics JSON;
    EER and TPR@FPR intervals need a pair bootstrap of ``n_boot`` resamples, drawn on the
    ``primary`` variant only (the costly part). ``pairing``, ``seeds``: see
    :func:`pipeline.repeats.verdicts`; ``labels``: display names of the models.
    """
    labels = labels or {}
    models: dict[tuple[str, str], dict[str, ModelStats]] = {}
    frames = []
    for table in tables:
        per_model = {}
        for model, model_runs in runs.items():
            st = model_stats(table, model, model_runs, alpha=alpha, seed=seed,
                             n_boot=n_boot if table.variant == primary else 0, run_metrics=run_metrics[model])
            st.label = labels.get(model, model)
            per_model[model] = st
        models[(table.test_set, table.variant)] = per_model
        frames.append(verdict_table(table, alpha=alpha, pairing=pairing, seeds=seeds))
    verdict_frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=VERDICT_COLUMNS)
    return Statistics(tables, models, verdict_frame)


CROSS_DOMAIN_COLUMNS = ["model", "in_domain", "cross_domain", "auc_in", "auc_cross", "drop", "drop_low", "drop_high",
                        "p", "runs", "p_holm", "reading", "drop_holm_low", "drop_holm_high", "holm_level"]


def _drop(model: str, a: ModelStats, b: ModelStats, alpha: float) -> dict[str, Any]:
    """One model's AUC drop from in-domain ``a`` to cross-domain ``b`` over its runs."""
    drops = np.asarray(a.auc.per_run) - np.asarray(b.auc.per_run)
    iv = combine(drops, a.auc.var_pairs + b.auc.var_pairs, alpha=alpha, bounds=None)
    return {"model": model, "auc_in": a.auc.mean, "auc_cross": b.auc.mean, "drop": iv.mean, "drop_low": iv.low,
            "drop_high": iv.high, "p": two_sided_p(iv.mean, iv.se, iv.df), "runs": iv.n_runs, "se": iv.se,
            "df": iv.df}


def cross_domain_drops(stats: Statistics, *, in_domain: str | None, targets: Sequence[str], primary: str,
                       models: Sequence[str], alpha: float) -> pd.DataFrame:
    """Per model and cross-domain set: the AUC drop from the in-domain set (primary variant).

    Each run gives its own drop (same model on both sets); the pair part adds the two
    sets' DeLong variances (different pairs, independent). Holm over the models, per target
    set, with the Holm interval of each drop (it excludes 0 exactly when the reading is
    "drops" or "rises"). Empty without an in-domain set or targets.
    """
    if not in_domain or not targets:
        return pd.DataFrame()
    rows = []
    for target in targets:
        block = []
        for model in models:
            a = stats.models.get((in_domain, primary), {}).get(model)
            b = stats.models.get((target, primary), {}).get(model)
            if a is not None and b is not None:
                block.append(_drop(model, a, b, alpha) | {"in_domain": in_domain, "cross_domain": target})
        family = holm_family([r["drop"] for r in block], [r["se"] for r in block], [r["df"] for r in block],
                             [r["p"] for r in block], alpha)
        for r, h in zip(block, family):
            reading = ("drops" if r["drop"] > 0 else "rises") if h.rejected else "no clear change"
            rows.append(r | {"p_holm": h.p_holm, "reading": reading, "drop_holm_low": h.low, "drop_holm_high": h.high,
                             "holm_level": h.level})
    return pd.DataFrame(rows, columns=CROSS_DOMAIN_COLUMNS) if rows else pd.DataFrame()
