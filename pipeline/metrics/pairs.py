"""Validated per-pair inputs, and scores ranked once (the base of every ROC-type metric)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _check_pairs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(scores float64[N], labels bool[N])`` or raise ValueError."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one score per pair); got shape {s.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per pair); got shape {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.shape[0] == 0:
        raise ValueError("no pairs: scores and labels are empty")
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise ValueError(f"scores must be real numbers; got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"scores must be finite; scores[{i}] = {s[i].item()!r} "
            f"({int(bad.sum())} non-finite in total)"
        )
    if y.dtype == np.bool_:
        yb = y
    else:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise ValueError(f"labels must be 0/1 numbers or bools; got dtype {y.dtype}")
        ok = (y == 0) | (y == 1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"labels must be 0 (different) or 1 (same); labels[{i}] = {y[i].item()!r}"
            )
        yb = y == 1
    n_pos = int(np.count_nonzero(yb))
    if n_pos == 0 or n_pos == yb.shape[0]:
        raise ValueError(
            "labels must contain both classes (1 = same, 0 = different); got "
            f"{n_pos} positive and {yb.shape[0] - n_pos} negative pairs"
        )
    return s, yb


def _fold_codes(folds: Any, n: int) -> tuple[np.ndarray, list]:
    """Map fold ids to codes 0..K-1 (sorted ids). Returns ``(codes int64[N], ids)``."""
    f = np.asarray(folds)
    if f.ndim != 1 or f.shape[0] != n:
        raise ValueError(f"folds must be 1-D with one fold id per pair ({n}); got shape {f.shape}")
    if not (np.issubdtype(f.dtype, np.integer) or f.dtype.kind in "UST"):
        raise ValueError(f"fold ids must be integers or strings; got dtype {f.dtype}")
    ids, codes = np.unique(f, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), [v.item() for v in ids]


# ------------------------------------------------------------------------ ranked scores
@dataclass(frozen=True)
class _Ranked:
    """Scores sorted once, descending, grouped by distinct value.

    ``order``: int[N] indices that sort the scores descending; ``values``: float[G] the
    distinct scores (descending); ``starts``: int[G] start of each group in sorted order;
    ``pos`` / ``neg``: int64[G] positives / negatives in each group.
    """

    order: np.ndarray
    values: np.ndarray
    starts: np.ndarray
    pos: np.ndarray
    neg: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())


def _group_starts(sorted_scores: np.ndarray) -> np.ndarray:
    new = np.empty(sorted_scores.shape[0], dtype=bool)
    new[:1] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new[1:])
    return np.flatnonzero(new)


def _rank(s: np.ndarray, y: np.ndarray) -> _Ranked:
    order = np.argsort(s)[::-1]  # ties are grouped below, so the tie order is irrelevant
    ss = s[order]
    starts = _group_starts(ss)
    ys = y[order].astype(np.int64)
    if starts.shape[0] == s.shape[0]:  # no ties: every group is one pair
        return _Ranked(order, ss, starts, ys, 1 - ys)
    pos = np.add.reduceat(ys, starts)
    sizes = np.diff(np.append(starts, s.shape[0]))
    return _Ranked(order, ss[starts], starts, pos, sizes - pos)
