"""Stage ``detect``: MTCNN face detection with 5 landmarks.

For every image of every configured set, run MTCNN (the ``mtcnn`` package's
networks and bundled weights; by default through :mod:`pipeline.mtcnn_torch`, a
batched PyTorch implementation shown by ``tests/test_mtcnn_torch.py`` to return the
package's boxes and landmarks) and keep one face: among faces at least
``min_confidence`` confident, the one that best combines size and nearness to the
image centre (:func:`choose_face`). Images that cannot be read or show no face are
dropped, with the reason, and counted per set.

Writes ``OUT/<set>.parquet`` (one row per input image, kept or not),
``OUT/rejects.csv``, and the before/after counts to ``counts_path`` (JSON).

Device, threads and batches (:func:`plan_detect`, printed as one line when the stage
starts): the torch backend runs on ``detect.device`` (``auto``: ``cuda`` when PyTorch sees
a GPU, else ``cpu``). ``threads`` is :func:`pipeline.cpu.thread_count` (``FACEPIPE_THREADS``
or the cores this process may run on); files are decoded on that many threads, a batch
ahead of the detector, and on the CPU the detector cuts each batch into that many parts
run side by side. A batch holds ``max(detect.batch_size, 4 * threads)`` images, so each
part gets at least 4 images whatever the machine (an even split and no idle core); with
the default ``batch_size: 32`` that changes nothing up to 8 threads (the committed
2-thread run keeps its batches, and its detections).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import cpu
from pipeline.config import ConfigError, DetectParams
from pipeline.images import BadImage, load_rgb
from pipeline.io import atomic_dir, write_csv, write_json, write_parquet

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
LANDMARK_COLUMNS = [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
IMAGES_PER_THREAD = 4  # smallest share of a batch per thread (see plan_detect)


def resolve_device(choice: str) -> str:
    """``detect.device`` -> the torch device to use: ``auto`` is ``cuda`` when PyTorch sees a
    CUDA GPU, else ``cpu``. ``cuda`` without one raises :class:`ConfigError` (one line, exit 2)."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("detect.device is 'cuda' but PyTorch sees no CUDA GPU (torch.cuda.is_available() "
                          "is False); set detect.device to auto or cpu")
    return choice


@dataclass(frozen=True)
class DetectPlan:
    """Where and how wide the detect stage runs (see the module docstring)."""

    device: str  # torch device of the torch backend; "tensorflow" for the package backend
    threads: int  # decode threads, and detector threads (parts of a batch on the CPU)
    batch_size: int  # images per detector call

    def describe(self) -> str:
        return f"detect: device {self.device}, {self.threads} threads, batch {self.batch_size} images"


def batch_size_for(params: DetectParams, threads: int) -> int:
    """Images per detector call: ``detect.batch_size``, raised to 4 per thread."""
    return max(params.batch_size, IMAGES_PER_THREAD * threads)


def plan_detect(params: DetectParams, threads: int | None = None) -> DetectPlan:
    """Device, thread count and batch size for this machine: ``threads`` defaults to
    :func:`pipeline.cpu.thread_count`; a batch is ``max(params.batch_size, 4 * threads)``
    images. Raises :class:`ConfigError` for ``device: cuda`` without a GPU."""
    threads = cpu.thread_count() if threads is None else int(threads)
    device = resolve_device(params.device) if params.backend == "torch" else "tensorflow"
    return DetectPlan(device=device, threads=threads, batch_size=batch_size_for(params, threads))


@dataclass
class Face:
    """One detected face in image pixel coordinates."""

    box: tuple[float, float, float, float]  # x, y, w, h
    confidence: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, mouth left, mouth right (x, y)


class Detector(Protocol):
    def detect(self, images: list[np.ndarray]) -> list[list[Face]]: ...


