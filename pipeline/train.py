"""Stage ``train@LOSS``: train one embedding model with one loss.

* Data: the ``train`` shards, split by image into train/validation (``val_fraction``
  of each identity's images, seeded). Validation pairs (all same-identity pairs of
  validation images, and as many random different-identity pairs) give the
  verification AUC that picks the best epoch.
* Checkpoint choice (``train.select_on``): the best epoch by the validation AUC, or by the
  verification AUC on the pairs of a named test set (read from ``<shards>/<set>/``), which
  ``metrics.json`` records as ``selected_on`` and the report flags.
* Optimisation: SGD (momentum, weight decay) over the network and the loss's own
  parameters (class weights); linear warm-up then cosine or step decay, per step.
  Horizontal flips, optional grayscale; further augmentation (random resized crop, scale jitter,
  colour jitter and temperature, random grayscale) as ``train.augment`` (:mod:`pipeline.augment`).
  Classifier losses see shuffled batches;
  pair/triplet losses see P x K batches (P identities x K images).
* Robustness: a checkpoint after every epoch (model, loss, optimiser, schedule, step,
  best score) in ``checkpoint_dir``; rerunning the stage resumes from it when it was
  made with the same settings (with several processes, process 0's checkpoint decides for
  all of them). Each epoch's randomness is derived from
  ``(seed, epoch)``, so a resumed run ends exactly where an uninterrupted one does
  on CPU. A NaN or inf loss stops training with a message naming the loss, the step
  and the likely cause; the last good checkpoint stays. The loss is read back every
  ``nan_check_every`` steps (all steps since the last read at once), so a bad step is
  reported up to that many steps late, never missed, and before any checkpoint.
* Device: one line at the start names the device (GPU name and compute capability),
  the precision and the process count. ``device: auto`` takes the GPU when torch can
  use it, the CPU when the machine has none, and stops with a one-line
  :class:`TrainingError` when the machine has a GPU that this torch build cannot use
  (driver too old for the wheel's CUDA, a wheel without kernels for the GPU, a
  CPU-only wheel), instead of training on the CPU unnoticed (:func:`choose_device`).
* GPU precision: the backbone under autocast, bf16 on compute capability 8.0 and newer
  (Ampere+), fp16 with a gradient scaler before that (older GPUs only emulate bf16);
  the embedding head and the loss run in fp32 (:func:`amp_dtype_for`). Channels-last.
* GPU step without host syncs: labels are range-checked once on the host when the
  shards are read (the loss skips its per-batch checks), flips are a selection, the
  loss is read every ``nan_check_every`` steps, P x K losses are written without
  boolean indexing. (With fp16 the gradient scaler still reads one flag per step.)
* Several processes: ``batch_size`` is the global batch, or ``batch_per_device`` per
  process (see :class:`pipeline.config.TrainParams` for scaling ``lr``); SyncBatchNorm
  only when a process holds fewer than :data:`SYNC_BN_BELOW` images (``sync_bn``).
  Only rank 0 decodes and embeds validation images (only those in the sampled pairs);
  a failure there stops every rank with an error instead of leaving them waiting. The
  machine's threads are shared by its processes (torch threads on the CPU, batch decoding).

Determinism on a GPU. On the CPU a seed gives the same bits on any x86-64 host with the
pinned kernels and thread count (see :mod:`pipeline.cpu`). On a GPU, with the default
``train.deterministic: false``, two runs of the same seed on the same GPU model and
software agree only approximately: cuDNN autotuning (``cudnn.benchmark``, on for the
fixed input size) picks convolution algorithms by timing them, so the pick can differ
from run to run, and some kernels accumulate with atomic additions in no fixed order
(by default e.g. the backward of ``gather`` in the margin losses, ``index_add_`` in
center loss, adaptive pooling for inputs other than 112 px; torch's documentation of
``use_deterministic_algorithms`` lists them); with several GPUs, SyncBatchNorm and NCCL
reductions add their own order.
``train.deterministic: true`` trades speed for repeatability on the same GPU model and
software: no autotuning, ``cudnn.deterministic``, ``torch.use_deterministic_algorithms``
(in warn-only mode: an operation without a deterministic kernel warns by name instead
of stopping the run) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. Other GPU models, CUDA,
cuDNN or torch versions, or another process count still give other bits.

Outputs: ``model_dir/model.pt`` (best epoch; equal models give equal bytes), ``history.csv``,
``metrics.json`` and ``timing.json`` (device, precision, batch layout, time split) in ``report_dir``.

Structure: :func:`train` reads as its steps, :func:`load_data`, :func:`build_run`, resuming
(:func:`pipeline.training.checkpoint.resume`), :func:`train_one_epoch` and
:func:`validate_and_checkpoint` per epoch, :func:`write_outputs`; the parts live in
:mod:`pipeline.training` (device, distributed, data feed, step, checkpoint). Every name other
modules import from here (``from pipeline.train import ...``) still comes from here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline import augment, cpu
from pipeline.config import TrainParams
from pipeline.io import atomic_file, write_csv, write_json
from pipeline.shards import FaceShards, join_location, read_shards
# Every name below stays importable from pipeline.train (the embed, predict and CLI modules,
# tests and benchmarks import them from here; see __all__), also those the loop does not use.
from pipeline.training.checkpoint import (code_hash, fingerprint, load_head, load_initial_weights,
                                          load_model, restore, resume, save_checkpoint, save_model, save_stable)
from pipeline.training.data import (BatchPrefetcher, Fill, batch_input, batch_layout, batch_source,
                                    check_labels, decode_threads, epoch_batches, flip_rows, scale_input,
                                    selection_set, split_train_val, to_input, validation_pairs, validation_subset)
from pipeline.training.device import (DRIVER_FOR_CUDA, OLDER_WHEEL, SYNC_BN_BELOW, CudaStatus,
                                      amp_dtype_for, apply_cuda_backend_settings, arch_supported, choose_device,
                                      cuda_backend_settings, cuda_status, describe_device, device_capability,
                                      device_line, gpu_text, gradient_scaler, pick_device, use_sync_bn)
from pipeline.training.distributed import Distributed, init_distributed, local_processes
from pipeline.training.setup import TrainingError, TrainSetup
from pipeline.training.step import (TrainStep, build_modules, embed_array, first_nonfinite, lr_at,
                                    validation_auc)

# the old private spellings, for the callers that used them
_TrainStep = TrainStep
_epoch_batches = epoch_batches
_load_initial_weights = load_initial_weights
_save_checkpoint = save_checkpoint

__all__ = ["_epoch_batches", "_load_initial_weights", "_save_checkpoint", "_TrainStep", "amp_dtype_for",
           "apply_cuda_backend_settings", "arch_supported", "batch_input", "batch_layout", "batch_source",
           "BatchPrefetcher", "build_modules", "build_run", "check_labels", "choose_device", "code_hash",
           "cuda_backend_settings", "cuda_status", "CudaStatus", "decode_threads", "describe_device",
           "device_capability", "device_line", "Distributed", "DRIVER_FOR_CUDA", "embed_array", "epoch_batches",
           "epoch_plan", "Fill", "fingerprint", "first_nonfinite", "flip_rows", "gpu_text", "gradient_scaler",
           "init_distributed", "load_data", "load_head", "load_initial_weights", "load_model", "local_processes",
           "lr_at", "OLDER_WHEEL", "optimise", "pick_device", "prepare_device", "read_losses", "restore", "resume",
           "Run", "run_metrics", "run_timing", "save_checkpoint", "save_model", "save_stable", "scale_input",
           "selection_set", "split_train_val", "step_input", "SYNC_BN_BELOW", "to_input", "train", "train_one_epoch",
           "TrainData", "TrainingError", "TrainSetup", "TrainStep", "use_sync_bn", "validate_and_checkpoint",
           "validation_auc", "validation_pairs", "validation_subset", "write_outputs"]


@dataclass
class TrainData:
    """What this process trains and validates on (:func:`load_data`).

    ``train_idx`` [n_train] and ``val_idx`` [n_val]: record indices into ``data``;
    ``train_labels`` [n_train] int64. ``val_images`` [V, H, W, 3] uint8 are the validation images
    the pairs use and ``val_pairs`` [M, 3] (i, j, same) index them; ``selection`` is
    ``(images, pairs)`` of ``train.select_on``'s test set, None when the validation pairs choose
    the epoch. Images are decoded on process 0 only (None elsewhere). ``fill`` writes batch pixels
    (``input_mode`` upfront or per_batch) on ``fill_workers`` threads."""

    data: FaceShards
    train_idx: np.ndarray
    val_idx: np.ndarray
    train_labels: torch.Tensor
    val_images: torch.Tensor | None
    val_pairs: np.ndarray
    selection: tuple[torch.Tensor, np.ndarray] | None
    input_mode: str
    fill: Fill
    fill_workers: int


@dataclass
class Run:
    """A run set up on its device (:func:`build_run`): what each epoch's steps use and update.

    ``runner`` is the :class:`TrainStep` of ``model`` and ``criterion`` (under
    DistributedDataParallel with several processes); ``sampler`` draws P x K batches (None:
    shuffled batches); ``state`` is the loop's ``epoch``, ``step``, ``best_auc``, ``best_epoch``
    and ``history``, saved in every checkpoint; ``seconds`` splits step time into data and compute."""

    setup: TrainSetup
    dist: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None
    backend: dict[str, Any] | None
    global_batch: int
    batch_per_process: int
    model: nn.Module
    criterion: nn.Module
    runner: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sync_bn: bool
    sampler: Any
    steps_per_epoch: int
    total_steps: int
    checkpoint_dir: Path
    key: str
    progress: bool = True
    state: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "step": 0, "best_auc": -1.0,
                                                           "best_epoch": 0, "history": []})
    seconds: dict[str, float] = field(default_factory=lambda: {"data": 0.0, "compute": 0.0})

    @property
    def params(self) -> TrainParams:
        return self.setup.train

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir / "last.pt"


def train(setup: TrainSetup, shards_dir: str | Path, model_dir: str | Path, checkpoint_dir: str | Path,
          report_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train, checkpointing every epoch; returns the final metrics dict.

    ``shards_dir`` holds ``train/`` as written by the shard stage: a local directory or
    a URL-style location (see :func:`pipeline.shards.read_shards`).

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its slice of every
    global batch (``train.batch_size`` images in all, or ``train.batch_per_device`` per
    rank) with DistributedDataParallel; only rank 0 validates and writes checkpoints,
    the model and the reports, and rank 0's checkpoint decides where every rank resumes.
    When rank 0 fails there, every rank stops with an error.
    """
    from pipeline import losses

    torch.manual_seed(setup.seed)
    np.random.seed(setup.seed % 2**32)
    dist, device, amp_dtype, backend = prepare_device(setup)
    use_pk = bool(losses.get(setup.loss_name).needs_pk_batches)
    global_batch, batch_per_process = batch_layout(setup.train, dist.world, use_pk)
    feed = load_data(setup, shards_dir, dist)
    run = build_run(setup, feed, dist, device, amp_dtype, backend, (global_batch, batch_per_process), use_pk,
                    Path(checkpoint_dir), progress)
    saved = resume(run.checkpoint_path, run.key, setup.train.epochs, dist, device, setup.loss_name)
    if saved is not None:
        run.state = restore(saved, run.model, run.criterion, run.optimizer, run.scaler)
    run.runner.train()
    started = time.perf_counter()
    for epoch in range(run.state["epoch"], setup.train.epochs):
        losses_seen, lr = train_one_epoch(run, feed, epoch)
        validate_and_checkpoint(run, feed, epoch, losses_seen, lr)
    elapsed = time.perf_counter() - started
    if not dist.is_main:
        return {}
    return write_outputs(run, feed, elapsed, Path(model_dir), Path(report_dir))


