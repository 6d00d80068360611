"""``lfw`` datasets: the LFW layout plus an official-format ``pairs.txt``.

Layout::

    ROOT/<Name>/<Name>_0001.jpg
    pairs.txt   first line "FOLDS<TAB>N" (N matched and N mismatched pairs per fold),
                then per fold N lines "name i j" (same person) followed by
                N lines "name1 i name2 j" (different people).

Any number of folds is accepted (the official file has 10, View 1 has 1). A
header-less file is read as a single fold. Users with internet can set
``download: true`` to fetch the official archive and pairs file.

:func:`check_layout` checks the image folder and the whole pairs file (header, every line,
the counts, the folds asked for) without touching the images beyond finding one that
exists (config validation).
"""

from __future__ import annotations

import shutil
import tarfile
import urllib.request
from pathlib import Path

import pandas as pd

from pipeline.datasets import DatasetError, ImageSet

LAYOUT = "ROOT/<Name>/<Name>_NNNN.jpg with an official pairs.txt"
OFFICIAL_ARCHIVE = "http://vis-www.cs.umass.edu/lfw/lfw.tgz"
OFFICIAL_PAIRS = "http://vis-www.cs.umass.edu/lfw/pairs.txt"


def image_id(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def parse_pairs(pairs_file: str | Path) -> pd.DataFrame:
    """Parse an official-format pairs file into ``fold, image_id1, image_id2, same``."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise DatasetError(f"{pairs_file}: pairs file not found; expected {LAYOUT}")
    lines = [ln.split() for ln in pairs_file.read_text().splitlines() if ln.strip()]
    if not lines:
        raise DatasetError(f"{pairs_file}: empty pairs file")
    header = lines[0]
    if len(header) == 2 and all(tok.isdigit() for tok in header):
        folds, per_class = int(header[0]), int(header[1])
        body = lines[1:]
    elif len(header) == 1 and header[0].isdigit():  # View 1 style: a single count
        folds, per_class = 1, int(header[0])
        body = lines[1:]
    else:
        folds, per_class = 1, None
        body = lines
    rows = []
    for lineno, tokens in enumerate(body, start=2 if per_class is not None else 1):
        try:
            if len(tokens) == 3:
                name, i, j = tokens[0], int(tokens[1]), int(tokens[2])
                rows.append((image_id(name, i), image_id(name, j), 1))
            elif len(tokens) == 4:
                rows.append((image_id(tokens[0], int(tokens[1])), image_id(tokens[2], int(tokens[3])), 0))
            else:
                raise ValueError
        except ValueError:
            raise DatasetError(
                f"{pairs_file}:{lineno}: expected 'name i j' or 'name1 i name2 j', got {' '.join(tokens)!r}"
            ) from None
    if per_class is None:
        per_fold = len(rows)
    else:
        per_fold = 2 * per_class
        if len(rows) != folds * per_fold:
            raise DatasetError(
                f"{pairs_file}: header says {folds} folds x {per_fold} pairs = {folds * per_fold} lines, "
                f"found {len(rows)}"
            )
    frame = pd.DataFrame(rows, columns=["image_id1", "image_id2", "same"])
    frame.insert(0, "fold", [1 + k // per_fold for k in range(len(rows))])
    return frame


def default_pairs_file(root: str | Path) -> Path:
    """Where the pairs file is when none is named: ``pairs.txt`` beside the image folder."""
    return Path(root).parent / "pairs.txt"


def _selected(pairs: pd.DataFrame, pairs_file: Path, folds: list[int] | None) -> pd.DataFrame:
    if not folds:
        return pairs
    unknown = sorted(set(folds) - set(pairs["fold"]))
    if unknown:
        raise DatasetError(f"{pairs_file}: no fold {unknown[0]} (the file has {pairs['fold'].max()})")
    return pairs[pairs["fold"].isin(folds)].reset_index(drop=True)


def check_layout(root: str | Path, pairs_file: str | Path | None = None, *, folds: list[int] | None = None) -> None:
    """Cheap check (``python -m pipeline validate``): the image folder exists, the pairs file
    parses (:func:`parse_pairs`), the folds asked for are in it, and at least one image it
    names exists (stops at the first). :class:`DatasetError` (one line) otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: LFW image folder not found; expected {LAYOUT}")
    pairs_file = Path(pairs_file) if pairs_file else default_pairs_file(root)
    pairs = _selected(parse_pairs(pairs_file), pairs_file, folds)
    names = pd.unique(pairs[["image_id1", "image_id2"]].to_numpy().ravel())
    if not any((root / name).is_file() for name in names):
        raise DatasetError(f"{root}: none of the images named in {pairs_file} exist; expected {LAYOUT}")


def load_lfw(root: str | Path, pairs_file: str | Path | None = None, *, folds: list[int] | None = None) -> ImageSet:
    """Resolve LFW pairs (optionally only ``folds``, numbered from 1) to image paths."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: LFW image folder not found; expected {LAYOUT}")
    pairs_file = Path(pairs_file) if pairs_file else default_pairs_file(root)
    pairs = _selected(parse_pairs(pairs_file), pairs_file, folds)
    ids = sorted(set(pairs["image_id1"]).union(pairs["image_id2"]))
    paths = [root / i for i in ids]
    absent = [p for p in paths if not p.is_file()]
    if len(absent) == len(paths):
        raise DatasetError(f"{root}: none of the images named in {pairs_file} exist; expected {LAYOUT}")
    # Images named by the pairs file but absent on disk stay in the table: detection
    # rejects them with a reason and the score stage reports their pairs as missing.
    images = pd.DataFrame(
        {"image_id": ids, "path": [str(p) for p in paths], "identity": [i.split("/")[0] for i in ids]}
    )
    return ImageSet(images, pairs, folds_assigned="from file")


def download_lfw(dest: str | Path, *, archive_url: str = OFFICIAL_ARCHIVE, pairs_url: str = OFFICIAL_PAIRS) -> Path:
    """Fetch and unpack the LFW archive and pairs file into ``dest`` (skips what exists).

    Returns the image root (``dest/lfw``). Works with any urllib URL, ``file://``
    included, which is how it is tested offline.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pairs_path = dest / "pairs.txt"
    if not pairs_path.exists():
        _fetch(pairs_url, pairs_path)
    root = dest / "lfw"
    if not root.is_dir():
        archive = dest / "lfw.tgz"
        if not archive.exists():
            _fetch(archive_url, archive)
        tmp = dest / ".lfw.unpack"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        inner = [p for p in tmp.iterdir() if p.is_dir()]
        if len(inner) != 1:
            raise DatasetError(f"{archive}: expected one top-level folder in the archive, found {len(inner)}")
        inner[0].rename(root)
        shutil.rmtree(tmp)
    return root


def _fetch(url: str, target: Path) -> None:
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DatasetError(
            f"{url}: download failed ({err}); download it by hand to {target} and set download: false"
        ) from None
    tmp.rename(target)
