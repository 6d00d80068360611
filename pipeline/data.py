"""Stage ``data_train`` / ``data@SET``: resolve one configured data set into index tables.

Each data set (``train``, or a test set of ``data.tests``) is its own stage, so adding or
changing one set never touches the others. For set ``SET`` it writes, under
``data/datasets/SET/``: ``index.csv`` (image_id, path, identity), for a test set
``pairs.csv`` (fold, image_id1, image_id2, same; ``same`` empty throughout for an
unlabelled pairs CSV), ``summary.json`` (kind, counts, how folds were assigned, whether the
set is pre-cropped), and the images the stage itself makes: the built-in synthetic faces
(``images/``), or the faces of an insightface ``.bin`` (``images/``).

``exclude_identities_of`` on a set drops the identities of the named test sets; they are
read from those sets' own sources when this stage runs (like external data, a change to
those sources is not seen by DVC: rerun with ``dvc repro -f data_train``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import paths
from pipeline.config import PREALIGNED_KINDS, ConfigError, DatasetSpec, Params
from pipeline.datasets import DatasetError, ImageSet
from pipeline.io import atomic_dir, write_csv, write_json

SYNTHETIC_SETS = ("train", "synth_open", "synth_closed", "synth_domain")
INDEX_FILE = "index.csv"
PAIRS_FILE = "pairs.csv"
SUMMARY_FILE = "summary.json"


def load_dataset(spec: DatasetSpec, *, out_dir: Path | None = None, synthetic_params=None, seed: int = 0,
                 progress: bool = False) -> ImageSet:
    """Resolve one configured data set with its adapter.

    ``out_dir``: where a set that makes its own image files (synthetic, insightface ``.bin``) writes
    them; None to resolve the tables only (synthetic: without rendering). ``seed``: the synthetic
    faces, and the folds of a pairs CSV without a fold column.
    """
    if spec.kind == "synthetic":
        return _synthetic(spec, out_dir, synthetic_params, seed, progress)
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
    if spec.kind == "insightface_rec":
        from pipeline.datasets.insightface import load_rec

        return load_rec(spec.path, progress=progress)
    if spec.kind == "insightface_bin":
        from pipeline.datasets.insightface import load_bin

        if out_dir is None:
            raise DatasetError(f"{spec.path}: an insightface .bin set is resolved by its own data stage")
        return load_bin(spec.path, out_dir / "images")
    raise DatasetError(f"unknown dataset kind {spec.kind!r}")  # pragma: no cover - schema forbids it


def _synthetic(spec: DatasetSpec, out_dir: Path | None, synthetic_params, seed: int, progress: bool) -> ImageSet:
    from pipeline.datasets.synthetic import generate_synthetic

    if spec.set not in SYNTHETIC_SETS:
        raise DatasetError(f"synthetic set {spec.set!r} unknown; choose one of {', '.join(SYNTHETIC_SETS)}")
    sizes = synthetic_params.model_dump() if synthetic_params is not None else {}
    target = out_dir if out_dir is not None else Path("unused")
    try:
        generated = generate_synthetic(target, seed=seed, progress=progress, only=[spec.set], render=out_dir is not None,
                                       **sizes)
    except ValueError as err:  # sizes that cannot make the folds and pairs asked for
        raise ConfigError(f"data.synthetic: {err}") from None
    images, pairs = generated[spec.set]
    return ImageSet(images, pairs, folds_assigned=None)


def run_data(params: Params, name: str, out_dir: str | Path | None = None, *, progress: bool = True) -> ImageSet:
    """Resolve data set ``name`` into ``out_dir`` (default ``data/datasets/NAME``), written atomically."""
    spec = params.data_spec(name)
    key = "data.train" if name == "train" else f"data.tests.{name}"
    out_dir = Path(out_dir) if out_dir is not None else paths.dataset_dir(name)
    with atomic_dir(out_dir) as tmp:
        try:
            image_set = load_dataset(spec, out_dir=Path(tmp), synthetic_params=params.data.synthetic,
                                     seed=params.seeds.data, progress=progress)
        except DatasetError as err:
            raise DatasetError(f"{key}: {err}") from None
        image_set = _rebase(image_set, Path(tmp), out_dir)
        if spec.exclude_identities_of:
            image_set = _exclude(params, name, image_set)
        noisy = 0
        if spec.label_noise:
            image_set, noisy = with_label_noise(image_set, spec.label_noise, params.seeds.data)
        write_csv(Path(tmp) / INDEX_FILE, image_set.images)
        if image_set.pairs is not None:
            write_csv(Path(tmp) / PAIRS_FILE, image_set.pairs)
        summary = set_summary(spec, image_set)
        if spec.label_noise:
            summary.update(label_noise=spec.label_noise, noisy_images=noisy)
        write_json(Path(tmp) / SUMMARY_FILE, summary)
    return image_set


def set_summary(spec: DatasetSpec, image_set: ImageSet) -> dict:
    """What the data stage records of one set (``summary.json``), read by detect, align and the report."""
    summary = {
        "kind": spec.kind,
        "images": len(image_set.images),
        "identities": len(image_set.identities),
        "pairs": None if image_set.pairs is None else len(image_set.pairs),
        "folds": None if image_set.pairs is None else int(image_set.pairs["fold"].nunique()),
    }
    if not image_set.labelled:
        summary["labelled"] = False
    if image_set.pairs is not None and image_set.folds_assigned is not None:
        summary["folds_assigned"] = image_set.folds_assigned
    if spec.precropped:
        # Read by detect and align (read_precropped): the flag changes this stage's output, so DVC
        # reruns both when it changes.
        summary.update(precropped=True, crop=spec.crop, crop_fraction=spec.crop_fraction)
        if spec.kind in PREALIGNED_KINDS:
            summary["prealigned"] = True
    return summary


def with_label_noise(image_set: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, int]:
    """The set with ``round(fraction * N)`` images, drawn without replacement, given another identity
    (uniform among the other identities of the set); returns it and the number changed. Seeded by
    ``seed`` only, so the same images get the same wrong identities in every run."""
    import numpy as np

    images = image_set.images.copy()
    names = np.asarray(sorted(images["identity"].unique()), dtype=object)
    if len(names) < 2:
        raise DatasetError("label_noise needs at least two identities")
    rng = np.random.default_rng([seed, 0x6E6F697365])  # "noise"
    chosen = np.sort(rng.choice(len(images), int(round(fraction * len(images))), replace=False))
    current = np.searchsorted(names, images["identity"].to_numpy(dtype=object)[chosen].astype(str))
    shift = rng.integers(1, len(names), size=len(chosen))  # never the identity itself
    images.loc[images.index[chosen], "identity"] = names[(current + shift) % len(names)]
    return ImageSet(images, image_set.pairs, folds_assigned=image_set.folds_assigned), len(chosen)


def _exclude(params: Params, name: str, image_set: ImageSet) -> ImageSet:
    """Drop the identities of the test sets named in ``exclude_identities_of`` (resolved from their
    sources, tables only)."""
    spec = params.data_spec(name)
    banned: set[str] = set()
    for other in spec.exclude_identities_of:
        try:
            other_set = load_dataset(params.data_spec(other), synthetic_params=params.data.synthetic,
                                     seed=params.seeds.data)
        except DatasetError as err:
            raise DatasetError(f"data.tests.{other} (named in exclude_identities_of of {name}): {err}") from None
        banned |= set(other_set.identities)
    images = image_set.images
    return ImageSet(images[~images["identity"].isin(banned)], image_set.pairs, folds_assigned=image_set.folds_assigned)


def _rebase(image_set: ImageSet, tmp: Path, final: Path) -> ImageSet:
    """Paths of images written under the temporary folder, as they will be after the rename."""
    images = image_set.images.copy()
    tmp_text = str(tmp)
    images["path"] = [str(final / Path(p).relative_to(tmp)) if p.startswith(tmp_text) else p for p in images["path"]]
    return ImageSet(images, image_set.pairs, folds_assigned=image_set.folds_assigned)


def read_index(name: str, data_dir: str | Path | None = None) -> ImageSet:
    """Read back the tables the data stage wrote for set ``name`` (from ``data_dir``, default
    ``data/datasets/NAME``)."""
    import pandas as pd

    folder = Path(data_dir) if data_dir is not None else paths.dataset_dir(name)
    images_file = folder / INDEX_FILE
    if not images_file.is_file():
        stage = "data_train" if name == "train" else f"data@{name}"
        raise DatasetError(f"{images_file}: not found; run the data stage of {name} first (dvc repro {stage})")
    images = pd.read_csv(images_file, dtype={"image_id": str, "path": str, "identity": str})
    pairs_file = folder / PAIRS_FILE
    pairs = pd.read_csv(pairs_file, dtype={"image_id1": str, "image_id2": str}) if pairs_file.is_file() else None
    return ImageSet(images, pairs)


def read_summary(name: str, data_dir: str | Path | None = None) -> dict:
    """The ``summary.json`` the data stage wrote for set ``name``."""
    folder = Path(data_dir) if data_dir is not None else paths.dataset_dir(name)
    summary_file = folder / SUMMARY_FILE
    if not summary_file.is_file():
        raise DatasetError(f"{summary_file}: not found; run the data stage of {name} first (dvc repro)")
    return json.loads(summary_file.read_text())


def read_precropped(name: str, data_dir: str | Path | None = None) -> tuple[str, float] | None:
    """``(crop, crop_fraction)`` when the data stage recorded set ``name`` as pre-cropped, else None."""
    entry = read_summary(name, data_dir)
    if not entry.get("precropped"):
        return None
    return entry.get("crop", "resize"), float(entry.get("crop_fraction", 1.0))
