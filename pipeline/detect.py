"""Stage ``detect_train`` / ``detect@SET``: MTCNN face detection with 5 landmarks, one data set per stage.

For every image of the set, run MTCNN (the ``mtcnn`` package's
networks and bundled weights; by default through :mod:`pipeline.mtcnn_torch`, a
batched PyTorch implementation shown by ``tests/test_mtcnn_torch.py`` to return the
package's boxes and landmarks) and keep one face: among faces at least
``min_confidence`` confident, the one that best combines size and nearness to the
image centre (:func:`choose_face`). Images that cannot be read or show no face are
dropped, with the reason, and counted.

Writes ``data/detect/SET/detections.parquet`` (one row per input image, kept or not),
``data/detect/SET/rejects.csv``, and the before/after counts to ``reports/detection/SET.json``.
The params are ``detect`` with the set's own overrides (``data.tests.SET.detect``).

Pre-cropped sets (``precropped: true`` in the set's dataset entry) are not detected: every
readable image is kept whole, with status ``precropped`` (not counted as dropped), a box
that is the whole image and no landmarks; the counts of such a set add ``"precropped":
true`` and ``"source_sizes"`` (``{"WxH": images}``).

Resumable (:mod:`pipeline.chunks`): each set is processed in chunks of ``detect.chunk_size``
images, rounded up to whole batches so that every batch holds the same images as in one
pass over the set (the detections do not depend on the chunk size). Each finished chunk is
written to ``data/detect/.partial/SET/``; a rerun after a crash reuses the chunks whose
inputs, params, code and thread plan match, and computes the rest. After the output is
written, the set's staging folder keeps this run's chunks only.

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

from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import cpu
from pipeline.chunks import ChunkStore, chunk_ranges, digest, file_digests, library_versions, source_digest, staging_dir
from pipeline.config import ConfigError, DetectParams
from pipeline.images import BadImage, load_rgb
from pipeline.io import atomic_dir, atomic_file, write_csv, write_json, write_parquet

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
LANDMARK_COLUMNS = [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
IMAGES_PER_THREAD = 4  # smallest share of a batch per thread (see plan_detect)
PRECROPPED = "precropped"  # status of an image of a pre-cropped set (kept, not detected)
KEPT = ("ok", PRECROPPED)  # statuses of the images that go on to alignment
DETECTIONS_FILE = "detections.parquet"  # in data/detect/SET/
REJECTS_FILE = "rejects.csv"


def kept(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of a detection table whose image goes on: a detected face or a pre-cropped image."""
    return rows[rows["status"].isin(KEPT)]


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
    status, reason, n_faces, sizes, confidence, boxes, marks = _empty_columns(n)
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
    return _table(images, status, reason, n_faces, sizes, confidence, boxes, marks)


def _empty_columns(n: int):
    return (np.array(["ok"] * n, dtype=object), np.array([""] * n, dtype=object), np.zeros(n, dtype=np.int32),
            np.zeros((n, 2), dtype=np.int32), np.full(n, np.nan), np.full((n, 4), np.nan), np.full((n, 10), np.nan))


def _table(images, status, reason, n_faces, sizes, confidence, boxes, marks) -> pd.DataFrame:
    out = images[["image_id", "path", "identity"]].copy()
    out["status"], out["reason"], out["faces"] = status, reason, n_faces
    out["width"], out["height"] = sizes[:, 0], sizes[:, 1]
    out["confidence"] = confidence
    for k, column in enumerate(["box_x", "box_y", "box_w", "box_h"]):
        out[column] = boxes[:, k]
    for k, column in enumerate(LANDMARK_COLUMNS):
        out[column] = marks[:, k]
    return out


def precropped_set(images: pd.DataFrame, params: DetectParams, *, threads: int | None = None) -> pd.DataFrame:
    """Rows of a pre-cropped set, without MTCNN: every readable image is kept whole.

    Same columns as :func:`detect_set`: status ``precropped`` (or ``rejected`` with the reason
    for a file that cannot be read), ``faces`` 0, the file's width and height, the box the
    whole image, confidence and landmarks NaN. Files are decoded on ``threads`` threads (an
    unreadable crop is found here, and counted, like an unreadable photo).
    """
    threads = cpu.thread_count() if threads is None else int(threads)
    paths = images["path"].tolist()
    n = len(paths)
    status, reason, n_faces, sizes, confidence, boxes, marks = _empty_columns(n)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        loaded = pool.map(lambda p: _load(p, params), paths)
        for i, (img, scale, why) in enumerate(loaded):
            if img is None:
                status[i], reason[i] = "rejected", why
                continue
            width, height = round(img.shape[1] / scale), round(img.shape[0] / scale)
            status[i] = PRECROPPED
            sizes[i] = (width, height)
            boxes[i] = (0.0, 0.0, float(width), float(height))
    return _table(images, status, reason, n_faces, sizes, confidence, boxes, marks)


def landmarks_of(rows: pd.DataFrame) -> np.ndarray:
    """``[N, 5, 2]`` landmark array of detection rows."""
    return rows[LANDMARK_COLUMNS].to_numpy(dtype=np.float64).reshape(-1, 5, 2)


