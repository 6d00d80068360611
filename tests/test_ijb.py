"""IJB-B/C: readers on the synthetic miniature, bad inputs, pooling and pair scores against brute force,
TPR@FPR against pipeline.metrics, embedding against the model run by hand, and the stage functions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.align import align_face
from pipeline.config import ModelParams
from pipeline.datasets.ijb_synth import write_ijb_miniature
from pipeline.metrics import tpr_at_fpr
from pipeline.models import build_model
from pipeline.protocols import ProtocolError
from pipeline.protocols.ijb import embed_ijb, pair_scores, pool_templates, read_ijb, template_index
from pipeline.protocols.params import ProtocolParams
from pipeline.protocols.stages import run_ijb_embed, run_ijb_eval, summarise, template_subjects, tpr_name
from pipeline.protocols.verification import verification_metrics

FPRS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    return root, write_ijb_miniature(root, flavour="ijbc", subjects=6, probe_templates=2, seed=0, size=80)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A facepipe model.pt (smallcnn, 16-D, 64 px) with seeded random weights: a real network to embed with."""
    torch.manual_seed(0)
    params = ModelParams(embedding_size=16)
    model = build_model(params.backbone, embedding_size=16, in_channels=3, input_size=64, head=params.head)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": model.state_dict(), "model_params": params.model_dump(), "image_size": 64}, path)
    return path


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "IJBC"
    shutil.copytree(root, target)
    return target


