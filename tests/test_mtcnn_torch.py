"""TorchMTCNN reproduces the ``mtcnn`` package (TensorFlow) detector.

Layers of evidence, cheapest first: the weights load without TensorFlow; each network
matches its Keras twin on random inputs; each pre/post-processing step (pyramid, area
resize, crop-and-resize, the package's NMS) matches the package's own function; and the
whole detector returns the package's boxes and landmarks on real LFW faces.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.mtcnn_torch import (
    Detection,
    TorchMTCNN,
    load_package_weights,
    package_nms,
    pyramid_scales,
    to_package_format,
)

LFW = Path("/work/shared/data/lfw-dev/images")
if importlib.util.find_spec("mtcnn") is None:
    pytest.skip("the mtcnn package (weights and reference) is not installed", allow_module_level=True)
KEYPOINTS = {"left_eye", "right_eye", "nose", "mouth_left", "mouth_right"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def detector() -> TorchMTCNN:
    return TorchMTCNN()


@pytest.fixture(scope="module")
def package():
    """The package's detector (imports TensorFlow, ~10 s)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    mtcnn = pytest.importorskip("mtcnn")
    return mtcnn.MTCNN()


@pytest.fixture(scope="module")
def lfw_images() -> list[np.ndarray]:
    """First image of each of the first 30 sorted LFW identities, HxWx3 uint8 RGB."""
    if not LFW.is_dir():
        pytest.skip(f"{LFW} not present (real LFW faces needed)")
    import cv2

    out = []
    for person in sorted(p for p in LFW.iterdir() if p.is_dir())[:30]:
        first = sorted(person.glob("*.jpg"))[0]
        out.append(cv2.cvtColor(cv2.imread(str(first)), cv2.COLOR_BGR2RGB))
    return out


