"""Statistics over repeated training runs: intervals that hold both sources of noise, and verdicts.

A loss trained with several seeds gives one score per test pair and run. Its metric is
reported as the mean over runs, with an interval that holds

* the **training-run** variation: the sample variance of the per-run values, ``s²/n``
  (what a rerun with other seeds moves), and
* the **test-pair** variation: the sampling variance of the *run-averaged* metric over
  the test pairs (what another draw of test pairs moves),

    SE² = s²_runs / n + Var_pairs,    interval = mean ± t(ν; 1 - α/2) · SE,

with ν from Welch–Satterthwaite (the run part has n - 1 degrees of freedom; with few
seeds the t quantile widens the interval accordingly). ``Var_pairs`` is computed per
metric:

* **AUC**: DeLong's variance of the run-averaged structural components (placement
  values): exact, no resampling. The AUC averaged over runs is the mean of the averaged
  components, so its variance over pairs is that of a single AUC with those components.
* **LFW-protocol accuracy**: the spread of the run-averaged per-fold accuracies over the
  k identity-disjoint folds, ``var_f / k`` with k - 1 degrees of freedom (the protocol's
  own error bar, which also respects that pairs sharing identities are not independent).
* **EER, TPR@FPR**: a label-stratified bootstrap of the pairs (the same resamples for
  every run, so the run average is resampled as a whole).

With one run (a pretrained model, or a single seed) there is no run variance to
estimate: the interval is the pair part alone and the result says so (``n_runs == 1``).

**Verdicts** compare two models on the same pairs by the difference of their mean
AUCs. Its variance is ``s²_A/n_A + s²_B/n_B`` plus the DeLong variance of the
difference of the run-averaged components (paired: same pairs). A two-sided t test
gives a p-value per pair of models; Holm's step-down correction over all pairs in one
table (one test set and scoring variant) keeps the family-wise error at ``alpha``.
"A beats B" only when the corrected p-value is below ``alpha`` (equivalently, the
Holm-adjusted interval of the difference excludes zero); otherwise the two are "not
distinguishable". Every pair is tested; nothing is picked first and tested after.

Everything here is a pure function of per-pair scores (numpy and scipy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np
from scipy import stats

from pipeline.metrics import delong_components, lfw_accuracy

METHOD = (
    "mean over training runs ± t(ν)·SE with SE² = s²_runs/n + Var_pairs: s²_runs the variance of the "
    "per-run values (training seeds), Var_pairs the test-pair sampling variance of the run-averaged "
    "metric (AUC: DeLong on the run-averaged placement values; LFW-protocol accuracy and accuracy at the fixed "
    "threshold: spread of the run-averaged fold accuracies over the identity-disjoint folds; EER and TPR@FPR: "
    "label-stratified "
    "pair bootstrap), ν by Welch–Satterthwaite"
)
VERDICT_METHOD = (
    "difference of mean AUCs on the same pairs, SE² = s²_A/n_A + s²_B/n_B + DeLong variance of the "
    "difference of the run-averaged placements; two-sided t test (Welch–Satterthwaite ν); Holm's "
    "correction over every pair of models in the table"
)


# ------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class Interval:
    """A metric over runs: ``mean`` and its ``1 - alpha`` interval ``[low, high]``.

    ``per_run``: the value of each run (seed order); ``var_runs``: s²/n (``None`` with one
    run); ``var_pairs``: test-pair variance of the run average; ``se``, ``df``: as used.
    """

    mean: float
    low: float
    high: float
    se: float
    df: float
    per_run: tuple[float, ...]
    var_runs: float | None
    var_pairs: float

    @property
    def n_runs(self) -> int:
        return len(self.per_run)


def welch_df(components: Sequence[tuple[float, float]]) -> float:
    """Welch–Satterthwaite degrees of freedom of a sum of variance estimates.

    ``components``: ``(variance, its degrees of freedom)``; ``inf`` for a known variance.
    Returns ``inf`` when every part is known or the total is 0.
    """
    total = sum(v for v, _ in components)
    denom = sum(v * v / d for v, d in components if math.isfinite(d) and d > 0 and v > 0)
    if total <= 0 or denom <= 0:
        return math.inf
    return total * total / denom


def _quantile(df: float, alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2) if math.isinf(df) else stats.t.ppf(1 - alpha / 2, df))


def combine(per_run: Sequence[float], var_pairs: float, *, df_pairs: float = math.inf,
            alpha: float = 0.05, bounds: tuple[float, float] | None = (0.0, 1.0)) -> Interval:
    """Interval of the mean of ``per_run`` with a test-pair variance ``var_pairs`` added.

    ``bounds``: the metric's range; the interval is cut to it (a rate or an AUC cannot
    leave [0, 1], although mean ± t·SE can with two or three runs). ``None`` for a
    difference, which may be negative.
    """
    values = np.asarray(per_run, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"per-run values must be a non-empty list of finite numbers; got {per_run!r}")
    n = values.size
    var_runs = float(values.var(ddof=1)) / n if n > 1 else None
    parts = [(max(float(var_pairs), 0.0), df_pairs)]
    if var_runs is not None:
        parts.append((var_runs, n - 1))
    var = sum(v for v, _ in parts)
    df = welch_df(parts)
    se = math.sqrt(var)
    half = _quantile(df, alpha) * se
    mean = float(values.mean())
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, se, df, tuple(float(v) for v in values), var_runs, float(var_pairs))


# ------------------------------------------------------------------------------ AUC
def _placements(runs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-run AUC [R] and the run-averaged DeLong components V10 [m], V01 [n]."""
    aucs, v10s, v01s = [], [], []
    for scores in runs:
        auc, v10, v01 = delong_components(scores, labels)
        aucs.append(auc)
        v10s.append(v10)
        v01s.append(v01)
    return np.asarray(aucs), np.mean(v10s, axis=0), np.mean(v01s, axis=0)


