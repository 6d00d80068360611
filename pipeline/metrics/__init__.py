"""Face-verification metrics as pure, deterministic numpy functions.

Every number the score stage reports can be recomputed from a per-pair score file
with the functions below (numpy only at run time). One module per job:
:mod:`~pipeline.metrics.pairs` (input checks, scores ranked once), :mod:`~pipeline.metrics.roc`
(the one ROC implementation: AUC, EER, TPR@FPR, weighted ROCs of resamples),
:mod:`~pipeline.metrics.protocol` (LFW protocol), :mod:`~pipeline.metrics.thresholds` (fixed
thresholds), :mod:`~pipeline.metrics.bootstrap`, :mod:`~pipeline.metrics.delong`,
:mod:`~pipeline.metrics.identification` (rank-1) and :mod:`~pipeline.metrics.summary` (the
score stage's per-set record). Import from ``pipeline.metrics``.

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

from pipeline.metrics.bootstrap import bootstrap_ci, bootstrap_samples, paired_bootstrap_auc
from pipeline.metrics.delong import delong_components, delong_test
from pipeline.metrics.identification import rank1_identification
from pipeline.metrics.protocol import (FoldAccuracy, _json_float, confusion_at_threshold, lfw_accuracy,
                                       lfw_mean_accuracy, protocol_predictions)
from pipeline.metrics.roc import (DEFAULT_FPRS, achieved_tpr, eer, min_negatives_for_fpr, roc_auc, roc_curve,
                                  roc_on_grid, tpr_at_fpr, weighted_eer_and_tpr)
from pipeline.metrics.summary import fpr_key, verification_report
from pipeline.metrics.thresholds import (THRESHOLD_RULES, apply_threshold, best_accuracy_threshold,
                                         choose_threshold, target_fpr_threshold, threshold_report)

__all__ = [
    "DEFAULT_FPRS", "THRESHOLD_RULES", "FoldAccuracy", "_json_float", "achieved_tpr", "apply_threshold",
    "best_accuracy_threshold", "bootstrap_ci", "bootstrap_samples", "choose_threshold", "confusion_at_threshold",
    "delong_components", "delong_test", "eer", "fpr_key", "lfw_accuracy", "lfw_mean_accuracy",
    "min_negatives_for_fpr", "paired_bootstrap_auc", "protocol_predictions", "rank1_identification", "roc_auc",
    "roc_curve", "roc_on_grid", "target_fpr_threshold", "threshold_report", "tpr_at_fpr", "verification_report",
    "weighted_eer_and_tpr",
]