class PackageDetector:
    """The ``mtcnn`` package's own ``MTCNN.detect_faces`` (TensorFlow), batched."""

    def __init__(self, params: DetectParams) -> None:
        try:
            from mtcnn import MTCNN
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise RuntimeError("the mtcnn package is not installed: pip install mtcnn tensorflow-cpu") from err
        self._mtcnn = MTCNN()
        self._kwargs = dict(
            min_face_size=params.min_face_size,
            scale_factor=params.scale_factor,
            threshold_pnet=params.thresholds[0],
            threshold_rnet=params.thresholds[1],
            threshold_onet=params.thresholds[2],
        )

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        results = self._mtcnn.detect_faces(list(images), **self._kwargs)
        return [[_face_from_package(r) for r in per_image] for per_image in results]


def _face_from_package(result: dict) -> Face:
    points = result["keypoints"]
    landmarks = np.array([points[name] for name in LANDMARK_NAMES], dtype=np.float64)
    return Face(tuple(float(v) for v in result["box"]), float(result["confidence"]), landmarks)


class TorchDetector:
    """The same networks and weights in batched PyTorch (:mod:`pipeline.mtcnn_torch`), on
    ``device`` (default: ``params.device`` resolved) with ``threads`` threads (default:
    :func:`pipeline.cpu.thread_count`)."""

    def __init__(self, params: DetectParams, *, device: str | None = None, threads: int | None = None) -> None:
        from pipeline.mtcnn_torch import TorchMTCNN

        self.device = resolve_device(params.device) if device is None else device
        self._mtcnn = TorchMTCNN(
            min_face_size=params.min_face_size,
            scale_factor=params.scale_factor,
            thresholds=tuple(params.thresholds),
            device=self.device,
            num_threads=cpu.thread_count() if threads is None else threads,
        )

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        out = self._mtcnn.detect(list(images))
        return [
            [Face(tuple(float(v) for v in d.box), float(d.confidence), np.asarray(d.landmarks, dtype=np.float64)) for d in per]
            for per in out
        ]


def make_detector(params: DetectParams, plan: DetectPlan | None = None) -> Detector:
    if params.backend != "torch":
        return PackageDetector(params)
    if plan is None:
        return TorchDetector(params)
    return TorchDetector(params, device=plan.device, threads=plan.threads)


def choose_face(faces: Sequence[Face], image_shape: tuple[int, int], min_confidence: float) -> Face | None:
    """Pick the subject's face: confident, large and near the centre.

    Among faces with ``confidence >= min_confidence`` the one with the highest
    ``sqrt(w*h) - 2 * d`` wins, where ``d`` is the distance in pixels from the box
    centre to the image centre: a large face slightly off-centre beats a small one
    in the middle, while a large face near the border (a bystander) loses to the
    central subject. Returns ``None`` when no face is confident enough.
    """
    height, width = image_shape
    best, best_score = None, -np.inf
    for face in faces:
        if face.confidence < min_confidence:
            continue
        x, y, w, h = face.box
        d = float(np.hypot(x + w / 2 - width / 2, y + h / 2 - height / 2))
        score = float(np.sqrt(max(w, 0.0) * max(h, 0.0))) - 2.0 * d
        if score > best_score:
            best, best_score = face, score
    return best


def _load(path: str, params: DetectParams) -> tuple[np.ndarray | None, float, str]:
    try:
        image, scale = load_rgb(path, max_side=params.max_image_side, min_side=params.min_image_side)
        return image, scale, ""
    except BadImage as err:
        return None, 1.0, str(err)


