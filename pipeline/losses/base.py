"""Shared loss machinery: parameter validation, input checks, the large-margin softmax.

``LargeMarginSoftmax`` holds the class weights, L2-normalises features and
weights, scales the logits and applies cross-entropy. A margin loss overrides one
hook, ``target_logit(cos_target) -> modified cos`` (the margin applied to the
true-class cosine); the few that need more override one other documented hook
(``cosine`` for sub-centres, ``scale_factor`` for SphereFace's feature norm,
``regularizer`` for the intra/inter ablation terms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.params import SCALE, Param, auto_scale

#: Floor for 1 - cos^2 before a square root: keeps d/dcos finite at cos = +-1.
SIN2_EPS = 1e-12


def safe_sin(cos: Tensor) -> Tensor:
    """sin(theta) >= 0 from cos(theta), any shape; finite gradient at cos = +-1."""
    return (1.0 - cos * cos).clamp_min(SIN2_EPS).sqrt()


def safe_angle(cos: Tensor) -> Tensor:
    """theta = arccos(cos) in [0, pi] radians, any shape, with a finite gradient everywhere.

    ``torch.acos`` has an infinite derivative at +-1 (reached when an embedding equals
    or opposes its class weight); ``atan2(sin, cos)`` with a floored ``sin`` does not.
    Values of ``cos`` slightly outside [-1, 1] from rounding map to 0 or pi.
    """
    return torch.atan2(safe_sin(cos), cos)


def resolve_scale(loss: str, scale: float | str, num_classes: int) -> float:
    """The logit scale to use: ``scale`` itself, or for ``"auto"`` the AdaCos fixed scale
    sqrt(2) * ln(num_classes - 1) (:func:`pipeline.losses.params.auto_scale`)."""
    if scale != "auto":
        return float(scale)
    try:
        return auto_scale(num_classes)
    except ValueError as err:
        raise ValueError(f"{loss}: {err}; set a number instead") from None


def check_total_steps(loss: str, total_steps: Any) -> int:
    """``total_steps`` if it is an integer >= 1, else one-line ``ValueError`` naming the loss."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"{loss}: total_steps = {total_steps!r}; expected an integer >= 1")
    return total_steps


