"""DeLong's structural components of the AUC, and DeLong's test of two AUCs on the same pairs."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.metrics.pairs import _check_pairs, _group_starts


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
