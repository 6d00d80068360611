"""Stage ``embed@LOSS-SEED``: embeddings of every test image with one trained model.

For each test set under the shards folder, writes ``OUT/<set>.npz`` with
``image_ids`` [N], ``identities`` [N] and ``embeddings`` [N, D] float32: the RAW
model outputs (not L2-normalised), optionally the sum of the outputs for the image
and its horizontal mirror (``flip``). Normalising is left to the score stage, so
switching test-time normalisation never needs new embeddings.

With the run's training recipe (``data/recipes/LOSS.json``) it also embeds the run's
**validation pairs**, the ones the trainer validated on: the training shards split by
:func:`pipeline.train.split_train_val` with the recipe's ``train.val_fraction`` and
``data_seed``, pairs by :func:`pipeline.train.validation_pairs`, images embedded exactly
as the test sets are. They go to ``OUT/_validation.npz`` and ``OUT/_validation_pairs.csv``
(fold, image_id1, image_id2, same), where the score stage picks the fixed threshold.
Nothing is written for them when the split leaves no validation image.

The ``facepipe`` kind of pretrained entry (a ``model.pt`` from elsewhere) is embedded by
:func:`run_embed` too, without validation pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import cpu
from pipeline.config import EmbedParams, PretrainedParams
from pipeline.io import atomic_dir
from pipeline.paths import VALIDATION_EMBEDDINGS, VALIDATION_PAIRS
from pipeline.shards import join_location, read_shards, test_sets
from pipeline.train import TrainingError, describe_device, embed_array, load_model, pick_device


class ModelFileError(ValueError):
    """A model file that is missing or is not a facepipe ``model.pt`` (one-line message)."""


def load_model_file(path: str | Path, device: torch.device | str = "cpu", *, missing_hint: str = ""
                    ) -> tuple[torch.nn.Module, dict]:
    """:func:`pipeline.train.load_model` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found{missing_hint}")
    try:
        return load_model(path, device)
    except Exception as err:  # a pickle, zip, key or shape error: whatever it is, say which file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {reason}"[:200]
        raise ModelFileError(f"{path}: not a readable facepipe model.pt ({reason})") from None


def _save(path: Path, image_ids: list[str], identities: list[str], emb: np.ndarray) -> None:
    np.savez(
        path,
        image_ids=np.asarray(image_ids, dtype=object).astype(str),
        identities=np.asarray(identities, dtype=object).astype(str),
        embeddings=emb.astype(np.float32),
    )


def validation_set(shards_dir: str | Path, recipe: dict[str, Any]) -> tuple[Any, np.ndarray, pd.DataFrame]:
    """The trainer's validation images and pairs for ``recipe``: ``(train shards, image
    indices [V], pairs table)`` (fold 1, image_id1, image_id2, same); V may be 0."""
    from pipeline.train import split_train_val, validation_pairs

    data = read_shards(join_location(shards_dir, "train"))
    seed = int(recipe["data_seed"])
    _, val_idx = split_train_val(data.labels, float(recipe["train"]["val_fraction"]), seed)
    ids = np.asarray(data.image_ids, dtype=object)[val_idx]
    pairs = validation_pairs(data.labels[val_idx], seed) if len(val_idx) else np.zeros((0, 3), dtype=np.int64)
    table = pd.DataFrame({"fold": np.ones(len(pairs), dtype=np.int64), "image_id1": ids[pairs[:, 0]].astype(str),
                          "image_id2": ids[pairs[:, 1]].astype(str), "same": pairs[:, 2].astype(np.int64)})
    return data, val_idx, table


