"""Face-recognition losses behind one registry.

    loss = build("arcface", num_classes=10, embedding_size=128, margin=0.5)
    value = loss(embeddings, labels)          # [B, 128] float, [B] int64 -> scalar

Every loss is an ``nn.Module`` with ``forward(embeddings [B, D], labels [B] int64)
-> scalar`` and the class flags ``is_classifier`` (has ``weight`` and
``logits(embeddings, labels) -> [B, C]``) and ``needs_pk_batches`` (train with
:class:`pipeline.samplers.PKBatchSampler`). State that must survive a checkpoint
(SphereFace's ``iteration`` and ``total_steps``, center loss's ``centers``) is a buffer.

Two hooks for the trainer, no-ops by default: ``begin_training(total_steps)``, called
once before the first step (SphereFace sizes its lambda schedule to the run, and a
``margin_warmup`` of CosFace, ArcFace, combined and sub-center its margin ramp), and
``state_summary() -> dict[str, float]``, written to the run's metrics as ``loss_state``
(SphereFace: the lambda reached; a warm-up's ``margin_fraction``; ``scale`` when it is
``auto``, i.e. sqrt(2)*ln(C - 1) for C classes). A loss that changes state inside ``forward`` (center
loss's centres) must make the change from the global batch when several processes train
(see ``CenterLoss``).

Adding a loss: a small subclass (usually of ``LargeMarginSoftmax``, overriding
``target_logit``), an entry in ``REGISTRY`` and a test in ``tests/test_losses.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.losses.base import LargeMarginSoftmax, LossBase, safe_angle
from pipeline.losses.guard import NonFiniteLossError, check_finite
from pipeline.losses.margin import ArcFace, Combined, CosFace, InterLoss, IntraLoss, NormFace, SubCenterArcFace
from pipeline.losses.pairs import ContrastiveLoss, TripletLoss
from pipeline.losses.params import MARGIN_WARMUP, MAX_MONOTONE_MARGIN, Param, auto_scale
from pipeline.losses.softmax import CenterLoss, Softmax
from pipeline.losses.sphereface import SphereFace, psi

REGISTRY: dict[str, type[LossBase]] = {
    cls.name: cls
    for cls in (
        Softmax,
        NormFace,
        SphereFace,
        CosFace,
        ArcFace,
        Combined,
        SubCenterArcFace,
        TripletLoss,
        ContrastiveLoss,
        CenterLoss,
        IntraLoss,
        InterLoss,
    )
}


def available() -> list[str]:
    """Names of the registered losses, in registry order."""
    return list(REGISTRY)


def get(name: str) -> type[LossBase]:
    """The loss class registered as ``name``; ``ValueError`` listing the known names."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(REGISTRY)}") from None


def defaults(name: str) -> dict[str, Any]:
    """Paper defaults of the params of loss ``name`` (a fresh dict)."""
    return get(name).defaults()


def validate_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a params section of loss ``name``; return it merged over the defaults.

    Raises ``ValueError`` naming the loss, the offending param, its value and what is
    allowed (unknown param, wrong type, out of range, unsupported combination).
    """
    return get(name).validate(dict(params or {}))


def build(name: str, num_classes: int, embedding_size: int, **params: Any) -> LossBase:
    """Instantiate loss ``name`` for ``num_classes`` identities and ``embedding_size``-D embeddings."""
    return get(name)(num_classes, embedding_size, **params)


__all__ = [
    "REGISTRY",
    "MARGIN_WARMUP",
    "MAX_MONOTONE_MARGIN",
    "ArcFace",
    "CenterLoss",
    "Combined",
    "ContrastiveLoss",
    "CosFace",
    "InterLoss",
    "IntraLoss",
    "LargeMarginSoftmax",
    "LossBase",
    "NonFiniteLossError",
    "NormFace",
    "Param",
    "Softmax",
    "SphereFace",
    "SubCenterArcFace",
    "TripletLoss",
    "auto_scale",
    "available",
    "build",
    "check_finite",
    "defaults",
    "get",
    "psi",
    "safe_angle",
    "validate_params",
]
