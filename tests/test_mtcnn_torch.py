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
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

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
    # Triton (imported by torch._dynamo and torchvision) crashes the process (segfault) when
    # it loads after TensorFlow, e.g. in test_config's load_params run after these tests:
    # load it first.
    import torch._dynamo  # noqa: F401

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
            names = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
            ref_lm = np.array([r["keypoints"][n] for n in names])
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


# ------------------------------------------------- images without a candidate in a batch
# Patterns of a batch: "F" takes the next face photo, "B" the next image without a face.
# The blanks are flat (black, mid-gray, one colour, white), too small for any pyramid
# level, or a checkerboard whose PNet proposals all die in RNet, so an image drops out
# before RNet or before ONet. Blanks sit first, in the middle, last, in runs, or alone.
NO_FACE_PATTERNS = ["BFFF", "FBF", "FFB", "FBBBF", "BFBFB", "FFBB", "BBBB", "B"]


@pytest.fixture(scope="module")
def face_and_blank_pool(lfw_images):
    """Face photos of three sizes and no-face images of five sizes, with the package's
    single-image detections of each (the reference)."""
    import cv2

    faces = [lfw_images[0], lfw_images[1], cv2.resize(lfw_images[2], (200, 300)),
             lfw_images[3], cv2.resize(lfw_images[4], (320, 280))]
    yy, xx = np.mgrid[0:250, 0:250]
    blanks = [
        np.zeros((250, 250, 3), np.uint8),                                   # black, LFW size
        ((((yy // 10) + (xx // 10)) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2),  # checker
        np.full((250, 250, 3), 128, np.uint8),                               # uniform gray
        np.tile(np.array([200, 30, 30], np.uint8), (180, 220, 1)),           # flat colour
        np.full((10, 10, 3), 90, np.uint8),                                  # below PNet's 12 px
        np.full((300, 200, 3), 255, np.uint8),                               # white, tall
    ]
    return faces, blanks


@pytest.fixture(scope="module")
def pool_reference(package, face_and_blank_pool):
    faces, blanks = face_and_blank_pool
    ref = {("F", k): package.detect_faces(img) for k, img in enumerate(faces)}
    ref.update({("B", k): package.detect_faces(img) for k, img in enumerate(blanks)})
    return ref


def _assert_matches_package(dets: list[Detection], ref: list[dict], where: str) -> None:
    assert len(dets) == len(ref), f"{where}: {len(dets)} faces vs package {len(ref)}"
    for d, r in zip(dets, ref):  # both by descending confidence
        got = to_package_format(d)
        assert np.abs(np.subtract(got["box"], r["box"])).max() <= 1, f"{where}: box {got['box']} vs {r['box']}"
        assert abs(d.confidence - float(r["confidence"])) <= 1e-3, where
        ref_lm = np.array([r["keypoints"][n] for n in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")])
        assert np.abs(d.landmarks - ref_lm).max() <= 1.0, f"{where}: landmarks {d.landmarks} vs {ref_lm}"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pattern", NO_FACE_PATTERNS)
def test_images_without_candidates_anywhere_in_a_batch(pattern, threads, face_and_blank_pool, pool_reference):
    """Regression: an image with no box left at a stage used to break the image -> pixels
    mapping of the crop stages (IndexError) when it was the last of its worker's part."""
    faces, blanks = face_and_blank_pool
    pools = {"F": faces, "B": blanks}
    count = {"F": 0, "B": 0}
    keys = []
    for c in pattern:
        keys.append((c, count[c] % len(pools[c])))
        count[c] += 1
    batches = [keys]
    if "F" not in pattern:  # all blank: start the cycle at every blank in turn
        batches = [[("B", (k + shift) % len(blanks)) for _, k in keys] for shift in range(len(blanks))]
    detector = _threaded_detector(threads)
    for keys in batches:
        images = [pools[c][k] for c, k in keys]
        found = detector.detect(images)
        assert len(found) == len(images)
        for slot, (key, dets) in enumerate(zip(keys, found)):
            where = f"{pattern} slot {slot} ({key}), {threads} threads"
            _assert_matches_package(dets, pool_reference[key], where)
            assert (len(dets) >= 1) if key[0] == "F" else (dets == []), where


def test_mixed_sizes_with_blanks_between_faces(face_and_blank_pool, pool_reference):
    """Every face and blank of the pool in one batch of seven image sizes, blanks between
    the faces, in both orders, for 1-4 worker parts."""
    faces, blanks = face_and_blank_pool
    keys = [("F", 0), ("B", 0), ("B", 3), ("F", 2), ("B", 1), ("F", 4), ("B", 4), ("F", 1), ("B", 5),
            ("F", 3), ("B", 2)]
    for threads in (1, 2, 3, 4):
        for order in (keys, keys[::-1]):
            images = [(faces if c == "F" else blanks)[k] for c, k in order]
            found = _threaded_detector(threads).detect(images)
            for slot, (key, dets) in enumerate(zip(order, found)):
                where = f"slot {slot} ({key}), {threads} threads"
                _assert_matches_package(dets, pool_reference[key], where)
                assert (len(dets) >= 1) if key[0] == "F" else (dets == []), where


_DETECTORS: dict[int, TorchMTCNN] = {}


def _threaded_detector(threads: int) -> TorchMTCNN:
    """One detector per worker count (a batch is cut into ``threads`` parts at most)."""
    if threads not in _DETECTORS:
        _DETECTORS[threads] = TorchMTCNN(num_threads=threads)
    return _DETECTORS[threads]


def test_nms_blocking_and_min_score_leave_the_result_unchanged():
    """Groups of very different sizes, overlaps computed in blocks of any size, and the
    stages' score threshold applied inside the NMS give the same indices as without."""
    rng = np.random.default_rng(5)
    n = 400
    groups = np.concatenate([np.zeros(250), rng.integers(1, 40, n - 250)]).astype(np.int64)
    xy = rng.uniform(0, 60, (n, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], axis=1))
    scores = torch.from_numpy(np.round(rng.uniform(0.5, 1, n), 2))  # ties
    g = torch.from_numpy(groups)
    for method, thr in (("union", 0.5), ("min", 0.7)):
        ref = package_nms(boxes, scores, g, thr, method)
        for max_elems in (1, 37, 4096, 1 << 20):
            assert torch.equal(package_nms(boxes, scores, g, thr, method, max_elems), ref), max_elems
        sel = torch.nonzero(scores > 0.8).squeeze(1)
        expected = sel[package_nms(boxes[sel], scores[sel], g[sel], thr, method)]
        assert torch.equal(package_nms(boxes, scores, g, thr, method, 64, min_score=0.8), expected)
    assert package_nms(boxes, scores, g, 0.5, min_score=1.0).numel() == 0


# ------------------------------------------------------------------ device and host syncs
class _HostArrays(TorchFunctionMode):
    """Host arrays (``torch.from_numpy``) that a computation uses before they are moved to the
    device (``.to``, ``pin_memory``): ``unmoved`` counts ``(function, caller)``.

    On a GPU such a tensor stays on the CPU (a stray, or a device-mismatch error); on the CPU
    ``.to("cpu")`` returns the very same tensor, so nothing is ever off the device, yet the path
    of each host array can be followed: this is the device check that can fail on the CPU.
    Entered before (outside) :class:`TorchAudit`, it sees each call after the audit did.
    (``from_numpy`` bypasses torch-function modes, so it is wrapped while the mode is on.)"""

    _MOVES = {"to", "pin_memory", "cuda"}
    _METADATA = {"__get__", "dim", "size", "numel", "stride", "is_contiguous", "element_size"}

    def __init__(self) -> None:
        super().__init__()
        self.unmoved: Counter[tuple[str, str]] = Counter()
        self._host: dict[int, weakref.ref] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self._host and name not in self._MOVES | self._METADATA:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and (ref := self._host.get(id(t))) is not None and ref() is t:
                    self.unmoved[(name, _code_caller())] += 1
        out = func(*args, **kwargs)
        if name in self._MOVES and args and isinstance(args[0], torch.Tensor):
            self._host.pop(id(args[0]), None)  # moved (on the CPU, `out` is this same tensor)
        return out

    def __enter__(self):
        real = self._real_from_numpy = torch.from_numpy

        def from_numpy(array):
            out = real(array)
            self._host[id(out)] = weakref.ref(out)
            return out

        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._real_from_numpy
        return super().__exit__(*exc)


def _code_caller() -> str:
    """``file:line`` of the first frame outside torch, pipeline/torch_audit.py and this mode."""
    import pipeline.torch_audit

    skip = {os.path.abspath(pipeline.torch_audit.__file__), os.path.abspath(__file__)}
    frame = sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(os.path.dirname(torch.__file__)) and name not in skip:
            return f"{os.path.relpath(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def test_a_host_array_the_detector_forgets_to_move_is_found_on_the_cpu(monkeypatch):
    """The host-array check fails where it should, on the CPU: with an upload that forgets the
    device, the very computation that would break on a GPU is named."""
    from pipeline import mtcnn_torch
    from tests.conftest import synthetic_face

    detector = TorchMTCNN(device="cpu", num_threads=1)
    monkeypatch.setattr(mtcnn_torch, "_upload", lambda array, device: torch.from_numpy(array))
    with _HostArrays() as flow:
        detector.detect([synthetic_face(0)])
    assert flow.unmoved and all(caller.startswith("pipeline/mtcnn_torch.py:") for _, caller in flow.unmoved)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_tensors_stay_on_the_chosen_device_and_host_syncs_are_few(device):
    """No tensor is made without ``device=``, every host array is moved to the device before a
    computation uses it (:class:`_HostArrays`), every operator's output is on the detector's
    device (copies to the host excepted), and the calls that would make the host wait for a
    GPU are a fixed few per ``detect`` call, not a few per image or pyramid level.

    The output-device check and the comparison with the CPU detector can only fail on a GPU
    (on the CPU everything is on the CPU, and the comparison would be the detector with
    itself), so they run there only; the first two checks are what would put a tensor on the
    wrong device, and they fail on the CPU too."""
    from pipeline.torch_audit import TorchAudit
    from tests.conftest import synthetic_face

    faces = [synthetic_face(seed) for seed in range(4)]  # 160 x 160
    blank = np.zeros((160, 160, 3), np.uint8)
    checker = np.kron((np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8), np.ones((10, 10), np.uint8))
    checker = np.repeat(checker[..., None], 3, axis=2)  # PNet proposals, none survives RNet
    big = np.kron(faces[3], np.ones((3, 3, 1), np.uint8))  # 480 x 480: three more pyramid levels
    detector = TorchMTCNN(device=device, num_threads=1)  # one thread: the watches see the calling thread only
    reference = TorchMTCNN(device="cpu", num_threads=1) if device != "cpu" else None
    tiny = np.zeros((10, 10, 3), np.uint8)
    batches = {  # name: (images, which are faces, most host syncs allowed)
        "one face": ([faces[0]], [True], 10),
        "same size": ([faces[0], blank, faces[1], checker, faces[2]], [True, False, True, False, True], 10),
        "one big face": ([big], [True], 10),
        "mixed sizes": ([faces[0], blank, big, faces[1], tiny, checker[:150]],
                        [True, False, True, True, False, False], 12),
    }
    for name, (images, is_face, most) in batches.items():
        with _HostArrays() as flow, TorchAudit(device) as audit:
            found = detector.detect(images)
        assert audit.calls > 100, name  # the audit saw the work
        assert not audit.undeviced, f"{name}: tensors made without device=: {dict(audit.undeviced)}"
        assert not flow.unmoved, f"{name}: host arrays used before moving them to {device}: {dict(flow.unmoved)}"
        assert audit.syncs <= most, f"{name}: {audit.syncs} host syncs: {dict(audit.sites)}"
        assert [len(d) > 0 for d in found] == is_face, name
        if device == "cpu":
            continue
        assert not audit.strays, f"{name}: tensors off {device}: {dict(audit.strays)}"
        for got, ref in zip(found, reference.detect(images)):
            assert len(got) == len(ref), name
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a.box, b.box, atol=1e-2)
                np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-2)