def _iou(a, b) -> float:
    """IoU of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# -------------------------------------------------------------------- weights / nets
def test_detector_never_imports_tensorflow():
    code = ("import sys, numpy as np; from pipeline.mtcnn_torch import TorchMTCNN; "
            "TorchMTCNN().detect([np.zeros((60, 60, 3), np.uint8)]); "
            "assert 'tensorflow' not in sys.modules and 'mtcnn' not in sys.modules, 'TF imported'")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_missing_package_gives_install_hint(monkeypatch):
    import importlib.util

    from pipeline import mtcnn_torch

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install mtcnn"):
        mtcnn_torch.load_package_weights()


def test_weights_load_in_keras_layout():
    w = load_package_weights()
    assert set(w) == {"pnet", "rnet", "onet"}
    assert [a.shape for a in w["pnet"][:3]] == [(3, 3, 3, 10), (10,), (1, 1, 10)]
    assert w["rnet"][9].shape == (576, 128) and w["onet"][12].shape == (1152, 256)
    assert all(a.dtype == np.float32 for v in w.values() for a in v)


def test_networks_match_keras_models(package, detector):
    rng = np.random.default_rng(0)
    pnet, rnet, onet = (stage.model for stage in package.stages)
    with torch.inference_mode():
        # odd sizes exercise the "same" max-pool padding
        x = rng.uniform(-1, 1, (2, 37, 53, 3)).astype(np.float32)
        ref = [t.numpy() for t in pnet(x)]
        got = detector.pnet(torch.from_numpy(x).permute(0, 3, 1, 2))
        for r, g in zip(ref, got):
            assert g.shape == r.shape
            np.testing.assert_allclose(g.numpy(), r, atol=1e-4)

        x = rng.uniform(-1, 1, (7, 24, 24, 3)).astype(np.float32)
        ref = [t.numpy() for t in rnet(x)]
        got = detector.rnet(torch.from_numpy(x).permute(0, 3, 1, 2))
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g.numpy(), r, atol=1e-4)

        x = rng.uniform(-1, 1, (7, 48, 48, 3)).astype(np.float32)
        ref = [t.numpy() for t in onet(x)]  # bbox reg, landmarks, class probabilities
        got = detector.onet(torch.from_numpy(x).permute(0, 3, 1, 2))
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g.numpy(), r, atol=1e-4)


# ------------------------------------------------------------------- building blocks
def test_pyramid_and_area_resize_match_package(package, detector):
    from mtcnn.utils.images import build_scale_pyramid, scale_images

    rng = np.random.default_rng(1)
    for h, w in [(250, 250), (97, 301), (12, 40), (11, 11)]:
        ref = build_scale_pyramid(w, h, min_face_size=20, scale_factor=0.709)
        np.testing.assert_array_equal(pyramid_scales(h, w, 20, 0.709), ref)
    img = rng.uniform(-1, 1, (1, 97, 131, 3))
    xt = torch.from_numpy(img.astype(np.float32)).permute(2, 1, 0, 3).contiguous()
    for s in pyramid_scales(97, 131, 20, 0.709):
        ref = scale_images(img, s).numpy()  # tf.image.resize AREA, size truncated to int
        got = detector._resize_area(xt, int(97 * s), int(131 * s)).permute(0, 2, 3, 1).numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_crops_match_tf_crop_and_resize(package, detector):
    from mtcnn.utils.images import extract_patches

    rng = np.random.default_rng(2)
    img = rng.uniform(-1, 1, (2, 60, 80, 3))
    # boxes inside, straddling every border, and wholly outside the image
    boxes = np.array([[0, 10.3, 5.7, 40.2, 35.6], [1, -8.0, -4.5, 30.0, 33.5], [1, 60.5, 40.0, 95.0, 74.5],
                      [0, -30.0, -30.0, -5.0, -5.0], [1, 0.0, 0.0, 79.0, 59.0]])
    buf = torch.zeros(img.size + 81 * 3)
    x = buf[: img.size].view(2, 60, 80, 3)
    x.copy_(torch.from_numpy(img))
    for size in (24, 48):
        ref = extract_patches(img, boxes, expected_size=(size, size)).numpy()
        got = detector._crops(x, torch.from_numpy(boxes[:, 1:]), torch.from_numpy(boxes[:, 0]).long(), size)
        np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)


def test_nms_reproduces_package_rule(package):
    from mtcnn.utils.bboxes import smart_nms_from_bboxes

    # A suppresses B, B suppresses C, A and C do not overlap: the package drops C as well
    # (suppressed boxes still suppress), unlike greedy NMS.
    chain = torch.tensor([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], dtype=torch.float64)
    keep = package_nms(chain, torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64), torch.zeros(3, dtype=torch.long), 0.3)
    assert keep.tolist() == [0]

    rng = np.random.default_rng(3)
    n = 300
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    rows = np.concatenate([rng.integers(0, 4, (n, 1)), xy, xy + wh, rng.uniform(0.5, 1, (n, 1))], axis=1)
    single = rows.copy()
    single[:, 0] = 0
    single[:, 5] = np.round(single[:, 5], 1)  # many tied scores: their order must match too
    for r in (rows, single):
        for method, thr in (("union", 0.5), ("min", 0.7)):
            ref = smart_nms_from_bboxes(r, threshold=thr, method=method, initial_sort=True)
            t = torch.from_numpy(r)
            keep = package_nms(t[:, 1:5], t[:, 5], t[:, 0].long(), thr, method)
            np.testing.assert_array_equal(r[keep.numpy()], ref)


# --------------------------------------------------------------------------- end to end
def test_same_boxes_and_landmarks_as_package_on_real_faces(package, detector, lfw_images):
    ours = detector.detect(lfw_images)
    ious, exact = [], 0
    for k, (img, dets) in enumerate(zip(lfw_images, ours)):
        ref = package.detect_faces(img)  # single-image call
        got = [to_package_format(d) for d in dets]
        assert len(got) == len(ref), f"image {k}: {len(got)} faces vs package {len(ref)}"
        assert all(set(g) == set(r) and set(g["keypoints"]) == set(r["keypoints"]) == KEYPOINTS
                   for g, r in zip(got, ref))
        for g, r, d in zip(got, ref, dets):  # both sorted by descending confidence
            ious.append(_iou(g["box"], r["box"]))
            assert abs(g["confidence"] - float(r["confidence"])) <= 1e-3, f"image {k}"
            ref_lm = np.array([r["keypoints"][n] for n in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")])
            assert np.abs(d.landmarks - ref_lm).max() <= 1.0, f"image {k}: landmarks {d.landmarks} vs {ref_lm}"
        exact += got == [{**r, "confidence": g["confidence"]} for g, r in zip(got, ref)]
    assert sum(len(d) for d in ours) >= 30, "LFW images should each show at least one face"
    assert min(ious) >= 0.9 and statistics.median(ious) >= 0.99, ious
    assert exact >= 0.9 * len(lfw_images), f"only {exact}/{len(lfw_images)} images identical after rounding"


def test_mixed_size_batch_equals_one_by_one(detector, lfw_images):
    import cv2

    imgs = [
        lfw_images[0],
        cv2.resize(lfw_images[1], (320, 300)),
        lfw_images[2][20:230, 215:35:-1],  # mirrored, non-contiguous view
        lfw_images[3],
        np.full((10, 10, 3), 128, np.uint8),
        cv2.resize(lfw_images[4], (160, 400)),
    ]
    batch = detector.detect(imgs)  # split across worker threads when there are several cores
    assert sum(len(d) for d in batch) >= 4
    serial = TorchMTCNN(num_threads=1)
    for k, img in enumerate(imgs):
        alone = serial.detect([img])[0]
        assert len(alone) == len(batch[k]), f"image {k}"
        for a, b in zip(alone, batch[k]):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
            assert abs(a.confidence - b.confidence) < 1e-5


def test_no_face_or_tiny_image_gives_empty_list(detector):
    rng = np.random.default_rng(4)
    imgs = [
        np.full((120, 100, 3), 128, np.uint8),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        np.zeros((10, 10, 3), np.uint8),
        np.zeros((5, 300, 3), np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((0, 40, 3), np.uint8),
    ]
    assert detector.detect(imgs) == [[] for _ in imgs]
    assert detector.detect([imgs[2]]) == [[]]
    assert detector.detect([]) == []


def test_to_package_format_rounds_like_package():
    det = Detection(box=(10.4, 20.6, 30.5, 41.5), confidence=0.95,
                    landmarks=np.array([[1.2, 2.5], [3.5, 4.4], [5.0, 6.6], [7.49, 8.51], [9.0, 10.0]]))
    out = to_package_format(det)
    assert out["box"] == [10, 21, 30, 42]  # numpy rounds half to even, as the package does
    assert out["keypoints"] == {"nose": [5, 7], "mouth_right": [9, 10], "right_eye": [4, 4],
                                "left_eye": [1, 2], "mouth_left": [7, 9]}
    assert out["confidence"] == pytest.approx(0.95)


def test_bad_inputs_raise_clear_errors(detector):
    with pytest.raises(TypeError, match="images"):
        detector.detect(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(TypeError, match=r"images\[1\]"):
        detector.detect([np.zeros((20, 20, 3), np.uint8), "face.jpg"])
    with pytest.raises(ValueError, match=r"images\[0\] has shape \(20, 20\)"):
        detector.detect([np.zeros((20, 20), np.uint8)])
    with pytest.raises(ValueError, match="float32"):
        detector.detect([np.zeros((20, 20, 3), np.float32)])
    with pytest.raises(ValueError, match="scale_factor"):
        TorchMTCNN(scale_factor=1.5)
    with pytest.raises(ValueError, match="thresholds"):
        TorchMTCNN(thresholds=(0.6, 0.7))
    with pytest.raises(ValueError, match="min_face_size"):
        TorchMTCNN(min_face_size=0)
