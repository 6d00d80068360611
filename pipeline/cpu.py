"""CPU settings that decide results: the instruction set and the number of threads.

numpy, OpenCV, OpenBLAS, MKL, oneDNN and PyTorch each pick their fastest kernels for
the CPU they find at import time. Kernels written for different instruction sets
(AVX2 vs AVX-512) round differently in the last bit, and a last-bit difference in a
float pixel can flip a uint8 value: the same seed then renders slightly different
synthetic faces on two machines, and every number downstream moves.

:func:`pin_instruction_set` caps every one of those libraries at AVX2 + FMA (x86-64-v3,
which every x86 server since 2013 has) through the environment variables they read
when they load. It must run before numpy, cv2 or torch is imported, so
``python -m pipeline`` calls it first; a library already loaded in the process is not
affected. Variables the user has already set are left alone, and
``FACEPIPE_NATIVE_CPU=1`` skips the pinning (fastest kernels, results tied to the CPU).
Off x86-64 it does nothing.

The thread count matters too: PyTorch splits convolution gradients and reductions
across its threads, so 1, 2 and 3 threads train to different last bits.
:func:`thread_count` is the one number every stage uses: the cores this process may
run on, or ``FACEPIPE_THREADS`` when set.

What this buys, as measured: on one host, reruns are bit-identical end to end; on
another x86-64 host (an AMD EPYC against the Intel Xeon of the committed run, same
thread count) the synthetic data, detection, alignment and shards were bit-identical,
but training was not: oneDNN's convolution kernels choose their loop blocking from the
host's cache sizes, which no environment variable pins, and the last-bit differences
grow over a run (up to 0.03 AUC for one run). That is why the report compares losses
over several training seeds: a difference between losses is a result only when it
exceeds the run-to-run variation, which covers such drift. ``bench/bench_conv_path.py``
measures what running convolutions without oneDNN (im2col + MKL, which MKL_CBWR pins)
would cost.
"""

from __future__ import annotations

import os
import platform

# variable -> value that caps the library at AVX2 (+FMA); read once, when the library loads
PINNED_ENVIRONMENT: dict[str, str] = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512_SKX",  # numpy's dispatch
    "OPENCV_CPU_DISABLE": "AVX512-SKX",  # OpenCV dispatch
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS inside numpy and OpenCV
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility mode
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: PyTorch's CPU convolutions and matmuls
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels
}
# Idle OpenMP threads sleep instead of spinning. With spinning (the default), a thread that
# has finished its share of a parallel region keeps its core busy for a while; when
# another process wants that core (DVC itself, a second job), PyTorch's threads slow
# each other down several-fold (measured: a 64 px training step 211 ms spinning vs 68 ms
# passive with one competing process on 2 cores). Scheduling only: results are unchanged.
SCHEDULING_ENVIRONMENT: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
NATIVE_SWITCH = "FACEPIPE_NATIVE_CPU"
THREADS_VARIABLE = "FACEPIPE_THREADS"


def _native_requested(env) -> bool:
    return env.get(NATIVE_SWITCH, "").strip().lower() in {"1", "true", "yes", "on"}


def _is_x86() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64"}


def pin_instruction_set(environ: os._Environ[str] | dict[str, str] | None = None) -> dict[str, str]:
    """Set the variables of :data:`PINNED_ENVIRONMENT` that are not set yet; return what was set.

    Does nothing off x86-64, when ``FACEPIPE_NATIVE_CPU`` is set to a true value, or for
    a variable the caller already set (so a user's own choice wins). The scheduling
    variables of :data:`SCHEDULING_ENVIRONMENT` are set in every case (same rule: never
    over a user's own value).
    """
    env = os.environ if environ is None else environ
    scheduling = {name: value for name, value in SCHEDULING_ENVIRONMENT.items() if name not in env}
    env.update(scheduling)
    if _native_requested(env) or not _is_x86():
        return scheduling
    applied = scheduling | {name: value for name, value in PINNED_ENVIRONMENT.items() if name not in env}
    env.update(applied)
    return applied


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the whole machine)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(environ: os._Environ[str] | dict[str, str] | None = None) -> int:
    """Threads for PyTorch on the CPU: ``FACEPIPE_THREADS`` if set, else :func:`available_cores`.

    Raises :class:`~pipeline.config.ConfigError` (exit status 2) naming the variable when
    it is not a positive integer.
    """
    from pipeline.config import ConfigError

    env = os.environ if environ is None else environ
    raw = env.get(THREADS_VARIABLE, "").strip()
    if not raw:
        return available_cores()
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{THREADS_VARIABLE}={raw!r}: expected a positive whole number of threads (or unset)")
    return value


def kernels() -> str:
    """Which kernels this process's numeric libraries run: ``avx2`` (pinned), ``native`` or the machine."""
    if _native_requested(os.environ):
        return "native"
    if not _is_x86():
        return platform.machine().lower()
    if all(os.environ.get(name) == value for name, value in PINNED_ENVIRONMENT.items()):
        return "avx2"
    return "mixed"  # some variables set by the user to other values
