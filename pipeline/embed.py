"""Stages ``embed@SET`` and ``embed_train``: embeddings of a set with every trained run.

``embed@SET`` embeds one test set with every trained run (the shards read and decoded once, one
process: a stage per run and set would cost more in process starts and DVC's bookkeeping than
the work at laptop scale) into ``data/embeddings/SET/RUN/``: ``embeddings.npz``
with ``image_ids`` [N], ``identities`` [N] and ``embeddings`` [N, D] float32, the RAW
model outputs (not L2-normalised), optionally the sum of the outputs for the image and its
horizontal mirror (``flip``); normalising is left to the score stage, so switching test-time
normalisation never needs new embeddings. Beside it ``pairs.csv``, the set's pairs (what the
score stage scores), and, with the trained loss saved in the model (see
:func:`pipeline.train.save_model`), for a closed-set test ``head.npz``: ``image_ids`` [N] and
``predicted`` [N], the training identity the classifier head picks for each image (argmax of
the loss's class scores, no margin), applied to the mean of the image's and its mirror's
embeddings when ``flip`` is on (the embedding scale the head was trained on). A test set
counts as closed-set when every one of its identities (by name) is a training identity of the
model (synthetic default: ``synth_closed``); only classifier losses have a head (not triplet,
contrastive). The score stage turns it into ``n_way_accuracy``.

``embed_train`` reads the training shards with each run's recipe (``data/recipes/LOSS.json``):

* ``data/embeddings/validation/RUN/``: the run's **validation pairs**, the ones the trainer
  validated on: the training shards split by :func:`pipeline.train.split_train_val` with the
  recipe's ``train.val_fraction`` and ``data_seed``, pairs by
  :func:`pipeline.train.validation_pairs`, images embedded exactly as the test sets are
  (``embeddings.npz``, ``pairs.csv``: fold, image_id1, image_id2, same), where the score stage
  picks the fixed threshold. Both files are empty when the split leaves no validation image.
* ``data/embeddings/train/RUN/angles.npz``: the angle distributions of the ArcFace paper at the
  saved epoch, in degrees, over every image of the training set (validation split included;
  plain embeddings, no flip; a seeded sample of :data:`MAX_ANGLE_IMAGES` above that, decoded
  in chunks): ``target`` [N] between each image's embedding and its class centre,
  ``between_centres`` [P] between the centres of every two classes (a seeded sample of
  :data:`MAX_CENTRE_PAIRS` pairs above that), ``nearest_centre`` [C] from each centre to the
  nearest other one, and ``centre`` saying what a class centre is: the class weight of the
  classifier (``classifier weight``), or, for losses without one per class (triplet,
  contrastive, sub-centre ArcFace), the normalised mean of the class's normalised
  embeddings (``mean embedding``; classes without an image in the sample are left out of the
  centre angles).

Pretrained entries (``embed_pretrained@NAME-SET``, :func:`run_embed_pretrained`) write the same
files per set in ``data/embeddings/pretrained/NAME/SET``: a ``facepipe`` model.pt from elsewhere through :func:`run_embed`, dlib from the
original images.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import cpu
from pipeline.config import EmbedParams, PretrainedParams
from pipeline.io import atomic_dir
from pipeline import paths
from pipeline.shards import read_shards
from pipeline.train import TrainingError, describe_device, embed_array, load_head, load_model, pick_device


class ModelFileError(ValueError):
    """A model file that is missing or is not a facepipe ``model.pt`` (one-line message)."""


def load_model_file(path: str | Path, device: torch.device | str = "cpu", *, missing_hint: str = ""
                    ) -> tuple[torch.nn.Module, dict]:
    """:func:`pipeline.train.load_model` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found{missing_hint}")
    try:
        return load_model(path, device)
    except Exception as err:  # a pickle, zip, key or shape error: whatever it is, say which file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {reason}"[:200]
        raise ModelFileError(f"{path}: not a readable facepipe model.pt ({reason})") from None


def _save(path: Path, image_ids: list[str], identities: list[str], emb: np.ndarray) -> None:
    np.savez(
        path,
        image_ids=np.asarray(image_ids, dtype=object).astype(str),
        identities=np.asarray(identities, dtype=object).astype(str),
        embeddings=emb.astype(np.float32),
    )