def run_embed(params: EmbedParams, model_path: str | Path, shards_dir: str | Path, out_dir: str | Path, *,
              recipe: dict[str, Any] | None = None, missing_hint: str = "; run the train stage first (dvc repro)"
              ) -> dict[str, int]:
    """Embed every test set (and, given the run's ``recipe``, its validation pairs' images);
    returns the number of images embedded per set. Runs in fp32 on any device (the test
    embeddings are the measurement; they are cheap)."""
    dev = pick_device(params.device, key="embed.device")
    if dev.type == "cpu":
        torch.set_num_threads(cpu.thread_count())
    print(f"embed: {describe_device(dev, None, 1)}", flush=True)
    model, saved = load_model_file(model_path, dev, missing_hint=missing_hint)
    grayscale = bool(saved["model_params"].get("grayscale", False))
    size = int(saved["image_size"])

    def embed(data, indices=None) -> np.ndarray:
        if len(data) and data.image_shape()[0] != size:
            raise TrainingError(f"{model_path}: the model takes {size} px faces but the shards hold "
                                f"{data.image_shape()[0]} px ones (align.size)")
        images = torch.from_numpy(data.decode_all(indices))
        emb = embed_array(model, images, grayscale=grayscale, device=dev, batch_size=params.batch_size,
                          flip=params.flip)
        if not np.isfinite(emb).all():
            raise RuntimeError(f"{model_path}: the model produced non-finite embeddings")
        return emb

    counts = {}
    with atomic_dir(out_dir) as tmp:
        for name in test_sets(shards_dir):
            data = read_shards(Path(shards_dir) / name)
            emb = embed(data)
            _save(Path(tmp) / f"{name}.npz", data.image_ids, data.identities, emb)
            counts[name] = len(data)
            print(f"embedded {name}: {len(data)} images, {emb.shape[1]}-D, flip={params.flip}")
        if recipe is not None:
            data, val_idx, pairs = validation_set(shards_dir, recipe)
            if len(val_idx) == 0:
                print("no validation images (train.val_fraction leaves none): no validation pairs")
            else:
                emb = embed(data, val_idx)
                _save(Path(tmp) / VALIDATION_EMBEDDINGS, [data.image_ids[i] for i in val_idx],
                      [data.identities[i] for i in val_idx], emb)
                pairs.to_csv(Path(tmp) / VALIDATION_PAIRS, index=False)
                counts["_validation"] = len(val_idx)
                print(f"embedded the validation split: {len(val_idx)} images, {len(pairs)} pairs")
    return counts


def run_embed_pretrained(name: str, params: PretrainedParams, detect_dir: str | Path, shards_dir: str | Path,
                         out_dir: str | Path, *, progress: bool = True, embed: EmbedParams | None = None
                         ) -> dict[str, int]:
    """Embed the test sets with an off-the-shelf model (``params.kind``, default ``name``).

    ``facepipe``: a saved ``model.pt`` (``params.path``) embedded from the shards by
    :func:`run_embed` with ``embed`` (the same code and settings as a trained run's
    embed stage; no validation pairs). ``dlib``: from the ORIGINAL images the detect
    stage kept (so every model is compared on the same pairs), with dlib's own detection
    and alignment recipe and our MTCNN box as a fallback when its detector misses
    (``mtcnn_fallback``).
    """
    kind = params.kind or name
    if kind == "facepipe":
        return run_embed(embed or EmbedParams(), params.path or "", shards_dir, out_dir,
                         missing_hint=f" (pretrained.{name}.path)")
    if kind != "dlib":  # pragma: no cover - the config schema only admits known backends
        raise ValueError(f"unknown pretrained model kind {kind!r}")
    from pipeline.baselines.dlib_resnet import DlibFaceEmbedder, save_embeddings

    embedder = DlibFaceEmbedder()
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for set_name in test_sets(shards_dir):
            rows = pd.read_parquet(Path(detect_dir) / f"{set_name}.parquet")
            rows = rows[rows["status"] == "ok"].reset_index(drop=True)
            boxes = rows[["box_x", "box_y", "box_w", "box_h"]].to_numpy() if params.mtcnn_fallback else None
            emb, ok, reasons = embedder.embed_images(rows["path"].tolist(), boxes=boxes, upsample=params.upsample,
                                                     jitter=params.jitter, progress=progress)
            counts[set_name] = save_embeddings(Path(tmp) / f"{set_name}.npz", rows["image_id"].tolist(),
                                               rows["identity"].tolist(), emb, ok)
            fallback = sum("MTCNN box" in r for r in reasons)
            print(f"{name} embedded {set_name}: {counts[set_name]}/{len(rows)} images ({fallback} via the MTCNN box)")
    return counts
