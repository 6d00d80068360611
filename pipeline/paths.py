"""Where each stage reads and writes (relative to the project root; dvc.yaml uses the same)."""

from __future__ import annotations

from pathlib import Path

DATASETS = Path("data/datasets")
DETECT = Path("data/detect")
ALIGNED = Path("data/aligned")
SHARDS = Path("data/shards")
REPORTS = Path("reports")
DETECTION_COUNTS = REPORTS / "detection.json"
ALIGNMENT_STATS = REPORTS / "alignment.json"
CONTACT_SHEET = REPORTS / "figures" / "contact_sheet.png"


def model_dir(loss: str) -> Path:
    return Path("data/models") / loss


def checkpoint_dir(loss: str) -> Path:
    return Path("data/checkpoints") / loss


def train_report_dir(loss: str) -> Path:
    return REPORTS / "train" / loss


def embeddings_dir(loss: str) -> Path:
    return Path("data/embeddings") / loss


def scores_dir(loss: str) -> Path:
    return Path("data/scores") / loss


def metrics_file(loss: str) -> Path:
    return REPORTS / "metrics" / f"{loss}.json"


def roc_dir(loss: str) -> Path:
    return REPORTS / "roc" / loss
