"""Where each stage reads and writes (relative to the project root; dvc.yaml uses the same).

Every data set (``train`` and each test set in ``data.tests``) has its own chain of stages
and folders, so that adding, removing or changing one set touches only its own files:
``data/datasets/SET``, ``data/detect/SET``, ``data/aligned/SET``, ``data/shards/SET``.

A *run* is one trained model: ``LOSS-SEED`` (``arcface-1``, as DVC names the stage
``train@arcface-1``), or the name of a pretrained model. Embedding and scoring run per test set
for every trained run at once (one stage per set, few processes): ``data/embeddings/SET/RUN``,
``data/scores/SET/RUN``, ``reports/metrics/SET/RUN.json``; the validation pairs' embeddings are
``data/embeddings/validation/RUN``. A pretrained model has its own stages per set, under
``.../pretrained/NAME/SET``.
"""

from __future__ import annotations

from pathlib import Path

DATASETS = Path("data/datasets")
DETECT = Path("data/detect")
ALIGNED = Path("data/aligned")
SHARDS = Path("data/shards")
RECIPES = Path("data/recipes")
REPORTS = Path("reports")
DETECTION_COUNTS = REPORTS / "detection"
ALIGNMENT_STATS = REPORTS / "alignment"
CONTACT_SHEETS = REPORTS / "figures" / "contact_sheets"
AUGMENT_PREVIEW = REPORTS / "figures" / "augmented.png"
SUMMARY = REPORTS / "summary.json"
PRETRAINED = Path("data/pretrained")

#: The training set's name: its stages are ``data_train``, ``detect_train``, ... (the test sets'
#: are ``data@SET``, ``detect@SET``, ...).
TRAIN = "train"
#: Inside a run's embeddings: its validation pairs (the train stage's split of the training
#: identities), where the fixed threshold is chosen by default, and the training-set angles.
VALIDATION = "validation"
TRAIN_ANGLES = "train"
#: Inside every embedded set's folder (``data/embeddings/RUN/SET``).
EMBEDDINGS_FILE = "embeddings.npz"
PAIRS_FILE = "pairs.csv"
HEAD_FILE = "head.npz"
#: Inside a run's scores folder of each set: its fixed thresholds.
THRESHOLDS = "thresholds.json"


def dataset_dir(name: str) -> Path:
    """``data/datasets/SET``: the set's index tables, summary and any images the data stage wrote."""
    return DATASETS / name


def detect_dir(name: str) -> Path:
    return DETECT / name


def aligned_dir(name: str) -> Path:
    return ALIGNED / name


def shards_dir(name: str) -> Path:
    return SHARDS / name


def detection_counts(name: str) -> Path:
    """``reports/detection/SET.json``: images in, faces kept, dropped with reasons."""
    return DETECTION_COUNTS / f"{name}.json"


def alignment_stats(name: str) -> Path:
    return ALIGNMENT_STATS / f"{name}.json"


def contact_sheet(name: str) -> Path:
    return CONTACT_SHEETS / f"{name}.png"


def recipe_file(loss: str) -> Path:
    return RECIPES / f"{loss}.json"


def model_dir(run: str) -> Path:
    return Path("data/models") / run


def checkpoint_dir(run: str) -> Path:
    return Path("data/checkpoints") / run


def train_report_dir(run: str) -> Path:
    return REPORTS / "train" / run


EMBEDDINGS = Path("data/embeddings")
SCORES = Path("data/scores")
METRICS = REPORTS / "metrics"
#: Where the pretrained models' per-set outputs go (``data/embeddings/pretrained/NAME/SET``): a name
#: no test set may take.
PRETRAINED_TREE = "pretrained"


def set_embeddings(run: str, name: str, *, pretrained: bool = False) -> Path:
    """``data/embeddings/SET/RUN``: run ``run``'s embeddings of set ``name`` (a test set, or
    :data:`VALIDATION`), written by the set's embed stage for every trained run; a pretrained model's
    by its own stage in ``data/embeddings/pretrained/NAME/SET``."""
    return EMBEDDINGS / PRETRAINED_TREE / run / name if pretrained else EMBEDDINGS / name / run


def training_angles(run: str) -> Path:
    """``data/embeddings/train/RUN/angles.npz``: the angle distributions of a run's training faces."""
    return EMBEDDINGS / TRAIN_ANGLES / run / "angles.npz"


def set_scores(run: str, name: str, *, pretrained: bool = False) -> Path:
    """``data/scores/SET/RUN`` (a pretrained model: ``data/scores/pretrained/NAME/SET``)."""
    return SCORES / PRETRAINED_TREE / run / name if pretrained else SCORES / name / run


def metrics_file(run: str, name: str, *, pretrained: bool = False) -> Path:
    """``reports/metrics/SET/RUN.json`` (a pretrained model: ``reports/metrics/pretrained/NAME/SET.json``)."""
    return METRICS / PRETRAINED_TREE / run / f"{name}.json" if pretrained else METRICS / name / f"{run}.json"


def thresholds_file(run: str, name: str, *, pretrained: bool = False) -> Path:
    """The run's fixed thresholds as the score stage of set ``name`` chose and applied them (every
    set of a run holds the same ones)."""
    return set_scores(run, name, pretrained=pretrained) / THRESHOLDS


def prediction_file(run: str, test_set: str, *, pretrained: bool = False) -> Path:
    """``data/scores/SET/RUN/<set>_<RUN>_predict.txt`` (see :mod:`pipeline.predictions`)."""
    return set_scores(run, test_set, pretrained=pretrained) / f"{test_set}_{run}_predict.txt"


def protocol_dir(bench: str, run: str) -> Path:
    """``data/protocols/BENCH/RUN``: a run's features of a benchmark (``features/``) and its evaluation
    (``eval/``: metrics, ROC or CMC, subject resamples)."""
    return Path("data/protocols") / bench / run


def protocol_report(bench: str) -> Path:
    """``reports/protocols/BENCH``: every model's intervals and the verdicts on a benchmark."""
    return REPORTS / "protocols" / bench


def pretrained_fingerprint(name: str) -> Path:
    """What the embed stage of pretrained model ``name`` depends on (see ``pipeline.pretrained``)."""
    return PRETRAINED / f"{name}.json"
