"""Stage ``train@LOSS``: train one embedding model with one loss.

* Data: the ``train`` shards, split by image into train/validation (``val_fraction``
  of each identity's images, seeded). Validation pairs (all same-identity pairs of
  validation images, and as many random different-identity pairs) give the
  verification AUC that picks the best epoch.
* Optimisation: SGD (momentum, weight decay) over the network and the loss's own
  parameters (class weights); linear warm-up then cosine or step decay, per step.
  Horizontal flips, optional grayscale. Classifier losses see shuffled batches;
  pair/triplet losses see P x K batches (P identities x K images).
* Robustness: a checkpoint after every epoch (model, loss, optimiser, schedule, step,
  best score) in ``checkpoint_dir``; rerunning the stage resumes from it when it was
  made with the same settings. Each epoch's randomness is derived from
  ``(seed, epoch)``, so a resumed run ends exactly where an uninterrupted one does
  on CPU. A NaN or inf loss stops training with a message naming the loss, the step
  and the likely cause; the last good checkpoint stays.

Outputs: ``model_dir/model.pt`` (best epoch), ``history.csv`` and ``metrics.json``
in ``report_dir``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline import cpu
from pipeline.config import ModelParams, TrainParams
from pipeline.io import atomic_file, write_csv, write_json
from pipeline.shards import FaceShards, join_location, read_shards


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class TrainSetup:
    """One training run. ``seed`` is the training seed (initialisation, sampling order,
    augmentation); ``data_seed`` fixes the train/validation split and validation pairs, so
    runs that differ only in ``seed`` are validated on the same images."""

    loss_name: str
    loss_params: dict[str, Any]
    model: ModelParams
    train: TrainParams
    seed: int
    image_size: int
    data_seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], seed: int) -> "TrainSetup":
        """The run of ``recipe`` (see :mod:`pipeline.recipes`) with training seed ``seed``."""
        return cls(loss_name=recipe["loss"], loss_params=dict(recipe["loss_params"]),
                   model=ModelParams(**recipe["model"]), train=TrainParams(**recipe["train"]), seed=int(seed),
                   image_size=int(recipe["image_size"]), data_seed=int(recipe["data_seed"]))


# --------------------------------------------------------------------------- data


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
    while len(negatives) < n_neg and len(np.unique(labels)) > 1:
        i, j = rng.integers(0, len(labels), 2)
        if labels[i] != labels[j]:
            negatives.append((i, j, 0))
    return np.concatenate([positives, np.asarray(negatives, dtype=np.int64).reshape(-1, 3)])


def to_input(batch_uint8: torch.Tensor, *, grayscale: bool) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, C, H, W]`` float in about [-1, 1] (C = 1 if grayscale)."""
    x = batch_uint8.permute(0, 3, 1, 2).float()
    if grayscale:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    return (x - 127.5) / 128.0


# ----------------------------------------------------------------------- schedule


def lr_at(step: int, total_steps: int, steps_per_epoch: int, params: TrainParams) -> float:
    """Learning rate at optimiser ``step`` (0-based): linear warm-up, then the schedule."""
    warmup = int(params.warmup_epochs * steps_per_epoch)
    if warmup and step < warmup:
        return params.lr * (step + 1) / warmup
    if params.schedule == "constant":
        return params.lr
    if params.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return params.lr * params.gamma ** sum(epoch >= m for m in params.milestones)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return params.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------- model


def build_modules(setup: TrainSetup, num_classes: int) -> tuple[nn.Module, nn.Module]:
    from pipeline import losses
    from pipeline.models import build_model

    model = build_model(
        setup.model.backbone,
        embedding_size=setup.model.embedding_size,
        in_channels=1 if setup.model.grayscale else 3,
        input_size=setup.image_size,
        dropout=setup.model.dropout,
        head=setup.model.head,
    )
    criterion = losses.build(setup.loss_name, num_classes=num_classes, embedding_size=setup.model.embedding_size,
                             **setup.loss_params)
    return model, criterion


