"""What the data, detect and align stages recorded about each data set, read in one place.

The report's statements about the sets (how their folds were made, whether a set was
detected and aligned or pre-cropped and at what size it was scored, which images were
rejected) come from these loaders only; the paths below are the only ones the report reads
for them (dvc.yaml lists them as the report stage's dependencies). Each loader returns
``{set name: record}`` and an empty dict when its file is absent (a project that has not run
that stage, or a test that does not need it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline import paths

#: The data stage's summary: kind, images, identities, pairs, folds, folds_assigned, precropped.
DATASET_SUMMARY = paths.DATASETS / "summary.json"
#: The detect stage's counts: images, faces, dropped, reasons, precropped, source_sizes.
DETECTION_COUNTS = paths.DETECTION_COUNTS
#: The align stage's statistics: aligned, failed, residuals; crop and output_size of pre-cropped sets.
ALIGNMENT_STATS = paths.ALIGNMENT_STATS
#: Every image the detect stage rejected: set, image_id, path, reason.
REJECTS = paths.DETECT / "rejects.csv"


def _json(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); rerun its stage (dvc repro)"
                         ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of set names to records; rerun its stage (dvc repro)")
    return data


def dataset_summaries() -> dict[str, dict]:
    """The data stage's record of each set (``data/datasets/summary.json``)."""
    return _json(DATASET_SUMMARY)


def detection_counts() -> dict[str, dict]:
    """The detect stage's before / after counts of each set (``reports/detection.json``)."""
    return _json(DETECTION_COUNTS)


def alignment_stats() -> dict[str, dict]:
    """The align stage's statistics of each set (``reports/alignment.json``)."""
    return _json(ALIGNMENT_STATS)


def rejected_images() -> dict[str, list[tuple[str, str]]]:
    """Each set's rejected images as ``(path, reason)`` in the detect stage's order (``rejects.csv``)."""
    if not REJECTS.is_file():
        return {}
    frame = pd.read_csv(REJECTS, dtype=str, keep_default_na=False)
    missing = {"set", "path", "reason"} - set(frame.columns)
    if missing:
        raise ValueError(f"{REJECTS}: no column {', '.join(sorted(missing))}; rerun the detect stage (dvc repro)")
    return {name: list(zip(group["path"], group["reason"])) for name, group in frame.groupby("set", sort=False)}
