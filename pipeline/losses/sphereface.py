"""SphereFace (A-Softmax) with the reference implementation's lambda annealing."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from pipeline.losses.base import LargeMarginSoftmax, safe_angle
from pipeline.losses.params import Param


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

    Non-target logit ||x|| cos(theta_j); target logit
    ||x|| * (lambda*cos(theta) + psi(theta)) / (1 + lambda), with
    lambda = max(lambda_min, lambda_base * (1 + lambda_gamma*iteration)^(-lambda_power)).
    ``iteration`` (int64 buffer, saved in ``state_dict``) is incremented at the start of
    each forward in training mode, so the first training step uses iteration = 1, as in
    the reference Caffe layer. Eval-mode forwards and ``logits`` do not advance it.
    """

    name = "sphereface"
    PARAMS: ClassVar[dict[str, Param]] = {
        "margin": Param(4, int, low=1, help="integer angular multiplier m"),
        "lambda_base": Param(1000.0, float, low=0.0),
        "lambda_gamma": Param(0.12, float, low=0.0),
        "lambda_power": Param(1.0, float, low=0.0),
        "lambda_min": Param(5.0, float, low=0.0),
    }

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    def current_lambda(self) -> float:
        """The annealing weight lambda at the current ``iteration``."""
        p = self.hparams
        value = p["lambda_base"] * (1.0 + p["lambda_gamma"] * int(self.iteration)) ** (-p["lambda_power"])
        return max(p["lambda_min"], value)

    def scale_factor(self, embeddings: Tensor) -> Tensor:
        return embeddings.norm(dim=1, keepdim=True)

    def target_logit(self, cos_target: Tensor) -> Tensor:
        p = self.hparams
        # Same formula as current_lambda, as a tensor: no host sync on GPU.
        it = self.iteration.to(torch.float64)
        lam = (p["lambda_base"] * (1.0 + p["lambda_gamma"] * it) ** (-p["lambda_power"]))
        lam = lam.clamp_min(p["lambda_min"]).to(cos_target.dtype)
        return (lam * cos_target + psi(cos_target, p["margin"])) / (1.0 + lam)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check_inputs(embeddings, labels)  # before counting the step
        if self.training:
            self.iteration += 1
        return super().forward(embeddings, labels)