def _delong_variance(v10: np.ndarray, v01: np.ndarray) -> float:
    return float(np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size)


def _check_runs(runs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    runs = np.atleast_2d(np.asarray(runs, dtype=np.float64))
    y = np.asarray(labels).astype(bool)
    if runs.shape[1] != y.size:
        raise ValueError(f"scores have {runs.shape[1]} pairs per run but there are {y.size} labels")
    if y.all() or not y.any():
        raise ValueError("labels must contain both same and different pairs")
    return runs, y


def auc_interval(runs: np.ndarray, labels: np.ndarray, *, alpha: float = 0.05) -> Interval:
    """AUC over runs. ``runs``: [R, N] scores of the same N pairs; ``labels``: [N] 0/1."""
    runs, y = _check_runs(runs, labels)
    aucs, v10, v01 = _placements(runs, y)
    return combine(aucs, _delong_variance(v10, v01), alpha=alpha)


@dataclass(frozen=True)
class Difference:
    """``a - b`` of two models' mean AUCs on the same pairs, with its interval and p-value."""

    a: str
    b: str
    diff: float
    low: float
    high: float
    se: float
    df: float
    p: float
    p_holm: float = math.nan
    verdict: str = ""


def auc_difference(runs_a: np.ndarray, runs_b: np.ndarray, labels: np.ndarray, *, a: str = "a", b: str = "b",
                   alpha: float = 0.05) -> Difference:
    """Paired comparison of the mean AUCs of two models scored on the same pairs."""
    runs_a, y = _check_runs(runs_a, labels)
    runs_b, _ = _check_runs(runs_b, labels)
    auc_a, v10_a, v01_a = _placements(runs_a, y)
    auc_b, v10_b, v01_b = _placements(runs_b, y)
    parts = [(_delong_variance(v10_a - v10_b, v01_a - v01_b), math.inf)]
    for aucs in (auc_a, auc_b):
        if aucs.size > 1:
            parts.append((float(aucs.var(ddof=1)) / aucs.size, aucs.size - 1))
    var = sum(v for v, _ in parts)
    df = welch_df(parts)
    diff = float(auc_a.mean() - auc_b.mean())
    se = math.sqrt(max(var, 0.0))
    half = _quantile(df, alpha) * se
    if se > 0:
        t = abs(diff) / se
        p = float(2 * (stats.norm.sf(t) if math.isinf(df) else stats.t.sf(t, df)))
    else:
        p = 1.0 if diff == 0 else 0.0
    return Difference(a, b, diff, diff - half, diff + half, se, df, p)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def verdicts(models: dict[str, np.ndarray], labels: np.ndarray, *, alpha: float = 0.05) -> list[Difference]:
    """Every pair of models in one table, Holm-corrected; each oriented higher mean AUC first.

    ``models``: name -> [R, N] scores of its runs on the same N pairs.
    Verdict: ``"a beats b"`` when the Holm-adjusted p-value is below ``alpha``, else
    ``"not distinguishable"``.
    """
    means = {name: float(np.mean([delong_components(s, labels)[0] for s in np.atleast_2d(runs)]))
             for name, runs in models.items()}
    raw = []
    for x, z in combinations(models, 2):
        a, b = (x, z) if means[x] >= means[z] else (z, x)
        raw.append(auc_difference(models[a], models[b], labels, a=a, b=b, alpha=alpha))
    adjusted = holm([d.p for d in raw])
    out = []
    for d, p_holm in zip(raw, adjusted):
        verdict = f"{d.a} beats {d.b}" if p_holm < alpha else "not distinguishable"
        out.append(Difference(d.a, d.b, d.diff, d.low, d.high, d.se, d.df, d.p, float(p_holm), verdict))
    return out


# ------------------------------------------------------------------- LFW accuracy
def accuracy_interval(runs: np.ndarray, labels: np.ndarray, folds: np.ndarray, *,
                      alpha: float = 0.05) -> tuple[Interval, np.ndarray]:
    """LFW-protocol accuracy over runs, and the [R, K] per-fold accuracies it came from.

    The pair part is the spread over the K identity-disjoint folds of the run-averaged
    fold accuracy: ``var_f(mean_r acc[r, f]) / K`` with K - 1 degrees of freedom.
    """
    runs, y = _check_runs(runs, labels)
    per_fold = np.asarray([lfw_accuracy(s, y, folds).accuracies for s in runs])
    k = per_fold.shape[1]
    fold_means = per_fold.mean(axis=0)
    var_pairs = float(fold_means.var(ddof=1) / k) if k > 1 else 0.0
    interval = combine(per_fold.mean(axis=1), var_pairs, df_pairs=(k - 1) if k > 1 else math.inf, alpha=alpha)
    return interval, per_fold


def fixed_accuracy_interval(runs: np.ndarray, thresholds: np.ndarray, labels: np.ndarray, folds: np.ndarray, *,
                            alpha: float = 0.05) -> Interval:
    """Accuracy at each run's fixed threshold (``score > threshold``), over runs.

    ``runs``: [R, N] scores; ``thresholds``: [R], one per run (chosen elsewhere, e.g. on the
    run's validation pairs, so nothing is fitted here). The pair part is, as for the
    LFW-protocol accuracy, the spread over the K identity-disjoint folds of the
    run-averaged fold accuracy, ``var_f / K`` with K - 1 degrees of freedom; with a single
    fold, the binomial-style variance of the run-averaged per-pair correctness over N pairs.
    """
    runs, y = _check_runs(runs, labels)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.size != runs.shape[0] or np.isnan(t).any():
        raise ValueError(f"need one threshold per run ({runs.shape[0]}), none NaN; got {thresholds!r}")
    correct = (runs > t[:, None]) == y[None, :]
    per_run = correct.mean(axis=1)
    averaged = correct.mean(axis=0)
    _, codes = np.unique(np.asarray(folds), return_inverse=True)
    k = int(codes.max()) + 1 if codes.size else 1
    if k > 1:
        fold_means = np.bincount(codes, averaged, k) / np.bincount(codes, None, k)
        return combine(per_run, float(fold_means.var(ddof=1) / k), df_pairs=k - 1, alpha=alpha)
    var_pairs = float(averaged.var(ddof=1) / averaged.size) if averaged.size > 1 else 0.0
    return combine(per_run, var_pairs, alpha=alpha)


# ----------------------------------------------------------- EER and TPR@FPR (pairs)
@dataclass
class RocStats:
    """EER and TPR at fixed FPRs of each run, and of B pair resamples of the run average."""

    eer: np.ndarray                                   # [R]
    tpr: dict[float, np.ndarray]                      # fpr -> [R] (highest TPR with FPR <= fpr)
    boot_eer: np.ndarray                              # [B] run-averaged, per resample
    boot_tpr: dict[float, np.ndarray] = field(default_factory=dict)  # fpr -> [B]


def _weighted_roc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray, fprs: Sequence[float]
                  ) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """EER [b] and achieved TPR@FPR {fpr: [b]} of ``b`` weightings ([b, N] pair counts) of one run.

    The ROC runs over the distinct scores (threshold rule ``score >= t``), starting at
    (0, 0). EER interpolates linearly where FPR crosses FNR (as :func:`pipeline.metrics.eer`);
    TPR@FPR is the highest TPR among ROC points with FPR <= fpr (one threshold achieves it).
    """
    order = np.argsort(-scores, kind="stable")
    ss = scores[order]
    ends = np.flatnonzero(np.append(ss[1:] != ss[:-1], True))  # last pair of each run of tied scores
    w = weights[:, order]
    both = np.cumsum(w, axis=1)[:, ends]                     # pairs at or above each threshold
    tp = np.cumsum(w * y[order], axis=1)[:, ends].astype(np.float64)
    fp = both - tp
    pos, neg = tp[:, -1], fp[:, -1]
    rows = np.arange(w.shape[0])
    d = fp * pos[:, None] - (pos[:, None] - tp) * neg[:, None]   # (FPR - FNR) * P * N, rises through 0 once
    i = np.argmax(d >= 0, axis=1)
    d_i, fp_i = d[rows, i], fp[rows, i]
    # the point before i; before the first distinct score it is the ROC's origin (0, 0): d = -P N
    d_prev = np.where(i > 0, d[rows, np.maximum(i - 1, 0)], -pos * neg)
    fp_prev = np.where(i > 0, fp[rows, np.maximum(i - 1, 0)], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        lam = np.where(d_i == 0, 0.0, -d_prev / (d_i - d_prev))
    rate = np.where(d_i == 0, fp_i, fp_prev + lam * (fp_i - fp_prev)) / neg
    tprs = {}
    for f in fprs:
        count = (fp <= f * neg[:, None] + 1e-9).sum(axis=1)   # ROC points with FPR <= f, origin excluded
        tprs[f] = np.where(count > 0, tp[rows, np.maximum(count - 1, 0)], 0.0) / pos
    return rate, tprs


def roc_stats(runs: np.ndarray, labels: np.ndarray, fprs: Sequence[float], *, n_boot: int = 1000,
              seed: int = 0, chunk: int = 250) -> RocStats:
    """Per-run EER/TPR@FPR and their label-stratified pair bootstrap (same resamples for every run)."""
    runs, y = _check_runs(runs, labels)
    n = y.size
    one = np.ones((1, n), dtype=np.int64)
    eer, tpr = [], {f: [] for f in fprs}
    for scores in runs:
        e, t = _weighted_roc(scores, y, one, fprs)
        eer.append(e[0])
        for f in fprs:
            tpr[f].append(t[f][0])
    rng = np.random.default_rng([seed, 13])
    strata = [np.flatnonzero(y), np.flatnonzero(~y)]
    boot_eer = np.zeros(n_boot)
    boot_tpr = {f: np.zeros(n_boot) for f in fprs}
    for b0 in range(0, n_boot, chunk):
        b = min(chunk, n_boot - b0)
        draws = np.hstack([st[rng.integers(0, st.size, (b, st.size))] for st in strata])  # [b, N]
        flat = (np.arange(b)[:, None] * n + draws).ravel()
        weights = np.bincount(flat, minlength=b * n).reshape(b, n)
        for scores in runs:
            e, t = _weighted_roc(scores, y, weights, fprs)
            boot_eer[b0:b0 + b] += e / len(runs)
            for f in fprs:
                boot_tpr[f][b0:b0 + b] += t[f] / len(runs)
    return RocStats(np.asarray(eer), {f: np.asarray(v) for f, v in tpr.items()}, boot_eer, boot_tpr)
