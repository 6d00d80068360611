"""The report's input tables: every run's per-pair scores on one test set and variant, on common pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import RESERVED_SET_NAMES, Params
from pipeline.score import variant_name


@dataclass
class Table:
    """The scores of every run of every model on one test set and variant, on common pairs.

    ``scores[model]``: [R, N] (runs in seed order); ``labels``, ``folds``: [N];
    ``pairs_total``: pairs in the set; ``pairs_missing``: pairs some run could not score;
    ``thresholds[model]``: each run's entry of its ``thresholds.json`` for this variant.
    """

    test_set: str
    variant: str
    scores: dict[str, np.ndarray]
    labels: np.ndarray
    folds: np.ndarray
    pairs_total: int
    pairs_missing: int
    thresholds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class RunSource(Protocol):
    """Where runs' files are read: this workspace (:class:`WorkspaceRuns`) or finished DVC
    experiments (the grid report). A run is any hashable key the source understands."""

    def test_sets(self, run: Hashable) -> list[str]: ...

    def scores(self, run: Hashable, test_set: str, variant: str) -> pd.DataFrame: ...

    def metrics(self, run: Hashable) -> dict: ...

    def thresholds(self, run: Hashable) -> dict[str, Any]: ...


class WorkspaceRuns:
    """Reads a run's outputs from this workspace (the stages' files under data/ and reports/).

    ``sets``: the configured test sets (a removed set's folders stay on disk, since DVC does not
    delete the outputs of stages that no longer exist); None lists the folders found.
    ``pretrained``: the names of the pretrained models (their files are under ``.../pretrained/``)."""

    def __init__(self, sets: list[str] | None = None, pretrained=()) -> None:
        self.sets = None if sets is None else sorted(sets)
        self.pretrained = set(pretrained)

    def _is_pretrained(self, run: str) -> bool:
        return run in self.pretrained

    def test_sets(self, run: str) -> list[str]:
        if self.sets is not None:
            return self.sets
        if self._is_pretrained(run):
            folder = paths.SCORES / paths.PRETRAINED_TREE / run
            found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        else:
            found = sorted(p.name for p in paths.SCORES.iterdir() if (p / run).is_dir()
                           and p.name not in RESERVED_SET_NAMES) if paths.SCORES.is_dir() else []
        if not found:
            raise FileNotFoundError(f"{paths.SCORES}: no scores of {run}; run `dvc repro` (the score stages)")
        return found

    def scores(self, run: str, test_set: str, variant: str) -> pd.DataFrame:
        path = paths.set_scores(run, test_set, pretrained=self._is_pretrained(run)) / f"{variant}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `dvc repro` (the score stage of {test_set})")
        return pd.read_csv(path, dtype={"image_id1": str, "image_id2": str})

    def metrics(self, run: str) -> dict:
        """``{set: that set's metrics}`` of every test set, plus the run's ``thresholds``."""
        out: dict = {}
        for name in self.test_sets(run):
            path = paths.metrics_file(run, name, pretrained=self._is_pretrained(run))
            if not path.is_file():
                continue
            entry = json.loads(path.read_text())
            out["thresholds"] = entry.pop("thresholds", out.get("thresholds"))
            out[name] = entry
        return out

    def thresholds(self, run: str) -> dict[str, Any]:
        sets = self.test_sets(run)
        path = paths.thresholds_file(run, sets[0], pretrained=self._is_pretrained(run))  # the same on every set
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; rerun the score stages (dvc repro)")
        return json.loads(path.read_text())


def _table(test_set: str, variant: str, runs: dict[str, list], source: RunSource,
           thresholds: dict[Hashable, dict]) -> Table:
    """One :class:`Table`: the pairs every run scored; the runs must list the same pairs."""
    frames = {run: source.scores(run, test_set, variant) for model in runs for run in runs[model]}
    first_run = next(iter(frames))
    base = frames[first_run]
    keys = base[["image_id1", "image_id2"]]
    scored = np.ones(len(base), dtype=bool)
    for run, frame in frames.items():
        if len(frame) != len(base) or not frame[["image_id1", "image_id2"]].equals(keys):
            raise ValueError(f"{test_set}: the pairs scored by {run} differ from those of {first_run}; "
                             "models are compared on the same pairs (rerun the score stages)")
        scored &= (frame["status"] == "scored").to_numpy()
    scores = {model: np.stack([frames[run]["score"].to_numpy(dtype=np.float64)[scored] for run in runs[model]])
              for model in runs}
    return Table(test_set, variant, scores, base["same"].to_numpy()[scored].astype(int),
                 base["fold"].to_numpy()[scored], len(base), int((~scored).sum()),
                 {model: [thresholds[run].get(variant, {}) for run in runs[model]] for model in runs})


def load_tables(runs: dict[str, list], variants: list[str], source: RunSource | None = None) -> list[Table]:
    """One :class:`Table` per labelled test set and scoring variant.

    ``runs``: model -> its runs; ``variants``: e.g. ``["cosine_norm", "l2_raw"]``;
    ``source``: where the runs' files are read (:class:`WorkspaceRuns` by default; the
    grid report reads finished DVC experiments). The pairs every run could score are kept.
    Sets without labels (see :func:`predicted_only_sets`) have no table.
    """
    source = source or WorkspaceRuns()
    first_run = next(iter(runs.values()))[0]
    unlabelled = predicted_only_sets(runs, variants, source)
    thresholds = {run: source.thresholds(run) for model in runs for run in runs[model]}
    return [_table(test_set, variant, runs, source, thresholds)
            for test_set in source.test_sets(first_run) if test_set not in unlabelled for variant in variants]


def predicted_only_sets(runs: dict[str, list], variants: list[str],
                        source: RunSource | None = None) -> dict[str, dict[str, int]]:
    """Test sets without labels: ``{set: {"pairs", "missing"}}`` (from the first run's per-pair file)."""
    source = source or WorkspaceRuns()
    first_run = next(iter(runs.values()))[0]
    out = {}
    for test_set in source.test_sets(first_run):
        frame = source.scores(first_run, test_set, variants[0])
        if frame["same"].isna().all():
            out[test_set] = {"pairs": int(len(frame)), "missing": int((frame["status"] != "scored").sum())}
    return out


def params_variants(params: Params) -> list[str]:
    """The scoring variants params.yaml asks for: ``<distance>_<norm|raw>``."""
    return [variant_name(d, n) for d in params.score.distances for n in params.score.normalize]
