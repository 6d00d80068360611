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
  made with the same settings. Each epoch's randomness is derived from
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
  a failure there stops every rank with an error instead of leaving them waiting.

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

Outputs: ``model_dir/model.pt`` (best epoch), ``history.csv``, ``metrics.json`` and
``timing.json`` (device, precision, batch layout, time split) in ``report_dir``.
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

from pipeline import augment, cpu
from pipeline.config import AugmentParams, ModelParams, TrainParams
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


def fingerprint(setup: TrainSetup, data: FaceShards, *, device_type: str, amp_dtype: torch.dtype | None,
                global_batch: int) -> str:
    """Hash of everything that defines a run; a checkpoint resumes only a run with the same one.

    Includes where it runs (``device_type``: cpu, cuda) and its precision (``amp_dtype``), so
    a CPU checkpoint never resumes a GPU run or the reverse, nor a bf16 run an fp16 one; and
    the global batch, which ``batch_per_device`` ties to the process count. The settings
    that do not change the trained model (threads, input mode, NaN-check interval) are left out.
    """
    blob = json.dumps(
        {
            "loss": setup.loss_name,
            "loss_params": setup.loss_params,
            "model": setup.model.model_dump(),
            "train": setup.train.model_dump(exclude={"workers", "device", "decode", "nan_check_every"}),
            "device_type": device_type,
            "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "fp32",
            "global_batch": global_batch,
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
    files = [root / "train.py", root / "samplers.py", root / "shards.py", root / "augment.py"]
    files += sorted((root / "losses").glob("*.py")) + sorted((root / "models").glob("*.py"))
    digest = hashlib.sha1()
    for f in files:
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------- device

#: Oldest NVIDIA driver branch that runs each CUDA major version (minor-version compatibility).
DRIVER_FOR_CUDA = {11: 450, 12: 525, 13: 580}

#: The torch wheel for GPUs and drivers that the pinned CUDA 13 build cannot serve: the CUDA
#: 12.6 build has kernels for sm_50 to sm_90 (Maxwell to Hopper) and runs on drivers >= 525.
OLDER_WHEEL = ("the CUDA 12.6 build (pip install --index-url https://download.pytorch.org/whl/cu126 "
               "torch=={version} and the torchvision pinned in requirements.txt)")

#: CUDA_VISIBLE_DEVICES values that hide every GPU on purpose.
_HIDDEN = {"", "-1", "none", "NoDevFiles"}


@dataclass(frozen=True)
class CudaStatus:
    """What this machine and this torch build say about GPUs, as plain values, so that
    :func:`choose_device` can be tested with any of them (:func:`cuda_status` reads them)."""

    usable: bool  # torch.cuda.is_available()
    count: int = 0  # torch.cuda.device_count(): may count GPUs that torch cannot use
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES
    driver_gpu: str | None = None  # when torch sees none: a GPU nvidia-smi or /dev/nvidia0 shows this process
    driver: str | None = None  # NVIDIA driver version (nvidia-smi or /proc/driver/nvidia/version)
    names: tuple[str, ...] = ()  # of each GPU torch can use
    capabilities: tuple[tuple[int, int], ...] = ()  # compute capability of each of them
    arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list(): the GPUs this wheel has kernels for
    torch_version: str = ""
    torch_cuda: str | None = None  # torch.version.cuda; None for a CPU-only wheel


def cuda_status() -> CudaStatus:
    """Read :class:`CudaStatus` from torch, the environment and, when torch sees no GPU, the driver."""
    usable = torch.cuda.is_available()
    try:
        count = torch.cuda.device_count()
    except RuntimeError:
        count = 0
    names: tuple[str, ...] = ()
    capabilities: tuple[tuple[int, int], ...] = ()
    driver_gpu = driver = None
    if usable:
        names = tuple(torch.cuda.get_device_name(i) for i in range(count))
        capabilities = tuple(tuple(torch.cuda.get_device_capability(i)) for i in range(count))
    else:
        driver_gpu, driver = _driver_view()
    return CudaStatus(usable=usable, count=count, visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                      driver_gpu=driver_gpu, driver=driver, names=names, capabilities=capabilities,
                      arch_list=tuple(torch.cuda.get_arch_list()) if torch.backends.cuda.is_built() else (),
                      torch_version=torch.__version__, torch_cuda=torch.version.cuda)


def _driver_view() -> tuple[str | None, str | None]:
    """(a GPU this process was given, as the driver reports it; the driver version), None where unknown.

    A GPU counts when ``nvidia-smi`` (only present where the driver's user space was
    installed or passed in) answers or fails, or a ``/dev/nvidia0`` device node exists; the
    kernel module alone (``/proc/driver/nvidia``, also seen from CPU-only containers on a GPU
    host) only gives the driver version."""
    import shutil
    import subprocess

    gpu = version = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
            parts = [part.strip() for part in lines[0].split(",")] if lines else []
            if len(parts) >= 3:
                gpu, version = f"{parts[0]}, compute capability {parts[2]}", parts[1]
            else:
                gpu = f"nvidia-smi is installed but reports no GPU (exit status {out.returncode})"
        except (OSError, subprocess.SubprocessError):
            gpu = "nvidia-smi is installed but does not answer"
    if gpu is None and Path("/dev/nvidia0").exists():
        gpu = "/dev/nvidia0 exists"
    if version is None:
        try:
            words = Path("/proc/driver/nvidia/version").read_text().split()
            version = next((w for w in words if w[:1].isdigit() and "." in w), None)
        except OSError:
            pass
    return gpu, version


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...] | list[str]) -> bool:
    """Whether a wheel compiled for ``arch_list`` (e.g. ``sm_75 ... sm_120``) runs on a GPU of ``capability``.

    A kernel binary ``sm_XY`` runs on compute capability X.Z with Z >= Y (same major); PTX
    (``compute_XY``) is compiled by the driver for any capability >= X.Y. An empty list
    (a build that does not say) is left to torch.
    """
    if not arch_list:
        return True
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = "".join(ch for ch in number if ch.isdigit())  # sm_90a -> 90
        if len(digits) < 2:
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def choose_device(choice: str, status: CudaStatus, key: str = "train.device") -> str:
    """``"cuda"`` or ``"cpu"`` for the setting ``key`` = ``choice`` (auto, cpu, cuda) on a machine
    described by ``status``; :class:`TrainingError` (one line, saying what to install or set)
    when a GPU is asked for or present but this torch build cannot use it."""
    if choice == "cpu":
        return "cpu"
    base = status.torch_version.split("+")[0]
    if status.usable:
        for name, capability in zip(status.names, status.capabilities):
            if not arch_supported(capability, status.arch_list):
                sm = f"sm_{capability[0]}{capability[1]}"
                older = capability < _lowest_arch(status.arch_list)
                fix = (OLDER_WHEEL.format(version=base) if older
                       else f"a newer torch whose CUDA build lists {sm}")
                raise TrainingError(
                    f"{key} = {choice}: the GPU {name} has compute capability {capability[0]}.{capability[1]} ({sm}), "
                    f"but torch {status.torch_version} has kernels only for {', '.join(status.arch_list)}; "
                    f"install {fix}, or set {key}: cpu")
        return "cuda"
    hidden = (status.visible_devices or "").strip() in _HIDDEN
    evidence = [f"nvidia-smi: {status.driver_gpu}" if status.driver_gpu else "",
                f"torch counts {status.count} GPU(s)" if status.count else "",
                f"CUDA_VISIBLE_DEVICES={status.visible_devices}" if not hidden else ""]
    evidence = [e for e in evidence if e]
    if choice != "cuda" and not evidence:
        return "cpu"
    if not evidence:
        reason = "no NVIDIA GPU or driver was found"
    elif status.torch_cuda is None:
        reason = (f"torch {status.torch_version} is a CPU-only build; install the CUDA build pinned in "
                  "requirements.txt (bash scripts/setup.sh)")
    else:
        major = int(status.torch_cuda.split(".")[0])
        need = DRIVER_FOR_CUDA.get(major)
        have = _driver_major(status.driver)
        wanted = f"an NVIDIA driver >= {need}" if need else "a recent NVIDIA driver"
        if need and have is not None and have < need:
            reason = (f"torch {status.torch_version} is built for CUDA {status.torch_cuda}, which needs {wanted}, "
                      f"and this machine has driver {status.driver}; update the driver, or install "
                      f"{OLDER_WHEEL.format(version=base)}, which needs a driver >= 525")
        elif have is not None:
            reason = (f"driver {status.driver} is recent enough for CUDA {status.torch_cuda}, so the GPU is hidden "
                      "or unavailable to this process (check CUDA_VISIBLE_DEVICES, the container's GPU access and "
                      "nvidia-smi)")
        else:
            reason = (f"torch {status.torch_version} is built for CUDA {status.torch_cuda} and needs {wanted}; "
                      f"check the driver with nvidia-smi, or install {OLDER_WHEEL.format(version=base)} for "
                      "drivers >= 525")
    if choice == "cuda":
        seen = f" ({'; '.join(evidence)})" if evidence else ""
        raise TrainingError(f"{key} = cuda but torch cannot use a GPU here{seen}: {reason}; or set {key}: cpu")
    raise TrainingError(f"{key} = auto and this machine has a GPU ({'; '.join(evidence)}) that torch cannot use: "
                        f"{reason}; or set {key}: cpu to run on the CPU")


