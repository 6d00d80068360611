"""The data feed of training: which images train and validate, in which batches, and how their pixels arrive.

* Split: by image, ``val_fraction`` of each identity's images (seeded by the data seed);
  validation pairs are all same-identity pairs of validation images and as many random
  different-identity ones (:func:`split_train_val`, :func:`validation_pairs`).
* Batches: shuffled global batches of which each process takes its slice, or P x K batches
  from :class:`pipeline.samplers.PKBatchSampler` (:func:`epoch_batches`), each step's
  randomness derived from ``(seed, epoch)``.
* Pixels: decoded once up front or per batch from the JPEG bytes (:func:`batch_source`), by a
  pool of threads that prepares the next batches while one trains (:class:`BatchPrefetcher`),
  the machine's threads shared by its training processes (:func:`decode_threads`).
* Input: uint8 ``[B, H, W, 3]`` to the model's float ``[B, C, H, W]`` with the augmentation
  (:func:`batch_input`) and flips as a selection (:func:`flip_rows`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline import augment, cpu
from pipeline.config import AugmentParams, TrainParams
from pipeline.shards import FaceShards, join_location, read_shards
from pipeline.training.distributed import Distributed
from pipeline.training.setup import TrainingError


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation images: ``val_fraction`` of each identity.

    An identity with fewer than 3 images stays wholly in training; every identity
    keeps at least 2 training images.
    """
    rng = np.random.default_rng([seed, 7])
    train_idx, val_idx = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        n_val = int(round(len(members) * val_fraction)) if len(members) >= 3 else 0
        n_val = min(n_val, len(members) - 2)
        val_idx.extend(members[:n_val])
        train_idx.extend(members[n_val:])
    return np.sort(np.asarray(train_idx, dtype=np.int64)), np.sort(np.asarray(val_idx, dtype=np.int64))


