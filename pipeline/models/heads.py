"""Embedding heads: backbone features → raw embedding ``[B, embedding_size]``.

The output is NOT L2-normalised (the losses and the scoring stage do that).

* ``bn_dropout_fc_bn`` – the ArcFace "E" head. It **flattens** the spatial map:
  BN2d → Dropout → Flatten → FC → BN1d. The map is first average-pooled to at
  most ``FLATTEN_GRID`` × ``FLATTEN_GRID`` (7×7), which keeps the FC size
  independent of the input size (a 224 input's 14×14 map is pooled to 7×7); a
  112×112 input's 7×7 map (where the backbones end) passes through untouched
  (:class:`GridPool`). FC has ``F·7·7`` inputs.
* ``pool_fc`` – **global average pool** → Dropout → FC.
* ``pool_fc_bn`` – **global average pool** → Dropout → FC → BN1d.

For a backbone that already returns flat features ``[B, F]`` there is nothing to
pool or flatten: ``bn_dropout_fc_bn`` becomes BN1d → Dropout → FC → BN1d and the
others Dropout → FC(→ BN1d). Dropout with ``p = 0`` is left out.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FLATTEN_GRID", "HEADS", "EmbeddingHead", "GridPool"]

#: Largest spatial grid that ``bn_dropout_fc_bn`` flattens (7 = a 112 input / 16).
FLATTEN_GRID = 7

HEADS: tuple[str, ...] = ("bn_dropout_fc_bn", "pool_fc", "pool_fc_bn")


class GridPool(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling to ``output_size`` that passes a map of that size through
    untouched (the same values as pooling it), so the usual 7×7 map of a 112 input costs
    nothing and has no adaptive-pooling backward, which has no deterministic GPU kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == tuple(self.output_size):
            return x
        return super().forward(x)


class EmbeddingHead(nn.Module):
    """Maps backbone features to a ``[B, embedding_size]`` embedding.

    Args:
        kind: one of :data:`HEADS`.
        feature_shape: the backbone output shape without the batch dimension,
            ``(F, h, w)`` for a map or ``(F,)`` for flat features.
        embedding_size: output dimension (> 0).
        dropout: dropout probability in [0, 1) applied before the FC layer.
    """

    def __init__(
        self, kind: str, feature_shape: tuple[int, ...], embedding_size: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r}; allowed: {list(HEADS)}")
        if len(feature_shape) not in (1, 3):
            raise ValueError(f"backbone features must be [B, F] or [B, F, h, w], got [B, {feature_shape}]")
        self.kind = kind
        self.embedding_size = embedding_size
        channels = feature_shape[0]
        spatial = len(feature_shape) == 3
        drop: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []

        layers: list[nn.Module]
        if kind == "bn_dropout_fc_bn":
            if spatial:
                grid = (min(feature_shape[1], FLATTEN_GRID), min(feature_shape[2], FLATTEN_GRID))
                layers = [GridPool(grid), nn.BatchNorm2d(channels), *drop, nn.Flatten()]
                in_features = channels * grid[0] * grid[1]
            else:
                layers = [nn.BatchNorm1d(channels), *drop]
                in_features = channels
        else:
            layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if spatial else []
            layers += drop
            in_features = channels
        layers.append(nn.Linear(in_features, embedding_size))
        if kind != "pool_fc":
            layers.append(nn.BatchNorm1d(embedding_size))
        self.layers = nn.Sequential(*layers)
        #: number of inputs of the FC layer (F·h·w after pooling, or F).
        self.in_features = in_features

    def forward(self, features: Tensor) -> Tensor:
        """``[B, F, h, w]`` or ``[B, F]`` → ``[B, embedding_size]`` (raw, not normalised)."""
        return self.layers(features)