def _lowest_arch(arch_list: tuple[str, ...]) -> tuple[int, int]:
    found = []
    for arch in arch_list:
        digits = "".join(ch for ch in arch.partition("_")[2] if ch.isdigit())
        if len(digits) >= 2:
            found.append((int(digits[:-1]), int(digits[-1])))
    return min(found, default=(0, 0))


def _driver_major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def pick_device(choice: str, key: str = "train.device") -> torch.device:
    """The device for the setting ``key`` = ``choice``; see :func:`choose_device`."""
    if choice == "cpu":
        return torch.device("cpu")
    return torch.device(choose_device(choice, cuda_status(), key))


def amp_dtype_for(device_type: str, capability: tuple[int, int] | None, amp: bool) -> torch.dtype | None:
    """Autocast dtype of the backbone: None (fp32) on the CPU or with ``amp`` off; on a GPU bf16
    from compute capability 8.0 (Ampere) on, fp16 (with a gradient scaler) before it.

    Capability, not ``torch.cuda.is_bf16_supported()``, decides: that also says yes on older
    GPUs, which only emulate bf16 (slowly)."""
    if not amp or device_type != "cuda":
        return None
    return torch.bfloat16 if capability is not None and capability[0] >= 8 else torch.float16


def device_line(device_text: str, amp_dtype: torch.dtype | None, processes: int, torch_version: str,
                torch_cuda: str | None) -> str:
    """The one line train and embed print first: device, precision, processes, torch build."""
    if amp_dtype is None:
        precision = "fp32"
    else:
        precision = f"{str(amp_dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float16', 'fp16')}"
        precision += " autocast (backbone), fp32 head and loss"
        if amp_dtype == torch.float16:
            precision += ", gradient scaler"
    build = f"torch {torch_version}" + (f" built for CUDA {torch_cuda}" if torch_cuda else " (CPU-only build)")
    noun = "process" if processes == 1 else "processes"
    return f"device {device_text}; precision {precision}; {processes} {noun}; {build}"


