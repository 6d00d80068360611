"""A fixed threshold: chosen once on labelled source pairs, applied unchanged to other pairs."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.metrics.pairs import _check_pairs, _rank
from pipeline.metrics.protocol import _confusion, _fit_fold_thresholds, _json_float


#: How :func:`choose_threshold` picks a threshold on the source pairs.
THRESHOLD_RULES = ("best_accuracy", "target_fpr")


def best_accuracy_threshold(scores: Any, labels: Any) -> float:
    """The threshold that maximises accuracy on these pairs (rule ``score > threshold``).

    Candidates are those of the LFW protocol: +inf (every pair different), the midpoints
    between consecutive distinct sorted scores, and -inf (every pair same). Among equally
    accurate candidates the smallest wins (as in :func:`lfw_accuracy`). Exact integer
    counting; one sort.
    """
    s, y = _check_pairs(scores, labels)
    r = _rank(s, y)
    distinct = r.values.shape[0] == s.shape[0]
    codes = np.zeros(s.shape[0], dtype=np.int64)
    return float(_fit_fold_thresholds(s[r.order], y[r.order], codes, None, 1, distinct)[0])


def target_fpr_threshold(scores: Any, labels: Any, target_fpr: float) -> float:
    """The lowest threshold whose false positive rate on these pairs is at most ``target_fpr``.

    With the rule ``score > threshold``, FPR(t) = #{different pairs with score > t} / N_neg
    falls as t rises; it is at most ``target_fpr`` exactly when at most
    ``k = floor(target_fpr * N_neg)`` negatives lie above t, i.e. for t at or above the
    (k + 1)-th highest negative score. That score is returned (an observed score: a pair
    scoring exactly the threshold is predicted different), or -inf when ``k >= N_neg``.
    A target below ``1 / N_neg`` gives the highest negative score (FPR 0); see
    :func:`min_negatives_for_fpr` for when the target is resolvable at all.
    """
    s, y = _check_pairs(scores, labels)
    f = float(target_fpr)
    if not (0.0 < f <= 1.0):
        raise ValueError(f"target_fpr must be in (0, 1]; got {target_fpr!r}")
    negatives = np.sort(s[~y])[::-1]
    allowed = math.floor(f * negatives.shape[0] + 1e-9)  # tolerance: 0.1 * 30 must allow 3
    if allowed >= negatives.shape[0]:
        return -math.inf
    return float(negatives[allowed])


def choose_threshold(scores: Any, labels: Any, rule: str, target_fpr: float | None = None) -> float:
    """A fixed threshold chosen on labelled source pairs by ``rule`` (see :data:`THRESHOLD_RULES`).

    ``best_accuracy``: :func:`best_accuracy_threshold`; ``target_fpr``:
    :func:`target_fpr_threshold` with ``target_fpr``. May be +-inf (predict all
    different / all same).
    """
    if rule == "best_accuracy":
        return best_accuracy_threshold(scores, labels)
    if rule == "target_fpr":
        if target_fpr is None:
            raise ValueError("rule 'target_fpr' needs target_fpr")
        return target_fpr_threshold(scores, labels, target_fpr)
    raise ValueError(f"unknown threshold rule {rule!r}; expected one of {', '.join(THRESHOLD_RULES)}")


def apply_threshold(scores: Any, threshold: float) -> np.ndarray:
    """Decisions at a fixed threshold: bool ndarray[N], True (same) iff ``score > threshold``.

    ``scores`` need no labels (unlabelled pairs are predicted too) but must be finite.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one score per pair); got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite to be compared with a threshold")
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold must not be NaN")
    return s > t


def threshold_report(scores: Any, labels: Any, threshold: float) -> dict:
    """Accuracy, counts and rates of the decisions ``score > threshold`` on labelled pairs.

    Returns ``{"threshold", "n_pairs", "accuracy", "tp", "fp", "tn", "fn", "tpr", "fpr"}``
    (threshold as :func:`_json_float` writes it: +-inf become ``"inf"`` / ``"-inf"``).
    """
    s, y = _check_pairs(scores, labels)
    counts = _confusion(apply_threshold(s, threshold), y)
    n_pos, n_neg = counts["tp"] + counts["fn"], counts["fp"] + counts["tn"]
    return {
        "threshold": _json_float(threshold),
        "n_pairs": int(s.shape[0]),
        "accuracy": (counts["tp"] + counts["tn"]) / s.shape[0],
        **counts,
        "tpr": counts["tp"] / n_pos,
        "fpr": counts["fp"] / n_neg,
    }