def prepare_device(setup: TrainSetup) -> tuple[Distributed, torch.device, torch.dtype | None, dict[str, Any] | None]:
    """Join the process group (under torchrun), choose the device and the autocast dtype, apply the
    cuDNN settings on a GPU; process 0 prints the device line. Returns ``(dist, device, amp_dtype,
    cuda backend settings or None)``."""
    params = setup.train
    dist, device = init_distributed(pick_device(params.device))
    amp_dtype = amp_dtype_for(device.type, device_capability(device), params.amp)
    backend = cuda_backend_settings(params.deterministic) if device.type == "cuda" else None
    if backend is not None:
        apply_cuda_backend_settings(backend)
    if dist.is_main:
        print(f"[{setup.loss_name}] {describe_device(device, amp_dtype, dist.world)}", flush=True)
    return dist, device, amp_dtype, backend


def load_data(setup: TrainSetup, shards_dir: str | Path, dist: Distributed) -> TrainData:
    """Read the ``train`` shards, split them, draw the validation pairs; on process 0 decode the
    validation images the pairs use and the ``train.select_on`` set; choose the batch source."""
    params = setup.train
    data = read_shards(join_location(shards_dir, "train"))
    if len(data.identity_names) < 2:
        raise TrainingError(f"{shards_dir}/train: need at least 2 identities to train, "
                            f"found {len(data.identity_names)}")
    check_labels(data.labels, len(data.identity_names), f"{shards_dir}/train")
    train_idx, val_idx = split_train_val(data.labels, params.val_fraction, setup.data_seed)
    if data.image_shape()[0] != setup.image_size:
        raise TrainingError(f"shards hold {data.image_shape()[0]}px faces but align.size is {setup.image_size}")
    pairs = validation_pairs(data.labels[val_idx], setup.data_seed)
    # only rank 0 validates, and only the images in the sampled pairs: decoded once, here
    needed, val_pairs = validation_subset(pairs)
    val_images = torch.from_numpy(data.decode_all(val_idx[needed])) if dist.is_main else None
    # train.select_on: the test set whose pairs choose the best epoch (None: the validation pairs)
    selection = selection_set(shards_dir, params.select_on) if params.select_on != "validation" and dist.is_main \
        else None
    input_mode, fill = batch_source(data, params.decode, processes_per_machine=dist.local_world)
    return TrainData(data=data, train_idx=train_idx, val_idx=val_idx,
                     train_labels=torch.from_numpy(data.labels[train_idx]), val_images=val_images,
                     val_pairs=val_pairs, selection=selection, input_mode=input_mode, fill=fill,
                     fill_workers=decode_threads(params.workers, dist.local_world))


