"""Intervals and verdicts that resample subjects, not pairs.

Template pairs share templates and subjects, so a bootstrap over pairs treats dependent pairs as
independent and understates the variance. Here a resample draws S subjects with replacement (S the
number of subjects; weights ``w`` [S] = how often each was drawn) and keeps everything of a drawn
subject:

* a **genuine** pair of subject s counts ``w[s]`` times (once per draw of s);
* an **impostor** pair of subjects a and b counts ``w[a] * w[b]`` times (once per draw of a with
  each draw of b);
* an identification search (a probe template, or a probe image with one mate) of subject s counts
  ``w[s]`` times.

TPR@FPR of a resample uses the weighted counts with the conventions of
:mod:`pipeline.protocols.verification` (at most ``floor(f * N_w)`` weighted false positives, N_w the
weighted number of impostor pairs; a level is NaN when N_w < ``ceil(1 / f)``). It is computed from
sufficient statistics rather than by re-sorting the pairs: the impostor scores are sorted once (only
the top share a level can reach, all of them where a resample needs more), a resample's weighted
false positives are a cumulative sum of ``w[a] * w[b]`` along that order, its N_w is ``w C w`` with
C the impostor-pair counts per subject pair, and its genuine counts a cumulative sum along the
sorted genuine scores.

**Intervals** (:func:`subject_interval`): the per-run values and the resampling variance of the
run-averaged metric (the same resamples for every run) go to :func:`pipeline.repeats.combine`, as for
the project's other metrics. **Verdicts** (:func:`paired_verdicts`): the difference of two models'
mean values, its variance the resampling variance of the paired difference (same resamples for both)
plus each model's run variance, Welch-Satterthwaite degrees of freedom, a two-sided t test
(:func:`pipeline.repeats.two_sided_p`), and Holm's correction over every pair of models, with each
difference's Holm interval (:func:`pipeline.repeats.holm_family`).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

import numpy as np
import scipy.sparse

from pipeline.metrics import min_negatives_for_fpr
from pipeline.repeats import Difference, Interval, combine, holm_family, t_quantile, two_sided_p, welch_df

_DENSE_SUBJECTS = 8000  # up to this many subjects the impostor counts per subject pair are a dense matrix


def draw_weights(n_subjects: int, n_boot: int, seed: int) -> np.ndarray:
    """[B, S] int32: how often each subject is drawn in each of ``n_boot`` resamples of S subjects."""
    rng = np.random.default_rng([seed, 23, n_subjects])
    out = np.zeros((n_boot, n_subjects), dtype=np.int32)
    for b in range(n_boot):
        out[b] = np.bincount(rng.integers(0, n_subjects, n_subjects), minlength=n_subjects)
    return out


def bootstrap_rate(success: np.ndarray, group: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] share of successes when each item [n] of subject ``group`` [n] counts ``weights[b, group]``
    times (rank-1: success = found at rank 1). NaN for a resample without any item."""
    s = weights.shape[1]
    hits = np.bincount(group, weights=np.asarray(success, dtype=np.float64), minlength=s)
    items = np.bincount(group, minlength=s).astype(np.float64)
    w = weights.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ hits) / (w @ items)


def _pair_counts(labels: np.ndarray, s1: np.ndarray, s2: np.ndarray, n_subjects: int):
    """Impostor pairs per (subject of the first, subject of the second template): [S, S] float64
    (a sparse matrix beyond a few thousand subjects), counted in chunks of the pair list."""
    if n_subjects > _DENSE_SUBJECTS:
        neg = ~labels
        return scipy.sparse.coo_matrix((np.ones(int(neg.sum())), (s1[neg], s2[neg])),
                                       shape=(n_subjects, n_subjects)).tocsr()
    counts = np.zeros(n_subjects * n_subjects)
    step = 1 << 22
    for s in range(0, len(labels), step):
        neg = ~labels[s:s + step]
        key = s1[s:s + step][neg].astype(np.int64) * n_subjects + s2[s:s + step][neg]
        counts += np.bincount(key, minlength=n_subjects * n_subjects)
    return counts.reshape(n_subjects, n_subjects)


