"""Stage ``align_train`` / ``align@SET``: warp each detected face of one data set onto the ArcFace
5-point template.

The transform is the least-squares *non-reflective similarity* (rotation, uniform
scale, translation) that maps the 5 detected landmarks onto the template, solved in
closed form (Umeyama's method with the reflection excluded). The template is the
ArcFace 112x112 one; other output sizes scale it. The residual — the mean distance,
in output pixels, between the mapped landmarks and the template — is recorded per
image: a large one flags a bad detection or an extreme pose.

Pre-cropped sets (``precropped: true``; detect marks their images ``precropped``) are not
warped: each image is resized to ``size`` x ``size`` (``crop: resize``), or its central
square, ``crop_fraction`` of the shorter side, is cut out and resized (``crop: center``)
(:func:`resize_crop`). Their residual is empty, and their entry in the statistics adds
``precropped``, ``crop``, ``crop_fraction``, ``source_sizes`` and ``output_size``.

Output of set SET (packed: a few large files instead of one file per face, so DVC hashes,
caches and checks out ``data/aligned/SET`` in seconds at CASIA scale), with its statistics in
``reports/alignment/SET.json`` and its contact sheet in ``reports/figures/contact_sheets/SET.png``::

    data/aligned/SET/_index.csv          image_id, identity, source_path, file, residual, error, part
    data/aligned/SET/part-00000.parquet  file (``<identity>/<name>.jpg``), image (JPEG bytes; null
                                         where alignment failed), residual, error; one per chunk

:func:`aligned_images` reads a set back in index order (also the earlier layout of one
JPEG file per face, ``<set>/<identity>/<name>.jpg``, and :func:`unpack_aligned`
writes that layout from the packed one, for tools that want an ImageFolder).

Work is spread over :func:`pipeline.cpu.thread_count` worker processes (:func:`worker_pool`):
processes, not threads, because on 250x250 photos only about half of the time per face is
spent in calls that release the GIL (JPEG decoding, the warp, encoding), which would cap
threads at about 2x whatever the number of cores. The bytes do not depend on the number of
workers. Resumable like
detect (:mod:`pipeline.chunks`): each chunk of ``chunk_size`` faces is written to
``data/aligned/.partial/SET/`` when it is done, and a rerun after a crash reuses it; the parts
of the output are hard links to those chunk files (no copy), and the staging folder is
removed once the output is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import cpu
from pipeline.chunks import ChunkStore, chunk_ranges, digest, file_digests, library_versions, source_digest, staging_dir
from pipeline.config import AlignParams
from pipeline.detect import KEPT, PRECROPPED, landmarks_of, size_counts
from pipeline.images import BadImage, decode_bytes, load_rgb, read_image_bytes

JPEG_MAGIC = b"\xff\xd8\xff"
from pipeline.io import atomic_dir, atomic_file, write_csv, write_json

INDEX = "_index.csv"
PART_SCHEMA = pa.schema([("file", pa.string()), ("image", pa.binary()), ("residual", pa.float64()),
                         ("error", pa.string())])


@dataclass(frozen=True)
class Crop:
    """How a pre-cropped set becomes ``size`` x ``size``: ``resize`` the whole image, or cut its
    ``center`` square (``fraction`` of the shorter side) and resize that."""

    mode: str = "resize"
    fraction: float = 1.0

#: ArcFace 112x112 template: left eye, right eye, nose tip, left and right mouth corner.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def template(size: int = 112) -> np.ndarray:
    """The 5-point template for a ``size`` x ``size`` output, ``[5, 2]`` (x, y)."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares non-reflective similarity mapping ``src`` points onto ``dst``.

    ``src``, ``dst``: ``[N, 2]`` with N >= 2. Returns the ``2x3`` matrix ``M`` with
    ``dst ~ M @ [x, y, 1]``. The rotation is proper (det = +1): a mirrored face is
    never produced even when the landmarks are mirrored.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two matching [N>=2, 2] point arrays, got {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = (src_c**2).sum() / len(src)
    if var_src <= 1e-12:
        raise ValueError("the source points coincide; no transform is defined")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[1, 1] = -1.0
    rotation = u @ fix @ vt
    scale = float((sigma * np.diag(fix)).sum() / var_src)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_dst - scale * rotation @ mu_src
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> tuple[np.ndarray, float]:
    """Warp ``image`` (HxWx3) so ``landmarks`` ([5, 2]) land on the template.

    Returns ``(crop, residual)``: the ``size x size x 3`` crop and the mean landmark
    distance to the template after alignment, in output pixels.
    """
    target = template(size)
    matrix = similarity_transform(landmarks, target)
    crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    residual = float(np.linalg.norm(apply_transform(matrix, landmarks) - target, axis=1).mean())
    return crop, residual


def resize_crop(image: np.ndarray, size: int, crop: Crop = Crop()) -> np.ndarray:
    """A pre-cropped face as a ``size`` x ``size`` crop (see :class:`Crop`).

    ``center``: the central square of side ``round(fraction * min(H, W))``, from row
    ``(H - side) // 2`` and column ``(W - side) // 2``. Resampling: ``cv2.INTER_AREA`` when
    the crop is at least ``size`` on both sides (shrinking), ``cv2.INTER_LINEAR`` otherwise.
    """
    if crop.mode == "center":
        h, w = image.shape[:2]
        side = max(1, int(round(crop.fraction * min(h, w))))
        y0, x0 = (h - side) // 2, (w - side) // 2
        image = image[y0 : y0 + side, x0 : x0 + side]
    elif crop.mode != "resize":
        raise ValueError(f"unknown crop mode {crop.mode!r} (resize or center)")
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image)
    interpolation = cv2.INTER_AREA if min(h, w) >= size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interpolation)


