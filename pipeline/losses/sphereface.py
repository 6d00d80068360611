"""SphereFace (A-Softmax) with lambda annealing: the reference (Caffe) schedule or one sized to the run."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from pipeline.losses.base import LargeMarginSoftmax, check_total_steps, safe_angle
from pipeline.losses.params import SCALE, Param


def chebyshev_cos(cos: Tensor, m: int) -> Tensor:
    """cos(m*theta) from cos(theta) via the Chebyshev recurrence; polynomial, so smooth at +-1."""
    prev, cur = torch.ones_like(cos), cos
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * cos * cur - prev
    return cur


def psi(cos: Tensor, m: int) -> Tensor:
    """A-Softmax psi(theta) = (-1)^k cos(m*theta) - 2k for theta in [k*pi/m, (k+1)*pi/m].

    ``cos``: any shape, cos(theta). Monotonically decreasing from 1 (theta = 0) to
    1 - 2m (theta = pi), continuous at the piece boundaries. k is taken without
    gradient; cos(m*theta) is a polynomial in cos(theta).
    """
    cos = cos.clamp(-1.0, 1.0)
    with torch.no_grad():
        k = torch.floor(m * safe_angle(cos) / math.pi).clamp(0, m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * chebyshev_cos(cos, m) - 2.0 * k


class SphereFace(LargeMarginSoftmax):
    """A-Softmax: weights normalised, features not; logits scaled by ||x||.

    ``normalize_features: true`` is training-time L2 normalisation of the features (the
    loss/normalisation study's switch): the logits are then scaled by the fixed ``scale``
    instead of ||x|| (non-target s*cos(theta_j), target s*(lambda*cos(theta) + psi(theta)) /
    (1 + lambda)). ``scale`` only applies then; a non-default ``scale`` without it is an error.

    Non-target logit ||x|| cos(theta_j); target logit
    ||x|| * (lambda*cos(theta) + psi(theta)) / (1 + lambda): lambda blends in plain softmax
    and is annealed from ``lambda_base`` down to the floor ``lambda_min``, where the margin
    acts fully (at theta = 0.5 with m = 4, the target is cos(theta) - 0.216 at lambda = 5
    but cos(theta) - 0.025 at lambda = 51). ``lambda_schedule`` picks how:

    * ``caffe`` (the reference Caffe layer):
      lambda = max(lambda_min, lambda_base * (1 + lambda_gamma*iteration)^(-lambda_power)).
      With the defaults it reaches the floor at iteration 1658, whatever the run length:
      a run of a few hundred steps never gets there.
    * ``fraction`` (default): the same curve, compressed in time so that it reaches
      lambda_min exactly at T = lambda_warmup_fraction * total_steps and stays there:
      lambda_gamma is replaced by g = ((lambda_base/lambda_min)^(1/lambda_power) - 1) / T,
      so lambda_base * (1 + g*T)^(-lambda_power) = lambda_min, and lambda = lambda_min for
      iteration >= T. The reference curve's shape is kept: with the defaults lambda halves
      from 1000 within the first 0.5% of T and is 9.95 at T/2, then creeps to the floor.
      ``lambda_gamma`` is not used. Needs ``lambda_min`` > 0 and ``lambda_power`` > 0
      unless lambda_base <= lambda_min (then lambda = lambda_min throughout), and the run
      length: the trainer calls :meth:`begin_training` with it; a training-mode forward
      without it raises ``ValueError``. Before then (``total_steps`` = 0) ``logits`` use
      lambda_base at iteration 0 and lambda_min after.

    ``iteration`` and ``total_steps`` (int64 buffers, saved in ``state_dict``, so a resumed
    run continues the schedule): ``iteration`` is incremented at the start of each forward
    in training mode, so the first training step uses iteration = 1, as in the reference
    Caffe layer, and the last of N steps iteration = N. Eval-mode forwards and ``logits``
    do not advance it.
    """

    name = "sphereface"
    PARAMS: ClassVar[dict[str, Param]] = {
        "margin": Param(4, int, low=1, help="integer angular multiplier m"),
        "lambda_base": Param(1000.0, float, low=0.0),
        "lambda_gamma": Param(0.12, float, low=0.0, help="caffe schedule only"),
        "lambda_power": Param(1.0, float, low=0.0),
        "lambda_min": Param(5.0, float, low=0.0),
        "lambda_schedule": Param("fraction", str, choices=("fraction", "caffe"),
                                 help="fraction: reach lambda_min at lambda_warmup_fraction of the run; "
                                      "caffe: per-iteration decay of the reference layer"),
        "lambda_warmup_fraction": Param(0.5, float, low=0.0, low_open=True, high=1.0,
                                        help="share of the training steps over which lambda decays to lambda_min"),
        "normalize_features": Param(False, bool, help="L2-normalise the features; logits scaled by scale, not ||x||"),
        "scale": Param(64.0, float, low=0.0, low_open=True, words=SCALE.words,
                       help="fixed logit scale (a number, or auto = sqrt(2)*ln(C - 1)), only with normalize_features"),
    }

    @classmethod
    def check_combination(cls, params: dict[str, Any]) -> None:
        if not params["normalize_features"] and params["scale"] != cls.PARAMS["scale"].default:
            raise ValueError(f"{cls.name}: scale = {params['scale']} needs normalize_features: true (without it the "
                             "logits are scaled by the feature norm ||x||); set normalize_features: true or remove scale")
        base, low, power = params["lambda_base"], params["lambda_min"], params["lambda_power"]
        if params["lambda_schedule"] != "fraction" or base <= low:
            return
        why = (f"{cls.name}: lambda_schedule = 'fraction' decays lambda from lambda_base = {base} to lambda_min = "
               f"{low} along lambda_base * (1 + g*iteration)^(-lambda_power)")
        if low == 0.0:
            raise ValueError(f"{why}, which never reaches lambda_min = 0.0; set lambda_min > 0 or lambda_schedule: caffe")
        if power == 0.0 or math.log(base / low) / power > 700.0:
            raise ValueError(f"{why}; lambda_power = {power} is too small for that (0 never decays, and "
                             "(lambda_base/lambda_min)^(1/lambda_power) must stay finite): raise lambda_power "
                             "or use lambda_schedule: caffe")

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.int64))
        p = self.hparams
        # fraction schedule: g * T, the rate times the length of the decay (0: no decay)
        self._decay = 0.0
        if p["lambda_schedule"] == "fraction" and p["lambda_base"] > p["lambda_min"]:  # validated above
            self._decay = (p["lambda_base"] / p["lambda_min"]) ** (1.0 / p["lambda_power"]) - 1.0

    def begin_training(self, total_steps: int) -> None:
        """Record the run length (optimiser steps) that the fraction schedule spreads lambda's decay over."""
        self.total_steps.fill_(check_total_steps(self.name, total_steps))

    def state_summary(self) -> dict[str, float]:
        return {**super().state_summary(), "lambda": self.current_lambda()}

    def lambda_tensor(self) -> Tensor:
        """lambda at the current ``iteration``: float64 scalar tensor on the buffers' device (no host sync)."""
        p = self.hparams
        it = self.iteration.to(torch.float64)
        if p["lambda_schedule"] == "caffe":
            lam = (p["lambda_base"] * (1.0 + p["lambda_gamma"] * it) ** (-p["lambda_power"]))
            return lam.clamp_min(p["lambda_min"])
        end = self.total_steps.to(torch.float64) * p["lambda_warmup_fraction"]  # T
        lam = p["lambda_base"] * (1.0 + self._decay / end.clamp_min(1e-12) * it) ** (-p["lambda_power"])
        done = (it >= end) & (it > 0)
        return torch.where(done, torch.full_like(lam, p["lambda_min"]), lam).clamp_min(p["lambda_min"])

    def current_lambda(self) -> float:
        """The annealing weight lambda at the current ``iteration``."""
        return float(self.lambda_tensor())

    def scale_factor(self, embeddings: Tensor) -> Tensor | float:
        if self.hparams["normalize_features"]:
            return self.scale
        return embeddings.norm(dim=1, keepdim=True)

    def target_logit(self, cos_target: Tensor) -> Tensor:
        lam = self.lambda_tensor().to(cos_target.dtype)
        return (lam * cos_target + psi(cos_target, self.hparams["margin"])) / (1.0 + lam)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check_inputs(embeddings, labels)  # before counting the step
        if self.training:
            if self.check_values and self.hparams["lambda_schedule"] == "fraction" and int(self.total_steps) < 1:
                raise ValueError(
                    f"{self.name}: lambda_schedule = 'fraction' needs the number of training steps; call "
                    "begin_training(total_steps) before training (the trainer does), or use lambda_schedule: caffe"
                )
            self.iteration += 1
        return super().forward(embeddings, labels)
