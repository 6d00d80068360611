"""Statistics over training runs, each checked against an independent computation.

References are written out here: brute-force placement values (every positive against
every negative), scikit-learn's ROC, scipy's t distribution, Holm's procedure by hand,
and a plain-loop bootstrap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline import repeats


def _runs(n_runs: int, n_pairs: int = 400, shift: float = 1.0, seed: int = 0, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pairs // 2), np.zeros(n_pairs // 2)].astype(int)
    runs = np.stack([y * shift + rng.normal(0, 1, n_pairs) for _ in range(n_runs)])
    if decimals is not None:
        runs = runs.round(decimals)
    return runs, y


def _brute_placements(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = scores[y == 1], scores[y == 0]
    cmp = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [m, n]
    return cmp.mean(axis=1), cmp.mean(axis=0)  # V10 per positive, V01 per negative


def _brute_pair_variance(runs: np.ndarray, y: np.ndarray) -> float:
    parts = [_brute_placements(s, y) for s in runs]
    v10 = np.mean([p[0] for p in parts], axis=0)
    v01 = np.mean([p[1] for p in parts], axis=0)
    return np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size


@pytest.mark.parametrize("n_runs", [1, 3, 5])
def test_auc_interval_matches_a_hand_computation(n_runs):
    runs, y = _runs(n_runs, decimals=1)  # ties included
    iv = repeats.auc_interval(runs, y)
    aucs = np.array([roc_auc_score(y, s) for s in runs])
    var_pairs = _brute_pair_variance(runs, y)
    assert iv.per_run == pytest.approx(aucs, abs=1e-12)
    assert iv.mean == pytest.approx(aucs.mean(), abs=1e-12)
    assert iv.var_pairs == pytest.approx(var_pairs, rel=1e-9)
    if n_runs == 1:
        assert iv.var_runs is None
        half = stats.norm.ppf(0.975) * math.sqrt(var_pairs)
    else:
        var_runs = aucs.var(ddof=1) / n_runs
        df = (var_runs + var_pairs) ** 2 / (var_runs ** 2 / (n_runs - 1))
        assert iv.df == pytest.approx(df, rel=1e-9)
        half = stats.t.ppf(0.975, df) * math.sqrt(var_runs + var_pairs)
    assert (iv.low, iv.high) == pytest.approx((aucs.mean() - half, aucs.mean() + half), abs=1e-12)


def test_interval_grows_with_the_spread_between_runs():
    runs, y = _runs(3)
    calm = repeats.auc_interval(runs, y)
    noisy_runs = runs.copy()
    noisy_runs[0] = runs[0] * 0.2 + np.random.default_rng(5).normal(0, 1, runs.shape[1])  # a much worse run
    noisy = repeats.auc_interval(noisy_runs, y)
    assert noisy.high - noisy.low > 2 * (calm.high - calm.low)


def test_interval_is_cut_to_the_metric_range():
    iv = repeats.combine([0.99, 0.97], 1e-4)
    assert iv.high == 1.0 and iv.low < 0.98
    free = repeats.combine([0.99, 0.97], 1e-4, bounds=None)
    assert free.high > 1.0


def test_holm_matches_the_procedure_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max so far 0.06)
    assert repeats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert repeats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_auc_difference_by_hand():
    a, y = _runs(3, shift=1.4, seed=1)
    b, _ = _runs(2, shift=0.8, seed=2)
    d = repeats.auc_difference(a, b, y, a="a", b="b")
    auc_a = np.array([roc_auc_score(y, s) for s in a])
    auc_b = np.array([roc_auc_score(y, s) for s in b])
    pa = [_brute_placements(s, y) for s in a]
    pb = [_brute_placements(s, y) for s in b]
    v10 = np.mean([p[0] for p in pa], axis=0) - np.mean([p[0] for p in pb], axis=0)
    v01 = np.mean([p[1] for p in pa], axis=0) - np.mean([p[1] for p in pb], axis=0)
    var_pairs = np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size
    va, vb = auc_a.var(ddof=1) / 3, auc_b.var(ddof=1) / 2
    var = var_pairs + va + vb
    df = var ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    diff = auc_a.mean() - auc_b.mean()
    assert d.diff == pytest.approx(diff, abs=1e-12)
    assert d.se == pytest.approx(math.sqrt(var), rel=1e-9)
    assert d.df == pytest.approx(df, rel=1e-9)
    assert d.p == pytest.approx(2 * stats.t.sf(abs(diff) / math.sqrt(var), df), rel=1e-9)


def _hand_holm(p: list[float]) -> list[float]:
    """Holm's adjusted p-values written out: sort, multiply the i-th smallest by (m - i), carry the maximum."""
    order = sorted(range(len(p)), key=lambda i: (p[i], i))
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def test_verdicts_equal_a_hand_computation_of_every_pair():
    strong, y = _runs(3, shift=2.0, seed=3)
    also_strong, _ = _runs(3, shift=2.0, seed=4)
    weak, _ = _runs(3, shift=0.6, seed=5)
    models = {"s1": strong, "s2": also_strong, "w": weak}
    found = {(d.a, d.b): d for d in repeats.verdicts(models, y)}
    # each pair by hand: brute-force placements, scipy's t distribution, Holm written out
    mean = {m: np.mean([roc_auc_score(y, s) for s in r]) for m, r in models.items()}
    expected = {}
    for x, z in [("s1", "s2"), ("s1", "w"), ("s2", "w")]:
        a, b = (x, z) if mean[x] >= mean[z] else (z, x)
        auc_a = np.array([roc_auc_score(y, s) for s in models[a]])
        auc_b = np.array([roc_auc_score(y, s) for s in models[b]])
        pa = [_brute_placements(s, y) for s in models[a]]
        pb = [_brute_placements(s, y) for s in models[b]]
        v10 = np.mean([p[0] for p in pa], axis=0) - np.mean([p[0] for p in pb], axis=0)
        v01 = np.mean([p[1] for p in pa], axis=0) - np.mean([p[1] for p in pb], axis=0)
        va, vb = auc_a.var(ddof=1) / 3, auc_b.var(ddof=1) / 3
        var = np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size + va + vb
        df = var ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
        expected[(a, b)] = 2 * stats.t.sf(abs(auc_a.mean() - auc_b.mean()) / math.sqrt(var), df)
    assert set(found) == set(expected)
    keys = list(expected)
    holm_p = dict(zip(keys, _hand_holm([expected[k] for k in keys])))
    for k, d in found.items():
        assert d.p == pytest.approx(expected[k], rel=1e-8) and d.p_holm == pytest.approx(holm_p[k], rel=1e-8)
        assert d.verdict == (f"{d.a} beats {d.b}" if holm_p[k] < 0.05 else "not distinguishable")
    # the data were made so: the two strong models tie, each beats the weak one
    assert found[next(k for k in found if set(k) == {"s1", "s2"})].verdict == "not distinguishable"
    assert {d.verdict for k, d in found.items() if "w" in k} == {"s1 beats w", "s2 beats w"}


