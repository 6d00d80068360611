"""The process group of a ``torchrun`` job: which process this is, and the few collectives the trainer uses.

Under ``torchrun`` (``WORLD_SIZE > 1``) every process trains on its slice of each global batch
with DistributedDataParallel (NCCL on GPUs, gloo on the CPU); only process 0 validates and
writes checkpoints, and it alone decides what every process resumes from
(:func:`pipeline.training.checkpoint.resume`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline import cpu
from pipeline.training.setup import TrainingError


@dataclass
class Distributed:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when run plainly).

    ``local_world``: the training processes on this machine, which share its cores and memory."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where this process's collectives put their tensors
    local_world: int = 1

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

    def share(self, value: int) -> int:
        """Process 0's ``value`` on every process (the others' ``value`` is ignored)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor.item())

    def share_bytes(self, payload: bytes | None, size: int) -> bytes:
        """Process 0's ``payload`` of ``size`` bytes on every process; every process must know ``size``
        (see :meth:`share`), the others pass None."""
        if not self.enabled:
            return payload if payload is not None else b""
        if size == 0:
            return b""
        if self.is_main:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        torch.distributed.broadcast(buffer, src=0)
        return payload if self.is_main else buffer.cpu().numpy().tobytes()


def local_processes(environ: dict[str, str] | None = None) -> int:
    """The training processes on this machine: ``LOCAL_WORLD_SIZE`` (set by torchrun), else
    ``WORLD_SIZE`` (a launcher that does not say: as if all were here), else 1."""
    env = os.environ if environ is None else environ
    return max(1, int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1))


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU).

    On the CPU each process takes its share of this machine's threads (:func:`pipeline.cpu.thread_count`
    divided by the processes on the machine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = local_processes() if world > 1 else 1
    if device.type == "cpu":  # the thread count decides the last bits of the gradients
        torch.set_num_threads(max(1, cpu.thread_count() // local_world))
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
    return Distributed(rank, world, local_rank, device, local_world), device
