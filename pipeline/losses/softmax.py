"""Plain softmax cross-entropy and softmax + Center Loss (Wen et al., 2016)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.base import LossBase, check_total_steps, resolve_scale
from pipeline.losses.params import SCALE, Param


#: Logit scale of ``softmax`` with ``normalize: true``: the spec's NormFace default (s = 64), so
#: that setting and the ``normface`` loss give the same logits.
NORMALIZED_SCALE = 64.0


class Softmax(LossBase):
    """Fully connected layer with bias + cross-entropy; no normalisation, no margin.

    ``weight`` [num_classes, embedding_size], ``bias`` [num_classes] (``nn.Linear`` init);
    logits = x W^T + b.

    ``normalize: true`` is training-time L2 normalisation (the loss/normalisation study's
    switch): features and class weights are L2-normalised and the logits are
    ``scale`` * cos(theta_j), as in NormFace. There is no bias then: a bias would add a
    per-class constant to bounded cosines and make the logits no longer a function of the
    angle alone (NormFace drops it for that reason), so the module has no ``bias`` parameter.
    ``scale`` only applies with ``normalize: true``; a non-default ``scale`` without it is an error.
    ``scale: auto`` is sqrt(2) * ln(num_classes - 1), AdaCos' fixed scale (``self.scale``).
    """

    name = "softmax"
    is_classifier = True
    PARAMS: ClassVar[dict[str, Param]] = {
        "normalize": Param(False, bool, help="L2-normalise features and class weights, logits scale * cos, no bias"),
        "scale": Param(NORMALIZED_SCALE, float, low=0.0, low_open=True, words=SCALE.words,
                       help="logit scale s (a number, or auto = sqrt(2)*ln(C - 1)), only with normalize: true"),
    }

    @classmethod
    def check_combination(cls, params: dict[str, Any]) -> None:
        if "normalize" in params and not params["normalize"] and params["scale"] != cls.PARAMS["scale"].default:
            raise ValueError(f"{cls.name}: scale = {params['scale']} needs normalize: true (the plain softmax logits "
                             "x W^T + b are not scaled); set normalize: true or remove scale")

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        self.normalize = bool(self.hparams.get("normalize", False))
        if self.normalize:
            self.scale = resolve_scale(self.name, self.hparams["scale"], num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.normalize:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(num_classes))
            bound = 1.0 / math.sqrt(embedding_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """[B, D] -> [B, C] logits x W^T + b, or scale * cos(theta) with ``normalize`` (labels are not used)."""
        if self.normalize:
            with torch.autocast(device_type=embeddings.device.type, enabled=False):
                cos = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))
                return self.scale * cos
        return F.linear(embeddings, self.weight, self.bias)

    def state_summary(self) -> dict[str, float]:
        """``scale`` when ``normalize`` and ``scale: auto`` (the value it resolved to)."""
        return {"scale": self.scale} if self.normalize and self.hparams["scale"] == "auto" else {}

    def class_scores(self, embeddings: Tensor) -> Tensor:
        """[B, C] the logits (argmax = the N-way prediction of the trained head)."""
        return self.logits(embeddings)

    def class_centres(self) -> Tensor:
        return self.weight.float()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy: scalar tensor."""
        self.check_inputs(embeddings, labels)
        return F.cross_entropy(self.logits(embeddings), labels)