def test_identical_models_are_never_distinguishable():
    runs, y = _runs(3)
    (d,) = repeats.verdicts({"a": runs, "b": runs.copy()}, y)
    assert d.diff == 0 and d.p == 1.0 and d.verdict == "not distinguishable"


def test_single_runs_are_compared_on_pair_variation_alone():
    a, y = _runs(1, shift=1.5, seed=6)
    b, _ = _runs(1, shift=1.0, seed=7)
    d = repeats.auc_difference(a, b, y)
    pa, pb = _brute_placements(a[0], y), _brute_placements(b[0], y)
    var = np.var(pa[0] - pb[0], ddof=1) / pa[0].size + np.var(pa[1] - pb[1], ddof=1) / pa[1].size
    assert math.isinf(d.df) and d.se == pytest.approx(math.sqrt(var), rel=1e-9)


def _brute_eer_and_tpr(scores, y, fprs):
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    fnr = 1 - tpr
    i = int(np.argmax(fpr - fnr >= 0))
    if fpr[i] == fnr[i]:
        eer = fpr[i]
    else:  # cross between points i-1 and i on the piecewise-linear ROC
        d0, d1 = fpr[i - 1] - fnr[i - 1], fpr[i] - fnr[i]
        lam = -d0 / (d1 - d0)
        eer = fpr[i - 1] + lam * (fpr[i] - fpr[i - 1])
    return eer, {f: float(tpr[fpr <= f + 1e-12].max()) for f in fprs}


