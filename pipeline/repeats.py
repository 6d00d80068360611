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
* **LFW-protocol accuracy** (and accuracy at a fixed threshold): the spread of the
  run-averaged per-fold accuracies over the set's k folds, ``var_f / k`` with k - 1 degrees
  of freedom (the protocol's own error bar). Whether the folds are identity-disjoint (pairs
  sharing an identity stay in one fold) or label-stratified random folds depends on the set;
  the report says which for each.
* **EER, TPR@FPR**: a label-stratified bootstrap of the pairs (the same resamples for
  every run, so the run average is resampled as a whole).

With one run (a pretrained model, or a single seed) there is no run variance to
estimate: the interval is the pair part alone and the result says so (``n_runs == 1``);
a metric with neither part (rank-1 or N-way accuracy of one run) has no interval at all
(``low`` and ``high`` are NaN), never a zero-width one.

**Verdicts** compare two models on the same pairs by the difference of their mean
AUCs. Its variance is the DeLong variance of the difference of the run-averaged
components (paired: same pairs) plus the run part, either

* ``independent`` (default): ``s²_A/n_A + s²_B/n_B``, Welch–Satterthwaite ν: no assumption
  about how one seed's run of A relates to the same seed's run of B; or
* ``seed``: the variance of the per-seed differences, ``s²_{A-B}/n`` with n - 1 degrees of
  freedom, for two models trained with the same seeds (same initialisation stream, batch
  order and augmentation draws). It gains when the seed moves both losses alike, loses
  degrees of freedom (2 instead of up to 4 with three seeds) and is the only valid one when
  the runs of a seed are negatively related. Models without seeds (pretrained) stay
  independent.

A two-sided t test (:func:`two_sided_p`, the one p-value of this module and the report)
gives a p-value per pair of models; **Holm's** step-down correction over one *family* keeps
the family-wise error at ``alpha``. The family is one table: every pair of models on one
test set and scoring variant (tables are not corrected against each other). "A beats B"
only when the Holm-adjusted p-value is below ``alpha``; otherwise the two are "not
distinguishable". Beside the unadjusted 95% interval of each difference stands its
**Holm interval** (:func:`holm_family`): the interval at the level at which Holm's step
tested that pair, α/(m − i + 1) for the i-th smallest p-value among those Holm rejects, and
α/(m − k + 1) for every pair from the first one it keeps (k) on. It excludes 0 exactly when
the verdict says "beats" (Strassburger & Bretz's step-down intervals give the same
decisions). Every pair is tested; nothing is picked first and tested after.

