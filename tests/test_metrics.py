from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from pipeline import metrics as M
from pipeline.metrics import identification


def _random_pairs(seed: int, n: int, decimals: int | None = 1, shift: float = 0.8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.normal(y * shift, 1.0)
    if decimals is not None:
        s = np.round(s, decimals)  # many ties
    return s, y


# ------------------------------------------------------------------------------ ROC / AUC
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_roc_and_auc_match_sklearn_with_ties(seed: int, decimals: int | None) -> None:
    s, y = _random_pairs(seed, 50 + 300 * seed, decimals)
    assert M.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), rel=1e-12, abs=0)
    fpr, tpr, thr = M.roc_curve(s, y)
    fpr2, tpr2, thr2 = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(thr, thr2)
    np.testing.assert_allclose(fpr, fpr2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, tpr2, rtol=0, atol=1e-15)
    assert len(thr) == len(np.unique(s)) + 1
    # trapezoid under the exact ROC equals the Mann-Whitney AUC (ties count 1/2)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(s, y), abs=1e-12)


def test_auc_hand_computed() -> None:
    s = [0.9, 0.8, 0.4, 0.5, 0.2, 0.1]
    y = [1, 1, 1, 0, 0, 0]
    assert M.roc_auc(s, y) == 8 / 9  # only (0.4, 0.5) is misordered
    s_tie = [0.9, 0.5, 0.3, 0.5, 0.2, 0.1]
    assert M.roc_auc(s_tie, y) == 7.5 / 9  # one tie (1/2), one misordered
    assert M.roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # all tied
    assert M.roc_auc([3, 4], [True, False]) == 0.0  # bool labels accepted


# ------------------------------------------------------------------------------------ EER
def test_eer_on_an_roc_point() -> None:
    s = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1]
    y = [1, 1, 1, 0, 0, 0]
    rate, thr = M.eer(s, y)
    assert rate == pytest.approx(1 / 3) and thr == 0.7  # 1 FP of 3, 1 FN of 3 at >= 0.7


def test_eer_interpolated_between_points() -> None:
    # ROC: (0,0) (0,.5) (1,.5) (1,1); FPR = 1 - TPR halfway along the horizontal segment
    rate, thr = M.eer([3.0, 1.0, 2.0], [1, 1, 0])
    assert rate == pytest.approx(0.5) and thr == pytest.approx(2.5)


def test_eer_separable_is_zero() -> None:
    rate, thr = M.eer([5, 4, 3, 2, 1], [1, 1, 1, 0, 0])
    assert rate == 0.0 and thr == 3.0


def test_eer_gaussian_matches_theory() -> None:
    # positives ~ N(2, 1), negatives ~ N(0, 1): EER = Phi(-1)
    rng = np.random.default_rng(3)
    n = 100_000
    s = np.concatenate([rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n)])
    y = np.r_[np.ones(n), np.zeros(n)]
    rate, thr = M.eer(s, y)
    assert rate == pytest.approx(norm.cdf(-1.0), abs=0.003)
    assert thr == pytest.approx(1.0, abs=0.02)


# -------------------------------------------------------------------------------- TPR@FPR
def test_tpr_at_fpr_handmade_roc_and_none_rule() -> None:
    # 2 positives, 40 negatives: 10 (pos); 8 (1 pos + 4 neg tied); 36 lower negatives.
    # ROC: (0, 0) -> (0, .5) -> diagonal to (.1, 1) -> (1, 1)
    s = np.r_[10.0, 8.0, 8.0, 8.0, 8.0, 8.0, np.arange(36.0) - 40]
    y = np.r_[1, 1, np.zeros(40, dtype=int)]
    out = M.tpr_at_fpr(s, y, fprs=(0.1, 0.05, 0.025, 0.01))
    assert out[0.1] == 1.0
    assert out[0.05] == pytest.approx(0.75)  # halfway along the tie diagonal
    assert out[0.025] == pytest.approx(0.625)
    assert out[0.01] is None  # needs ceil(1 / 0.01) = 100 negatives, there are 40
    # exactly ceil(1 / 0.1) = 10 negatives are enough for FPR 0.1, 9 are not
    s10, y10 = np.r_[5.0, np.arange(10.0) - 20], np.r_[1, np.zeros(10, dtype=int)]
    assert M.tpr_at_fpr(s10, y10, fprs=(0.1,))[0.1] == 1.0
    assert M.tpr_at_fpr(s10[:-1], y10[:-1], fprs=(0.1,))[0.1] is None


