"""Face-verification metrics as pure, deterministic numpy functions.

Every number the score stage reports can be recomputed from a per-pair score file
with the functions below (numpy only at run time).

Conventions
-----------
* ``scores``: ndarray[N] of finite floats, **higher = more likely the same identity**
  (for L2 the score is the negative distance, see :mod:`pipeline.distances`).
* ``labels``: ndarray[N] of 0/1 (or bool), 1 = same identity ("positive"), 0 = different.
* ``folds``: ndarray[N] of fold ids (integers or strings), one per pair.
* ROC thresholds are observed scores and a pair is predicted *same* iff
  ``score >= threshold`` (the usual ROC convention, as in scikit-learn).
* Protocol (LFW) thresholds are midpoints between observed scores and a pair is
  predicted *same* iff ``score > threshold`` (strict). Because a midpoint never equals
  an observed training score, strict and non-strict only differ for held-out scores
  that hit the threshold exactly.
* A *fixed* threshold (:func:`choose_threshold`) is chosen once on labelled source pairs
  (best accuracy, or the lowest threshold with FPR <= a target) and applied unchanged to
  other pairs with the same strict rule (:func:`apply_threshold`, :func:`threshold_report`).
* All inputs are validated: same length, labels only 0/1, both classes present, finite
  scores; otherwise ``ValueError`` naming the problem.
* Nothing is rounded here; rounding is the report's job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_FPRS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)

# Upper bound on the elements of the [B, N] weight matrices used by the vectorised
# bootstrap, so memory stays around a hundred MB whatever N is.
_BOOT_CHUNK_ELEMENTS = 2_000_000
# Upper bound on the elements of one [chunk, N] similarity block in rank-1.
_RANK1_CHUNK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------- validation
def _check_pairs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(scores float64[N], labels bool[N])`` or raise ValueError."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one score per pair); got shape {s.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per pair); got shape {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.shape[0] == 0:
        raise ValueError("no pairs: scores and labels are empty")
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise ValueError(f"scores must be real numbers; got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"scores must be finite; scores[{i}] = {s[i].item()!r} "
            f"({int(bad.sum())} non-finite in total)"
        )
    if y.dtype == np.bool_:
        yb = y
    else:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise ValueError(f"labels must be 0/1 numbers or bools; got dtype {y.dtype}")
        ok = (y == 0) | (y == 1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"labels must be 0 (different) or 1 (same); labels[{i}] = {y[i].item()!r}"
            )
        yb = y == 1
    n_pos = int(np.count_nonzero(yb))
    if n_pos == 0 or n_pos == yb.shape[0]:
        raise ValueError(
            "labels must contain both classes (1 = same, 0 = different); got "
            f"{n_pos} positive and {yb.shape[0] - n_pos} negative pairs"
        )
    return s, yb


def _fold_codes(folds: Any, n: int) -> tuple[np.ndarray, list]:
    """Map fold ids to codes 0..K-1 (sorted ids). Returns ``(codes int64[N], ids)``."""
    f = np.asarray(folds)
    if f.ndim != 1 or f.shape[0] != n:
        raise ValueError(f"folds must be 1-D with one fold id per pair ({n}); got shape {f.shape}")
    if not (np.issubdtype(f.dtype, np.integer) or f.dtype.kind in "UST"):
        raise ValueError(f"fold ids must be integers or strings; got dtype {f.dtype}")
    ids, codes = np.unique(f, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), [v.item() for v in ids]


# ------------------------------------------------------------------------ ranked scores
@dataclass(frozen=True)
class _Ranked:
    """Scores sorted once, descending, grouped by distinct value.

    ``order``: int[N] indices that sort the scores descending; ``values``: float[G] the
    distinct scores (descending); ``starts``: int[G] start of each group in sorted order;
    ``pos`` / ``neg``: int64[G] positives / negatives in each group.
    """

    order: np.ndarray
    values: np.ndarray
    starts: np.ndarray
    pos: np.ndarray
    neg: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())


def _group_starts(sorted_scores: np.ndarray) -> np.ndarray:
    new = np.empty(sorted_scores.shape[0], dtype=bool)
    new[:1] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new[1:])
    return np.flatnonzero(new)


def _rank(s: np.ndarray, y: np.ndarray) -> _Ranked:
    order = np.argsort(s)[::-1]  # ties are grouped below, so the tie order is irrelevant
    ss = s[order]
    starts = _group_starts(ss)
    ys = y[order].astype(np.int64)
    if starts.shape[0] == s.shape[0]:  # no ties: every group is one pair
        return _Ranked(order, ss, starts, ys, 1 - ys)
    pos = np.add.reduceat(ys, starts)
    sizes = np.diff(np.append(starts, s.shape[0]))
    return _Ranked(order, ss[starts], starts, pos, sizes - pos)


# ---------------------------------------------------------------------------------- ROC
def _roc_counts(r: _Ranked) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer ROC: ``(fp, tp, thresholds)``, each [G + 1], starting at (0, 0) / +inf."""
    tp = np.concatenate(([0], np.cumsum(r.pos)))
    fp = np.concatenate(([0], np.cumsum(r.neg)))
    return fp, tp, np.concatenate(([np.inf], r.values))


