"""dlib's pretrained ResNet face model on the real LFW sample, by dlib's recipe and through ours.

    .venv/bin/python bench/dlib_lfw_reference.py            # ~10 min on 2 cores the first time
    .venv/bin/python bench/dlib_lfw_reference.py --no-cache  # recompute everything

Every figure it prints is computed in this run (or read from its own cache); the
committed raw output is ``reports/benchmarks/dlib_lfw_reference.txt``.

Steps (embeddings are cached under ``--cache``, so reruns take seconds):

1. throughput of :meth:`DlibFaceEmbedder.embed_images` on the first ``--n-throughput``
   images, in this process and on a pool of ``os.cpu_count()`` workers;
2. every image the pairs need, dlib's recipe: HOG (upsample 1) -> 5-point shape
   predictor -> 150x150 chip (padding 0.25) -> 128-D descriptor, no jitter;
3. for the images where HOG finds no face: our MTCNN (:class:`pipeline.mtcnn_torch.TorchMTCNN`,
   face chosen by :func:`pipeline.detect.choose_face`) and the descriptor from the MTCNN box;
   also HOG with upsample 2 on those images (does a finer pyramid rescue them?).

Then prints one table:

* ``reference``: Euclidean distance, LFW protocol written out here independently (for
  each fold, the threshold that maximises accuracy on the other folds, same iff d < t),
  pairs with an undetected face dropped (what ``face_recognition`` gives: no encoding);
  also with those pairs counted as errors; also at dlib's documented fixed threshold 0.6;
* ``ours``: ``pipeline.metrics.lfw_accuracy`` on ``PairDistance("l2").scores`` (= -distance)
  and the other three distance variants, HOG only and with the MTCNN-box fallback.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.baselines.dlib_resnet import DlibFaceEmbedder  # noqa: E402
from pipeline.datasets.lfw import load_lfw  # noqa: E402
from pipeline.distances import PairDistance, standard_variants  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402
from pipeline.metrics import lfw_accuracy  # noqa: E402

DLIB_THRESHOLD = 0.6  # dlib's documented same-person distance threshold


# ----------------------------------------------------------------------------- caching
def cached(path: Path, use_cache: bool, compute) -> dict[str, np.ndarray]:
    """Load ``path`` (.npz) or compute a dict of arrays and save it there."""
    if use_cache and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **result)
    return result


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool's workers), seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def embed(embedder: DlibFaceEmbedder, paths: list[str], **kw) -> dict[str, np.ndarray]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    emb, ok, reasons = embedder.embed_images(paths, **kw)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(f"  embedded {len(paths)} images in {seconds:.1f} s ({len(paths) / seconds:.2f} img/s; "
          f"{1000 * cpu / len(paths):.0f} CPU-ms/img incl. worker start-up), {int(ok.sum())} with a face")
    return {"paths": np.asarray(paths, dtype=str), "embeddings": emb, "ok": ok,
            "reasons": np.asarray(reasons, dtype=str), "seconds": np.float64(seconds), "cpu": np.float64(cpu)}


def mtcnn_boxes(paths: list[str]) -> np.ndarray:
    """[N, 4] (x, y, w, h) of the face our detect stage would keep, NaN where none."""
    from pipeline.config import DetectParams
    from pipeline.detect import Face, choose_face
    from pipeline.images import load_rgb
    from pipeline.mtcnn_torch import TorchMTCNN

    params = DetectParams()
    mtcnn = TorchMTCNN(min_face_size=params.min_face_size, scale_factor=params.scale_factor,
                       thresholds=tuple(params.thresholds))
    boxes = np.full((len(paths), 4), np.nan)
    for start in range(0, len(paths), 32):
        chunk = paths[start:start + 32]
        images = [load_rgb(p)[0] for p in chunk]
        for k, (img, dets) in enumerate(zip(images, mtcnn.detect(images))):
            faces = [Face(tuple(float(v) for v in d.box), float(d.confidence), d.landmarks) for d in dets]
            face = choose_face(faces, img.shape[:2], params.min_confidence)
            if face is not None:
                boxes[start + k] = face.box
    return boxes


# --------------------------------------------------------------------- reference metric
def fold_threshold(dist: np.ndarray, same: np.ndarray, train: np.ndarray, *, ties: str = "low") -> float:
    """Distance threshold maximising accuracy (same iff d < t) on the ``train`` pairs.

    Written independently of ``pipeline.metrics``: candidates are the midpoints between
    consecutive sorted training distances plus one below and one above all of them; among
    equally accurate candidates ``ties="low"`` takes the smallest, ``"high"`` the largest
    (``pipeline.metrics`` takes the smallest SCORE threshold, i.e. the largest distance,
    so ``"high"`` must reproduce it exactly).
    """
    d, y = dist[train], same[train].astype(bool)
    u = np.unique(d)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    acc = np.asarray([np.mean((d < t) == y) for t in cands])
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[0] if ties == "low" else best[-1]])


def reference_protocol(dist: np.ndarray, same: np.ndarray, folds: np.ndarray, *, ties: str = "low") -> np.ndarray:
    """Per-fold accuracy (fold-id order), each fold's threshold chosen on the other folds."""
    accs = []
    for f in np.unique(folds):
        t = fold_threshold(dist, same, folds != f, ties=ties)
        accs.append(np.mean((dist[folds == f] < t) == same[folds == f].astype(bool)))
    return np.asarray(accs)


