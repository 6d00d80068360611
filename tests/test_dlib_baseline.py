"""dlib's pretrained ResNet baseline (:mod:`pipeline.baselines.dlib_resnet`).

Needs the optional ``dlib`` and ``face_recognition_models`` packages
(``pip install -r requirements-dlib.txt``): the tests that run the model skip without
them; the missing-package error tests always run. Tests on real faces use the LFW
sample and skip when it is absent.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from pipeline.baselines import dlib_resnet as dr
from tests.conftest import LFW_DEV, write_image

HAVE_DLIB = all(importlib.util.find_spec(name) is not None for name in ("dlib", "face_recognition_models"))
needs_dlib = pytest.mark.skipif(not HAVE_DLIB, reason="dlib / face_recognition_models not installed "
                                "(pip install -r requirements-dlib.txt)")
needs_lfw = pytest.mark.skipif(not (LFW_DEV / "images").is_dir(), reason=f"real LFW sample not found at {LFW_DEV}")

DLIB_THRESHOLD = 0.6  # dlib's documented same-person distance threshold
# Pairs from the sample's pairs.txt (fold 1): same person, then different people.
MATCHED = [("Abel_Pacheco", 1, 4), ("Akhmed_Zakayev", 1, 3), ("Amber_Tamblyn", 1, 2)]
MISMATCHED = [("Abdel_Madi_Shabneh", 1, "Dean_Barker", 1), ("Abdul_Rahman", 1, "Portia_de_Rossi", 1),
              ("Abel_Pacheco", 1, "Jong_Thae_Hwa", 2)]


def lfw_path(name: str, number: int) -> str:
    return str(LFW_DEV / "images" / name / f"{name}_{number:04d}.jpg")


@pytest.fixture(scope="module")
def embedder() -> dr.DlibFaceEmbedder:
    if not HAVE_DLIB:
        pytest.skip("dlib / face_recognition_models not installed (pip install -r requirements-dlib.txt)")
    return dr.DlibFaceEmbedder(workers=1)


# --------------------------------------------------------------- missing packages
def test_missing_dlib_names_package_and_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(dr.DlibNotInstalled, match=r"'dlib'.*pip install -r requirements-dlib\.txt"):
        dr.DlibFaceEmbedder()


def test_missing_model_package_names_package_and_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    with pytest.raises(dr.DlibNotInstalled, match=r"'face_recognition_models'.*pip install -r requirements-dlib\.txt"):
        dr.model_files()
    assert issubclass(dr.DlibNotInstalled, ImportError)


@needs_dlib
def test_model_files_are_the_installed_package_files():
    files = dr.model_files()
    assert files["shape_predictor"].name == "shape_predictor_5_face_landmarks.dat"
    assert files["resnet"].name == "dlib_face_recognition_resnet_model_v1.dat"
    assert files["resnet"].stat().st_size > 20_000_000  # the real 22 MB network, not a stub


# --------------------------------------------------------------------- face choice
def test_pick_face_prefers_large_central_face():
    # 250x250 image: a big central face beats a small central one and a big one at the border.
    boxes = [(110, 110, 30, 30), (75, 75, 100, 100), (0, 0, 110, 110)]
    assert dr.pick_face(boxes, (250, 250)) == 1
    assert dr.pick_face([], (250, 250)) is None


# ------------------------------------------------------------------- real LFW faces
@needs_dlib
@needs_lfw
def test_descriptors_are_128d_with_dlib_like_norms(embedder):
    paths = [lfw_path(n, i) for n, i, _ in MATCHED]
    emb, ok, reasons = embedder.embed_images(paths, progress=False)
    assert emb.shape == (3, 128) and emb.dtype == np.float32
    assert ok.all() and reasons == ["", "", ""]
    norms = np.linalg.norm(emb, axis=1)
    # dlib's descriptors are not normalised, but their norms stay in a narrow band (~1.3-1.7 on LFW).
    assert np.all((norms > 1.0) & (norms < 2.0)), norms


@needs_dlib
@needs_lfw
def test_same_person_closer_than_different_people(embedder):
    def dist(p1: str, p2: str) -> float:
        (a, ra), (b, rb) = embedder.embed_path(p1), embedder.embed_path(p2)
        assert ra == rb == ""
        return float(np.linalg.norm(a - b))

    same = [dist(lfw_path(n, i), lfw_path(n, j)) for n, i, j in MATCHED]
    diff = [dist(lfw_path(n1, i), lfw_path(n2, j)) for n1, i, n2, j in MISMATCHED]
    assert max(same) < DLIB_THRESHOLD < min(diff), (same, diff)


@needs_dlib
@needs_lfw
def test_pool_gives_the_same_results_as_one_process(embedder):
    paths = [lfw_path(n, k) for n, i, j in MATCHED for k in (i, j)]
    paths += [lfw_path("Dean_Barker", 1), lfw_path("Abdul_Rahman", 1)]
    assert len(paths) >= dr.MIN_IMAGES_FOR_POOL
    pooled = dr.DlibFaceEmbedder(workers=2).embed_images(paths, progress=False)
    single = embedder.embed_images(paths, progress=False)
    np.testing.assert_array_equal(pooled[0], single[0])
    np.testing.assert_array_equal(pooled[1], single[1])
    assert pooled[2] == single[2]


# ------------------------------------------------------------- fallback and failures
@needs_dlib
@needs_lfw
def test_mtcnn_box_fallback_rescues_a_small_face(embedder, tmp_path):
    from PIL import Image

    from pipeline.mtcnn_torch import TorchMTCNN

    original = np.asarray(Image.open(lfw_path("Abel_Pacheco", 1)).convert("RGB"))
    small = np.asarray(Image.fromarray(original).resize((110, 110), Image.BILINEAR))  # face ~45 px wide
    canvas = np.full((400, 400, 3), 128, dtype=np.uint8)
    canvas[150:260, 140:250] = small
    path = write_image(tmp_path / "small_face.png", canvas)
    # Without upsampling, HOG's smallest face is ~80 px: it misses this one.
    assert embedder.detect(canvas, upsample=0) == []
    dets = TorchMTCNN(num_threads=1).detect([canvas])[0]
    assert dets, "MTCNN should find the small face"
    box = np.asarray([dets[0].box], dtype=np.float64)

    emb, ok, reasons = embedder.embed_images([str(path)], boxes=box, upsample=0, progress=False)
    assert ok[0] and reasons[0] == dr.REASON_FALLBACK == "hog: no face; used MTCNN box"
    # The rescued descriptor is the same person's: close to the full-size image's descriptor.
    full, _ = embedder.embed_image(original)
    assert np.linalg.norm(emb[0] - full) < DLIB_THRESHOLD
    # Without the box (or with a NaN box) the image is a failure, with the reason.
    emb2, ok2, reasons2 = embedder.embed_images([str(path)] * 2, boxes=np.stack([box[0], np.full(4, np.nan)]),
                                                upsample=0, progress=False)
    assert ok2.tolist() == [True, False] and reasons2[1] == "hog: no face; no MTCNN box"
    assert np.isnan(emb2[1]).all()


@needs_dlib
def test_non_face_and_unreadable_images_fail_with_reasons(embedder, tmp_path):
    rng = np.random.default_rng(0)
    noise = write_image(tmp_path / "noise.png", rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    flat = write_image(tmp_path / "flat.png", np.full((200, 200, 3), 90, dtype=np.uint8))
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    emb, ok, reasons = embedder.embed_images([str(noise), str(flat), str(junk)], progress=False)
    assert not ok.any() and np.isnan(emb).all()
    assert reasons[:2] == ["hog: no face", "hog: no face"]
    assert reasons[2].startswith("unreadable image: ")


@needs_dlib
def test_bad_arguments_raise_clear_errors(embedder):
    with pytest.raises(ValueError, match=r"boxes has shape \(1, 3\)"):
        embedder.embed_images(["a.jpg"], boxes=np.zeros((1, 3)), progress=False)
    with pytest.raises(ValueError, match=r"boxes\[0\].*positive w, h"):
        embedder.embed_images(["a.jpg"], boxes=np.array([[0.0, 0.0, -5.0, 10.0]]), progress=False)
    with pytest.raises(ValueError, match="upsample=-1"):
        embedder.embed_images(["a.jpg"], upsample=-1, progress=False)
    with pytest.raises(ValueError, match="workers=0"):
        dr.DlibFaceEmbedder(workers=0)
    with pytest.raises(ValueError, match="expected an HxWx3 uint8 RGB array"):
        embedder.embed_image(np.zeros((10, 10), dtype=np.uint8))


def test_save_embeddings_keeps_only_ok_rows(tmp_path):
    from pipeline.score import read_embeddings

    emb = np.arange(3 * 128, dtype=np.float32).reshape(3, 128)
    emb[1] = np.nan
    n = dr.save_embeddings(tmp_path / "lfw.npz", ["a/1", "b/1", "c/1"], ["a", "b", "c"], emb,
                           np.array([True, False, True]))
    back = read_embeddings(tmp_path / "lfw.npz")
    assert n == 2 and back["image_ids"].tolist() == ["a/1", "c/1"] and back["identities"].tolist() == ["a", "c"]
    np.testing.assert_array_equal(back["embeddings"], emb[[0, 2]])
    with pytest.raises(ValueError, match="same 3 images"):
        dr.save_embeddings(tmp_path / "x.npz", ["a", "b", "c"], ["a", "b"], emb, np.ones(3, bool))
