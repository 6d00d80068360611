"""``python -m pipeline predict``: verify the pairs of one file with a saved model, outside DVC.

    python -m pipeline predict --model data/models/arcface-0/model.pt --pairs pairs.csv --threshold 0.31
    python -m pipeline predict -m model.pt --pairs crops.csv --precropped --distance l2 --threshold 1.1

The pairs file is a ``pairs_csv`` (``path1, path2[, same][, fold]``; relative paths are
taken against the CSV's folder, or ``--root``), labelled or not. Each image goes through
the pipeline's own functions, so a model scores a face the same way here and in the DVC
stages:

* photos: MTCNN detection and the choice of one face (:func:`pipeline.detect.detect_set`),
  then the 5-point warp at the model's own input size (``saved["image_size"]``);
* ``--precropped`` (tight face crops, e.g. 110 px LFW crops): no detection, no warp; each
  image is read (:func:`pipeline.detect.precropped_set`) and resized whole (``--crop
  resize``) or its central square, ``--crop-fraction`` of the shorter side, is cut out and
  resized (``--crop center``), by :func:`pipeline.align.resize_crop` -- what detect and
  align do for a set with ``precropped: true``. Without it, tight crops are re-detected and
  warped with black borders, which is not what the pipeline scored;
* both: the align stage's own per-face step (:class:`pipeline.align.Workers`: the warp or
  resize and the JPEG round trip at ``align.jpeg_quality``), the shard reader's decoding
  (:class:`pipeline.shards.FaceShards`), and the embed stage's
  :func:`pipeline.train.embed_array` (flip fusion per ``embed.flip``, ``embed.batch_size``).

Scoring variant: ``--distance cosine|l2`` and ``--norm/--no-norm`` (L2-normalise each
embedding first), by default the primary variant (``report.primary_distance`` /
``primary_normalize``, default cosine on normalised embeddings). Settings come from
``--params`` (default ``params.yaml``) when that file exists, else from the defaults; the
first output line says which.

Threshold. The decision rule is printed as one line before anything runs:

* cosine: ``--threshold T`` is a cosine similarity; same iff similarity > T.
* l2: ``--threshold T`` is an L2 **distance**; same iff distance < T. A negative T is
  refused (no distance is below it): it is the sign trap of passing a score threshold,
  since the pipeline's L2 *scores* are minus distances.
* ``--threshold data/scores/SET/RUN/thresholds.json``: the score stage's fixed threshold of that
  run for the variant used. These are **score** thresholds (same iff score > t, score =
  minus the distance for l2), so a finite positive L2 one is refused (no file written by the
  score stage holds one).
* none: the threshold stored in the model file under ``"threshold"`` (a score threshold
  like thresholds.json: a number, or ``{"value", "distance", "normalize", ...}``), if any.
  Models saved by :mod:`pipeline.train` carry none today, so then ``--threshold`` is
  required and the command stops with one line saying so.

Output: a prediction file (format in :mod:`pipeline.predictions`; its ``score`` column is
minus the distance for l2), by default ``<pairs file stem>_<model>_predict.txt`` in the
current folder, where ``<model>`` is the model's folder name for a ``model.pt``
(``arcface-0``) or else the file's stem. Beside it, ``<prediction file stem>_rejects.csv``
(always written, header only when nothing was rejected) lists every image that could not be
used -- missing, unreadable, corrupt, no face, not alignable -- with ``image`` (as the pairs
file names it), ``path`` (the file read), ``reason`` and ``pairs`` (how many pairs it leaves
undecided). The first few are named on stderr, then a count. Their pairs get an empty score
and decision ``n/a``. With labels, accuracy and TP/FP/TN/FN over the decided pairs are
printed too.

Exit status: 0 when every pair was decided; :data:`EXIT_NOT_ALL_DECIDED` (3) when some or all
pairs could not be decided (both files are written in full; the rejects file says why);
1 for an unusable input (model, pairs file) and 2 for bad options, with one ``error:`` line
and nothing written.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import AlignParams, ConfigError, DetectParams, EmbedParams, load_params

EXIT_NOT_ALL_DECIDED = 3  # some pairs are n/a: prediction and rejects files written in full
REJECTS_SHOWN = 5  # rejected images named on stderr before the count
REJECT_COLUMNS = ["image", "path", "reason", "pairs"]
DISTANCES = ("cosine", "l2")


@dataclass
class PredictSettings:
    """What ``predict`` takes from a params file (or the defaults), with the command line's
    ``--distance`` / ``--norm`` over the params file's primary variant."""

    detect: DetectParams
    jpeg_quality: int
    flip: bool
    embed_batch_size: int
    distance: str
    normalize: bool
    origin: str  # where they came from, for the first output line

    @classmethod
    def from_params(cls, path: str | Path | None, *, distance: str | None = None,
                    normalize: bool | None = None) -> "PredictSettings":
        if distance is not None and distance not in DISTANCES:
            raise ConfigError(f"--distance {distance!r}: expected cosine or l2")
        if path is not None and Path(path).is_file():
            params = load_params(path, check_paths=False, check_models=False)
            settings = cls(params.detect, params.align.jpeg_quality, params.embed.flip, params.embed.batch_size,
                           params.report.primary_distance, params.report.primary_normalize, str(path))
        else:
            settings = cls(DetectParams(), AlignParams().jpeg_quality, EmbedParams().flip, EmbedParams().batch_size,
                           "cosine", True, "defaults")
        given = [flag for flag, value in (("--distance", distance), ("--norm", normalize)) if value is not None]
        if given:
            settings.origin += f" ({' and '.join(given)} from the command line)"
        settings.distance = settings.distance if distance is None else distance
        settings.normalize = settings.normalize if normalize is None else bool(normalize)
        return settings

    @property
    def variant(self) -> str:
        return _variant(self.distance, self.normalize)