def validation_set(train_shards: str | Path, recipe: dict[str, Any], *, data=None
                   ) -> tuple[Any, np.ndarray, pd.DataFrame]:
    """The trainer's validation images and pairs for ``recipe``: ``(train shards, image
    indices [V], pairs table)`` (fold 1, image_id1, image_id2, same); V may be 0.
    ``train_shards``: the training set's shards (``data/shards/train``; ``data``: already read)."""
    from pipeline.train import split_train_val, validation_pairs

    data = read_shards(train_shards) if data is None else data
    seed = int(recipe["data_seed"])
    _, val_idx = split_train_val(data.labels, float(recipe["train"]["val_fraction"]), seed)
    ids = np.asarray(data.image_ids, dtype=object)[val_idx]
    pairs = validation_pairs(data.labels[val_idx], seed) if len(val_idx) else np.zeros((0, 3), dtype=np.int64)
    table = pd.DataFrame({"fold": np.ones(len(pairs), dtype=np.int64), "image_id1": ids[pairs[:, 0]].astype(str),
                          "image_id2": ids[pairs[:, 1]].astype(str), "same": pairs[:, 2].astype(np.int64)})
    return data, val_idx, table


def _open_model(params: EmbedParams, model_path: str | Path, missing_hint: str, *, quiet: bool = False):
    """The model of ``model_path`` on the device ``params`` ask for, with its trained loss (or None)."""
    dev = pick_device(params.device, key="embed.device")
    if dev.type == "cpu":
        torch.set_num_threads(cpu.thread_count())
    if not quiet:
        print(f"embed: {describe_device(dev, None, 1)}", flush=True)
    model, saved = load_model_file(model_path, dev, missing_hint=missing_hint)
    return dev, model, saved, load_head(saved, dev)


class Decoded:
    """A set's shards with the images each model asks for decoded once and shared by every model that
    embeds them, up to :data:`DECODED_BUDGET` bytes of decoded pixels (beyond it, decoded again per
    model: a CASIA-sized training set does not fit in memory as pixels)."""

    def __init__(self, data) -> None:
        self.data, self._cache, self._bytes = data, {}, 0

    def images(self, indices=None) -> np.ndarray:
        key = None if indices is None else np.asarray(indices, dtype=np.int64).tobytes()
        if key in self._cache:
            return self._cache[key]
        pixels = self.data.decode_all(indices)
        if self._bytes + pixels.nbytes <= DECODED_BUDGET:
            self._cache[key] = pixels
            self._bytes += pixels.nbytes
        return pixels


#: Decoded pixels kept for the next model (bytes).
DECODED_BUDGET = 1 << 30


def _embedder(params: EmbedParams, model_path: str | Path, model, saved: dict, dev):
    """``embed(decoded, indices=None) -> [N, D]`` raw float32 vectors of shard records, as every set is
    embedded."""
    grayscale = bool(saved["model_params"].get("grayscale", False))
    size = int(saved["image_size"])

    def embed(decoded: Decoded, indices=None) -> np.ndarray:
        data = decoded.data
        if len(data) and data.image_shape()[0] != size:
            raise TrainingError(f"{model_path}: the model takes {size} px faces but the shards hold "
                                f"{data.image_shape()[0]} px ones (align.size)")
        images = torch.from_numpy(decoded.images(indices))
        emb = embed_array(model, images, grayscale=grayscale, device=dev, batch_size=params.batch_size,
                          flip=params.flip)
        if not np.isfinite(emb).all():
            raise RuntimeError(f"{model_path}: the model produced non-finite embeddings")
        return emb

    return embed


