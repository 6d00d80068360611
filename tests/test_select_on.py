"""train.select_on: the best epoch chosen by the AUC on a named test set's pairs; and the shards helpers
shared with tests/test_identification.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import train as train_module
from pipeline.config import ModelParams, ShardParams, TrainParams
from pipeline.shards import write_set
from pipeline.train import TrainSetup, load_model, train
from tests.conftest import write_image


def _face(identity: int, rng: np.random.Generator) -> np.ndarray:
    """A 64 px image whose identity shows in its colour and stripe (learnable in a few epochs)."""
    base = np.random.default_rng(identity).integers(40, 215, 3)
    img = np.clip(base + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    img[:, (identity * 9) % 56 : (identity * 9) % 56 + 6] = 255
    return img


def _write(aligned: Path, name: str, ids: list[int], per: int, seed: int, prefix: str = "id") -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in ids:
        for k in range(per):
            image_id = f"{prefix}{i}/{name}{k}"
            write_image(aligned / name / f"{image_id}.jpg", _face(i, rng), quality=95)
            rows.append({"image_id": image_id, "identity": f"{prefix}{i}", "source_path": image_id,
                         "file": f"{image_id}.jpg", "residual": 0.0, "error": ""})
    pd.DataFrame(rows).to_csv(aligned / name / "_index.csv", index=False)
    return rows


def _pairs(rows: list[dict]) -> pd.DataFrame:
    out = []
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            out.append({"fold": 1 + (a + b) % 2, "image_id1": rows[a]["image_id"], "image_id2": rows[b]["image_id"],
                        "same": int(rows[a]["identity"] == rows[b]["identity"])})
    return pd.DataFrame(out)


def _project(root: Path, n_ids: int = 6) -> Path:
    """Shards: train (n_ids identities x 8), closed (other images of the same identities, with
    pairs) and open (new identities, with pairs)."""
    aligned, shards = root / "aligned", root / "shards"
    _write(aligned, "train", list(range(n_ids)), 8, seed=0)
    closed = _write(aligned, "closed", list(range(n_ids)), 3, seed=1)
    opened = _write(aligned, "open", list(range(n_ids, n_ids + 4)), 3, seed=2, prefix="new")
    write_set(aligned / "train", shards / "train", ShardParams(), None, progress=False)
    write_set(aligned / "closed", shards / "closed", ShardParams(), _pairs(closed), progress=False)
    write_set(aligned / "open", shards / "open", ShardParams(), _pairs(opened), progress=False)
    return shards


def _setup(loss: str = "arcface", epochs: int = 3, **train_overrides) -> TrainSetup:
    params = {"scale": 16.0, "margin": 0.3} if loss == "arcface" else {}
    train_params = dict(epochs=epochs, batch_size=8, warmup_epochs=0, lr=0.05, val_fraction=0.25) | train_overrides
    return TrainSetup(loss_name=loss, loss_params=params, model=ModelParams(embedding_size=16),
                      train=TrainParams(**train_params), seed=1, image_size=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _project(tmp_path_factory.mktemp("identification"))


# ------------------------------------------------------------------------ select_on
def test_selection_set_keeps_the_pairs_whose_images_exist(shards, tmp_path):
    import shutil

    images, pairs = train_module.selection_set(shards, "closed")
    table = pd.read_csv(shards / "closed" / "pairs.csv")
    assert len(pairs) == len(table) and images.shape[1:] == (64, 64, 3)
    assert set(pairs[:, 2]) == {0, 1} and pairs[:, 2].sum() == table["same"].sum()
    # a pair naming an image the detector dropped is left out
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    table.loc[0, "image_id1"] = "id0/missing"
    table.loc[1, "image_id2"] = "id0/missing"
    table.to_csv(copy / "closed" / "pairs.csv", index=False)
    assert len(train_module.selection_set(copy, "closed")[1]) == len(table) - 2
    table["same"] = 0
    table.to_csv(copy / "closed" / "pairs.csv", index=False)
    with pytest.raises(train_module.TrainingError, match="select_on = 'closed'.*needs both"):
        train_module.selection_set(copy, "closed")


def _scripted_aucs(monkeypatch, validation: list[float], selection: list[float]):
    """validation_auc answers from two scripts: one for the validation pairs, one for the pairs of
    the set select_on names (told apart by the pairs object selection_set returned)."""
    real_selection = train_module.selection_set
    chosen: dict[str, object] = {}

    def recording_selection(*args):
        images, pairs = real_selection(*args)
        chosen["pairs"] = pairs
        return images, pairs

    calls = {"validation": 0, "selection": 0}

    def scripted(model, images, pairs, **kwargs):
        kind = "selection" if pairs is chosen.get("pairs") else "validation"
        calls[kind] += 1
        return (selection if kind == "selection" else validation)[calls[kind] - 1]

    monkeypatch.setattr(train_module, "selection_set", recording_selection)
    monkeypatch.setattr(train_module, "validation_auc", scripted)
    return calls


def test_checkpoint_chosen_on_a_named_test_set(shards, tmp_path, monkeypatch):
    calls = _scripted_aucs(monkeypatch, validation=[0.9, 0.6, 0.95], selection=[0.5, 0.8, 0.6])
    metrics = train(_setup(select_on="closed"), shards, tmp_path / "m", tmp_path / "c", tmp_path / "r", progress=False)
    assert calls == {"validation": 3, "selection": 3}
    assert metrics["selected_on"] == "closed" and metrics["best_epoch"] == 2
    assert metrics["selection_auc"] == 0.8 and metrics["best_val_auc"] == 0.6  # validation AUC of that epoch
    history = pd.read_csv(tmp_path / "r" / "history.csv")
    assert history["select_auc"].tolist() == [0.5, 0.8, 0.6] and history["val_auc"].tolist() == [0.9, 0.6, 0.95]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["selected_on"] == "closed"
    _, saved = load_model(tmp_path / "m" / "model.pt")
    assert saved["epoch"] == 2 and saved["selected_on"] == "closed"


def test_checkpoint_chosen_on_validation_by_default(shards, tmp_path, monkeypatch):
    calls = _scripted_aucs(monkeypatch, validation=[0.9, 0.6, 0.7], selection=[0.5, 0.8, 0.6])
    metrics = train(_setup(), shards, tmp_path / "m", tmp_path / "c", tmp_path / "r", progress=False)
    assert calls == {"validation": 3, "selection": 0}
    assert metrics["selected_on"] == "validation" and metrics["best_epoch"] == 1
    assert metrics["best_val_auc"] == metrics["selection_auc"] == 0.9
    assert "select_auc" not in pd.read_csv(tmp_path / "r" / "history.csv")
