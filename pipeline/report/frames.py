"""The report's machine-readable tables: comparison.csv, runs.csv and summary.json."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.metrics import DEFAULT_FPRS, fpr_key
from pipeline.repeats import Interval
from pipeline.report.render import _per_run
from pipeline.report.statistics import FixedStats, ModelStats, Statistics


def _interval_columns(name: str, iv: Interval | None) -> dict[str, Any]:
    return {name: None if iv is None else iv.mean, f"{name}_low": None if iv is None else iv.low,
            f"{name}_high": None if iv is None else iv.high}


def _fixed_columns(fx: FixedStats | None) -> dict[str, Any]:
    acc = None if fx is None else fx.accuracy
    return {"fixed_accuracy": None if acc is None else acc.mean,
            "fixed_accuracy_low": None if acc is None else acc.low,
            "fixed_accuracy_high": None if acc is None else acc.high,
            "fixed_accuracy_per_run": None if acc is None else _per_run(acc.per_run),
            "fixed_fp": None if fx is None else fx.fp, "fixed_fn": None if fx is None else fx.fn,
            "fixed_tpr": None if fx is None else fx.tpr, "fixed_fpr": None if fx is None else fx.fpr,
            "threshold_per_run": None if fx is None or not fx.thresholds else _per_run(fx.thresholds, 6),
            "threshold_from": None if fx is None else fx.source,
            "threshold_rule": None if fx is None else fx.rule,
            "threshold_on_itself": None if fx is None else fx.on_itself}


def _comparison_row(model: str, st: ModelStats, kind: str, test_set: str, variant: str, pairs_scored: int,
                    pairs_missing: int) -> dict[str, Any]:
    distance, norm = variant.split("_")
    row = {"model": model, "kind": kind, "runs": len(st.runs), "test_set": test_set, "distance": distance,
           "normalize": norm == "norm", "variant": variant}
    for name, iv in (("auc", st.auc), ("accuracy", st.accuracy), ("eer", st.eer)):
        row |= _interval_columns(name, iv) | {f"{name}_per_run": _per_run(iv.per_run)}
    for f in DEFAULT_FPRS:
        key = f"tpr@{fpr_key(f)}"
        row |= _interval_columns(key, st.tpr[f]) | {f"{key}_interpolated": st.tpr_interpolated[f]}
    row |= {"fp": st.fp, "fn": st.fn, "rank1": None if st.rank1 is None else st.rank1.mean,
            "n_way_accuracy": None if st.n_way is None else st.n_way.mean, "label": st.label or model,
            "pairs_scored": pairs_scored, "pairs_missing": pairs_missing}
    return row | _fixed_columns(st.fixed)


def comparison_frame(stats: Statistics, pretrained: set[str] | dict) -> pd.DataFrame:
    """comparison.csv: one row per model, test set and variant (``pretrained``: the pretrained models)."""
    rows = []
    for table in stats.tables:
        for model, st in stats.of(table).items():
            rows.append(_comparison_row(model, st, "pretrained" if model in pretrained else "trained",
                                        table.test_set, table.variant, int(table.labels.size), table.pairs_missing))
    return pd.DataFrame(rows)


def runs_frame(stats: Statistics) -> pd.DataFrame:
    """runs.csv: the same metrics for every single run."""
    rows = []
    for table in stats.tables:
        for model, st in stats.of(table).items():
            for k, run in enumerate(st.runs):
                row = {"run": run, "model": model, "test_set": table.test_set, "variant": table.variant,
                       "auc": st.auc.per_run[k], "accuracy": st.accuracy.per_run[k], "eer": st.eer.per_run[k]}
                fx = st.fixed
                row["fixed_threshold"] = fx.thresholds[k] if fx is not None and fx.thresholds else None
                row["fixed_accuracy"] = (fx.accuracy.per_run[k] if fx is not None and fx.accuracy is not None
                                         else None)
                for f in DEFAULT_FPRS:
                    row[f"tpr@{fpr_key(f)}"] = None if st.tpr[f] is None else st.tpr[f].per_run[k]
                rows.append(row)
    return pd.DataFrame(rows)


def summary_json(stats: Statistics, primary: str) -> dict[str, dict[str, dict[str, Any]]]:
    """summary.json, a compact DVC metrics file (primary variant): mean AUC, its interval, mean
    accuracy (and at the fixed threshold) and the number of runs, per test set and model."""
    summary = {}
    for table in stats.tables:
        if table.variant != primary:
            continue
        summary[table.test_set] = {
            model: {"auc": round(st.auc.mean, 6), "auc_low": round(st.auc.low, 6), "auc_high": round(st.auc.high, 6),
                    "accuracy": round(st.accuracy.mean, 6), "runs": len(st.runs)}
            | ({"accuracy_fixed": round(st.fixed.accuracy.mean, 6)}
               if st.fixed is not None and st.fixed.accuracy is not None else {})
            for model, st in stats.of(table).items()}
    return summary