def run_embed(params: EmbedParams, model_path: str | Path, shards_dir: str | Path, out_dir: str | Path, *,
              name: str, missing_hint: str = "; run the train stage first (dvc repro)",
              decoded: Decoded | None = None, quiet: bool = False) -> int:
    """Embed test set ``name`` (its shards in ``shards_dir``; already read and decoded in ``decoded``)
    with one model into ``out_dir``: ``embeddings.npz``, ``pairs.csv`` (the set's pairs, what the
    score stage scores) and, for a closed-set test, ``head.npz``. Returns the number of images
    embedded. Runs in fp32 on any device (the test embeddings are the measurement; they are cheap)."""
    dev, model, saved, head = _open_model(params, model_path, missing_hint, quiet=quiet)
    embed = _embedder(params, model_path, model, saved, dev)
    decoded = decoded or Decoded(read_shards(shards_dir))
    data = decoded.data
    emb = embed(decoded)
    with atomic_dir(out_dir) as tmp:
        _save(Path(tmp) / paths.EMBEDDINGS_FILE, data.image_ids, data.identities, emb)
        shutil.copyfile(Path(shards_dir) / paths.PAIRS_FILE, Path(tmp) / paths.PAIRS_FILE)
        write_head_predictions(Path(tmp) / paths.HEAD_FILE, head, saved, data, emb, flip=params.flip, name=name)
    print(f"embedded {name} with {model_path}: {len(data)} images, {emb.shape[1]}-D, flip={params.flip}")
    return len(data)


def run_embed_set(params: EmbedParams, models: dict[str, Path], shards_dir: str | Path, out_dir: str | Path, *,
                  name: str) -> dict[str, int]:
    """Stage ``embed@SET``: test set ``name`` embedded with every trained run (``models``: run ->
    model.pt) into ``out_dir/RUN/`` (see :func:`run_embed`); the shards are read and decoded once.
    One process for every run: a stage per set, not per set and run, keeps the pipeline's process
    starts and DVC's own bookkeeping small."""
    decoded = Decoded(read_shards(shards_dir))
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for k, (run, model_path) in enumerate(models.items()):
            counts[run] = run_embed(params, model_path, shards_dir, Path(tmp) / run, name=name, decoded=decoded,
                                    quiet=k > 0)
    return counts


def run_embed_train(params: EmbedParams, model_path: str | Path, train_shards: str | Path, recipe: dict[str, Any],
                    validation_dir: str | Path, angles_dir: str | Path, *, decoded: Decoded | None = None,
                    quiet: bool = False) -> int:
    """What a trained run needs from its training set: its **validation pairs** embedded like the test
    sets (``validation_dir``: ``embeddings.npz`` and ``pairs.csv``; both empty when the split leaves
    no validation image), where the score stage picks the fixed threshold, and the **angle
    distributions** of the training faces (``angles_dir/angles.npz``). Returns the number of
    validation images."""
    dev, model, saved, head = _open_model(params, model_path, "; run the train stage first (dvc repro)",
                                          quiet=quiet)
    embed = _embedder(params, model_path, model, saved, dev)
    data, val_idx, pairs = validation_set(train_shards, recipe, data=None if decoded is None else decoded.data)
    decoded = decoded or Decoded(data)
    with atomic_dir(validation_dir) as tmp:
        if len(val_idx) == 0:
            print("no validation images (train.val_fraction leaves none): no validation pairs")
            emb = np.zeros((0, 0), dtype=np.float32)
        else:
            emb = embed(decoded, val_idx)
            print(f"embedded the validation split of {model_path}: {len(val_idx)} images, {len(pairs)} pairs")
        _save(Path(tmp) / paths.EMBEDDINGS_FILE, [data.image_ids[i] for i in val_idx],
              [data.identities[i] for i in val_idx], emb)
        pairs.to_csv(Path(tmp) / paths.PAIRS_FILE, index=False)
    with atomic_dir(angles_dir) as tmp:
        write_training_angles(Path(tmp) / "angles.npz", model, saved, head, data, dev, batch_size=params.batch_size,
                              where=train_shards, decoded=decoded)
    return len(val_idx)


