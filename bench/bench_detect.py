"""Throughput of the detect stage on real LFW photos: ``mtcnn`` package vs ``TorchMTCNN``.

Prints images/s for the package one image per call, the package batched (a list of
arrays per call) and ``TorchMTCNN.detect`` batched, their ratios, and how often the two
batched detectors agree (same face count and main-face box IoU >= 0.9). Then the
detect stage itself (``pipeline.detect.detect_set``: reading and decoding the files,
detection, choice of the central face) on the same files, and its ratio to the
package's batched mode, which is given its images already decoded.

With ``--coverage`` the stage then runs over every image under ``--images-dir`` and
prints the share in which it found a face.

``--device cuda --torch-only`` times ``TorchMTCNN`` on a GPU alone (no TensorFlow
package, no per-image run), and the detect stage on the GPU once ``DetectParams`` has a
``device`` field (until then it says so and times the stage on the CPU).
``--synthetic N`` uses N faces from the built-in generator (250x250 JPEGs written to a
temporary folder) instead of LFW, for machines without the LFW sample.

    .venv/bin/python bench/bench_detect.py --n 200 --batch-size 32
    .venv/bin/python bench/bench_detect.py --n 500 --coverage
    .venv/bin/python bench/bench_detect.py --synthetic 512 --device cuda --torch-only --batch-size 64

The batched runs alternate (package, torch, package, torch, ...) for ``--repeats`` rounds
so that both see the same machine load; the figure reported is each one's best round.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_PACKAGE_DETECTOR = None


def package_detect(images: list[np.ndarray], batch_size: int) -> list[list[dict]]:
    """The ``mtcnn`` package's batched reference: ``MTCNN().detect_faces(list_of_arrays)``
    on consecutive chunks of ``batch_size`` HxWx3 uint8 RGB images; one list of dicts per image."""
    global _PACKAGE_DETECTOR
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive int")
    if _PACKAGE_DETECTOR is None:
        from mtcnn import MTCNN

        _PACKAGE_DETECTOR = MTCNN()
    out: list[list[dict]] = []
    for c in range(0, len(images), batch_size):
        out.extend(_PACKAGE_DETECTOR.detect_faces(list(images[c:c + batch_size])))
    return out


def load_lfw(images_dir: Path, n: int) -> tuple[list[Path], list[np.ndarray]]:
    """First ``n`` images in sorted (identity, file) order, taking each identity's first image
    before any second one. Returns the files and their HxWx3 uint8 RGB arrays."""
    import cv2

    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} not found; expected LFW as <dir>/<Name>/<Name>_NNNN.jpg")
    per_id = [sorted(p for p in d.iterdir() if p.suffix.lower() == ".jpg")
              for d in sorted(images_dir.iterdir()) if d.is_dir()]
    files: list[Path] = []
    rank = 0
    while len(files) < n and any(len(f) > rank for f in per_id):
        files += [f[rank] for f in per_id if len(f) > rank][: n - len(files)]
        rank += 1
    if len(files) < n:
        raise ValueError(f"--n {n}: only {len(files)} images under {images_dir}")
    out = []
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{f} could not be decoded as an image")
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return files, out


def synthetic_images(n: int, folder: Path, size: int = 250) -> tuple[list[Path], list[np.ndarray]]:
    """``n`` faces from the built-in generator (one per identity, seeded), saved as JPEGs in
    ``folder/<identity>/0.jpg`` for the stage, and their decoded RGB arrays (as the stage sees them)."""
    import cv2

    from pipeline.datasets import synthetic

    rng = np.random.default_rng(0)
    files, out = [], []
    for k in range(n):
        face = synthetic.render_face(synthetic.sample_identity(rng, "a"), synthetic.sample_variation(rng, "a"), size)
        path = folder / f"id{k:05d}" / "0.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(face, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        files.append(path)
        out.append(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return files, out


def stage_frame(files: list[Path]):
    """The detect stage's input: one row per image (``image_id``, ``path``, ``identity``)."""
    import pandas as pd

    return pd.DataFrame({"image_id": [f"{f.parent.name}/{f.name}" for f in files],
                         "path": [str(f) for f in files],
                         "identity": [f.parent.name for f in files]})


