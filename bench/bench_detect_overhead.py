"""Where ``TorchMTCNN.detect`` spends its time besides the networks, and how often it waits.

On ``--n`` real LFW photos (or synthetic faces when the LFW folder is absent), in batches
of ``--batch-size``, on the CPU, prints the time per image split into:

* network forward: the PNet/RNet/ONet module calls;
* the rest: pyramid resize (TF area resize as sparse matmuls), crops for RNet/ONet,
  NMS (the four ``package_nms`` calls: host sort for the package's tie order, overlaps),
  pixels to the device (stacking, normalising), results to the host, and what is left
  (box decoding and regression, thresholds, indexing, Python).

The split is measured with one thread (``TorchMTCNN(num_threads=1)``: the batch runs in the
calling thread, so every part can be timed with ``perf_counter`` around it); the best of
``--repeats`` rounds is shown. Then the same with all threads (total only), and the host
syncs per batch: the calls that would make the host wait for a GPU (copies to the host,
data-sized results such as ``nonzero``), counted with :mod:`pipeline.torch_audit`, by call
site. Figures only, no pass/fail.

    .venv/bin/python bench/bench_detect_overhead.py --n 96 --batch-size 32
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cpu  # noqa: E402

cpu.pin_instruction_set()  # the kernels the pipeline runs, before numpy/torch load

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw-dev" / "images"


def load_images(images_dir: Path, n: int) -> tuple[str, list[np.ndarray]]:
    """First image of each of the first ``n`` sorted identities, or synthetic faces."""
    if images_dir.is_dir():
        import cv2

        people = sorted(p for p in images_dir.iterdir() if p.is_dir())[:n]
        files = [sorted(p.glob("*.jpg"))[0] for p in people]
        return f"LFW photos from {images_dir}", [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    from pipeline.datasets import synthetic

    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        identity, variation = synthetic.sample_identity(rng, "a"), synthetic.sample_variation(rng, "a")
        out.append(synthetic.render_face(identity, variation, 250))
    return f"synthetic faces ({images_dir} not found)", out


class Timers:
    """Wraps callables of a detector so each adds its wall time to a named bucket."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(detector, module) -> Timers:
    timers = Timers()
    for net in ("pnet", "rnet", "onet"):
        mod = getattr(detector, net)
        mod.forward = timers.wrap(net, mod.forward)
    for name, attr in (("pyramid resize", "_resize_area"), ("crops", "_crops"),
                       ("pixels to device", "_batches"), ("results to host", "_to_detections")):
        setattr(detector, attr, timers.wrap(name, getattr(detector, attr)))
    module.package_nms = timers.wrap("NMS", module.package_nms)
    return timers


def run(detector, images: list[np.ndarray], batch_size: int) -> float:
    start = time.perf_counter()
    for c in range(0, len(images), batch_size):
        detector.detect(images[c:c + batch_size])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images-dir", type=Path, default=LFW)
    args = ap.parse_args()

    import torch

    from pipeline import mtcnn_torch
    from pipeline.torch_audit import TorchAudit

    source, images = load_images(args.images_dir, args.n)
    sizes = sorted({img.shape[:2] for img in images})
    n, bs = len(images), args.batch_size
    threads = cpu.thread_count()
    print(f"{n} {source}; sizes {', '.join(f'{h}x{w}' for h, w in sizes[:4])}{' ...' if len(sizes) > 4 else ''}; "
          f"batches of {bs}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {platform.machine()}, kernels {cpu.kernels()}, {threads} threads available, "
          f"device cpu, load average {load}")

    serial = mtcnn_torch.TorchMTCNN(device="cpu", num_threads=1)
    found = sum(len(d) for d in serial.detect(images[:bs]))  # warm-up (area matrices, allocator)
    plain_nms = mtcnn_torch.package_nms
    timers = instrument(serial, mtcnn_torch)
    best_total, best_split, best_calls = float("inf"), {}, {}
    for _ in range(args.repeats):
        timers.reset()
        total = run(serial, images, bs)
        if total < best_total:
            best_total, best_split, best_calls = total, dict(timers.seconds), dict(timers.calls)
    mtcnn_torch.package_nms = plain_nms

    def ms(seconds: float) -> str:
        return f"{1000 * seconds / n:7.2f} ms  {100 * seconds / best_total:5.1f}%"

    nets = sum(best_split.get(k, 0.0) for k in ("pnet", "rnet", "onet"))
    rest_parts = ["pyramid resize", "crops", "NMS", "pixels to device", "results to host"]
    left = best_total - nets - sum(best_split.get(k, 0.0) for k in rest_parts)
    print(f"\n1 thread, best of {args.repeats} rounds: {1000 * best_total / n:.2f} ms per image "
          f"({n / best_total:.1f} images/s; {found} faces in the first batch)")
    print(f"  network forward                 {ms(nets)}")
    for k in ("pnet", "rnet", "onet"):
        print(f"    {k.upper():<28}{ms(best_split.get(k, 0.0))}  ({best_calls.get(k, 0)} forwards)")
    print(f"  rest                            {ms(best_total - nets)}")
    for k in rest_parts:
        print(f"    {k:<28}{ms(best_split.get(k, 0.0))}  ({best_calls.get(k, 0)} calls)")
    print(f"    {'other (decode, regress, ...)':<28}{ms(left)}")

    if threads > 1:
        wide = mtcnn_torch.TorchMTCNN(device="cpu", num_threads=threads)
        wide.detect(images[:bs])
        total = min(run(wide, images, bs) for _ in range(args.repeats))
        print(f"\n{threads} threads ({threads} parts per batch), best of {args.repeats}: "
              f"{1000 * total / n:.2f} ms per image ({n / total:.1f} images/s)")

    fresh = mtcnn_torch.TorchMTCNN(device="cpu", num_threads=1)
    batches = [images[c:c + bs] for c in range(0, n, bs)]
    with TorchAudit("cpu") as audit:
        for batch in batches:
            fresh.detect(batch)
    print(f"\nhost syncs (would block on a GPU): {audit.syncs} in {len(batches)} batches, "
          f"{audit.syncs / len(batches):.1f} per batch, {audit.syncs / n:.2f} per image")
    for kind, count in sorted(audit.counts.items()):
        print(f"  {kind:<16}{count / len(batches):6.1f} per batch")
    print("by call site (per batch):")
    for (kind, site), count in sorted(audit.sites.items(), key=lambda kv: kv[0][1]):
        print(f"  {count / len(batches):5.1f}  {kind:<16}{site}")
    mixed = [images[0], np.ascontiguousarray(images[1][:200, :180]), images[2], np.zeros((300, 300, 3), np.uint8)]
    with TorchAudit("cpu") as audit:
        fresh.detect(mixed)
    print(f"a batch of 4 images of 3 sizes: {audit.syncs} host syncs")


if __name__ == "__main__":
    main()