def run_embed_train_all(params: EmbedParams, runs: dict[str, tuple[Path, dict[str, Any]]], train_shards: str | Path,
                        validation_root: str | Path, angles_root: str | Path) -> dict[str, int]:
    """Stage ``embed_train``: :func:`run_embed_train` for every trained run (``runs``: run -> (model.pt,
    its recipe)) into ``validation_root/RUN`` and ``angles_root/RUN``; the training shards are read and
    decoded once."""
    decoded = Decoded(read_shards(train_shards))
    counts = {}
    with atomic_dir(validation_root) as val_tmp, atomic_dir(angles_root) as angles_tmp:
        for k, (run, (model_path, recipe)) in enumerate(runs.items()):
            counts[run] = run_embed_train(params, model_path, train_shards, recipe, Path(val_tmp) / run,
                                          Path(angles_tmp) / run, decoded=decoded, quiet=k > 0)
    return counts


# ------------------------------------------------------------- closed-set identification
def is_closed_set(identities, training_identities) -> bool:
    """A test set is closed-set for a model when every one of its identities is a training identity."""
    return bool(len(identities)) and set(identities) <= set(training_identities)


@torch.no_grad()
def head_predictions(head: torch.nn.Module, embeddings: np.ndarray, identity_names: list[str]) -> np.ndarray | None:
    """``[N]`` the training identity the head's class scores pick for each embedding, or None when
    the loss has no classifier."""
    weight = next(head.parameters(), None)
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    if weight is not None:
        x = x.to(weight.device)
    scores = head.class_scores(x)
    if scores is None:
        return None
    return np.asarray(identity_names, dtype=object)[scores.argmax(dim=1).cpu().numpy()].astype(str)


def write_head_predictions(path: Path, head: torch.nn.Module | None, saved: dict, data, embeddings: np.ndarray, *,
                           flip: bool, name: str = "") -> bool:
    """``path`` with the head's prediction for every image of a closed-set test (see the module doc);
    False (nothing written) for other sets, heads-less losses and models saved without their loss."""
    names = saved.get("identity_names")
    if head is None or names is None or not is_closed_set(data.identities, names):
        return False
    predicted = head_predictions(head, embeddings / 2.0 if flip else embeddings, names)
    if predicted is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image_ids=np.asarray(data.image_ids, dtype=object).astype(str), predicted=predicted)
    accuracy = float(np.mean(predicted == np.asarray(data.identities, dtype=object).astype(str)))
    print(f"closed-set {name or path.stem}: {len(names)}-way accuracy of the classifier head {accuracy:.4f}")
    return True


# --------------------------------------------------------------------- angle distributions
#: At most this many pairs of class centres are kept for the between-centres histogram.
MAX_CENTRE_PAIRS = 1_000_000

#: At most this many training images are embedded for the angle distributions (CASIA-WebFace
#: has 455k; a seeded sample of 50k describes the histograms as well, at a ninth of the cost).
MAX_ANGLE_IMAGES = 50_000


def _degrees(cos: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).astype(np.float32)