class CenterLoss(Softmax):
    """Softmax + center loss: CE + center_weight * 1/2 * mean_i ||x_i - c_{y_i}||^2.

    Both terms are means over the batch (the paper sums both; the ratio lambda is the
    same). ``centers`` [num_classes, embedding_size] is a buffer (in ``state_dict``,
    not in ``parameters()``), zero-initialised and updated by the paper's rule, not
    by the optimizer: after every training-mode forward, with the loss computed on
    the old centres,
    delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j);  c_j <- c_j - center_lr * delta_j.
    Features are the raw (un-normalised) embeddings.

    Several processes (DDP): the sums and the counts n_j are taken over the *global* batch
    (all-reduced over the default process group when ``torch.distributed`` is initialised
    with more than one process), so every rank applies the same step and ends with the
    centres one process gets on the whole batch (to float rounding: the sum is split
    differently). Every rank must therefore run its training-mode forwards in step, as
    DDP does. With one process nothing changes (no collective, the same operations).
    """

    name = "center"
    PARAMS: ClassVar[dict[str, Param]] = {
        "center_weight": Param(0.003, float, low=0.0, help="lambda, weight of the center term"),
        "center_lr": Param(0.5, float, low=0.0, high=1.0, help="alpha, centre update rate"),
        "start": Param(0.0, float, low=0.0, high=1.0,
                       help="fraction of the training steps after which the center term joins the loss "
                            "(0: from the first step; the centres are updated from the first step either way)"),
    }

    def __init__(self, num_classes: int, embedding_size: int, **params: Any) -> None:
        super().__init__(num_classes, embedding_size, **params)
        self.register_buffer("centers", torch.zeros(num_classes, embedding_size))
        self.start = float(self.hparams["start"])
        if self.start > 0.0:  # buffers: a resumed run switches the term on at the same step
            self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
            self.register_buffer("total_steps", torch.zeros((), dtype=torch.int64))

    def begin_training(self, total_steps: int) -> None:
        """Record the run length that ``start`` is a fraction of."""
        steps = check_total_steps(self.name, total_steps)
        if self.start > 0.0:
            self.total_steps.fill_(steps)

    def center_on(self) -> Tensor | float:
        """1.0 once the center term is on (always without ``start``), else 0.0: a float64 scalar tensor
        on the buffers' device (no host sync) when ``start`` > 0."""
        if self.start == 0.0:
            return 1.0
        return (self.iteration.to(torch.float64) > self.total_steps.to(torch.float64) * self.start).to(
            torch.float64)

    def state_summary(self) -> dict[str, float]:
        return {"center_on": float(self.center_on())} if self.start > 0.0 else {}

    def center_term(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """1/2 * mean_i ||x_i - c_{y_i}||^2 (scalar; gradient only to the embeddings)."""
        diff = embeddings.float() - self.centers[labels]
        return 0.5 * diff.pow(2).sum(dim=1).mean()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check_inputs(embeddings, labels)
        if self.start > 0.0 and self.training:
            if self.check_values and int(self.total_steps) < 1:
                raise ValueError(f"center: start = {self.start} needs the number of training steps; call "
                                 "begin_training(total_steps) before training (the trainer does), or set start: 0")
            self.iteration += 1
        loss = F.cross_entropy(self.logits(embeddings), labels)
        term = self.center_term(embeddings, labels)
        on = self.center_on() if self.training else 1.0
        loss = loss + self.hparams["center_weight"] * (on.to(term.dtype) if isinstance(on, Tensor) else on) * term
        if self.training:
            self.update_centers(embeddings, labels)
        return loss

    @torch.no_grad()
    def update_centers(self, embeddings: Tensor, labels: Tensor) -> None:
        """One centre step from a batch: [B, D] embeddings, [B] labels (see class doc)."""
        x = embeddings.detach().float()
        sums = torch.zeros_like(self.centers).index_add_(0, labels, self.centers[labels] - x)
        # a sum of ones rather than torch.bincount, which reads the largest label back from a GPU
        counts = torch.zeros_like(self.centers[:, 0]).index_add_(0, labels, torch.ones_like(x[:, 0]))
        if _world_size() > 1:  # global batch: one collective for the sums and the counts
            packed = torch.cat([sums, counts.unsqueeze(1)], dim=1)
            torch.distributed.all_reduce(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        self.centers -= self.hparams["center_lr"] * sums / (1.0 + counts).unsqueeze(1)


def _world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when it is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
