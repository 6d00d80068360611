"""1:N search and the distractor protocol against full similarity matrices; subject resampling against a
direct implementation (pairs repeated by their weight); paired verdicts and intervals recomputed by hand;
the distractor set's reader, bad inputs and stages on the synthetic miniature."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.config import ModelParams
from pipeline.datasets.ijb_synth import write_distractor_miniature
from pipeline.metrics import tpr_at_fpr
from pipeline.models import build_model
from pipeline.protocols import ProtocolError
from pipeline.protocols.identification import distractor_search, identification_metrics, search_gallery
from pipeline.protocols.megaface import read_distractor_set
from pipeline.protocols.params import ProtocolParams
from pipeline.protocols.stages import run_distractor_embed, run_distractor_eval
from pipeline.protocols.subjects import PairResampler, bootstrap_rate, draw_weights, paired_verdicts, \
    subject_interval


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------ templates, 1:N
def test_gallery_search_matches_a_full_similarity_matrix():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(12, 8))
    gallery_subjects = np.arange(8)  # subjects 8..11 have no gallery template: their probes are non-mated
    probe_subjects = rng.integers(0, 12, 200)
    gallery = _unit(centres[gallery_subjects] + rng.normal(0, 0.6, (8, 8)))
    probes = _unit(centres[probe_subjects] + rng.normal(0, 0.9, (200, 8)))
    search = search_gallery(probes, probe_subjects, gallery, gallery_subjects, chunk=17)
    metrics = identification_metrics(search, (1, 2, 5), (0.1, 0.5))
    sims = probes.astype(np.float64) @ gallery.T.astype(np.float64)
    mated = probe_subjects < 8
    ranks = np.array([1 + np.sum(sims[q] > sims[q, probe_subjects[q]]) for q in np.flatnonzero(mated)])
    assert search.rank[mated].tolist() == ranks.tolist() and (search.rank[~mated] == 0).all()
    for r in (1, 2, 5):
        assert metrics["cmc"][r] == pytest.approx(np.mean(ranks <= r))
    non_mated_top = sims[~mated].max(1)
    assert metrics["n_non_mated"] == len(non_mated_top) >= 10
    for f in (0.1, 0.5):  # the threshold keeps at most floor(f * n) non-mated top scores
        allowed = math.floor(f * len(non_mated_top))
        threshold = np.sort(non_mated_top)[::-1][allowed]
        assert np.sum(non_mated_top > threshold) <= allowed < np.sum(non_mated_top >= threshold)
        hits = [sims[q, probe_subjects[q]] > threshold and r == 1 for q, r in zip(np.flatnonzero(mated), ranks)]
        assert metrics["tpir"][f] == pytest.approx(np.mean(hits))
    assert identification_metrics(search, (1,), (0.01,))["tpir"][0.01] is None  # 100 non-mated needed


# ------------------------------------------------------------------------------- distractors
def _distractor_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16))
    identities = np.repeat(["ann", "bob", "cid", "dee"], [4, 3, 3, 2])
    probes = centres[np.searchsorted(["ann", "bob", "cid", "dee"], identities)] * 0.8 + rng.normal(size=(12, 16))
    distractors = rng.normal(size=(300, 16)) * rng.uniform(0.5, 3, (300, 1))
    distractors[:25] += probes[0] * 3  # many distractors close to one probe: its rows are scanned whole
    return probes.astype(np.float32), identities, distractors.astype(np.float32)


@pytest.mark.parametrize("chunk", [37, 300, 1000])
def test_distractor_search_matches_a_full_similarity_matrix(chunk):
    probes, identities, distractors = _distractor_case()
    result = distractor_search(probes, identities, distractors, sizes=(10, 100, 250), max_rank=5,
                               fprs=(1e-3, 1e-2, 1e-4), chunk=chunk)
    p, d = _unit(probes).astype(np.float64), _unit(distractors).astype(np.float64)
    sims, genuine = p @ d.T, p @ p.T
    pairs = [(a, b) for a in range(12) for b in range(12) if a != b and identities[a] == identities[b]]
    assert sorted(zip(result.pair_probe.tolist(), result.pair_gallery.tolist())) == sorted(pairs)
    assert result.sizes == [10, 100, 250, 300]
    for n in result.sizes:
        ranks = np.array([1 + np.sum(sims[a, :n] > genuine[a, b]) for a, b in zip(result.pair_probe,
                                                                                result.pair_gallery)])
        for r in range(1, 6):
            assert result.cmc[n][r] == pytest.approx(np.mean(ranks <= r)), (n, r)
    assert result.correct.tolist() == (ranks == 1).tolist()
    # verification: unordered genuine pairs against every probe x distractor pair
    gen = [genuine[a, b] for a, b in pairs if a < b]
    labels = np.r_[np.ones(len(gen)), np.zeros(sims.size)]
    expected = tpr_at_fpr(np.r_[gen, sims.ravel()], labels, (1e-3, 1e-2, 1e-4), interpolate=False)
    assert result.n_impostor == 3600 and result.n_genuine == len(gen)
    assert result.tpr[1e-4] is None
    for f in (1e-3, 1e-2):
        assert result.tpr[f] == pytest.approx(expected[f]), f


def test_distractor_search_reads_a_memory_map(tmp_path):
    probes, identities, distractors = _distractor_case(1)
    np.save(tmp_path / "d.npy", distractors)
    mapped = distractor_search(probes, identities, np.load(tmp_path / "d.npy", mmap_mode="r"), sizes=(50,), chunk=64)
    plain = distractor_search(probes, identities, distractors, sizes=(50,), chunk=64)
    assert mapped.cmc == plain.cmc


# ------------------------------------------------------------------------- subject resampling
def _pairs_case(seed: int, n_subjects: int = 7, n_pairs: int = 2500):
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, n_subjects, 40)  # subject of each template
    t1, t2 = rng.integers(0, 40, n_pairs), rng.integers(0, 40, n_pairs)
    labels = templates[t1] == templates[t2]
    scores = np.where(labels, rng.normal(1.2, 1, n_pairs), rng.normal(0, 1, n_pairs))
    if n_subjects == 3:  # impostors of subjects 0 and 1 score high: resamples without either need deeper impostors
        scores += 3.0 * (~labels & (np.minimum(templates[t1], templates[t2]) == 0)
                         & (np.maximum(templates[t1], templates[t2]) == 1))
    return np.round(scores, 1).astype(np.float32), labels, templates[t1], templates[t2]


@pytest.mark.parametrize("seed, n_subjects, n_pairs, fprs", [
    (0, 7, 2500, (1e-3, 1e-2, 0.1, 0.5)), (1, 7, 2500, (1e-3, 1e-2, 0.1, 0.5)), (2, 7, 2500, (1e-3, 0.5)),
    (3, 3, 40_000, (1e-3, 0.1)),  # few subjects, many pairs: the kept top share runs short, all are sorted
])
def test_subject_resampled_tpr_matches_the_pairs_repeated_by_their_weight(seed, n_subjects, n_pairs, fprs):
    scores, labels, s1, s2 = _pairs_case(seed, n_subjects, n_pairs)
    weights = draw_weights(n_subjects, 25, seed)
    assert (weights.sum(1) == n_subjects).all() and weights.dtype == np.int32
    resampler = PairResampler(scores, labels, s1, s2, n_subjects, fprs)
    tprs = resampler.tpr(weights)
    if n_subjects == 3:
        assert len(resampler._top[0]) < resampler.n_neg and resampler._full is not None
    for b, w in enumerate(weights):
        reps = np.where(labels, w[s1], w[s1] * w[s2])
        if not reps[labels].any() or not reps[~labels].any():
            continue
        direct = tpr_at_fpr(np.repeat(scores, reps).astype(np.float64), np.repeat(labels, reps).astype(int), fprs,
                            interpolate=False)
        for j, f in enumerate(fprs):
            if direct[f] is None:
                assert math.isnan(tprs[b, j])
            else:
                assert tprs[b, j] == direct[f], (b, f)


def test_resampled_rate_matches_the_items_repeated_by_their_weight():
    rng = np.random.default_rng(3)
    group = rng.integers(0, 9, 60)
    success = rng.random(60) < 0.6
    weights = draw_weights(9, 30, 1)
    rates = bootstrap_rate(success, group, weights)
    for b, w in enumerate(weights):
        reps = w[group]
        expected = np.repeat(success, reps).mean() if reps.sum() else math.nan
        assert rates[b] == pytest.approx(expected, nan_ok=True)


def test_genuine_pair_across_subjects_is_refused():
    with pytest.raises(ValueError, match="pair 1 is genuine but its templates have subjects 0 and 2"):
        PairResampler(np.zeros(3), np.array([False, True, False]), np.array([0, 0, 1]), np.array([1, 2, 1]), 3,
                      (0.1,))


def test_interval_and_paired_verdicts_recomputed_by_hand():
    rng = np.random.default_rng(7)
    per_run = {"a": [0.90, 0.92, 0.91], "b": [0.80, 0.83], "c": [0.905]}
    boot = {m: rng.normal(np.mean(v), 0.01, 400) for m, v in per_run.items()}
    boot["b"][3] = np.nan  # a resample where b is undefined is left out of its differences
    interval = subject_interval(per_run["a"], boot["a"])
    var = np.var(per_run["a"], ddof=1) / 3 + np.var(boot["a"], ddof=1)
    df = var**2 / ((np.var(per_run["a"], ddof=1) / 3) ** 2 / 2)  # the resampling part has infinite df
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    assert interval.mean == pytest.approx(0.91) and interval.high - interval.mean == pytest.approx(half)
    assert subject_interval([0.9, math.nan], boot["a"]) is None
    verdicts = {(d.a, d.b): d for d in paired_verdicts(per_run, boot)}
    assert set(verdicts) == {("a", "b"), ("a", "c"), ("c", "b")}
    raw = {}
    for (a, b), d in verdicts.items():
        diff = boot[a] - boot[b]
        diff = diff[np.isfinite(diff)]
        parts = [np.var(diff, ddof=1)] + [np.var(per_run[m], ddof=1) / len(per_run[m]) for m in (a, b)
                                            if len(per_run[m]) > 1]
        runs_df = [len(per_run[m]) - 1 for m in (a, b) if len(per_run[m]) > 1]
        se = math.sqrt(sum(parts))
        nu = sum(parts) ** 2 / sum(v * v / k for v, k in zip(parts[1:], runs_df))
        t = (np.mean(per_run[a]) - np.mean(per_run[b])) / se
        raw[(a, b)] = 2 * stats.t.sf(abs(t), nu)
        assert d.diff == pytest.approx(np.mean(per_run[a]) - np.mean(per_run[b]))
        assert d.p == pytest.approx(raw[(a, b)])
    order = sorted(raw, key=raw.get)  # Holm: (3, 2, 1) times the sorted p-values, running maximum
    adjusted, running = {}, 0.0
    for k, key in enumerate(order):
        running = max(running, min(1.0, (3 - k) * raw[key]))
        adjusted[key] = running
    for key, d in verdicts.items():
        assert d.p_holm == pytest.approx(adjusted[key])
        assert d.verdict == (f"{d.a} beats {d.b}" if adjusted[key] < 0.05 else "not distinguishable")
        assert (d.holm_low > 0 or d.holm_high < 0) == (adjusted[key] < 0.05)  # the Holm interval agrees
    assert verdicts[("a", "b")].verdict == "a beats b"


# ---------------------------------------------------------------------- the distractor set
@pytest.fixture(scope="module")
def megaface(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("mf") / "megaface"
    return root, write_distractor_miniature(root, identities=3, images_per_identity=4, distractors=30, size=96)


def test_reader_parses_the_distractor_miniature_and_drops_the_noise(megaface):
    root, truth = megaface
    data = read_distractor_set(root)
    assert data.probes.tolist() == [p for p in truth.probes if not p.endswith(truth.probe_noise)]
    assert data.identities.tolist() == [p.split("/")[0] for p in data.probes.tolist()]
    assert data.distractors.tolist() == truth.distractors[:-1] and truth.distractor_noise == truth.distractors[-1]


def test_distractor_set_errors_name_list_and_line(megaface, tmp_path):
    root = tmp_path / "mf"
    shutil.copytree(megaface[0], root)
    missing = root / "megaface_images" / megaface[1].distractors[4]
    missing.unlink()
    with pytest.raises(ProtocolError, match=rf"megaface_lst:5: image megaface_images/{megaface[1].distractors[4]}"):
        read_distractor_set(root)
    (root / "facescrub_lst").write_text("person00/person00_1.png\nperson01/person01_1.png\n")
    with pytest.raises(ProtocolError, match="facescrub_lst: empty probe set"):
        read_distractor_set(root)


def test_distractor_stages_on_the_miniature(megaface, tmp_path):
    root, truth = megaface
    torch.manual_seed(1)
    params_model = ModelParams(embedding_size=16)
    model = build_model(params_model.backbone, embedding_size=16, in_channels=3, input_size=64, head=params_model.head)
    model_path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_params": params_model.model_dump(), "image_size": 64}, model_path)
    params = ProtocolParams(n_boot=30, distractor_sizes=(10, 20), max_rank=10, distractor_fpr=0.01, chunk=8)
    info = run_distractor_embed(model_path, root, tmp_path / "feat", params, progress=False)
    assert info == {"model": str(model_path), "flip": "sum", "probes": 11, "distractors": 29, "dim": 16}
    metrics = run_distractor_eval(tmp_path / "feat", root, tmp_path / "eval", params, progress=False)
    probes = np.load(tmp_path / "feat" / "probes.npy")
    distractors = np.load(tmp_path / "feat" / "distractors.npy")
    identities = read_distractor_set(root).identities
    p, d = _unit(probes).astype(np.float64), _unit(distractors).astype(np.float64)
    ranks = [1 + np.sum(p[a] @ d.T > p[a] @ p[b]) for a in range(11) for b in range(11)
             if a != b and identities[a] == identities[b]]
    assert metrics["values"]["rank1"] == pytest.approx(np.mean(np.array(ranks) == 1))
    assert metrics["searches"] == len(ranks) == 3 * 4 * 3 - 2 * 3  # the noise image leaves one identity 3 images
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sorted(written["cmc"]) == ["10", "20", "29"] and written["verification"]["n_impostor"] == 11 * 29
    assert (tmp_path / "eval" / "cmc.csv").read_text().startswith("distractors,rank1,")
    with np.load(tmp_path / "eval" / "bootstrap.npz") as boot:
        assert boot["rank1"].shape == (30,)
