"""``python -m pipeline predict``: verify the pairs of one file with a saved model, outside DVC.

    python -m pipeline predict --model data/models/arcface-0/model.pt --pairs pairs.csv --threshold 0.31

The pairs file is a ``pairs_csv`` (``path1, path2[, same][, fold]``; relative paths are
taken against the CSV's folder, or ``--root``), labelled or not. Each image goes through
the pipeline's own steps: MTCNN detection and the choice of one face
(:func:`pipeline.detect.detect_set`), alignment onto the 5-point template at the model's
own input size (``saved["image_size"]``, :func:`pipeline.align.align_face`), the JPEG round
trip the align stage applies (``align.jpeg_quality``), and embedding
(:func:`pipeline.train.embed_array`, flip fusion per ``embed.flip``). Pairs are scored
with the primary variant (``report.primary_distance`` / ``primary_normalize``, default
cosine on normalised embeddings). Those settings come from ``--params`` (default
``params.yaml``) when that file exists, else from the defaults; the first output line
says which.

Threshold (the pair is "same" iff score > threshold):

* ``--threshold 0.31``: that number;
* ``--threshold data/scores/RUN/thresholds.json``: the score stage's fixed threshold of
  that run for the variant used (chosen on the run's validation pairs by default);
* none: the threshold stored in the model file under ``"threshold"`` (a number, or
  ``{"value", "distance", "normalize", ...}``), if any. Models saved by
  :mod:`pipeline.train` carry none today, so then ``--threshold`` is required and the
  command stops with one line saying so.

Output: a prediction file (format in :mod:`pipeline.predictions`), by default
``<pairs file stem>_<model>_predict.txt`` in the current folder, where ``<model>`` is the
model's folder name for a ``model.pt`` (``arcface-0``) or else the file's stem. A pair
with an image where no face was found (or that cannot be read) gets an empty score and
decision ``n/a``; a summary line counts them. With labels, accuracy and TP/FP/TN/FN at the
threshold over the decided pairs are printed too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import AlignParams, ConfigError, DetectParams, EmbedParams, load_params


@dataclass
class PredictSettings:
    """What ``predict`` takes from a params file (or the defaults)."""

    detect: DetectParams
    jpeg_quality: int
    flip: bool
    distance: str
    normalize: bool
    origin: str  # where they came from, for the first output line

    @classmethod
    def from_params(cls, path: str | Path | None) -> "PredictSettings":
        if path is not None and Path(path).is_file():
            params = load_params(path, check_paths=False, check_models=False)
            return cls(params.detect, params.align.jpeg_quality, params.embed.flip, params.report.primary_distance,
                       params.report.primary_normalize, str(path))
        return cls(DetectParams(), AlignParams().jpeg_quality, EmbedParams().flip, "cosine", True, "defaults")


def model_label(model_path: str | Path) -> str:
    """``arcface-0`` for ``.../arcface-0/model.pt``; the file's stem otherwise."""
    path = Path(model_path)
    return path.parent.name if path.name == "model.pt" and path.parent.name else path.stem


def _variant(distance: str, normalize: bool) -> str:
    return f"{distance}_{'norm' if normalize else 'raw'}"


def resolve_threshold(given: str | None, saved: dict[str, Any], model_path: str | Path, distance: str,
                      normalize: bool) -> tuple[float, str]:
    """``(threshold, where it came from)``; :class:`ConfigError` (one line) when there is none."""
    variant = _variant(distance, normalize)
    if given is None:
        stored = saved.get("threshold")
        if stored is None:
            raise ConfigError(f"{model_path}: the model file stores no threshold (models saved by the trainer carry "
                              "none); pass --threshold T, a number or a run's data/scores/RUN/thresholds.json")
        if isinstance(stored, dict):
            kind = (stored.get("distance", distance), bool(stored.get("normalize", normalize)))
            if kind != (distance, normalize):
                raise ConfigError(f"{model_path}: the stored threshold is for {_variant(*kind)}, not {variant}; pass "
                                  "--threshold T")
            value = stored.get("value")
        else:
            value = stored
        return _finite_or_inf(value, f"{model_path}: stored threshold"), "stored in the model file"
    try:
        return _finite_or_inf(float(given), "--threshold"), "--threshold"
    except ValueError:
        pass
    path = Path(given)
    if not path.is_file():
        raise ConfigError(f"--threshold {given!r}: neither a number nor a thresholds.json file")
    try:
        entry = json.loads(path.read_text()).get(variant)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{path}: not a thresholds.json written by the score stage") from None
    if not isinstance(entry, dict) or entry.get("threshold") is None:
        raise ConfigError(f"{path}: no threshold for {variant} (scored variants: score.distances x score.normalize)")
    return _finite_or_inf(entry["threshold"], str(path)), f"{path} ({variant}, from {entry.get('source')})"


def _finite_or_inf(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} = {value!r}: not a number") from None
    if math.isnan(number):
        raise ConfigError(f"{what} is NaN")
    return number


