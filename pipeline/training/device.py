"""Where training computes: CUDA probing, the device line, AMP precision and the cuDNN settings.

``device: auto`` takes the GPU when torch can use it, the CPU when the machine has none, and
stops with a one-line :class:`TrainingError` when the machine has a GPU that this torch build
cannot use (driver too old for the wheel's CUDA, a wheel without kernels for the GPU, a
CPU-only wheel) instead of training on the CPU unnoticed (:func:`choose_device`). The backbone
runs under autocast, bf16 from compute capability 8.0 on, fp16 with a gradient scaler before
(:func:`amp_dtype_for`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.training.setup import TrainingError


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
    if status.usable:
        _check_kernels(choice, status, key)
        return "cuda"
    hidden = (status.visible_devices or "").strip() in _HIDDEN
    evidence = [f"nvidia-smi: {status.driver_gpu}" if status.driver_gpu else "",
                f"torch counts {status.count} GPU(s)" if status.count else "",
                f"CUDA_VISIBLE_DEVICES={status.visible_devices}" if not hidden else ""]
    evidence = [e for e in evidence if e]
    if choice != "cuda" and not evidence:
        return "cpu"
    reason = _unusable_reason(status) if evidence else "no NVIDIA GPU or driver was found"
    if choice == "cuda":
        seen = f" ({'; '.join(evidence)})" if evidence else ""
        raise TrainingError(f"{key} = cuda but torch cannot use a GPU here{seen}: {reason}; or set {key}: cpu")
    raise TrainingError(f"{key} = auto and this machine has a GPU ({'; '.join(evidence)}) that torch cannot use: "
                        f"{reason}; or set {key}: cpu to run on the CPU")


def _check_kernels(choice: str, status: CudaStatus, key: str) -> None:
    """:class:`TrainingError` when a GPU torch sees has no kernels in this wheel (too old or too new for it)."""
    base = status.torch_version.split("+")[0]
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


def _unusable_reason(status: CudaStatus) -> str:
    """Why torch cannot use the GPU the machine shows: a CPU-only wheel, a driver too old for the
    wheel's CUDA, or a GPU hidden from this process; with what to install or check."""
    base = status.torch_version.split("+")[0]
    if status.torch_cuda is None:
        return (f"torch {status.torch_version} is a CPU-only build; install the CUDA build pinned in "
                "requirements.txt (bash scripts/setup.sh)")
    major = int(status.torch_cuda.split(".")[0])
    need = DRIVER_FOR_CUDA.get(major)
    have = _driver_major(status.driver)
    wanted = f"an NVIDIA driver >= {need}" if need else "a recent NVIDIA driver"
    if need and have is not None and have < need:
        return (f"torch {status.torch_version} is built for CUDA {status.torch_cuda}, which needs {wanted}, "
                f"and this machine has driver {status.driver}; update the driver, or install "
                f"{OLDER_WHEEL.format(version=base)}, which needs a driver >= 525")
    if have is not None:
        return (f"driver {status.driver} is recent enough for CUDA {status.torch_cuda}, so the GPU is hidden "
                "or unavailable to this process (check CUDA_VISIBLE_DEVICES, the container's GPU access and "
                "nvidia-smi)")
    return (f"torch {status.torch_version} is built for CUDA {status.torch_cuda} and needs {wanted}; "
            f"check the driver with nvidia-smi, or install {OLDER_WHEEL.format(version=base)} for "
            "drivers >= 525")


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



def gradient_scaler(amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler of a run: active only under fp16 autocast (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
