"""One optimisation step and one validation: network and loss as one module, the learning rate of
each step, and the embeddings and verification AUC that choose the best epoch.

The backbone runs under autocast (when the run has an AMP dtype); the embedding head and the
loss run in fp32. The step reads nothing back from the device (labels are checked once on the
host, the loss is read every ``nan_check_every`` steps by the loop).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainParams
from pipeline.training.data import to_input
from pipeline.training.setup import TrainSetup

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
    """``(network, loss)`` of ``setup`` for ``num_classes`` training identities, freshly initialised
    (from torch's global generator: seed it first)."""
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


class TrainStep(nn.Module):
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


def first_nonfinite(values: list[float]) -> int | None:
    """Index of the first NaN or infinite value, or None."""
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), None)