@pytest.mark.parametrize("decimals", [None, 1])
def test_per_run_eer_and_tpr_match_scikit_learn(decimals):
    runs, y = _runs(3, decimals=decimals)
    fprs = [0.1, 0.01]
    st = repeats.roc_stats(runs, y, fprs, n_boot=10)
    for k, s in enumerate(runs):
        eer, tpr = _brute_eer_and_tpr(s, y, fprs)
        assert st.eer[k] == pytest.approx(eer, abs=1e-12)
        for f in fprs:
            assert st.tpr[f][k] == pytest.approx(tpr[f], abs=1e-12)


def test_bootstrap_of_the_run_average_agrees_with_a_plain_loop():
    runs, y = _runs(2, n_pairs=300, seed=8)
    st = repeats.roc_stats(runs, y, [0.1], n_boot=600, seed=1)
    rng = np.random.default_rng(99)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    loop = []
    for _ in range(600):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        loop.append(np.mean([_brute_eer_and_tpr(s[idx], y[idx], [0.1])[0] for s in runs]))
    # two independent Monte Carlo estimates of one standard deviation: within 15 %
    assert np.std(st.boot_eer) == pytest.approx(np.std(loop), rel=0.15)
    assert np.mean(st.boot_eer) == pytest.approx(np.mean(loop), abs=0.01)


def _brute_lfw_folds(scores: np.ndarray, y: np.ndarray, folds: np.ndarray) -> list[float]:
    """The LFW protocol by brute force: for each fold try every threshold between the other folds' sorted
    scores (and both ends), keep the most accurate there (the lowest on ties), count on the held-out fold."""
    out = []
    for k in np.unique(folds):
        train = folds != k
        values = sorted(set(scores[train].tolist()))
        candidates = [math.inf] + [(hi + lo) / 2 for hi, lo in zip(values[::-1][:-1], values[::-1][1:])] + [-math.inf]
        best, best_t = -1, None
        for t in candidates:  # descending, so a later tie is a lower threshold
            correct = sum((s > t) == bool(label) for s, label in zip(scores[train], y[train]))
            if correct >= best:
                best, best_t = correct, t
        held = ~train
        out.append(np.mean([(s > best_t) == bool(label) for s, label in zip(scores[held], y[held])]))
    return out


def test_accuracy_interval_equals_a_brute_force_protocol():
    runs, y = _runs(3, n_pairs=160, seed=9, decimals=1)  # ties: thresholds between distinct values only
    folds = np.tile(np.arange(1, 5), 40)
    iv, per_fold = repeats.accuracy_interval(runs, y, folds)
    expected = np.array([_brute_lfw_folds(s, y, folds) for s in runs])  # [R, K]
    np.testing.assert_allclose(per_fold, expected, rtol=0, atol=1e-12)
    var_pairs = np.var(expected.mean(axis=0), ddof=1) / 4
    var_runs = np.var(expected.mean(axis=1), ddof=1) / 3
    df = (var_pairs + var_runs) ** 2 / (var_pairs ** 2 / 3 + var_runs ** 2 / 2)
    half = stats.t.ppf(0.975, df) * math.sqrt(var_pairs + var_runs)
    assert iv.var_pairs == pytest.approx(var_pairs, rel=1e-12) and iv.mean == pytest.approx(expected.mean(), abs=1e-12)
    assert (iv.low, iv.high) == pytest.approx((expected.mean() - half, expected.mean() + half), abs=1e-12)