class PairResampler:
    """Sufficient statistics of one run's scored pairs for subject-resampled TPR@FPR.

    ``scores`` [P] (float32 is fine), ``labels`` [P] bool, ``subject1``, ``subject2`` [P]: subject codes
    (0..S-1) of each pair's two templates (equal for a genuine pair). ``fprs``: the levels.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, subject1: np.ndarray, subject2: np.ndarray,
                 n_subjects: int, fprs: Sequence[float]):
        labels = np.asarray(labels, dtype=bool)
        s1 = np.asarray(subject1, dtype=np.int32)
        s2 = np.asarray(subject2, dtype=np.int32)
        mismatch = labels & (s1 != s2)
        if mismatch.any():
            i = int(np.argmax(mismatch))
            raise ValueError(f"pair {i} is genuine but its templates have subjects {s1[i]} and {s2[i]}")
        self.fprs = tuple(float(f) for f in fprs)
        self.n_subjects = n_subjects
        gen = np.flatnonzero(labels)
        order = np.argsort(scores[gen], kind="stable")
        self.gen_scores = np.asarray(scores[gen][order])
        self.gen_subject = s1[gen][order]
        self.gen_count = np.bincount(self.gen_subject, minlength=n_subjects).astype(np.float64)
        self._inputs = (np.asarray(scores), labels, s1, s2)  # references, not copies
        self.n_neg = int(len(labels) - len(gen))
        keep = min(self.n_neg, math.ceil(1.5 * max(self.fprs) * self.n_neg) + 1000)
        self._top = self._sorted_top(keep)
        self._full = None if keep < self.n_neg else self._top
        self._counts = _pair_counts(labels, s1, s2, n_subjects)

    def _sorted_top(self, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``keep`` highest impostor scores, descending, with both subjects of each pair."""
        scores, labels, s1, s2 = self._inputs
        neg = np.flatnonzero(~labels)
        values = scores[neg]
        if keep < len(neg):
            top = np.argpartition(values, len(neg) - keep)[len(neg) - keep:]
        else:
            top = np.arange(len(neg))
        top = top[np.argsort(values[top], kind="stable")[::-1]]
        del values
        neg = neg[top]
        return scores[neg], s1[neg], s2[neg]

    def negatives_weight(self, weights: np.ndarray) -> np.ndarray:
        """[B] weighted impostor pairs ``sum_ab C_ab w_a w_b`` of each resample (float64, exact)."""
        w = weights.astype(np.float64)
        return np.einsum("bs,bs->b", np.asarray(self._counts @ w.T).T, w)

    def _one(self, w: np.ndarray, n_w: float, top: tuple[np.ndarray, np.ndarray, np.ndarray]
             ) -> list[float] | None:
        scores, a, b = top
        product = w[a]
        product *= w[b]
        cum = np.cumsum(product, dtype=np.int64)
        gen_w = w[self.gen_subject].astype(np.float64)
        gen_cum = np.concatenate([[0.0], np.cumsum(gen_w)])
        p_w = gen_cum[-1]
        out = []
        for f in self.fprs:
            if n_w < min_negatives_for_fpr(f) or p_w == 0:
                out.append(math.nan)
                continue
            k = math.floor(f * n_w + 1e-9)
            j = int(np.searchsorted(cum, k, side="right"))  # first kept impostor that exceeds the budget
            if j == len(cum):
                if len(cum) < self.n_neg:
                    return None  # the kept top is too short for this resample
                out.append(1.0)
                continue
            below = int(np.searchsorted(self.gen_scores, self.gen_scores.dtype.type(scores[j]), side="right"))
            out.append(float((p_w - gen_cum[below]) / p_w))
        return out

    def tpr(self, weights: np.ndarray, *, progress: bool = False) -> np.ndarray:
        """[B, F] TPR at each level for each resample (``weights`` [B, S]); NaN where unsupported."""
        from tqdm import tqdm

        weights = np.atleast_2d(weights)
        n_w = self.negatives_weight(weights)
        out = np.empty((len(weights), len(self.fprs)))
        for i, w in enumerate(tqdm(weights, desc="subject resamples", unit="resample", disable=not progress)):
            row = self._one(w, float(n_w[i]), self._top)
            if row is None:
                if self._full is None:
                    self._full = self._sorted_top(self.n_neg)
                row = self._one(w, float(n_w[i]), self._full)
            out[i] = row
        return out


