"""The ROC, once: its integer counts, AUC, EER and TPR at fixed FPRs, for one score vector or for
B weightings of it (bootstrap resamples), and the ROC read on a grid of FPRs (the report's curves).

Every ROC here starts at (0, 0) (threshold +inf) and has one point per distinct score, rule
``score >= threshold``; tied scores form one point. :func:`_roc_counts` makes the counts,
:func:`_eer_crossing` finds the equal error rate on them and :func:`achieved_tpr` reads the highest
TPR with FPR at most a target: the score stage, the report's per-run and bootstrap figures and its
ROC curves all go through these three.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from pipeline.metrics.pairs import _check_pairs, _rank, _Ranked

DEFAULT_FPRS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)


def _roc_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer ROC ``(fp, tp)``, each [..., G + 1] starting at (0, 0), from the positives and
    negatives of each group of tied scores ([..., G], groups in descending score order; one ROC
    per row when 2-D)."""
    zero = np.zeros(pos.shape[:-1] + (1,), dtype=np.result_type(pos.dtype, np.int64))
    return (np.concatenate((zero, np.cumsum(neg, axis=-1)), axis=-1),
            np.concatenate((zero, np.cumsum(pos, axis=-1)), axis=-1))


def _roc_from_ranked(r: _Ranked) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, each [G + 1]: the first point is (0, 0) at threshold +inf."""
    fp, tp = _roc_counts(r.pos, r.neg)
    return fp / r.n_neg, tp / r.n_pos, np.concatenate(([np.inf], r.values))


def _weighted_groups(r: _Ranked, y_sorted: np.ndarray, w_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per group of tied scores ([B, G]) of B weightings of the pairs.

    ``w_sorted``: int64[B, N] pair counts (bootstrap resamples) in the descending order of ``r``;
    ``y_sorted``: bool[N] labels in that order.
    """
    wp = w_sorted * y_sorted
    wn = w_sorted - wp
    if r.starts.shape[0] != w_sorted.shape[1]:  # tied scores: sum within each tie group
        wp = np.add.reduceat(wp, r.starts, axis=1)
        wn = np.add.reduceat(wn, r.starts, axis=1)
    return wp, wn


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve, one point per distinct score.

    Args:
        scores: ndarray[N], labels: ndarray[N] (see module conventions).

    Returns:
        ``(fpr, tpr, thresholds)``, each ndarray[G + 1] for G distinct scores.
        ``thresholds`` is descending: ``+inf`` (nothing predicted same; point (0, 0))
        followed by the distinct scores; point i uses the rule ``score >= thresholds[i]``.
        Tied scores form a single point (the curve moves diagonally across a tie).
        Same as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    s, y = _check_pairs(scores, labels)
    return _roc_from_ranked(_rank(s, y))


def _auc_from_ranked(r: _Ranked) -> float:
    # Mann-Whitney: each (pos, neg) pair counts 1 if pos > neg, 1/2 if tied. Exact integer
    # arithmetic (twice the count), one division at the end.
    tp_before = np.cumsum(r.pos) - r.pos
    twice = 2 * int(np.dot(r.neg, tp_before)) + int(np.dot(r.neg, r.pos))
    return twice / (2.0 * r.n_pos * r.n_neg)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve, exact; ties count 1/2 (Mann-Whitney U / (P N)).

    Equals ``sklearn.metrics.roc_auc_score`` (to floating point rounding) and the
    trapezoidal area under :func:`roc_curve`. Cost: one sort, O(N log N).
    """
    s, y = _check_pairs(scores, labels)
    return _auc_from_ranked(_rank(s, y))


def _eer_crossing(fp: np.ndarray, tp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where FPR crosses FNR on each piecewise-linear ROC of integer counts ``fp``, ``tp`` [..., G + 1].

    Returns ``(i, lam, rate)``, each [...]: the crossing lies between points i - 1 and i, at
    weight ``lam`` from i - 1 (0 when it falls on point i), and ``rate`` is the EER there.
    d = (FPR - FNR) * P * N is computed in exact integers; it rises strictly from -P N at (0, 0)
    to +P N at (1, 1) (every ROC step adds to FPR or TPR), so it crosses zero exactly once and
    i >= 1.
    """
    p, n = tp[..., -1:], fp[..., -1:]
    d = fp * p - (p - tp) * n
    i = np.argmax(d >= 0, axis=-1)
    pick = i[..., None]
    d_i, d_prev = np.take_along_axis(d, pick, -1)[..., 0], np.take_along_axis(d, pick - 1, -1)[..., 0]
    fp_i, fp_prev = np.take_along_axis(fp, pick, -1)[..., 0], np.take_along_axis(fp, pick - 1, -1)[..., 0]
    on_point = d_i == 0
    lam = np.where(on_point, 0.0, -d_prev / np.where(on_point, 1, d_i - d_prev))
    rate = np.where(on_point, fp_i, fp_prev + lam * (fp_i - fp_prev)) / n[..., 0]
    return i, lam, rate


def _eer_from_ranked(r: _Ranked) -> tuple[float, float]:
    fp, tp = _roc_counts(r.pos, r.neg)
    i, lam, rate = (v.item() for v in _eer_crossing(fp, tp))
    thr = np.concatenate(([np.inf], r.values))
    if lam == 0.0:
        return float(rate), float(thr[i])
    t0, t1 = thr[i - 1], thr[i]
    threshold = t1 if not np.isfinite(t0) else t0 + lam * (t1 - t0)  # from (0, 0) at +inf: the first score
    return float(rate), float(threshold)