def test_tpr_at_fpr_uses_top_of_vertical_runs() -> None:
    # pos 10, 9; neg 8; pos 7: at FPR exactly 0 the answer is the top of the run (TPR 2/3)
    s = [10, 9, 8, 7] + list(range(-1, -10, -1))
    y = [1, 1, 0, 1] + [0] * 9
    assert M.tpr_at_fpr(s, y, fprs=(0.1,))[0.1] == 1.0  # FPR .1 reached at (0.1, 1)
    fpr, tpr, _ = M.roc_curve(s, y)
    assert fpr[2] == 0.0 and tpr[2] == pytest.approx(2 / 3)


def test_tpr_at_fpr_matches_interp_on_sklearn_roc() -> None:
    s, y = _random_pairs(11, 4000, decimals=None, shift=1.5)
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    targets = (0.0123, 0.0517, 0.2049)
    ours = M.tpr_at_fpr(s, y, fprs=targets)
    for f in targets:
        assert ours[f] == pytest.approx(np.interp(f, fpr, tpr), abs=1e-12)


def test_min_negatives_rule() -> None:
    assert [M.min_negatives_for_fpr(f) for f in M.DEFAULT_FPRS] == [10, 100, 1000, 10000]
    assert M.min_negatives_for_fpr(0.3) == 4
    with pytest.raises(ValueError, match="FPR"):
        M.min_negatives_for_fpr(0.0)


# --------------------------------------------------------------------------- LFW protocol
def _brute_lfw(s: np.ndarray, y: np.ndarray, folds: np.ndarray):
    """O(n^2) reference: try every candidate threshold, keep the smallest best one."""
    ids = sorted(set(folds.tolist()))
    accs, thrs = [], []
    for k in ids:
        train = folds != k if len(ids) > 1 else np.ones(len(s), bool)
        vals = sorted(set(s[train].tolist()), reverse=True)
        mids = [(vals[i] + vals[i + 1]) / 2 for i in range(len(vals) - 1)]
        cands = [math.inf, *mids, -math.inf]
        best, best_t = -1, None
        for t in cands:  # descending, so ">=" keeps the smallest of equal candidates
            correct = int(np.sum((s[train] > t) == (y[train] == 1)))
            if correct >= best:
                best, best_t = correct, t
        held = folds == k
        accs.append(float(np.mean((s[held] > best_t) == (y[held] == 1))))
        thrs.append(best_t)
    return accs, thrs


@pytest.mark.parametrize(("seed", "n_folds", "decimals"),
                         [(0, 10, 1), (1, 5, 0), (2, 2, None), (3, 7, 1), (4, 3, 2)])
def test_lfw_protocol_matches_brute_force(seed: int, n_folds: int, decimals: int | None) -> None:
    s, y = _random_pairs(seed, 240 + 37 * seed, decimals)
    folds = np.random.default_rng(seed + 100).integers(0, n_folds, len(s))  # unequal folds
    res = M.lfw_accuracy(s, y, folds)
    accs, thrs = _brute_lfw(s, y, folds)
    assert list(res.accuracies) == accs
    np.testing.assert_allclose(res.thresholds, thrs, rtol=1e-15)
    assert res.mean == float(np.mean(accs))
    assert res.std == float(np.std(accs))  # population std
    assert res.threshold_source == "other_folds"
    assert res.fold_ids == tuple(range(n_folds))


def test_lfw_single_fold_falls_back_to_same_fold() -> None:
    s, y = _random_pairs(5, 300, 1)
    for folds in (np.zeros(300, int), None):
        res = M.lfw_accuracy(s, y, folds)
        assert res.threshold_source == "same_fold"
        assert list(res.accuracies) == _brute_lfw(s, y, np.zeros(300, int))[0]
        assert res.std == 0.0


def test_lfw_hand_example_and_string_folds() -> None:
    # fold "a" trains on "b" and vice versa; each is separable on its own.
    s = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.45, -0.2, -0.5])
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    f = np.array(["a"] * 4 + ["b"] * 4)
    res = M.lfw_accuracy(s, y, f)
    assert res.fold_ids == ("a", "b")
    # "a" uses the midpoint of 0.45 and -0.2 (best on "b"); "b" the midpoint of 0.6 and 0.4
    assert res.thresholds == pytest.approx((0.125, 0.5))
    assert res.accuracies == (0.5, 0.75)  # "a": 0.4 and 0.2 wrongly same; "b": 0.45 wrongly diff
    assert res.mean == 0.625 and res.std == 0.125
    assert json.loads(json.dumps(res.to_dict()))["fold_ids"] == ["a", "b"]