def run_stage(files: list[Path], batch_size: int, progress: bool = False, device: str = "cpu"):
    """(seconds, detect_set output) of the detect stage with default params on ``files``.

    ``device`` goes to ``DetectParams.device`` where that field exists; otherwise the stage
    runs where it always has (the CPU)."""
    from pipeline.config import DetectParams
    from pipeline.detect import TorchDetector, detect_set

    extra = {"device": device} if "device" in DetectParams.model_fields else {}
    params = DetectParams(batch_size=batch_size, **extra)
    detector = TorchDetector(params)
    frame = stage_frame(files)
    t = time.perf_counter()
    out = detect_set(frame, detector, params, progress=progress)
    return time.perf_counter() - t, out


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def agreement(ref: list[list[dict]], got: list[list[dict]]) -> tuple[float, list[int]]:
    """Fraction of images with equal face counts and (if any) main-face IoU >= 0.9; failing indices."""
    bad = []
    for k, (r, g) in enumerate(zip(ref, got)):
        if len(r) != len(g):
            bad.append(k)
        elif r:
            main_r = max(r, key=lambda d: d["confidence"])
            main_g = max(g, key=lambda d: d["confidence"])
            if _iou(main_r["box"], main_g["box"]) < 0.9:
                bad.append(k)
    return 1.0 - len(bad) / max(len(ref), 1), bad