def model_label(model_path: str | Path) -> str:
    """``arcface-0`` for ``.../arcface-0/model.pt``; the file's stem otherwise."""
    path = Path(model_path)
    return path.parent.name if path.name == "model.pt" and path.parent.name else path.stem


def rejects_path(prediction_file: str | Path) -> Path:
    """``<prediction file stem>_rejects.csv`` beside the prediction file."""
    path = Path(prediction_file)
    return path.with_name(f"{path.stem}_rejects.csv")


def _variant(distance: str, normalize: bool) -> str:
    return f"{distance}_{'norm' if normalize else 'raw'}"


def crop_of(precropped: bool, mode: str | None, fraction: float | None) -> Any:
    """The :class:`pipeline.align.Crop` of ``--precropped [--crop M] [--crop-fraction F]``, or None
    without ``--precropped``; :class:`ConfigError` (one line) for options that do not fit, with the
    rules of a dataset entry's ``crop`` / ``crop_fraction``."""
    from pipeline.align import Crop

    if not precropped:
        if mode is not None or fraction is not None:
            raise ConfigError("--crop and --crop-fraction apply to pre-cropped faces only; add --precropped")
        return None
    mode = mode or "resize"
    if mode not in ("resize", "center"):
        raise ConfigError(f"--crop {mode!r}: expected resize or center")
    if fraction is not None and mode != "center":
        raise ConfigError("--crop-fraction applies to --crop center only")
    fraction = 1.0 if fraction is None else float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--crop-fraction {fraction:g}: expected a number in (0, 1]")
    return Crop(mode, fraction)


@dataclass(frozen=True)
class Threshold:
    """A decision threshold in the pipeline's score convention: same iff ``score > value``,
    where the score is the cosine similarity, or minus the L2 distance."""

    value: float
    distance: str
    origin: str

    def rule(self) -> str:
        """``same iff cosine similarity > 0.31`` / ``same iff L2 distance < 1.1``."""
        if self.distance == "l2":
            return f"same iff L2 distance < {-self.value:g}"
        return f"same iff cosine similarity > {self.value:g}"

    def convention(self) -> str:
        """The one line that says which convention applies (printed before anything runs)."""
        if self.distance == "l2":
            return (f"decision: {self.rule()} ({self.origin}); for l2 --threshold is a distance, while a "
                    "thresholds.json and the score column hold minus the distance")
        return f"decision: {self.rule()} ({self.origin}); cosine: the threshold is a similarity"