def test_lfw_threshold_between_adjacent_floats() -> None:
    # no float lies strictly between 1.0 and the next one down: the threshold must still
    # separate them under the strict rule "score > threshold"
    lo = float(np.nextafter(1.0, 0.0))
    res = M.lfw_accuracy([1.0, lo, 1.0, lo], [1, 0, 1, 0], [0, 0, 1, 1])
    assert res.accuracies == (1.0, 1.0)
    assert res.thresholds == (lo, lo)


def test_protocol_predictions_and_confusion() -> None:
    # against the brute-force thresholds, not lfw_accuracy (which shares the code); on
    # these scores some folds have equally accurate candidate thresholds (the smallest wins)
    s, y = _random_pairs(8, 500, 1)
    folds = np.arange(500) % 10
    accs, thrs = _brute_lfw(s, y, folds)
    pred = M.protocol_predictions(s, y, folds)
    assert pred.dtype == bool
    np.testing.assert_array_equal(pred, [s[i] > thrs[folds[i]] for i in range(500)])
    for k in range(10):
        assert np.mean(pred[folds == k] == y[folds == k]) == accs[k]
    conf = M.confusion_at_threshold(s, y, np.asarray(thrs)[folds])
    truth = [(bool(p), int(t)) for p, t in zip(pred, y)]
    assert conf == {"tp": truth.count((True, 1)), "fp": truth.count((True, 0)),
                    "tn": truth.count((False, 0)), "fn": truth.count((False, 1))}


def test_confusion_is_strict() -> None:
    s = [0.9, 0.5, 0.5, 0.1]
    y = [1, 1, 0, 0]
    assert M.confusion_at_threshold(s, y, 0.5) == {"tp": 1, "fp": 0, "tn": 2, "fn": 1}
    assert M.confusion_at_threshold(s, y, 0.3) == {"tp": 2, "fp": 1, "tn": 1, "fn": 0}


