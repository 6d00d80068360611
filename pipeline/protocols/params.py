"""The parameters of the template and distractor protocols, validated in one place.

:class:`ProtocolParams` is a frozen dataclass; :func:`ProtocolParams.from_dict` builds it from a
``params.yaml`` section and names the key of a bad value in a one-line :class:`ProtocolError`.
The three switches papers name for IJB (detector-score weighting, keeping the feature norm, flip
fusion) are ``detector_weight``, ``keep_norm`` and ``flip``; their defaults are the usual ones
(weighted, norm kept, image and mirror summed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from pipeline.protocols import ProtocolError

FLIP_MODES = ("sum", "concat", "none")
DEFAULT_FPRS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class ProtocolParams:
    """Switches and sizes of the protocols (all have defaults).

    ``flip``: ``sum`` (embedding of the image plus that of its mirror), ``concat`` (the two side by
    side, 2D features) or ``none``. ``detector_weight``: multiply each image feature by its detector
    score before pooling. ``keep_norm``: pool the raw features (their norm weighs the image) rather
    than L2-normalised ones. ``fprs``: the FPR levels of TPR@FPR; ``verdict_fpr`` the one the verdicts
    compare. ``ranks``: CMC ranks; ``fpirs``: FPIR levels of the open-set TPIR. ``distractor_sizes``:
    gallery sizes N of the distractor CMC (the first N distractors of the list; sizes above the list
    are dropped, the full list is always added); ``max_rank``: ranks kept per probe in the running
    top-k; ``distractor_fpr``: the FPR of the verification against the distractors. ``n_boot``:
    subject resamples; ``seed``: their seed; ``alpha``: family-wise error of the verdicts.
    ``batch_size``: images per forward pass; ``chunk``: distractors per matrix product.
    """

    flip: str = "sum"
    detector_weight: bool = True
    keep_norm: bool = True
    fprs: tuple[float, ...] = DEFAULT_FPRS
    verdict_fpr: float = 1e-4
    ranks: tuple[int, ...] = (1, 5, 10)
    fpirs: tuple[float, ...] = (0.01, 0.1)
    distractor_sizes: tuple[int, ...] = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
    max_rank: int = 10
    distractor_fpr: float = 1e-6
    n_boot: int = 1000
    seed: int = 0
    alpha: float = 0.05
    batch_size: int = 128
    chunk: int = 8192

    def __post_init__(self) -> None:
        if self.flip not in FLIP_MODES:
            _bad("flip", self.flip, f"one of {', '.join(FLIP_MODES)}")
        for key in ("detector_weight", "keep_norm"):
            if not isinstance(getattr(self, key), bool):
                _bad(key, getattr(self, key), "true or false")
        for key in ("fprs", "fpirs"):
            object.__setattr__(self, key, _rates(key, getattr(self, key)))
        for key in ("verdict_fpr", "distractor_fpr"):
            _rates(key, (getattr(self, key),))
        if not 0 < self.alpha < 1:
            _bad("alpha", self.alpha, "a number in (0, 1)")
        for key in ("ranks", "distractor_sizes"):
            object.__setattr__(self, key, _positive_ints(key, getattr(self, key)))
        for key, low in (("max_rank", 1), ("n_boot", 0), ("seed", 0), ("batch_size", 1), ("chunk", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                _bad(key, value, f"an integer >= {low}")
        if max(self.ranks) > self.max_rank:
            _bad("ranks", self.ranks, f"ranks up to max_rank ({self.max_rank})")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ProtocolParams":
        """From a ``params.yaml`` section; an unknown key is an error naming it."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ProtocolError(f"protocol params: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for key in ("fprs", "fpirs", "ranks", "distractor_sizes"):
            if key in values and isinstance(values[key], list):
                values[key] = tuple(values[key])
        return cls(**values)


def _bad(key: str, value: Any, expected: str) -> None:
    raise ProtocolError(f"protocol params: {key} = {value!r}; expected {expected}")


def _rates(key: str, values: Any) -> tuple[float, ...]:
    try:
        rates = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        _bad(key, values, "a list of rates in (0, 1]")
    if not rates or any(not (0 < r <= 1) or math.isnan(r) for r in rates):
        _bad(key, values, "a non-empty list of rates in (0, 1]")
    return rates


def _positive_ints(key: str, values: Any) -> tuple[int, ...]:
    try:
        ints = tuple(values)
    except TypeError:
        _bad(key, values, "a list of positive integers")
    if not ints or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ints):
        _bad(key, values, "a non-empty list of positive integers")
    return tuple(sorted(set(ints)))
