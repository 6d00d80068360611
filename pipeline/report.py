"""Stage ``report``: compare the models over their training runs, in ``reports/``.

A *model* is a trained loss (one run per training seed, ``LOSS-SEED``) or a pretrained
model (one run). Everything is recomputed from the per-pair score files of the runs
params.yaml lists (``data/scores/RUN/<set>/<variant>.csv``), so a run left on disk by a
removed seed is ignored. Statistics are those of :mod:`pipeline.repeats`. Writes:

* ``comparison.csv``  model x test set x variant: mean, 95% interval and per-run values of
                      AUC, LFW-protocol accuracy, EER, TPR@FPR; FP/FN, rank-1, pairs; accuracy
                      (with interval), FP/FN, TPR/FPR at each run's fixed threshold and where that
                      threshold came from (``threshold_from``, ``threshold_on_itself``)
* ``runs.csv``        the same metrics for every single run
* ``verdicts.csv``    every pair of models per test set and variant: difference of mean
                      AUCs, interval, p-value, Holm-adjusted p-value, verdict
* ``comparison.md``   readable tables of the above, one section per test set
* ``cross_domain.csv`` per loss, the AUC drop from the in-domain to each cross-domain set
* ``summary.json``    a compact DVC metrics file (primary variant): mean AUC, its interval
                      and mean accuracy per test set and model, for ``dvc exp show``
* ``roc/<set>/<model>.csv``  the run-averaged ROC (DVC plots)
* ``figures/``        ROC overlays, per-seed strip plots, training curves, and per loss
                      ``angles/<loss>.png``: the angle distributions of the training faces at
                      the chosen epoch (the embed stage's ``train/angles.npz``, runs pooled)
* ``index.md``        all of it tied together; every sentence is computed from the numbers

Fixed thresholds come from each run's ``data/scores/RUN/thresholds.json`` (score stage).
Test sets without labels (an unlabelled pairs CSV) are in no table: ``index.md`` lists them
as "predicted only", and its "Prediction files" section says where every run's prediction
files are (DVC outputs of the score stages, not in git).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import RESERVED_SET_NAMES, Params
from pipeline.io import atomic_dir, atomic_file, write_csv, write_json, write_text
from pipeline.metrics import DEFAULT_FPRS, fpr_key, min_negatives_for_fpr, protocol_predictions, tpr_at_fpr
from pipeline.repeats import (METHOD, VERDICT_METHOD, Interval, accuracy_interval, auc_interval, combine,
                              fixed_accuracy_interval, holm, roc_stats)
from pipeline.score import variant_name

ROC_GRID = np.unique(np.concatenate([np.logspace(-4, 0, 81), np.linspace(0, 1, 101)]))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _interval_text(iv: Interval | None, digits: int = 4) -> str:
    if iv is None:
        return "–"
    if math.isnan(iv.low):
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def _variant_label(variant: str) -> str:
    distance, norm = variant.split("_")
    return f"{distance}, test-time norm {'on' if norm == 'norm' else 'off'}"


# --------------------------------------------------------------------------- inputs
@dataclass
class Table:
    """The scores of every run of every model on one test set and variant, on common pairs.

    ``scores[model]``: [R, N] (runs in seed order); ``labels``, ``folds``: [N];
    ``pairs_total``: pairs in the set; ``pairs_missing``: pairs some run could not score;
    ``thresholds[model]``: each run's entry of its ``thresholds.json`` for this variant.
    """

    test_set: str
    variant: str
    scores: dict[str, np.ndarray]
    labels: np.ndarray
    folds: np.ndarray
    pairs_total: int
    pairs_missing: int
    thresholds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class WorkspaceRuns:
    """Reads a run's outputs from this workspace (the stages' files under data/ and reports/).

    ``sets``: the configured test sets (a removed set's folders stay on disk, since DVC does not
    delete the outputs of stages that no longer exist); None lists the folders found."""

    def __init__(self, sets: list[str] | None = None) -> None:
        self.sets = None if sets is None else sorted(sets)

    def test_sets(self, run: str) -> list[str]:
        if self.sets is not None:
            return self.sets
        folder = paths.scores_dir(run)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing; run `dvc repro` (the score stages of {run})")
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in RESERVED_SET_NAMES)

    def scores(self, run: str, test_set: str, variant: str) -> pd.DataFrame:
        path = paths.set_scores(run, test_set) / f"{variant}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `dvc repro` (the score stage of {run} and {test_set})")
        return pd.read_csv(path, dtype={"image_id1": str, "image_id2": str})

    def metrics(self, run: str) -> dict:
        """``{set: that set's metrics}`` of every scored set, plus ``thresholds``."""
        out: dict = {}
        folder = paths.metrics_dir(run)
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            entry = json.loads(path.read_text())
            out["thresholds"] = entry.pop("thresholds", out.get("thresholds"))
            out[path.stem] = entry
        return out

    def thresholds(self, run: str) -> dict[str, Any]:
        sets = self.test_sets(run)
        path = paths.thresholds_file(run, sets[0]) if sets else paths.scores_dir(run) / paths.THRESHOLDS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; rerun the score stages of {run} (dvc repro)")
        return json.loads(path.read_text())


def load_tables(runs: dict[str, list[str]], variants: list[str], source=None) -> list[Table]:
    """One :class:`Table` per labelled test set and scoring variant.

    ``runs``: model -> its runs; ``variants``: e.g. ``["cosine_norm", "l2_raw"]``;
    ``source``: where the runs' files are read (:class:`WorkspaceRuns` by default; the
    grid report reads finished DVC experiments). The pairs every run could score are kept.
    Sets without labels (see :func:`predicted_only_sets`) have no table.
    """
    source = source or WorkspaceRuns()
    tables = []
    first_run = next(iter(runs.values()))[0]
    unlabelled = predicted_only_sets(runs, variants, source)
    thresholds = {run: source.thresholds(run) for model in runs for run in runs[model]}
    for test_set in [name for name in source.test_sets(first_run) if name not in unlabelled]:
        for variant in variants:
            frames = {run: source.scores(run, test_set, variant) for model in runs for run in runs[model]}
            base = frames[first_run]
            keys = base[["image_id1", "image_id2"]]
            scored = np.ones(len(base), dtype=bool)
            for run, frame in frames.items():
                if len(frame) != len(base) or not frame[["image_id1", "image_id2"]].equals(keys):
                    raise ValueError(f"{test_set}: the pairs scored by {run} differ from those of {first_run}; "
                                     "models are compared on the same pairs (rerun the score stages)")
                scored &= (frame["status"] == "scored").to_numpy()
            scores = {model: np.stack([frames[run]["score"].to_numpy(dtype=np.float64)[scored] for run in runs[model]])
                      for model in runs}
            tables.append(Table(test_set, variant, scores, base["same"].to_numpy()[scored].astype(int),
                                base["fold"].to_numpy()[scored], len(base), int((~scored).sum()),
                                {model: [thresholds[run].get(variant, {}) for run in runs[model]] for model in runs}))
    return tables


def predicted_only_sets(runs: dict[str, list[str]], variants: list[str], source=None) -> dict[str, dict[str, int]]:
    """Test sets without labels: ``{set: {"pairs", "missing"}}`` (from the first run's per-pair file)."""
    source = source or WorkspaceRuns()
    first_run = next(iter(runs.values()))[0]
    out = {}
    for test_set in source.test_sets(first_run):
        frame = source.scores(first_run, test_set, variants[0])
        if frame["same"].isna().all():
            out[test_set] = {"pairs": int(len(frame)), "missing": int((frame["status"] != "scored").sum())}
    return out
    return tables


def params_variants(params: Params) -> list[str]:
    return [variant_name(d, n) for d in params.score.distances for n in params.score.normalize]


def _n_way_interval(values: list[float | None], *, alpha: float) -> Interval | None:
    """Mean (over the runs) N-way accuracy of the classifier head on a closed-set test, from the
    score stage's metrics; None unless every run has one (other sets, losses without a classifier)."""
    if not values or any(v is None for v in values):
        return None
    return combine([float(v) for v in values], 0.0, alpha=alpha)


# ---------------------------------------------------------------------- statistics
@dataclass
class ModelStats:
    model: str
    runs: list[str]
    auc: Interval
    accuracy: Interval
    accuracy_folds: np.ndarray          # [R, K]
    eer: Interval
    tpr: dict[float, Interval | None]   # achieved: highest TPR with FPR <= target (None: too few negatives)
    tpr_interpolated: dict[float, float | None]
    fp: float
    fn: float
    rank1: Interval | None
    fixed: "FixedStats | None" = None
    n_way: Interval | None = None       # N-way accuracy of the classifier head (closed-set test, classifier losses)
    label: str = ""                     # the model's display name (e.g. "softmax (train-norm)"); "" = the model


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


def model_stats(table: Table, model: str, runs: list[str], *, alpha: float, n_boot: int, seed: int,
                run_metrics: list[dict] | None = None) -> ModelStats:
    """Every metric of one model over its runs on one table (``run_metrics``: each run's metrics
    JSON from the score stage, for rank-1 and the head's N-way accuracy)."""
    run_metrics = run_metrics or [{} for _ in runs]
    scores, y, folds = table.scores[model], table.labels, table.folds
    n_neg = int((y == 0).sum())
    available = [f for f in DEFAULT_FPRS if n_neg >= min_negatives_for_fpr(f)]
    auc = auc_interval(scores, y, alpha=alpha)
    accuracy, per_fold = accuracy_interval(scores, y, folds, alpha=alpha)
    roc = roc_stats(scores, y, available, n_boot=n_boot, seed=seed)

    def with_pairs(per_run: np.ndarray, boot: np.ndarray) -> Interval:
        if n_boot < 2:  # no pair resampling asked for: the mean and the runs, no interval
            return replace(combine(per_run, 0.0, alpha=alpha), low=math.nan, high=math.nan)
        return combine(per_run, float(np.var(boot, ddof=1)), alpha=alpha)

    eer = with_pairs(roc.eer, roc.boot_eer)
    tpr = {f: (with_pairs(roc.tpr[f], roc.boot_tpr[f]) if f in available else None) for f in DEFAULT_FPRS}
    interpolated = {}
    for f in DEFAULT_FPRS:
        values = [tpr_at_fpr(s, y, [f], interpolate=True)[f] for s in scores]
        interpolated[f] = None if any(v is None for v in values) else float(np.mean(values))
    fp, fn = [], []
    for s in scores:
        pred = protocol_predictions(s, y, folds)
        fp.append(int((pred & (y == 0)).sum()))
        fn.append(int((~pred & (y == 1)).sum()))
    rank1_values = [m.get(table.test_set, {}).get("rank1") for m in run_metrics]
    rank1 = (combine([float(v) for v in rank1_values], 0.0, alpha=alpha)
             if rank1_values and all(v is not None for v in rank1_values) else None)
    return ModelStats(model, runs, auc, accuracy, per_fold, eer, tpr, interpolated, float(np.mean(fp)),
                      float(np.mean(fn)), rank1, fixed_stats(table, model, alpha=alpha),
                      n_way=_n_way_interval([m.get(table.test_set, {}).get("n_way_accuracy") for m in run_metrics],
                                            alpha=alpha))


VERDICT_COLUMNS = ["test_set", "variant", "a", "b", "auc_diff", "diff_low", "diff_high", "df", "p", "p_holm", "verdict"]


def verdict_table(table: Table, *, alpha: float) -> pd.DataFrame:
    """Every pair of models of one table (none with a single model), Holm-corrected."""
    from pipeline.repeats import verdicts

    rows = []
    for d in verdicts(table.scores, table.labels, alpha=alpha):
        rows.append({"test_set": table.test_set, "variant": table.variant, "a": d.a, "b": d.b, "auc_diff": d.diff,
                     "diff_low": d.low, "diff_high": d.high, "df": d.df, "p": d.p, "p_holm": d.p_holm,
                     "verdict": d.verdict})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _per_run(values: tuple[float, ...], digits: int = 4) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def comparison_frame(stats: dict[tuple[str, str], dict[str, ModelStats]], tables: list[Table],
                     params: Params) -> pd.DataFrame:
    rows = []
    for table in tables:
        for model, st in stats[(table.test_set, table.variant)].items():
            distance, norm = table.variant.split("_")
            row = {
                "model": model,
                "kind": "pretrained" if model in params.pretrained else "trained",
                "runs": len(st.runs),
                "test_set": table.test_set,
                "distance": distance,
                "normalize": norm == "norm",
                "variant": table.variant,
            }
            for name, iv in (("auc", st.auc), ("accuracy", st.accuracy), ("eer", st.eer)):
                row |= {name: iv.mean, f"{name}_low": iv.low, f"{name}_high": iv.high,
                        f"{name}_per_run": _per_run(iv.per_run)}
            for f in DEFAULT_FPRS:
                iv = st.tpr[f]
                key = f"tpr@{fpr_key(f)}"
                row |= {key: None if iv is None else iv.mean, f"{key}_low": None if iv is None else iv.low,
                        f"{key}_high": None if iv is None else iv.high,
                        f"{key}_interpolated": st.tpr_interpolated[f]}
            row |= {"fp": st.fp, "fn": st.fn, "rank1": None if st.rank1 is None else st.rank1.mean,
                    "n_way_accuracy": None if st.n_way is None else st.n_way.mean, "label": st.label or model,
                    "pairs_scored": int(table.labels.size), "pairs_missing": table.pairs_missing}
            fx = st.fixed
            acc = None if fx is None else fx.accuracy
            row |= {"fixed_accuracy": None if acc is None else acc.mean,
                    "fixed_accuracy_low": None if acc is None else acc.low,
                    "fixed_accuracy_high": None if acc is None else acc.high,
                    "fixed_accuracy_per_run": None if acc is None else _per_run(acc.per_run),
                    "fixed_fp": None if fx is None else fx.fp, "fixed_fn": None if fx is None else fx.fn,
                    "fixed_tpr": None if fx is None else fx.tpr, "fixed_fpr": None if fx is None else fx.fpr,
                    "threshold_per_run": None if fx is None or not fx.thresholds else _per_run(fx.thresholds, 6),
                    "threshold_from": None if fx is None else fx.source,
                    "threshold_rule": None if fx is None else fx.rule,
                    "threshold_on_itself": None if fx is None else fx.on_itself}
            rows.append(row)
    return pd.DataFrame(rows)


def runs_frame(stats: dict[tuple[str, str], dict[str, ModelStats]], tables: list[Table]) -> pd.DataFrame:
    rows = []
    for table in tables:
        for model, st in stats[(table.test_set, table.variant)].items():
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


# ------------------------------------------------------------------- cross-domain
def cross_domain(params: Params, tables: list[Table], stats, *, alpha: float,
                 models: list[str] | None = None) -> pd.DataFrame:
    """Per model and cross-domain set: the AUC drop from the in-domain set (primary variant).

    Each run gives its own drop (same model on both sets); the pair part adds the two
    sets' DeLong variances (different pairs, independent). Holm over the models, per set.
    ``models``: the models to compare (default: every model params.yaml lists).
    """
    report = params.report
    primary = variant_name(report.primary_distance, report.primary_normalize)
    if not report.in_domain or not report.cross_domain:
        return pd.DataFrame()
    rows = []
    for target in report.cross_domain:
        block = []
        for model in models if models is not None else params.runs:
            a = stats.get((report.in_domain, primary), {}).get(model)
            b = stats.get((target, primary), {}).get(model)
            if a is None or b is None:
                continue
            drops = np.asarray(a.auc.per_run) - np.asarray(b.auc.per_run)
            iv = combine(drops, a.auc.var_pairs + b.auc.var_pairs, alpha=alpha, bounds=None)
            from scipy import stats as sstats

            t = abs(iv.mean) / iv.se if iv.se > 0 else math.inf
            p = float(2 * (sstats.norm.sf(t) if math.isinf(iv.df) else sstats.t.sf(t, iv.df)))
            block.append({"model": model, "in_domain": report.in_domain, "cross_domain": target,
                          "auc_in": a.auc.mean, "auc_cross": b.auc.mean, "drop": iv.mean, "drop_low": iv.low,
                          "drop_high": iv.high, "p": p, "runs": iv.n_runs})
        adjusted = holm([r["p"] for r in block])
        for r, p_holm in zip(block, adjusted):
            r["p_holm"] = float(p_holm)
            r["reading"] = ("drops" if r["drop"] > 0 else "rises") if p_holm < alpha else "no clear change"
        rows.extend(block)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------- markdown
def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _model_label(model: str, st: ModelStats) -> str:
    return f"{st.label or model} ({len(st.runs)} run{'s' if len(st.runs) != 1 else ''})"


ON_ITSELF_MARK, FALLBACK_MARK = "‡", "†"


def _fixed_mark(fx: FixedStats | None) -> str:
    if fx is None:
        return ""
    return (FALLBACK_MARK if fx.fallback else "") + (ON_ITSELF_MARK if fx.on_itself else "")


def fixed_header(per_model: dict[str, ModelStats]) -> str | None:
    """``accuracy @ threshold from SOURCE (RULE)``: the requested source and rule of the table's models."""
    found = [s.fixed for s in per_model.values() if s.fixed is not None]
    if not found:
        return None
    return f"accuracy @ threshold from {found[0].requested} ({found[0].rule})"


def fixed_notes(per_model: dict[str, ModelStats], test_set: str) -> list[str]:
    """Footnotes for the marks of :func:`stats_markdown`."""
    notes = []
    fallback = sorted({s.fixed.source for s in per_model.values() if s.fixed is not None and s.fixed.fallback})
    if fallback:
        models = [m for m, s in per_model.items() if s.fixed is not None and s.fixed.fallback]
        notes.append(f"{FALLBACK_MARK} {', '.join(models)}: no validation pairs (pretrained), so the threshold "
                     f"was chosen on {' / '.join(fallback)} (score.threshold.fallback).")
    itself = [m for m, s in per_model.items() if s.fixed is not None and s.fixed.on_itself]
    if itself:
        notes.append(f"{ON_ITSELF_MARK} threshold chosen on {test_set} itself ({', '.join(itself)}): its accuracy "
                     "there is optimistic, not a held-out figure.")
    missing = [m for m, s in per_model.items() if s.fixed is not None and s.fixed.accuracy is None]
    if missing:
        notes.append(f"no fixed threshold for {', '.join(missing)} (no labelled pairs to choose it on).")
    return notes


def stats_markdown(per_model: dict[str, ModelStats], test_set: str | None = None) -> str:
    order = sorted(per_model.values(), key=lambda s: -s.auc.mean)
    view = pd.DataFrame({
        "model": [_model_label(s.model, s) for s in order],
        "AUC mean [95%]": [_interval_text(s.auc) for s in order],
        "AUC per run": [_per_run(s.auc.per_run) for s in order],
        "accuracy (LFW protocol) [95%]": [_interval_text(s.accuracy) for s in order],
        "EER [95%]": [_interval_text(s.eer) for s in order],
        "TPR@FPR≤1e-2 [95%]": [_interval_text(s.tpr[1e-2]) for s in order],
        "TPR@FPR≤1e-3": [_fmt(None if s.tpr[1e-3] is None else s.tpr[1e-3].mean) for s in order],
        "rank-1": [_fmt(None if s.rank1 is None else s.rank1.mean) for s in order],
        "N-way (head)": [_fmt(None if s.n_way is None else s.n_way.mean) for s in order],
        "FP / FN": [f"{s.fp:.1f} / {s.fn:.1f}" for s in order],
    })
    header = fixed_header(per_model)
    if header is None:
        return markdown_table(view)
    position = view.columns.get_loc("accuracy (LFW protocol) [95%]") + 1
    view.insert(position, f"{header} [95%]", [
        ("–" if s.fixed is None or s.fixed.accuracy is None else _interval_text(s.fixed.accuracy))
        + _fixed_mark(s.fixed)
        for s in order])
    view.insert(position + 1, "FP / FN @ threshold", [
        "–" if s.fixed is None or s.fixed.fp is None else f"{s.fixed.fp:.1f} / {s.fixed.fn:.1f}" for s in order])
    view = view.rename(columns={"FP / FN": "FP / FN (LFW protocol)"})
    notes = fixed_notes(per_model, test_set or "")
    return "\n\n".join([markdown_table(view), *notes])


def verdict_sentences(v: pd.DataFrame, models: list[str], alpha: float) -> list[str]:
    """Computed readings of one table's verdicts."""
    beats = v[v["verdict"] != "not distinguishable"]
    n = len(v)
    if n == 0:
        return ["only one model: nothing to compare."]
    if beats.empty:
        if n == 1:
            return [f"the two models are not distinguishable (α = {alpha:g})."]
        return [f"no model beats another: all {n} pairs are not distinguishable (Holm, family-wise α = {alpha:g})."]
    beaten = set(beats["b"])
    top = [m for m in models if m not in beaten]
    lines = [f"not beaten by any other model: {', '.join(top)}."]
    for a, group in beats.groupby("a", sort=False):
        parts = [f"{r.b} (ΔAUC {r.auc_diff:+.4f} [{r.diff_low:+.4f}, {r.diff_high:+.4f}], Holm p = {r.p_holm:.2g})"
                 for r in group.itertuples()]
        lines.append(f"{a} beats {'; '.join(parts)}.")
    lines.append(f"{n - len(beats)} of {n} pairs are not distinguishable (Holm, family-wise α = {alpha:g}).")
    return lines


def verdicts_markdown(v: pd.DataFrame) -> str:
    view = pd.DataFrame({
        "A (higher mean AUC)": v["a"], "B": v["b"],
        "ΔAUC [95%]": [f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, lo, hi in zip(v["auc_diff"], v["diff_low"], v["diff_high"])],
        "p": [f"{p:.2g}" for p in v["p"]], "Holm p": [f"{p:.2g}" for p in v["p_holm"]], "verdict": v["verdict"],
    })
    return markdown_table(view)


def detection_table(sets: list[str]) -> pd.DataFrame:
    """Images in, faces kept, dropped (with reasons) and the mean landmark residual of each data set,
    from the detect and align stages' per-set summaries."""
    rows = []
    for name in sets:
        counts_path, align_path = paths.detection_counts(name), paths.alignment_stats(name)
        if not counts_path.is_file():
            continue
        c = json.loads(counts_path.read_text())
        align = json.loads(align_path.read_text()) if align_path.is_file() else {}
        reasons = ", ".join(f"{k}: {v}" for k, v in c["reasons"].items()) or "–"
        rows.append({"set": name, "images": c["images"], "faces kept": c["faces"], "dropped": c["dropped"],
                     "why dropped": reasons, "mean landmark residual (px)": _fmt(align.get("residual_mean_px"), 2)})
    return pd.DataFrame(rows)


def training_table(params: Params) -> pd.DataFrame:
    rows = []
    for loss in params.train_losses:
        found = [json.loads(p.read_text()) for run in params.runs[loss]
                 if (p := paths.train_report_dir(run) / "metrics.json").is_file()]
        if not found:
            continue
        states = [m.get("loss_state") or {} for m in found]
        state_keys = sorted(set().union(*states))
        state = ", ".join(
            f"{k} {np.mean([s[k] for s in states if k in s]):.3g}" for k in state_keys) or "–"
        rows.append({
            "loss": loss, "runs": len(found),
            "best epoch per run": " / ".join(str(m["best_epoch"]) for m in found),
            "checkpoint chosen on": ", ".join(sorted({m.get("selected_on", "validation") for m in found})),
            "validation AUC (mean)": _fmt(float(np.mean([m["best_val_auc"] for m in found]))),
            "final train loss (mean)": _fmt(float(np.mean([m["final_train_loss"] for m in found]))),
            "loss state at the end (mean)": state,
        })
    return pd.DataFrame(rows)


def _fixed_threshold_text(tables: list[Table], stats) -> list[str]:
    found = [st.fixed for table in tables for st in stats[(table.test_set, table.variant)].values()
             if st.fixed is not None]
    if not found:
        return []
    return [f"**Fixed threshold.** Beside the LFW-protocol accuracy (whose threshold is re-chosen on the other "
            f"folds of the same set), every run has one threshold per scoring variant, chosen on "
            f"{found[0].requested} by {found[0].rule} (`score.threshold`) and applied unchanged to every test set; "
            "the tables show the accuracy and FP / FN at it (mean over runs; FP / FN are pair counts). "
            f"{FALLBACK_MARK} marks a model without validation pairs (pretrained) whose threshold was chosen on a "
            f"test set instead; {ON_ITSELF_MARK} a threshold chosen on the very set it is shown for (optimistic). "
            "Each run's thresholds and where they came from: `data/scores/RUN/thresholds.json`."]


def prediction_files_section(params: Params, primary: str) -> list[str]:
    """Where every run's prediction files are (DVC outputs of the score stages)."""
    first_run = next(iter(params.runs.values()))[0]
    sets = WorkspaceRuns(list(params.data.tests)).test_sets(first_run)
    files = [paths.prediction_file(run, name) for runs in params.runs.values() for run in runs for name in sets]
    return ["## Prediction files", "",
            f"Every run's decision for every pair at its fixed threshold ({_variant_label(primary)}), one file per "
            "test set: `data/scores/RUN/<set>/<set>_<RUN>_predict.txt`, tab-separated with a header "
            "`path1 path2 score decision same` (decision 1 = same, 0 = different, n/a = an image without a face; "
            "same is empty where the set has no labels). They are DVC outputs of the score stages, not in git "
            "(`data/` is not): `dvc repro` writes them, `dvc pull` fetches them from a DVC remote.", "",
            f"<details><summary>{len(files)} files</summary>", "", *[f"- `{f}`" for f in files], "", "</details>", ""]


# ------------------------------------------------------------------------ figures
def _run_roc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """TPR of one run on :data:`ROC_GRID` (highest TPR with FPR <= each grid point)."""
    order = np.argsort(-scores, kind="stable")
    ss, ys = scores[order], y[order].astype(bool)
    ends = np.flatnonzero(np.append(ss[1:] != ss[:-1], True))
    tp = np.concatenate([[0], np.cumsum(ys)[ends]]) / ys.sum()
    fp = np.concatenate([[0], np.cumsum(~ys)[ends]]) / (~ys).sum()
    idx = np.searchsorted(fp, ROC_GRID, side="right") - 1
    return tp[idx]


def write_roc_csvs(tables: list[Table], primary: str, out_dir: Path) -> None:
    """``<set>/<model>.csv`` (fpr, tpr): the ROC averaged over the model's runs, primary variant."""
    for table in tables:
        if table.variant != primary:
            continue
        for model, scores in table.scores.items():
            tpr = np.mean([_run_roc(s, table.labels) for s in scores], axis=0)
            write_csv(out_dir / table.test_set / f"{model}.csv", pd.DataFrame({"fpr": ROC_GRID, "tpr": tpr}))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def plot_roc(params: Params, tables: list[Table], stats, out_dir: Path) -> list[Path]:
    """One figure per test set and variant: each model's runs (thin) and their average (thick)."""
    plt, sns = _pyplot()
    written = []
    backbone = params.model.backbone
    for table in tables:
        distance, norm = table.variant.split("_")
        fig, ax = plt.subplots(figsize=(6.4, 5))
        models = list(table.scores)
        palette = sns.color_palette("tab10", n_colors=max(len(models), 3))
        for colour, model in zip(palette, models):
            runs = [_run_roc(s, table.labels) for s in table.scores[model]]
            for tpr in runs if len(runs) > 1 else []:
                ax.plot(ROC_GRID, tpr, color=colour, lw=0.6, alpha=0.35)
            st = stats[(table.test_set, table.variant)][model]
            ax.plot(ROC_GRID, np.mean(runs, axis=0), color=colour, lw=1.8,
                    label=f"{st.label or model} (AUC {st.auc.mean:.3f}, {len(runs)} run{'s' if len(runs) > 1 else ''})")
        if params.report.log_fpr:
            ax.set_xscale("log")
            ax.set_xlim(left=max(1e-4, 0.5 / max(1, int((table.labels == 0).sum()))), right=1.0)
        else:
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("false positive rate" + (" (log)" if params.report.log_fpr else ""))
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{table.test_set}: {backbone}, {distance}, test-time norm {'on' if norm == 'norm' else 'off'}",
                     fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        target = out_dir / table.test_set / f"{backbone}_{distance}_{norm}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def plot_seeds(tables: list[Table], stats, primary: str, out_dir: Path) -> list[Path]:
    """Per test set: every run's AUC as a point, the mean and its 95% interval as a bar."""
    plt, sns = _pyplot()
    written = []
    for table in tables:
        if table.variant != primary:
            continue
        per_model = stats[(table.test_set, table.variant)]
        order = sorted(per_model, key=lambda m: -per_model[m].auc.mean)
        points = pd.DataFrame([{"model": m, "AUC": v} for m in order for v in per_model[m].auc.per_run])
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(order), 4))
        sns.stripplot(points, x="model", y="AUC", order=order, ax=ax, size=6, jitter=0.12, color="0.25", zorder=3)
        for x, m in enumerate(order):
            iv = per_model[m].auc
            ax.errorbar(x + 0.25, iv.mean, yerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="o", color="C3",
                        capsize=4, lw=1.5, zorder=4)
        ax.set_title(f"{table.test_set}: AUC per run (dots), mean and 95% interval (red)", fontsize=9)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        target = out_dir / f"{table.test_set}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def plot_training(params: Params, target: Path) -> bool:
    frames = []
    for loss in params.train_losses:
        for run in params.runs[loss]:
            path = paths.train_report_dir(run) / "history.csv"
            if path.is_file():
                frames.append(pd.read_csv(path).assign(loss=loss, run=run))
    if not frames:
        return False
    plt, sns = _pyplot()
    history = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(history, x="epoch", y="train_loss", hue="loss", ax=axes[0], errorbar=("pi", 100))
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (each loss on its own scale; band: range over runs)", fontsize=9)
    sns.lineplot(history, x="epoch", y="val_auc", hue="loss", ax=axes[1], errorbar=("pi", 100))
    axes[1].set_title("validation verification AUC (band: range over runs)", fontsize=9)
    fig.tight_layout()
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- readings
def readings(params: Params, tables: list[Table], stats, verdicts: pd.DataFrame, xd: pd.DataFrame) -> list[str]:
    report = params.report
    primary = variant_name(report.primary_distance, report.primary_normalize)
    lines = []
    for table in tables:
        if table.variant != primary:
            continue
        per_model = stats[(table.test_set, primary)]
        best = max(per_model.values(), key=lambda s: s.auc.mean)
        v = verdicts[(verdicts["test_set"] == table.test_set) & (verdicts["variant"] == primary)]
        sentences = verdict_sentences(v, sorted(per_model, key=lambda m: -per_model[m].auc.mean), report.alpha)
        lines.append(f"- **{table.test_set}** ({_variant_label(primary)}; {table.labels.size} pairs): highest mean "
                     f"AUC {best.model} {_interval_text(best.auc)}; " + " ".join(sentences))
    if not xd.empty:
        for target, block in xd.groupby("cross_domain", sort=False):
            counts = block["reading"].value_counts()
            words = {"drops": "AUC drops for", "rises": "AUC rises for", "no clear change": "no clear change for"}
            parts = [f"{words[w]} {counts[w]} of {len(block)} models" for w in words if counts.get(w, 0)]
            worst = block.loc[block["drop"].idxmax()]
            lines.append(
                f"- **cross-domain** ({block['in_domain'].iloc[0]} → {target}; the drop's interval must exclude 0 "
                f"after Holm over the models): " + "; ".join(parts)
                + f". Largest mean drop: {worst['model']} {worst['drop']:+.4f} "
                  f"[{worst['drop_low']:+.4f}, {worst['drop_high']:+.4f}]; mean over models {block['drop'].mean():+.4f}."
            )
    by_variant = {}
    for table in tables:
        for st in stats[(table.test_set, table.variant)].values():
            by_variant.setdefault(table.variant, []).append(st.auc.mean)
    if len(by_variant) > 1:
        means = sorted(((float(np.mean(v)), k) for k, v in by_variant.items()), reverse=True)
        line = ("- **distance / normalisation** (mean AUC over models and test sets): "
                + ", ".join(f"{k} {m:.4f}" for m, k in means) + ".")
        if {"cosine_norm", "cosine_raw"} <= set(by_variant):
            gap = max(abs(a - b) for a, b in zip(by_variant["cosine_norm"], by_variant["cosine_raw"]))
            line += f" Cosine with and without test-time normalisation differ by at most {gap:.1e} in AUC."
        lines.append(line)
    return lines


