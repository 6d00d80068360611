"""Stage ``embed@LOSS``: embeddings of every test image with one trained model.

For each test set under the shards folder, writes ``OUT/<set>.npz`` with
``image_ids`` [N], ``identities`` [N] and ``embeddings`` [N, D] float32: the RAW
model outputs (not L2-normalised), optionally the sum of the outputs for the image
and its horizontal mirror (``flip``). Normalising is left to the score stage, so
switching test-time normalisation never needs new embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline import cpu
from pipeline.config import EmbedParams, PretrainedParams
from pipeline.io import atomic_dir
from pipeline.shards import read_shards, test_sets
from pipeline.train import describe_device, embed_array, load_model, pick_device


def run_embed(params: EmbedParams, model_path: str | Path, shards_dir: str | Path, out_dir: str | Path
              ) -> dict[str, int]:
    """Embed every test set; returns the number of images embedded per set.

    Runs in fp32 on any device (the test embeddings are the measurement; they are cheap)."""
    dev = pick_device(params.device, key="embed.device")
    if dev.type == "cpu":
        torch.set_num_threads(cpu.thread_count())
    print(f"embed: {describe_device(dev, None, 1)}", flush=True)
    model, saved = load_model(model_path, dev)
    grayscale = bool(saved["model_params"].get("grayscale", False))
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for name in test_sets(shards_dir):
            data = read_shards(Path(shards_dir) / name)
            images = torch.from_numpy(data.decode_all())
            emb = embed_array(model, images, grayscale=grayscale, device=dev, batch_size=params.batch_size,
                              flip=params.flip)
            if not np.isfinite(emb).all():
                raise RuntimeError(f"{model_path}: the model produced non-finite embeddings for set {name}")
            np.savez(
                Path(tmp) / f"{name}.npz",
                image_ids=np.asarray(data.image_ids, dtype=object).astype(str),
                identities=np.asarray(data.identities, dtype=object).astype(str),
                embeddings=emb.astype(np.float32),
            )
            counts[name] = len(data)
            print(f"embedded {name}: {len(data)} images, {emb.shape[1]}-D, flip={params.flip}")
    return counts


def run_embed_pretrained(name: str, params: PretrainedParams, detect_dir: str | Path, shards_dir: str | Path,
                         out_dir: str | Path, *, progress: bool = True) -> dict[str, int]:
    """Embed the test sets with an off-the-shelf model, from the ORIGINAL images.

    The images are the ones the detect stage kept (so every model is compared on the
    same pairs); the pretrained model uses its own detection and alignment recipe,
    with our MTCNN box as a fallback when its detector misses (``mtcnn_fallback``).
    """
    import pandas as pd

    if name != "dlib":  # pragma: no cover - the config schema only admits known backends
        raise ValueError(f"unknown pretrained model {name!r}")
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
