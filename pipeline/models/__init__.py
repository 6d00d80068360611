"""Face-embedding models: backbones (:mod:`.backbones`), heads (:mod:`.heads`), and
:func:`build_model` / :class:`EmbeddingModel` (:mod:`.embedding`).

Example::

    model = build_model("resnet18", embedding_size=512)   # 112×112 RGB input
    emb = model(x)                                         # [B, 3, 112, 112] → [B, 512], raw
"""

from __future__ import annotations

from .backbones import BACKBONES, available_backbones
from .embedding import MIN_INPUT_SIZE, EmbeddingModel, build_model, count_parameters
from .heads import HEADS, EmbeddingHead

__all__ = [
    "BACKBONES",
    "HEADS",
    "MIN_INPUT_SIZE",
    "EmbeddingHead",
    "EmbeddingModel",
    "available_backbones",
    "build_model",
    "count_parameters",
]
