"""Additive / multiplicative angular-margin softmax losses (all angles in radians).

Each class overrides one hook of :class:`LargeMarginSoftmax`. ``scale`` is a number or
``auto`` (sqrt(2) * ln(C - 1)); cosface, arcface, combined and subcenter take a
``margin_warmup`` (see :class:`LargeMarginSoftmax`: at training step t the margin is f times
its value, f = min(1, t / (margin_warmup * total_steps))).

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
from pipeline.losses.params import MARGIN_WARMUP, MAX_MONOTONE_MARGIN, SCALE, Param


class NormFace(LargeMarginSoftmax):
    """NormFace: logit s*cos(theta), features and weights L2-normalised. No margin."""

    name = "normface"


class CosFace(LargeMarginSoftmax):
    """CosFace / AM-Softmax: true-class logit s*(cos(theta) - m); during a warm-up s*(cos(theta) - f*m)."""

    name = "cosface"
    PARAMS: ClassVar[dict[str, Param]] = {
        "scale": SCALE,
        "margin": Param(0.35, float, low=0.0, high=2.0, high_open=True, help="cosine margin m"),
        "margin_warmup": MARGIN_WARMUP,
    }

    def target_logit(self, cos_target: Tensor) -> Tensor:
        if self.warmup == 0.0:
            return cos_target - self.hparams["margin"]
        return cos_target - (self.margin_fraction() * self.hparams["margin"]).to(cos_target.dtype)


class ArcFace(LargeMarginSoftmax):
    """ArcFace: true-class logit s*cos(theta + m).

    ``margin`` m in radians, limited to [0, MAX_MONOTONE_MARGIN] (about 2.3311) so that
    the fallback below keeps the target logit decreasing in theta.
    ``easy_margin``: apply the margin only where cos(theta) > 0, else plain cos(theta).
    ``margin_warmup``: the margin in use is f*m (see the module doc), with the fallback of f*m.
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
        "margin_warmup": MARGIN_WARMUP,
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

    def margin_terms(self) -> tuple[Tensor | float, Tensor | float, Tensor | float, Tensor | float]:
        """(cos m, sin m, th, mm) of the margin in use now: floats, or float64 scalar tensors during a
        warm-up (m = f * margin; th = cos(pi - m) = -cos m, mm = sin(pi - m) * m = sin(m) * m)."""
        if self.warmup == 0.0:
            return self.cos_m, self.sin_m, self.th, self.mm
        m = self.margin_fraction() * self.hparams["margin"]
        cos_m, sin_m = torch.cos(m), torch.sin(m)
        return cos_m, sin_m, -cos_m, sin_m * m

    def target_logit(self, cos_target: Tensor) -> Tensor:
        cos_m, sin_m, th, mm = (t.to(cos_target.dtype) if isinstance(t, Tensor) else t for t in self.margin_terms())
        # cos(theta + m) by the addition formula: no acos, finite gradient at cos = +-1.
        phi = cos_target * cos_m - safe_sin(cos_target) * sin_m
        if self.hparams["easy_margin"]:
            return torch.where(cos_target > 0, phi, cos_target)
        return torch.where(cos_target > th, phi, cos_target - mm)


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

    No negative margin: the target logit must be at most cos(theta) for every theta in
    [0, pi]; settings that break this (e.g. m1 < 1 with m2 = m3 = 0) are rejected with
    ValueError. The fallback branch always satisfies it (it subtracts u*sin(theta*) + m3
    >= 0), so only the exact branch, theta in [0, min(pi, theta*)], is checked:
    * where m1*theta + m2 >= theta the shifted angle is at least theta, and cos falls on
      [0, pi], so cos(m1*theta + m2) - m3 <= cos(theta). This holds on the whole range when
      m1 >= 1, or when m1 < 1 and m2 >= (1 - m1)*pi (the angle is shrunk by (1 - m1)*theta,
      at most (1 - m1)*pi, and m2 gives it back). The paper's CM2 (0.9, 0.4, 0.15) is
      accepted for this reason: 0.4 >= 0.1*pi = 0.314, i.e. m1*theta + m2 >= theta up to
      theta = m2 / (1 - m1) = 4 > pi; its margin is at least m3 everywhere.
    * otherwise (m1 < 1, m2 < (1 - m1)*pi) the whole range is exact and past
      theta_c = m2 / (1 - m1) the angle is shrunk; the setting is accepted only if m3
      covers the largest excess cos(m1*theta + m2) - cos(theta) on [theta_c, pi]
      (found numerically, see :meth:`negative_margin`).

    ``margin_warmup``: the margins in use move linearly from (1, 0, 0) (NormFace) to
    (m1, m2, m3): (1 + f*(m1 - 1), f*m2, f*m3), f as in the module doc. Along that path the
    fallback shift u only grows with f (so it stays within the monotone limit) and, in the first
    case above, the shifted angle is never below theta; in the second case (m3 covering an
    excess found numerically) the intermediate settings can have a negative margin (e.g. (0.22,
    0.033, 1.77) at f = 0.89), so a warm-up is rejected there with ValueError.
    """

    name = "combined"
    PARAMS: ClassVar[dict[str, Param]] = {
        "scale": SCALE,
        "m1": Param(1.0, float, low=0.0, low_open=True, help="multiplicative angular margin"),
        "m2": Param(0.3, float, low=0.0, high=math.pi, high_open=True, help="additive angular margin (rad)"),
        "m3": Param(0.2, float, low=0.0, high=2.0, high_open=True, help="additive cosine margin"),
        "margin_warmup": MARGIN_WARMUP,
    }

    #: Excess of the target logit over cos(theta) tolerated as rounding by the
    #: negative-margin check (so a margin of exactly 0 somewhere, e.g. (1, 0, 0), passes).
    NEGATIVE_MARGIN_TOL: ClassVar[float] = 1e-9

    @classmethod
    def check_combination(cls, params: dict[str, Any]) -> None:
        m1, m2, m3 = params["m1"], params["m2"], params["m3"]
        u = cls._overshoot(m1, m2)
        if u is not None and u[1] > MAX_MONOTONE_MARGIN:
            raise ValueError(
                angle_limit_message(
                    cls.name, "(m1, m2)", f"({params['m1']}, {params['m2']})", u[1], MAX_MONOTONE_MARGIN
                )
                + "; lower m1 or m2 (use sphereface for integer multiplicative margins)"
            )
        worst = cls.negative_margin(m1, m2, m3)
        if worst is not None and params["margin_warmup"] > 0.0:
            raise ValueError(
                f"{cls.name}: margin_warmup = {params['margin_warmup']} needs m1 >= 1 or m2 >= (1 - m1)*pi = "
                f"{(1.0 - m1) * math.pi:.4f}: with (m1, m2, m3) = ({m1}, {m2}, {m3}) the settings on the way from "
                "(1, 0, 0) can have a negative margin; set margin_warmup: 0 or raise m2 or m1"
            )
        if worst is not None and worst[0] > cls.NEGATIVE_MARGIN_TOL:
            excess, theta = worst

            def up(x: float) -> str:  # rounded up, so the printed bound is enough
                return f"{math.ceil(x * 1e4) / 1e4:.4f}"

            raise ValueError(
                f"{cls.name}: (m1, m2, m3) = ({m1}, {m2}, {m3}) give a negative margin: the target logit exceeds "
                f"cos(theta) by up to {excess:.4f} (at theta = {theta:.4f} rad); raise m2 to >= (1 - m1)*pi = "
                f"{up((1.0 - m1) * math.pi)}, m3 to >= {up(excess + m3)}, or m1 to >= 1"
            )

    @staticmethod
    def negative_margin(m1: float, m2: float, m3: float) -> tuple[float, float] | None:
        """(max over theta in [0, pi] of target - cos(theta), that theta), or None.

        None when the shifted angle m1*theta + m2 is never below theta on [0, pi] (m1 >= 1,
        or m2 >= (1 - m1)*pi): then the margin is >= m3 >= 0 everywhere (class docstring). Otherwise the exact branch covers
        [0, pi] and g(theta) = cos(m1*theta + m2) - cos(theta) is > 0 only on
        (theta_c, pi], theta_c = m2 / (1 - m1); its maximum there is found on a grid of
        2049 points and refined by golden-section search on the two grid steps around the
        best point (g is smooth and, over the whole allowed range of (m1, m2), has one
        peak on that interval; checked on a dense sweep). Returns (max g - m3, argmax).
        """
        if m1 >= 1.0 or m2 >= (1.0 - m1) * math.pi:
            return None

        def g(theta: float) -> float:
            # cos(a) - cos(t) = 2 sin((t + a)/2) sin((t - a)/2): no cancellation near theta_c
            a = m1 * theta + m2
            return 2.0 * math.sin(0.5 * (theta + a)) * math.sin(0.5 * (theta - a))

        lo = m2 / (1.0 - m1)
        n = 2048
        grid = [lo + (math.pi - lo) * k / n for k in range(n + 1)]
        best = max(range(n + 1), key=lambda k: g(grid[k]))
        a, b = grid[max(best - 1, 0)], grid[min(best + 1, n)]
        ratio = (math.sqrt(5.0) - 1.0) / 2.0
        for _ in range(60):
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            if g(c) >= g(d):
                b = d
            else:
                a = c
        theta = max((grid[best], 0.5 * (a + b)), key=g)
        return g(theta) - m3, theta

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
        theta_star, penalty = self.theta_star, self.fallback_penalty
        if self.warmup > 0.0:  # (1, 0, 0) -> (m1, m2, m3); the fallback exists for every f > 0 or for none
            f = self.margin_fraction()
            m1, m2, m3 = (v.to(cos_target.dtype) for v in (1.0 + f * (m1 - 1.0), f * m2, f * m3))
            if theta_star is not None:
                theta_star = (math.pi - m2) / m1
                penalty = (math.pi - theta_star) * torch.sin(theta_star)
        theta = safe_angle(cos_target)
        phi = torch.cos(m1 * theta + m2) - m3
        if theta_star is None:
            return phi
        return torch.where(theta <= theta_star, phi, cos_target - penalty - m3)


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

    def class_centres(self) -> None:
        """K sub-centres per class, none of them *the* centre: the angle figures use the mean embedding."""
        return None

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