# ------------------------------------------------- labels, checkpoint choice, angle figures
IDENTIFICATION_NOTE = (
    "Identification: rank-1 is leave-one-out 1:N within the test set from the embeddings (every model). "
    "N-way (head) is the accuracy of the trained classifier head choosing among all training identities, "
    "shown for a closed-set test (a set whose identities are all training identities) and the losses with a "
    "classifier; \"–\" elsewhere (triplet and contrastive have no head). \"(train-norm)\" after a loss: "
    "its features were L2-normalised during training (loss param normalize / normalize_features).")

#: Loss params that switch on training-time L2 normalisation of the features (the label says so).
TRAIN_NORM_PARAMS = ("normalize", "normalize_features")


def model_labels(params: Params) -> dict[str, str]:
    """Display name of each model: the loss name, tagged " (train-norm)" when its recipe
    (``data/recipes/LOSS.json``) switches on training-time L2 normalisation of the features."""
    labels = {}
    for model in params.runs:
        path = paths.recipe_file(model)
        recipe = json.loads(path.read_text()) if model in params.train_losses and path.is_file() else {}
        loss_params = recipe.get("loss_params") or {}
        labels[model] = model + (" (train-norm)" if any(loss_params.get(k) for k in TRAIN_NORM_PARAMS) else "")
    return labels


