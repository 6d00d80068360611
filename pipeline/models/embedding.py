"""Backbone + embedding head = :class:`EmbeddingModel`, built by :func:`build_model`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backbones import BACKBONES, available_backbones
from .heads import HEADS, EmbeddingHead

__all__ = ["MIN_INPUT_SIZE", "EmbeddingModel", "build_model", "count_parameters"]

#: Smallest accepted ``input_size`` in pixels (a 2×2 final map for stride-16 backbones).
MIN_INPUT_SIZE = 32


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class EmbeddingModel(nn.Module):
    """Face-embedding network: ``backbone`` → ``head``.

    ``forward(x)``: ``x`` float ``[B, in_channels, input_size, input_size]`` (aligned
    crops normalised to about [-1, 1]) → raw embedding ``[B, embedding_size]``, NOT
    L2-normalised. In train mode the head's final BatchNorm1d needs B ≥ 2.

    Precision: under autocast only the backbone runs in the lower precision; the head
    (BN, FC, BN) always runs in float32 on ``features.float()``, as in insightface, so the
    embedding the margin losses see is not rounded to bf16/fp16. Without autocast this
    changes nothing (fp32 throughout).

    Attributes:
        backbone: feature extractor, ``[B, C, H, W]`` → ``feature_shape`` with batch.
        head: :class:`~pipeline.models.heads.EmbeddingHead`.
        embedding_size: output dimension.
        in_channels / input_size: the input the model was built for.
        feature_shape: backbone output without the batch dim, e.g. ``(512, 7, 7)``.
        config: the :func:`build_model` keyword arguments, so that
            ``build_model(**model.config)`` rebuilds the same architecture (pass
            ``pretrained_backbone=False`` when the weights come from a checkpoint).
        backbone_frozen: whether :meth:`freeze_backbone` is in effect.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: EmbeddingHead,
        *,
        in_channels: int,
        input_size: int,
        feature_shape: tuple[int, ...],
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embedding_size = head.embedding_size
        self.in_channels = in_channels
        self.input_size = input_size
        self.feature_shape = feature_shape
        self.config: dict[str, Any] = dict(config or {})
        self.backbone_frozen = False

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, embedding_size]`` (raw embedding)."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"input has shape {list(x.shape)}; this model expects [B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}] (in_channels={self.in_channels}, "
                f"input_size={self.input_size})"
            )
        features = self.backbone(x)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the backbone for transfer learning.

        Frozen: every backbone parameter gets ``requires_grad = False`` and the whole
        backbone stays in eval mode (BatchNorm uses and keeps its running statistics)
        even after ``model.train()``; only the head trains. Unfrozen: parameters
        trainable again and the backbone follows the model's train/eval mode.
        """
        self.backbone_frozen = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def _feature_shape(body: nn.Module, in_channels: int, input_size: int) -> tuple[int, ...]:
    """Backbone output shape without the batch dim, for a ``[1, C, S, S]`` input.

    One real forward pass of a single zero image (milliseconds, even for ResNet-50). Not on
    shape-only "meta" tensors: batch norm on the meta device goes through PyTorch's
    decompositions, which import torch._dynamo, about a second of every stage's start.
    """
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            out = body(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        body.train(was_training)
    return tuple(int(s) for s in out.shape[1:])


def build_model(
    backbone: str,
    *,
    embedding_size: int = 512,
    in_channels: int = 3,
    input_size: int = 112,
    dropout: float = 0.0,
    head: str = "bn_dropout_fc_bn",
    pretrained_backbone: bool = False,
) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel`.

    Args:
        backbone: one of :func:`~pipeline.models.backbones.available_backbones`.
        embedding_size: embedding dimension (> 0; 256 or 512 in the spec).
        in_channels: 3 (RGB) or 1 (grayscale).
        input_size: side of the square input in pixels (≥ ``MIN_INPUT_SIZE``;
            112 by default, 224 also used). Stride-16 backbones end at
            ``ceil(input_size / 16)``.
        dropout: dropout probability in [0, 1) before the head's FC layer.
        head: one of ``bn_dropout_fc_bn`` (flattens the ≤7×7 map), ``pool_fc``,
            ``pool_fc_bn`` (global average pool); see :mod:`pipeline.models.heads`.
        pretrained_backbone: load torchvision ImageNet weights (ResNets only). Raises
            RuntimeError when the weights are not already in the torch hub cache.

    Raises:
        ValueError: unknown backbone/head, or an argument outside its allowed range.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; available: {available_backbones()}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; available: {list(HEADS)}")
    if _check_int("embedding_size", embedding_size) <= 0:
        raise ValueError(f"embedding_size must be > 0, got {embedding_size}")
    if _check_int("in_channels", in_channels) not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    if _check_int("input_size", input_size) < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be >= {MIN_INPUT_SIZE} pixels, got {input_size}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")

    body = BACKBONES[backbone](in_channels=in_channels, pretrained=bool(pretrained_backbone))
    feature_shape = _feature_shape(body, in_channels, input_size)

    config = dict(
        backbone=backbone,
        embedding_size=embedding_size,
        in_channels=in_channels,
        input_size=input_size,
        dropout=float(dropout),
        head=head,
        pretrained_backbone=bool(pretrained_backbone),
    )
    return EmbeddingModel(
        body,
        EmbeddingHead(head, feature_shape, embedding_size, float(dropout)),
        in_channels=in_channels,
        input_size=input_size,
        feature_shape=feature_shape,
        config=config,
    )
