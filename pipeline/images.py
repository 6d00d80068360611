"""Decode image files robustly into RGB uint8 arrays.

Real datasets hold junk: zero-byte files, truncated or corrupt JPEGs, text files
with an image extension, grayscale, palette, RGBA, CMYK and 16-bit images, huge
scans and tiny thumbnails. :func:`load_rgb` turns every one of them into either an
``HxWx3 uint8`` RGB array or a :class:`BadImage` whose message is the reason the
file is rejected. It never raises anything else for a bad file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Refuse images above this many pixels before decoding them (about 16k x 16k).
MAX_PIXELS = 256_000_000


class BadImage(Exception):
    """The file cannot be used as a face image; ``str(err)`` is the reason."""


def load_rgb(path: str | Path, *, max_side: int | None = None, min_side: int = 1) -> tuple[np.ndarray, float]:
    """Load ``path`` as RGB.

    Returns ``(image, scale)`` where ``image`` is ``HxWx3 uint8`` and ``scale`` is the
    factor applied to the file's pixel grid (``< 1`` when the image was larger than
    ``max_side`` and was shrunk; coordinates found on ``image`` divided by ``scale``
    are coordinates in the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadImage(f"cannot read file ({err.strerror or err})") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise BadImage(f"image too large ({width}x{height} pixels)")
                if min(width, height) < min_side:
                    raise BadImage(f"image too small ({width}x{height}; need at least {min_side} px a side)")
                scale = 1.0
                if max_side and max(width, height) > max_side:
                    scale = max_side / max(width, height)
                    if img.format == "JPEG":
                        img.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
                img.load()
                img = ImageOps.exif_transpose(img)
                array = _to_rgb(img)
    except BadImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(_reason(err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(f"corrupt or truncated image ({_reason(err)})") from None
    if scale < 1.0 or (max_side and max(array.shape[:2]) > max_side):
        import cv2

        scale = max_side / max(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if target != (array.shape[1], array.shape[0]):
            array = cv2.resize(array, target, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(array), scale


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(img, dtype=np.float64)
        top = data.max()
        data = data / (top if top > 0 else 1.0) * 255.0 if top > 255 else data
        gray = np.clip(data, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        data = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(data), np.nanmax(data)
        gray = ((data - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, UnidentifiedImageError):
        return "not an image file (format not recognised)"
    return text