def selection_warnings(params: Params, reported: list[str]) -> list[str]:
    """A warning box (Markdown lines) for every model whose checkpoints were chosen on a set
    that the report also shows as a test (``train.select_on``, recorded in the runs' metrics.json)."""
    lines = []
    for loss in params.train_losses:
        chosen: dict[str, list[str]] = {}
        for run in params.runs[loss]:
            path = paths.train_report_dir(run) / "metrics.json"
            on = json.loads(path.read_text()).get("selected_on", "validation") if path.is_file() else "validation"
            if on in reported:
                chosen.setdefault(on, []).append(run)
        for test_set, runs in chosen.items():
            lines.append(f"> **Warning: checkpoint chosen on a test set.** {loss} ({', '.join(runs)}) kept the epoch "
                         f"with the best verification AUC on **{test_set}** (`train.select_on`), which is also "
                         f"reported below as a test set: its {test_set} results are optimistically biased, not an "
                         "unbiased test. The default `select_on: validation` chooses on held-out training images.")
    return [*lines, ""] if lines else []


def plot_angles(params: Params, labels: dict[str, str], out_dir: Path) -> dict[str, dict[str, Any]]:
    """``out_dir/<loss>.png`` per trained loss whose runs have ``train/angles.npz`` (embed stage):
    histograms of the angle between each training face and its class centre, and between class
    centres (every pair, and each centre's nearest other one), the runs pooled. Returns per loss
    what the figure shows (means in degrees, runs, what a centre is)."""
    shown: dict[str, dict[str, Any]] = {}
    for loss in params.train_losses:
        found = [p for run in params.runs[loss] if (p := paths.embeddings_dir(run) / "train" / "angles.npz").is_file()]
        if not found:
            continue
        arrays: dict[str, list[np.ndarray]] = {"target": [], "between_centres": [], "nearest_centre": []}
        kinds = set()
        for path in found:
            with np.load(path, allow_pickle=False) as z:
                for key in arrays:
                    arrays[key].append(z[key])
                kinds.add(str(z["centre"]))
        pooled = {key: np.concatenate(values) for key, values in arrays.items()}
        centre = " / ".join(sorted(kinds))
        plt, sns = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        bins = np.linspace(0, 180, 73)
        axes[0].hist(pooled["target"], bins=bins, color="C0")
        axes[0].set_title(f"training face to its class centre (mean {pooled['target'].mean():.1f}°)", fontsize=9)
        axes[1].hist(pooled["between_centres"], bins=bins, color="C1", alpha=0.6, density=True,
                     label=f"every pair of classes (mean {pooled['between_centres'].mean():.1f}°)")
        axes[1].hist(pooled["nearest_centre"], bins=bins, color="C2", alpha=0.6, density=True,
                     label=f"nearest other class (mean {pooled['nearest_centre'].mean():.1f}°)")
        axes[1].set_title("between class centres", fontsize=9)
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("angle (degrees)")
            ax.set_xlim(0, 180)
        axes[0].set_ylabel("training faces")
        axes[1].set_ylabel("density")
        fig.suptitle(f"{labels.get(loss, loss)}: angles at the chosen epoch, {len(found)} run"
                     f"{'s' if len(found) != 1 else ''} pooled; class centre = {centre}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / f"{loss}.png", dpi=100)
        plt.close(fig)
        shown[loss] = {"label": labels.get(loss, loss), "runs": len(found), "centre": centre,
                       "target": float(pooled["target"].mean()),
                       "between": float(pooled["between_centres"].mean()),
                       "nearest": float(pooled["nearest_centre"].mean())}
    return shown


def angles_markdown(angles: dict[str, dict[str, Any]]) -> list[str]:
    """The index.md section linking the angle figures, with their means."""
    if not angles:
        return []
    view = pd.DataFrame({
        "loss": [a["label"] for a in angles.values()],
        "runs pooled": [a["runs"] for a in angles.values()],
        "class centre": [a["centre"] for a in angles.values()],
        "face to its centre (mean °)": [f"{a['target']:.1f}" for a in angles.values()],
        "between centres (mean °)": [f"{a['between']:.1f}" for a in angles.values()],
        "to the nearest other centre (mean °)": [f"{a['nearest']:.1f}" for a in angles.values()],
        "figure": [f"[angles/{loss}.png](figures/angles/{loss}.png)" for loss in angles],
    })
    return ["## Angle distributions (training faces, chosen epoch)", "",
            "As in the ArcFace paper: the angle between each training face's embedding and its class centre, "
            "and between class centres. A class centre is the classifier's class weight for the classifier "
            "losses, and the normalised mean of the class's normalised embeddings for the others (triplet, "
            "contrastive, sub-centre ArcFace). Every image of the training set (validation split included; a "
            "seeded sample of 50,000 in larger sets), each loss's runs pooled.", "", markdown_table(view), ""]


# ------------------------------------------------------------------------------ run
def run_report(params: Params, root: str | Path = paths.REPORTS) -> list[Path]:
    """Write every report file; returns their paths."""
    root = Path(root)
    report = params.report
    primary = variant_name(report.primary_distance, report.primary_normalize)
    source = WorkspaceRuns(list(params.data.tests))
    tables = load_tables(params.runs, params_variants(params), source)
    run_metrics = {run: source.metrics(run) for runs in params.runs.values() for run in runs}
    stats: dict[tuple[str, str], dict[str, ModelStats]] = {}
    verdict_frames = []
    for table in tables:
        stats[(table.test_set, table.variant)] = {
            # EER and TPR@FPR intervals need a pair bootstrap: the primary variant only (the costly part)
            model: model_stats(table, model, runs, alpha=report.alpha, seed=params.seeds.data,
                               n_boot=report.bootstrap if table.variant == primary else 0,
                               run_metrics=[run_metrics[run] for run in runs])
            for model, runs in params.runs.items()
        }
        verdict_frames.append(verdict_table(table, alpha=report.alpha))
    verdicts = pd.concat(verdict_frames, ignore_index=True) if verdict_frames else pd.DataFrame()
    labels = model_labels(params)
    for per_model in stats.values():
        for model, st in per_model.items():
            st.label = labels.get(model, model)
    comparison = comparison_frame(stats, tables, params)
    xd = cross_domain(params, tables, stats, alpha=report.alpha)
    written: list[Path] = []

    def out(name: str) -> Path:
        written.append(root / name)
        return root / name

    write_csv(out("comparison.csv"), comparison)
    write_csv(out("runs.csv"), runs_frame(stats, tables))
    write_csv(out("verdicts.csv"), verdicts)
    write_csv(out("cross_domain.csv"), xd)
    summary = {}
    for table in tables:
        if table.variant == primary:
            summary[table.test_set] = {
                model: {"auc": round(st.auc.mean, 6), "auc_low": round(st.auc.low, 6), "auc_high": round(st.auc.high, 6),
                        "accuracy": round(st.accuracy.mean, 6), "runs": len(st.runs)}
                | ({"accuracy_fixed": round(st.fixed.accuracy.mean, 6)}
                   if st.fixed is not None and st.fixed.accuracy is not None else {})
                for model, st in stats[(table.test_set, primary)].items()}
    write_json(out("summary.json"), summary)

    with atomic_dir(root / "roc") as tmp:
        write_roc_csvs(tables, primary, Path(tmp))
    with atomic_dir(root / "figures" / "roc") as tmp:
        roc_figures = [root / "figures" / "roc" / f.relative_to(tmp) for f in plot_roc(params, tables, stats, Path(tmp))]
    with atomic_dir(root / "figures" / "seeds") as tmp:
        seed_figures = [root / "figures" / "seeds" / f.relative_to(tmp) for f in plot_seeds(tables, stats, primary, Path(tmp))]
    written += roc_figures + seed_figures
    curves = root / "figures" / "training_curves.png"
    has_curves = plot_training(params, curves)
    with atomic_dir(root / "figures" / "angles") as tmp:
        angles = plot_angles(params, labels, Path(tmp))
    written += [root / "figures" / "angles" / f"{loss}.png" for loss in angles]

    sections_md = ["# Model comparison over training runs", "", f"Intervals: {METHOD}.", "",
                   f"Verdicts: {VERDICT_METHOD}.", ""]
    for table in tables:
        v = verdicts[(verdicts["test_set"] == table.test_set) & (verdicts["variant"] == table.variant)]
        sections_md += [f"## {table.test_set}: {_variant_label(table.variant)}", "",
                        stats_markdown(stats[(table.test_set, table.variant)], table.test_set), "",
                        verdicts_markdown(v) if len(v) else "", ""]
    write_text(out("comparison.md"), "\n".join(sections_md))

    seeds = params.seeds.train
    n_runs = {len(r) for m, r in params.runs.items() if m in params.train_losses}
    index = [
        "# facepipe report",
        "",
        f"Backbone `{params.model.backbone}`, {params.model.embedding_size}-D embeddings; losses "
        f"{', '.join(params.train_losses)}, each trained with {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))}); data seed {params.seeds.data}"
        + (f"; pretrained: {', '.join(params.pretrained)}" if params.pretrained else "")
        + ". Regenerated by `dvc repro`; do not edit by hand.",
        "",
    ]
    index += selection_warnings(params, sorted({t.test_set for t in tables}))
    if n_runs == {1}:
        index += ["> **One training run per loss:** the intervals and verdicts below hold test-pair variation "
                  "only, not the variation between training runs. Add seeds to `seeds.train` to measure it.", ""]
    index += ["## Readings", "", *readings(params, tables, stats, verdicts, xd), "",
              "## How to read the numbers", "",
              f"Each metric is the mean over a model's runs with a {1 - report.alpha:.0%} interval: {METHOD}. "
              f"Verdicts: {VERDICT_METHOD}; \"A beats B\" only when the Holm-adjusted p-value is below "
              f"{report.alpha:g}, otherwise \"not distinguishable\". TPR@FPR≤f is the highest TPR that one "
              "threshold reaches with FPR at most f (the interpolated value is in comparison.csv); it is "
              "left out where a set has fewer than 1/f negative pairs. EER and TPR@FPR get intervals on the "
              f"primary variant ({_variant_label(primary)}), where {report.bootstrap} pair resamples are drawn; the "
              "other variants show their mean over runs.", "",
              *_fixed_threshold_text(tables, stats), "",
              IDENTIFICATION_NOTE, "",
              f"## Comparison ({_variant_label(primary)}; every variant in [comparison.md](comparison.md), "
              "[comparison.csv](comparison.csv), single runs in [runs.csv](runs.csv))", ""]
    for table in tables:
        if table.variant != primary:
            continue
        v = verdicts[(verdicts["test_set"] == table.test_set) & (verdicts["variant"] == primary)]
        index += [f"### {table.test_set} ({table.labels.size} pairs scored, {table.pairs_missing} missing)", "",
                  stats_markdown(stats[(table.test_set, primary)], table.test_set), "",
                  f"![AUC per run](figures/seeds/{table.test_set}.png)", ""]
        if len(v):
            index += ["<details><summary>All pairwise verdicts</summary>", "", verdicts_markdown(v), "",
                      "</details>", ""]
    if not xd.empty:
        view = pd.DataFrame({
            "model": xd["model"], "runs": xd["runs"], "from → to": xd["in_domain"] + " → " + xd["cross_domain"],
            "AUC in": xd["auc_in"].map(_fmt), "AUC cross": xd["auc_cross"].map(_fmt),
            "drop [95%]": [f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, lo, hi in zip(xd["drop"], xd["drop_low"], xd["drop_high"])],
            "Holm p": [f"{p:.2g}" for p in xd["p_holm"]], "reading": xd["reading"]})
        index += ["## Cross-domain", "", markdown_table(view), ""]
    unlabelled = predicted_only_sets(params.runs, params_variants(params), source)
    if unlabelled:
        index += ["## Predicted only (no labels)", "",
                  *[f"- **{name}**: predicted only, {c['pairs']} pairs ({c['missing']} with an image without a face); "
                    "no labels, so in no table: see its prediction files below." for name, c in unlabelled.items()], ""]
    index += prediction_files_section(params, primary)
    det = detection_table(params.data_sets)
    if not det.empty:
        index += ["## Detection (images before and after MTCNN)", "", markdown_table(det), "",
                  "Aligned faces: " + ", ".join(f"[{name}](figures/contact_sheets/{name}.png)" for name in det["set"]),
                  ""]
    train = training_table(params)
    if not train.empty:
        index += ["## Training", "", markdown_table(train), ""]
        if has_curves:
            index += ["![training curves](figures/training_curves.png)", ""]
    index += angles_markdown(angles)
    index += ["## ROC curves (thin: single runs; thick: their average)", ""]
    suffix = f"{report.primary_distance}_{'norm' if report.primary_normalize else 'raw'}"
    for figure in roc_figures:
        if figure.stem.endswith(suffix):
            index.append(f"![{figure.parent.name}](figures/roc/{figure.parent.name}/{figure.name})")
    write_text(out("index.md"), "\n".join(index) + "\n")
    if has_curves:
        written.append(curves)
    return written