Everything here is a pure function of per-pair scores (numpy and scipy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np
from scipy import stats

from pipeline.metrics import delong_components, lfw_accuracy, weighted_eer_and_tpr

PAIRINGS = ("independent", "seed")

METHOD = (
    "mean over training runs ± t(ν)·SE with SE² = s²_runs/n + Var_pairs: s²_runs the variance of the "
    "per-run values (training seeds), Var_pairs the test-pair sampling variance of the run-averaged "
    "metric (AUC: DeLong on the run-averaged placement values; LFW-protocol accuracy and accuracy at the fixed "
    "threshold: spread of the run-averaged fold accuracies over the set's folds; EER and TPR@FPR: "
    "label-stratified pair bootstrap), ν by Welch–Satterthwaite; with one run and no pair part (rank-1, N-way) "
    "no interval"
)


def verdict_method(pairing: str = "independent") -> str:
    """How verdicts are made, for the reports (``pairing``: see :data:`PAIRINGS`)."""
    runs = ("s²_A/n_A + s²_B/n_B (runs taken as independent)" if pairing == "independent" else
            "s²_(A−B)/n of the per-seed differences where both models ran the same seeds (report.pairing: seed; "
            "s²_A/n_A + s²_B/n_B otherwise)")
    return (f"difference of mean AUCs on the same pairs, SE² = {runs} + DeLong variance of the difference of "
            "the run-averaged placements; two-sided t test (Welch–Satterthwaite ν); Holm's correction within each "
            "table (one test set and scoring variant: every pair of its models is one family; tables are not "
            "corrected against each other); beside the unadjusted 95% interval, the Holm interval: the interval "
            "at the level at which Holm's step tested the pair, which excludes 0 exactly when the verdict says "
            "\"beats\"")


VERDICT_METHOD = verdict_method()


# ------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class Interval:
    """A metric over runs: ``mean`` and its ``1 - alpha`` interval ``[low, high]``.

    ``per_run``: the value of each run (seed order); ``var_runs``: s²/n (``None`` with one
    run); ``var_pairs``: test-pair variance of the run average; ``se``, ``df``: as used.
    ``low`` and ``high`` are NaN where there is no interval (one run and no pair part).
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


def t_quantile(df: float, alpha: float) -> float:
    """The two-sided critical value: t(ν; 1 - α/2), the normal one for ν = inf."""
    return float(stats.norm.ppf(1 - alpha / 2) if math.isinf(df) else stats.t.ppf(1 - alpha / 2, df))


def two_sided_p(estimate: float, se: float, df: float) -> float:
    """Two-sided p-value of "the true value is 0" for ``estimate`` with standard error ``se``
    and ``df`` degrees of freedom (t test; normal for ``df = inf``).

    With ``se = 0`` nothing varies: p = 1 for an estimate of exactly 0, else 0.
    ``|estimate| > t_quantile(df, a) * se`` exactly when p < a.
    """
    if se > 0:
        t = abs(estimate) / se
        return float(2 * (stats.norm.sf(t) if math.isinf(df) else stats.t.sf(t, df)))
    return 1.0 if estimate == 0 else 0.0


def combine(per_run: Sequence[float], var_pairs: float, *, df_pairs: float = math.inf,
            alpha: float = 0.05, bounds: tuple[float, float] | None = (0.0, 1.0)) -> Interval:
    """Interval of the mean of ``per_run`` with a test-pair variance ``var_pairs`` added.

    ``bounds``: the metric's range; the interval is cut to it (a rate or an AUC cannot
    leave [0, 1], although mean ± t·SE can with two or three runs). ``None`` for a
    difference, which may be negative. One run with no pair variance: no interval (NaN).
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
    mean = float(values.mean())
    if var_runs is None and var_pairs <= 0:
        low = high = math.nan
    else:
        half = t_quantile(df, alpha) * se
        low, high = mean - half, mean + half
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, se, df, tuple(float(v) for v in values), var_runs, float(var_pairs))


def _fold_part(fold_means: np.ndarray) -> tuple[float, float]:
    """Pair variance and its degrees of freedom from the run-averaged accuracy of each of k folds."""
    k = fold_means.size
    return (float(fold_means.var(ddof=1) / k), k - 1) if k > 1 else (0.0, math.inf)


# --------------------------------------------------------------------------- Holm
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


