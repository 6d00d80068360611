"""Every verification metric of one score vector, as the score stage writes it."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.metrics.bootstrap import bootstrap_ci
from pipeline.metrics.pairs import _check_pairs, _rank
from pipeline.metrics.protocol import _confusion, _json_float, _protocol, lfw_mean_accuracy
from pipeline.metrics.roc import (DEFAULT_FPRS, _auc_from_ranked, _eer_from_ranked, _roc_from_ranked,
                                  _tpr_at_fpr_from_roc, min_negatives_for_fpr, roc_auc)


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
