"""dlib's pretrained ResNet face descriptor as a baseline, run with dlib's own recipe.

dlib's model (``dlib_face_recognition_resnet_model_v1``) maps a 150x150 RGB "face
chip" to a 128-D descriptor; two faces are the same person when the Euclidean
distance is below about 0.6. It was trained on chips cut by dlib's 5-point shape
predictor, not on our 112x112 ArcFace-template crops, so this module runs dlib's
recipe on the ORIGINAL images, as the ``face_recognition`` package does:

1. ``dlib.get_frontal_face_detector()`` (HOG) with ``upsample`` pyramid doublings;
   among its faces, the one maximising ``sqrt(w*h) - 2*d`` (``d`` = pixels from the
   box centre to the image centre), as our MTCNN stage chooses;
2. the 5-point shape predictor inside that rectangle;
3. ``face_recognition_model_v1.compute_face_descriptor(image, shape, jitter)``,
   which cuts the 150x150 chip with padding 0.25 (exactly ``dlib.get_face_chip(image,
   shape, size=150, padding=0.25)``) and runs the network. ``jitter`` <= 1 means no
   jittering; ``jitter`` = k > 1 averages the descriptors of k randomly jittered chips.

When HOG finds no face and an MTCNN box is given for the image, that box is used
as the detector rectangle instead (reason ``"hog: no face; used MTCNN box"``).

The model files come from the ``face_recognition_models`` package and dlib from the
``dlib-bin`` wheel (``pip install -r requirements-dlib.txt``); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from pathlib import Path

import numpy as np

from pipeline.images import BadImage, load_rgb

DIM = 128
CHIP_SIZE = 150
CHIP_PADDING = 0.25
PIP_HINT = "pip install -r requirements-dlib.txt"
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
REASON_FALLBACK = "hog: no face; used MTCNN box"
# Below this many images the work is done in this process: starting workers (and
# loading the 31 MB of models in each) costs more than it saves.
MIN_IMAGES_FOR_POOL = 8


class DlibNotInstalled(ImportError):
    """dlib or the ``face_recognition_models`` files are not installed (one-line message)."""


def import_dlib():
    """Import and return the ``dlib`` module, or raise :class:`DlibNotInstalled`."""
    try:
        import dlib
    except ImportError:
        raise DlibNotInstalled(
            f"the dlib baseline needs the 'dlib' module (from the dlib-bin wheel), which is not installed: {PIP_HINT}"
        ) from None
    return dlib


def model_files() -> dict[str, Path]:
    """Paths of the two model files inside the installed ``face_recognition_models`` package.

    Returns ``{"shape_predictor": ..., "resnet": ...}``. The package's own
    ``*_location()`` functions import ``pkg_resources``, which recent setuptools no
    longer ships, so the files are found next to the package instead (the same paths
    those functions return).
    """
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DlibNotInstalled(
            f"the dlib baseline needs the 'face_recognition_models' package (dlib's model files), "
            f"which is not installed: {PIP_HINT}"
        )
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = {"shape_predictor": models / SHAPE_PREDICTOR_FILE, "resnet": models / RESNET_FILE}
    for path in files.values():
        if not path.is_file():
            raise DlibNotInstalled(f"{path}: model file missing from face_recognition_models; reinstall it: {PIP_HINT}")
    return files


def pick_face(boxes: list[tuple[int, int, int, int]], image_shape: tuple[int, int]) -> int | None:
    """Index of the subject's face among ``boxes`` (x, y, w, h pixels), or None if there are none.

    The winner maximises ``sqrt(w*h) - 2*d``, ``d`` = pixels from box centre to image
    centre (``image_shape`` = (height, width)), as ``pipeline.detect.choose_face`` does.
    """
    height, width = image_shape
    best, best_score = None, -np.inf
    for k, (x, y, w, h) in enumerate(boxes):
        d = float(np.hypot(x + w / 2 - width / 2, y + h / 2 - height / 2))
        score = float(np.sqrt(max(w, 0) * max(h, 0))) - 2.0 * d
        if score > best_score:
            best, best_score = k, score
    return best


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r}; expected a non-negative int")
    return int(value)


def _check_boxes(boxes: np.ndarray | None, n: int) -> np.ndarray | None:
    if boxes is None:
        return None
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.shape != (n, 4):
        raise ValueError(f"boxes has shape {arr.shape}; expected ({n}, 4) rows of x, y, w, h (NaN row = no box)")
    for k, row in enumerate(arr):
        if np.isnan(row).all():
            continue
        if not np.isfinite(row).all() or row[2] <= 0 or row[3] <= 0:
            raise ValueError(f"boxes[{k}] = {row.tolist()}; expected finite x, y and positive w, h, or all NaN")
    return arr


class DlibFaceEmbedder:
    """dlib's face detector, 5-point shape predictor and ResNet descriptor, loaded once.

    workers: processes used by :meth:`embed_images` (``None`` = ``os.cpu_count()``);
        each loads the models once. Raises :class:`DlibNotInstalled` (naming the
        missing package and ``pip install -r requirements-dlib.txt``) when dlib or
        the model files are absent.
    """

    def __init__(self, *, workers: int | None = None) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers={workers!r}; expected a positive int or None (= os.cpu_count())")
        self.workers = workers or os.cpu_count() or 1
        dlib = import_dlib()
        self.files = model_files()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape_predictor = dlib.shape_predictor(str(self.files["shape_predictor"]))
        self._resnet = dlib.face_recognition_model_v1(str(self.files["resnet"]))

    # -- one image
    def detect(self, image: np.ndarray, *, upsample: int = 1) -> list[tuple[int, int, int, int]]:
        """HOG faces of an HxWx3 uint8 RGB image as (x, y, w, h) pixel boxes."""
        rects = self._detector(image, _check_count(upsample, "upsample"))
        return [(r.left(), r.top(), r.width(), r.height()) for r in rects]

    def embed_image(self, image: np.ndarray, *, box: np.ndarray | tuple | None = None, upsample: int = 1,
                    jitter: int = 0) -> tuple[np.ndarray | None, str]:
        """Descriptor of the subject's face in an HxWx3 uint8 RGB image.

        box: fallback (x, y, w, h) pixels (e.g. an MTCNN box), used only when HOG finds
            no face; all-NaN or None = no fallback.
        Returns ``(descriptor float32[128] or None, reason)``; reason is ``""`` for a HOG
        face, :data:`REASON_FALLBACK` when the box was used, else why there is no descriptor.
        """
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            raise ValueError(
                f"image is {type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}; "
                "expected an HxWx3 uint8 RGB array"
            )
        jitter = _check_count(jitter, "jitter")
        image = np.ascontiguousarray(image)
        faces = self.detect(image, upsample=upsample)
        reason = ""
        if faces:
            x, y, w, h = faces[pick_face(faces, image.shape[:2])]
        else:
            if box is None or np.isnan(np.asarray(box, dtype=np.float64)).all():
                return None, "hog: no face" if box is None else "hog: no face; no MTCNN box"
            x, y, w, h = (float(v) for v in box)
            reason = REASON_FALLBACK
        return self.descriptor_in_box(image, (x, y, w, h), jitter=jitter), reason

    def _shape(self, image: np.ndarray, box: tuple[float, float, float, float]):
        x, y, w, h = (float(v) for v in box)
        rect = self._dlib.rectangle(int(round(x)), int(round(y)), int(round(x + w)) - 1, int(round(y + h)) - 1)
        return self._shape_predictor(image, rect)

    def descriptor_in_box(self, image: np.ndarray, box: tuple[float, float, float, float], *,
                          jitter: int = 0) -> np.ndarray:
        """float32[128] descriptor of the face in ``box`` (x, y, w, h pixels), skipping HOG:
        5-point shape predictor in that rectangle, chip, network."""
        image = np.ascontiguousarray(image)
        shape = self._shape(image, box)
        descriptor = self._resnet.compute_face_descriptor(image, shape, _check_count(jitter, "jitter"), CHIP_PADDING)
        return np.asarray(descriptor, dtype=np.float32)

    def face_chip(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """The 150x150x3 uint8 RGB chip dlib's network sees for the face in ``box`` (x, y, w, h)."""
        image = np.ascontiguousarray(image)
        return self._dlib.get_face_chip(image, self._shape(image, box), size=CHIP_SIZE, padding=CHIP_PADDING)

    def embed_path(self, path: str, *, box: np.ndarray | tuple | None = None, upsample: int = 1,
                   jitter: int = 0) -> tuple[np.ndarray | None, str]:
        """:meth:`embed_image` on an image file (decoded as RGB, EXIF orientation applied)."""
        try:
            image, _ = load_rgb(path)
        except BadImage as err:
            return None, f"unreadable image: {err}"
        return self.embed_image(image, box=box, upsample=upsample, jitter=jitter)

    # -- many files
    def embed_images(self, paths: list[str], *, boxes: np.ndarray | None = None, upsample: int = 1,
                     jitter: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Embed every image file with dlib's recipe, on ``self.workers`` processes.

        paths: N image files (original images, not our aligned crops).
        boxes: optional [N, 4] float (x, y, w, h) pixels, e.g. our MTCNN detections, a
            NaN row where there is none; used only where HOG finds no face.
        upsample: HOG pyramid doublings (0 = image as is; 1 finds faces down to ~40 px).
        jitter: 0 or 1 = one chip; k > 1 = mean of k jittered chips (k times slower).
        Returns ``(embeddings float32[N, 128]`` (raw, NaN rows where no face),
        ``ok bool[N]``, ``reasons list[str]`` (``""`` = HOG face)).
        """
        from tqdm import tqdm

        paths = [str(p) for p in paths]
        boxes = _check_boxes(boxes, len(paths))
        upsample, jitter = _check_count(upsample, "upsample"), _check_count(jitter, "jitter")
        tasks = [(p, None if boxes is None else tuple(boxes[k]), upsample, jitter) for k, p in enumerate(paths)]
        bar = tqdm(total=len(tasks), desc="dlib embed", unit="img", disable=not progress, dynamic_ncols=True)
        results: list[tuple[np.ndarray | None, str]] = []
        workers = min(self.workers, len(tasks))
        try:
            if workers <= 1 or len(tasks) < MIN_IMAGES_FOR_POOL:
                for task in tasks:
                    results.append(_embed_task(self, task))
                    bar.update()
            else:
                # spawn, not fork: the parent may hold torch/OpenMP threads that fork would copy mid-state.
                ctx = multiprocessing.get_context("spawn")
                chunk = max(1, min(16, len(tasks) // (4 * workers)))
                with ctx.Pool(workers, initializer=_init_worker) as pool:
                    for result in pool.imap(_worker_task, tasks, chunksize=chunk):
                        results.append(result)
                        bar.update()
        finally:
            bar.close()
        embeddings = np.full((len(tasks), DIM), np.nan, dtype=np.float32)
        ok = np.zeros(len(tasks), dtype=bool)
        for k, (vec, _) in enumerate(results):
            if vec is not None:
                embeddings[k], ok[k] = vec, True
        return embeddings, ok, [reason for _, reason in results]


def _embed_task(embedder: DlibFaceEmbedder, task: tuple) -> tuple[np.ndarray | None, str]:
    path, box, upsample, jitter = task
    return embedder.embed_path(path, box=box, upsample=upsample, jitter=jitter)


_WORKER: DlibFaceEmbedder | None = None


def _init_worker() -> None:
    global _WORKER
    _WORKER = DlibFaceEmbedder(workers=1)


def _worker_task(task: tuple) -> tuple[np.ndarray | None, str]:
    return _embed_task(_WORKER, task)


def save_embeddings(path: str | Path, image_ids: list[str], identities: list[str], embeddings: np.ndarray,
                    ok: np.ndarray) -> int:
    """Write the embed stage's ``.npz`` (``image_ids``, ``identities``, ``embeddings`` [M, 128]
    float32) for the ``ok`` rows only, so the score stage counts the other images' pairs
    as missing. Returns M."""
    ok = np.asarray(ok, dtype=bool)
    n = len(image_ids)
    if len(identities) != n or embeddings.shape != (n, DIM) or ok.shape != (n,):
        raise ValueError(
            f"image_ids ({n}), identities ({len(identities)}), embeddings {embeddings.shape} and ok {ok.shape} "
            f"must describe the same {n} images (embeddings [{n}, {DIM}])"
        )
    np.savez(
        path,
        image_ids=np.asarray(image_ids, dtype=object)[ok].astype(str),
        identities=np.asarray(identities, dtype=object)[ok].astype(str),
        embeddings=embeddings[ok].astype(np.float32),
    )
    return int(ok.sum())
