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