def build_run(setup: TrainSetup, feed: TrainData, dist: Distributed, device: torch.device,
              amp_dtype: torch.dtype | None, backend: dict[str, Any] | None, layout: tuple[int, int], use_pk: bool,
              checkpoint_dir: Path, progress: bool) -> Run:
    """Network and loss on the device (initialised from torch's seeded generator, or ``train.init_from``),
    SGD over both, the gradient scaler, DDP with several processes, and the steps of an epoch.
    ``layout``: ``(global batch, images per process)``."""
    params = setup.train
    model, criterion = build_modules(setup, num_classes=len(feed.data.identity_names))
    criterion.check_values = False  # labels were checked on loading; the sampler gives P x K batches their anchors
    if params.init_from:
        load_initial_weights(model, Path(params.init_from))
    if params.freeze_backbone:
        model.freeze_backbone(True)
    model.to(device)
    criterion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    sync_bn = use_sync_bn(params.sync_bn, device.type, dist.world, layout[1])
    if sync_bn:  # one set of BatchNorm statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_module = TrainStep(model, criterion, amp_dtype)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    runner: nn.Module = step_module
    if dist.enabled:
        runner = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=params.freeze_backbone)
    sampler, steps_per_epoch = epoch_plan(setup, feed, dist, layout[0], use_pk)
    total_steps = steps_per_epoch * params.epochs
    criterion.begin_training(total_steps)  # run-length-dependent schedules (SphereFace); resume restores its state
    key = fingerprint(setup, feed.data, device_type=device.type, amp_dtype=amp_dtype, global_batch=layout[0])
    return Run(setup=setup, dist=dist, device=device, amp_dtype=amp_dtype, backend=backend, global_batch=layout[0],
               batch_per_process=layout[1], model=model, criterion=criterion, runner=runner, trainable=trainable,
               optimizer=optimizer, scaler=gradient_scaler(amp_dtype), sync_bn=sync_bn, sampler=sampler,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, checkpoint_dir=checkpoint_dir, key=key,
               progress=progress)