def gpu_text(index: int, name: str, capability: tuple[int, int], memory_bytes: int) -> str:
    return (f"cuda:{index} {name} (compute capability {capability[0]}.{capability[1]}, "
            f"{memory_bytes / 2**30:.0f} GiB)")


def describe_device(device: torch.device, amp_dtype: torch.dtype | None, processes: int) -> str:
    """:func:`device_line` for ``device`` as torch sees it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = gpu_text(device.index or 0, props.name, (props.major, props.minor), props.total_memory)
    else:
        text = f"cpu ({torch.get_num_threads()} threads per process)"
    return device_line(text, amp_dtype, processes, torch.__version__, torch.version.cuda)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def cuda_backend_settings(deterministic: bool) -> dict[str, Any]:
    """What a GPU run sets before its first kernel (see the module doc on determinism)."""
    return {
        "cudnn.benchmark": not deterministic,  # autotune convolutions for the fixed input size
        "cudnn.deterministic": deterministic,
        "use_deterministic_algorithms": deterministic,  # warn-only: ops without such a kernel warn by name
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8" if deterministic else None,  # needed by deterministic cuBLAS
    }


def apply_cuda_backend_settings(settings: dict[str, Any]) -> None:
    if settings["CUBLAS_WORKSPACE_CONFIG"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", settings["CUBLAS_WORKSPACE_CONFIG"])
    torch.backends.cudnn.benchmark = settings["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = settings["cudnn.deterministic"]
    if settings["use_deterministic_algorithms"]:
        torch.use_deterministic_algorithms(True, warn_only=True)


#: With fewer images than this per process, BatchNorm statistics are too noisy per GPU and
#: ``sync_bn: auto`` turns on SyncBatchNorm (which all-gathers in every BN layer).
SYNC_BN_BELOW = 32


def use_sync_bn(setting: str | bool, device_type: str, processes: int, batch_per_process: int) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm (``train.sync_bn``)."""
    if processes <= 1:
        return False  # one process already normalises over the whole batch
    if setting == "auto":
        return device_type == "cuda" and batch_per_process < SYNC_BN_BELOW
    if setting and device_type != "cuda":
        raise TrainingError("train.sync_bn = true needs GPUs (SyncBatchNorm does not run on the CPU); "
                            "set train.sync_bn: auto or false")
    return bool(setting)


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