# ------------------------------------------------------------------------------ bootstrap
def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by the rank-sum formula (midranks for ties), independent of pipeline.metrics:
    (sum of the positives' ranks - P (P + 1) / 2) / (P N). Checked against scikit-learn
    in test_bootstrap_matches_an_independent_resampling."""
    pos = np.asarray(y) == 1
    p, n = int(pos.sum()), int((~pos).sum())
    return float((rankdata(s)[pos].sum() - p * (p + 1) / 2) / (p * n))


def _reference_resamples(y: np.ndarray, folds: np.ndarray | None, n_boot: int, seed: int):
    """The documented resampling, written out here: strata = label, or (fold, label) in
    sorted (fold, label) order; each stratum drawn with replacement at its own size by
    ``numpy.random.default_rng(seed).integers``, strata one after the other."""
    rng = np.random.default_rng(seed)
    keys = [(0, int(v)) for v in y] if folds is None else [(f, int(v)) for f, v in zip(folds.tolist(), y)]
    strata = [np.array([i for i, k in enumerate(keys) if k == key]) for key in sorted(set(keys))]
    for _ in range(n_boot):
        yield np.concatenate([st[rng.integers(0, len(st), len(st))] for st in strata])


def test_bootstrap_matches_an_independent_resampling() -> None:
    # Every path of bootstrap_samples (weighted AUC, weighted LFW protocol, generic) against
    # the same resamples drawn here and scored with scikit-learn / the brute-force protocol.
    s, y = _random_pairs(7, 400, 1)
    folds = np.arange(400) % 4
    ref = [roc_auc_score(y[i], s[i]) for i in _reference_resamples(y, None, 60, 5)]
    np.testing.assert_allclose([_rank_auc(y[i], s[i]) for i in _reference_resamples(y, None, 60, 5)], ref,
                               rtol=0, atol=1e-12)  # the rank-sum AUC used below agrees with sklearn
    np.testing.assert_allclose(M.bootstrap_samples(M.roc_auc, s, y, n_boot=60, seed=5), ref, rtol=0, atol=1e-12)
    generic = M.bootstrap_samples(lambda a, b: roc_auc_score(b, a), s, y, n_boot=60, seed=5)
    np.testing.assert_allclose(generic, ref, rtol=0, atol=1e-12)
    assert len(set(np.round(ref, 12).tolist())) > 30  # the resamples really differ
    # with folds: (fold, label) strata; the AUC itself ignores the folds
    ref = [roc_auc_score(y[i], s[i]) for i in _reference_resamples(y, folds, 20, 5)]
    np.testing.assert_allclose(M.bootstrap_samples(M.roc_auc, s, y, n_boot=20, seed=5, folds=folds), ref,
                               rtol=0, atol=1e-12)
    ref = [np.mean(_brute_lfw(s[i], y[i], folds[i])[0]) for i in _reference_resamples(y, folds, 15, 5)]
    np.testing.assert_allclose(M.bootstrap_samples(M.lfw_mean_accuracy, s, y, n_boot=15, seed=5, folds=folds),
                               ref, rtol=0, atol=1e-12)
    assert len(set(np.round(ref, 12).tolist())) > 3


def test_bootstrap_is_stratified_and_deterministic() -> None:
    s, y = _random_pairs(8, 300, 1)
    folds = np.arange(300) % 3
    n_pos = np.sum(y)
    counts = M.bootstrap_samples(lambda a, b: float(np.sum(b)), s, y, n_boot=20, seed=1)
    assert np.all(counts == n_pos)
    fold0_pos = M.bootstrap_samples(lambda a, b, f: float(np.sum(b[f == 0])), s, y,
                                    n_boot=20, seed=1, folds=folds)
    assert np.all(fold0_pos == np.sum(y[folds == 0]))
    assert M.bootstrap_ci(M.roc_auc, s, y, n_boot=50, seed=9) == \
        M.bootstrap_ci(M.roc_auc, s, y, n_boot=50, seed=9)
    assert M.bootstrap_ci(M.roc_auc, s, y, n_boot=50, seed=9) != \
        M.bootstrap_ci(M.roc_auc, s, y, n_boot=50, seed=10)


def test_bootstrap_ci_contains_estimate_and_narrows() -> None:
    widths = []
    for n in (200, 20_000):
        s, y = _random_pairs(9, n, None)
        low, high = M.bootstrap_ci(M.roc_auc, s, y, n_boot=200, seed=0)
        assert low < M.roc_auc(s, y) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 4  # ~ 1/sqrt(100) = 1/10 expected
    s, y = _random_pairs(10, 600, 1)
    folds = np.arange(600) % 6
    low, high = M.bootstrap_ci(M.lfw_mean_accuracy, s, y, n_boot=100, seed=0, folds=folds)
    assert low < M.lfw_accuracy(s, y, folds).mean < high


def test_paired_bootstrap_auc() -> None:
    rng = np.random.default_rng(12)
    s, y = _random_pairs(12, 600, None, shift=1.0)
    same = M.paired_bootstrap_auc(s, s, y, n_boot=100, seed=0)
    assert same["diff"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    assert same["p_value"] == 1.0
    worse = s + rng.normal(0, 2.0, len(s))
    res = M.paired_bootstrap_auc(s, worse, y, n_boot=300, seed=0)
    assert res["diff"] == pytest.approx(M.roc_auc(s, y) - M.roc_auc(worse, y), abs=1e-15)
    assert 0 < res["low"] < res["diff"] < res["high"]
    assert res["p_value"] == pytest.approx(2 / 301)  # no resample crosses 0
    # the same paired resamples drawn independently here, scored by the rank-sum formula
    diffs = [_rank_auc(y[i], s[i]) - _rank_auc(y[i], worse[i]) for i in _reference_resamples(y, None, 300, 0)]
    assert (res["low"], res["high"]) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])),
                                                      abs=1e-14)


# --------------------------------------------------------------------------------- DeLong
def _slow_delong(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Structural components by explicit loops (DeLong 1988), returns (diff, z)."""
    def psi(u: float, v: float) -> float:
        return 1.0 if u > v else 0.5 if u == v else 0.0

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    v10, v01, aucs = [], [], []
    for s in (a, b):
        v10.append([sum(psi(s[i], s[j]) for j in neg) / n for i in pos])
        v01.append([sum(psi(s[i], s[j]) for i in pos) / m for j in neg])
        aucs.append(np.mean(v10[-1]))
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    c = np.array([1.0, -1.0])
    return aucs[0] - aucs[1], (aucs[0] - aucs[1]) / math.sqrt(c @ cov @ c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, y = _random_pairs(seed + 20, 90, 1)
    b = np.round(a + rng.normal(0, 0.8, len(a)), 1)
    res = M.delong_test(a, b, y)
    diff, z = _slow_delong(a, b, y)
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert res["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert res["diff"] == pytest.approx(diff, abs=1e-12)
    assert res["z"] == pytest.approx(z, rel=1e-9)
    assert res["p_value"] == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)


def test_delong_identical_scores() -> None:
    s, y = _random_pairs(30, 200, 1)
    res = M.delong_test(s, s, y)
    assert res["diff"] == 0.0 and res["z"] == 0.0 and res["p_value"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        M.delong_test([1, 2, 3], [1, 2, 3], [1, 0, 0])


# --------------------------------------------------------------------------------- rank-1
def test_rank1_tiny_example() -> None:
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.6, 0.8], [-0.9, -0.1], [-1, 0]])
    ids = ["A", "A", "B", "B", "D", "D", "C"]
    # A and B probes find their twin; D1 is nearest to B2, D2 to the distractor C.
    assert M.rank1_identification(emb * 7.0, ids) == pytest.approx(4 / 6)
    assert M.rank1_identification(emb, list("abcdefg")) is None


