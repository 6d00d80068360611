"""Declared loss hyper-parameters: defaults, types and allowed ranges.

Every loss class lists its parameters as ``PARAMS = {"name": Param(...)}``. The
registry validates a user's params against that table (unknown name, wrong type,
out-of-range value -> one-line ``ValueError`` naming the parameter, the value and
what is allowed), so ``params.yaml`` is checked without building a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One loss hyper-parameter.

    ``kind`` is ``float``, ``int``, ``bool`` or ``str``. Numeric bounds are
    inclusive unless ``low_open`` / ``high_open``; ``None`` means unbounded.
    ``choices`` restricts a ``str`` parameter; ``words`` are strings a numeric parameter also
    accepts (e.g. ``"auto"`` for the logit scale), returned unchanged.
    """

    default: Any
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    words: tuple[str, ...] = ()
    help: str = ""
    note: str = ""  # why the range is what it is; appended to the error message

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is int and self.high is None and self.low is not None and not self.low_open:
            return f"an integer >= {self.low:g}"
        lo = "-inf" if self.low is None else f"{self.low:.6g}"
        hi = "inf" if self.high is None else f"{self.high:.6g}"
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        what = "an integer" if self.kind is int else "a number"
        words = "".join(f" or {word!r}" for word in self.words)
        return f"{what} in {left}{lo}, {hi}{right}{words}"

    def check(self, loss: str, name: str, value: Any) -> Any:
        """Return ``value`` coerced to ``kind``; raise ``ValueError`` if not allowed."""

        def bad() -> ValueError:
            why = f" ({self.note})" if self.note else ""
            return ValueError(f"{loss}: param {name!r} = {value!r} is not allowed; expected {self.allowed()}{why}")

        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad()
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                raise bad()
            return value
        if isinstance(value, str) and value in self.words:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise bad()
        if self.kind is int:
            if float(value) != int(value):
                raise bad()
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad()
        return value


def _monotone_shift_limit() -> float:
    """Largest angle shift u in (0, pi) with cos(u) + u*sin(u) >= 1 (about 2.3311 rad).

    The standard ArcFace fallback past theta = pi - u is ``cos(theta) - u*sin(u)``. At the
    switch point it gives ``-cos(u) - u*sin(u)`` where the exact branch gives -1, so
    the target logit keeps decreasing in theta exactly when cos(u) + u*sin(u) >= 1.
    f(u) = cos u + u sin u has f(0) = 1, rises until pi/2 and falls below 1 once, so
    bisection on [pi/2, pi] finds the limit.
    """
    lo, hi = math.pi / 2, math.pi
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if math.cos(mid) + mid * math.sin(mid) >= 1.0:
            lo = mid
        else:
            hi = mid
    return lo


#: Largest margin (radians) for which the theta + m > pi fallback keeps the target
#: logit monotonically decreasing in theta.
MAX_MONOTONE_MARGIN: float = _monotone_shift_limit()

def auto_scale(num_classes: int) -> float:
    """The fixed logit scale of AdaCos (Zhang et al., 2019) for ``num_classes`` classes: sqrt(2) * ln(C - 1).

    Chosen there so that a sample whose target cosine is at the decision boundary still has a
    useful target probability; 6.18 for C = 80, 13.02 for C = 10,000. Needs C >= 3 (0 for C = 2).
    """
    if num_classes < 3:
        raise ValueError(f"scale: auto needs at least 3 classes (sqrt(2)*ln(C - 1) = 0 for C = {num_classes})")
    return math.sqrt(2.0) * math.log(num_classes - 1)


#: The logit scale of the normalised losses: a number, or ``"auto"`` = :func:`auto_scale` of the class count.
SCALE = Param(64.0, float, low=0.0, low_open=True, words=("auto",),
              help="logit scale s, or auto = sqrt(2)*ln(C - 1) for C classes (AdaCos' fixed scale)")

#: Margin warm-up of the additive-margin losses: the share of the training steps over which
#: the margin rises linearly from 0 to its value (0 = the full margin from the first step).
MARGIN_WARMUP = Param(0.0, float, low=0.0, high=1.0,
                      help="fraction of the training steps over which the margin rises linearly from 0 to its value")