def _batches(paths: list[str], params: DetectParams, workers: int,
             size: int) -> Iterator[list[tuple[int, np.ndarray | None, float, str]]]:
    """Decode images on ``workers`` threads, ``size`` at a time, a batch ahead of the detector."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        starts = list(range(0, len(paths), size))
        pending = None
        for start in starts + [None]:
            future = None
            if start is not None:
                future = pool.map(lambda p: _load(p, params), paths[start : start + size])
            if pending is not None:
                first, results = pending
                yield [(first + k, *r) for k, r in enumerate(results)]
            pending = (start, list(future)) if future is not None else None


def detect_set(images: pd.DataFrame, detector: Detector, params: DetectParams, *, desc: str = "detect",
               progress: bool = True, threads: int | None = None) -> pd.DataFrame:
    """Detect one face per image; one output row per input row, with ``status`` and ``reason``.

    Decodes on ``threads`` threads (default :func:`pipeline.cpu.thread_count`), in batches of
    :func:`batch_size_for` images.
    """
    threads = cpu.thread_count() if threads is None else int(threads)
    batch_size = batch_size_for(params, threads)
    paths = images["path"].tolist()
    n = len(paths)
    status = np.array(["ok"] * n, dtype=object)
    reason = np.array([""] * n, dtype=object)
    confidence = np.full(n, np.nan)
    boxes = np.full((n, 4), np.nan)
    marks = np.full((n, 10), np.nan)
    n_faces = np.zeros(n, dtype=np.int32)
    sizes = np.zeros((n, 2), dtype=np.int32)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for batch in _batches(paths, params, threads, batch_size):
        good = [(i, img, scale) for i, img, scale, why in batch if img is not None]
        for i, img, scale, why in batch:
            if img is None:
                status[i], reason[i] = "rejected", why
        if good:
            found = detector.detect([img for _, img, _ in good])
            for (i, img, scale), faces in zip(good, found):
                sizes[i] = (round(img.shape[1] / scale), round(img.shape[0] / scale))
                n_faces[i] = len(faces)
                face = choose_face(faces, img.shape[:2], params.min_confidence)
                if face is None:
                    status[i] = "rejected"
                    reason[i] = "no face found" if not faces else f"no face with confidence >= {params.min_confidence}"
                    continue
                confidence[i] = face.confidence
                boxes[i] = np.asarray(face.box) / scale
                marks[i] = (face.landmarks / scale).reshape(-1)
        bar.update(len(batch))
    bar.close()
    out = images[["image_id", "path", "identity"]].copy()
    out["status"], out["reason"], out["faces"] = status, reason, n_faces
    out["width"], out["height"] = sizes[:, 0], sizes[:, 1]
    out["confidence"] = confidence
    for k, column in enumerate(["box_x", "box_y", "box_w", "box_h"]):
        out[column] = boxes[:, k]
    for k, column in enumerate(LANDMARK_COLUMNS):
        out[column] = marks[:, k]
    return out


def landmarks_of(rows: pd.DataFrame) -> np.ndarray:
    """``[N, 5, 2]`` landmark array of detection rows."""
    return rows[LANDMARK_COLUMNS].to_numpy(dtype=np.float64).reshape(-1, 5, 2)


def run_detect(params: DetectParams, sets: dict[str, pd.DataFrame], out_dir: str | Path,
               counts_path: str | Path, *, progress: bool = True, plan: DetectPlan | None = None) -> dict[str, dict]:
    """Detect faces in every set; write per-set tables, the rejects list and the counts.

    Prints :meth:`DetectPlan.describe` first (device, threads, batch size). A ``plan`` of
    ``plan_detect(params)`` is made when none is given (:class:`ConfigError` before anything
    is written when ``device: cuda`` has no GPU).
    """
    plan = plan_detect(params) if plan is None else plan
    print(plan.describe(), flush=True)
    detector = make_detector(params, plan)
    counts: dict[str, dict] = {}
    rejects = []
    with atomic_dir(out_dir) as tmp:
        for name, images in sets.items():
            table = detect_set(images, detector, params, desc=f"detect {name}", progress=progress,
                               threads=plan.threads)
            write_parquet(Path(tmp) / f"{name}.parquet", table)
            dropped = table[table["status"] != "ok"]
            rejects.append(dropped.assign(set=name)[["set", "image_id", "path", "reason"]])
            counts[name] = {
                "images": int(len(table)),
                "faces": int((table["status"] == "ok").sum()),
                "dropped": int(len(dropped)),
                "reasons": {str(k): int(v) for k, v in dropped["reason"].value_counts().sort_index().items()},
            }
        write_csv(Path(tmp) / "rejects.csv", pd.concat(rejects, ignore_index=True))
    write_json(counts_path, counts)
    return counts
