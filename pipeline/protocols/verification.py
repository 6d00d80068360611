"""ROC, TPR at FPR and AUC of many scored pairs (IJB-C: 15.7 million), from sorted scores.

The conventions are those of :mod:`pipeline.metrics` (its ``tpr_at_fpr(..., interpolate=False)``):
a pair is predicted genuine when ``score >= t`` for a threshold ``t`` among the observed scores, and
TPR at FPR ``f`` is the highest TPR among the thresholds whose FPR is at most ``f``. With the
impostor scores sorted, that is one look-up: if ``v`` is the (k+1)-th highest impostor score,
``k = floor(f * N)``, every threshold above ``v`` keeps at most k false positives and ``v`` itself
keeps more, so TPR@FPR = share of genuine scores ``> v`` (ties at ``v`` are rejected with it).
A level is reported as None when there are fewer than ``ceil(1 / f)`` impostor pairs
(:func:`pipeline.metrics.min_negatives_for_fpr`): the level is below what the pairs support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.metrics import min_negatives_for_fpr


@dataclass
class Verification:
    """Result of :func:`verification_metrics`.

    ``tpr``: FPR level -> TPR (None where unsupported); ``thresholds``: level -> the impostor score
    ``v`` that is rejected (genuine means ``score > v``); ``supported``: level -> whether there are
    ``ceil(1 / f)`` impostor pairs; ``auc``: ties count 1/2; ``roc``: (fpr, tpr, threshold) at about
    ``roc_points`` log-spaced FPRs from ``1 / n_neg`` to 1 (the achieved FPR of each point).
    """

    n_pos: int
    n_neg: int
    tpr: dict[float, float | None]
    thresholds: dict[float, float | None]
    supported: dict[float, bool]
    auc: float
    roc: pd.DataFrame


def supported(fpr: float, n_neg: int) -> bool:
    """Whether ``n_neg`` impostor pairs support an FPR of ``fpr`` (at least ``ceil(1 / fpr)``)."""
    return n_neg >= min_negatives_for_fpr(fpr)


def rejected_score(top_neg_desc: np.ndarray, n_neg: int, fpr: float) -> np.floating:
    """The impostor score ``v`` at FPR ``fpr``: the (k+1)-th highest of ``n_neg``, k = floor(fpr * n_neg);
    ``-inf`` when every pair may be accepted. ``top_neg_desc``: the highest impostor scores, descending
    (at least k + 1 of them). A scalar of the array's dtype: searching a float32 array with a float64
    value would convert the whole array."""
    k = math.floor(fpr * n_neg + 1e-9)
    if k >= n_neg:
        return top_neg_desc.dtype.type(-np.inf)
    if k >= len(top_neg_desc):
        raise ValueError(f"need the {k + 1} highest impostor scores, have {len(top_neg_desc)}")
    return top_neg_desc[k]


def tpr_at_fprs(top_neg_desc: np.ndarray, n_neg: int, pos_sorted: np.ndarray, fprs: Sequence[float], *,
                n_pos: int | None = None) -> tuple[dict[float, float | None], dict[float, float | None]]:
    """TPR (and the rejected score) at each FPR level (None where ``n_neg`` does not support it).

    ``pos_sorted``: the genuine scores ascending; ``n_pos``: the denominator when it is not
    ``len(pos_sorted)`` (open-set identification: probes whose mate is not at rank 1 never count).
    """
    n_pos = len(pos_sorted) if n_pos is None else n_pos
    tpr, thresholds = {}, {}
    for f in fprs:
        if not supported(f, n_neg) or n_pos == 0:
            tpr[f] = thresholds[f] = None
            continue
        v = pos_sorted.dtype.type(rejected_score(top_neg_desc, n_neg, f))
        tpr[f] = (len(pos_sorted) - int(np.searchsorted(pos_sorted, v, side="right"))) / n_pos
        thresholds[f] = float(v)
    return tpr, thresholds


def verification_metrics(scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float], *,
                         roc_points: int = 200) -> Verification:
    """ROC, TPR@FPR and AUC of ``scores`` [N] with ``labels`` [N] (bool, True = genuine).

    Cost: one sort of the impostor scores (a float32 copy) and of the genuine ones; no [N] float64
    arrays beyond that.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be matching 1-D arrays")
    neg = scores[~labels]
    pos = np.sort(scores[labels]).astype(neg.dtype, copy=False)
    neg.sort()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need genuine and impostor pairs; got {len(pos)} and {len(neg)}")
    if not (np.isfinite(pos).all() and np.isfinite(neg[[0, -1]]).all()):
        raise ValueError("scores must be finite")
    desc = neg[::-1]
    tpr, thresholds = tpr_at_fprs(desc, len(neg), pos, fprs)
    below = np.searchsorted(neg, pos, side="left").astype(np.float64)
    not_above = np.searchsorted(neg, pos, side="right").astype(np.float64)
    auc = float((below + not_above).sum() / (2.0 * len(pos) * len(neg)))
    grid = np.unique(np.concatenate([np.logspace(math.log10(1.0 / len(neg)), 0.0, roc_points), list(fprs)]))
    rows = []
    for f in grid:
        v = rejected_score(desc, len(neg), float(f))
        fp = len(neg) - int(np.searchsorted(neg, v, side="right"))
        tp = len(pos) - int(np.searchsorted(pos, v, side="right"))
        rows.append((fp / len(neg), tp / len(pos), float(v)))
    roc = pd.DataFrame(rows, columns=["fpr", "tpr", "threshold"]).drop_duplicates(ignore_index=True)
    return Verification(len(pos), len(neg), tpr, thresholds, {f: supported(f, len(neg)) for f in fprs}, auc, roc)