def resolve_threshold(given: str | None, saved: dict[str, Any], model_path: str | Path, distance: str,
                      normalize: bool) -> Threshold:
    """The threshold to decide at (see the module docstring for the conventions);
    :class:`ConfigError` (one line) when there is none or it has the wrong sign for l2."""
    variant = _variant(distance, normalize)
    if given is None:
        stored = saved.get("threshold")
        if stored is None:
            raise ConfigError(f"{model_path}: the model file stores no threshold (models saved by the trainer carry "
                              "none); pass --threshold T, a number or a run's data/scores/SET/RUN/thresholds.json")
        if isinstance(stored, dict):
            kind = (stored.get("distance", distance), bool(stored.get("normalize", normalize)))
            if kind != (distance, normalize):
                raise ConfigError(f"{model_path}: the stored threshold is for {_variant(*kind)}, not {variant}; pass "
                                  "--threshold T or --distance/--norm to match")
            stored = stored.get("value")
        what = f"{model_path}: stored threshold"
        return Threshold(_score_threshold(stored, what, distance), distance, "stored in the model file")
    try:
        number = _number(float(given), "--threshold")
    except ValueError:
        return _threshold_file(Path(given), variant, distance)
    if distance == "l2":
        if number < 0:
            raise ConfigError(f"--threshold {given}: with --distance l2 the threshold is an L2 distance (same iff "
                              "distance < T), so it cannot be negative; for a cosine similarity pass --distance "
                              "cosine")
        return Threshold(-number, distance, "--threshold, an L2 distance")
    return Threshold(number, distance, "--threshold")


def _threshold_file(path: Path, variant: str, distance: str) -> Threshold:
    if not path.is_file():
        raise ConfigError(f"--threshold {str(path)!r}: neither a number nor a thresholds.json file")
    try:
        entry = json.loads(path.read_text()).get(variant)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{path}: not a thresholds.json written by the score stage") from None
    if not isinstance(entry, dict) or entry.get("threshold") is None:
        raise ConfigError(f"{path}: no threshold for {variant} (scored variants: score.distances x score.normalize)")
    value = _score_threshold(entry["threshold"], f"{path}: {variant} threshold", distance)
    return Threshold(value, distance, f"{path}, {variant}, chosen on {entry.get('source')}")


def _score_threshold(value: Any, what: str, distance: str) -> float:
    """A threshold from a file, in score convention: for l2, scores are minus distances, so a finite
    positive one is a distance written where a score belongs."""
    number = _number(value, what)
    if distance == "l2" and 0 < number < math.inf:
        raise ConfigError(f"{what} = {number:g} is positive, but L2 scores are minus distances (<= 0), so every pair "
                          "would be 'different'; a distance goes in --threshold T (same iff distance < T)")
    return number


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} = {value!r}: not a number") from None
    if math.isnan(number):
        raise ConfigError(f"{what} is NaN")
    return number


@dataclass
class Faces:
    """The faces of a pairs file's images: ``crops`` ``[K, size, size, 3]`` uint8 as the shards hold
    them, ``position`` image_id -> row of ``crops``, ``rejects`` image_id -> (path, reason)."""

    crops: np.ndarray
    position: dict[str, int]
    rejects: dict[str, tuple[str, str]]
    images: int


