"""Label- (or fold-and-label-) stratified pair bootstrap, vectorised for AUC and the LFW protocol."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipeline.metrics.pairs import _check_pairs, _fold_codes, _rank, _Ranked
from pipeline.metrics.protocol import _fit_fold_thresholds, _fold_accuracies, lfw_mean_accuracy
from pipeline.metrics.roc import _auc_from_ranked, _weighted_groups, roc_auc

# Upper bound on the elements of the [B, N] weight matrices used by the vectorised
# bootstrap, so memory stays around a hundred MB whatever N is.
_BOOT_CHUNK_ELEMENTS = 2_000_000


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
    wp, wn = _weighted_groups(r, y_sorted, w_sorted)
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
