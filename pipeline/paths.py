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
PRETRAINED = Path("data/pretrained")

#: A run's validation pairs, beside its test-set embeddings (embed stage -> score stage).
VALIDATION_EMBEDDINGS = "_validation.npz"
VALIDATION_PAIRS = "_validation_pairs.csv"
#: Inside a run's scores folder: its fixed thresholds, and its prediction files.
THRESHOLDS = "thresholds.json"
PREDICT = "predict"


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


def thresholds_file(run: str) -> Path:
    return scores_dir(run) / THRESHOLDS


def prediction_file(run: str, test_set: str) -> Path:
    """``data/scores/RUN/predict/<set>_<RUN>_predict.txt`` (see :mod:`pipeline.predictions`)."""
    return scores_dir(run) / PREDICT / f"{test_set}_{run}_predict.txt"


def pretrained_fingerprint(name: str) -> Path:
    """What the embed stage of pretrained model ``name`` depends on (see ``pipeline.pretrained``)."""
    return PRETRAINED / f"{name}.json"