def _same(ref: list[dict], got: list[dict]) -> bool:
    """Same faces in the same order: equal int boxes and keypoints, confidences within 1e-4."""
    return len(ref) == len(got) and all(
        list(r["box"]) == list(g["box"]) and abs(float(r["confidence"]) - g["confidence"]) < 1e-4
        and {k: list(map(int, v)) for k, v in r["keypoints"].items()} == g["keypoints"]
        for r, g in zip(ref, got))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of LFW images")
    ap.add_argument("--images-dir", type=Path, default=Path("/work/shared/data/lfw-dev/images"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--per-image-n", type=int, default=50,
                    help="images for the (slow) package one-image-per-call run; 0 skips it")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds of the two batched runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--coverage", action="store_true",
                    help="also run the detect stage over every image in --images-dir and report the share found")
    ap.add_argument("--device", default="cpu", help="torch device for TorchMTCNN (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--torch-only", action="store_true",
                    help="time TorchMTCNN and the stage only (no mtcnn/TensorFlow package runs)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="use N generated faces instead of LFW images")
    args = ap.parse_args()
    if args.n < 1 or args.batch_size < 1 or args.repeats < 1:
        ap.error("--n, --batch-size and --repeats must be positive")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import torch

    from pipeline.mtcnn_torch import TorchMTCNN, to_package_format

    if args.device.startswith("cuda"):  # say why before spending time on images
        from pipeline.train import TrainingError, pick_device

        try:
            pick_device("cuda", key="--device")
        except TrainingError as err:
            sys.exit(f"bench_detect: {err}")
    if args.synthetic:
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        files, images = synthetic_images(args.synthetic, Path(tmp.name))
        args.images_dir = Path(tmp.name)
    else:
        files, images = load_lfw(args.images_dir, args.n)
    detector = TorchMTCNN(num_threads=args.threads, device=args.device)
    if args.torch_only:
        torch_only(detector, files, images, args)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mode = (f"{detector.num_threads} worker threads x 1 torch thread" if detector.num_threads > 1
            else "1 thread")
    print(f"machine: {_cpu_name()}, {cores} cores usable, load average at start {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}: TorchMTCNN uses {mode} (torch.get_num_threads() outside detect: "
          f"{torch.get_num_threads()}); TensorFlow: default thread pools (all cores)")
    print(f"images: {len(images)} from {args.images_dir} ({images[0].shape[1]}x{images[0].shape[0]} first), "
          f"batch size {args.batch_size}")

    def run_torch() -> list[list[dict]]:
        out: list[list[dict]] = []
        for c in range(0, len(images), args.batch_size):
            out.extend([[to_package_format(d) for d in dets] for dets in detector.detect(images[c:c + args.batch_size])])
        return out

    # warm-up (TF graph tracing, oneDNN primitive creation) on one batch each
    package_detect(images[: args.batch_size], args.batch_size)
    detector.detect(images[: args.batch_size])
    from mtcnn import MTCNN  # TensorFlow is already loaded by package_detect

    single = MTCNN()
    single.detect_faces(images[0])

    rows: dict[str, float] = {}
    single_ref: list[list[dict]] = []
    if args.per_image_n > 0:
        sub = images[: args.per_image_n]
        dt, single_ref = _timed(lambda: [single.detect_faces(img) for img in sub])
        rows["package, one image per call"] = len(sub) / dt

    best_pkg = best_torch = float("inf")
    ref = got = None
    for _ in range(args.repeats):
        dt, ref = _timed(lambda: package_detect(images, args.batch_size))
        best_pkg = min(best_pkg, dt)
        dt, got = _timed(run_torch)
        best_torch = min(best_torch, dt)
    rows[f"package batched (batch {args.batch_size})"] = len(images) / best_pkg
    rows[f"TorchMTCNN batched (batch {args.batch_size})"] = len(images) / best_torch

    for name, ips in rows.items():
        print(f"  {name:40s} {ips:8.2f} images/s")
    pkg_b = rows[f"package batched (batch {args.batch_size})"]
    print(f"TorchMTCNN / package batched:           {rows[f'TorchMTCNN batched (batch {args.batch_size})'] / pkg_b:.2f}x")
    if args.per_image_n > 0:
        print(f"package batched / package per image:    {pkg_b / rows['package, one image per call']:.2f}x")
    frac, bad = agreement(ref, got)
    exact = sum(_same(r, g) for r, g in zip(ref, got))
    print(f"agreement (same count, main-face IoU >= 0.9): {frac:.4f} ({len(images) - len(bad)}/{len(images)}); "
          f"identical rounded boxes+keypoints: {exact}/{len(images)}")
    if bad:
        print(f"  disagreeing image indices: {bad[:20]}")
    if single_ref:
        frac1, _ = agreement(single_ref, got)
        exact1 = sum(_same(r, g) for r, g in zip(single_ref, got))
        pkg_self = sum(_same(r, g) for r, g in zip(single_ref, ref))
        print(f"vs the package one image per call (first {len(single_ref)}): agreement {frac1:.4f}, "
              f"TorchMTCNN identical {exact1}/{len(single_ref)}, package batched identical {pkg_self}/{len(single_ref)}")

    stage_s, stage_out = run_stage(files, args.batch_size)
    stage_rate = len(files) / stage_s
    found = int((stage_out["status"] == "ok").sum())
    print(f"detect stage (read + decode + detect + choose face, batch {args.batch_size}): {stage_rate:.2f} images/s, "
          f"{stage_rate / pkg_b:.2f}x the package batched on pre-decoded images; face found in {found}/{len(files)}")
    if args.coverage:
        every = sorted(args.images_dir.glob("*/*.jpg"))
        cov_s, cov_out = run_stage(every, args.batch_size, progress=sys.stderr.isatty())
        ok = cov_out["status"] == "ok"
        print(f"coverage: the detect stage found a face in {int(ok.sum())}/{len(every)} images "
              f"({100 * ok.mean():.2f}%) of {args.images_dir} at {len(every) / cov_s:.1f} images/s")
        for _, row in cov_out[~ok].iterrows():
            print(f"  dropped {row['image_id']}: {row['reason']}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


def torch_only(detector, files: list[Path], images: list[np.ndarray], args) -> None:
    """TorchMTCNN images/s on ``detector.device`` (best of ``--repeats``), then the stage."""
    import torch

    print(f"torch {torch.__version__}; TorchMTCNN on {detector.device}"
          + (f" ({torch.cuda.get_device_name(detector.device)})" if detector.device.type == "cuda" else "")
          + f"; {len(images)} images ({images[0].shape[1]}x{images[0].shape[0]} first), batch {args.batch_size}")
    detector.detect(images[: args.batch_size])  # warm-up: kernels, cuDNN, allocator
    best = float("inf")
    found = 0
    for _ in range(args.repeats):
        t = time.perf_counter()
        found = 0
        for c in range(0, len(images), args.batch_size):
            found += sum(bool(d) for d in detector.detect(images[c:c + args.batch_size]))
        best = min(best, time.perf_counter() - t)
    print(f"  TorchMTCNN.detect batched on {detector.device}: {len(images) / best:8.1f} images/s "
          f"(best of {args.repeats}), faces found in {found}/{len(images)}")
    from pipeline.config import DetectParams

    if "device" not in DetectParams.model_fields and detector.device.type != "cpu":
        print("  detect stage: DetectParams has no `device` field yet, so the stage below runs on the CPU")
    stage_s, stage_out = run_stage(files, args.batch_size, device=str(detector.device))
    print(f"  detect stage (read + decode + detect + choose face): {len(files) / stage_s:8.1f} images/s, "
          f"face found in {int((stage_out['status'] == 'ok').sum())}/{len(files)}")


if __name__ == "__main__":
    main()