def epoch_plan(setup: TrainSetup, feed: TrainData, dist: Distributed, global_batch: int,
               use_pk: bool) -> tuple[Any, int]:
    """``(P x K sampler or None, steps per epoch)``; :class:`TrainingError` when not one batch fits."""
    from pipeline.samplers import PKBatchSampler

    params = setup.train
    if use_pk:
        sampler = PKBatchSampler(feed.train_labels.tolist(), params.pk_identities, params.pk_images, seed=setup.seed,
                                 num_replicas=dist.world, rank=dist.rank)
        steps_per_epoch = len(sampler)
    else:
        sampler = None
        steps_per_epoch = len(feed.train_idx) // global_batch
    if params.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, params.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise TrainingError(
            f"{len(feed.train_idx)} training images are fewer than one batch of {global_batch}; lower train.batch_size"
        )
    return sampler, steps_per_epoch


def train_one_epoch(run: Run, feed: TrainData, epoch: int) -> tuple[list[float], float]:
    """The optimisation steps of ``epoch`` (0-based), their batches and augmentation drawn from
    ``(seed, epoch)``; returns ``(the loss of each step, mean over the processes; the last lr)``."""
    setup, params, dist, device = run.setup, run.params, run.dist, run.device
    generator = torch.Generator().manual_seed(setup.seed * 1000 + epoch)
    batches = epoch_batches(epoch, len(feed.train_idx), run.global_batch, run.sampler, run.steps_per_epoch,
                            generator, dist)
    # augmentation draws of the epoch (None: flips only), moved to the device once per epoch
    draws = augment.epoch_draws(params.augment, setup.seed, epoch, len(batches), run.global_batch, rank=dist.rank,
                                world=dist.world)
    if draws is not None:
        draws = draws.to(device)
    losses_seen: list[float] = []
    unread: list[torch.Tensor] = []  # this rank's loss of each step since the last read, on the device
    loader = BatchPrefetcher(feed.fill, feed.data.image_shape(), feed.train_idx, feed.train_labels, batches,
                             workers=feed.fill_workers, pin=device.type == "cuda")
    bar = tqdm(loader, desc=f"train {setup.loss_name} epoch {epoch + 1}/{params.epochs}", unit="batch",
               disable=not (run.progress and dist.is_main), dynamic_ncols=True)
    lr = params.lr
    for k, (images, labels, flips) in enumerate(bar):
        t0 = time.perf_counter()
        x, y = step_input(run, images, labels, flips, None if draws is None else draws[k])
        t1 = time.perf_counter()
        lr = lr_at(run.state["step"], run.total_steps, run.steps_per_epoch, params)
        loss = optimise(run, x, y, lr)
        run.state["step"] += 1
        unread.append(loss.detach())
        if len(unread) >= params.nan_check_every:
            losses_seen += read_losses(run, unread)
            unread = []
            bar.set_postfix(loss=f"{losses_seen[-1]:.3f}", lr=f"{lr:.3g}")
        t2 = time.perf_counter()
        run.seconds["data"] += t1 - t0
        run.seconds["compute"] += t2 - t1
    if unread:  # the epoch's last steps, before validation and the checkpoint
        losses_seen += read_losses(run, unread)
    run.seconds["data"] += loader.wait_seconds
    run.state["epoch"] = epoch + 1
    return losses_seen, lr


