"""Tests of the built-in synthetic face dataset (pipeline.datasets.synthetic)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets.synthetic import (
    FaceIdentity,
    ImageVariation,
    face_landmarks,
    generate_synthetic,
    render_face,
    sample_identity,
    sample_variation,
)

SMALL = dict(train_identities=6, train_images_per_identity=2, closed_images_per_identity=3,
             open_identities=6, domain_identities=6, test_images_per_identity=3,
             image_size=64, folds=3, pairs_per_fold=4, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate_synthetic(out, seed=3, workers=1, **SMALL)


def test_render_face_is_deterministic_rgb_uint8():
    identity = sample_identity(np.random.default_rng(1), "a")
    variation = sample_variation(np.random.default_rng(2), "a")
    assert isinstance(identity, FaceIdentity) and isinstance(variation, ImageVariation)
    img = render_face(identity, variation, 96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render_face(identity, variation, 96))
    other = render_face(sample_identity(np.random.default_rng(5), "a"), variation, 96)
    assert np.abs(img.astype(int) - other.astype(int)).mean() > 2  # another person looks different
    assert img.std() > 20  # not a flat image


def test_samplers_depend_only_on_the_rng():
    assert sample_identity(np.random.default_rng(7), "b") == sample_identity(np.random.default_rng(7), "b")
    assert sample_identity(np.random.default_rng(7)) != sample_identity(np.random.default_rng(8))
    assert sample_variation(np.random.default_rng(7)) == sample_variation(np.random.default_rng(7))


def test_same_seed_same_bytes_any_workers_and_counts(tmp_path, small_sets):
    first_dir, _ = small_sets
    # two workers, and one more open identity: every file of the first run is byte-identical
    generate_synthetic(tmp_path / "b", seed=3, workers=2, **{**SMALL, "open_identities": 7})
    a, b = _files(first_dir), _files(tmp_path / "b")
    assert len(b) == len(a) + 3
    assert all(b[name] == data for name, data in a.items())
    generate_synthetic(tmp_path / "c", seed=4, workers=1, **SMALL)
    c = _files(tmp_path / "c")
    assert c.keys() == a.keys()
    assert sum(c[name] != a[name] for name in a) == len(a)


def test_sets_and_tables(small_sets):
    out, sets = small_sets
    assert list(sets) == ["train", "synth_closed", "synth_open", "synth_domain"]
    for name, (images, pairs) in sets.items():
        assert list(images.columns) == ["image_id", "path", "identity"]
        assert images.image_id.is_unique
        for row in images.itertuples():
            assert row.path == str(out / "images" / name / row.identity / (row.image_id.split("/")[1] + ".jpg"))
            assert Path(row.path).is_file()
            assert row.image_id.startswith(f"{row.identity}/{row.identity}_")
        assert (pairs is None) == (name == "train")
    train, closed = sets["train"][0], sets["synth_closed"][0]
    assert len(train) == 6 * 2 and len(closed) == 6 * 3
    assert set(closed.identity) == set(train.identity) == {f"train_{i:04d}" for i in range(1, 7)}
    assert not set(closed.path) & set(train.path)  # held-out images are other files
    train_bytes = {Path(p).read_bytes() for p in train.path}
    assert not any(Path(p).read_bytes() in train_bytes for p in closed.path)
    open_ids, domain_ids = set(sets["synth_open"][0].identity), set(sets["synth_domain"][0].identity)
    assert open_ids == {f"open_{i:04d}" for i in range(1, 7)}
    assert domain_ids == {f"domain_{i:04d}" for i in range(1, 7)}
    assert not (open_ids | domain_ids) & set(train.identity)


@pytest.mark.parametrize("name", ["synth_closed", "synth_open", "synth_domain"])
def test_pairs_are_lfw_style(small_sets, name):
    _, sets = small_sets
    images, pairs = sets[name]
    assert list(pairs.columns) == ["fold", "image_id1", "image_id2", "same"]
    assert pairs.fold.dtype.kind == "i" and pairs.same.dtype.kind == "i"
    ident = dict(zip(images.image_id, images.identity))
    assert set(pairs.image_id1) | set(pairs.image_id2) <= set(ident)
    assert (pairs.image_id1 != pairs.image_id2).all()
    keys = {frozenset(k) for k in zip(pairs.image_id1, pairs.image_id2)}
    assert len(keys) == len(pairs)  # no duplicate pair, in either order
    same = [ident[a] == ident[b] for a, b in zip(pairs.image_id1, pairs.image_id2)]
    assert same == pairs.same.astype(bool).tolist()
    per_fold = pairs.groupby("fold").same.agg(["size", "sum"])
    assert per_fold.index.tolist() == [1, 2, 3]
    assert (per_fold["size"] == 4).all() and (per_fold["sum"] == 2).all()
    fold_ids = [set(pairs[pairs.fold == f].image_id1.map(ident)) | set(pairs[pairs.fold == f].image_id2.map(ident))
                for f in (1, 2, 3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not fold_ids[i] & fold_ids[j]  # folds are identity-disjoint


def test_fold_layout_default_and_single_identity_folds():
    from pipeline.datasets.synthetic import _sample_pairs

    def identities_per_fold(pairs):
        ids = pd.concat([pairs.image_id1, pairs.image_id2]).str.split("/").str[0]
        return pd.DataFrame({"fold": pd.concat([pairs.fold, pairs.fold]), "id": ids}).groupby("fold").id.nunique()

    names = [f"train_{i:04d}" for i in range(1, 81)]
    pairs = _sample_pairs(names, 4, 10, 60, np.random.default_rng(0), "synth_closed")
    assert len(pairs) == 600 and pairs.same.sum() == 300
    assert (identities_per_fold(pairs) == 8).all()  # 80 identities dealt to 10 folds
    # 4 identities, 3 folds: a fold with one identity borrows the others for its different pairs
    pairs = _sample_pairs(names[:4], 3, 3, 4, np.random.default_rng(0), "x")
    assert pairs.groupby("fold").same.agg(["size", "sum"]).values.tolist() == [[4, 2]] * 3
    same_ids = pairs[pairs.same == 1]
    assert (same_ids.image_id1.str[:10] == same_ids.image_id2.str[:10]).all()
    diff = pairs[pairs.same == 0]
    assert (diff.image_id1.str[:10] != diff.image_id2.str[:10]).all()


@pytest.mark.parametrize("bad, match", [
    (dict(test_images_per_identity=1), "test_images_per_identity"),
    (dict(closed_images_per_identity=1), "closed_images_per_identity"),
    (dict(folds=7), "folds=7"),
    (dict(pairs_per_fold=40), "pairs_per_fold=40"),
    (dict(pairs_per_fold=5), "even"),
    (dict(image_size=16), "image_size"),
    (dict(workers=0), "workers"),
])
def test_impossible_counts_raise_before_writing(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path, seed=0, **{**SMALL, **bad})
    assert not list(tmp_path.rglob("*.jpg"))


def test_bad_domain_and_seed_raise():
    with pytest.raises(ValueError, match="domain"):
        sample_identity(np.random.default_rng(0), "c")
    with pytest.raises(ValueError, match="seed"):
        generate_synthetic(Path("unused"), seed=-1, **SMALL)


def test_domain_b_has_darker_skin_and_harsher_colder_light():
    def stats(domain):
        rng = np.random.default_rng(11)
        skin = np.array([sample_identity(rng, domain).skin for _ in range(200)])
        var = [sample_variation(rng, domain) for _ in range(200)]
        ambient = np.mean([v.ambient for v in var])
        blue_over_red = np.mean([v.light_color[2] / v.light_color[0] for v in var])
        return skin.mean(0) @ [0.299, 0.587, 0.114], ambient, blue_over_red

    luma_a, amb_a, cold_a = stats("a")
    luma_b, amb_b, cold_b = stats("b")
    assert luma_a - luma_b > 0.15 and amb_a - amb_b > 0.1 and cold_b - cold_a > 0.1

    def face_brightness(domain):  # mean over a patch between the eyes and the mouth
        values = []
        for i in range(12):
            idn = sample_identity(np.random.default_rng([21, i]), domain)
            var = sample_variation(np.random.default_rng([22, i]), domain)
            lm = face_landmarks(idn, var, 96)
            x0, y0 = lm[[0, 3]].min(0).astype(int)
            x1, y1 = lm[[1, 4]].max(0).astype(int)
            values.append(render_face(idn, var, 96)[y0:y1, x0:x1].mean())
        return np.mean(values)

    assert face_brightness("a") - face_brightness("b") > 25


def test_real_mtcnn_finds_the_faces_and_their_landmarks():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    mtcnn = pytest.importorskip("mtcnn")
    images, truth = [], []
    for i in range(40):
        domain = "a" if i % 2 == 0 else "b"
        idn = sample_identity(np.random.default_rng([31, i]), domain)
        var = sample_variation(np.random.default_rng([32, i]), domain)
        images.append(render_face(idn, var, 160))
        truth.append(face_landmarks(idn, var, 160))
    results = mtcnn.MTCNN().detect_faces(images)
    errors = []  # per detected face: median landmark distance to the drawn one / inter-ocular distance
    for faces, gt in zip(results, truth):
        faces = [f for f in faces if f["confidence"] >= 0.9]
        if not faces:
            continue
        kp = max(faces, key=lambda f: f["confidence"])["keypoints"]
        assert kp["left_eye"][0] < kp["right_eye"][0]
        pts = np.array([kp[k] for k in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")])
        errors.append(np.median(np.linalg.norm(pts - gt, axis=1)) / np.linalg.norm(gt[1] - gt[0]))
    assert len(errors) >= 38  # >= 95 % found
    errors = np.array(errors)
    assert np.median(errors) < 0.12 and np.mean(errors < 0.25) >= 0.9  # on the drawn features