def _file_names(rows: pd.DataFrame) -> list[str]:
    names, seen = [], set()
    for image_id, identity in zip(rows["image_id"], rows["identity"]):
        stem = Path(str(image_id)).stem or "image"
        candidate, k = f"{identity}/{stem}.jpg", 1
        while candidate in seen:
            k += 1
            candidate = f"{identity}/{stem}-{k}.jpg"
        seen.add(candidate)
        names.append(candidate)
    return names


def _align_one(task: tuple[str, np.ndarray, int, int, Crop | None]) -> tuple[bytes | None, float, str]:
    """One face: ``(JPEG bytes or None, residual, error)``.

    A pre-cropped JPEG that is already ``size`` x ``size`` (an insightface set at ``align.size:
    112``) keeps its bytes: decoded once to check it, never re-encoded (lossless, and the shards
    then hold the very bytes of the source)."""
    path, points, size, quality, crop = task
    try:
        if crop is not None and crop.mode == "resize":
            data = read_image_bytes(path)
            image, _ = decode_bytes(data, path)
            if data.startswith(JPEG_MAGIC) and image.shape[:2] == (size, size):
                return data, float("nan"), ""
        else:
            image, _ = load_rgb(path)
        if crop is None:
            face, residual = align_face(image, points, size)
        else:
            face, residual = resize_crop(image, size, crop), float("nan")
    except (BadImage, ValueError) as err:  # the file changed since detection, or degenerate landmarks
        return None, float("nan"), str(err)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(face, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - encoding a uint8 crop does not fail
        return None, residual, "could not encode the aligned crop"
    return encoded.tobytes(), residual, ""


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one face per worker at a time; the workers are the parallelism


class Workers:
    """``n`` worker processes for :func:`_align_one`, started on first use (a run whose chunks
    are all staged starts none); with ``n == 1`` the work stays in this process.

    Started with ``spawn``: a fork of a stage process that has loaded PyTorch, OpenMP or
    OpenBLAS thread pools can hang. The workers inherit the environment, so the same CPU
    kernels (:func:`pipeline.cpu.pin_instruction_set`)."""

    def __init__(self, n: int) -> None:
        self.n = max(1, int(n))
        self._pool: Executor | None = None

    def map(self, tasks: list) -> list:
        if self.n == 1 or len(tasks) < 2:
            return [_align_one(t) for t in tasks]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.n, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init)
        return list(self._pool.map(_align_one, tasks, chunksize=max(1, min(64, len(tasks) // (4 * self.n)))))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _align_chunk(rows: pd.DataFrame, names: list[str], points: np.ndarray, params: AlignParams, crop: Crop | None,
                 workers: Workers) -> pa.Table:
    tasks = [(path, points[k], params.size, params.jpeg_quality, crop) for k, path in enumerate(rows["path"])]
    results = workers.map(tasks)
    return pa.table({"file": names, "image": [r[0] for r in results], "residual": [r[1] for r in results],
                     "error": [r[2] for r in results]}, schema=PART_SCHEMA)


def stage_key(params: AlignParams) -> str:
    """What every chunk depends on besides its faces: params, code and library versions."""
    return digest({
        "stage": "align",
        "params": params.model_dump(exclude={"chunk_size", "contact_sheet"}),
        "code": source_digest("align", "images", "chunks"),
        "libraries": library_versions("cv2", "numpy", "PIL", "pyarrow"),
    })


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(source, target)


def align_set(detections: pd.DataFrame, out_dir: Path, params: AlignParams, *, desc: str = "align",
              progress: bool = True, crop: Crop | None = None, threads: int | None = None,
              staging: str | Path | None = None, key: str | None = None, used: list[str] | None = None,
              stats: dict | None = None, workers: Workers | None = None) -> pd.DataFrame:
    """Align the kept faces of one set into ``out_dir`` (packed parts); returns the index table.

    ``crop``: the set is pre-cropped, resize instead of warping. ``threads`` worker processes
    (default :func:`pipeline.cpu.thread_count`), or the given :class:`Workers`, work side by
    side. Chunks are kept in ``staging``
    (default ``<out_dir>/.partial``, removed at the end when not given); the keys of the
    chunks used are appended to ``used``; ``stats`` (a dict) gets ``chunks`` and ``reused``.
    """
    out_dir = Path(out_dir)
    own_staging = staging is None
    store = ChunkStore(out_dir / ".partial" if own_staging else staging, ".parquet")
    key = stage_key(params) if key is None else key
    threads = cpu.thread_count() if threads is None else int(threads)
    rows_kept = detections[detections["status"].isin(KEPT)].reset_index(drop=True)
    names = _file_names(rows_kept)
    points = landmarks_of(rows_kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranges = chunk_ranges(len(rows_kept), params.chunk_size)
    frames, reused = [], 0
    bar = tqdm(total=len(rows_kept), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    own_workers = workers is None
    workers = Workers(threads) if workers is None else workers
    try:
        for k, (a, b) in enumerate(ranges):
            rows = rows_kept.iloc[a:b]
            chunk = digest([key, None if crop is None else [crop.mode, crop.fraction], rows["image_id"].tolist(),
                            rows["identity"].tolist(), rows["path"].tolist(), names[a:b], points[a:b],
                            file_digests(rows["path"].tolist(), threads)])
            path = store.path(chunk)
            if path.is_file():
                try:
                    table = pq.read_table(path, columns=["file", "residual", "error"])
                    reused += 1
                except Exception:  # noqa: BLE001 - a damaged chunk is recomputed, never trusted
                    path.unlink(missing_ok=True)
            if not path.is_file():
                full = _align_chunk(rows, names[a:b], points[a:b], params, crop, workers)
                with atomic_file(path) as tmp:
                    pq.write_table(full, tmp)
                table = full.select(["file", "residual", "error"])
            part = f"part-{k:05d}.parquet"
            _link_or_copy(path, out_dir / part)
            frames.append(pd.DataFrame({"file": table.column("file").to_pylist(),
                                        "residual": table.column("residual").to_numpy(zero_copy_only=False),
                                        "error": table.column("error").to_pylist(), "part": part}))
            if used is not None:
                used.append(chunk)
            bar.update(b - a)
    finally:
        if own_workers:
            workers.close()
        bar.close()
    if own_staging:
        store.clear()
    done = pd.concat(frames, ignore_index=True)
    if done["file"].tolist() != names:  # a chunk file that does not hold what its key says
        raise RuntimeError(f"{store.root}: staged chunks do not match the faces to align; delete the folder and rerun")
    if stats is not None:
        stats.update(chunks=len(ranges), reused=reused)
    return pd.DataFrame(
        {
            "image_id": rows_kept["image_id"],
            "identity": rows_kept["identity"],
            "source_path": rows_kept["path"],
            "file": names,
            "residual": done["residual"].to_numpy(),
            "error": done["error"].to_numpy(),
            "part": done["part"].to_numpy(),
        }
    )


def read_index(set_dir: str | Path) -> pd.DataFrame:
    """``_index.csv`` of an aligned set (strings kept as written: an empty error is ``""``)."""
    return pd.read_csv(Path(set_dir) / INDEX, dtype={"image_id": str, "identity": str, "source_path": str,
                                                     "file": str, "error": str, "part": str},
                       keep_default_na=False, na_values={"residual": [""]})


def aligned_images(set_dir: str | Path, index: pd.DataFrame | None = None) -> Iterator[tuple[str, bytes]]:
    """``(file, JPEG bytes)`` of every aligned face of ``index`` (default: the set's index, faces
    without error), in index order; reads packed parts, or one file per face (the earlier layout).

    Each part is read once, and only while its faces are yielded.
    """
    set_dir = Path(set_dir)
    if index is None:
        index = read_index(set_dir)
        index = index[index["error"] == ""]
    if "part" not in index.columns:
        for name in index["file"]:
            yield name, (set_dir / name).read_bytes()
        return
    current, blobs = None, {}
    for name, part in zip(index["file"], index["part"]):
        if part != current:
            table = pq.read_table(set_dir / part, columns=["file", "image"])
            blobs = dict(zip(table.column("file").to_pylist(), table.column("image").to_pylist()))
            current = part
        blob = blobs.get(name)
        if blob is None:
            raise FileNotFoundError(f"{set_dir / part}: no aligned image {name!r}")
        yield name, blob


def unpack_aligned(set_dir: str | Path, out_dir: str | Path) -> int:
    """Write the faces of a packed aligned set as ``out_dir/<identity>/<name>.jpg`` (ImageFolder) plus its
    ``_index.csv``; returns the number of faces written."""
    out_dir = Path(out_dir)
    index = read_index(set_dir)
    n = 0
    for name, blob in aligned_images(set_dir, index[index["error"] == ""]):
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(blob)
        n += 1
    write_csv(out_dir / INDEX, index.drop(columns=["part"], errors="ignore"))
    return n


def contact_sheet(crops: list[np.ndarray], captions: list[str], *, columns: int = 12, size: int = 112,
                  mark_template: bool = True) -> np.ndarray:
    """Tile aligned crops into one RGB image; template points drawn as small dots."""
    rows = max(1, -(-len(crops) // columns))
    caption_h = 12
    sheet = np.full((rows * (size + caption_h), columns * size, 3), 255, dtype=np.uint8)
    dots = template(size)
    for k, (crop, caption) in enumerate(zip(crops, captions)):
        r, c = divmod(k, columns)
        y0, x0 = r * (size + caption_h), c * size
        tile = cv2.resize(crop, (size, size)) if crop.shape[0] != size else crop.copy()
        if mark_template:
            for x, y in dots:
                cv2.circle(tile, (int(round(x)), int(round(y))), 1, (0, 255, 0), -1, cv2.LINE_AA)
        sheet[y0 : y0 + size, x0 : x0 + size] = tile
        cv2.putText(sheet, caption[:18], (x0 + 2, y0 + size + 9), cv2.FONT_HERSHEY_PLAIN, 0.6, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return sheet


def run_align(params: AlignParams, name: str, detections: pd.DataFrame, out_dir: str | Path,
              sheet_path: str | Path, stats_path: str | Path, *, seed: int = 0, progress: bool = True,
              crop: Crop | None = None, threads: int | None = None, staging: str | Path | None = None) -> dict:
    """Align data set ``name``; write its packed crops, its contact sheet and its residual statistics.

    ``crop``: the set is pre-cropped, and how to crop it. Chunks are staged in ``staging``
    (default :func:`pipeline.chunks.staging_dir` of ``out_dir``: ``data/aligned/.partial/NAME``),
    which is removed once the output is complete.
    """
    out_dir = Path(out_dir)
    store_root = staging_dir(out_dir) if staging is None else Path(staging)
    chunking: dict = {}
    with atomic_dir(out_dir) as tmp, Workers(cpu.thread_count() if threads is None else threads) as workers:
        index = align_set(detections, Path(tmp), params, desc=f"align {name}", progress=progress, crop=crop,
                          staging=store_root, key=stage_key(params), stats=chunking, workers=workers)
        print(f"align {name}: {chunking['chunks']} chunk(s) of up to {params.chunk_size} faces, "
              f"{chunking['reused']} reused from {store_root}", flush=True)
        write_csv(Path(tmp) / INDEX, index)
        good = index[index["error"] == ""]
        stats = {
            "aligned": int(len(good)),
            "failed": int(len(index) - len(good)),
            "residual_mean_px": float(good["residual"].mean()) if len(good) and crop is None else None,
            "residual_p95_px": float(good["residual"].quantile(0.95)) if len(good) and crop is None else None,
        }
        if crop is not None:
            sources = detections[detections["status"] == PRECROPPED]
            sources = sources[sources["image_id"].isin(good["image_id"])]
            stats.update(precropped=True, crop=crop.mode, crop_fraction=crop.fraction,
                         source_sizes=size_counts(sources), output_size=params.size)
        if params.contact_sheet:
            _write_sheet(index, Path(tmp), Path(sheet_path), params, seed)
    write_json(stats_path, stats)
    ChunkStore(store_root, ".parquet").clear()
    return stats


def _write_sheet(index: pd.DataFrame, set_dir: Path, sheet_path: Path, params: AlignParams, seed: int) -> None:
    """A contact sheet of the set: a seeded random draw of its aligned faces, then its 12 worst
    landmark residuals."""
    rng = np.random.default_rng(seed)
    every = index[index["error"] == ""].reset_index(drop=True)
    if every.empty:
        return
    n_random = min(len(every), max(1, params.contact_sheet - 12))
    picks = every.iloc[np.sort(rng.choice(len(every), n_random, replace=False))]
    worst = every.nlargest(min(12, len(every)), "residual")
    wanted = pd.concat([picks, worst], ignore_index=True).drop_duplicates("file")
    wanted = wanted.sort_values("part", kind="stable") if "part" in wanted else wanted
    blobs = dict(aligned_images(set_dir, wanted))
    crops, captions = [], []
    for table, label in ((picks, None), (worst, "worst")):
        for row in table.itertuples(index=False):
            array = cv2.imdecode(np.frombuffer(blobs[row.file], dtype=np.uint8), cv2.IMREAD_COLOR)
            crops.append(cv2.cvtColor(array, cv2.COLOR_BGR2RGB))
            captions.append(f"{row.residual:.1f}px worst" if label else f"{row.identity}")
    sheet = contact_sheet(crops, captions, size=params.size if params.size <= 160 else 112)
    with atomic_file(sheet_path) as tmp:
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(encoded.tobytes())