def test_rank1_chunking_matches_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 15, 120).astype(str)
    emb = rng.normal(size=(15, 6))[ids.astype(int)] + rng.normal(0, 1.2, (120, 6))
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    _, counts = np.unique(ids, return_counts=True)
    has_twin = counts[np.unique(ids, return_inverse=True)[1]] >= 2
    expected = np.mean((ids[np.argmax(sim, 1)] == ids)[has_twin])
    assert 0.2 < expected < 1.0
    monkeypatch.setattr(identification, "_RANK1_CHUNK_ELEMENTS", 7 * 120)  # 7 probes per block
    assert M.rank1_identification(emb, list(ids)) == pytest.approx(expected, abs=0)


# --------------------------------------------------------------------------------- report
def _reference_eer(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """EER where FPR = 1 - TPR on scikit-learn's piecewise-linear ROC, by a scan over its
    segments; threshold interpolated with the same weight (the first segment starts at
    +inf: its lower end is used)."""
    fpr, tpr, thr = sk_roc_curve(y, s, drop_intermediate=False)
    gap = fpr - (1 - tpr)
    for i in range(len(gap)):
        if gap[i] == 0:
            return float(fpr[i]), float(thr[i])
        if gap[i] > 0:
            lam = -gap[i - 1] / (gap[i] - gap[i - 1])
            t = thr[i] if not np.isfinite(thr[i - 1]) else thr[i - 1] + lam * (thr[i] - thr[i - 1])
            return float(fpr[i - 1] + lam * (fpr[i] - fpr[i - 1])), float(t)
    raise AssertionError("ROC never crosses FPR = FNR")


def _reference_tpr_at(s: np.ndarray, y: np.ndarray, f: float) -> float | None:
    """Highest TPR of scikit-learn's piecewise-linear ROC at FPR ``f`` (top of a vertical
    run); None with fewer than ceil(1 / f) negatives."""
    if np.sum(y == 0) < math.ceil(1 / f - 1e-9):
        return None
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    best = 0.0
    for i in range(len(fpr) - 1):
        if fpr[i] <= f <= fpr[i + 1]:
            if fpr[i + 1] == fpr[i]:
                at = tpr[i + 1]
            else:
                at = tpr[i] + (f - fpr[i]) / (fpr[i + 1] - fpr[i]) * (tpr[i + 1] - tpr[i])
            best = max(best, float(at))
    return best


def test_verification_report_matches_independent_references() -> None:
    # Every figure of the report against a reference computed here (scikit-learn, the
    # brute-force protocol, the resampling written out above), not against the module's
    # own functions, which share the report's code.
    s, y = _random_pairs(13, 3000, 1, shift=1.5)
    folds = np.arange(3000) % 10
    rep = M.verification_report(s, y, folds, n_boot=50, seed=1)
    text = json.dumps(rep, allow_nan=False)
    assert json.loads(text) == rep
    assert (rep["n_pairs"], rep["n_positive"], rep["n_negative"]) == (3000, int(y.sum()), int((y == 0).sum()))
    assert rep["auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12, abs=0)
    ref_eer, ref_eer_thr = _reference_eer(s, y)
    assert rep["eer"] == pytest.approx(ref_eer, abs=1e-12)
    assert rep["eer_threshold"] == pytest.approx(ref_eer_thr, abs=1e-12)
    accs, thrs = _brute_lfw(s, y, folds)
    assert rep["accuracy_per_fold"] == accs
    assert rep["accuracy_mean"] == pytest.approx(np.mean(accs), abs=1e-15)
    assert rep["accuracy_std"] == pytest.approx(np.std(accs), abs=1e-15)
    np.testing.assert_allclose([float(t) for t in rep["fold_thresholds"]], thrs, rtol=1e-15)
    assert rep["fold_ids"] == list(range(10)) and rep["threshold_source"] == "other_folds"
    pred = np.array([s[i] > thrs[folds[i]] for i in range(3000)])
    assert rep["confusion"] == {"tp": int(np.sum(pred & (y == 1))), "fp": int(np.sum(pred & (y == 0))),
                                "tn": int(np.sum(~pred & (y == 0))), "fn": int(np.sum(~pred & (y == 1)))}
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    for f, key in [(1e-1, "fpr_1e-01"), (1e-2, "fpr_1e-02"), (1e-3, "fpr_1e-03"), (1e-4, "fpr_1e-04")]:
        ref = _reference_tpr_at(s, y, f)
        assert (rep["tpr_at_fpr_interpolated"][key] is None) == (ref is None)
        assert (rep["tpr_at_fpr"][key] is None) == (ref is None)
        if ref is not None:
            assert rep["tpr_at_fpr_interpolated"][key] == pytest.approx(ref, abs=1e-12)
            # headline: the highest TPR that one threshold reaches with FPR <= f
            assert rep["tpr_at_fpr"][key] == pytest.approx(sk_tpr[sk_fpr <= f].max(), abs=1e-12)
            assert rep["tpr_at_fpr"][key] <= rep["tpr_at_fpr_interpolated"][key]
    assert rep["tpr_at_fpr"]["fpr_1e-04"] is None and rep["tpr_at_fpr"]["fpr_1e-02"] is not None
    assert rep["min_negatives"] == {"fpr_1e-01": 10, "fpr_1e-02": 100, "fpr_1e-03": 1000, "fpr_1e-04": 10000}
    # bootstrap intervals: 2.5 / 97.5 % quantiles of the metric on the resamples drawn here
    boot_auc = [_rank_auc(y[i], s[i]) for i in _reference_resamples(y, None, 50, 1)]
    np.testing.assert_allclose(rep["auc_ci"], np.quantile(boot_auc, [0.025, 0.975]), rtol=0, atol=1e-12)
    boot_acc = [np.mean(_brute_lfw(s[i], y[i], folds[i])[0]) for i in _reference_resamples(y, folds, 50, 1)]
    np.testing.assert_allclose(rep["accuracy_ci"], np.quantile(boot_acc, [0.025, 0.975]), rtol=0, atol=1e-12)
    assert rep["auc_ci"][0] < rep["auc"] < rep["auc_ci"][1]
    assert rep["accuracy_ci"][0] < rep["accuracy_mean"] < rep["accuracy_ci"][1]
    assert rep["bootstrap"] == {"n_boot": 50, "seed": 1, "alpha": 0.05}
    no_boot = M.verification_report(s, y, folds, n_boot=0)
    assert no_boot["auc_ci"] is None and no_boot["accuracy_ci"] is None


def test_verification_report_hand_example() -> None:
    # positives 10, 9, 7; negatives 8, -1 ... -9 (10 of them); one fold.
    # ROC (FP, TP): (0,0) (0,1) (0,2) (1,2) (1,3) (2,3) ... (10,3): at FPR 0.1 a vertical run
    # from TPR 2/3 to 1, whose top counts. AUC: only (7, 8) misordered -> 29/30.
    # EER: FPR - FNR = -7/30 at (1,2), +3/30 at (1,3) -> 7/10 of the way: FPR 0.1, threshold
    # 8 + 0.7 (7 - 8) = 7.3. Protocol (same fold): thresholds 8.5 and 3 both get 12 of 13
    # right; the smaller (3 = midpoint of 7 and -1) wins: tp 3, fp 1 (the 8), tn 9, fn 0.
    s = [10, 9, 8, 7] + list(range(-1, -10, -1))
    y = [1, 1, 0, 1] + [0] * 9
    rep = M.verification_report(s, y, n_boot=0)
    assert rep["auc"] == pytest.approx(29 / 30, abs=1e-15)
    assert rep["eer"] == pytest.approx(0.1, abs=1e-15) and rep["eer_threshold"] == pytest.approx(7.3, abs=1e-12)
    assert rep["tpr_at_fpr"]["fpr_1e-01"] == 1.0 and rep["tpr_at_fpr"]["fpr_1e-02"] is None
    assert rep["fold_thresholds"] == [3.0] and rep["threshold_source"] == "same_fold"
    assert rep["accuracy_per_fold"] == [12 / 13] and rep["accuracy_std"] == 0.0
    assert rep["confusion"] == {"tp": 3, "fp": 1, "tn": 9, "fn": 0}


def test_report_writes_infinite_thresholds_as_strings() -> None:
    # fold 0 trains on fold 1, where every pair is positive: best is "all same" (-inf)
    s = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    y = [1, 0, 1, 1, 1, 1]
    rep = M.verification_report(s, y, [0, 0, 1, 1, 1, 1], n_boot=0)
    assert rep["fold_thresholds"][0] == "-inf"
    json.dumps(rep, allow_nan=False)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [1, 0, 1], "differ in length"),
        ([0.1, 0.2, 0.3], [1, 0, 2], r"labels\[2\] = 2"),
        ([0.1, 0.2], [1, 1], "both classes"),
        ([0.1, np.nan, 0.3], [1, 0, 1], r"scores\[1\]"),
        ([0.1, np.inf], [1, 0], "finite"),
        ([], [], "empty"),
        ([[0.1, 0.2]], [1, 0], "1-D"),
        (["a", "b"], [1, 0], "real numbers"),
    ],
)
def test_bad_inputs_raise(scores: list, labels: list, match: str) -> None:
    for fn in (M.roc_auc, M.eer, M.roc_curve, M.tpr_at_fpr):
        with pytest.raises(ValueError, match=match):
            fn(scores, labels)


