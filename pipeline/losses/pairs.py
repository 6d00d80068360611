"""Metric-learning losses on in-batch pairs and triplets (need P x K batches).

Both work on L2-normalised embeddings, where ||a - b||^2 = 2 - 2 a.b (no square root
is taken for squared distances, so identical embeddings give finite gradients).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.base import LossBase
from pipeline.losses.params import Param


def squared_distances(embeddings: Tensor) -> Tensor:
    """[B, D] -> [B, B] squared Euclidean distances of the L2-normalised rows, in [0, 4]."""
    z = F.normalize(embeddings.float(), dim=1)
    return (2.0 - 2.0 * (z @ z.T)).clamp_min(0.0)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]`` (NaN when ``mask`` is all False), without boolean indexing.

    ``values[mask]`` has a size only the data knows, so on a GPU the host must wait to read
    it back; a masked sum over a fixed shape does not. Where the mask is all True (the P x K
    batch-hard case) this is the same sum in the same order, so the same bits."""
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum()


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """[B] labels -> ([B, B] positive mask without the diagonal, [B, B] negative mask)."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


class TripletLoss(LossBase):
    """max(0, ||a - p||^2 - ||a - n||^2 + margin) on L2-normalised embeddings.

    ``mining``:
    * ``batch_hard`` (Hermans et al.): for each anchor with a positive and a negative
      in the batch, its farthest positive and nearest negative; mean over those anchors.
    * ``semi_hard`` (FaceNet): every anchor-positive pair (a, p); the negative is the
      nearest one farther than p (d_an > d_ap); when there is none, the farthest
      negative of a. Mean over all such pairs (zero-loss pairs included).
    A batch without any usable anchor raises ``ValueError`` (use the P x K sampler) while
    ``check_values`` is on; with it off (the trainer) the value is NaN and nothing is read
    back from the device.
    """

    name = "triplet"
    needs_pk_batches = True
    PARAMS: ClassVar[dict[str, Param]] = {
        "margin": Param(0.5, float, low=0.0, help="alpha, on squared distances"),
        "mining": Param("batch_hard", str, choices=("batch_hard", "semi_hard")),
    }

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """[B, D] embeddings, [B] labels -> scalar loss."""
        self.check_inputs(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            d = squared_distances(embeddings)
            pos, neg = pair_masks(labels)
            has_neg = neg.any(dim=1)
            alpha = self.hparams["margin"]
            if self.hparams["mining"] == "batch_hard":
                valid = pos.any(dim=1) & has_neg
                if self.check_values:
                    self._require(bool(valid.any()))
                hardest_pos = d.masked_fill(~pos, float("-inf")).amax(dim=1)
                hardest_neg = d.masked_fill(~neg, float("inf")).amin(dim=1)
                return masked_mean(F.relu(hardest_pos - hardest_neg + alpha), valid)
            pairs = pos & has_neg.view(-1, 1)
            if self.check_values:
                self._require(bool(pairs.any()))
            return masked_mean(F.relu(d - self._semi_hard_negative(d, neg) + alpha), pairs)

    @staticmethod
    def _semi_hard_negative(d: Tensor, neg: Tensor) -> Tensor:
        """[B, B] distance of the negative chosen for each (anchor, positive) pair."""
        neg_sorted, _ = d.masked_fill(~neg, float("inf")).sort(dim=1)  # inf tail: not negatives
        # first negative strictly farther than d[a, p]: searchsorted per anchor row
        idx = torch.searchsorted(neg_sorted.contiguous(), d.contiguous(), right=True)
        n_neg = neg.sum(dim=1, keepdim=True)
        outside = neg_sorted.gather(1, idx.clamp(max=d.shape[1] - 1))
        farthest = d.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
        return torch.where(idx < n_neg, outside, farthest)

    def _require(self, ok: bool) -> None:
        if not ok:
            raise ValueError(
                f"{self.name}: the batch has no anchor with both a positive and a negative; "
                "batches need >= 2 identities with >= 2 images each (use PKBatchSampler)"
            )


class ContrastiveLoss(LossBase):
    """(1 - Y) * 1/2 * D^2 + Y * 1/2 * max(0, margin - D)^2 (Y = 1 for different identities).

    D is the Euclidean distance of the L2-normalised embeddings (so D in [0, 2]).
    Pairs: *all* positive pairs and *all* negative pairs of the batch (i < j), no
    hard mining. loss = mean over positive pairs + mean over negative pairs, so the
    many negatives of a P x K batch do not drown the positives. A batch without a
    positive or without a negative pair raises ``ValueError`` while ``check_values`` is on
    (with it off the value is NaN, and nothing is read back from the device).
    """

    name = "contrastive"
    needs_pk_batches = True
    PARAMS: ClassVar[dict[str, Param]] = {
        "margin": Param(1.0, float, low=0.0, low_open=True, help="m, on distances"),
    }

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """[B, D] embeddings, [B] labels -> scalar loss."""
        self.check_inputs(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            d2 = squared_distances(embeddings)
            pos, neg = pair_masks(labels)
            upper = torch.ones_like(pos).triu(diagonal=1)
            pos, neg = pos & upper, neg & upper
            if self.check_values and (not bool(pos.any()) or not bool(neg.any())):
                raise ValueError(
                    f"{self.name}: the batch needs at least one positive and one negative pair "
                    "(>= 2 identities, one with >= 2 images; use PKBatchSampler)"
                )
            dist = d2.clamp_min(1e-12).sqrt()
            pos_term = 0.5 * masked_mean(d2, pos)
            neg_term = 0.5 * masked_mean(F.relu(self.hparams["margin"] - dist).pow(2), neg)
            return pos_term + neg_term