def test_welch_df_of_known_parts_is_infinite():
    assert math.isinf(repeats.welch_df([(0.1, math.inf)]))
    assert repeats.welch_df([(0.1, 2), (0.1, 2)]) == pytest.approx(4.0)


@pytest.mark.parametrize("n_runs", [1, 3])
def test_fixed_accuracy_interval_by_hand(n_runs):
    runs, y = _runs(n_runs, 300, decimals=1, seed=4)
    thresholds = np.linspace(0.3, 0.6, n_runs).round(1)  # on observed scores: the strict rule matters
    folds = np.arange(300) % 6
    iv = repeats.fixed_accuracy_interval(runs, thresholds, y, folds, alpha=0.05)
    per_run = [np.mean([(s > t) == (label == 1) for s, label in zip(run, y)]) for run, t in zip(runs, thresholds)]
    assert iv.per_run == pytest.approx(per_run, abs=1e-15)
    correct = np.array([[(s > t) == (label == 1) for s, label in zip(run, y)] for run, t in zip(runs, thresholds)])
    fold_acc = [correct[:, folds == k].mean() for k in range(6)]
    var_pairs = np.var(fold_acc, ddof=1) / 6
    var_runs = np.var(per_run, ddof=1) / n_runs if n_runs > 1 else 0.0
    total = var_pairs + var_runs
    df = 5 if n_runs == 1 else total ** 2 / (var_pairs ** 2 / 5 + var_runs ** 2 / (n_runs - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(total)
    assert iv.mean == pytest.approx(np.mean(per_run)) and iv.df == pytest.approx(df)
    assert (iv.low, iv.high) == pytest.approx((np.mean(per_run) - half, np.mean(per_run) + half))
    one_fold = repeats.fixed_accuracy_interval(runs, thresholds, y, np.zeros(300, int))
    assert one_fold.var_pairs == pytest.approx(np.var(correct.mean(axis=0), ddof=1) / 300)
    with pytest.raises(ValueError, match="one threshold per run"):
        repeats.fixed_accuracy_interval(runs, np.r_[thresholds, 0.1], y, folds)


# ------------------------------------------------------------------- Holm intervals
def test_holm_interval_levels_by_hand():
    p = [0.03, 0.001, 0.2, 0.004, 0.04]
    # sorted: 0.001 (x5 = 0.005, rejected), 0.004 (x4 = 0.016, rejected), 0.03 (x3 = 0.09: Holm stops here, k = 2)
    adjusted, levels = repeats.holm_levels(p, 0.05)
    assert adjusted == pytest.approx([0.09, 0.005, 0.2, 0.016, 0.09])
    assert levels == pytest.approx([0.05 / 3, 0.05 / 5, 0.05 / 3, 0.05 / 4, 0.05 / 3])
    # the step-down trap: 0.04 < 0.05 / 2 is false, but 0.04 < 0.05 / 1 would be; Holm keeps both
    adjusted, levels = repeats.holm_levels([0.03, 0.04], 0.05)
    assert adjusted == pytest.approx([0.06, 0.06]) and levels == pytest.approx([0.025, 0.025])
    adjusted, levels = repeats.holm_levels([0.001, 0.02], 0.05)  # every one rejected: alpha / (m - i)
    assert levels == pytest.approx([0.025, 0.05])


def _family(seed: int, m: int):
    """m estimates with standard errors and degrees of freedom, some clearly away from 0, some near it."""
    rng = np.random.default_rng(seed)
    se = rng.uniform(0.002, 0.02, m)
    z = rng.choice([0.2, 1.5, 2.3, 2.8, 3.2, 4.5, 7.0], m) * rng.choice([-1, 1], m)
    df = rng.choice([2.0, 3.5, 8.0, math.inf], m)
    p = [2 * (stats.norm.sf(abs(v)) if math.isinf(d) else stats.t.sf(abs(v), d)) for v, d in zip(z, df)]
    return z * se, se, df, p


@pytest.mark.parametrize("seed", range(6))
def test_holm_intervals_exclude_zero_exactly_when_holm_rejects(seed):
    est, se, df, p = _family(seed, 12)
    family = repeats.holm_family(est, se, df, p, 0.05)
    hand = _hand_holm(p)
    unadjusted_disagrees = 0
    for e, s, d, h, ph, raw in zip(est, se, df, family, hand, p):
        assert h.p_holm == pytest.approx(ph, rel=1e-12) and h.rejected == (ph < 0.05)
        half = (stats.norm.ppf(1 - h.level / 2) if math.isinf(d) else stats.t.ppf(1 - h.level / 2, d)) * s
        assert (h.low, h.high) == pytest.approx((e - half, e + half), rel=1e-12)
        assert (h.low > 0 or h.high < 0) == h.rejected
        unadjusted_disagrees += (raw < 0.05) != h.rejected
    if seed == 0:
        assert unadjusted_disagrees > 0  # the family holds pairs whose unadjusted 95% interval would mislead


def test_one_p_value_for_a_difference_and_a_drop():
    assert repeats.two_sided_p(0.0, 0.0, 3.0) == 1.0  # nothing differs and nothing varies
    assert repeats.two_sided_p(0.01, 0.0, 3.0) == 0.0
    assert repeats.two_sided_p(0.012, 0.005, 4.2) == pytest.approx(2 * stats.t.sf(2.4, 4.2), rel=1e-12)
    assert repeats.two_sided_p(-0.012, 0.005, math.inf) == pytest.approx(2 * stats.norm.sf(2.4), rel=1e-12)
    q = repeats.t_quantile(4.2, 0.01)
    assert repeats.two_sided_p(q * 0.005 * 1.0001, 0.005, 4.2) < 0.01 < repeats.two_sided_p(q * 0.005 * 0.9999,
                                                                                            0.005, 4.2)


# ------------------------------------------------------------------- pairing by seed
def _seeded(kind: str, n_pairs: int = 600, seed: int = 11):
    """Two models with three seeds. Each seed adds a large run effect to the scores (AUC moves a lot
    between seeds); A is truly better by a small, constant margin. ``kind``: "alike", the seed moves
    both models the same way; "opposite", it moves them in opposite directions."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pairs // 2), np.zeros(n_pairs // 2)].astype(int)
    base = rng.normal(0, 1, n_pairs)
    effects = [0.0, 0.5, 1.0]
    a = np.stack([y * (1.05 + e) + base for e in effects])
    sign = 1 if kind == "alike" else -1
    b = np.stack([y * (1.0 + 0.5 + sign * (e - 0.5)) + base for e in effects])
    return a, b, y


def _hand_difference(a, b, y, paired: bool):
    auc_a = np.array([roc_auc_score(y, s) for s in a])
    auc_b = np.array([roc_auc_score(y, s) for s in b])
    pa = [_brute_placements(s, y) for s in a]
    pb = [_brute_placements(s, y) for s in b]
    v10 = np.mean([p[0] for p in pa], axis=0) - np.mean([p[0] for p in pb], axis=0)
    v01 = np.mean([p[1] for p in pa], axis=0) - np.mean([p[1] for p in pb], axis=0)
    var_pairs = np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size
    if paired:
        d = auc_a - auc_b
        parts = [(d.var(ddof=1) / d.size, d.size - 1)]
    else:
        parts = [(auc_a.var(ddof=1) / 3, 2), (auc_b.var(ddof=1) / 3, 2)]
    var = var_pairs + sum(v for v, _ in parts)
    df = var ** 2 / sum(v ** 2 / k for v, k in parts)
    diff = auc_a.mean() - auc_b.mean()
    return diff, math.sqrt(var), df, 2 * stats.t.sf(abs(diff) / math.sqrt(var), df)


@pytest.mark.parametrize("kind", ["alike", "opposite"])
@pytest.mark.parametrize("paired", [False, True])
def test_auc_difference_paired_or_not_by_hand(kind, paired):
    a, b, y = _seeded(kind)
    d = repeats.auc_difference(a, b, y, paired=paired)
    diff, se, df, p = _hand_difference(a, b, y, paired)
    assert (d.diff, d.se, d.df, d.p) == pytest.approx((diff, se, df, p), rel=1e-9)
    assert d.paired == paired


def test_pairing_by_seed_finds_a_gap_that_seeds_hide_and_refuses_one_they_fake():
    # alike: A beats B in every seed, but the seeds spread both models' AUCs widely
    a, b, y = _seeded("alike")
    auc_a = np.array([roc_auc_score(y, s) for s in a])
    auc_b = np.array([roc_auc_score(y, s) for s in b])
    assert (auc_a > auc_b).all() and np.ptp(auc_a) > 5 * np.mean(auc_a - auc_b)
    seeds = {"A": (0, 1, 2), "B": (0, 1, 2)}
    (independent,) = repeats.verdicts({"A": a, "B": b}, y, seeds=seeds)
    (paired,) = repeats.verdicts({"A": a, "B": b}, y, pairing="seed", seeds=seeds)
    assert independent.verdict == "not distinguishable" and paired.verdict == "A beats B" and paired.paired
    # opposite: the same seed lifts one model and sinks the other, so the per-seed differences swing more
    # than either model (s²_(A-B) = s²_A + s²_B - 2 cov with cov < 0); taking the runs as independent
    # understates the variance of the difference, pairing measures it
    a, b, y = _seeded("opposite")
    auc_a = np.array([roc_auc_score(y, s) for s in a])
    auc_b = np.array([roc_auc_score(y, s) for s in b])
    assert np.cov(auc_a, auc_b)[0, 1] < 0 and (auc_a - auc_b).min() < 0 < (auc_a - auc_b).max()
    (independent,) = repeats.verdicts({"A": a, "B": b}, y, seeds=seeds)
    (paired,) = repeats.verdicts({"A": a, "B": b}, y, pairing="seed", seeds=seeds)
    assert paired.se > 1.3 * independent.se and paired.p > independent.p


def test_pairing_needs_the_same_seeds():
    a, b, y = _seeded("alike")
    one, _ = _runs(1, n_pairs=600, seed=2)
    found = {frozenset((d.a, d.b)): d for d in repeats.verdicts(
        {"A": a, "B": b, "C": b[::-1].copy(), "ext": one}, y, pairing="seed",
        seeds={"A": (0, 1, 2), "B": (0, 1, 2), "C": (2, 1, 0), "ext": None})}
    assert found[frozenset("AB")].paired
    assert not found[frozenset("AC")].paired and not found[frozenset(("A", "ext"))].paired
    with pytest.raises(ValueError, match="pairing"):
        repeats.verdicts({"A": a, "B": b}, y, pairing="by_seed")
    with pytest.raises(ValueError, match="same runs"):
        repeats.auc_difference(a, b[:2], y, paired=True)


def test_one_run_without_pair_variance_has_no_interval():
    iv = repeats.combine([0.8], 0.0)
    assert iv.mean == 0.8 and math.isnan(iv.low) and math.isnan(iv.high)
    two = repeats.combine([0.8, 0.7], 0.0)  # runs only: an interval over the runs
    half = stats.t.ppf(0.975, 1) * math.sqrt(np.var([0.8, 0.7], ddof=1) / 2)
    assert (two.low, two.high) == pytest.approx((max(0.75 - half, 0.0), min(0.75 + half, 1.0)))
    pairs_only = repeats.combine([0.8], 1e-4)
    assert pairs_only.high - pairs_only.low == pytest.approx(2 * stats.norm.ppf(0.975) * 0.01)