def test_bad_folds_and_options_raise() -> None:
    s, y = [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1]
    with pytest.raises(ValueError, match="one fold id per pair"):
        M.lfw_accuracy(s, y, [0, 1])
    with pytest.raises(ValueError, match="integers or strings"):
        M.lfw_accuracy(s, y, [0.5, 1.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci(M.roc_auc, s, y, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_ci(M.roc_auc, s, y, n_boot=5, alpha=1.5)
    with pytest.raises(ValueError, match="one value per pair"):
        M.confusion_at_threshold(s, y, [0.1, 0.2])


# ------------------------------------------------------------------------ fixed threshold
def _correct_at(s: np.ndarray, y: np.ndarray, t: float) -> int:
    """Correct decisions at threshold t, counted pair by pair (rule: same iff score > t)."""
    return sum(1 for score, label in zip(s.tolist(), y.tolist()) if (score > t) == (label == 1))


def _brute_best_accuracy(s: np.ndarray, y: np.ndarray) -> float:
    """Every candidate (+inf, midpoints of consecutive distinct scores, -inf); best, then smallest."""
    vals = sorted(set(s.tolist()))
    candidates = [-math.inf] + [(a + b) / 2 for a, b in zip(vals, vals[1:])] + [math.inf]
    best = max(_correct_at(s, y, t) for t in candidates)
    return min(t for t in candidates if _correct_at(s, y, t) == best)


def _probes(s: np.ndarray) -> list[float]:
    """Thresholds anywhere on the line: every score, just above and below it, and +-inf."""
    out = [-math.inf, math.inf]
    for v in set(s.tolist()):
        out += [v, float(np.nextafter(v, math.inf)), float(np.nextafter(v, -math.inf))]
    return out


@pytest.mark.parametrize(("seed", "decimals"), [(0, 1), (1, 0), (2, None), (3, 1), (4, 2)])
def test_best_accuracy_threshold_matches_brute_force(seed: int, decimals: int | None) -> None:
    s, y = _random_pairs(seed, 150 + 41 * seed, decimals)
    t = M.best_accuracy_threshold(s, y)
    assert t == _brute_best_accuracy(s, y)
    # no threshold anywhere does better, and every equally good one is larger (the smallest wins)
    mine = _correct_at(s, y, t)
    for probe in _probes(s):
        assert _correct_at(s, y, probe) <= mine
    assert M.choose_threshold(s, y, "best_accuracy") == t


def test_best_accuracy_threshold_hand_example() -> None:
    # 0.9(1) 0.7(0) 0.5(1) 0.5(0) 0.2(0): correct at +inf 3, 0.8 4, 0.6 3, 0.35 3, -inf 2
    s, y = [0.9, 0.7, 0.5, 0.5, 0.2], [1, 0, 1, 0, 0]
    assert M.best_accuracy_threshold(s, y) == pytest.approx(0.8)
    # 0.8(1) 0.6(0) 0.4(1) 0.2(0): 0.7 and 0.3 both get 3 of 4 right; the smaller (0.3) wins
    assert M.best_accuracy_threshold([0.6, 0.4, 0.2, 0.8], [0, 1, 0, 1]) == pytest.approx(0.3)
    assert M.best_accuracy_threshold([1.0, 0.0], [0, 1]) == -math.inf  # +inf and -inf: 1 of 2 each
    assert M.best_accuracy_threshold([1.0, 0.0, 2.0], [1, 0, 1]) == pytest.approx(0.5)


def _brute_target_fpr(s: np.ndarray, y: np.ndarray, target: float) -> float:
    """Lowest threshold (among every score, +-inf) with #(negatives > t) / #negatives <= target, exactly."""
    from fractions import Fraction

    neg = [v for v, label in zip(s.tolist(), y.tolist()) if label == 0]
    limit = Fraction(str(target))
    ok = [t for t in [-math.inf, math.inf, *set(s.tolist())]
          if Fraction(sum(v > t for v in neg), len(neg)) <= limit]
    return min(ok)


@pytest.mark.parametrize(("seed", "decimals", "target"),
                         [(0, 1, 0.1), (1, 2, 0.05), (2, None, 0.01), (3, 1, 0.3), (4, 0, 0.25), (5, None, 0.5)])
def test_target_fpr_threshold_matches_brute_force(seed: int, decimals: int | None, target: float) -> None:
    s, y = _random_pairs(seed, 200 + 40 * seed, decimals)
    t = M.target_fpr_threshold(s, y, target)
    assert t == _brute_target_fpr(s, y, target)
    neg = s[y == 0]
    assert np.mean(neg > t) <= target
    below = float(np.nextafter(t, -math.inf))  # the lowest: anything lower breaks the target
    assert t == -math.inf or np.mean(neg > below) > target
    assert M.choose_threshold(s, y, "target_fpr", target) == t


def test_target_fpr_threshold_exact_counts_and_edges() -> None:
    # 20 negatives at 0.00 .. 0.19 (distinct), target 0.1 allows exactly 2 false positives:
    # the threshold is the 3rd highest negative, 0.17 (0.18 and 0.19 lie above it)
    neg = np.round(np.arange(20) / 100, 2)
    s = np.concatenate([neg, [0.5, 0.17, 0.05]])
    y = np.concatenate([np.zeros(20, int), [1, 1, 1]])
    assert M.target_fpr_threshold(s, y, 0.1) == 0.17
    rep = M.threshold_report(s, y, 0.17)
    assert (rep["fp"], rep["tp"], rep["fn"]) == (2, 1, 2)  # the positive at exactly 0.17 is "different"
    assert M.target_fpr_threshold(s, y, 0.001) == 0.19  # fewer negatives than 1/target: FPR 0
    assert M.target_fpr_threshold(s, y, 1.0) == -math.inf
    with pytest.raises(ValueError, match="target_fpr"):
        M.target_fpr_threshold(s, y, 0.0)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        M.choose_threshold(s, y, "eer")


def test_threshold_report_counts_pair_by_pair() -> None:
    s, y = _random_pairs(9, 300, 1)
    for t in (0.35, 0.4, -math.inf, math.inf, float(np.median(s))):
        rep = M.threshold_report(s, y, t)
        decided = [(score > t, label) for score, label in zip(s.tolist(), y.tolist())]
        tp, fp = decided.count((True, 1)), decided.count((True, 0))
        tn, fn = decided.count((False, 0)), decided.count((False, 1))
        assert (rep["tp"], rep["fp"], rep["tn"], rep["fn"]) == (tp, fp, tn, fn)
        assert rep["accuracy"] == (tp + tn) / 300
        assert rep["tpr"] == tp / (tp + fn) and rep["fpr"] == fp / (fp + tn)
        assert rep["n_pairs"] == 300
    assert M.threshold_report(s, y, math.inf)["threshold"] == "inf"
    np.testing.assert_array_equal(M.apply_threshold([0.5, 0.6, 0.4], 0.5), [False, True, False])


# ------------------------------------------------------------ weighted ROC (resamples)
@pytest.mark.parametrize("decimals", [None, 1])
def test_weighted_eer_and_tpr_equal_scikit_learn_on_the_materialised_resamples(decimals) -> None:
    s, y = _random_pairs(21, 300, decimals=decimals)
    rng = np.random.default_rng(5)
    weights = np.stack([np.ones(300, dtype=np.int64)] + [np.bincount(rng.integers(0, 300, 300), minlength=300)
                                                         for _ in range(4)])
    fprs = [0.1, 0.02]
    rates, tprs = M.weighted_eer_and_tpr(s, y, weights, fprs)
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(300), w)
        fpr, tpr, _ = sk_roc_curve(y[idx], s[idx], drop_intermediate=False)
        assert rates[b] == pytest.approx(_reference_eer(s[idx], y[idx])[0], abs=1e-12)
        for f in fprs:
            assert tprs[f][b] == pytest.approx(tpr[fpr <= f + 1e-12].max(), abs=1e-12)
    none, empty = M.weighted_eer_and_tpr(s, y, weights, [])  # a set too small for any FPR target
    assert empty == {} and none == pytest.approx(rates)