def eer(scores: Any, labels: Any) -> tuple[float, float]:
    """Equal error rate by linear interpolation on the ROC curve.

    Returns:
        ``(eer, threshold)``: the rate where FPR = FNR = 1 - TPR on the piecewise-linear
        ROC of :func:`roc_curve` (unique, see :func:`_eer_crossing`), and the score
        threshold linearly interpolated between the two bracketing ROC thresholds with
        the same weight (an observed score when the crossing falls on an ROC point;
        rule ``score >= threshold``). The threshold is approximate by nature.
    """
    s, y = _check_pairs(scores, labels)
    return _eer_from_ranked(_rank(s, y))


def min_negatives_for_fpr(fpr: float) -> int:
    """Negatives needed before TPR at FPR ``fpr`` is reported: ``ceil(1 / fpr)``.

    With fewer negatives, FPR = ``fpr`` corresponds to less than one false positive and
    the value would be pure interpolation between the first ROC points.
    """
    f = float(fpr)
    if not (0.0 < f <= 1.0):
        raise ValueError(f"FPR targets must be in (0, 1]; got {fpr!r}")
    return math.ceil(1.0 / f - 1e-9)  # tolerance: 1/1e-3 must give 1000, not 1001


def _last_at_most(fpr: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the last ROC point with FPR <= each target ([..., T]; >= 0 since FPR[0] = 0)."""
    if fpr.ndim == 1:
        return np.searchsorted(fpr, targets, side="right") - 1
    if targets.size == 0:
        return np.zeros(fpr.shape[:-1] + (0,), dtype=np.int64)
    return np.stack([(fpr <= f).sum(axis=-1) - 1 for f in targets], axis=-1)


def achieved_tpr(fpr: np.ndarray, tpr: np.ndarray, targets: Any) -> np.ndarray:
    """The highest TPR among the ROC points with FPR <= each target: a TPR one threshold achieves.

    ``fpr``, ``tpr``: [..., G + 1] ROCs starting at (0, 0) (one per row when 2-D, FPR
    non-decreasing along the last axis); ``targets``: [T]. Returns [..., T]. At an FPR where
    the ROC has a vertical run (tied scores or consecutive positives) the top of the run counts.
    """
    t = np.asarray(targets, dtype=np.float64).reshape(-1)
    return np.take_along_axis(tpr, _last_at_most(fpr, t), -1)


def _tpr_at_fpr_from_roc(fpr: np.ndarray, tpr: np.ndarray, n_neg: int,
                         targets: Sequence[float], interpolate: bool = True) -> dict[float, float | None]:
    out: dict[float, float | None] = {}
    for target in targets:
        f = float(target)
        if n_neg < min_negatives_for_fpr(f):
            out[f] = None
            continue
        j = int(_last_at_most(fpr, np.asarray([f]))[0])  # the point of achieved_tpr
        if not interpolate or fpr[j] == f or j == fpr.shape[0] - 1:
            out[f] = float(tpr[j])
        else:
            lam = (f - fpr[j]) / (fpr[j + 1] - fpr[j])
            out[f] = float(tpr[j] + lam * (tpr[j + 1] - tpr[j]))
    return out


def tpr_at_fpr(scores: Any, labels: Any,
               fprs: Sequence[float] = DEFAULT_FPRS, *, interpolate: bool = True) -> dict[float, float | None]:
    """TPR at fixed FPRs, linearly interpolated on the ROC of :func:`roc_curve`.

    With ``interpolate=False``: the highest TPR among the ROC points with FPR <= the
    target, a value one threshold actually achieves (the report's headline convention,
    :func:`achieved_tpr`).

    At an FPR where the ROC has a vertical run (tied scores or consecutive positives) the
    top of the run (highest TPR) is used. A target is ``None`` (unavailable) when there are
    fewer than ``ceil(1 / fpr)`` negative pairs (see :func:`min_negatives_for_fpr`), e.g.
    FPR 1e-4 needs 10,000 negatives.

    Returns:
        dict mapping each requested FPR (float) to the TPR in [0, 1] or ``None``.
    """
    s, y = _check_pairs(scores, labels)
    r = _rank(s, y)
    fpr, tpr, _ = _roc_from_ranked(r)
    return _tpr_at_fpr_from_roc(fpr, tpr, r.n_neg, fprs, interpolate)


def roc_on_grid(scores: Any, labels: Any, grid: Any) -> np.ndarray:
    """TPR of one score vector at each FPR of ``grid`` [T] (:func:`achieved_tpr`): the report's curves."""
    s, y = _check_pairs(scores, labels)
    fpr, tpr, _ = _roc_from_ranked(_rank(s, y))
    return achieved_tpr(fpr, tpr, grid)


def weighted_eer_and_tpr(scores: Any, labels: Any, weights: np.ndarray, fprs: Sequence[float]
                         ) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """EER [B] and achieved TPR@FPR ``{fpr: [B]}`` of B weightings of one score vector.

    ``weights``: int64[B, N] pair counts (bootstrap resamples; a row of ones is the vector
    itself). Same ROC, EER and TPR rules as :func:`eer` and :func:`tpr_at_fpr` with
    ``interpolate=False`` (no minimum number of negatives is imposed here).
    """
    s, y = _check_pairs(scores, labels)
    r = _rank(s, y)
    w = np.asarray(weights, dtype=np.int64)
    pos, neg = _weighted_groups(r, y[r.order], w[:, r.order])
    fp, tp = _roc_counts(pos, neg)
    _, _, rate = _eer_crossing(fp, tp)
    fpr, tpr = fp / fp[:, -1:], tp / tp[:, -1:]
    achieved = achieved_tpr(fpr, tpr, list(fprs))
    return rate, {float(f): achieved[:, k] for k, f in enumerate(fprs)}
