"""What defines one training run, and the error that stops one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ModelParams, TrainParams


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class TrainSetup:
    """One training run. ``seed`` is the training seed (initialisation, sampling order,
    augmentation); ``data_seed`` fixes the train/validation split and validation pairs, so
    runs that differ only in ``seed`` are validated on the same images."""

    loss_name: str
    loss_params: dict[str, Any]
    model: ModelParams
    train: TrainParams
    seed: int
    image_size: int
    data_seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], seed: int) -> "TrainSetup":
        """The run of ``recipe`` (see :mod:`pipeline.recipes`) with training seed ``seed``."""
        return cls(loss_name=recipe["loss"], loss_params=dict(recipe["loss_params"]),
                   model=ModelParams(**recipe["model"]), train=TrainParams(**recipe["train"]), seed=int(seed),
                   image_size=int(recipe["image_size"]), data_seed=int(recipe["data_seed"]))
