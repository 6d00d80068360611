"""Stage ``data``: resolve the configured datasets into index tables.

Writes ``OUT/index/<set>.csv`` (image_id, path, identity) for ``train`` and every
test set, ``OUT/index/<set>.pairs.csv`` (fold, image_id1, image_id2, same) for
test sets (``same`` empty throughout for an unlabelled pairs CSV, whose summary entry
says ``"labelled": false``), ``OUT/summary.json``, and, when a synthetic set is configured, the
generated images under ``OUT/synthetic/``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError, DatasetSpec, Params
from pipeline.datasets import DatasetError, ImageSet
from pipeline.io import atomic_dir, write_csv, write_json

SYNTHETIC_SETS = ("train", "synth_open", "synth_closed", "synth_domain")


def load_dataset(spec: DatasetSpec, *, synthetic: dict[str, ImageSet] | None = None, seed: int = 0) -> ImageSet:
    """Resolve one configured dataset with its adapter (``seed``: folds of a pairs CSV without a fold column)."""
    if spec.kind == "synthetic":
        if synthetic is None or spec.set not in synthetic:
            raise DatasetError(f"synthetic set {spec.set!r} unknown; choose one of {', '.join(SYNTHETIC_SETS)}")
        return synthetic[spec.set]
    if spec.kind == "folder":
        from pipeline.datasets.folder import load_folder

        return load_folder(spec.path, min_images_per_identity=spec.min_images_per_identity)
    if spec.kind == "lfw":
        from pipeline.datasets.lfw import download_lfw, load_lfw

        root = Path(spec.path)
        if spec.download and not root.is_dir():
            root = download_lfw(root.parent)
        return load_lfw(root, spec.pairs, folds=spec.folds)
    if spec.kind == "pairs_csv":
        from pipeline.datasets.pairs_csv import load_pairs_csv

        return load_pairs_csv(spec.path, root=spec.root, seed=seed)
    raise DatasetError(f"unknown dataset kind {spec.kind!r}")  # pragma: no cover - schema forbids it


def run_data(params: Params, out_dir: str | Path = "data/datasets", *, progress: bool = True) -> dict[str, ImageSet]:
    """Resolve ``params.data`` into index tables under ``out_dir`` (written atomically)."""
    out_dir = Path(out_dir)
    specs = {"train": params.data.train, **params.data.tests}
    with atomic_dir(out_dir) as tmp:
        synthetic = None
        if any(spec.kind == "synthetic" for spec in specs.values()):
            from pipeline.datasets.synthetic import generate_synthetic

            try:
                generated = generate_synthetic(
                    tmp / "synthetic", seed=params.seeds.data, progress=progress, **params.data.synthetic.model_dump()
                )
            except ValueError as err:  # sizes that cannot make the folds and pairs asked for
                raise ConfigError(f"data.synthetic: {err}") from None
            # The images were written under the temporary folder; record their final paths.
            synthetic = {
                name: ImageSet(_rebase(images, tmp, out_dir), pairs) for name, (images, pairs) in generated.items()
            }
        resolved: dict[str, ImageSet] = {}
        for name, spec in specs.items():
            try:
                resolved[name] = load_dataset(spec, synthetic=synthetic, seed=params.seeds.data)
            except DatasetError as err:
                key = "data.train" if name == "train" else f"data.tests.{name}"
                raise DatasetError(f"{key}: {err}") from None
        for name, spec in specs.items():
            if spec.exclude_identities_of:
                banned = set().union(*(resolved[other].identities for other in spec.exclude_identities_of))
                images = resolved[name].images
                resolved[name] = ImageSet(images[~images["identity"].isin(banned)], resolved[name].pairs,
                                          folds_assigned=resolved[name].folds_assigned)
        summary = {}
        for name, image_set in resolved.items():
            write_csv(tmp / "index" / f"{name}.csv", image_set.images)
            if image_set.pairs is not None:
                write_csv(tmp / "index" / f"{name}.pairs.csv", image_set.pairs)
            summary[name] = {
                "kind": specs[name].kind,
                "images": len(image_set.images),
                "identities": len(image_set.identities),
                "pairs": None if image_set.pairs is None else len(image_set.pairs),
                "folds": None if image_set.pairs is None else int(image_set.pairs["fold"].nunique()),
            }
            if not image_set.labelled:  # only here, so the labelled sets' summaries stay as they were
                summary[name]["labelled"] = False
            if image_set.pairs is not None and image_set.folds_assigned is not None:
                # Only where the adapter says ("from file", "stratified by label, seed S"): the
                # summaries of the built-in synthetic sets stay byte-identical to earlier runs.
                summary[name]["folds_assigned"] = image_set.folds_assigned
            if specs[name].precropped:
                # Read by detect and align (read_precropped): a changed flag changes this stage's
                # output, so DVC reruns both. Only for such sets: other summaries stay as they were.
                summary[name].update(precropped=True, crop=specs[name].crop, crop_fraction=specs[name].crop_fraction)
        write_json(tmp / "summary.json", summary)
    return resolved


def _rebase(images, tmp: Path, final: Path):
    images = images.copy()
    images["path"] = [str(final / Path(p).relative_to(tmp)) for p in images["path"]]
    return images


def read_index(data_dir: str | Path, name: str) -> ImageSet:
    """Read back the tables the data stage wrote for set ``name``."""
    import pandas as pd

    index = Path(data_dir) / "index"
    images_file = index / f"{name}.csv"
    if not images_file.is_file():
        raise DatasetError(f"{images_file}: not found; run the data stage first (dvc repro data)")
    images = pd.read_csv(images_file, dtype={"image_id": str, "path": str, "identity": str})
    pairs_file = index / f"{name}.pairs.csv"
    pairs = pd.read_csv(pairs_file, dtype={"image_id1": str, "image_id2": str}) if pairs_file.is_file() else None
    return ImageSet(images, pairs)


def read_precropped(data_dir: str | Path) -> dict[str, tuple[str, float]]:
    """Pre-cropped sets recorded by the data stage in ``summary.json``: name -> (crop, crop_fraction)."""
    import json

    summary_file = Path(data_dir) / "summary.json"
    if not summary_file.is_file():
        raise DatasetError(f"{summary_file}: not found; run the data stage first (dvc repro data)")
    summary = json.loads(summary_file.read_text())
    return {name: (entry.get("crop", "resize"), float(entry.get("crop_fraction", 1.0)))
            for name, entry in summary.items() if entry.get("precropped")}