def chunk_images(params: DetectParams, plan: DetectPlan) -> int:
    """Images per chunk: ``detect.chunk_size`` rounded up to whole batches of ``plan.batch_size``."""
    return -(-params.chunk_size // plan.batch_size) * plan.batch_size


def stage_key(params: DetectParams, plan: DetectPlan) -> str:
    """What every chunk's result depends on besides its images: params, device, threads and batch
    (the CPU detector cuts each batch into one part per thread), code and library versions."""
    libraries = ["torch", "numpy", "PIL", "cv2", "pandas"] + (["mtcnn", "tensorflow"] if params.backend == "package"
                                                               else [])
    return digest({
        "stage": "detect",
        "params": params.model_dump(exclude={"chunk_size"}),
        "plan": [plan.device, plan.threads, plan.batch_size],
        "code": source_digest("detect", "mtcnn_torch", "images", "chunks"),
        "libraries": library_versions(*libraries),
    })


def _save_chunk(path: Path, table: pd.DataFrame) -> None:
    with atomic_file(path) as tmp:
        table.to_pickle(tmp)


def _load_chunk(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_pickle(path)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged chunk file is recomputed, never trusted
        path.unlink(missing_ok=True)
        return None


def run_detect(params: DetectParams, name: str, images: pd.DataFrame, out_dir: str | Path,
               counts_path: str | Path, *, progress: bool = True, plan: DetectPlan | None = None,
               precropped: bool = False, staging: str | Path | None = None) -> dict:
    """Detect faces in data set ``name``; write its table, its rejects list and its counts.

    Writes ``out_dir/detections.parquet`` (one row per image, see :func:`detect_set`),
    ``out_dir/rejects.csv`` (set, image_id, path, reason of every image dropped) and the counts
    JSON ``counts_path``. Prints :meth:`DetectPlan.describe` first (device, threads, batch size).
    A ``plan`` of ``plan_detect(params)`` is made when none is given (:class:`ConfigError` before
    anything is written when ``device: cuda`` has no GPU). A ``precropped`` set is not detected
    (:func:`precropped_set`). Chunks are kept in ``staging`` (default
    :func:`pipeline.chunks.staging_dir` of ``out_dir``: ``data/.partial/detect/NAME``); one line
    says how many were reused.
    """
    plan = plan_detect(params) if plan is None else plan
    print(plan.describe(), flush=True)
    store = ChunkStore(staging_dir(out_dir) if staging is None else staging, ".pkl")
    key = stage_key(params, plan)
    size = chunk_images(params, plan)
    detector: Detector | None = None
    ranges = chunk_ranges(len(images), size)
    parts, used, reused = [], [], 0
    bar = tqdm(total=len(images), desc=f"detect {name}", unit="img", disable=not progress, dynamic_ncols=True)
    for a, b in ranges:
        rows = images.iloc[a:b]
        chunk = digest([key, precropped, rows["image_id"].tolist(), rows["path"].tolist(),
                        rows["identity"].tolist(), file_digests(rows["path"].tolist(), plan.threads)])
        part = _load_chunk(store.path(chunk))
        if part is not None:
            reused += 1
        else:
            if precropped:
                part = precropped_set(rows, params, threads=plan.threads)
            else:
                if detector is None and len(rows):
                    detector = make_detector(params, plan)
                part = detect_set(rows, detector, params, progress=False, threads=plan.threads)
            _save_chunk(store.path(chunk), part)
        parts.append(part)
        used.append(chunk)
        bar.update(b - a)
    bar.close()
    print(f"detect {name}: {len(ranges)} chunk(s) of up to {size} images, {reused} reused from {store.root}",
          flush=True)
    if not parts:
        table = _table(images.iloc[:0], *_empty_columns(0))
    else:
        table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    dropped = table[~table["status"].isin(KEPT)]
    counts = {
        "images": int(len(table)),
        "faces": int(len(table) - len(dropped)),
        "dropped": int(len(dropped)),
        "reasons": {str(k): int(v) for k, v in dropped["reason"].value_counts().sort_index().items()},
    }
    if precropped:
        counts["precropped"] = True
        counts["source_sizes"] = size_counts(kept(table))
    with atomic_dir(out_dir) as tmp:
        write_parquet(Path(tmp) / DETECTIONS_FILE, table)
        write_csv(Path(tmp) / REJECTS_FILE, dropped.assign(set=name)[["set", "image_id", "path", "reason"]])
    write_json(counts_path, counts)
    store.prune(used)
    return counts


def read_detections(detect_dir: str | Path) -> pd.DataFrame:
    """The detections table the detect stage wrote in ``detect_dir`` (``data/detect/SET``)."""
    path = Path(detect_dir) / DETECTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the detect stage of this set first (dvc repro)")
    return pd.read_parquet(path)


def size_counts(rows: pd.DataFrame) -> dict[str, int]:
    """``{"WxH": number of rows}`` of the images' sizes in file pixels, largest count first."""
    labels = rows["width"].astype(int).astype(str) + "x" + rows["height"].astype(int).astype(str)
    counts = labels.value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}
