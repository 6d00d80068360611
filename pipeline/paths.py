"""Where each stage reads and writes (relative to the project root; dvc.yaml uses the same).

A *run* is one trained model: ``LOSS-SEED`` (``arcface-1``, as DVC names the stage
``train@arcface-1``), or the name of a pretrained model. Per-run folders are keyed by it.
"""

from __future__ import annotations

from pathlib import Path

DATASETS = Path("data/datasets")
DETECT = Path("data/detect")
ALIGNED = Path("data/aligned")
SHARDS = Path("data/shards")
RECIPES = Path("data/recipes")
REPORTS = Path("reports")
DETECTION_COUNTS = REPORTS / "detection.json"
ALIGNMENT_STATS = REPORTS / "alignment.json"
CONTACT_SHEET = REPORTS / "figures" / "contact_sheet.png"
AUGMENT_PREVIEW = REPORTS / "figures" / "augmented.png"
SUMMARY = REPORTS / "summary.json"


def recipe_file(loss: str) -> Path:
    return RECIPES / f"{loss}.json"


def model_dir(run: str) -> Path:
    return Path("data/models") / run


def checkpoint_dir(run: str) -> Path:
    return Path("data/checkpoints") / run


def train_report_dir(run: str) -> Path:
    return REPORTS / "train" / run


def embeddings_dir(run: str) -> Path:
    return Path("data/embeddings") / run


def scores_dir(run: str) -> Path:
    return Path("data/scores") / run


def metrics_file(run: str) -> Path:
    return REPORTS / "metrics" / f"{run}.json"
