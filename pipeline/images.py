"""Decode image files robustly into RGB uint8 arrays.

Real datasets hold junk: zero-byte files, truncated or corrupt JPEGs, text files
with an image extension, grayscale, palette, RGBA, CMYK and 16-bit images, huge
scans and tiny thumbnails. :func:`load_rgb` turns every one of them into either an
``HxWx3 uint8`` RGB array or a :class:`BadImage` whose message is the reason the
file is rejected. It never raises anything else for a bad file.

**Image references.** Besides a file path, every function here accepts a reference to one
record of an MXNet RecordIO file, ``<file>.rec#<byte offset>`` (:func:`rec_reference`; the
insightface training sets are read this way, :mod:`pipeline.datasets.insightface`): the
record's image bytes are decoded as a file's would be, and a record that cannot be read
(wrong magic word, truncated file, corrupt JPEG) is a :class:`BadImage` whose message
names the ``.rec`` and the offset. Records are read with ``os.pread`` on one file
descriptor per ``.rec`` and process, kept open (:func:`_rec_descriptor`): safe on threads
(``pread`` has no shared file position) and in forked workers.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Refuse images above this many pixels before decoding them (about 16k x 16k).
MAX_PIXELS = 256_000_000


class BadImage(Exception):
    """The file cannot be used as a face image; ``str(err)`` is the reason."""


_REFERENCE = re.compile(r"^(?P<file>.+\.rec)#(?P<offset>[0-9]+)$", re.IGNORECASE)
_DESCRIPTORS: dict[str, tuple[tuple[int, int, int, int], int]] = {}
_DESCRIPTORS_LOCK = threading.Lock()
_MAX_DESCRIPTORS = 64


def rec_reference(rec_path: str | Path, offset: int) -> str:
    """The image reference of the record at byte ``offset`` of ``rec_path``: ``<rec_path>#<offset>``."""
    return f"{rec_path}#{int(offset)}"


def split_reference(ref: str | Path) -> tuple[str, int] | None:
    """``(rec file, byte offset)`` for a ``<file>.rec#<offset>`` reference, None for a plain path
    (also for a file that really is named like a reference)."""
    text = os.fspath(ref)
    match = _REFERENCE.match(text) if "#" in text else None
    if match is None or os.path.isfile(text):
        return None
    return match["file"], int(match["offset"])


def _rec_descriptor(rec_path: str) -> tuple[int, bool]:
    """``(descriptor, cached)``: a read-only descriptor of ``rec_path``, opened once per process and
    file version (device, inode, size, mtime), so a rewritten file gets a new one. Cached
    descriptors are never closed while the process runs (another thread may be reading from
    one), so at most 64 files are cached; a further file's descriptor is not cached and the
    caller closes it."""
    st = os.stat(rec_path)
    version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _DESCRIPTORS.get(rec_path)
    if cached is not None and cached[0] == version:
        return cached[1], True
    with _DESCRIPTORS_LOCK:
        cached = _DESCRIPTORS.get(rec_path)
        if cached is not None and cached[0] == version:
            return cached[1], True
        fd = os.open(rec_path, os.O_RDONLY)
        if len(_DESCRIPTORS) < _MAX_DESCRIPTORS or rec_path in _DESCRIPTORS:
            _DESCRIPTORS[rec_path] = (version, fd)  # a replaced file's old descriptor stays open (rare)
            return fd, True
    return fd, False


def _read_record_image(rec_path: str, offset: int) -> bytes:
    """The image bytes of the record at ``offset`` of ``rec_path``; :class:`BadImage` naming both."""
    from pipeline.datasets.recordio import RecordIOError, read_record, unpack_image_record

    where = f"{rec_path}: record at byte {offset}"
    try:
        fd, cached = _rec_descriptor(rec_path)
    except OSError as err:
        raise BadImage(f"{where}: cannot read file ({err.strerror or err})") from None
    try:
        payload = read_record(fd, offset, name=rec_path)
        _, image = unpack_image_record(payload, where=where)
    except RecordIOError as err:
        raise BadImage(str(err)) from None
    except OSError as err:
        raise BadImage(f"{where}: cannot read file ({err.strerror or err})") from None
    finally:
        if not cached:
            os.close(fd)
    if not image:
        raise BadImage(f"{where}: no image bytes (a header record, not an image)")
    return image


def read_image_bytes(ref: str | Path) -> bytes:
    """The encoded bytes of an image file, or of the image in a ``<file>.rec#<offset>`` record.

    Raises :class:`BadImage` when the file or record cannot be read (the image itself is not decoded).
    """
    reference = split_reference(ref)
    if reference is not None:
        return _read_record_image(*reference)
    try:
        return Path(ref).read_bytes()
    except OSError as err:
        raise BadImage(f"cannot read file ({err.strerror or err})") from None


def load_rgb(path: str | Path, *, max_side: int | None = None, min_side: int = 1) -> tuple[np.ndarray, float]:
    """Load ``path`` (a file, or a ``<file>.rec#<offset>`` record reference) as RGB.

    Returns ``(image, scale)`` where ``image`` is ``HxWx3 uint8`` and ``scale`` is the
    factor applied to the file's pixel grid (``< 1`` when the image was larger than
    ``max_side`` and was shrunk; coordinates found on ``image`` divided by ``scale``
    are coordinates in the file).
    """
    reference = split_reference(path)
    if reference is not None:
        data = _read_record_image(*reference)
        try:
            return _decode(io.BytesIO(data), max_side=max_side, min_side=min_side)
        except BadImage as err:
            raise BadImage(f"{reference[0]}: record at byte {reference[1]}: {err}") from None
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadImage(f"cannot read file ({err.strerror or err})") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    return _decode(path, max_side=max_side, min_side=min_side)


def decode_bytes(data: bytes, ref: str | Path, *, max_side: int | None = None, min_side: int = 1
                 ) -> tuple[np.ndarray, float]:
    """Decode image bytes already read from ``ref`` (by :func:`read_image_bytes`) exactly as
    :func:`load_rgb` decodes ``ref``; the same :class:`BadImage` messages."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        return _decode(io.BytesIO(data), max_side=max_side, min_side=min_side)
    except BadImage as err:
        reference = split_reference(ref)
        if reference is None:
            raise
        raise BadImage(f"{reference[0]}: record at byte {reference[1]}: {err}") from None


def _decode(source: Path | io.BytesIO, *, max_side: int | None, min_side: int) -> tuple[np.ndarray, float]:
    """Decode an image file or in-memory image (see :func:`load_rgb`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
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
