"""``python -m pipeline export rec|bin SET OUT``: a sharded facepipe set in the insightface formats.

* ``rec``: any set's shards (``data/shards/<set>``) as ``OUT/train.rec``, ``train.idx`` and
  ``property`` (:func:`pipeline.datasets.insightface.write_rec`): each aligned JPEG stored as
  it is in the shards (byte for byte), grouped by label, the label being the shards' (the
  index of the identity among the set's sorted identity names); ``OUT/identities.csv`` maps
  labels back to names (``label,identity``), which the format itself cannot hold.
* ``bin``: a test set's labelled pairs as an insightface ``.bin``
  (:func:`~pipeline.datasets.insightface.write_bin`): pairs ordered by fold (stable), the two
  images of each pair taken from the shards. A pair with an image that is not in the shards
  (detection or alignment dropped it) is left out, and counted. Readers of ``.bin`` files
  cut the pairs into ten consecutive blocks; the summary says whether those blocks are the
  set's own folds.

Both read the set with :func:`pipeline.shards.read_shards` (all its encoded images in memory,
as training does) and write atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ConfigError
from pipeline.datasets.insightface import bin_folds, write_bin, write_rec
from pipeline.io import write_csv
from pipeline.shards import ShardError, read_shards

FORMATS = ("rec", "bin")


def export_rec(set_dir: str | Path, out_folder: str | Path) -> dict:
    """Write the set at ``set_dir`` as an insightface RecordIO folder; returns the counts
    (``images``, ``classes``, ``rec_bytes``)."""
    shards = read_shards(set_dir)
    if not len(shards):
        raise ShardError(f"{set_dir}: no images to export")
    height, width, _ = shards.image_shape()
    order = np.argsort(shards.labels, kind="stable")
    items = ((int(shards.labels[i]), shards.images[i]) for i in order)
    summary = write_rec(out_folder, items, len(shards.identity_names), (height, width))
    write_csv(Path(out_folder) / "identities.csv",
              pd.DataFrame({"label": range(len(shards.identity_names)), "identity": shards.identity_names}))
    return summary


def _same_partition(folds: np.ndarray) -> bool:
    """Whether ``folds`` (sorted by fold) are exactly the consecutive blocks a .bin reader makes."""
    blocks = bin_folds(len(folds))
    runs = np.flatnonzero(np.diff(folds)) + 1
    block_starts = np.flatnonzero(np.diff(blocks)) + 1
    return len(runs) == len(block_starts) and bool((runs == block_starts).all())


def export_bin(set_dir: str | Path, out_path: str | Path) -> dict:
    """Write the labelled pairs of the test set at ``set_dir`` as an insightface ``.bin``; returns
    ``pairs`` (written), ``skipped`` (an image not in the shards) and ``folds_kept``."""
    shards = read_shards(set_dir)
    pairs = shards.pairs
    if pairs is None:
        raise ShardError(f"{set_dir}: no pairs.csv; a .bin holds a test set's pairs (export rec writes any set)")
    if pairs["same"].isna().any():
        raise ShardError(f"{set_dir}/pairs.csv: unlabelled pairs; a .bin needs a same/different label per pair")
    position = {image_id: k for k, image_id in enumerate(shards.image_ids)}
    pairs = pairs.sort_values("fold", kind="stable")
    present = pairs["image_id1"].isin(position) & pairs["image_id2"].isin(position)
    kept = pairs[present]
    if kept.empty:
        raise ShardError(f"{set_dir}: none of the {len(pairs)} pairs has both images in the shards")
    images = [shards.images[position[image_id]] for pair in zip(kept["image_id1"], kept["image_id2"])
              for image_id in pair]
    write_bin(out_path, images, (kept["same"].astype(int) == 1).tolist())
    return {"pairs": int(len(kept)), "skipped": int((~present).sum()),
            "folds_kept": _same_partition(kept["fold"].to_numpy())}


def run_export(fmt: str, source: str | Path, out: str | Path) -> str:
    """``export rec|bin``: write ``source`` (a set's shards folder) to ``out``; returns the line to print."""
    if fmt == "rec":
        done = export_rec(source, out)
        return (f"wrote {out}/train.rec, train.idx, property, identities.csv: {done['images']} images, "
                f"{done['classes']} classes, {done['rec_bytes']} bytes")
    if fmt == "bin":
        done = export_bin(source, out)
        line = f"wrote {out}: {done['pairs']} pairs"
        if done["skipped"]:
            line += f", {done['skipped']} left out (an image not in the shards)"
        if not done["folds_kept"]:
            line += "; note: readers cut a .bin into 10 consecutive blocks of pairs, which differ from the set's folds"
        return line
    raise ConfigError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