def _roc_from_ranked(r: _Ranked) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fp, tp, thr = _roc_counts(r)
    return fp / r.n_neg, tp / r.n_pos, thr


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


def _eer_from_ranked(r: _Ranked) -> tuple[float, float]:
    fp, tp, thr = _roc_counts(r)
    p, n = r.n_pos, r.n_neg
    # d = (FPR - FNR) * P * N in exact integers. It rises strictly from -P N at (0, 0) to
    # +P N at (1, 1) (every ROC step adds to FPR or TPR), so it crosses zero exactly once.
    d = fp * p - (p - tp) * n
    i = int(np.searchsorted(d, 0, side="left"))  # first point with d >= 0
    if d[i] == 0:
        return fp[i] / n, float(thr[i])
    lam = -d[i - 1] / (d[i] - d[i - 1])
    rate = (fp[i - 1] + lam * (fp[i] - fp[i - 1])) / n
    t0, t1 = thr[i - 1], thr[i]
    if not np.isfinite(t0):  # segment starts at (0, 0), threshold +inf
        threshold = t1
    else:
        threshold = t0 + lam * (t1 - t0)
    return float(rate), float(threshold)


def eer(scores: Any, labels: Any) -> tuple[float, float]:
    """Equal error rate by linear interpolation on the ROC curve.

    Returns:
        ``(eer, threshold)``: the rate where FPR = FNR = 1 - TPR on the piecewise-linear
        ROC of :func:`roc_curve` (unique, see the comment in the code), and the score
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


def _tpr_at_fpr_from_roc(fpr: np.ndarray, tpr: np.ndarray, n_neg: int,
                         targets: Sequence[float], interpolate: bool = True) -> dict[float, float | None]:
    out: dict[float, float | None] = {}
    for target in targets:
        f = float(target)
        if n_neg < min_negatives_for_fpr(f):
            out[f] = None
            continue
        # last ROC point with FPR <= f is the top of any vertical run at that FPR
        j = int(np.searchsorted(fpr, f, side="right")) - 1
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
    target, a value one threshold actually achieves (the report's headline convention).

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


# ------------------------------------------------------------------------ LFW protocol
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


# ------------------------------------------------------------------------ fixed threshold
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


# ---------------------------------------------------------------------------- bootstrap
def _strata(y: np.ndarray, codes: np.ndarray | None) -> list[np.ndarray]:
    """Index arrays of the resampling strata: label, or (fold, label) with folds."""
    keys = y.astype(np.int64) if codes is None else codes * 2 + y
    return [np.flatnonzero(keys == k) for k in np.unique(keys)]


def _draw(rng: np.random.Generator, strata: list[np.ndarray]) -> np.ndarray:
    """One stratified resample: each stratum resampled with replacement, same size."""
    return np.concatenate([st[rng.integers(0, st.shape[0], st.shape[0])] for st in strata])


def _weighted_auc(r: _Ranked, y_sorted: np.ndarray, w_sorted: np.ndarray) -> np.ndarray:
    """AUC of B weighted samples; ``w_sorted``: int64[B, N] pair counts in descending order.

    Same integer formula as :func:`_auc_from_ranked`, so a resample gives bit-identical
    AUC to running :func:`roc_auc` on the materialised resample.
    """
    wp = w_sorted * y_sorted
    wn = w_sorted - wp
    if r.starts.shape[0] != w_sorted.shape[1]:  # tied scores: sum within each tie group
        wp = np.add.reduceat(wp, r.starts, axis=1)
        wn = np.add.reduceat(wn, r.starts, axis=1)
    before = np.cumsum(wp, axis=1) - wp
    twice = 2 * np.einsum("bg,bg->b", wn, before) + np.einsum("bg,bg->b", wn, wp)
    return twice / (2.0 * wp.sum(axis=1) * wn.sum(axis=1))


def _weights_batch(rng: np.random.Generator, strata: list[np.ndarray], n: int,
                   b: int) -> np.ndarray:
    """int64[b, n] resample counts: row i = bincount of one :func:`_draw` of ``strata``."""
    flat = np.concatenate([i * n + _draw(rng, strata) for i in range(b)])
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def _positions(order: np.ndarray) -> np.ndarray:
    """Inverse permutation: ``position[i]`` = place of pair i in the sorted order."""
    position = np.empty(order.shape[0], dtype=np.int64)
    position[order] = np.arange(order.shape[0])
    return position


def _boot_auc(s: np.ndarray, y: np.ndarray, codes: np.ndarray | None, n_boot: int,
              rng: np.random.Generator) -> np.ndarray:
    r = _rank(s, y)
    n = s.shape[0]
    position = _positions(r.order)
    strata = [position[st] for st in _strata(y, codes)]  # same draws, sorted positions
    y_sorted = y[r.order]
    out = np.empty(n_boot)
    step = max(1, _BOOT_CHUNK_ELEMENTS // n)
    for b0 in range(0, n_boot, step):
        b = min(step, n_boot - b0)
        out[b0:b0 + b] = _weighted_auc(r, y_sorted, _weights_batch(rng, strata, n, b))
    return out


def _boot_lfw(s: np.ndarray, y: np.ndarray, folds: Any, n_boot: int,
              rng: np.random.Generator) -> np.ndarray:
    n = s.shape[0]
    codes, ids = (np.zeros(n, np.int64), [0]) if folds is None else _fold_codes(folds, n)
    k = len(ids)
    order = np.argsort(s)[::-1]
    ss, ys, cs = s[order], y[order], codes[order]
    distinct = bool(np.all(ss[1:] != ss[:-1]))
    position = _positions(order)
    strata = [position[st] for st in _strata(y, codes)]
    out = np.empty(n_boot)
    for i in range(n_boot):
        w = np.bincount(_draw(rng, strata), minlength=n)
        keep = w > 0
        ws, sk, yk, ck = w[keep], ss[keep], ys[keep], cs[keep]
        thr = _fit_fold_thresholds(sk, yk, ck, ws, k, distinct)
        out[i] = float(np.mean(_fold_accuracies(sk, yk, ck, thr, k, ws)))
    return out


def bootstrap_samples(metric_fn: Callable[..., float], scores: Any, labels: Any, *,
                      n_boot: int = 1000, seed: int = 0, folds: Any = None) -> np.ndarray:
    """Metric values on ``n_boot`` stratified bootstrap resamples of the pairs.

    Each resample draws, with replacement, as many pairs as there are in each stratum:
    the label (so both classes are always present), or (fold, label) when ``folds`` is
    given (so every fold keeps its size and class balance). ``metric_fn`` is called as
    ``metric_fn(scores, labels)`` or, with folds, ``metric_fn(scores, labels, folds)``.
    :func:`roc_auc` and :func:`lfw_mean_accuracy` are recognised and computed on the same
    resamples with a sort-once weighted implementation (identical numbers, much faster);
    :func:`roc_auc` is never given the folds (with folds they only define the strata).

    Returns:
        float ndarray[n_boot]. Deterministic for a given ``seed`` (numpy PCG64).
    """
    s, y = _check_pairs(scores, labels)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot!r}")
    n_boot = int(n_boot)
    rng = np.random.default_rng(seed)
    if metric_fn is roc_auc:
        codes = None if folds is None else _fold_codes(folds, s.shape[0])[0]
        return _boot_auc(s, y, codes, n_boot, rng)
    if metric_fn is lfw_mean_accuracy:
        return _boot_lfw(s, y, folds, n_boot, rng)
    codes = None if folds is None else _fold_codes(folds, s.shape[0])[0]
    f = None if folds is None else np.asarray(folds)
    strata = _strata(y, codes)
    out = np.empty(n_boot)
    for i in range(n_boot):
        idx = _draw(rng, strata)
        out[i] = metric_fn(s[idx], y[idx]) if f is None else metric_fn(s[idx], y[idx], f[idx])
    return out


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_ci(metric_fn: Callable[..., float], scores: Any, labels: Any, *,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 folds: Any = None) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of ``metric_fn``.

    Resampling as in :func:`bootstrap_samples`; the bounds are the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the resampled values (``np.quantile``, linear method).
    """
    values = bootstrap_samples(metric_fn, scores, labels, n_boot=n_boot, seed=seed, folds=folds)
    return _percentile_interval(values, alpha)