def aligned_faces(rows, size: int, jpeg_quality: int) -> tuple[list[int], np.ndarray]:
    """Row positions of the detected faces and their crops ``[K, size, size, 3]`` uint8, aligned
    and JPEG-round-tripped as the align and shard stages store them."""
    import cv2

    from pipeline.align import align_face
    from pipeline.detect import landmarks_of
    from pipeline.images import BadImage, load_rgb

    kept, crops = [], []
    points = landmarks_of(rows)
    for k, (path, status) in enumerate(zip(rows["path"], rows["status"])):
        if status != "ok":
            continue
        try:
            image, _ = load_rgb(path)
            crop, _ = align_face(image, points[k], size)
        except (BadImage, ValueError):
            continue
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:  # pragma: no cover - encoding a uint8 crop does not fail
            continue
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        kept.append(k)
        crops.append(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))
    return kept, (np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8))


def predict(model_path: str | Path, pairs_path: str | Path, *, threshold: str | None = None,
            out: str | Path | None = None, root: str | Path | None = None, params_path: str | Path | None = None,
            device: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Run the whole chain on one pairs file; write the prediction file; return a summary dict
    (``out``, ``threshold``, ``pairs``, ``decided``, ``not_decided``, ``no_face``, ``lines``, and with
    labels ``accuracy``, ``tp``, ``fp``, ``tn``, ``fn``)."""
    import torch

    from pipeline import cpu
    from pipeline.datasets.pairs_csv import load_pairs_csv
    from pipeline.detect import detect_set, make_detector, plan_detect
    from pipeline.distances import PairDistance
    from pipeline.embed import load_model_file
    from pipeline.metrics import apply_threshold
    from pipeline.predictions import write_predictions
    from pipeline.train import embed_array, pick_device

    settings = PredictSettings.from_params(params_path)
    image_set = load_pairs_csv(pairs_path, root=root)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(cpu.thread_count())
    model, saved = load_model_file(model_path, dev)
    t, where = resolve_threshold(threshold, saved, model_path, settings.distance, settings.normalize)
    size = int(saved["image_size"])
    lines = [f"predict: settings from {settings.origin}; {_variant(settings.distance, settings.normalize)}, "
             f"flip={settings.flip}, faces aligned at {size} px; threshold {t:g} ({where})"]
    print(lines[0], flush=True)

    rows = detect_set(image_set.images, make_detector(settings.detect, plan_detect(settings.detect)), settings.detect,
                      progress=progress)
    kept, crops = aligned_faces(rows, size, settings.jpeg_quality)
    grayscale = bool(saved["model_params"].get("grayscale", False))
    emb = embed_array(model, torch.from_numpy(crops), grayscale=grayscale, device=dev, flip=settings.flip) \
        if len(kept) else np.zeros((0, 1), np.float32)
    position = {rows["image_id"].iloc[k]: n for n, k in enumerate(kept)}

    pairs = image_set.pairs
    first = pairs["image_id1"].map(position)
    second = pairs["image_id2"].map(position)
    complete = (first.notna() & second.notna()).to_numpy()
    scores = np.full(len(pairs), np.nan)
    decisions: list[Any] = [None] * len(pairs)
    if complete.any():
        scorer = PairDistance(kind=settings.distance, normalize=settings.normalize)
        done = scorer.scores(emb[first[complete].astype(int).to_numpy()], emb[second[complete].astype(int).to_numpy()])
        scores[complete] = done
        for k, d in zip(np.flatnonzero(complete), apply_threshold(done, t)):
            decisions[k] = bool(d)
    labelled = image_set.labelled
    target = Path(out) if out is not None else Path(f"{Path(pairs_path).stem}_{model_label(model_path)}_predict.txt")
    write_predictions(target, pairs["image_id1"].tolist(), pairs["image_id2"].tolist(), scores.tolist(), decisions,
                      list(pairs["same"]) if labelled else None)

    no_face = int(((rows["status"] != "ok") & rows["reason"].astype(str).str.startswith("no face")).sum())
    unreadable = len(rows) - len(kept) - no_face  # not decodable, too small or large, or not alignable
    summary: dict[str, Any] = {"out": str(target), "threshold": t, "pairs": int(len(pairs)),
                               "decided": int(complete.sum()), "not_decided": int((~complete).sum()),
                               "no_face": no_face, "unreadable": unreadable}
    lines.append(f"wrote {target}: {len(pairs)} pairs, {summary['decided']} decided, {summary['not_decided']} n/a "
                 f"({summary['no_face']} images without a face, {unreadable} unreadable, of {len(rows)} images)")
    if labelled and complete.any():
        y = pairs["same"].to_numpy()[complete].astype(int) == 1
        d = np.asarray([decisions[k] for k in np.flatnonzero(complete)], dtype=bool)
        counts = {"tp": int((d & y).sum()), "fp": int((d & ~y).sum()), "tn": int((~d & ~y).sum()),
                  "fn": int((~d & y).sum())}
        summary |= counts | {"accuracy": (counts["tp"] + counts["tn"]) / len(y)}
        lines.append(f"accuracy {summary['accuracy']:.4f} on the {len(y)} decided labelled pairs at threshold {t:g}: "
                     f"TP {counts['tp']}, FP {counts['fp']}, TN {counts['tn']}, FN {counts['fn']}")
    for line in lines[1:]:
        print(line)
    summary["lines"] = lines
    return summary