def _one_line_error(call, *needles: str) -> str:
    with pytest.raises(ProtocolError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------------------------ readers
def test_reader_parses_the_miniature_exactly(ijbc):
    root, truth = ijbc
    ijb = read_ijb(root)
    assert ijb.prefix == "ijbc" and list(ijb.images) == truth.images
    assert np.array_equal(ijb.landmarks, np.array(truth.landmarks)) and ijb.landmarks.shape == (len(truth.images), 5, 2)
    assert np.allclose(ijb.detector, truth.detector, atol=0, rtol=1e-7)
    assert [ijb.images[i] for i in ijb.face_image] == truth.face_image
    assert ijb.face_template.tolist() == truth.face_template and ijb.face_media.tolist() == truth.face_media
    assert np.array_equal(np.stack([ijb.pair_t1, ijb.pair_t2, ijb.pair_label], 1), truth.pairs)
    assert set(ijb.galleries) == {"G1", "G2"}
    for name, gallery in ijb.galleries.items():
        assert gallery.templates.tolist() == sorted(truth.galleries[name])
        assert gallery.subjects.tolist() == [truth.template_subject[t] for t in gallery.templates.tolist()]
    assert ijb.probes.templates.tolist() == sorted(truth.probes)
    # the miniature holds a media id that templates of two different subjects share
    owners = {truth.template_subject[t] for t, m in zip(truth.face_template, truth.face_media)
              if m == truth.shared_media}
    assert len(owners) == 2


def test_reader_takes_the_ijbb_names(tmp_path):
    truth = write_ijb_miniature(tmp_path / "IJBB", flavour="ijbb", subjects=2, probe_templates=1, size=64)
    ijb = read_ijb(tmp_path / "IJBB")
    assert ijb.prefix == "ijbb" and set(ijb.galleries) == {"S1", "S2"}
    assert ijb.probes.templates.tolist() == sorted(truth.probes)


def test_template_in_the_pair_list_without_images_is_named(ijbc, tmp_path):
    root = _copy(ijbc[0], tmp_path)
    path = root / "meta" / "ijbc_template_pair_label.txt"
    lines = path.read_text().splitlines()
    lines[4] = "1 999 0"
    path.write_text("\n".join(lines) + "\n")
    _one_line_error(lambda: read_ijb(root), f"{path}:5:", "template 999 has no images")


def test_image_missing_on_disk_is_named(ijbc, tmp_path):
    root = _copy(ijbc[0], tmp_path)
    (root / "loose_crop" / "7.jpg").unlink()
    faces = root / "meta" / "ijbc_face_tid_mid.txt"
    line = 1 + [ln.split()[0] for ln in faces.read_text().splitlines()].index("7.jpg")
    _one_line_error(lambda: read_ijb(root), f"{faces}:{line}:", "loose_crop/7.jpg", "not on disk")
    assert read_ijb(root, check_images=False).images.size  # evaluating from features does not need it


@pytest.mark.parametrize("bad", ["3.jpg 1 2 3", "3.jpg x1.5 2 3 4 5 6 7 8 9 10 0.9",
                                 "3.jpg 1 2 3 4 5 nan 7 8 9 10 0.9"])
def test_landmarks_that_do_not_parse_are_named(ijbc, tmp_path, bad):
    root = _copy(ijbc[0], tmp_path)
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[2] = bad
    path.write_text("\n".join(lines) + "\n")
    _one_line_error(lambda: read_ijb(root), f"{path}:3:", "landmarks do not parse")


def test_empty_probe_set_is_named(ijbc, tmp_path):
    root = _copy(ijbc[0], tmp_path)
    path = root / "meta" / "ijbc_1N_probe_mixed.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    _one_line_error(lambda: read_ijb(root), str(path), "empty probe set")


def test_other_bad_lines_are_named(ijbc, tmp_path):
    root = _copy(ijbc[0], tmp_path)
    pairs = root / "meta" / "ijbc_template_pair_label.txt"
    original = pairs.read_text()
    pairs.write_text(original.replace("1 1000 1\n", "1 1000 2\n", 1))
    _one_line_error(lambda: read_ijb(root), f"{pairs}:1:", "label")
    pairs.write_text(original)
    gallery = root / "meta" / "ijbc_1N_gallery_G1.csv"
    rows = gallery.read_text().splitlines()
    rows[2] = rows[2].replace(",100,", ",555,", 1)
    gallery.write_text("\n".join(rows) + "\n")
    _one_line_error(lambda: read_ijb(root), f"{gallery}:3:", "template 1 has subject 555")
    faces = root / "meta" / "ijbc_face_tid_mid.txt"
    faces.write_text(faces.read_text().replace("2.jpg 1 ", "2.jpg one ", 1))
    _one_line_error(lambda: read_ijb(root), f"{faces}:2:", "template id 'one'")


# ----------------------------------------------------------------------- pooling, pair scores
def _brute_pool(features, face_feature, face_template, face_media, detector, keep_norm):
    """Template features by plain loops: mean per (template, media), sum, normalise (float64)."""
    out = {}
    for t in sorted(set(face_template.tolist())):
        total = np.zeros(features.shape[1])
        in_t = [i for i in range(len(face_template)) if face_template[i] == t]
        for m in sorted({face_media[i] for i in in_t}):
            rows = []
            for i in in_t:
                if face_media[i] == m:
                    f = features[face_feature[i]].astype(np.float64)
                    f = f if keep_norm else f / np.linalg.norm(f)
                    rows.append(f * (detector[face_feature[i]] if detector is not None else 1.0))
            total += np.mean(rows, axis=0)
        out[t] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("keep_norm", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_pooling_matches_plain_loops_with_a_media_id_shared_across_subjects(keep_norm, weighted):
    rng = np.random.default_rng(5)
    features = rng.normal(size=(40, 8)).astype(np.float32) * rng.uniform(1, 9, (40, 1)).astype(np.float32)
    detector = rng.uniform(0.2, 1.0, 40).astype(np.float32)
    face_feature = np.concatenate([np.arange(40), [3, 17]])  # two images listed in a second template too
    face_template = rng.choice([10, 11, 12, 13], len(face_feature))
    face_media = rng.choice([500, 501, 502], len(face_feature))  # media ids shared by every template
    ids, pooled = pool_templates(features, face_feature, face_template, face_media,
                                 detector=detector if weighted else None, keep_norm=keep_norm)
    brute = _brute_pool(features, face_feature, face_template, face_media, detector if weighted else None,
                        keep_norm)
    assert ids.tolist() == sorted(brute)
    assert np.allclose(pooled, np.array([brute[t] for t in ids.tolist()]), atol=2e-6)
    # pooling per media alone (ignoring the template) would give something else
    _, per_media = pool_templates(features, face_feature, np.zeros_like(face_template), face_media)
    assert not np.allclose(per_media[0], pooled[0], atol=1e-3)


@pytest.mark.parametrize("block", [1 << 25, 7 * 13])
def test_pair_scores_equal_float64_dot_products(block):
    rng = np.random.default_rng(2)
    pooled = rng.normal(size=(60, 16))
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    # dense: 20 first templates x 40 second ones, 700 pairs (Gram blocks; with block=91, several)
    i1 = rng.integers(0, 20, 700)
    i2 = rng.integers(20, 60, 700)
    scores = pair_scores(pooled, i1, i2, block_elements=block)
    assert scores.dtype == np.float32
    assert np.allclose(scores, np.einsum("ij,ij->i", pooled[i1], pooled[i2]), atol=1e-6)
    # sparse: few pairs over many templates (gathered)
    j1, j2 = rng.integers(0, 60, 30), rng.integers(0, 60, 30)
    assert np.allclose(pair_scores(pooled, j1, j2), np.einsum("ij,ij->i", pooled[j1], pooled[j2]), atol=1e-6)


def test_template_index_maps_ids_and_names_an_unknown_one():
    ids = np.array([3, 40, 41, 900])
    assert template_index(ids, np.array([900, 3, 41])).tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match="template 5 has no pooled feature"):
        template_index(ids, np.array([3, 5]))


# ---------------------------------------------------------------------------- verification
def test_tpr_at_fpr_and_auc_match_the_project_metrics_and_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.random(30_000) < 0.05
    scores = np.where(labels, rng.normal(1.5, 1, labels.size), rng.normal(0, 1, labels.size))
    scores = np.round(scores, 2).astype(np.float32)  # ties, on purpose
    result = verification_metrics(scores, labels, FPRS)
    expected = tpr_at_fpr(scores.astype(np.float64), labels.astype(int), FPRS, interpolate=False)
    for f in FPRS:
        assert result.tpr[f] == expected[f], f
    assert result.tpr[1e-6] is None and result.supported == {f: f >= 1e-4 for f in FPRS}
    assert result.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # every ROC point is one a threshold achieves: recount it
    for fpr, tpr, threshold in result.roc.itertuples(index=False):
        assert fpr == pytest.approx(np.mean(scores[~labels] > threshold))
        assert tpr == pytest.approx(np.mean(scores[labels] > threshold))


# -------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("flip", ["sum", "concat", "none"])
def test_embedding_aligns_with_the_landmarks_and_fuses_the_mirror(ijbc, model_file, flip):
    from pipeline.embed import load_model_file
    from pipeline.images import load_rgb

    root, truth = ijbc
    ijb = read_ijb(root)
    ijb.images, ijb.landmarks = ijb.images[:3], ijb.landmarks[:3]
    model, saved = load_model_file(model_file)
    features = embed_ijb(ijb, model, saved, ProtocolParams(flip=flip, batch_size=2), progress=False)
    for i in range(3):
        crop = align_face(load_rgb(root / "loose_crop" / truth.images[i])[0], np.array(truth.landmarks[i]), 64)[0]
        x = (torch.from_numpy(crop).permute(2, 0, 1)[None].float() - 127.5) / 128.0
        with torch.no_grad():
            plain, mirror = model(x)[0].numpy(), model(x.flip(-1))[0].numpy()
        expected = {"sum": plain + mirror, "concat": np.concatenate([plain, mirror]), "none": plain}[flip]
        assert np.allclose(features[i], expected, atol=1e-4)


# ---------------------------------------------------------------------------------- stages
def test_stages_embed_evaluate_and_summarise_the_miniature(ijbc, model_file, tmp_path):
    root, truth = ijbc
    params = ProtocolParams(n_boot=40, fprs=(1e-2, 1e-1), fpirs=(0.1,))
    info = run_ijb_embed(model_file, root, tmp_path / "feat", params, progress=False)
    assert info["images"] == len(truth.images) and info["dim"] == 16
    metrics = run_ijb_eval(tmp_path / "feat", root, tmp_path / "eval", params, progress=False, keep_scores=True)
    # recompute the 1:1 scores from the written features by plain loops
    ijb = read_ijb(root, check_images=False)
    features = np.load(tmp_path / "feat" / "features.npy")
    brute = _brute_pool(features, ijb.face_image, ijb.face_template, ijb.face_media, ijb.detector, True)
    expected = np.array([brute[a] @ brute[b] for a, b in zip(ijb.pair_t1.tolist(), ijb.pair_t2.tolist())])
    scores = np.load(tmp_path / "eval" / "scores.npy")
    assert np.allclose(scores, expected, atol=1e-5)
    direct = tpr_at_fpr(scores.astype(np.float64), ijb.pair_label.astype(int), (1e-2, 1e-1), interpolate=False)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["values"][tpr_name(1e-1)] == direct[1e-1] and written["values"][tpr_name(1e-2)] is None
    assert written["verification"]["supported"] == {"fpr_1e-02": False, "fpr_1e-01": True}
    assert written["subjects"] == {"count": 6, "from": "1:N files", "digest": metrics["subjects"]["digest"]}
    assert set(written["identification"]) == {"G1", "G2", "mean"}
    with np.load(tmp_path / "eval" / "bootstrap.npz") as boot:
        assert boot[tpr_name(1e-1)].shape == (40,) and boot["rank1_G1"].shape == (40,)
    summary = summarise({"a": [tmp_path / "eval"], "b": [tmp_path / "eval"]}, tmp_path / "summary", params)
    assert summary["intervals"][tpr_name(1e-1)]["a"]["mean"] == direct[1e-1]
    assert "rank1_G1" in summary["verdicts"] and (tmp_path / "summary" / "summary.md").is_file()
    # without resamples one run has no interval: the table says so
    no_boot = ProtocolParams(n_boot=0, fprs=(1e-1,))
    run_ijb_eval(tmp_path / "feat", root, tmp_path / "eval0", no_boot, progress=False)
    summary = summarise({"a": [tmp_path / "eval0"]}, tmp_path / "summary0", no_boot)
    assert summary["intervals"]["rank1_G1"]["a"]["low"] is None and summary["verdicts"] == {}
    line = f"| rank1_G1 | a | {metrics['values']['rank1_G1']:.4f} (no interval: one run and no resamples) | 1 |"
    assert line in (tmp_path / "summary0" / "summary.md").read_text()


def test_eval_refuses_features_of_another_image_list_and_leaves_the_old_output(ijbc, model_file, tmp_path):
    root, _ = ijbc
    params = ProtocolParams(n_boot=0)
    run_ijb_embed(model_file, root, tmp_path / "feat", params, progress=False)
    run_ijb_eval(tmp_path / "feat", root, tmp_path / "eval", params, progress=False)
    before = (tmp_path / "eval" / "metrics.json").read_bytes()
    names = tmp_path / "feat" / "images.txt"
    lines = names.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    names.write_text("\n".join(lines) + "\n")
    _one_line_error(lambda: run_ijb_eval(tmp_path / "feat", root, tmp_path / "eval", params, progress=False),
                    f"{names}:2:", "rerun the embed stage")
    assert (tmp_path / "eval" / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "feat"]  # no temporary folder left behind


def test_genuine_pair_of_two_subjects_in_the_1n_files_is_named(ijbc, model_file, tmp_path):
    root = _copy(ijbc[0], tmp_path)
    probes = root / "meta" / "ijbc_1N_probe_mixed.csv"
    probes.write_text(probes.read_text().replace("\n1000,100,", "\n1000,101,"))  # probe 1000 now of subject 101
    params = ProtocolParams(n_boot=5)
    run_ijb_embed(model_file, root, tmp_path / "feat", params, progress=False)
    pairs = root / "meta" / "ijbc_template_pair_label.txt"
    _one_line_error(lambda: run_ijb_eval(tmp_path / "feat", root, tmp_path / "eval", params, progress=False),
                    f"{pairs}:1:", "templates 1 and 1000 are a genuine pair but belong to different subjects")
    assert not (tmp_path / "eval").exists()


def test_subjects_come_from_the_genuine_pairs_without_1n_files(ijbc, tmp_path):
    root = _copy(ijbc[0], tmp_path)
    for path in (root / "meta").glob("*_1N_*.csv"):
        path.unlink()
    ijb = read_ijb(root, check_images=False)
    assert ijb.probes is None and ijb.galleries == {}
    ids = np.unique(ijb.face_template)
    codes, count, source = template_subjects(ijb, ids)
    assert source == "genuine pairs" and count == 6
    truth = ijbc[1].template_subject
    for a in range(len(ids)):
        for b in range(len(ids)):
            assert (codes[a] == codes[b]) == (truth[int(ids[a])] == truth[int(ids[b])])


def test_params_name_the_bad_key():
    with pytest.raises(ProtocolError, match="flip = 'both'"):
        ProtocolParams(flip="both")
    with pytest.raises(ProtocolError, match="unknown key 'flips'"):
        ProtocolParams.from_dict({"flips": "sum"})
    with pytest.raises(ProtocolError, match="fprs"):
        ProtocolParams.from_dict({"fprs": [0.0]})
    assert ProtocolParams.from_dict({"fprs": [1e-3], "keep_norm": False}).fprs == (1e-3,)