def prepare_faces(images: pd.DataFrame, settings: PredictSettings, size: int, crop: Any = None, *,
                  progress: bool = False) -> Faces:
    """Detect (or, with a :class:`pipeline.align.Crop`, read as pre-cropped) and align ``images``
    (``image_id``, ``path``) with the detect and align stages' functions, JPEG round trip included."""
    from pipeline import cpu
    from pipeline.align import Workers
    from pipeline.detect import KEPT, detect_set, landmarks_of, make_detector, plan_detect, precropped_set
    from pipeline.shards import FaceShards

    if crop is None:
        rows = detect_set(images, make_detector(settings.detect, plan_detect(settings.detect)), settings.detect,
                          progress=progress)
    else:
        rows = precropped_set(images, settings.detect)
    rejects = {i: (p, str(r)) for i, p, s, r in zip(rows["image_id"], rows["path"], rows["status"], rows["reason"])
               if s not in KEPT}
    kept = rows[rows["status"].isin(KEPT)].reset_index(drop=True)
    points = landmarks_of(kept)
    tasks = [(path, points[k], size, settings.jpeg_quality, crop) for k, path in enumerate(kept["path"])]
    workers = Workers(cpu.thread_count() if len(tasks) >= 200 else 1)  # processes cost more than a few faces
    try:
        done = workers.map(tasks)
    finally:
        workers.close()
    blobs, ids = [], []
    for image_id, path, (blob, _, error) in zip(kept["image_id"], kept["path"], done):
        if blob is None:
            rejects[image_id] = (path, f"not aligned: {error}")
        else:
            blobs.append(blob)
            ids.append(image_id)
    shards = FaceShards(blobs, ids, ids, np.zeros(len(ids), np.int64), [], None)
    crops = shards.decode_all() if ids else np.zeros((0, size, size, 3), np.uint8)
    return Faces(crops, {i: k for k, i in enumerate(ids)}, rejects, len(rows))


