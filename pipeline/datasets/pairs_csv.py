"""``pairs_csv`` datasets: a CSV of image pairs with a same/different label (APD and similar).

Columns: ``path1, path2, same`` and optionally ``fold``. ``same`` accepts 1/0,
true/false, same/different. Relative paths are resolved against ``root`` (default:
the CSV's folder).

**Unlabelled pairs**: a file without a ``same`` column is a valid dataset too: its
pairs are scored and predicted (prediction files), never evaluated. Its ``same``
column is empty (NA) from here on, its folds are the file's ``fold`` column or a single
fold 1, and ``folds_assigned`` says ``"none (no labels)"`` in that case. It cannot be
the source of a fixed threshold or a report's in-/cross-domain set (the config check
says so in one line; :func:`has_labels` reads only the header).

Without a ``fold`` column, labelled pairs are dealt into
``default_folds`` folds stratified by label (:func:`stratified_folds`, seeded): every
fold gets the same share of same and different pairs and the folds differ in size by
at most one pair, whatever order the file lists them in (a file sorted by label would
otherwise give single-class folds, and per-fold thresholds would mean nothing). The
returned set's ``folds_assigned`` says which happened: ``"from file"`` or
``"stratified by label, seed S"``.

:func:`check_header` checks a pairs CSV cheaply, from its header and first row (config
validation), with the same one-line messages as :func:`load_pairs_csv`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets import DatasetError, ImageSet

LAYOUT = "a CSV with columns path1,path2[,same][,fold] (no same column: unlabelled pairs, predicted only)"
_TRUE = {"1", "true", "yes", "same", "match", "genuine"}
_FALSE = {"0", "false", "no", "different", "diff", "mismatch", "impostor"}


def stratified_folds(labels: list[int] | np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold ids 1..``k`` for pairs with these labels, stratified by label and seeded.

    Each class's pairs are shuffled (``numpy.random.default_rng(seed)``) and dealt to
    the folds round-robin; the second class continues the deal where the first one
    stopped. So every fold holds ``n_c // k`` or ``n_c // k + 1`` pairs of each class
    ``c`` and ``n // k`` or ``n // k + 1`` pairs in all. Returned in the input's order.
    """
    labels = np.asarray(labels)
    if k < 1:
        raise ValueError(f"k={k}; expected at least one fold")
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), dtype=np.int64)
    position = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = 1 + (position + np.arange(len(members))) % k
        position += len(members)
    return folds


def has_labels(csv_path: str | Path) -> bool:
    """Whether the pairs CSV has a ``same`` column (header only). A file that cannot be read
    counts as labelled: :func:`load_pairs_csv` reports what is wrong with it."""
    try:
        header = pd.read_csv(csv_path, dtype=str, nrows=0, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return True
    return "same" in {str(c).strip().lower() for c in header.columns}


def _read(csv_path: Path, nrows: int | None = None) -> pd.DataFrame:
    """The CSV as text columns (names stripped, lower case), checked for ``path1``/``path2``."""
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: pairs CSV not found; expected {LAYOUT}")
    try:
        table = pd.read_csv(csv_path, dtype=str, skipinitialspace=True, nrows=nrows)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0]
        raise DatasetError(f"{csv_path}: cannot be read as CSV ({reason}); expected {LAYOUT}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = {"path1", "path2"} - set(table.columns)
    if missing:
        raise DatasetError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; expected {LAYOUT}")
    if table.empty:
        raise DatasetError(f"{csv_path}: no pairs")
    return table


def check_header(csv_path: str | Path, *, root: str | Path | None = None) -> None:
    """Cheap check (``python -m pipeline validate``): the file exists and reads as CSV, its header
    has ``path1`` and ``path2``, it lists at least one pair, and ``root`` (when given) is a folder.
    Reads the header and first row only. :class:`DatasetError` (one line) otherwise."""
    _read(Path(csv_path), nrows=1)
    if root is not None and not Path(root).is_dir():
        raise DatasetError(f"{csv_path}: root {str(root)!r}: folder not found (relative image paths start there)")


def load_pairs_csv(
    csv_path: str | Path, *, root: str | Path | None = None, default_folds: int = 10, seed: int = 0
) -> ImageSet:
    """Read a pairs CSV; ``seed`` drives the fold assignment when the file has no ``fold`` column."""
    csv_path = Path(csv_path)
    table = _read(csv_path)
    base = Path(root) if root else csv_path.parent
    labelled = "same" in table.columns
    labels: list = []
    for row, value in enumerate(table["same"].fillna("") if labelled else [], start=2):
        token = str(value).strip().lower()
        if token in _TRUE:
            labels.append(1)
        elif token in _FALSE:
            labels.append(0)
        else:
            raise DatasetError(f"{csv_path}:{row}: same = {value!r}; expected 1/0, true/false or same/different")
    for column in ("path1", "path2"):
        empty = table[column].isna() | (table[column].str.strip() == "")
        if empty.any():
            raise DatasetError(f"{csv_path}:{int(empty.idxmax()) + 2}: empty {column}")
    if "fold" in table.columns:
        try:
            folds = table["fold"].astype(int).tolist()
        except ValueError:
            raise DatasetError(f"{csv_path}: the fold column must hold integers") from None
        folds_assigned = "from file"
    elif not labelled:
        folds, folds_assigned = [1] * len(table), "none (no labels)"
    else:
        k = max(1, min(default_folds, len(table) // 2))
        folds = stratified_folds(labels, k, seed).tolist()
        folds_assigned = f"stratified by label, seed {seed}"
    ids = sorted(set(table["path1"].str.strip()).union(table["path2"].str.strip()))
    paths = [Path(i) if Path(i).is_absolute() else base / i for i in ids]
    if not any(p.is_file() for p in paths):
        raise DatasetError(f"{csv_path}: none of the listed images exist under {base}; expected {LAYOUT}")
    images = pd.DataFrame(
        {"image_id": ids, "path": [str(p) for p in paths], "identity": [str(Path(i).parent) for i in ids]}
    )
    pairs = pd.DataFrame(
        {"fold": folds, "image_id1": table["path1"].str.strip(), "image_id2": table["path2"].str.strip(),
         "same": pd.array(labels if labelled else [pd.NA] * len(table), dtype="Int64")}
    )
    return ImageSet(images, pairs, folds_assigned=folds_assigned)
