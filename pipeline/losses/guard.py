"""Stop training on a NaN or infinite loss, with a message that says what to change."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

_MARGIN_LOSSES = {"arcface", "cosface", "subcenter"}
_SCALE_LOSSES = {"normface", "intra", "inter"}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite. Attributes: loss_name, step, value."""

    def __init__(self, message: str, *, loss_name: str, step: int, value: float) -> None:
        super().__init__(message)
        self.loss_name = loss_name
        self.step = step
        self.value = value


def _fmt(params: Mapping[str, Any], *keys: str) -> str:
    return ", ".join(f"{k}={params[k]}" for k in keys if k in params)


def likely_cause(loss_name: str, params: Mapping[str, Any]) -> str:
    """One-line hint for a diverged loss, naming the params that usually cause it."""
    # params.yaml section of the loss (ArcFace's is the short ``loss``, see pipeline.config)
    section = "loss" if loss_name == "arcface" else f"losses.{loss_name}"
    if loss_name in _MARGIN_LOSSES:
        shown = _fmt(params, "margin", "scale") or "margin, scale"
        return f"large margins ({shown}) are known to diverge: lower {section}.margin or the learning rate"
    if loss_name == "combined":
        shown = _fmt(params, "m1", "m2", "m3", "scale") or "m1, m2, m3"
        return f"large margins ({shown}) are known to diverge: lower {section}.m1/m2/m3 or the learning rate"
    if loss_name == "sphereface":
        shown = _fmt(params, "margin", "lambda_min") or "margin, lambda_min"
        return (
            f"large angular margins with little softmax blending ({shown}) are known to diverge: "
            f"raise {section}.lambda_min, lower {section}.margin, or lower the learning rate"
        )
    if loss_name in _SCALE_LOSSES:
        shown = _fmt(params, "scale") or "scale"
        return f"a large logit scale ({shown}) with a high learning rate can overflow: lower the learning rate or {section}.scale"
    if loss_name == "center":
        shown = _fmt(params, "center_weight", "center_lr") or "center_weight"
        return f"the learning rate is probably too high ({shown}): lower the learning rate or {section}.center_weight"
    if loss_name in {"triplet", "contrastive"}:
        return "the embeddings diverged (often a too-high learning rate): lower the learning rate"
    return "the learning rate is probably too high: lower it, and check the input data for NaN"


def check_finite(loss: Tensor | float, *, loss_name: str, step: int, params: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` (a scalar) is NaN or +-inf.

    Reads the value to the host (one device sync).
    """
    value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if math.isfinite(value):
        return
    kind = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    message = f"{loss_name} loss became {kind} at step {step}; {likely_cause(loss_name, params or {})}"
    raise NonFiniteLossError(message, loss_name=loss_name, step=step, value=value)