def validation_pairs(labels: np.ndarray, seed: int, max_pairs: int = 6000) -> np.ndarray:
    """``[M, 3]`` (i, j, same) pairs over validation images: positives and as many negatives."""
    rng = np.random.default_rng([seed, 11])
    positives = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                positives.append((members[a], members[b], 1))
    positives = np.asarray(positives, dtype=np.int64).reshape(-1, 3)
    if len(positives) > max_pairs // 2:
        positives = positives[rng.choice(len(positives), max_pairs // 2, replace=False)]
    n_neg = max(len(positives), 1)
    negatives = []
    several_classes = len(np.unique(labels)) > 1  # once: at CASIA scale it costs seconds per call
    while len(negatives) < n_neg and several_classes:
        i, j = rng.integers(0, len(labels), 2)
        if labels[i] != labels[j]:
            negatives.append((i, j, 0))
    return np.concatenate([positives, np.asarray(negatives, dtype=np.int64).reshape(-1, 3)])


def validation_subset(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(needed, pairs')``: the sorted validation positions that ``pairs`` [M, 3] use, and the
    pairs re-indexed into ``needed``, so only those images are decoded and embedded."""
    needed, where = np.unique(pairs[:, :2], return_inverse=True)
    return needed, np.column_stack([where.reshape(-1, 2), pairs[:, 2]]).astype(np.int64)


def selection_set(shards_dir: str | Path, name: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(images [M, H, W, 3] uint8, pairs [P, 3])`` of test set ``name`` for ``train.select_on``:
    the pairs of its ``pairs.csv`` whose two images survived detection, re-indexed into the
    images they use (only those are decoded)."""
    location = join_location(shards_dir, name)
    data = read_shards(location)
    if data.pairs is None or not len(data.pairs):
        raise TrainingError(f"train.select_on = {name!r}: {location} has no verification pairs (pairs.csv)")
    position = {image_id: k for k, image_id in enumerate(data.image_ids)}
    first, second = data.pairs["image_id1"].map(position), data.pairs["image_id2"].map(position)
    keep = (first.notna() & second.notna()).to_numpy()
    pairs = np.column_stack([first[keep].astype(np.int64), second[keep].astype(np.int64),
                             data.pairs["same"].to_numpy()[keep].astype(np.int64)]).reshape(-1, 3)
    if len(np.unique(pairs[:, 2])) < 2:
        raise TrainingError(f"train.select_on = {name!r}: {location} has {len(pairs)} pairs with both images, "
                            "not both same and different ones; the AUC that chooses the epoch needs both")
    needed, remapped = validation_subset(pairs)
    return torch.from_numpy(data.decode_all(needed)), remapped


def to_input(batch_uint8: torch.Tensor, *, grayscale: bool) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, C, H, W]`` float in about [-1, 1] (C = 1 if grayscale)."""
    return scale_input(batch_uint8.permute(0, 3, 1, 2).float(), grayscale=grayscale)


def scale_input(x: torch.Tensor, *, grayscale: bool) -> torch.Tensor:
    """``[B, 3, H, W]`` float pixel values (0..255) -> the model's input (see :func:`to_input`)."""
    if grayscale:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    return (x - 127.5) / 128.0


def batch_input(images: torch.Tensor, draws: torch.Tensor | None, augment_params: AugmentParams, *,
                grayscale: bool) -> torch.Tensor:
    """The model input of a training batch ``[B, H, W, 3]`` uint8 (on the training device) before
    the flips: augmented with ``draws`` ``[B, N]`` (see :mod:`pipeline.augment`), or, when
    ``draws`` is None (nothing but the flip on), exactly :func:`to_input`, as before augmentation existed."""
    if draws is None:
        return to_input(images, grayscale=grayscale)
    return scale_input(augment.apply(images.permute(0, 3, 1, 2).float(), draws, augment_params),
                       grayscale=grayscale)


def batch_layout(params: TrainParams, processes: int, pk: bool) -> tuple[int, int]:
    """``(global batch, images per process)`` of a step; see :class:`pipeline.config.TrainParams`."""
    if pk:  # P x K losses: every process draws its own whole P x K batch
        per = params.pk_identities * params.pk_images
        return per * processes, per
    if params.batch_per_device:
        return params.batch_per_device * processes, params.batch_per_device
    if params.batch_size % processes:
        raise TrainingError(f"train.batch_size = {params.batch_size} must be divisible by the {processes} processes "
                            f"(or set train.batch_per_device)")
    return params.batch_size, params.batch_size // processes


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Every training label in [0, num_classes): checked once on the host, so the loss need not
    read each batch's labels back from the GPU."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise TrainingError(f"{where}: label {bad} is outside [0, {num_classes - 1}]; rerun the shard stage")


def flip_rows(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror (along the width) the images of ``x`` [B, C, H, W] where ``flips`` [B] is True; in place.

    A selection rather than ``x[flips] = ...``: boolean indexing must read how many flips
    there are back to the host, which stalls a GPU every step. Same values and layout."""
    return x.copy_(torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x))



def epoch_batches(epoch: int, n_train: int, global_batch: int, sampler, steps: int, generator: torch.Generator,
                   dist: Distributed) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(indices, flip mask)`` per step; identical draws on every rank."""
    if sampler is not None:  # P x K: each rank gets its own whole P x K batches
        sampler.set_epoch(epoch)
        global_batches = [torch.as_tensor(b, dtype=torch.long) for b in list(sampler)[:steps]]
        return [(b, torch.rand(len(b), generator=generator) < 0.5) for b in global_batches]
    order = torch.randperm(n_train, generator=generator)
    out = []
    per_rank = global_batch // dist.world
    for k in range(steps):
        batch = order[k * global_batch : (k + 1) * global_batch]
        flips = torch.rand(len(batch), generator=generator) < 0.5
        lo = dist.rank * per_rank
        out.append((batch[lo : lo + per_rank], flips[lo : lo + per_rank]))
    return out


Fill = Callable[[np.ndarray, np.ndarray], None]  # (out [n, H, W, 3] uint8, record indices [n]) -> None


def batch_source(data: FaceShards, mode: str, *, processes_per_machine: int = 1) -> tuple[str, Fill]:
    """How training batches get their pixels: ``("upfront" | "per_batch", fill)``.

    ``upfront`` decodes every image once into one uint8 array and copies batches out of
    it (fastest; needs H*W*3 bytes per image); ``per_batch`` keeps only the JPEG bytes and
    decodes each batch when it is needed (a fraction of the memory; CASIA-WebFace at 112 px
    is 17 GB decoded). ``auto`` takes ``upfront`` when the decoded set fits in a quarter of
    the available memory (at most 8 GiB), shared by the training processes on this machine.
    Decoding is exact, so both give the same bits and the same trained model.
    """
    if mode == "auto":
        decoded_bytes = len(data) * math.prod(data.image_shape())
        budget = min(8 * 2**30, _available_memory() // 4) // max(1, processes_per_machine)
        mode = "upfront" if decoded_bytes <= budget else "per_batch"
    if mode == "upfront":
        decoded = data.decode_all()

        def copy_out(out: np.ndarray, records: np.ndarray) -> None:
            np.take(decoded, records, axis=0, out=out)

        return mode, copy_out
    if mode == "per_batch":
        return mode, data.decode_into
    raise ValueError(f"train.decode = {mode!r}; expected auto, upfront or per_batch")


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with DVC; this is only a fallback
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class BatchPrefetcher:
    """Fill the next batches on worker threads while the current batch trains.

    With ``fill`` from :func:`batch_source` in ``per_batch`` mode only the encoded shards
    stay in memory and each rank decodes just its own slice of each global batch (OpenCV
    releases the GIL, so the threads use several cores).

    Args:
        fill: writes the pixels of some records into a batch slice (see :func:`batch_source`).
        shape: ``(H, W, 3)`` of one image.
        records: ``[n_train]`` record index in the shards of each training position.
        labels: ``[n_train]`` int64 class of each training position.
        batches: this rank's ``(positions, flips)`` per step (see :func:`epoch_batches`).
        workers: filling threads; ``depth``: batches prepared ahead of the one training.
        pin: allocate page-locked batches (CUDA), so the copy to the GPU can be non-blocking.

    Iterating yields ``(images [B, H, W, 3] uint8, labels [B] int64, flips [B] bool)``;
    ``wait_seconds`` is how long the trainer waited for its batches.
    """

    def __init__(self, fill: Fill, shape: tuple[int, ...], records: np.ndarray, labels: torch.Tensor,
                 batches: list[tuple[torch.Tensor, torch.Tensor]], *, workers: int, depth: int = 3,
                 pin: bool = False, chunk: int = 16) -> None:
        self.fill, self.shape, self.records, self.labels, self.batches = fill, tuple(shape), records, labels, batches
        self.workers, self.depth, self.pin, self.chunk = max(1, workers), max(1, depth), pin, max(1, chunk)
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        upcoming = iter(self.batches)
        pending: deque = deque()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode") as pool:

            def submit() -> None:
                positions, flips = next(upcoming)
                records = self.records[positions.numpy()]
                images = torch.empty((len(records), *self.shape), dtype=torch.uint8, pin_memory=self.pin)
                pixels = images.numpy()
                parts = [pool.submit(self.fill, pixels[a : a + self.chunk], records[a : a + self.chunk])
                         for a in range(0, len(records), self.chunk)]
                pending.append((images, self.labels[positions], flips, parts))

            for _ in range(min(self.depth, len(self.batches))):
                submit()
            while pending:
                images, labels, flips, parts = pending.popleft()
                started = time.perf_counter()
                for part in parts:
                    part.result()
                self.wait_seconds += time.perf_counter() - started
                if len(pending) < self.depth:
                    try:
                        submit()
                    except StopIteration:
                        pass
                yield images, labels, flips



def decode_threads(workers: int, local_processes: int, threads: int | None = None) -> int:
    """Threads that fill one process's batches: ``train.workers`` when set (per process), else
    this machine's threads (``threads``, default :func:`pipeline.cpu.thread_count`) shared by the
    ``local_processes`` training processes on it, at least one each."""
    if workers:
        return workers
    return max(1, (cpu.thread_count() if threads is None else threads) // max(1, local_processes))