class LossBase(nn.Module):
    """Base of every loss: declared params, validation, input checks.

    Subclasses set ``name``, ``PARAMS`` and the two flags the trainer reads:
    ``is_classifier`` (has class ``weight`` and ``logits``) and ``needs_pk_batches``
    (batches must hold several images of each of several identities: use
    :class:`pipeline.samplers.PKBatchSampler`). Validated params are in ``self.hparams``.

    ``check_values`` (True): check each batch's VALUES too (labels in range, a P x K batch
    with a usable anchor, ...), which reads them back from a GPU and so makes the host wait
    for it. The trainer turns it off after checking every training label once on the host;
    shapes and dtypes are always checked (no device read).
    """

    name: ClassVar[str] = "base"
    PARAMS: ClassVar[dict[str, Param]] = {}
    is_classifier: ClassVar[bool] = False
    needs_pk_batches: ClassVar[bool] = False
    check_values: bool = True

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Paper defaults of every parameter."""
        return {key: spec.default for key, spec in cls.PARAMS.items()}

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``params``, each checked; ``ValueError`` on the first bad one."""
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            allowed = ", ".join(cls.PARAMS) or "none"
            raise ValueError(f"{cls.name}: unknown param {unknown[0]!r}; allowed params: {allowed}")
        out = cls.defaults()
        for key, value in params.items():
            out[key] = cls.PARAMS[key].check(cls.name, key, value)
        cls.check_combination(out)
        return out

    @classmethod
    def check_combination(cls, params: dict[str, Any]) -> None:
        """Cross-parameter checks; override to raise ``ValueError``."""

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__()
        for label, value, low in (("num_classes", num_classes, 2 if self.is_classifier else 1),
                                  ("embedding_size", embedding_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.name}: {label} = {value!r} is not allowed; expected an integer >= {low}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.hparams: dict[str, Any] = self.validate(params)

    # ---- trainer hooks (no-ops here) ---------------------------------------------------
    def begin_training(self, total_steps: int) -> None:
        """Told once by the trainer, before the first step, how many optimiser steps the run has.

        For losses whose schedule depends on the run length (SphereFace); anything it sets
        must be a buffer, so a resumed run gets it back from the checkpoint.
        """

    def state_summary(self) -> dict[str, float]:
        """Scalars describing the loss's internal state now (e.g. SphereFace's lambda), for reports."""
        return {}

    # ---- the trained head, for evaluation (closed-set identification, angle figures) -----
    def class_scores(self, embeddings: Tensor) -> Tensor | None:
        """[B, D] -> [B, C] scores of each training class without any margin (argmax = the head's
        N-way prediction), or None for losses without a classifier (triplet, contrastive)."""
        return None

    def class_centres(self) -> Tensor | None:
        """[C, D] the vector each class's features are pulled towards (the class weight), or None
        where the loss has no single one per class (pair losses; K sub-centres)."""
        return None

    def extra_repr(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}" + (f", {items}" if items else "")

    def check_inputs(self, embeddings: Tensor, labels: Tensor) -> None:
        """Raise ``ValueError`` unless embeddings is [B, D] float and labels is [B] int64 in range."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"{self.name}: embeddings must have shape [B, {self.embedding_size}], got {list(embeddings.shape)}"
            )
        if not embeddings.is_floating_point():
            raise ValueError(f"{self.name}: embeddings must be floating point, got {embeddings.dtype}")
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"{self.name}: labels must have shape [{embeddings.shape[0]}], got {list(labels.shape)}"
            )
        if labels.dtype != torch.int64:
            raise ValueError(f"{self.name}: labels must be int64, got {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError(f"{self.name}: empty batch")
        if self.is_classifier and self.check_values:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{self.name}: label {bad} is outside [0, {self.num_classes - 1}]")


class LargeMarginSoftmax(LossBase):
    """Normalised-softmax classifier with a margin on the true-class cosine.

    ``weight``: [num_classes, embedding_size] class centres (normalised on use, no bias).
    logits[i, j] = scale_factor * cos(theta_ij) for j != y_i and
    scale_factor * target_logit(cos(theta_i,y_i)) for j = y_i; loss = mean cross-entropy
    + ``regularizer``. Computation runs in float32 even under autocast.

    Hooks (override one): ``target_logit`` (the margin), ``cosine``, ``scale_factor``,
    ``regularizer``.

    ``scale``: a number, or ``"auto"``: sqrt(2) * ln(num_classes - 1), the fixed scale of
    AdaCos (6.18 for 80 classes); the value in use is ``self.scale``.

    Margin warm-up (losses whose PARAMS hold ``margin_warmup``, a fraction w in [0, 1]): the
    margin rises linearly from 0 to its value over the first w * total_steps optimiser steps,
    i.e. at training step t it is f * margin with f = min(1, t / (w * total_steps))
    (:meth:`margin_fraction`; how each loss scales its margins by f is in its ``target_logit``).
    As for SphereFace's lambda, the trainer passes the run length to :meth:`begin_training`,
    and ``iteration`` and ``total_steps`` are int64 buffers (saved in ``state_dict``, so a
    resumed run continues the ramp; they exist only when w > 0, so models trained without a
    warm-up keep their state_dict). ``iteration`` is incremented at the start of each
    training-mode forward (the first step uses t = 1); eval-mode forwards and ``logits`` use
    the current value. Before ``begin_training`` (total_steps = 0) f is 0 at iteration 0 and
    1 after; a training-mode forward without it raises ``ValueError`` while ``check_values``.
    """

    is_classifier = True
    PARAMS: ClassVar[dict[str, Param]] = {"scale": SCALE}

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.xavier_uniform_(self.weight)
        self.scale = resolve_scale(self.name, self.hparams["scale"], num_classes)
        self.warmup = float(self.hparams.get("margin_warmup", 0.0))
        if self.warmup > 0.0:
            self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
            self.register_buffer("total_steps", torch.zeros((), dtype=torch.int64))

    # ---- margin warm-up ----------------------------------------------------------
    def begin_training(self, total_steps: int) -> None:
        """Record the run length (optimiser steps) that the margin warm-up is a fraction of."""
        steps = check_total_steps(self.name, total_steps)
        if self.warmup > 0.0:
            self.total_steps.fill_(steps)

    def margin_fraction(self) -> Tensor | float:
        """f in [0, 1], the share of the margin applied now: float64 scalar tensor on the buffers'
        device (no host sync) with a warm-up, else the float 1.0."""
        if self.warmup == 0.0:
            return 1.0
        end = self.total_steps.to(torch.float64) * self.warmup
        return (self.iteration.to(torch.float64) / end.clamp_min(1e-12)).clamp(0.0, 1.0)

    def state_summary(self) -> dict[str, float]:
        """``scale`` when it was ``auto`` (the value it resolved to); ``margin_fraction`` with a warm-up."""
        out = {"scale": self.scale} if self.hparams["scale"] == "auto" else {}
        if self.warmup > 0.0:
            out["margin_fraction"] = float(self.margin_fraction())
        return out

    # ---- hooks -------------------------------------------------------------------
    def target_logit(self, cos_target: Tensor) -> Tensor:
        """Margin hook: [B] true-class cos(theta) -> [B] modified value (unscaled)."""
        return cos_target

    def cosine(self, embeddings: Tensor) -> Tensor:
        """[B, D] float32 features -> [B, C] cosine to each class."""
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight.float(), dim=1))

    def scale_factor(self, embeddings: Tensor) -> Tensor | float:
        """Multiplier of the logits: the constant ``scale`` s (or [B, 1])."""
        return self.scale

    def regularizer(self, cos: Tensor, labels: Tensor) -> Tensor | float:
        """Extra scalar added to the cross-entropy (0 for plain margin losses)."""
        return 0.0

    # ---- public API ----------------------------------------------------------------
    def class_scores(self, embeddings: Tensor) -> Tensor:
        """[B, C] cos(theta) to each class (no margin, no scale: the same argmax as the logits)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.cosine(embeddings.float())

    def class_centres(self) -> Tensor:
        return self.weight.float()

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scaled, margin-applied logits [B, C] that the cross-entropy sees."""
        return self._cos_and_logits(embeddings, labels)[1]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the batch (+ regularizer): scalar tensor."""
        self.check_inputs(embeddings, labels)
        if self.warmup > 0.0 and self.training:
            if self.check_values and int(self.total_steps) < 1:
                raise ValueError(
                    f"{self.name}: margin_warmup = {self.warmup} needs the number of training steps; call "
                    "begin_training(total_steps) before training (the trainer does), or set margin_warmup: 0"
                )
            self.iteration += 1
        cos, logits = self._cos_and_logits(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.cross_entropy(logits, labels) + self.regularizer(cos, labels)

    def _cos_and_logits(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.float()
            cos = self.cosine(x)
            index = labels.view(-1, 1)
            target = self.target_logit(cos.gather(1, index).squeeze(1))
            logits = cos.scatter(1, index, target.unsqueeze(1).to(cos.dtype))
            return cos, logits * self.scale_factor(x)


def angle_limit_message(loss: str, names: str, values: str, u: float, limit: float) -> str:
    """Message for a margin whose theta-shift past pi would make the fallback non-monotone."""
    return (
        f"{loss}: {names} = {values} shift the angle past pi by up to {u:.4f} rad; "
        f"the monotonic fallback needs at most {limit:.4f} rad (pi = {math.pi:.4f})"
    )
