"""Check the built-in synthetic face dataset (a script, not a test).

Generates the default-size dataset into a temporary folder and prints:
- generation time and rate;
- the real MTCNN detection rate per set, and how far its 5 landmarks land from the drawn
  ones (error / inter-ocular distance);
- a crude identity-separability proxy: pair AUC of cosine similarity between raw grayscale
  pixels of faces aligned (5-point similarity) to the ArcFace 112x112 template. It should be
  clearly above 0.5 (identity is present) and well below 1.0 (it still has to be learnt);
- a contact sheet of 8 identities x 6 images (synth_open) for a person to look at.

Usage: .venv/bin/python bench/check_synthetic.py [--seed 0] [--workers N]
       [--sheet /tmp/synthetic_sheet.png] [--aligned-out faces.npz]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.datasets.synthetic import (  # noqa: E402
    face_landmarks, generate_synthetic, identity_rng, image_rng, sample_identity, sample_variation)

TEMPLATE = np.array([(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                     (41.5493, 92.3655), (70.7299, 92.2041)], np.float32)
KEYS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
GROUP = {"train": ("train", "a"), "synth_closed": ("train", "a"), "synth_open": ("open", "a"),
         "synth_domain": ("domain", "b")}


def detect(detector, paths: list[str], batch: int = 32) -> list[np.ndarray | None]:
    """(5, 2) landmarks of the confident face nearest the image centre, or None."""
    out: list[np.ndarray | None] = []
    bar = tqdm(total=len(paths), unit="img", desc="  mtcnn", mininterval=2.0)
    for k in range(0, len(paths), batch):
        imgs = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths[k:k + batch]]
        res = detector.detect_faces(imgs)
        for img, faces in zip(imgs, res):
            faces = [f for f in faces if f["confidence"] >= 0.9]
            if not faces:
                out.append(None)
                continue
            h, w = img.shape[:2]
            best = min(faces, key=lambda f: np.hypot(f["box"][0] + f["box"][2] / 2 - w / 2,
                                                     f["box"][1] + f["box"][3] / 2 - h / 2))
            out.append(np.array([best["keypoints"][k_] for k_ in KEYS], np.float32))
        bar.update(len(imgs))
    bar.close()
    return out


def drawn_landmarks(set_name: str, image_id: str, seed: int, size: int) -> np.ndarray:
    """Ground-truth landmarks of one generated image, rebuilt from the per-image seeds."""
    group, domain = GROUP[set_name]
    ident, fname = image_id.split("/")
    i, j = int(ident.rsplit("_", 1)[1]) - 1, int(fname.rsplit("_", 1)[1]) - 1
    identity = sample_identity(identity_rng(seed, group, i), domain)
    return face_landmarks(identity, sample_variation(image_rng(seed, set_name, i, j), domain), size)


def align(path: str, lm: np.ndarray) -> np.ndarray:
    """112x112 grayscale float32 face aligned to the ArcFace template."""
    matrix, _ = cv2.estimateAffinePartial2D(lm, TEMPLATE, method=cv2.LMEDS)
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    return cv2.warpAffine(img, matrix, (112, 112), borderMode=cv2.BORDER_REPLICATE).astype(np.float32)


def pixel_auc(faces: dict[str, np.ndarray], pairs) -> tuple[float, int]:
    def vec(a: np.ndarray) -> np.ndarray:
        v = a.ravel() - a.mean()
        return v / (np.linalg.norm(v) + 1e-6)

    scores, labels = [], []
    for r in pairs.itertuples():
        if r.image_id1 in faces and r.image_id2 in faces:
            scores.append(float(vec(faces[r.image_id1]) @ vec(faces[r.image_id2])))
            labels.append(r.same)
    return roc_auc_score(labels, scores), len(pairs) - len(labels)


def contact_sheet(images, path: str, n_id: int = 8, n_img: int = 6) -> None:
    rows = []
    for ident in list(dict.fromkeys(images.identity))[:n_id]:
        paths = images[images.identity == ident].path.tolist()[:n_img]
        rows.append(np.concatenate([cv2.imread(p) for p in paths], 1))
    cv2.imwrite(path, np.concatenate(rows, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--sheet", default="/tmp/synthetic_sheet.png")
    ap.add_argument("--aligned-out", default=None, help="save aligned faces + identities (npz)")
    args = ap.parse_args()
    size = 160
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sets = generate_synthetic(Path(tmp), seed=args.seed, workers=args.workers, image_size=size)
        dt = time.perf_counter() - t0
        n = sum(len(im) for im, _ in sets.values())
        print(f"generated {n} images of {size}x{size} in {dt:.1f} s ({n / dt:.0f} img/s, "
              f"workers={args.workers or os.cpu_count()})")
        contact_sheet(sets["synth_open"][0], args.sheet)
        print(f"contact sheet: {args.sheet}")

        from mtcnn import MTCNN

        detector = MTCNN()
        saved: dict[str, list] = {"face": [], "identity": [], "set": [], "image_id": []}
        for name, (images, pairs) in sets.items():
            print(f"{name}: {len(images)} images")
            t0 = time.perf_counter()
            found = detect(detector, images.path.tolist())
            rate = np.mean([lm is not None for lm in found])
            errs = []
            faces: dict[str, np.ndarray] = {}
            for row, lm in zip(images.itertuples(), found):
                if lm is None:
                    continue
                gt = drawn_landmarks(name, row.image_id, args.seed, size)
                errs.append(np.linalg.norm(lm - gt, axis=1) / np.linalg.norm(gt[1] - gt[0]))
                faces[row.image_id] = align(row.path, lm)
                if args.aligned_out:
                    saved["face"].append(faces[row.image_id].astype(np.uint8))
                    saved["identity"].append(row.identity)
                    saved["set"].append(name)
                    saved["image_id"].append(row.image_id)
            e = np.array(errs)
            print(f"  detection rate {rate:.4f} ({int(rate * len(images))}/{len(images)}), "
                  f"{(time.perf_counter() - t0) / len(images) * 1000:.0f} ms/img")
            print(f"  landmark error / inter-ocular distance: median {np.median(e):.3f}, "
                  f"mean per point (le, re, nose, ml, mr) {np.round(e.mean(0), 3).tolist()}, "
                  f"images with a point > 0.25: {np.mean(e.max(1) > 0.25):.3f}")
            if pairs is not None:
                auc, skipped = pixel_auc(faces, pairs)
                print(f"  raw-pixel cosine pair AUC {auc:.3f} ({len(pairs) - skipped} pairs, "
                      f"{skipped} skipped for a missed face)")
        if args.aligned_out:
            np.savez_compressed(args.aligned_out, **{k: np.array(v) for k, v in saved.items()})
            print(f"aligned faces: {args.aligned_out}")


if __name__ == "__main__":
    main()