def fingerprint(setup: TrainSetup, data: FaceShards) -> str:
    """Hash of everything that defines a run; a checkpoint resumes only a run with the same one."""
    blob = json.dumps(
        {
            "loss": setup.loss_name,
            "loss_params": setup.loss_params,
            "model": setup.model.model_dump(),
            "train": setup.train.model_dump(exclude={"workers", "device", "decode"}),
            "seed": setup.seed,
            "data_seed": setup.data_seed,
            "n": len(data),
            "ids": hashlib.sha1("\n".join(data.image_ids).encode()).hexdigest(),
            "code": code_hash(),
        },
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()


def code_hash() -> str:
    """Hash of the source files that shape training, so a code change never resumes an old run."""
    root = Path(__file__).parent
    files = [root / "train.py", root / "samplers.py", root / "shards.py"]
    files += sorted((root / "losses").glob("*.py")) + sorted((root / "models").glob("*.py"))
    digest = hashlib.sha1()
    for f in files:
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but no CUDA device is visible; set train.device: auto")
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def embed_array(model: nn.Module, images: torch.Tensor, *, grayscale: bool, device: torch.device,
                batch_size: int = 256, flip: bool = False) -> np.ndarray:
    """Embeddings ``[N, D]`` (float32) of ``images`` ``[N, H, W, 3]`` uint8, optionally flip-fused."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size].to(device), grayscale=grayscale)
        e = model(x).float()
        if flip:
            e = e + model(x.flip(-1)).float()
        out.append(e.cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def validation_auc(model: nn.Module, images: torch.Tensor, pairs: np.ndarray, *, grayscale: bool,
                   device: torch.device) -> float:
    from pipeline.metrics import roc_auc

    if len(pairs) == 0 or pairs[:, 2].min() == pairs[:, 2].max():
        return float("nan")
    emb = embed_array(model, images, grayscale=grayscale, device=device)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    scores = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(axis=1)
    return float(roc_auc(scores, pairs[:, 2]))


# -------------------------------------------------------------------------- train


@dataclass
class Distributed:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cpu":  # the thread count decides the last bits of the gradients
        torch.set_num_threads(max(1, cpu.thread_count() // max(world, 1)))
    if world <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank), device


class _TrainStep(nn.Module):
    """Network and loss as one module, so DistributedDataParallel syncs the class weights too."""

    def __init__(self, model: nn.Module, criterion: nn.Module, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.criterion, self.amp_dtype = model, criterion, amp_dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            embeddings = self.model(x)
        return self.criterion(embeddings.float(), y)  # margins are computed in fp32


def _epoch_batches(epoch: int, n_train: int, setup: TrainSetup, sampler, steps: int, generator: torch.Generator,
                   dist: Distributed) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(indices, flip mask)`` per step; identical draws on every rank."""
    params = setup.train
    if sampler is not None:  # P x K: each rank gets its own whole P x K batches
        sampler.set_epoch(epoch)
        global_batches = [torch.as_tensor(b, dtype=torch.long) for b in list(sampler)[:steps]]
        return [(b, torch.rand(len(b), generator=generator) < 0.5) for b in global_batches]
    order = torch.randperm(n_train, generator=generator)
    out = []
    per_rank = params.batch_size // dist.world
    for k in range(steps):
        batch = order[k * params.batch_size : (k + 1) * params.batch_size]
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
        batches: this rank's ``(positions, flips)`` per step (see ``_epoch_batches``).
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


def train(setup: TrainSetup, shards_dir: str | Path, model_dir: str | Path, checkpoint_dir: str | Path,
          report_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train, checkpointing every epoch; returns the final metrics dict.

    ``shards_dir`` holds ``train/`` as written by the shard stage: a local directory or
    a URL-style location (see :func:`pipeline.shards.read_shards`).

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its slice of every
    global batch (``train.batch_size`` images in all) with DistributedDataParallel;
    only rank 0 validates and writes checkpoints, the model and the reports.
    """
    from pipeline import losses
    from pipeline.samplers import PKBatchSampler

    torch.manual_seed(setup.seed)
    np.random.seed(setup.seed % 2**32)
    params = setup.train
    dist, device = init_distributed(pick_device(params.device))
    if dist.enabled and params.batch_size % dist.world:
        raise TrainingError(f"train.batch_size = {params.batch_size} must be divisible by the {dist.world} processes")
    data = read_shards(join_location(shards_dir, "train"))
    if len(data.identity_names) < 2:
        raise TrainingError(f"{shards_dir}/train: need at least 2 identities to train, found {len(data.identity_names)}")
    train_idx, val_idx = split_train_val(data.labels, params.val_fraction, setup.data_seed)
    if data.image_shape()[0] != setup.image_size:
        raise TrainingError(f"shards hold {data.image_shape()[0]}px faces but align.size is {setup.image_size}")
    train_labels = torch.from_numpy(data.labels[train_idx])
    val_images = torch.from_numpy(data.decode_all(val_idx))  # validation: a small set, decoded once
    val_labels = data.labels[val_idx]
    input_mode, fill = batch_source(data, params.decode,
                                    processes_per_machine=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    fill_workers = params.workers or cpu.thread_count()
    pairs = validation_pairs(val_labels, setup.data_seed)

    model, criterion = build_modules(setup, num_classes=len(data.identity_names))
    if params.init_from:
        _load_initial_weights(model, Path(params.init_from))
    if params.freeze_backbone:
        model.freeze_backbone(True)
    model.to(device)
    criterion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        if dist.enabled:  # one set of BatchNorm statistics over the global batch (GPU only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp_dtype = None
    if params.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    step_module = _TrainStep(model, criterion, amp_dtype)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    runner: nn.Module = step_module
    if dist.enabled:
        runner = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=params.freeze_backbone)
    use_pk = bool(getattr(criterion, "needs_pk_batches", False))
    if use_pk:
        sampler = PKBatchSampler(train_labels.tolist(), params.pk_identities, params.pk_images, seed=setup.seed,
                                 num_replicas=dist.world, rank=dist.rank)
        steps_per_epoch = len(sampler)
    else:
        sampler = None
        steps_per_epoch = len(train_idx) // params.batch_size
    if params.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, params.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise TrainingError(
            f"{len(train_idx)} training images are fewer than one batch of {params.batch_size}; lower train.batch_size"
        )
    total_steps = steps_per_epoch * params.epochs
    criterion.begin_training(total_steps)  # run-length-dependent schedules (SphereFace); resume restores its state

    checkpoint_dir, model_dir, report_dir = Path(checkpoint_dir), Path(model_dir), Path(report_dir)
    checkpoint_path = checkpoint_dir / "last.pt"
    key = fingerprint(setup, data)
    state = {"epoch": 0, "step": 0, "best_auc": -1.0, "best_epoch": 0, "history": []}
    if checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if saved.get("fingerprint") == key and saved["epoch"] <= params.epochs:
            model.load_state_dict(saved["model"])
            criterion.load_state_dict(saved["criterion"])
            optimizer.load_state_dict(saved["optimizer"])
            scaler.load_state_dict(saved["scaler"])
            state = saved["state"]
            if dist.is_main:
                print(f"[{setup.loss_name}] resuming from {checkpoint_path} after epoch {state['epoch']}")
        elif dist.is_main:
            print(f"[{setup.loss_name}] ignoring {checkpoint_path}: it was made with other settings")
    runner.train()
    started = time.perf_counter()
    seconds = {"data": 0.0, "compute": 0.0}
    for epoch in range(state["epoch"], params.epochs):
        generator = torch.Generator().manual_seed(setup.seed * 1000 + epoch)
        batches = _epoch_batches(epoch, len(train_idx), setup, sampler, steps_per_epoch, generator, dist)
        losses_seen = []
        loader = BatchPrefetcher(fill, data.image_shape(), train_idx, train_labels, batches, workers=fill_workers,
                                 pin=device.type == "cuda")
        bar = tqdm(loader, desc=f"train {setup.loss_name} epoch {epoch + 1}/{params.epochs}", unit="batch",
                   disable=not (progress and dist.is_main), dynamic_ncols=True)
        lr = params.lr
        for images, labels, flips in bar:
            t0 = time.perf_counter()
            x = to_input(images.to(device, non_blocking=True), grayscale=setup.model.grayscale)
            if params.flip and flips.any():
                x[flips.to(device)] = x[flips.to(device)].flip(-1)
            y = labels.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            t1 = time.perf_counter()
            lr = lr_at(state["step"], total_steps, steps_per_epoch, params)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = runner(x, y)
            shown = loss.detach().clone()
            if dist.enabled:  # every rank sees the same value, so all stop together on NaN
                torch.distributed.all_reduce(shown)
                shown /= dist.world
            try:
                losses.check_finite(shown, loss_name=setup.loss_name, step=state["step"], params=setup.loss_params)
            except losses.NonFiniteLossError as err:
                kept = (f"the last good checkpoint (epoch {state['epoch']}) is kept at {checkpoint_path}"
                        if checkpoint_path.is_file() else "no checkpoint had been written yet")
                raise TrainingError(f"{err}; {kept}") from None
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if params.clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, params.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            state["step"] += 1
            losses_seen.append(float(shown))
            t2 = time.perf_counter()
            seconds["data"] += t1 - t0
            seconds["compute"] += t2 - t1
            bar.set_postfix(loss=f"{losses_seen[-1]:.3f}", lr=f"{lr:.3g}")
        seconds["data"] += loader.wait_seconds
        state["epoch"] = epoch + 1
        if dist.is_main:
            auc = validation_auc(model, val_images, pairs, grayscale=setup.model.grayscale, device=device)
            state["history"].append(
                {"epoch": epoch + 1, "step": state["step"], "lr": lr, "train_loss": float(np.mean(losses_seen)),
                 "val_auc": auc}
            )
            print(f"[{setup.loss_name}] epoch {epoch + 1}: loss {np.mean(losses_seen):.4f}  val AUC {auc:.4f}")
            if (not math.isnan(auc) and auc > state["best_auc"]) or state["best_epoch"] == 0:
                state["best_auc"], state["best_epoch"] = (auc if not math.isnan(auc) else -1.0), epoch + 1
                save_model(checkpoint_dir / "best.pt", model, setup, data, epoch + 1, auc)
            _save_checkpoint(checkpoint_path, key, model, criterion, optimizer, scaler, state)
        runner.train()
        dist.barrier()
    elapsed = time.perf_counter() - started
    if not dist.is_main:
        return {}
    best_path = checkpoint_dir / "best.pt"
    if not best_path.is_file():
        raise TrainingError(f"{best_path}: missing although training finished; delete {checkpoint_dir} and rerun")
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(model_dir / "model.pt") as tmp:
        tmp.write_bytes(best_path.read_bytes())
    history = pd.DataFrame(state["history"])
    write_csv(report_dir / "history.csv", history)
    metrics = {
        "best_epoch": state["best_epoch"],
        "best_val_auc": state["best_auc"],
        "final_train_loss": state["history"][-1]["train_loss"],
        "epochs": params.epochs,
        "steps": state["step"],
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "identities": len(data.identity_names),
        "seed": setup.seed,
        "data_seed": setup.data_seed,
        "loss_state": criterion.state_summary(),  # e.g. SphereFace's final lambda
    }
    timing = {
        "seconds_this_run": round(elapsed, 2),
        "step_seconds_data": round(seconds["data"], 3),
        "step_seconds_compute": round(seconds["compute"], 3),
        "device": str(device),
        "processes": dist.world,
        "input": input_mode,  # upfront (decoded once) or per_batch (JPEG bytes in memory)
        # what decides the last bits on a CPU: same kernels + threads => same metrics on any x86-64 host
        "cpu_kernels": cpu.kernels(),
        "threads_per_process": torch.get_num_threads(),
    }
    write_json(report_dir / "metrics.json", metrics)
    write_json(report_dir / "timing.json", timing)
    return metrics


def _save_checkpoint(path: Path, key: str, model, criterion, optimizer, scaler, state) -> None:
    with atomic_file(path) as tmp:
        torch.save(
            {
                "fingerprint": key,
                "epoch": state["epoch"],
                "model": model.state_dict(),
                "criterion": criterion.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "state": state,
            },
            tmp,
        )


def save_model(path: Path, model: nn.Module, setup: TrainSetup, data: FaceShards, epoch: int, auc: float) -> None:
    """The deliverable of a run: weights plus what is needed to rebuild and use them."""
    with atomic_file(path) as tmp:
        torch.save(
            {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "model_params": setup.model.model_dump(),
                "image_size": setup.image_size,
                "loss": setup.loss_name,
                "loss_params": setup.loss_params,
                "seed": setup.seed,
                "epoch": epoch,
                "val_auc": auc,
                "identities": len(data.identity_names),
            },
            tmp,
        )


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; returns ``(model, saved_dict)``."""
    from pipeline.models import build_model

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no trained model; run the train stage first (dvc repro)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    mp = ModelParams(**saved["model_params"])
    model = build_model(mp.backbone, embedding_size=mp.embedding_size, in_channels=1 if mp.grayscale else 3,
                        input_size=saved["image_size"], dropout=mp.dropout, head=mp.head)
    model.load_state_dict(saved["model"])
    return model.to(device).eval(), saved


def _load_initial_weights(model: nn.Module, path: Path) -> None:
    """Transfer learning: copy every tensor of a saved model whose name and shape match."""
    if not path.is_file():
        raise TrainingError(f"train.init_from = {str(path)!r}: file not found")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    weights = saved.get("model", saved)
    own = model.state_dict()
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise TrainingError(f"train.init_from = {str(path)!r}: no weights match this model's layers")
    own.update(matched)
    model.load_state_dict(own)
    print(f"initialised {len(matched)}/{len(own)} tensors from {path}")
