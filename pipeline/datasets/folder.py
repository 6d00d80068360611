"""``folder`` datasets: one sub-folder per identity (CASIA-WebFace, LFW, your own).

::

    ROOT/
      Alice/001.jpg  002.png ...
      Bob/...

Every regular, non-hidden file in an identity folder is listed, whatever its
extension: files that are not images are rejected later, at detection, with a reason,
so nothing is skipped silently.

:func:`check_layout` checks the layout without listing every file (config validation).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline.datasets import DatasetError, ImageSet

LAYOUT = "ROOT/<identity>/<image file>, one sub-folder per identity"


def check_layout(root: str | Path, *, min_images_per_identity: int = 1) -> None:
    """Cheap layout check (``python -m pipeline validate``): ``root`` is a folder with at least one
    identity sub-folder holding ``min_images_per_identity`` files; stops at the first such folder.
    :class:`DatasetError` (one line) otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found; expected {LAYOUT}")
    with os.scandir(root) as entries:  # in directory order: any qualifying folder will do
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            with os.scandir(entry.path) as inside:
                files = (f for f in inside if f.is_file() and not f.name.startswith("."))
                if sum(1 for _ in zip(range(min_images_per_identity), files)) == min_images_per_identity:
                    return
    wanted = "images" if min_images_per_identity == 1 else f"at least {min_images_per_identity} images"
    raise DatasetError(f"{root}: no identity sub-folders with {wanted}; expected {LAYOUT}")


def list_identity_folder(root: str | Path, *, min_images_per_identity: int = 1) -> pd.DataFrame:
    """Return the ``images`` table of a folder-per-identity tree (sorted, deterministic)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found; expected {LAYOUT}")
    rows: list[tuple[str, str, str]] = []
    for identity_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f for f in identity_dir.iterdir() if f.is_file() and not f.name.startswith(".")
        )
        if len(files) < min_images_per_identity:
            continue
        for f in files:
            rows.append((f"{identity_dir.name}/{f.stem}{f.suffix}", str(f), identity_dir.name))
    if not rows:
        raise DatasetError(f"{root}: no identity sub-folders with images; expected {LAYOUT}")
    return pd.DataFrame(rows, columns=["image_id", "path", "identity"])


def load_folder(root: str | Path, *, min_images_per_identity: int = 1) -> ImageSet:
    return ImageSet(list_identity_folder(root, min_images_per_identity=min_images_per_identity))
