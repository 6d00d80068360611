"""Training input throughput: facepipe's shards vs torchvision ``ImageFolder``.

Both sides deliver the same thing the trainer consumes: shuffled batches of
``[B, 3, H, W]`` float tensors in [-1, 1] with a random horizontal flip, from the same
aligned faces (the shard stage's Parquet shards vs the align stage's JPEG folders).

* shards: what ``pipeline.train`` does (``BatchPrefetcher``), in both of its input modes:
  ``upfront`` decodes every JPEG once into a uint8 array and copies batches out of it;
  ``per_batch`` keeps only the JPEG bytes and decodes each batch on worker threads
  while the previous one is consumed; then flip and normalise;
* ImageFolder: ``DataLoader(ImageFolder(root, transforms), shuffle=True, num_workers=W)``
  with ``RandomHorizontalFlip`` + ``PILToTensor`` + the same normalisation, decoding
  every image every epoch, as most face-recognition training code does.

Images/s are reported for the first epoch (includes reading and decoding for both) and
for the later ones (steady state), and their ratio.

    .venv/bin/python bench/bench_input.py --aligned .runs/lfw-dev/data/aligned/train \\
        --shards .runs/lfw-dev/data/shards/train --workers 2 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.shards import read_shards  # noqa: E402
from pipeline.train import BatchPrefetcher, batch_source, to_input  # noqa: E402


def shard_epochs(shards_dir: Path, epochs: int, batch: int, threads: int, mode: str) -> list[tuple[int, float]]:
    """(images, seconds) per epoch through the trainer's own input path (``train.decode = mode``)."""
    torch.set_num_threads(threads)
    out = []
    t0 = time.perf_counter()
    data = read_shards(shards_dir)
    _, fill = batch_source(data, mode)
    records = np.arange(len(data))
    labels = torch.from_numpy(data.labels)
    setup_s = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(data), generator=generator)
        batches = [(order[k : k + batch], torch.rand(batch, generator=generator) < 0.5)
                   for k in range(0, len(order) - batch + 1, batch)]
        seen = 0
        for images, y, flips in BatchPrefetcher(fill, data.image_shape(), records, labels, batches, workers=threads):
            x = to_input(images, grayscale=False)
            x[flips] = x[flips].flip(-1)
            seen += len(y)
        out.append((seen, time.perf_counter() - t0 + (setup_s if epoch == 0 else 0.0)))
    return out


def imagefolder_epochs(root: Path, epochs: int, batch: int, workers: int) -> list[tuple[int, float]]:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
        transforms.Lambda(lambda t: (t.float() - 127.5) / 128.0),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        seen = 0
        for x, _y in loader:
            seen += len(x)
        out.append((seen, time.perf_counter() - t0))
    return out


def rate(runs: list[tuple[int, float]]) -> float:
    images = sum(n for n, _ in runs)
    seconds = sum(s for _, s in runs)
    return images / seconds if seconds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", type=Path, required=True,
                        help="aligned/<set> of the align stage (packed parts are unpacked to a temporary ImageFolder)")
    parser.add_argument("--shards", type=Path, required=True, help="the same set's shards: shards/<set>")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers for ImageFolder, and torch threads for the shard path")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    for path in (args.aligned, args.shards):
        if not path.is_dir():
            raise SystemExit(f"bench_input: {path}: not a directory; run the pipeline (dvc repro shard) first")

    threads = max(1, args.workers)
    root = args.aligned
    if any(root.glob("part-*.parquet")):  # the align stage's packed layout: unpack an ImageFolder copy
        import tempfile

        from pipeline.align import unpack_aligned

        root = Path(tempfile.mkdtemp(prefix="bench-input-"))
        print(f"unpacked {unpack_aligned(args.aligned, root)} faces of {args.aligned} into {root}")
    folder = imagefolder_epochs(root, args.epochs, args.batch_size, args.workers)
    runs = {"ImageFolder": folder}
    for mode in ("upfront", "per_batch"):
        runs[f"shards {mode}"] = shard_epochs(args.shards, args.epochs, args.batch_size, threads, mode)
    print(f"machine: {os.cpu_count()} cores; {folder[0][0]} images/epoch, batch {args.batch_size}, "
          f"{args.workers} workers/threads, {args.epochs} epochs")
    print(f"{'input':<20}{'epoch 1 img/s':>15}{'later img/s':>14}{'all img/s':>12}")
    for name, epochs in runs.items():
        later = rate(epochs[1:]) if len(epochs) > 1 else float("nan")
        print(f"{name:<20}{rate(epochs[:1]):>15.0f}{later:>14.0f}{rate(epochs):>12.0f}")
    data = read_shards(args.shards)
    encoded = sum(len(b) for b in data.images)
    decoded = len(data) * int(np.prod(data.image_shape()))
    print(f"training images held in memory: per_batch {encoded / 2**20:.1f} MiB of JPEG bytes, "
          f"upfront {decoded / 2**20:.1f} MiB decoded ({decoded / encoded:.1f}x), for {len(data)} faces")
    for mode in ("upfront", "per_batch"):
        shards = runs[f"shards {mode}"]
        print(f"ratio shards {mode}/ImageFolder: epoch 1 {rate(shards[:1]) / rate(folder[:1]):.1f}x, "
              f"later epochs {rate(shards[1:]) / rate(folder[1:]):.1f}x, "
              f"{args.epochs} epochs {rate(shards) / rate(folder):.1f}x")

if __name__ == "__main__":
    main()
