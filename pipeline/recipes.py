"""Stage ``recipes``: one resolved training recipe per loss, ``OUT/<loss>.json``.

A recipe is everything a ``train@LOSS-SEED`` stage reads apart from its training seed
and the shards: the loss's own params (defaults filled in), ``train`` with the loss's
overrides (``<section>.train``) applied, ``model``, the input size and the data seed
(which fixes the train/validation split). Each training stage depends on its own
recipe file rather than on whole params sections, so DVC reruns exactly the runs whose
recipe changed: ``dvc exp run -S loss.margin=0.8`` rewrites only ``arcface.json`` and
retrains only ArcFace's runs; ``-S losses.triplet.train.batch_size=128`` only Triplet's.

The files are written with sorted keys and a fixed layout, so an unchanged recipe gives
the same bytes and the same hash: rerunning this stage alone never triggers training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Params, section_of
from pipeline.io import atomic_dir


def recipe(params: Params, loss: str) -> dict[str, Any]:
    """The resolved recipe of ``loss`` as a JSON-ready dict."""
    from pipeline import losses as loss_registry

    return {
        "loss": loss,
        "section": section_of(loss),
        "loss_params": loss_registry.validate_params(loss, params.loss_params(loss)),
        "train": params.train_for(loss).model_dump(),
        "model": params.model.model_dump(),
        "image_size": params.align.size,
        "data_seed": params.seeds.data,
    }


def recipe_text(recipe_dict: dict[str, Any]) -> str:
    return json.dumps(recipe_dict, indent=2, sort_keys=True) + "\n"


def run_recipes(params: Params, out_dir: str | Path) -> dict[str, Path]:
    """Write ``OUT/<loss>.json`` for every loss in ``train_losses`` (atomically, as one directory)."""
    out_dir = Path(out_dir)
    written = {}
    with atomic_dir(out_dir) as tmp:
        for loss in params.train_losses:
            (Path(tmp) / f"{loss}.json").write_text(recipe_text(recipe(params, loss)))
            written[loss] = out_dir / f"{loss}.json"
    return written


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe written by :func:`run_recipes`; FileNotFoundError with what to run when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training recipe; run `dvc repro recipes` (or the whole pipeline) first")
    return json.loads(path.read_text())