def subject_interval(per_run: Sequence[float], boot_average: np.ndarray, *, alpha: float = 0.05
                     ) -> Interval | None:
    """Mean over runs with the subject-resampling variance of the run average (``boot_average`` [B]:
    the metric averaged over the runs, per resample). Resamples where the metric is undefined (NaN:
    no item of a drawn subject, or too few weighted impostor pairs) are left out. None when a per-run
    value is missing (an FPR level the pairs do not support)."""
    values = np.asarray(per_run, dtype=np.float64)
    boot = np.asarray(boot_average, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        return None
    boot = boot[np.isfinite(boot)]
    var = float(boot.var(ddof=1)) if boot.size > 1 else 0.0
    return combine(values, var, alpha=alpha)


def _difference(a: str, b: str, runs_a: np.ndarray, runs_b: np.ndarray, boot_diff: np.ndarray,
                alpha: float) -> Difference:
    boot_diff = boot_diff[np.isfinite(boot_diff)]  # resamples where either metric is undefined are left out
    parts = [(float(boot_diff.var(ddof=1)) if boot_diff.size > 1 else 0.0, math.inf)]
    for runs in (runs_a, runs_b):
        if runs.size > 1:
            parts.append((float(runs.var(ddof=1)) / runs.size, runs.size - 1))
    se = math.sqrt(sum(v for v, _ in parts))
    df = welch_df(parts)
    diff = float(runs_a.mean() - runs_b.mean())
    half = t_quantile(df, alpha) * se
    return Difference(a, b, diff, diff - half, diff + half, se, df, two_sided_p(diff, se, df))


def paired_verdicts(per_run: dict[str, Sequence[float]], boot_average: dict[str, np.ndarray], *,
                    alpha: float = 0.05) -> list[Difference]:
    """Every pair of models, each oriented higher mean first, Holm-corrected over the pairs.

    ``per_run``: model -> its per-run values; ``boot_average``: model -> [B] run-averaged values on
    the same subject resamples (paired). Models with a missing (NaN) per-run value are left out, and
    resamples where either model's value is NaN.
    Verdict ``"a beats b"`` when the Holm-adjusted p-value is below ``alpha``; each difference also
    carries its Holm interval (:func:`pipeline.repeats.holm_family`), which excludes 0 exactly then.
    """
    usable = [m for m in per_run if np.isfinite(np.asarray(per_run[m], dtype=np.float64)).all()]
    runs = {m: np.asarray(per_run[m], dtype=np.float64) for m in usable}
    raw = []
    for x, z in combinations(usable, 2):
        a, b = (x, z) if runs[x].mean() >= runs[z].mean() else (z, x)
        boot_diff = np.asarray(boot_average[a], np.float64) - np.asarray(boot_average[b], np.float64)
        raw.append(_difference(a, b, runs[a], runs[b], boot_diff, alpha))
    family = holm_family([d.diff for d in raw], [d.se for d in raw], [d.df for d in raw], [d.p for d in raw], alpha)
    return [Difference(d.a, d.b, d.diff, d.low, d.high, d.se, d.df, d.p, h.p_holm,
                       f"{d.a} beats {d.b}" if h.rejected else "not distinguishable", h.low, h.high, h.level)
            for d, h in zip(raw, family)]
