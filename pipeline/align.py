"""Stage ``align``: warp each detected face onto the ArcFace 5-point template.

The transform is the least-squares *non-reflective similarity* (rotation, uniform
scale, translation) that maps the 5 detected landmarks onto the template, solved in
closed form (Umeyama's method with the reflection excluded). The template is the
ArcFace 112x112 one; other output sizes scale it. The residual — the mean distance,
in output pixels, between the mapped landmarks and the template — is recorded per
image: a large one flags a bad detection or an extreme pose.

Aligned crops are written as JPEG files in an ImageFolder layout,
``OUT/<set>/<identity>/<name>.jpg``, with ``OUT/<set>/_index.csv`` listing them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import AlignParams
from pipeline.detect import landmarks_of
from pipeline.images import BadImage, load_rgb
from pipeline.io import atomic_dir, write_csv, write_json

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


def align_set(detections: pd.DataFrame, out_dir: Path, params: AlignParams, *, desc: str = "align",
              progress: bool = True) -> pd.DataFrame:
    """Align the kept faces of one set into ``out_dir``; returns the index table."""
    kept = detections[detections["status"] == "ok"].reset_index(drop=True)
    names = _file_names(kept)
    points = landmarks_of(kept)
    residuals = np.full(len(kept), np.nan)
    failed: list[str] = [""] * len(kept)
    for k, row in enumerate(tqdm(kept.itertuples(index=False), total=len(kept), desc=desc, unit="img",
                                 disable=not progress, dynamic_ncols=True)):
        try:
            image, _ = load_rgb(row.path)
            crop, residuals[k] = align_face(image, points[k], params.size)
        except (BadImage, ValueError) as err:  # the file changed since detection, or degenerate landmarks
            failed[k] = str(err)
            continue
        target = out_dir / names[k]
        target.parent.mkdir(parents=True, exist_ok=True)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality])
        if not ok:  # pragma: no cover - encoding a uint8 crop does not fail
            failed[k] = "could not encode the aligned crop"
            continue
        target.write_bytes(encoded.tobytes())
    index = pd.DataFrame(
        {
            "image_id": kept["image_id"],
            "identity": kept["identity"],
            "source_path": kept["path"],
            "file": names,
            "residual": residuals,
            "error": failed,
        }
    )
    return index


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


def run_align(params: AlignParams, detections: dict[str, pd.DataFrame], out_dir: str | Path,
              sheet_path: str | Path, stats_path: str | Path, *, seed: int = 0, progress: bool = True) -> dict:
    """Align every set; write the crops, the contact sheet and residual statistics."""
    out_dir = Path(out_dir)
    stats: dict[str, dict] = {}
    indexes: dict[str, pd.DataFrame] = {}
    with atomic_dir(out_dir) as tmp:
        for name, table in detections.items():
            index = align_set(table, Path(tmp) / name, params, desc=f"align {name}", progress=progress)
            write_csv(Path(tmp) / name / "_index.csv", index)
            indexes[name] = index
            good = index[index["error"] == ""]
            stats[name] = {
                "aligned": int(len(good)),
                "failed": int(len(index) - len(good)),
                "residual_mean_px": float(good["residual"].mean()) if len(good) else None,
                "residual_p95_px": float(good["residual"].quantile(0.95)) if len(good) else None,
            }
        if params.contact_sheet:
            _write_sheet(indexes, Path(tmp), Path(sheet_path), params, seed)
    write_json(stats_path, stats)
    return stats


def _write_sheet(indexes: dict[str, pd.DataFrame], root: Path, sheet_path: Path, params: AlignParams, seed: int) -> None:
    from pipeline.io import atomic_file

    rng = np.random.default_rng(seed)
    frames = [ix[ix["error"] == ""].assign(set=name) for name, ix in indexes.items()]
    every = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if every.empty:
        return
    n_random = min(len(every), max(1, params.contact_sheet - 12))
    picks = every.iloc[np.sort(rng.choice(len(every), n_random, replace=False))]
    worst = every.nlargest(min(12, len(every)), "residual")
    crops, captions = [], []
    for table, label in ((picks, None), (worst, "worst")):
        for row in table.itertuples(index=False):
            crop = cv2.cvtColor(cv2.imread(str(root / row.set / row.file)), cv2.COLOR_BGR2RGB)
            crops.append(crop)
            captions.append(f"{row.residual:.1f}px worst" if label else f"{row.identity}")
    sheet = contact_sheet(crops, captions, size=params.size if params.size <= 160 else 112)
    with atomic_file(sheet_path) as tmp:
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(encoded.tobytes())