def step_input(run: Run, images: torch.Tensor, labels: torch.Tensor, flips: torch.Tensor,
               draws: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [B, C, H, W], y [B])`` on the device from a prefetched batch: ``images`` [B, H, W, 3] uint8
    augmented with ``draws`` [B, N] (None: flips only), flipped where ``flips`` [B] (a host mask: no sync)."""
    params, device = run.params, run.device
    x = batch_input(images.to(device, non_blocking=True), draws, params.augment,
                    grayscale=run.setup.model.grayscale)
    if params.augment.flip and flips.any():  # flips are on the host: no device sync
        x = flip_rows(x, flips.to(device, non_blocking=True))
    y = labels.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def optimise(run: Run, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One SGD step at learning rate ``lr`` (gradients scaled under fp16, clipped when
    ``train.clip_grad_norm``); returns the step's loss, still on the device."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss = run.runner(x, y)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.params.clip_grad_norm:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.trainable, run.params.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss


def read_losses(run: Run, unread: list[torch.Tensor]) -> list[float]:
    """The losses of the last ``len(unread)`` steps (mean over the processes), read to the host in one go;
    a NaN or inf one stops the run, naming its step and the steps this read covered."""
    from pipeline import losses

    first_step = run.state["step"] - len(unread)
    values = torch.stack(unread)
    if run.dist.enabled:  # every rank reads the same values, so all stop together
        torch.distributed.all_reduce(values)
        values /= run.dist.world
    host = values.cpu().tolist()
    bad = first_nonfinite(host)
    if bad is not None:
        try:
            losses.check_finite(host[bad], loss_name=run.setup.loss_name, step=first_step + bad,
                                params=run.setup.loss_params)
        except losses.NonFiniteLossError as err:
            path = run.checkpoint_path
            kept = (f"the last good checkpoint (epoch {run.state['epoch']}) is kept at {path}"
                    if path.is_file() else "no checkpoint had been written yet")
            covered = (f"the loss is read every {run.params.nan_check_every} steps; this read covered steps "
                       f"{first_step}-{first_step + len(host) - 1}")
            raise TrainingError(f"{err} ({covered}); {kept}") from None
    return host


def validate_and_checkpoint(run: Run, feed: TrainData, epoch: int, losses_seen: list[float], lr: float) -> None:
    """After ``epoch``'s steps: process 0 validates, keeps the best epoch's model and writes the
    checkpoint; a failure there stops every process (the all-reduce is also the epoch's barrier)."""
    failure: Exception | None = None
    if run.dist.is_main:
        try:
            _validate(run, feed, epoch, losses_seen, lr)
            save_checkpoint(run.checkpoint_path, run.key, run.model, run.criterion, run.optimizer, run.scaler,
                            run.state)
        except Exception as err:  # every rank must hear of it, or the others wait for rank 0 forever
            failure = err
    everyone_ok = run.dist.all_ok(failure is None)
    if failure is not None:
        raise failure
    if not everyone_ok:
        raise TrainingError(f"process {run.dist.rank} stops: process 0 failed while validating or checkpointing "
                            f"epoch {epoch + 1} (process 0 prints why)")
    run.runner.train()


def _validate(run: Run, feed: TrainData, epoch: int, losses_seen: list[float], lr: float) -> None:
    """Process 0: the epoch's history row (validation AUC, and the AUC of ``train.select_on``'s pairs),
    and ``best.pt`` when the AUC that chooses the epoch improved (or for the first epoch)."""
    setup, state = run.setup, run.state
    grayscale = setup.model.grayscale
    auc = validation_auc(run.model, feed.val_images, feed.val_pairs, grayscale=grayscale, device=run.device,
                         amp_dtype=run.amp_dtype)
    row = {"epoch": epoch + 1, "step": state["step"], "lr": lr, "train_loss": float(np.mean(losses_seen)),
           "val_auc": auc}
    chosen_by = auc
    if feed.selection is not None:  # the AUC on the pairs of train.select_on chooses the epoch
        chosen_by = row["select_auc"] = validation_auc(run.model, feed.selection[0], feed.selection[1],
                                                       grayscale=grayscale, device=run.device,
                                                       amp_dtype=run.amp_dtype)
    state["history"].append(row)
    print(f"[{setup.loss_name}] epoch {epoch + 1}: loss {np.mean(losses_seen):.4f}  val AUC {auc:.4f}"
          + (f"  {setup.train.select_on} AUC {chosen_by:.4f}" if feed.selection is not None else ""))
    if (not math.isnan(chosen_by) and chosen_by > state["best_auc"]) or state["best_epoch"] == 0:
        state["best_auc"] = chosen_by if not math.isnan(chosen_by) else -1.0
        state["best_epoch"] = epoch + 1
        save_model(run.checkpoint_dir / "best.pt", run.model, setup, feed.data, epoch + 1, auc, run.criterion)


def write_outputs(run: Run, feed: TrainData, elapsed: float, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    """Process 0, after the last epoch: ``model.pt`` (a copy of the best epoch's ``best.pt``),
    ``history.csv``, ``metrics.json`` and ``timing.json``; returns the metrics."""
    best_path = run.checkpoint_dir / "best.pt"
    if not best_path.is_file():
        raise TrainingError(f"{best_path}: missing although training finished; delete {run.checkpoint_dir} and rerun")
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(model_dir / "model.pt") as tmp:
        tmp.write_bytes(best_path.read_bytes())
    write_csv(report_dir / "history.csv", pd.DataFrame(run.state["history"]))
    metrics = run_metrics(run, feed)
    write_json(report_dir / "metrics.json", metrics)
    write_json(report_dir / "timing.json", run_timing(run, feed, elapsed))
    return metrics


def run_metrics(run: Run, feed: TrainData) -> dict[str, Any]:
    """What ``metrics.json`` records: the chosen epoch, its AUCs, the run's size and seeds."""
    state, params = run.state, run.params
    best_row = state["history"][state["best_epoch"] - 1]
    return {
        "best_epoch": state["best_epoch"],
        # the validation AUC of the chosen epoch (with select_on: validation, the AUC that chose it)
        "best_val_auc": state["best_auc"] if params.select_on == "validation" else best_row["val_auc"],
        # what chose the saved epoch: "validation" or a test set, which is then no unbiased test
        "selected_on": params.select_on,
        "selection_auc": state["best_auc"],
        "final_train_loss": state["history"][-1]["train_loss"],
        "epochs": params.epochs,
        "steps": state["step"],
        "train_images": int(len(feed.train_idx)),
        "val_images": int(len(feed.val_idx)),
        "identities": len(feed.data.identity_names),
        "seed": run.setup.seed,
        "data_seed": run.setup.data_seed,
        "loss_state": run.criterion.state_summary(),  # e.g. SphereFace's final lambda
    }


def run_timing(run: Run, feed: TrainData, elapsed: float) -> dict[str, Any]:
    """What ``timing.json`` records: where and how the run computed, and where its time went."""
    device, amp_dtype = run.device, run.amp_dtype
    return {
        "seconds_this_run": round(elapsed, 2),
        "step_seconds_data": round(run.seconds["data"], 3),
        # on a GPU the host runs ahead of the device and waits for it only when reading the losses
        "step_seconds_compute": round(run.seconds["compute"], 3),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "float32",
        "processes": run.dist.world,
        "global_batch": run.global_batch,
        "batch_per_process": run.batch_per_process,
        "sync_bn": run.sync_bn,
        "cudnn_benchmark": bool(run.backend and run.backend["cudnn.benchmark"]),
        "input": feed.input_mode,  # upfront (decoded once) or per_batch (JPEG bytes in memory)
        "decode_threads_per_process": feed.fill_workers,
        # what decides the last bits on a CPU: same kernels + threads => same metrics on any x86-64 host
        "cpu_kernels": cpu.kernels(),
        "threads_per_process": torch.get_num_threads(),
    }