def holm_levels(pvalues: Sequence[float], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm-adjusted p-values [m] and the level of each hypothesis's Holm interval [m].

    With the p-values sorted and k the first rank Holm keeps (adjusted p >= ``alpha``): the
    i-th (i < k) gets α/(m − i), every rank from k on α/(m − k) (0-based ranks). A rejected
    hypothesis has p < α/(m − i) (its adjusted p-value is at least (m − i)·p), a kept one
    p >= α/(m − k); so the interval at that level excludes 0 exactly when Holm rejects.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = holm(p)
    m = p.size
    order = np.argsort(p, kind="stable")
    kept = adjusted[order] >= alpha
    k = int(np.argmax(kept)) if kept.any() else m
    levels = np.empty(m)
    for rank, i in enumerate(order):
        levels[i] = alpha / (m - min(rank, k))
    return adjusted, levels


@dataclass(frozen=True)
class HolmResult:
    """One hypothesis of a Holm family: adjusted p, the level of its interval, the interval, the decision."""

    p_holm: float
    level: float
    low: float
    high: float
    rejected: bool


def holm_family(estimates: Sequence[float], ses: Sequence[float], dfs: Sequence[float],
                pvalues: Sequence[float], alpha: float) -> list[HolmResult]:
    """Holm's decisions over one family and each estimate's Holm interval (see :func:`holm_levels`):
    ``estimate ± t(ν; 1 − level/2)·SE``, which excludes 0 exactly when the hypothesis is rejected."""
    adjusted, levels = holm_levels(pvalues, alpha)
    out = []
    for est, se, df, p_holm, level in zip(estimates, ses, dfs, adjusted, levels):
        half = t_quantile(df, float(level)) * se
        out.append(HolmResult(float(p_holm), float(level), est - half, est + half, bool(p_holm < alpha)))
    return out


# ------------------------------------------------------------------------------ AUC
@dataclass(frozen=True)
class Placements:
    """One model's runs on a table's pairs: per-run AUC [R], run-averaged DeLong components V10 [m], V01 [n]."""

    aucs: np.ndarray
    v10: np.ndarray
    v01: np.ndarray


def _placements(runs: np.ndarray, labels: np.ndarray) -> Placements:
    aucs, v10s, v01s = [], [], []
    for scores in runs:
        auc, v10, v01 = delong_components(scores, labels)
        aucs.append(auc)
        v10s.append(v10)
        v01s.append(v01)
    return Placements(np.asarray(aucs), np.mean(v10s, axis=0), np.mean(v01s, axis=0))


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
    pl = _placements(runs, y)
    return combine(pl.aucs, _delong_variance(pl.v10, pl.v01), alpha=alpha)


@dataclass(frozen=True)
class Difference:
    """``a - b`` of two models' mean AUCs on the same pairs: unadjusted interval, p-value, and
    (after :func:`verdicts`) Holm's adjusted p-value, the Holm interval and its level, the verdict.
    ``paired``: the run part came from per-seed differences."""

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
    holm_low: float = math.nan
    holm_high: float = math.nan
    holm_level: float = math.nan
    paired: bool = False


def _difference(a: str, pa: Placements, b: str, pb: Placements, *, alpha: float, paired: bool) -> Difference:
    parts = [(_delong_variance(pa.v10 - pb.v10, pa.v01 - pb.v01), math.inf)]
    if paired:
        if pa.aucs.size != pb.aucs.size:
            raise ValueError(f"{a} and {b}: pairing by seed needs the same runs; got {pa.aucs.size} and {pb.aucs.size}")
        per_seed = pa.aucs - pb.aucs
        if per_seed.size > 1:
            parts.append((float(per_seed.var(ddof=1)) / per_seed.size, per_seed.size - 1))
    else:
        for aucs in (pa.aucs, pb.aucs):
            if aucs.size > 1:
                parts.append((float(aucs.var(ddof=1)) / aucs.size, aucs.size - 1))
    var = sum(v for v, _ in parts)
    df = welch_df(parts)
    diff = float(pa.aucs.mean() - pb.aucs.mean())
    se = math.sqrt(max(var, 0.0))
    half = t_quantile(df, alpha) * se
    return Difference(a, b, diff, diff - half, diff + half, se, df, two_sided_p(diff, se, df), paired=paired)


def auc_difference(runs_a: np.ndarray, runs_b: np.ndarray, labels: np.ndarray, *, a: str = "a", b: str = "b",
                   alpha: float = 0.05, paired: bool = False) -> Difference:
    """Comparison of the mean AUCs of two models scored on the same pairs (``paired``: by seed,
    run k of A with run k of B; both need the same number of runs)."""
    runs_a, y = _check_runs(runs_a, labels)
    runs_b, _ = _check_runs(runs_b, labels)
    return _difference(a, _placements(runs_a, y), b, _placements(runs_b, y), alpha=alpha, paired=paired)


def verdicts(models: dict[str, np.ndarray], labels: np.ndarray, *, alpha: float = 0.05,
             pairing: str = "independent", seeds: dict[str, tuple | None] | None = None) -> list[Difference]:
    """Every pair of models in one table, Holm-corrected; each oriented higher mean AUC first.

    ``models``: name -> [R, N] scores of its runs on the same N pairs. ``pairing``:
    ``"independent"`` or ``"seed"``; with ``"seed"``, two models whose ``seeds`` (name -> the
    seeds of its runs in order, ``None`` for a model without seeds) are equal and more than
    one are compared by per-seed differences. Verdict: ``"a beats b"`` when the
    Holm-adjusted p-value is below ``alpha``, else ``"not distinguishable"``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}; got {pairing!r}")
    seeds = seeds or {}
    placements = {}
    for name, runs in models.items():
        runs, y = _check_runs(runs, labels)
        placements[name] = _placements(runs, y)
    raw = []
    for x, z in combinations(models, 2):
        a, b = (x, z) if placements[x].aucs.mean() >= placements[z].aucs.mean() else (z, x)
        same_seeds = seeds.get(a) is not None and seeds.get(a) == seeds.get(b) and len(seeds[a]) > 1
        raw.append(_difference(a, placements[a], b, placements[b], alpha=alpha,
                               paired=pairing == "seed" and same_seeds))
    family = holm_family([d.diff for d in raw], [d.se for d in raw], [d.df for d in raw], [d.p for d in raw], alpha)
    return [Difference(d.a, d.b, d.diff, d.low, d.high, d.se, d.df, d.p, h.p_holm,
                       f"{d.a} beats {d.b}" if h.rejected else "not distinguishable",
                       h.low, h.high, h.level, d.paired)
            for d, h in zip(raw, family)]


# ------------------------------------------------------------------- LFW accuracy
def accuracy_interval(runs: np.ndarray, labels: np.ndarray, folds: np.ndarray, *,
                      alpha: float = 0.05) -> tuple[Interval, np.ndarray]:
    """LFW-protocol accuracy over runs, and the [R, K] per-fold accuracies it came from.

    The pair part is the spread over the K folds of the run-averaged fold accuracy:
    ``var_f(mean_r acc[r, f]) / K`` with K - 1 degrees of freedom.
    """
    runs, y = _check_runs(runs, labels)
    per_fold = np.asarray([lfw_accuracy(s, y, folds).accuracies for s in runs])
    var_pairs, df_pairs = _fold_part(per_fold.mean(axis=0))
    interval = combine(per_fold.mean(axis=1), var_pairs, df_pairs=df_pairs, alpha=alpha)
    return interval, per_fold


def fixed_accuracy_interval(runs: np.ndarray, thresholds: np.ndarray, labels: np.ndarray, folds: np.ndarray, *,
                            alpha: float = 0.05) -> Interval:
    """Accuracy at each run's fixed threshold (``score > threshold``), over runs.

    ``runs``: [R, N] scores; ``thresholds``: [R], one per run (chosen elsewhere, e.g. on the
    run's validation pairs, so nothing is fitted here). The pair part is, as for the
    LFW-protocol accuracy, the spread over the K folds of the run-averaged fold accuracy,
    ``var_f / K`` with K - 1 degrees of freedom; with a single fold, the binomial-style
    variance of the run-averaged per-pair correctness over N pairs.
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
        var_pairs, df_pairs = _fold_part(np.bincount(codes, averaged, k) / np.bincount(codes, None, k))
        return combine(per_run, var_pairs, df_pairs=df_pairs, alpha=alpha)
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


def roc_stats(runs: np.ndarray, labels: np.ndarray, fprs: Sequence[float], *, n_boot: int = 1000,
              seed: int = 0, chunk: int = 250) -> RocStats:
    """Per-run EER/TPR@FPR and their label-stratified pair bootstrap (same resamples for every run).

    EER and TPR@FPR are those of :func:`pipeline.metrics.weighted_eer_and_tpr` (the achieved
    TPR: highest with FPR <= the target); a run itself is the weighting by ones.
    """
    runs, y = _check_runs(runs, labels)
    n = y.size
    one = np.ones((1, n), dtype=np.int64)
    eer, tpr = [], {f: [] for f in fprs}
    for scores in runs:
        e, t = weighted_eer_and_tpr(scores, y, one, fprs)
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
            e, t = weighted_eer_and_tpr(scores, y, weights, fprs)
            boot_eer[b0:b0 + b] += e / len(runs)
            for f in fprs:
                boot_tpr[f][b0:b0 + b] += t[f] / len(runs)
    return RocStats(np.asarray(eer), {f: np.asarray(v) for f, v in tpr.items()}, boot_eer, boot_tpr)