def paired_bootstrap_auc(scores_a: Any, scores_b: Any, labels: Any, *, n_boot: int = 1000,
                         seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Paired bootstrap of ``AUC(a) - AUC(b)`` for two models scored on the same pairs.

    Both models are evaluated on the same label-stratified resamples.

    Returns:
        ``{"auc_a", "auc_b", "diff", "low", "high", "p_value"}``: the point estimates,
        the percentile interval of the difference, and a two-sided bootstrap p-value
        ``min(1, 2 (min(#{d* <= 0}, #{d* >= 0}) + 1) / (n_boot + 1))`` (never 0; 1 when the
        two score vectors rank the pairs identically).
    """
    sa, y = _check_pairs(scores_a, labels)
    sb, _ = _check_pairs(scores_b, labels)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot!r}")
    n_boot, n = int(n_boot), sa.shape[0]
    ra, rb = _rank(sa, y), _rank(sb, y)
    pa, pb = _positions(ra.order), _positions(rb.order)
    strata = _strata(y, None)
    strata_a, strata_b = [pa[st] for st in strata], [pb[st] for st in strata]
    ya, yb = y[ra.order], y[rb.order]
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    step = max(1, _BOOT_CHUNK_ELEMENTS // n)
    for b0 in range(0, n_boot, step):
        b = min(step, n_boot - b0)
        flat_a, flat_b = [], []
        for i in range(b):  # one draw per resample, read in both sorted orders
            draws = [rng.integers(0, st.shape[0], st.shape[0]) for st in strata]
            flat_a.append(i * n + np.concatenate([st[d] for st, d in zip(strata_a, draws)]))
            flat_b.append(i * n + np.concatenate([st[d] for st, d in zip(strata_b, draws)]))
        wa = np.bincount(np.concatenate(flat_a), minlength=b * n).reshape(b, n)
        wb = np.bincount(np.concatenate(flat_b), minlength=b * n).reshape(b, n)
        diffs[b0:b0 + b] = _weighted_auc(ra, ya, wa) - _weighted_auc(rb, yb, wb)
    auc_a, auc_b = _auc_from_ranked(ra), _auc_from_ranked(rb)
    low, high = _percentile_interval(diffs, alpha)
    tail = min(int(np.count_nonzero(diffs <= 0)), int(np.count_nonzero(diffs >= 0)))
    p = min(1.0, 2.0 * (tail + 1) / (n_boot + 1))
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": auc_a - auc_b, "low": low, "high": high,
            "p_value": p}


# ------------------------------------------------------------------------------- DeLong
def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the average of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = _group_starts(xs)
    ends = np.append(starts[1:], x.shape[0])
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def delong_components(scores: Any, labels: Any) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the structural components V10 (per positive), V01 (per negative).

    Sun & Xu (2014): with midranks T_X (within positives), T_Y (within negatives) and
    T_Z (all pairs), V10 = (T_Z - T_X) / n for positives, V01 = 1 - (T_Z - T_Y) / m for
    negatives, AUC = mean(V10); m positives, n negatives. V10[i] is the share of negatives
    scored below positive i (ties 1/2), V01[j] the share of positives scored above negative j.
    """
    s, y = _check_pairs(scores, labels)
    x, z = s[y], s[~y]
    m, n = x.shape[0], z.shape[0]
    tz = _midranks(np.concatenate((x, z)))
    v10 = (tz[:m] - _midranks(x)) / n
    v01 = 1.0 - (tz[m:] - _midranks(z)) / m
    return float(v10.mean()), v10, v01


def delong_test(scores_a: Any, scores_b: Any, labels: Any) -> dict[str, float]:
    """DeLong et al. (1988) test of ``AUC(a) = AUC(b)`` for two models on the same pairs.

    Uses the O(N log N) midrank algorithm of Sun & Xu (2014). The variance of the
    difference is ``var(V10_a - V10_b) / m + var(V01_a - V01_b) / n`` (sample variances,
    ddof=1), which equals the usual ``c^T S c`` with S the DeLong covariance matrix.

    Returns:
        ``{"auc_a", "auc_b", "diff", "se", "z", "p_value"}``, two-sided normal p-value.
        When the standard error is 0 (e.g. identical score vectors): z = 0 and p = 1 if
        the difference is 0, else z = +-inf and p = 0.

    Raises:
        ValueError: bad inputs, or fewer than 2 positives or 2 negatives.
    """
    sa, y = _check_pairs(scores_a, labels)
    sb, _ = _check_pairs(scores_b, labels)
    m = int(np.count_nonzero(y))
    n = y.shape[0] - m
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positive and 2 negative pairs; got {m} and {n}")
    auc_a, v10_a, v01_a = delong_components(sa, y)
    auc_b, v10_b, v01_b = delong_components(sb, y)
    var = np.var(v10_a - v10_b, ddof=1) / m + np.var(v01_a - v01_b, ddof=1) / n
    diff = auc_a - auc_b
    se = math.sqrt(max(float(var), 0.0))
    if se > 0.0:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))
    elif diff == 0.0:
        z, p = 0.0, 1.0
    else:
        z, p = math.copysign(math.inf, diff), 0.0
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se": se, "z": z, "p_value": p}


# -------------------------------------------------------------------------- rank-1 (ID)
def rank1_identification(embeddings: Any, identities: Sequence[str]) -> float | None:
    """Closed-set rank-1 identification rate, leave-one-out.

    Every image whose identity has at least 2 images is a probe; its gallery is all the
    other images (singletons included, as distractors). The nearest neighbour by cosine
    similarity of L2-normalised embeddings (float64; ties go to the lower index) must have
    the probe's identity.

    Args:
        embeddings: ndarray[N, D] raw embeddings (any scale; normalised here).
        identities: N identity labels, compared as given.

    Returns:
        Fraction of probes answered correctly, or ``None`` if no identity has >= 2 images.
        Memory: the similarity matrix is built in [chunk, N] blocks of at most 4M floats.
    """
    e = np.asarray(embeddings)
    if e.ndim != 2 or e.shape[1] == 0:
        raise ValueError(f"embeddings must be a 2-D array [N, D] with D >= 1; got shape {e.shape}")
    if not (np.issubdtype(e.dtype, np.integer) or np.issubdtype(e.dtype, np.floating)):
        raise ValueError(f"embeddings must hold real numbers; got dtype {e.dtype}")
    ids = np.asarray(list(identities))
    if ids.ndim != 1 or ids.shape[0] != e.shape[0]:
        raise ValueError(f"need one identity per embedding: {e.shape[0]} embeddings, "
                         f"{ids.shape[0] if ids.ndim else 0} identities")
    x = e.astype(np.float64)
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"embeddings[{row}] contains a non-finite value")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"embeddings[{int(np.flatnonzero(norms == 0)[0])}] is a zero vector")
    x /= norms[:, None]
    _, codes, counts = np.unique(ids, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    probes = np.flatnonzero(counts[codes] >= 2)
    if probes.shape[0] == 0:
        return None
    n = x.shape[0]
    step = max(1, _RANK1_CHUNK_ELEMENTS // n)
    correct = 0
    for p0 in range(0, probes.shape[0], step):
        p = probes[p0:p0 + step]
        sim = x[p] @ x.T
        sim[np.arange(p.shape[0]), p] = -np.inf  # leave the probe itself out
        correct += int(np.count_nonzero(codes[np.argmax(sim, axis=1)] == codes[p]))
    return correct / probes.shape[0]


# ------------------------------------------------------------------------------- report
def _json_float(x: float) -> float | str:
    """Finite floats as is; +-inf as ``"inf"`` / ``"-inf"`` (``float()`` parses them back)."""
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def fpr_key(fpr: float) -> str:
    """Key used for TPR@FPR in reports, e.g. ``1e-3 -> "fpr_1e-03"`` (no dots, DVC-safe)."""
    return f"fpr_{float(fpr):.0e}"


def verification_report(scores: Any, labels: Any, folds: Any = None, *, n_boot: int = 1000,
                        seed: int = 0, alpha: float = 0.05,
                        fprs: Sequence[float] = DEFAULT_FPRS) -> dict:
    """All verification metrics of one score vector, as a JSON-serialisable dict.

    Keys: ``n_pairs, n_positive, n_negative, auc, auc_ci, eer, eer_threshold,
    accuracy_mean, accuracy_std, accuracy_per_fold, accuracy_ci, fold_ids,
    fold_thresholds, threshold_source, tpr_at_fpr, min_negatives, confusion, bootstrap``.

    * ``auc_ci`` / ``accuracy_ci``: ``[low, high]`` percentile intervals
      (:func:`bootstrap_ci` of :func:`roc_auc`, label-stratified, and of
      :func:`lfw_mean_accuracy`, (fold, label)-stratified), ``None`` when ``n_boot == 0``.
    * ``tpr_at_fpr``: ``{fpr_key(f): tpr or None}``, the highest TPR with FPR <= f (one
      threshold achieves it); ``tpr_at_fpr_interpolated`` the interpolated value;
      ``min_negatives`` the rule's counts.
    * ``confusion``: ``{tp, fp, tn, fn}`` of :func:`protocol_predictions`.
    * ``fold_thresholds``: infinite thresholds are written ``"inf"`` / ``"-inf"``.
    Values are unrounded Python floats/ints. ``folds=None`` means one fold (see
    :func:`lfw_accuracy`). Cost without bootstrap: one sort plus O(N) per fold.
    """
    s, y = _check_pairs(scores, labels)
    r = _rank(s, y)
    fpr, tpr, _ = _roc_from_ranked(r)
    eer_value, eer_thr = _eer_from_ranked(r)
    acc, codes = _protocol(s, y, folds, ranked=r)
    pred = s > np.asarray(acc.thresholds)[codes]
    tprs = _tpr_at_fpr_from_roc(fpr, tpr, r.n_neg, fprs, interpolate=False)
    tprs_interpolated = _tpr_at_fpr_from_roc(fpr, tpr, r.n_neg, fprs)
    auc_ci = acc_ci = None
    if n_boot:
        auc_ci = list(bootstrap_ci(roc_auc, s, y, n_boot=n_boot, seed=seed, alpha=alpha))
        acc_ci = list(bootstrap_ci(lfw_mean_accuracy, s, y, n_boot=n_boot, seed=seed,
                                   alpha=alpha, folds=folds))
    return {
        "n_pairs": int(s.shape[0]),
        "n_positive": r.n_pos,
        "n_negative": r.n_neg,
        "auc": _auc_from_ranked(r),
        "auc_ci": auc_ci,
        "eer": eer_value,
        "eer_threshold": eer_thr,
        "accuracy_mean": acc.mean,
        "accuracy_std": acc.std,
        "accuracy_per_fold": list(acc.accuracies),
        "accuracy_ci": acc_ci,
        "fold_ids": list(acc.fold_ids),
        "fold_thresholds": [_json_float(t) for t in acc.thresholds],
        "threshold_source": acc.threshold_source,
        "tpr_at_fpr": {fpr_key(f): v for f, v in tprs.items()},
        "tpr_at_fpr_interpolated": {fpr_key(f): v for f, v in tprs_interpolated.items()},
        "min_negatives": {fpr_key(f): min_negatives_for_fpr(f) for f in tprs},
        "confusion": _confusion(pred, y),
        "bootstrap": {"n_boot": int(n_boot), "seed": None if seed is None else int(seed),
                      "alpha": float(alpha)},
    }
