"""Every kind of bad image file becomes a reason, never a crash; odd modes become RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import BadImage, load_rgb
from tests.conftest import write_image

RNG = np.random.default_rng(0)
FACE = (RNG.random((64, 48, 3)) * 255).astype(np.uint8)


def test_rgb_jpeg(tmp_path):
    image, scale = load_rgb(write_image(tmp_path / "a.jpg", FACE))
    assert image.shape == (64, 48, 3) and image.dtype == np.uint8 and scale == 1.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_modes_become_rgb(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray((np.arange(64 * 48).reshape(64, 48) * 20).astype(np.uint16))
        suffix = ".png"
    else:
        img = Image.fromarray(FACE).convert(mode)
        suffix = ".jpg" if mode in ("L", "CMYK") else ".png"
    path = tmp_path / f"img{suffix}"
    img.save(path)
    image, _ = load_rgb(path)
    assert image.shape == (64, 48, 3) and image.dtype == np.uint8
    if mode == "I;16":
        assert image.max() == 255  # 16-bit range rescaled, not clipped to black/white


def test_rgba_transparent_becomes_white(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    image, _ = load_rgb(write_image(tmp_path / "t.png", rgba))
    assert (image == 255).all()


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(FACE).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize(
    "name,payload,needle",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not a picture\n", "not an image"),
        ("truncated.jpg", None, "corrupt or truncated"),
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not an image|corrupt"),
    ],
)
def test_bad_files_raise_badimage_with_reason(tmp_path, name, payload, needle):
    path = tmp_path / name
    path.write_bytes(_truncated_jpeg() if payload is None else payload)
    with pytest.raises(BadImage, match=needle):
        load_rgb(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadImage, match="cannot read"):
        load_rgb(tmp_path / "nope.jpg")


def test_tiny_rejected_and_huge_shrunk(tmp_path):
    with pytest.raises(BadImage, match="too small"):
        load_rgb(write_image(tmp_path / "tiny.png", FACE[:8, :8]), min_side=24)
    big = np.tile(FACE, (50, 60, 1))  # 3200 x 2880
    image, scale = load_rgb(write_image(tmp_path / "big.jpg", big), max_side=1000)
    assert max(image.shape[:2]) == 1000
    assert scale == pytest.approx(1000 / 3200)
