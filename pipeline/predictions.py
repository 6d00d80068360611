"""Prediction files: one decision per pair at a fixed threshold, for people and other tools.

Written by the score stage for every run and test set (primary scoring variant,
``data/scores/<set>/RUN/<set>_<RUN>_predict.txt``) and by ``python -m pipeline
predict`` for any pairs file. Format: UTF-8 text, tab-separated, one header line, then
one line per pair in the order of the pairs file::

    path1   path2   score   decision   same

* ``path1``, ``path2``: the two images (the score stage writes the source paths the
  data stage resolved; ``predict`` writes them as the pairs file lists them).
* ``score``: the pair's score, higher = more likely the same person (cosine similarity,
  or minus the L2 distance), written so that it reads back to the same float; empty when
  an image of the pair could not be used (missing, unreadable, no face: dropped at
  detection; ``predict`` lists each such image and why in ``<file stem>_rejects.csv``).
* ``decision``: ``1`` (same person: score > threshold), ``0`` (different), or ``n/a``
  when there is no score.
* ``same``: the label, ``1`` / ``0``, or empty for an unlabelled pairs file.

Paths containing a tab or a newline cannot be written (``ValueError``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.io import atomic_file

COLUMNS = ("path1", "path2", "score", "decision", "same")
NOT_DECIDED = "n/a"


def file_name(test_set: str, model: str) -> str:
    """``<set>_<model>_predict.txt``."""
    return f"{test_set}_{model}_predict.txt"


def _score_text(value: Any) -> str:
    if value is None or value is pd.NA:
        return ""
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def _label_text(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if int(value) not in (0, 1):
        raise ValueError(f"labels are 0 or 1; got {value!r}")
    return str(int(value))


def prediction_lines(path1: Sequence[str], path2: Sequence[str], scores: Sequence[float],
                     decisions: Sequence[Any], labels: Sequence[Any] | None = None) -> list[str]:
    """The file's lines (header first). ``scores``: NaN where there is none; ``decisions``:
    True/False/1/0, or None/NA where there is none (written ``n/a``); ``labels``: 1/0 or
    NA per pair, or None for no labels at all."""
    n = len(path1)
    labels = [None] * n if labels is None else list(labels)
    if not (len(path2) == len(scores) == len(decisions) == len(labels) == n):
        raise ValueError(f"need one path2, score, decision and label per pair ({n} pairs)")
    lines = ["\t".join(COLUMNS)]
    for a, b, score, decision, label in zip(path1, path2, scores, decisions, labels):
        for path in (a, b):
            if "\t" in str(path) or "\n" in str(path):
                raise ValueError(f"image path {str(path)!r} contains a tab or newline; it cannot be written")
        score_text = _score_text(score)
        if decision is None or decision is pd.NA or not score_text:
            decided = NOT_DECIDED
        else:
            decided = "1" if bool(decision) else "0"
        lines.append("\t".join([str(a), str(b), score_text, decided, _label_text(label)]))
    return lines


def write_predictions(path: str | Path, path1: Sequence[str], path2: Sequence[str], scores: Sequence[float],
                      decisions: Sequence[Any], labels: Sequence[Any] | None = None) -> Path:
    """Write a prediction file atomically (see the module docstring); returns its path."""
    text = "\n".join(prediction_lines(path1, path2, scores, decisions, labels)) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A prediction file as a table: paths as text, ``score`` float (NaN where empty),
    ``decision`` text (``1``/``0``/``n/a``), ``same`` nullable integer."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    if tuple(table.columns) != COLUMNS:
        raise ValueError(f"{path}: not a prediction file (columns {', '.join(table.columns)}; "
                         f"expected {', '.join(COLUMNS)})")
    table["score"] = [float(v) if v else np.nan for v in table["score"]]
    table["same"] = pd.array([int(v) if v else pd.NA for v in table["same"]], dtype="Int64")
    return table
