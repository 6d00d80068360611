"""What the data, detect and align stages recorded about each data set, read in one place.

The report's statements about the sets (how their folds were made, whether a set was
detected and aligned or pre-cropped and at what size it was scored, which images were
rejected) come from these loaders only; the paths (:mod:`pipeline.paths`, one file per set) are
the only ones the report reads for them (dvc.yaml lists their folders as the report stage's
dependencies). Each loader takes the configured sets and returns ``{set name: record}``, leaving
out a set whose file is absent (a project that has not run that stage, or a test that does not
need it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline import paths

def _per_set(path_of, sets: list[str]) -> dict[str, dict]:
    out = {}
    for name in sets:
        path = path_of(name)
        if path.is_file():
            try:
                out[name] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); rerun its stage "
                                 "(dvc repro)") from None
    return out


def dataset_summaries(sets: list[str]) -> dict[str, dict]:
    """The data stage's record of each set (``data/datasets/SET/summary.json``): kind, images,
    identities, pairs, folds, folds_assigned, precropped."""
    return _per_set(lambda name: paths.dataset_dir(name) / "summary.json", sets)


def detection_counts(sets: list[str]) -> dict[str, dict]:
    """The detect stage's before / after counts of each set (``reports/detection/SET.json``)."""
    return _per_set(paths.detection_counts, sets)


def alignment_stats(sets: list[str]) -> dict[str, dict]:
    """The align stage's statistics of each set (``reports/alignment/SET.json``)."""
    return _per_set(paths.alignment_stats, sets)


def rejects_file(name: str) -> Path:
    """Every image the detect stage rejected in set ``name``: set, image_id, path, reason."""
    return paths.detect_dir(name) / "rejects.csv"


def rejected_images(sets: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Each set's rejected images as ``(path, reason)`` in the detect stage's order (its ``rejects.csv``)."""
    out = {}
    for name in sets:
        path = rejects_file(name)
        if not path.is_file():
            continue
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = {"path", "reason"} - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: no column {', '.join(sorted(missing))}; rerun the detect stage (dvc repro)")
        if len(frame):
            out[name] = list(zip(frame["path"], frame["reason"]))
    return out