def angle_distributions(embeddings: np.ndarray, labels: np.ndarray, centres: np.ndarray | None,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Angles (degrees) of the module doc from training embeddings ``[N, D]``, their class ``labels``
    [N] (0..C-1) and the class centres ``[C, D]`` (None: the mean normalised embedding per class)."""
    z = embeddings.astype(np.float64)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    kind = "classifier weight"
    if centres is None:
        kind = "mean embedding"
        n_classes = int(labels.max()) + 1
        centres = np.zeros((n_classes, z.shape[1]))
        np.add.at(centres, labels, z)
    c = centres.astype(np.float64)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    target = _degrees((z * c[labels]).sum(axis=1))
    c = c[np.linalg.norm(c, axis=1) > 0.5]  # mean embeddings: only the classes with an image
    n = len(c)
    nearest = np.full(n, -1.0)
    for start in range(0, n, 1024):  # [block, C] cosines at a time
        block = c[start : start + 1024] @ c.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
        nearest[start : start + 1024] = block.max(axis=1)
    if n * (n - 1) // 2 <= MAX_CENTRE_PAIRS:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, n, MAX_CENTRE_PAIRS), rng.integers(0, n - 1, MAX_CENTRE_PAIRS)
        j = j + (j >= i)  # a uniform other class
    between = _degrees((c[i] * c[j]).sum(axis=1))
    return {"target": target, "between_centres": between, "nearest_centre": _degrees(nearest),
            "centre": np.asarray(kind)}


def write_training_angles(path: Path, model: torch.nn.Module, saved: dict, head: torch.nn.Module | None,
                          data, device: torch.device, *, batch_size: int = 256, where: str | Path = "",
                          decoded: Decoded | None = None) -> bool:
    """``path`` with the angle distributions of the training set ``data`` (its shards, read from
    ``where``; decoded through ``decoded`` when given; see the module doc); False when the model's
    identities are not theirs."""
    decoded = decoded or Decoded(data)
    names = saved.get("identity_names")
    if names is not None and list(names) != list(data.identity_names):
        print(f"angles: skipped, the model was trained on other identities than {where}")
        return False
    grayscale = bool(saved["model_params"].get("grayscale", False))
    chosen = np.arange(len(data))
    if len(chosen) > MAX_ANGLE_IMAGES:
        chosen = np.sort(np.random.default_rng(0).choice(len(data), MAX_ANGLE_IMAGES, replace=False))
    emb = np.concatenate([embed_array(model, torch.from_numpy(decoded.images(chosen[a : a + 4096])),
                                      grayscale=grayscale, device=device, batch_size=batch_size)
                          for a in range(0, len(chosen), 4096)])
    centres = head.class_centres() if head is not None else None
    angles = angle_distributions(emb, data.labels[chosen], None if centres is None else centres.detach().cpu().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **angles, loss=np.asarray(saved["loss"]), epoch=np.asarray(int(saved["epoch"])))
    print(f"angles: {len(emb)} training faces, {len(angles['nearest_centre'])} classes, centre = {angles['centre']}; "
          f"mean angle to the centre {angles['target'].mean():.1f} deg, to the nearest other centre "
          f"{angles['nearest_centre'].mean():.1f} deg")
    return True


def run_embed_pretrained(name: str, params: PretrainedParams, set_name: str, detect_dir: str | Path,
                         shards_dir: str | Path, out_dir: str | Path, *, progress: bool = True,
                         embed: EmbedParams | None = None) -> int:
    """Embed test set ``set_name`` with an off-the-shelf model (``params.kind``, default ``name``)
    into ``out_dir`` (``embeddings.npz``, ``pairs.csv``), like :func:`run_embed`.

    ``facepipe``: a saved ``model.pt`` (``params.path``) embedded from the shards by
    :func:`run_embed` with ``embed`` (the same code and settings as a trained run's
    embed stage). ``dlib``: from the ORIGINAL images the detect stage kept (``detect_dir``,
    so every model is compared on the same pairs), with dlib's own detection and alignment
    recipe and our MTCNN box as a fallback when its detector misses (``mtcnn_fallback``).
    """
    kind = params.kind or name
    if kind == "facepipe":
        return run_embed(embed or EmbedParams(), params.path or "", shards_dir, out_dir, name=set_name,
                         missing_hint=f" (pretrained.{name}.path)")
    if kind != "dlib":  # pragma: no cover - the config schema only admits known backends
        raise ValueError(f"unknown pretrained model kind {kind!r}")
    from pipeline.baselines.dlib_resnet import DlibFaceEmbedder, save_embeddings
    from pipeline.detect import kept, read_detections

    embedder = DlibFaceEmbedder()
    rows = kept(read_detections(detect_dir)).reset_index(drop=True)  # detected faces and pre-cropped images
    boxes = rows[["box_x", "box_y", "box_w", "box_h"]].to_numpy() if params.mtcnn_fallback else None
    emb, ok, reasons = embedder.embed_images(rows["path"].tolist(), boxes=boxes, upsample=params.upsample,
                                             jitter=params.jitter, progress=progress)
    with atomic_dir(out_dir) as tmp:
        count = save_embeddings(Path(tmp) / paths.EMBEDDINGS_FILE, rows["image_id"].tolist(),
                                rows["identity"].tolist(), emb, ok)
        shutil.copyfile(Path(shards_dir) / paths.PAIRS_FILE, Path(tmp) / paths.PAIRS_FILE)
    fallback = sum("MTCNN box" in r for r in reasons)
    print(f"{name} embedded {set_name}: {count}/{len(rows)} images ({fallback} via the MTCNN box)")
    return count
