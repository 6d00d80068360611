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


def test_verdicts_separate_a_real_gap_from_noise():
    strong, y = _runs(3, shift=2.0, seed=3)
    also_strong, _ = _runs(3, shift=2.0, seed=4)
    weak, _ = _runs(3, shift=0.6, seed=5)
    found = {(d.a, d.b): d for d in repeats.verdicts({"s1": strong, "s2": also_strong, "w": weak}, y)}
    assert len(found) == 3
    beats = {k: d.verdict for k, d in found.items()}
    assert beats[next(k for k in beats if set(k) == {"s1", "s2"})] == "not distinguishable"
    assert any(k[1] == "w" and v.endswith("beats w") for k, v in beats.items())
    assert all(d.p_holm >= d.p for d in found.values())


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


def test_accuracy_interval_uses_the_spread_over_folds():
    runs, y = _runs(3, n_pairs=400, seed=9)
    folds = np.tile(np.arange(1, 5), 100)
    iv, per_fold = repeats.accuracy_interval(runs, y, folds)
    from pipeline.metrics import lfw_accuracy

    expected = np.array([lfw_accuracy(s, y, folds).accuracies for s in runs])
    np.testing.assert_allclose(per_fold, expected)
    assert iv.var_pairs == pytest.approx(np.var(expected.mean(axis=0), ddof=1) / 4, rel=1e-12)
    assert iv.mean == pytest.approx(expected.mean(), abs=1e-12)


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
