"""Shared fixtures: where the real LFW sample is, and small image files on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LFW_DEV = Path(os.environ.get("FACEPIPE_LFW_DEV", ROOT.parent / "shared" / "data" / "lfw-dev"))


@pytest.fixture
def lfw_dev() -> Path:
    """The real LFW sample beside the checkout; tests using it skip when it is absent."""
    if not (LFW_DEV / "images").is_dir():
        pytest.skip(f"real LFW sample not found at {LFW_DEV}")
    return LFW_DEV


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")


def write_image(path: Path, array: np.ndarray, **save_kwargs) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


def synthetic_face(seed: int = 0, size: int = 160) -> np.ndarray:
    """One face from the built-in generator (RGB uint8)."""
    from pipeline.datasets import synthetic

    rng = np.random.default_rng(seed)
    identity = synthetic.sample_identity(rng, "a")
    variation = synthetic.sample_variation(rng, "a")
    return synthetic.render_face(identity, variation, size)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict:
    """One short real training run (``pipeline.train.train`` on the tiny shards of
    tests/test_train.py), shared by the embed and predict tests. Records the validation
    images and pairs the trainer itself used, so tests can check they are rebuilt exactly.

    Returns ``{"model": model.pt, "shards": shards dir (train/ only), "metrics",
    "val_images": [V, H, W, 3] uint8, "val_pairs": [M, 3], "recipe": the recipe fields the
    embed stage reads}``.
    """
    from pipeline import train as train_module
    from tests.test_train import _setup, _shards

    root = tmp_path_factory.mktemp("tiny_model")
    shards = _shards(root)
    seen: dict = {}
    original = train_module.validation_auc

    def recording(model, images, pairs, **kwargs):
        seen["val_images"], seen["val_pairs"] = images.numpy().copy(), np.asarray(pairs).copy()
        return original(model, images, pairs, **kwargs)

    setup = _setup(epochs=1)
    setup.data_seed = 5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "validation_auc", recording)
        metrics = train_module.train(setup, shards, root / "model", root / "ckpt", root / "report", progress=False)
    return {"model": root / "model" / "model.pt", "shards": shards, "metrics": metrics, **seen,
            "recipe": {"train": setup.train.model_dump(), "data_seed": setup.data_seed}}