def fixed_threshold(dist: np.ndarray, same: np.ndarray, folds: np.ndarray, t: float) -> np.ndarray:
    return np.asarray([np.mean((dist[folds == f] < t) == same[folds == f].astype(bool)) for f in np.unique(folds)])


# --------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/work/shared/data/lfw-dev")
    ap.add_argument("--cache", default="/tmp/dlib_lfw_cache")
    ap.add_argument("--n-throughput", type=int, default=200)
    ap.add_argument("--no-cache", action="store_true", help="recompute everything")
    ap.add_argument("--remeasure", action="store_true", help="measure throughput again (other steps cached)")
    args = ap.parse_args()
    root, cache, use_cache = Path(args.root), Path(args.cache), not args.no_cache
    fresh_throughput = args.no_cache or args.remeasure

    data = load_lfw(root / "images", root / "pairs.txt")
    pairs, images = data.pairs, data.images
    paths = images["path"].tolist()
    index = {iid: k for k, iid in enumerate(images["image_id"])}
    i1 = pairs["image_id1"].map(index).to_numpy()
    i2 = pairs["image_id2"].map(index).to_numpy()
    same = pairs["same"].to_numpy().astype(int)
    folds = pairs["fold"].to_numpy()
    print(f"LFW sample: {len(pairs)} pairs in {len(np.unique(folds))} folds, {len(paths)} distinct images; "
          f"{os.cpu_count()} CPU cores")

    embedder = DlibFaceEmbedder()
    n = min(args.n_throughput, len(paths))
    print(f"\n[1] throughput on {n} images (HOG upsample 1, no jitter)")
    tp_single = cached(cache / f"throughput_single_{n}.npz", not fresh_throughput,
                       lambda: embed(DlibFaceEmbedder(workers=1), paths[:n], progress=False))
    tp_pool = cached(cache / f"throughput_pool{embedder.workers}_{n}.npz", not fresh_throughput,
                     lambda: embed(embedder, paths[:n], progress=False))
    print(f"  1 process: {n / float(tp_single['seconds']):.2f} img/s; pool of {embedder.workers}: "
          f"{n / float(tp_pool['seconds']):.2f} img/s; load average now {os.getloadavg()[0]:.1f} "
          f"(other jobs share these cores: CPU-ms/img is the load-independent figure)")

    print(f"\n[2] dlib recipe on all {len(paths)} images")
    hog = cached(cache / "hog_up1_j0.npz", use_cache, lambda: embed(embedder, paths))
    assert hog["paths"].tolist() == paths, "cache holds other images; rerun with --no-cache"
    cpu = f", {1000 * float(hog['cpu']) / len(paths):.0f} CPU-ms/img" if "cpu" in hog else ""
    print(f"  (this run, maybe cached: {float(hog['seconds']):.0f} s, {len(paths) / float(hog['seconds']):.2f} img/s"
          f" on {embedder.workers} workers{cpu})")
    missed = np.flatnonzero(~hog["ok"])
    print(f"  HOG found no face in {len(missed)} images: {[Path(paths[k]).name for k in missed[:8]]}"
          f"{' ...' if len(missed) > 8 else ''}")

    print(f"\n[3] the {len(missed)} images without a HOG face")
    missed_paths = [paths[k] for k in missed]
    boxes_m = cached(cache / "mtcnn_boxes_missed.npz", use_cache,
                     lambda: {"paths": np.asarray(missed_paths, dtype=str), "boxes": mtcnn_boxes(missed_paths)})
    assert boxes_m["paths"].tolist() == missed_paths, "cache holds other images; rerun with --no-cache"
    has_box = ~np.isnan(boxes_m["boxes"]).all(axis=1)
    print(f"  MTCNN found a face in {int(has_box.sum())} of them")
    fallback_m = cached(cache / "fallback_missed.npz", use_cache,
                        lambda: embed(embedder, missed_paths, boxes=boxes_m["boxes"], progress=False))
    up2_m = cached(cache / "hog_up2_missed.npz", use_cache,
                   lambda: embed(embedder, missed_paths, upsample=2, progress=False))
    print(f"  HOG with upsample 2 finds {int(up2_m['ok'].sum())} of them")

    def merged(extra: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        emb, ok = hog["embeddings"].copy(), hog["ok"].copy()
        emb[missed], ok[missed] = extra["embeddings"], extra["ok"]
        return emb, ok

    runs = {
        "HOG only": (hog["embeddings"], hog["ok"]),
        "HOG, else HOG upsample 2": merged(up2_m),
        "HOG, else MTCNN box": merged(fallback_m),
    }

    # How good is the MTCNN-box fallback where both exist? Distance between the HOG-box
    # and MTCNN-box descriptors of the same image, on the first 100 HOG-detected images.
    probe = [k for k in range(len(paths)) if hog["ok"][k]][:100]
    probe_paths = [paths[k] for k in probe]
    probe_boxes = cached(cache / "mtcnn_boxes_probe.npz", use_cache,
                         lambda: {"paths": np.asarray(probe_paths, dtype=str), "boxes": mtcnn_boxes(probe_paths)})
    def forced(k_list: list[int], boxes: np.ndarray) -> np.ndarray:
        """Descriptors from the MTCNN box even where HOG has a face."""
        out = np.full((len(k_list), 128), np.nan, dtype=np.float32)
        for j, k in enumerate(k_list):
            if not np.isnan(boxes[j]).all():
                out[j] = embedder.descriptor_in_box(load_rgb(paths[k])[0], tuple(boxes[j]))
        return out

    forced_emb = cached(cache / "forced_mtcnn_probe.npz", use_cache,
                        lambda: {"embeddings": forced(probe, probe_boxes["boxes"])})["embeddings"]
    d_same_img = np.linalg.norm(forced_emb - hog["embeddings"][probe], axis=1)
    d_same_img = d_same_img[np.isfinite(d_same_img)]
    print(f"  same image, HOG box vs MTCNN box descriptors: distance median {np.median(d_same_img):.3f}, "
          f"95th pct {np.percentile(d_same_img, 95):.3f}, max {d_same_img.max():.3f} "
          f"(dlib's same-person threshold: {DLIB_THRESHOLD})")

    norms = np.linalg.norm(hog["embeddings"][hog["ok"]], axis=1)
    print(f"  descriptor L2 norms: mean {norms.mean():.3f}, min {norms.min():.3f}, max {norms.max():.3f}")

    # ------------------------------------------------------------------------- table
    rows, checks = [], []
    for name, (emb, ok) in runs.items():
        complete = ok[i1] & ok[i2]
        lost = int((~complete).sum())
        a, b = emb[i1[complete]], emb[i2[complete]]
        y, f = same[complete], folds[complete]
        dist = np.linalg.norm(a.astype(np.float64) - b, axis=1)
        ref = reference_protocol(dist, y, f)
        rows.append((f"reference  {name}: pairs dropped", complete.sum(), lost, ref.mean(), ref.std()))
        # Lost pairs counted as errors: per fold, correct / all pairs of the fold.
        correct = [ref_acc * np.sum(f == fid) for ref_acc, fid in zip(ref, np.unique(f))]
        totals = [np.sum(folds == fid) for fid in np.unique(f)]
        as_err = np.asarray(correct) / np.asarray(totals)
        rows.append((f"reference  {name}: lost = wrong", len(pairs), lost, as_err.mean(), as_err.std()))
        fx = fixed_threshold(dist, y, f, DLIB_THRESHOLD)
        rows.append((f"reference  {name}: fixed d < {DLIB_THRESHOLD}", complete.sum(), lost, fx.mean(), fx.std()))
        for variant in [PairDistance("l2", normalize=False)] + [v for v in standard_variants()
                                                                if v.name != "l2_raw"]:
            res = lfw_accuracy(variant.scores(a, b), y, f)
            rows.append((f"ours       {name}: {variant.name}", complete.sum(), lost, res.mean, res.std))
            if variant.name == "l2_raw":
                same_rule = reference_protocol(dist, y, f, ties="high")
                checks.append(f"  {name}: reference with ties to the larger threshold "
                              f"{'==' if np.allclose(same_rule, res.accuracies) else '!='} pipeline.metrics l2_raw "
                              f"per fold ({100 * same_rule.mean():.2f} vs {100 * res.mean:.2f} %)")
        if name == "HOG, else MTCNN box":
            # The pairs HOG alone loses: how many does the fallback get right (per-fold thresholds)?
            lost_hog = ~(hog["ok"][i1] & hog["ok"][i2])
            pred = np.zeros(len(pairs), dtype=bool)
            dist_all = np.linalg.norm(emb[i1].astype(np.float64) - emb[i2], axis=1)
            for fid in np.unique(folds):
                pred[folds == fid] = dist_all[folds == fid] < fold_threshold(dist_all, same, folds != fid)
            right = int((pred == same.astype(bool))[lost_hog].sum())
            checks.append(f"  MTCNN-box fallback: {right} of the {int(lost_hog.sum())} pairs HOG alone loses are "
                          "classified correctly (threshold from the other folds)")

    print("\n| recipe | pairs scored | pairs lost | accuracy (mean +- std over folds) |")
    print("|---|---:|---:|---|")
    for label, scored, lost, mean, std in rows:
        print(f"| {label} | {scored} | {lost} | {100 * mean:.2f} +- {100 * std:.2f} % |")
    print("\n" + "\n".join(checks))


if __name__ == "__main__":
    main()
