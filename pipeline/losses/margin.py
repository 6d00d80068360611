"""Additive / multiplicative angular-margin softmax losses (all angles in radians).

Each class overrides one hook of :class:`LargeMarginSoftmax`:

* normface   s * cos(theta)
* cosface    s * (cos(theta) - m)
* arcface    s * cos(theta + m), with the theta + m > pi fallback, optional easy margin
* combined   s * (cos(m1*theta + m2) - m3), with the same family of fallback
* subcenter  arcface on the best of K sub-centres per class (overrides ``cosine``)
* intra / inter  normface + the ArcFace-paper ablation terms (override ``regularizer``)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.base import LargeMarginSoftmax, angle_limit_message, safe_angle, safe_sin
from pipeline.losses.params import MAX_MONOTONE_MARGIN, SCALE, Param


class NormFace(LargeMarginSoftmax):
    """NormFace: logit s*cos(theta), features and weights L2-normalised. No margin."""

    name = "normface"


class CosFace(LargeMarginSoftmax):
    """CosFace / AM-Softmax: true-class logit s*(cos(theta) - m)."""

    name = "cosface"
    PARAMS: ClassVar[dict[str, Param]] = {
        "scale": SCALE,
        "margin": Param(0.35, float, low=0.0, high=2.0, high_open=True, help="cosine margin m"),
    }

    def target_logit(self, cos_target: Tensor) -> Tensor:
        return cos_target - self.hparams["margin"]


class ArcFace(LargeMarginSoftmax):
    """ArcFace: true-class logit s*cos(theta + m).

    ``margin`` m in radians, limited to [0, MAX_MONOTONE_MARGIN] (about 2.3311) so that
    the fallback below keeps the target logit decreasing in theta.
    ``easy_margin``: apply the margin only where cos(theta) > 0, else plain cos(theta).
    """

    name = "arcface"
    PARAMS: ClassVar[dict[str, Param]] = {
        "scale": SCALE,
        "margin": Param(
            0.5,
            float,
            low=0.0,
            high=MAX_MONOTONE_MARGIN,
            help="additive angular margin m (rad)",
            note="radians; beyond this the theta + m > pi fallback is no longer monotone",
        ),
        "easy_margin": Param(False, bool, help="margin only where cos(theta) > 0"),
    }

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        m = self.hparams["margin"]
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        # Switch point and fallback penalty (the well-known th / mm pair):
        # cos(theta + m) only decreases in theta while theta + m <= pi; beyond
        # theta = pi - m it would turn back up and reward moving *away* from the class.
        # There we use the CosFace-like penalty cos(theta) - m*sin(pi - m): the first-order
        # expansion cos(theta + m) ~ cos(theta) - m*sin(theta), with sin(theta) frozen at its
        # value at the switch point. th = cos(pi - m) is that point in cosine terms. The
        # fallback is decreasing in theta and starts below -1 (cos m + m sin m >= 1 for the
        # allowed margins), so the whole target logit is monotone, with a small downward step.
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def target_logit(self, cos_target: Tensor) -> Tensor:
        # cos(theta + m) by the addition formula: no acos, finite gradient at cos = +-1.
        phi = cos_target * self.cos_m - safe_sin(cos_target) * self.sin_m
        if self.hparams["easy_margin"]:
            return torch.where(cos_target > 0, phi, cos_target)
        return torch.where(cos_target > self.th, phi, cos_target - self.mm)


class Combined(LargeMarginSoftmax):
    """Combined margin (ArcFace paper): true-class logit s*(cos(m1*theta + m2) - m3).

    (1, m, 0) is ArcFace, (1, 0, m) CosFace, (1, 0, 0) NormFace; the paper's CM1 is
    (1, 0.3, 0.2) and CM2 (0.9, 0.4, 0.15).

    Fallback: when m1*pi + m2 > pi the shifted angle leaves [0, pi] for theta beyond
    theta* = (pi - m2)/m1. There, as in ArcFace, the logit is
    cos(theta) - u*sin(theta*) - m3 with u = pi - theta* the angle added at theta*
    (u = m, theta* = pi - m reproduces ArcFace's th/mm rule exactly). It is decreasing in
    theta and starts at or below the exact branch's value -1 - m3 whenever
    u <= MAX_MONOTONE_MARGIN; combinations with larger u (e.g. m1 = 4) are rejected
    with ValueError (use ``sphereface`` for integer multiplicative margins).
    """

    name = "combined"
    PARAMS: ClassVar[dict[str, Param]] = {
        "scale": SCALE,
        "m1": Param(1.0, float, low=0.0, low_open=True, help="multiplicative angular margin"),
        "m2": Param(0.3, float, low=0.0, high=math.pi, high_open=True, help="additive angular margin (rad)"),
        "m3": Param(0.2, float, low=0.0, high=2.0, high_open=True, help="additive cosine margin"),
    }

    @classmethod
    def check_combination(cls, params: dict[str, Any]) -> None:
        u = cls._overshoot(params["m1"], params["m2"])
        if u is not None and u[1] > MAX_MONOTONE_MARGIN:
            raise ValueError(
                angle_limit_message(
                    cls.name, "(m1, m2)", f"({params['m1']}, {params['m2']})", u[1], MAX_MONOTONE_MARGIN
                )
                + "; lower m1 or m2 (use sphereface for integer multiplicative margins)"
            )

    @staticmethod
    def _overshoot(m1: float, m2: float) -> tuple[float, float] | None:
        """(theta*, u) if m1*theta + m2 exceeds pi for some theta in [0, pi], else None."""
        if m1 * math.pi + m2 <= math.pi:
            return None
        theta_star = (math.pi - m2) / m1
        return theta_star, math.pi - theta_star

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        over = self._overshoot(self.hparams["m1"], self.hparams["m2"])
        self.theta_star = None if over is None else over[0]
        self.fallback_penalty = 0.0 if over is None else over[1] * math.sin(over[0])

    def target_logit(self, cos_target: Tensor) -> Tensor:
        m1, m2, m3 = self.hparams["m1"], self.hparams["m2"], self.hparams["m3"]
        theta = safe_angle(cos_target)
        phi = torch.cos(m1 * theta + m2) - m3
        if self.theta_star is None:
            return phi
        return torch.where(theta <= self.theta_star, phi, cos_target - self.fallback_penalty - m3)


class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace: K sub-centres per class, the class cosine is their max.

    ``weight`` has shape [num_classes * K, embedding_size]; rows c*K .. c*K + K - 1
    belong to class c (it is viewed as [num_classes, K, embedding_size] for the max).
    ``logits`` still returns [B, num_classes]. Dropping non-dominant sub-centres later
    in training (the paper's second phase) is not done here.
    """

    name = "subcenter"
    PARAMS: ClassVar[dict[str, Param]] = {
        **ArcFace.PARAMS,
        "subcenters": Param(3, int, low=1, help="sub-centres per class K"),
    }

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        k = self.hparams["subcenters"]
        self.weight = nn.Parameter(torch.empty(num_classes * k, embedding_size))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, embeddings: Tensor) -> Tensor:
        all_cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight.float(), dim=1))
        return all_cos.view(embeddings.shape[0], self.num_classes, self.hparams["subcenters"]).amax(dim=2)


class IntraLoss(LargeMarginSoftmax):
    """ArcFace-paper ablation 'Intra-Loss': normface + mean true-class angle / pi."""

    name = "intra"

    def regularizer(self, cos: Tensor, labels: Tensor) -> Tensor:
        return safe_angle(cos.gather(1, labels.view(-1, 1))).mean() / math.pi


class InterLoss(LargeMarginSoftmax):
    """ArcFace-paper ablation 'Inter-Loss': normface - mean angle between class centres / pi.

    For each sample i the mean over j != y_i of arccos(W_yi . W_j) (normalised weights),
    averaged over the batch and divided by pi, is subtracted from the cross-entropy.
    """

    name = "inter"

    def regularizer(self, cos: Tensor, labels: Tensor) -> Tensor:
        w = F.normalize(self.weight.float(), dim=1)
        angles = safe_angle(w[labels] @ w.T)  # [B, C]
        others = torch.ones_like(angles).scatter(1, labels.view(-1, 1), 0.0)
        per_sample = (angles * others).sum(1) / (self.num_classes - 1)
        return -per_sample.mean() / math.pi