def reject_table(faces: Faces, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per rejected image (:data:`REJECT_COLUMNS`), sorted by image; ``pairs`` counts the
    pairs that name it (a pair naming it twice once)."""
    per_image = Counter(i for a, b in zip(pairs["image_id1"], pairs["image_id2"]) for i in {a, b})
    rows = [(i, path, reason, per_image[i]) for i, (path, reason) in sorted(faces.rejects.items())]
    return pd.DataFrame(rows, columns=REJECT_COLUMNS)


def show_rejects(table: pd.DataFrame, where: Path) -> list[str]:
    """The stderr lines naming the first :data:`REJECTS_SHOWN` rejected images, then the count."""
    lines = [f"rejected: {row.path}: {row.reason} ({row.pairs} pair{'s' if row.pairs != 1 else ''} n/a)"
             for row in table.head(REJECTS_SHOWN).itertuples()]
    if len(table) > REJECTS_SHOWN:
        lines.append(f"rejected: ... and {len(table) - REJECTS_SHOWN} more image(s); all {len(table)} in {where}")
    return lines


def _reject_kinds(table: pd.DataFrame) -> str:
    no_face = int(table["reason"].str.startswith("no face").sum())
    not_aligned = int(table["reason"].str.startswith("not aligned").sum())
    unreadable = len(table) - no_face - not_aligned
    return f"{no_face} without a face, {unreadable} unreadable or missing, {not_aligned} not aligned"


def predict(model_path: str | Path, pairs_path: str | Path, *, threshold: str | None = None,
            out: str | Path | None = None, root: str | Path | None = None, params_path: str | Path | None = None,
            device: str = "auto", progress: bool = False, distance: str | None = None,
            normalize: bool | None = None, crop: Any = None) -> dict[str, Any]:
    """Run the whole chain on one pairs file; write the prediction and rejects files; return a
    summary dict (``out``, ``rejects``, ``threshold`` (score convention), ``rule``, ``pairs``,
    ``decided``, ``not_decided``, ``rejected``, ``lines``, and with labels ``accuracy``, ``tp``,
    ``fp``, ``tn``, ``fn``). ``crop``: a :class:`pipeline.align.Crop` for pre-cropped faces
    (:func:`crop_of`), None to detect and align."""
    import torch

    from pipeline import cpu
    from pipeline.datasets.pairs_csv import load_pairs_csv
    from pipeline.embed import load_model_file
    from pipeline.train import embed_array, pick_device

    settings = PredictSettings.from_params(params_path, distance=distance, normalize=normalize)
    image_set = load_pairs_csv(pairs_path, root=root)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(cpu.thread_count())
    model, saved = load_model_file(model_path, dev)
    rule = resolve_threshold(threshold, saved, model_path, settings.distance, settings.normalize)
    size = int(saved["image_size"])
    faces_how = (f"faces detected and aligned at {size} px" if crop is None else
                 f"pre-cropped faces, {crop.mode} (fraction {crop.fraction:g}) to {size} px, not detected")
    lines = [f"predict: settings from {settings.origin}; {settings.variant}, flip={settings.flip}, {faces_how}",
             rule.convention()]
    print("\n".join(lines), flush=True)

    faces = prepare_faces(image_set.images, settings, size, crop, progress=progress)
    grayscale = bool(saved["model_params"].get("grayscale", False))
    emb = embed_array(model, torch.from_numpy(faces.crops), grayscale=grayscale, device=dev, flip=settings.flip,
                      batch_size=settings.embed_batch_size) if len(faces.crops) else np.zeros((0, 1), np.float32)
    target = Path(out) if out is not None else Path(f"{Path(pairs_path).stem}_{model_label(model_path)}_predict.txt")
    summary = _decide_and_write(image_set, faces, emb, settings, rule, target)
    lines += summary.pop("report")
    for line in lines[2:]:
        print(line)
    summary["lines"] = lines
    return summary


def _decide_and_write(image_set, faces: Faces, emb: np.ndarray, settings: PredictSettings, rule: Threshold,
                      target: Path) -> dict[str, Any]:
    """Score and decide every pair, write the prediction and rejects files, name the rejects on
    stderr; the summary dict with ``report``, the lines for stdout."""
    from pipeline.distances import PairDistance
    from pipeline.io import write_csv
    from pipeline.metrics import apply_threshold
    from pipeline.predictions import write_predictions

    pairs = image_set.pairs
    first, second = pairs["image_id1"].map(faces.position), pairs["image_id2"].map(faces.position)
    complete = (first.notna() & second.notna()).to_numpy()
    scores = np.full(len(pairs), np.nan)
    decisions: list[Any] = [None] * len(pairs)
    if complete.any():
        scorer = PairDistance(kind=settings.distance, normalize=settings.normalize)
        done = scorer.scores(emb[first[complete].astype(int).to_numpy()], emb[second[complete].astype(int).to_numpy()])
        scores[complete] = done
        for k, d in zip(np.flatnonzero(complete), apply_threshold(done, rule.value)):
            decisions[k] = bool(d)
    labelled = image_set.labelled
    rejected = reject_table(faces, pairs)
    write_predictions(target, pairs["image_id1"].tolist(), pairs["image_id2"].tolist(), scores.tolist(), decisions,
                      list(pairs["same"]) if labelled else None)
    write_csv(rejects_path(target), rejected)
    for line in show_rejects(rejected, rejects_path(target)):
        print(line, file=sys.stderr)

    summary: dict[str, Any] = {"out": str(target), "rejects": str(rejects_path(target)), "threshold": rule.value,
                               "rule": rule.rule(), "pairs": int(len(pairs)), "decided": int(complete.sum()),
                               "not_decided": int((~complete).sum()), "rejected": int(len(rejected))}
    report = [f"wrote {target}: {len(pairs)} pairs, {summary['decided']} decided, {summary['not_decided']} n/a; "
              f"{len(rejected)} of {faces.images} images rejected ({_reject_kinds(rejected)}), "
              f"listed in {rejects_path(target)}"]
    if labelled and complete.any():
        y = pairs["same"].to_numpy()[complete].astype(int) == 1
        d = np.asarray([decisions[k] for k in np.flatnonzero(complete)], dtype=bool)
        counts = {"tp": int((d & y).sum()), "fp": int((d & ~y).sum()), "tn": int((~d & ~y).sum()),
                  "fn": int((~d & y).sum())}
        summary |= counts | {"accuracy": (counts["tp"] + counts["tn"]) / len(y)}
        report.append(f"accuracy {summary['accuracy']:.4f} on the {len(y)} decided labelled pairs ({rule.rule()}): "
                      f"TP {counts['tp']}, FP {counts['fp']}, TN {counts['tn']}, FN {counts['fn']}")
    return summary | {"report": report}
