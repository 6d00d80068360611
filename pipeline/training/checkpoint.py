"""What a run keeps on disk: the per-epoch checkpoint it resumes from, and the saved model.

* ``last.pt`` after every epoch (model, loss, optimiser, scaler, step, best score, history),
  tagged with :func:`fingerprint`: a rerun resumes from it only when it was made with the same
  settings, data and code. Process 0 alone writes it, and process 0 alone reads it and decides
  whether the run resumes; the other processes receive its bytes (:func:`resume`), so every
  process starts the same epoch from the same state even when only process 0's (node-local)
  folder holds the file.
* ``model.pt`` (see :func:`save_model`, :func:`load_model`): the chosen epoch's network and loss
  state, with what is needed to rebuild them.
* Every file is written with stable bytes (:func:`save_stable`): equal tensors and values give
  equal files, so a forced rerun that trains the same model leaves ``dvc.lock`` unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelParams
from pipeline.io import atomic_file
from pipeline.shards import FaceShards
from pipeline.training.distributed import Distributed
from pipeline.training.setup import TrainingError, TrainSetup


def save_stable(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path``, atomically, with bytes that depend on ``obj`` alone.

    torch's zip writer names the archive's top folder after the file it is given
    (``torch.save(obj, ".model.pt.k3x9.tmp")`` stores ``.model.pt.k3x9/data.pkl``, ...), so written
    to :func:`pipeline.io.atomic_file`'s random temporary name the same model gave other bytes on
    every save. (The ``.data/serialization_id`` record is no source of randomness: torch derives it
    from the record names without that folder and the records' CRC32s.) Given a file object,
    torch names the folder ``archive``, whatever the file is called. :func:`torch.load` reads both.
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def fingerprint(setup: TrainSetup, data: FaceShards, *, device_type: str, amp_dtype: torch.dtype | None,
                global_batch: int) -> str:
    """Hash of everything that defines a run; a checkpoint resumes only a run with the same one.

    Includes where it runs (``device_type``: cpu, cuda) and its precision (``amp_dtype``), so
    a CPU checkpoint never resumes a GPU run or the reverse, nor a bf16 run an fp16 one; and
    the global batch, which ``batch_per_device`` ties to the process count. The settings
    that do not change the trained model (threads, input mode, NaN-check interval) are left out.
    """
    blob = json.dumps(
        {
            "loss": setup.loss_name,
            "loss_params": setup.loss_params,
            "model": setup.model.model_dump(),
            "train": setup.train.model_dump(exclude={"workers", "device", "decode", "nan_check_every"}),
            "device_type": device_type,
            "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "fp32",
            "global_batch": global_batch,
            "seed": setup.seed,
            "data_seed": setup.data_seed,
            "n": len(data),
            "ids": hashlib.sha1("\n".join(data.image_ids).encode()).hexdigest(),
            "code": code_hash(),
        },
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()


def code_hash() -> str:
    """Hash of the source files that shape training, so a code change never resumes an old run."""
    root = Path(__file__).parents[1]
    files = [root / "train.py", root / "samplers.py", root / "shards.py", root / "augment.py"]
    files += sorted((root / "training").glob("*.py"))
    files += sorted((root / "losses").glob("*.py")) + sorted((root / "models").glob("*.py"))
    digest = hashlib.sha1()
    for f in files:
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, key: str, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Write ``last.pt``: everything a resumed run needs, tagged with the run's :func:`fingerprint` ``key``."""
    save_stable({"fingerprint": key, "epoch": state["epoch"], "model": model.state_dict(),
                 "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "state": state}, path)


def resume(path: Path, key: str, epochs: int, dist: Distributed, device: torch.device,
           name: str) -> dict[str, Any] | None:
    """The checkpoint every process resumes from (the dict :func:`save_checkpoint` wrote), or None
    to start afresh.

    Process 0 decides: it reads ``path`` and takes it when it has the fingerprint ``key`` and at
    most ``epochs`` epochs done; then it sends the file's bytes to the other processes, which
    never look at their own ``path``. A checkpoint process 0 cannot read stops every process with
    a one-line :class:`TrainingError` (process 0's names the file). ``name`` prefixes the lines
    process 0 prints."""
    raw, saved, failure = None, None, None
    if dist.is_main:
        try:
            raw, saved = _resumable(path, key, epochs, device, name)
        except Exception as err:  # the others must hear of it, or they wait for process 0 forever
            failure = err
    size = dist.share(-1 if failure is not None else len(raw) if raw is not None else 0)
    if failure is not None:
        raise failure
    if size < 0:
        raise TrainingError(f"process {dist.rank} stops: process 0 could not read its checkpoint "
                            "(process 0 prints why)")
    if size == 0:
        return None
    raw = dist.share_bytes(raw, size)
    return saved if saved is not None else torch.load(io.BytesIO(raw), map_location=device, weights_only=False)


def _resumable(path: Path, key: str, epochs: int, device: torch.device,
               name: str) -> tuple[bytes | None, dict[str, Any] | None]:
    """``(bytes, loaded)`` of the checkpoint at ``path`` when this run resumes from it, else ``(None, None)``."""
    if not path.is_file():
        return None, None
    raw = path.read_bytes()
    try:
        saved = torch.load(io.BytesIO(raw), map_location=device, weights_only=False)
    except Exception as err:  # a torn or foreign file: say which, and how to go on
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"{path}: not a readable checkpoint ({reason}); delete it to train this run "
                            "from the start") from None
    if isinstance(saved, dict) and saved.get("fingerprint") == key and saved.get("epoch", epochs + 1) <= epochs:
        print(f"[{name}] resuming from {path} after epoch {saved['state']['epoch']}")
        return raw, saved
    print(f"[{name}] ignoring {path}: it was made with other settings")
    return None, None


def restore(saved: dict[str, Any], model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Load a checkpoint from :func:`resume` into the run's modules; returns its loop state
    (``epoch``, ``step``, ``best_auc``, ``best_epoch``, ``history``)."""
    model.load_state_dict(saved["model"])
    criterion.load_state_dict(saved["criterion"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    return saved["state"]


def save_model(path: Path, model: nn.Module, setup: TrainSetup, data: FaceShards, epoch: int, auc: float,
               criterion: nn.Module | None = None) -> None:
    """The deliverable of a run: weights plus what is needed to rebuild and use them.

    Besides the network: the loss's state (``criterion``: its class weights, so the classifier
    head can be applied later, see :func:`load_head`), the training identities in label order
    (``identity_names``; class k of the head is ``identity_names[k]``) and what chose the epoch
    (``selected_on``)."""
    save_stable({
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_params": setup.model.model_dump(),
        "image_size": setup.image_size,
        "loss": setup.loss_name,
        "loss_params": setup.loss_params,
        "seed": setup.seed,
        "epoch": epoch,
        "val_auc": auc,
        "identities": len(data.identity_names),
        "identity_names": list(data.identity_names),
        "criterion": None if criterion is None else {k: v.detach().cpu() for k, v in criterion.state_dict().items()},
        "selected_on": setup.train.select_on,
    }, path)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; returns ``(model, saved_dict)``."""
    from pipeline.models import build_model

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no trained model; run the train stage first (dvc repro)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    mp = ModelParams(**saved["model_params"])
    model = build_model(mp.backbone, embedding_size=mp.embedding_size, in_channels=1 if mp.grayscale else 3,
                        input_size=saved["image_size"], dropout=mp.dropout, head=mp.head)
    model.load_state_dict(saved["model"])
    return model.to(device).eval(), saved


def load_head(saved: dict, device: torch.device | str = "cpu") -> nn.Module | None:
    """The loss of a model saved by :func:`save_model`, with its trained state (class weights), in
    eval mode; None when the file has no loss state (older files). Its ``class_scores`` give the
    head's N-way prediction (None for losses without a classifier), ``class_centres`` the class weights."""
    from pipeline import losses

    state = saved.get("criterion")
    if state is None:
        return None
    head = losses.build(saved["loss"], num_classes=int(saved["identities"]),
                        embedding_size=int(saved["model_params"]["embedding_size"]), **saved["loss_params"])
    head.load_state_dict(state)
    return head.to(device).eval()


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Transfer learning: copy every tensor of a saved model whose name and shape match."""
    if not path.is_file():
        raise TrainingError(f"train.init_from = {str(path)!r}: file not found")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    weights = saved.get("model", saved)
    own = model.state_dict()
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise TrainingError(f"train.init_from = {str(path)!r}: no weights match this model's layers")
    own.update(matched)
    model.load_state_dict(own)
    print(f"initialised {len(matched)}/{len(own)} tensors from {path}")
