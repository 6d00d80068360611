"""The LFW protocol: per-fold thresholds chosen on the other folds, accuracy on the held-out fold."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.metrics.pairs import _check_pairs, _fold_codes, _rank, _Ranked


def _json_float(x: float) -> float | str:
    """Finite floats as is; +-inf as ``"inf"`` / ``"-inf"`` (``float()`` parses them back)."""
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass(frozen=True)
class FoldAccuracy:
    """Result of the LFW protocol (:func:`lfw_accuracy`).

    Attributes:
        accuracies: accuracy on each held-out fold, in fold-id order (fraction in [0, 1]).
        thresholds: the threshold used for each fold (chosen on the other folds);
            may be ``+inf`` (predict all different) or ``-inf`` (predict all same).
        fold_ids: fold ids, sorted.
        mean: unweighted mean of ``accuracies`` (folds count equally, as in LFW).
        std: population standard deviation of ``accuracies`` (``np.std``, ddof=0), as
            most published LFW code reports it.
        threshold_source: ``"other_folds"``, or ``"same_fold"`` when there is a single
            fold and its threshold had to be chosen on itself (optimistic estimate).
    """

    accuracies: tuple[float, ...]
    thresholds: tuple[float, ...]
    fold_ids: tuple
    mean: float
    std: float
    threshold_source: str

    def to_dict(self) -> dict:
        """JSON-ready dict; infinite thresholds become the strings ``"inf"``/``"-inf"``."""
        return {
            "accuracies": list(self.accuracies),
            "thresholds": [_json_float(t) for t in self.thresholds],
            "fold_ids": list(self.fold_ids),
            "mean": self.mean,
            "std": self.std,
            "threshold_source": self.threshold_source,
        }


def _midpoint(hi: float, lo: float) -> float:
    """Threshold t with lo <= t < hi (so ``hi > t`` and ``not lo > t``), near the middle."""
    t = hi / 2.0 + lo / 2.0  # no overflow, unlike (hi + lo) / 2
    return lo if t >= hi else t  # adjacent floats: no number strictly between


def _fit_fold_thresholds(ss: np.ndarray, ys: np.ndarray, cs: np.ndarray,
                         ws: np.ndarray | None, k_folds: int,
                         distinct: bool = False) -> np.ndarray:
    """Best threshold of each fold, chosen on the other folds.

    Inputs are in descending score order: ``ss`` float[M] scores, ``ys`` bool[M],
    ``cs`` int[M] fold codes, ``ws`` optional positive int pair weights (bootstrap
    counts); ``distinct=True`` promises that ``ss`` has no ties (skips the grouping).
    For fold k the candidates are +inf, the midpoints between consecutive distinct
    training scores, and -inf. With the training pairs in descending order, the number
    of correct training predictions at the threshold just below distinct score v is
    ``N_neg + c(v)``, ``c(v) = sum(+w for positives, -w for negatives, score >= v)``: a
    cumulative sum read at the last pair of each run of tied scores (+inf: c = 0).
    Among equally accurate candidates the smallest threshold wins. O(M) per fold after
    the sort; integer arithmetic, so ties between candidates are exact.
    """
    if ws is None:
        signed = ys.astype(np.int8) * np.int8(2) - np.int8(1)
    else:
        signed = np.where(ys, ws, -ws)
    thresholds = np.empty(k_folds, dtype=np.float64)
    for k in range(k_folds):
        if k_folds == 1:
            train_s, train_signed = ss, signed
        else:
            train = cs != k
            train_s, train_signed = ss[train], signed[train]
        cum = np.cumsum(train_signed, dtype=np.int64)
        if distinct:
            vals, curve = train_s, cum
        else:
            last = np.empty(train_s.shape[0], dtype=bool)  # last pair of each tie run
            np.not_equal(train_s[:-1], train_s[1:], out=last[:-1])
            last[-1:] = True
            vals, curve = train_s[last], cum[last]
        # candidate j (0 = +inf, j >= 1 = just below vals[j - 1]) scores curve[j - 1]
        if curve.max() < 0:
            j = 0
        else:
            j = curve.shape[0] - int(np.argmax(curve[::-1]))  # last max = smallest threshold
        if j == 0:
            thresholds[k] = np.inf
        elif j == vals.shape[0]:
            thresholds[k] = -np.inf
        else:
            thresholds[k] = _midpoint(vals[j - 1], vals[j])
    return thresholds


def _fold_accuracies(s: np.ndarray, y: np.ndarray, codes: np.ndarray, thresholds: np.ndarray,
                     k_folds: int, w: np.ndarray | None = None) -> np.ndarray:
    correct = (s > thresholds[codes]) == y
    if w is None:
        return np.bincount(codes, correct, k_folds) / np.bincount(codes, None, k_folds)
    return np.bincount(codes, w * correct, k_folds) / np.bincount(codes, w, k_folds)


def _protocol(s: np.ndarray, y: np.ndarray, folds: Any,
              ranked: _Ranked | None = None) -> tuple[FoldAccuracy, np.ndarray]:
    if folds is None:
        codes, ids = np.zeros(s.shape[0], dtype=np.int64), [0]
    else:
        codes, ids = _fold_codes(folds, s.shape[0])
    k = len(ids)
    if ranked is None:
        ranked = _rank(s, y)
    order = ranked.order
    distinct = ranked.values.shape[0] == s.shape[0]
    thr = _fit_fold_thresholds(s[order], y[order], codes[order], None, k, distinct)
    acc = _fold_accuracies(s, y, codes, thr, k)
    result = FoldAccuracy(
        accuracies=tuple(float(a) for a in acc),
        thresholds=tuple(float(t) for t in thr),
        fold_ids=tuple(ids),
        mean=float(np.mean(acc)),
        std=float(np.std(acc)),
        threshold_source="same_fold" if k == 1 else "other_folds",
    )
    return result, codes


def lfw_accuracy(scores: Any, labels: Any, folds: Any) -> FoldAccuracy:
    """Verification accuracy with the LFW protocol.

    For each fold, the threshold is chosen on the OTHER folds to maximise their accuracy,
    searched over the observed training scores: +inf, the midpoints between consecutive
    distinct sorted scores, and -inf (not a fixed grid). Ties between equally accurate
    thresholds go to the smallest. A pair is predicted same iff ``score > threshold``.
    Accuracy is then measured on the held-out fold; mean and population std (ddof=0)
    over folds. With a single fold (or ``folds=None``) the threshold is chosen on that
    fold itself and ``threshold_source`` says ``"same_fold"``.

    Args:
        scores, labels: ndarray[N] (module conventions). folds: ndarray[N] fold ids.

    Cost: one O(N log N) sort, then O(N) per fold.
    """
    s, y = _check_pairs(scores, labels)
    return _protocol(s, y, folds)[0]


def lfw_mean_accuracy(scores: Any, labels: Any, folds: Any = None) -> float:
    """Mean LFW-protocol accuracy (``lfw_accuracy(...).mean``): a scalar for bootstraps."""
    return lfw_accuracy(scores, labels, folds).mean


def confusion_at_threshold(scores: Any, labels: Any,
                           threshold: float | np.ndarray) -> dict[str, int]:
    """Counts of the predictions ``score > threshold`` (same) against the labels.

    Args:
        threshold: a scalar, or ndarray[N] with one threshold per pair.

    Returns:
        ``{"tp", "fp", "tn", "fn"}`` as ints (fp: different pairs predicted same).
    """
    s, y = _check_pairs(scores, labels)
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != s.shape[0]):
        raise ValueError(
            f"threshold must be a scalar or have one value per pair; got shape {t.shape}"
        )
    if np.isnan(t).any():
        raise ValueError("threshold must not be NaN")
    return _confusion(s > t, y)


def _confusion(pred: np.ndarray, y: np.ndarray) -> dict[str, int]:
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    return {"tp": tp, "fp": fp, "tn": int(y.shape[0]) - tp - fp - fn, "fn": fn}


def protocol_predictions(scores: Any, labels: Any, folds: Any) -> np.ndarray:
    """Predict every pair with its own fold's protocol threshold.

    Returns:
        bool ndarray[N]: ``score > thresholds[fold of the pair]`` (True = same), where the
        thresholds are those of :func:`lfw_accuracy` (chosen on the other folds).
    """
    s, y = _check_pairs(scores, labels)
    result, codes = _protocol(s, y, folds)
    return s > np.asarray(result.thresholds)[codes]
