"""Dataset adapters: each one turns a dataset on disk into the same two tables.

``images``  one row per image: ``image_id`` (unique within the set), ``path``, ``identity``
``pairs``   one row per verification pair: ``fold``, ``image_id1``, ``image_id2``, ``same`` (1/0,
            or NA throughout for an unlabelled pair list, which is predicted, not evaluated);
            ``None`` for training sets.

Adapters: :mod:`.synthetic` (built in), :mod:`.folder`, :mod:`.lfw`, :mod:`.pairs_csv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

IMAGE_COLUMNS = ["image_id", "path", "identity"]
PAIR_COLUMNS = ["fold", "image_id1", "image_id2", "same"]


class DatasetError(ValueError):
    """A dataset that is missing or not laid out as its adapter expects (one-line message)."""


@dataclass
class ImageSet:
    """A resolved dataset: its images and (for test sets) its verification pairs."""

    images: pd.DataFrame
    pairs: pd.DataFrame | None = None
    # How the pairs' folds were set, for the data stage's summary.json: "from file" or
    # e.g. "stratified by label, seed 0"; None where the adapter does not say.
    folds_assigned: str | None = None

    def __post_init__(self) -> None:
        self.images = self.images[IMAGE_COLUMNS].reset_index(drop=True)
        if self.images["image_id"].duplicated().any():
            dup = self.images.loc[self.images["image_id"].duplicated(), "image_id"].iloc[0]
            raise DatasetError(f"image id {dup!r} appears twice")
        if self.pairs is not None:
            self.pairs = self.pairs[PAIR_COLUMNS].reset_index(drop=True)
            self.pairs["fold"] = self.pairs["fold"].astype(int)
            unknown = self.pairs["same"].isna()
            if unknown.all():
                self.pairs["same"] = pd.array([pd.NA] * len(self.pairs), dtype="Int64")
            elif unknown.any():
                raise DatasetError(f"pair {int(unknown.idxmax()) + 1} has no same/different label while others "
                                   "have one; label every pair or none")
            else:
                self.pairs["same"] = self.pairs["same"].astype(int)
            known = set(self.images["image_id"])
            missing = set(self.pairs["image_id1"]).union(self.pairs["image_id2"]) - known
            if missing:
                raise DatasetError(f"pairs name images that are not in the set, e.g. {sorted(missing)[0]!r}")

    @property
    def labelled(self) -> bool:
        """False for an unlabelled pair list (``same`` is NA throughout); True otherwise."""
        return self.pairs is None or not self.pairs["same"].isna().all()

    @property
    def identities(self) -> list[str]:
        return sorted(self.images["identity"].unique())