@torch.no_grad()
def embed_array(model: nn.Module, images: torch.Tensor, *, grayscale: bool, device: torch.device,
                batch_size: int = 256, flip: bool = False, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Embeddings ``[N, D]`` (float32) of ``images`` ``[N, H, W, 3]`` uint8, optionally flip-fused.

    ``amp_dtype``: run the backbone under autocast in that dtype (the head stays fp32)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size].to(device), grayscale=grayscale)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            e = model(x).float()
            if flip:
                e = e + model(x.flip(-1)).float()
        out.append(e.cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def validation_auc(model: nn.Module, images: torch.Tensor, pairs: np.ndarray, *, grayscale: bool,
                   device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
    """Verification AUC of ``pairs`` ``[M, 3]`` (i, j, same), indices into ``images``."""
    from pipeline.metrics import roc_auc

    if len(pairs) == 0 or pairs[:, 2].min() == pairs[:, 2].max():
        return float("nan")
    emb = embed_array(model, images, grayscale=grayscale, device=device, amp_dtype=amp_dtype)
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
    device: torch.device = torch.device("cpu")  # where this process's collectives put their tensors

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_ok(self, ok: bool) -> bool:
        """Whether every process says ``ok`` (one all-reduce, so it also waits for all of them)."""
        if not self.enabled:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cpu":  # the thread count decides the last bits of the gradients
        torch.set_num_threads(max(1, cpu.thread_count() // max(world, 1)))
    if world <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"process {local_rank} of this machine has no GPU: {torch.cuda.device_count()} "
                                "visible; set FACEPIPE_NPROC to at most the number of GPUs")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank, device), device


class _TrainStep(nn.Module):
    """Network and loss as one module, so DistributedDataParallel syncs the class weights too.

    The backbone runs under autocast; the embedding head (see ``EmbeddingModel.forward``)
    and the loss run in fp32."""

    def __init__(self, model: nn.Module, criterion: nn.Module, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.criterion, self.amp_dtype = model, criterion, amp_dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            embeddings = self.model(x)
        return self.criterion(embeddings.float(), y)  # margins are computed in fp32


def _epoch_batches(epoch: int, n_train: int, global_batch: int, sampler, steps: int, generator: torch.Generator,
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


def first_nonfinite(values: list[float]) -> int | None:
    """Index of the first NaN or infinite value, or None."""
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), None)


def train(setup: TrainSetup, shards_dir: str | Path, model_dir: str | Path, checkpoint_dir: str | Path,
          report_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train, checkpointing every epoch; returns the final metrics dict.

    ``shards_dir`` holds ``train/`` as written by the shard stage: a local directory or
    a URL-style location (see :func:`pipeline.shards.read_shards`).

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its slice of every
    global batch (``train.batch_size`` images in all, or ``train.batch_per_device`` per
    rank) with DistributedDataParallel; only rank 0 validates and writes checkpoints,
    the model and the reports. When rank 0 fails there, every rank stops with an error.
    """
    from pipeline import losses
    from pipeline.samplers import PKBatchSampler

    torch.manual_seed(setup.seed)
    np.random.seed(setup.seed % 2**32)
    params = setup.train
    dist, device = init_distributed(pick_device(params.device))
    amp_dtype = amp_dtype_for(device.type, device_capability(device), params.amp)
    backend = cuda_backend_settings(params.deterministic) if device.type == "cuda" else None
    if backend is not None:
        apply_cuda_backend_settings(backend)
    if dist.is_main:
        print(f"[{setup.loss_name}] {describe_device(device, amp_dtype, dist.world)}", flush=True)
    use_pk = bool(losses.get(setup.loss_name).needs_pk_batches)
    global_batch, batch_per_process = batch_layout(params, dist.world, use_pk)
    data = read_shards(join_location(shards_dir, "train"))
    if len(data.identity_names) < 2:
        raise TrainingError(f"{shards_dir}/train: need at least 2 identities to train, found {len(data.identity_names)}")
    check_labels(data.labels, len(data.identity_names), f"{shards_dir}/train")
    train_idx, val_idx = split_train_val(data.labels, params.val_fraction, setup.data_seed)
    if data.image_shape()[0] != setup.image_size:
        raise TrainingError(f"shards hold {data.image_shape()[0]}px faces but align.size is {setup.image_size}")
    train_labels = torch.from_numpy(data.labels[train_idx])
    val_labels = data.labels[val_idx]
    pairs = validation_pairs(val_labels, setup.data_seed)
    # only rank 0 validates, and only the images in the sampled pairs: decoded once, here
    needed, val_pairs = validation_subset(pairs)
    val_images = torch.from_numpy(data.decode_all(val_idx[needed])) if dist.is_main else None
    # train.select_on: the test set whose pairs choose the best epoch (None: the validation pairs)
    selection = selection_set(shards_dir, params.select_on) if params.select_on != "validation" and dist.is_main \
        else None
    input_mode, fill = batch_source(data, params.decode,
                                    processes_per_machine=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    fill_workers = params.workers or cpu.thread_count()

    model, criterion = build_modules(setup, num_classes=len(data.identity_names))
    criterion.check_values = False  # labels were checked above; the sampler gives P x K batches their anchors
    if params.init_from:
        _load_initial_weights(model, Path(params.init_from))
    if params.freeze_backbone:
        model.freeze_backbone(True)
    model.to(device)
    criterion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    sync_bn = use_sync_bn(params.sync_bn, device.type, dist.world, batch_per_process)
    if sync_bn:  # one set of BatchNorm statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_module = _TrainStep(model, criterion, amp_dtype)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    runner: nn.Module = step_module
    if dist.enabled:
        runner = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=params.freeze_backbone)
    if use_pk:
        sampler = PKBatchSampler(train_labels.tolist(), params.pk_identities, params.pk_images, seed=setup.seed,
                                 num_replicas=dist.world, rank=dist.rank)
        steps_per_epoch = len(sampler)
    else:
        sampler = None
        steps_per_epoch = len(train_idx) // global_batch
    if params.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, params.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise TrainingError(
            f"{len(train_idx)} training images are fewer than one batch of {global_batch}; lower train.batch_size"
        )
    total_steps = steps_per_epoch * params.epochs
    criterion.begin_training(total_steps)  # run-length-dependent schedules (SphereFace); resume restores its state

    checkpoint_dir, model_dir, report_dir = Path(checkpoint_dir), Path(model_dir), Path(report_dir)
    checkpoint_path = checkpoint_dir / "last.pt"
    key = fingerprint(setup, data, device_type=device.type, amp_dtype=amp_dtype, global_batch=global_batch)
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

    def read_losses(unread: list[torch.Tensor], first_step: int) -> list[float]:
        """The losses of steps ``first_step``, ... (mean over the processes), read to the host in one go;
        a NaN or inf one stops the run, naming its step and the steps this read covered."""
        values = torch.stack(unread)
        if dist.enabled:  # every rank reads the same values, so all stop together
            torch.distributed.all_reduce(values)
            values /= dist.world
        host = values.cpu().tolist()
        bad = first_nonfinite(host)
        if bad is not None:
            try:
                losses.check_finite(host[bad], loss_name=setup.loss_name, step=first_step + bad,
                                    params=setup.loss_params)
            except losses.NonFiniteLossError as err:
                kept = (f"the last good checkpoint (epoch {state['epoch']}) is kept at {checkpoint_path}"
                        if checkpoint_path.is_file() else "no checkpoint had been written yet")
                covered = (f"the loss is read every {params.nan_check_every} steps; this read covered steps "
                           f"{first_step}-{first_step + len(host) - 1}")
                raise TrainingError(f"{err} ({covered}); {kept}") from None
        return host

    runner.train()
    started = time.perf_counter()
    seconds = {"data": 0.0, "compute": 0.0}
    for epoch in range(state["epoch"], params.epochs):
        generator = torch.Generator().manual_seed(setup.seed * 1000 + epoch)
        batches = _epoch_batches(epoch, len(train_idx), global_batch, sampler, steps_per_epoch, generator, dist)
        # augmentation draws of the epoch (None: flips only), moved to the device once per epoch
        draws = augment.epoch_draws(params.augment, setup.seed, epoch, len(batches), global_batch, rank=dist.rank,
                                    world=dist.world)
        if draws is not None:
            draws = draws.to(device)
        losses_seen: list[float] = []
        unread: list[torch.Tensor] = []  # this rank's loss of each step since the last read, on the device
        loader = BatchPrefetcher(fill, data.image_shape(), train_idx, train_labels, batches, workers=fill_workers,
                                 pin=device.type == "cuda")
        bar = tqdm(loader, desc=f"train {setup.loss_name} epoch {epoch + 1}/{params.epochs}", unit="batch",
                   disable=not (progress and dist.is_main), dynamic_ncols=True)
        lr = params.lr
        for k, (images, labels, flips) in enumerate(bar):
            t0 = time.perf_counter()
            x = batch_input(images.to(device, non_blocking=True), None if draws is None else draws[k], params.augment,
                            grayscale=setup.model.grayscale)
            if params.augment.flip and flips.any():  # flips are on the host: no device sync
                x = flip_rows(x, flips.to(device, non_blocking=True))
            y = labels.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            t1 = time.perf_counter()
            lr = lr_at(state["step"], total_steps, steps_per_epoch, params)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = runner(x, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if params.clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, params.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            state["step"] += 1
            unread.append(loss.detach())
            if len(unread) >= params.nan_check_every:
                losses_seen += read_losses(unread, state["step"] - len(unread))
                unread = []
                bar.set_postfix(loss=f"{losses_seen[-1]:.3f}", lr=f"{lr:.3g}")
            t2 = time.perf_counter()
            seconds["data"] += t1 - t0
            seconds["compute"] += t2 - t1
        if unread:  # the epoch's last steps, before validation and the checkpoint
            losses_seen += read_losses(unread, state["step"] - len(unread))
        seconds["data"] += loader.wait_seconds
        state["epoch"] = epoch + 1
        failure: Exception | None = None
        if dist.is_main:
            try:
                auc = validation_auc(model, val_images, val_pairs, grayscale=setup.model.grayscale, device=device,
                                     amp_dtype=amp_dtype)
                row = {"epoch": epoch + 1, "step": state["step"], "lr": lr, "train_loss": float(np.mean(losses_seen)),
                       "val_auc": auc}
                chosen_by = auc
                if selection is not None:  # the AUC on the pairs of train.select_on chooses the epoch
                    chosen_by = row["select_auc"] = validation_auc(
                        model, selection[0], selection[1], grayscale=setup.model.grayscale, device=device,
                        amp_dtype=amp_dtype)
                state["history"].append(row)
                print(f"[{setup.loss_name}] epoch {epoch + 1}: loss {np.mean(losses_seen):.4f}  val AUC {auc:.4f}"
                      + (f"  {params.select_on} AUC {chosen_by:.4f}" if selection is not None else ""))
                if (not math.isnan(chosen_by) and chosen_by > state["best_auc"]) or state["best_epoch"] == 0:
                    state["best_auc"] = chosen_by if not math.isnan(chosen_by) else -1.0
                    state["best_epoch"] = epoch + 1
                    save_model(checkpoint_dir / "best.pt", model, setup, data, epoch + 1, auc, criterion)
                _save_checkpoint(checkpoint_path, key, model, criterion, optimizer, scaler, state)
            except Exception as err:  # every rank must hear of it, or the others wait for rank 0 forever
                failure = err
        everyone_ok = dist.all_ok(failure is None)  # also the epoch's barrier
        if failure is not None:
            raise failure
        if not everyone_ok:
            raise TrainingError(f"process {dist.rank} stops: process 0 failed while validating or checkpointing "
                                f"epoch {epoch + 1} (process 0 prints why)")
        runner.train()
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
    best_row = state["history"][state["best_epoch"] - 1]
    metrics = {
        "best_epoch": state["best_epoch"],
        # the validation AUC of the chosen epoch (with select_on: validation, the AUC that chose it)
        "best_val_auc": state["best_auc"] if params.select_on == "validation" else best_row["val_auc"],
        # what chose the saved epoch: "validation" or a test set, which is then no unbiased test
        "selected_on": params.select_on,
        "selection_auc": state["best_auc"],
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
        # on a GPU the host runs ahead of the device and waits for it only when reading the losses
        "step_seconds_compute": round(seconds["compute"], 3),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "float32",
        "processes": dist.world,
        "global_batch": global_batch,
        "batch_per_process": batch_per_process,
        "sync_bn": sync_bn,
        "cudnn_benchmark": bool(backend and backend["cudnn.benchmark"]),
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


def save_model(path: Path, model: nn.Module, setup: TrainSetup, data: FaceShards, epoch: int, auc: float,
               criterion: nn.Module | None = None) -> None:
    """The deliverable of a run: weights plus what is needed to rebuild and use them.

    Besides the network: the loss's state (``criterion``: its class weights, so the classifier
    head can be applied later, see :func:`load_head`), the training identities in label order
    (``identity_names``; class k of the head is ``identity_names[k]``) and what chose the epoch
    (``selected_on``)."""
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
                "identity_names": list(data.identity_names),
                "criterion": None if criterion is None else {k: v.detach().cpu()
                                                             for k, v in criterion.state_dict().items()},
                "selected_on": setup.train.select_on,
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


def load_head(saved: dict, device: torch.device | str = "cpu") -> nn.Module | None:
    """The loss of a model saved by :func:`save_model`, with its trained state (class weights), in
    eval mode; None when the file has no loss state (older files). Its ``class_scores`` give the
    head's N-way prediction (None for losses without a classifier), ``class_centres`` the class weights."""
    from pipeline import losses

    state = saved.get("criterion")
    if state is None:
        return None
    head = losses.build(saved["loss"], num_classes=int(saved["identities"]),
                        embedding_size=int(saved["model_params"]["embedding_size"]), **saved["loss_params"])
    head.load_state_dict(state)
    return head.to(device).eval()


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
