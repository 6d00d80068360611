"""Why ArcFace (s = 64, m = 0.5) trains badly at the default scale: short real runs, measured step by step.

Each *setting* is the default ArcFace recipe (params.yaml through ``pipeline.recipes.recipe``,
``pipeline.train.TrainSetup.from_recipe``) with one thing changed: the loss (CosFace, NormFace as
controls), the scale (a number or ``auto`` = sqrt(2)*ln(C - 1)), the margin, a margin warm-up,
the learning rate, the epochs, weight decay on the class weights. Every run is the real trainer,
``pipeline.train.train``, on real shards; it is observed from outside, without touching the trainer:

* a global forward hook (``torch.nn.modules.module.register_module_forward_hook``) on the
  training-mode forwards of the classifier loss sees each batch's embeddings [B, D] and labels
  [B]; with the loss's class weights [C, D] it records, per optimiser step: the target angle
  theta_y (mean, quantiles, every value), the angle to the nearest other class, the share of
  samples in the theta_y + m > pi fallback, the target probability, the batch accuracy, the
  feature and class-weight norms, how far the class weights turned in the last step, and the
  gradient norms reaching the embeddings and the class weights (tensor / parameter hooks);
* the run's ``history.csv`` / ``metrics.json`` give the validation AUC per epoch and of the
  chosen epoch (validation pairs of the training identities, never a test set).

Raw output: ``OUT/raw/<setting>-seed<k>.json.gz`` (per-step records and the history) and
``.npz`` (theta_y of every sample of every step); ``report`` turns them into ``OUT/summary.csv``,
``OUT/summary.md`` and the figures. Regenerate (about 30-60 s per run on one core)::

    git clone . /tmp/arc-run && cd /tmp/arc-run && ln -s /work/main/.venv .venv
    PATH=$PWD/.venv/bin:$PATH FACEPIPE_THREADS=1 dvc repro shard     # data/shards
    cd - && FACEPIPE_THREADS=1 .venv/bin/python bench/arcface_diagnosis.py run \\
        --shards /tmp/arc-run/data/shards --seeds 0 1 [--settings NAME ...]
    .venv/bin/python bench/arcface_diagnosis.py report

``run`` skips runs whose raw file exists (``--force`` reruns them); ``list`` prints the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import losses  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.io import atomic_file  # noqa: E402
from pipeline.recipes import recipe  # noqa: E402

OUT = ROOT / "reports" / "arcface-diagnosis"


@dataclass(frozen=True)
class Setting:
    """The default recipe of ``loss`` with ``loss_params`` and ``train`` overrides; ``class_weight_decay``
    None keeps the trainer's single weight decay, a number gives the class weights their own."""

    name: str
    loss: str
    loss_params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    class_weight_decay: float | None = None
    note: str = ""


SETTINGS = {s.name: s for s in [
    Setting("arcface-s64-m0.5", "arcface", note="the default run"),
    Setting("cosface-s64-m0.35", "cosface", note="control: the default CosFace"),
    Setting("normface-s64", "normface", note="control: no margin"),
    Setting("arcface-s64-m0.2", "arcface", {"margin": 0.2}),
    Setting("arcface-s64-m0.35", "arcface", {"margin": 0.35}),
    Setting("arcface-s64-m0.8", "arcface", {"margin": 0.8}, note="the arcface-margins grid's m = 0.8"),
    Setting("cosface-s64-m0.48", "cosface", {"margin": 0.48}, note="ArcFace 0.5's cosine margin at theta = pi/2"),
    Setting("arcface-s32-m0.5", "arcface", {"scale": 32.0}),
    Setting("arcface-s16-m0.5", "arcface", {"scale": 16.0}),
    Setting("arcface-sauto-m0.5", "arcface", {"scale": "auto"}, note="s = sqrt(2) ln(79) = 6.18"),
    Setting("arcface-s64-m0.5-easy", "arcface", {"easy_margin": True}),
    Setting("arcface-s64-m0.5-warm0.5", "arcface", {"margin_warmup": 0.5}),
    Setting("arcface-s64-m0.5-lr0.03", "arcface", train={"lr": 0.03}),
    Setting("arcface-s64-m0.5-lr0.01", "arcface", train={"lr": 0.01}),
    Setting("arcface-s64-m0.5-wd0", "arcface", class_weight_decay=0.0, note="no weight decay on the class weights"),
    Setting("arcface-s64-m0.5-nowarmup", "arcface", train={"warmup_epochs": 0}),
    Setting("arcface-s64-m0.5-e16", "arcface", train={"epochs": 16}),
    Setting("arcface-s64-m0.5-e32", "arcface", train={"epochs": 32}),
    Setting("arcface-s64-m0.5-warm0.5-e16", "arcface", {"margin_warmup": 0.5}, train={"epochs": 16}),
    Setting("arcface-sauto-m0.2", "arcface", {"scale": "auto", "margin": 0.2}),
    Setting("arcface-sauto-m0.8", "arcface", {"scale": "auto", "margin": 0.8}),
    Setting("arcface-sauto-m0.5-lr0.03", "arcface", {"scale": "auto"}, train={"lr": 0.03}),
    Setting("arcface-sauto-m0.5-lr0.3", "arcface", {"scale": "auto"}, train={"lr": 0.3}),
    Setting("arcface-sauto-m0.5-e4", "arcface", {"scale": "auto"}, train={"epochs": 4}),
    Setting("cosface-sauto-m0.35", "cosface", {"scale": "auto"}),
    Setting("normface-sauto", "normface", {"scale": "auto"}),
    Setting("combined-cm1-s64", "combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}, note="the ArcFace paper's CM1"),
    Setting("combined-cm1-sauto", "combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2, "scale": "auto"}),
    Setting("combined-cm2-sauto", "combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15, "scale": "auto"}),
]}


# ------------------------------------------------------------------------------ observing a run
class Probe:
    """Per-step measurements of the classifier loss's training forwards (see the module doc)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.thetas: list[np.ndarray] = []
        self._previous_w: torch.Tensor | None = None
        self._hooked: set[int] = set()

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not (isinstance(module, losses.LargeMarginSoftmax) and module.training and len(args) == 2):
            return
        embeddings, labels = args
        if id(module) not in self._hooked:  # the class-weight gradient, once per backward
            module.weight.register_hook(self._weight_grad)
            self._hooked.add(id(module))
        row = self.measure(module, embeddings.detach(), labels, float(output.detach()))
        self.rows.append(row)
        if embeddings.requires_grad:
            batch = embeddings.shape[0]
            embeddings.register_hook(lambda g: row.__setitem__("grad_x", float(g.norm(dim=1).mean()) * batch))

    def _weight_grad(self, grad: torch.Tensor) -> None:
        if self.rows:
            self.rows[-1]["grad_w"] = float(grad.norm())

    @torch.no_grad()
    def measure(self, module: losses.LargeMarginSoftmax, x: torch.Tensor, y: torch.Tensor, loss: float) -> dict:
        """Scalars of one step from its embeddings [B, D] and labels [B]."""
        cos = module.class_scores(x)  # [B, C] no margin
        rows = torch.arange(len(y))
        theta = losses.safe_angle(cos[rows, y])
        others = cos.clone()
        others[rows, y] = -2.0
        neg_theta = losses.safe_angle(others.amax(dim=1))
        logits = module.logits(x, y)
        p_target = F.softmax(logits, dim=1)[rows, y]
        margin = float(module.hparams.get("margin", 0.0)) * float(module.margin_fraction())
        arc_margin = module.name in ("arcface", "subcenter") and not module.hparams["easy_margin"]
        w = F.normalize(module.weight.detach().float(), dim=1)
        w_cos = w @ w.T
        w_cos.fill_diagonal_(-2.0)
        step_angle = float("nan")
        if self._previous_w is not None and self._previous_w.shape == w.shape:
            step_angle = float(losses.safe_angle((w * self._previous_w).sum(1)).mean())
        self._previous_w = w.clone()
        xn = F.normalize(x, dim=1)
        different = y.view(-1, 1) != y.view(1, -1)
        self.thetas.append(theta.numpy().astype(np.float32))
        q = torch.quantile(theta, torch.tensor([0.1, 0.5, 0.9]))
        return {
            "step": len(self.rows) + 1, "loss": loss, "margin": margin, "scale": float(module.scale),
            "theta_mean": float(theta.mean()), "theta_q10": float(q[0]), "theta_q50": float(q[1]),
            "theta_q90": float(q[2]), "neg_theta_mean": float(neg_theta.mean()),
            "fallback_share": float((theta > math.pi - margin).float().mean()) if arc_margin else float("nan"),
            "p_target": float(p_target.mean()), "batch_acc": float((cos.argmax(1) == y).float().mean()),
            "x_norm": float(x.norm(dim=1).mean()), "w_norm": float(module.weight.detach().norm(dim=1).mean()),
            "w_step_angle": step_angle, "w_nearest_cos": float(w_cos.amax(dim=1).mean()),
            "feature_cos_different": float((xn @ xn.T)[different].mean()),
            "grad_x": float("nan"), "grad_w": float("nan"),
        }


@contextlib.contextmanager
def class_weight_decay(value: float | None) -> Iterator[None]:
    """While active, ``torch.optim.SGD`` built over a list of parameters gives every loss class-weight
    tensor (captured from ``pipeline.losses.build``) weight decay ``value``; None changes nothing."""
    if value is None:
        yield
        return
    built: list[torch.nn.Module] = []
    original_build, original_sgd = losses.build, torch.optim.SGD

    def build(*args: Any, **kwargs: Any) -> losses.LossBase:
        built.append(original_build(*args, **kwargs))
        return built[-1]

    def sgd(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        special = {id(m.weight) for m in built if getattr(m, "weight", None) is not None}
        params = list(params)
        groups = [{"params": [p for p in params if id(p) not in special]},
                  {"params": [p for p in params if id(p) in special], "weight_decay": value}]
        assert groups[1]["params"], "no class weights found among the optimiser's parameters"
        return original_sgd(groups, **kwargs)

    losses.build, torch.optim.SGD = build, sgd
    try:
        yield
    finally:
        losses.build, torch.optim.SGD = original_build, original_sgd


def run_one(setting: Setting, seed: int, shards: Path, params_path: Path) -> dict[str, Any]:
    """Train ``setting`` with training ``seed`` on ``shards``; the record written to ``OUT/raw``."""
    from pipeline.train import TrainSetup, lr_at, train

    params = load_params(params_path)
    configured = setting.loss in params.train_losses  # else: ArcFace's recipe with the loss swapped in
    base = TrainSetup.from_recipe(recipe(params, setting.loss if configured else "arcface"), seed)
    loss_params = {**(base.loss_params if configured else {}), **setting.loss_params}
    setup = replace(base, loss_name=setting.loss, loss_params=losses.validate_params(setting.loss, loss_params),
                    train=base.train.with_overrides(setting.train))
    probe = Probe()
    handle = torch.nn.modules.module.register_module_forward_hook(probe)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="arcdiag-") as tmp, class_weight_decay(setting.class_weight_decay):
            tmp = Path(tmp)
            metrics = train(setup, shards, tmp / "model", tmp / "ckpt", tmp / "report", progress=False)
            history = (tmp / "report" / "history.csv").read_text()
            open_auc = open_set_auc(tmp / "model" / "model.pt", shards, setup.model.grayscale)
    finally:
        handle.remove()
    seconds = time.perf_counter() - started
    total = len(probe.rows)
    per_epoch = total // setup.train.epochs
    for row in probe.rows:
        row["lr"] = lr_at(row["step"] - 1, total, per_epoch, setup.train)
    record = {
        "setting": setting.name, "seed": seed, "loss": setting.loss, "loss_params": setup.loss_params,
        "train_overrides": setting.train, "class_weight_decay": setting.class_weight_decay, "note": setting.note,
        "metrics": metrics, "history_csv": history, "open_auc": open_auc, "steps": probe.rows,
        "seconds": round(seconds, 1),
        "load_average": os.getloadavg(), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
    }
    raw = OUT / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_record(raw / f"{setting.name}-seed{seed}", record, np.stack(probe.thetas))
    return record


def write_record(stem: Path, record: dict[str, Any], theta: np.ndarray) -> None:
    """``STEM.json.gz``: the record, its per-step rows as columns rounded to 6 significant digits;
    ``STEM.npz``: theta_y [steps, B] as float16 (about 1e-3 rad apart near pi; for the histograms)."""
    steps = record["steps"]
    columns = {key: [float(f"{row.get(key, float('nan')):.6g}") for row in steps] for key in steps[0]} if steps else {}
    text = json.dumps({**record, "steps": columns}, sort_keys=True, default=float) + "\n"
    with atomic_file(f"{stem}.npz") as tmp, open(tmp, "wb") as fh:  # first: the .json.gz marks a finished run
        np.savez_compressed(fh, theta=theta.astype(np.float16))
    with atomic_file(f"{stem}.json.gz") as tmp, gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as fh:
        fh.write(text.encode())


def read_record(path: Path) -> dict[str, Any]:
    """A record written by :func:`write_record`, its steps back as a list of per-step dicts."""
    with gzip.open(path, "rt") as fh:
        record = json.load(fh)
    columns = record["steps"]
    record["steps"] = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return record


_OPEN_SET: dict[str, tuple[torch.Tensor, np.ndarray]] = {}


def open_set_auc(model_path: Path, shards: Path, grayscale: bool, name: str = "synth_open") -> float:
    """Verification AUC of the saved (chosen) model on test set ``name``'s pairs, computed as the trainer's
    ``select_on`` does (cosine of L2-normalised embeddings, no flip). Reported only: nothing is chosen by it."""
    from pipeline.train import load_model, selection_set, validation_auc

    if name not in _OPEN_SET:
        _OPEN_SET[name] = selection_set(shards, name)
    images, pairs = _OPEN_SET[name]
    model, _ = load_model(model_path)
    return validation_auc(model, images, pairs, grayscale=grayscale, device=torch.device("cpu"))


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------ report
def load_records(out: Path) -> list[dict[str, Any]]:
    """Every raw record in ``out/raw``, in the order of :data:`SETTINGS`, then by seed."""
    order = {name: k for k, name in enumerate(SETTINGS)}
    records = [read_record(p) for p in sorted((out / "raw").glob("*.json.gz"))]
    return sorted(records, key=lambda r: (order.get(r["setting"], len(order)), r["seed"]))


def history(record: dict[str, Any]) -> list[dict[str, float]]:
    """The run's history.csv rows (epoch, step, lr, train_loss, val_auc) as dicts of floats."""
    lines = record["history_csv"].strip().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, map(float, line.split(",")))) for line in lines[1:]]


def target_pull(theta: np.ndarray, loss: str, m: float, easy: bool = False) -> np.ndarray:
    """d target / d cos(theta) per sample: how strongly the true class pulls (1 = as in softmax / CosFace).

    ArcFace's exact branch: d cos(theta + m) / d cos(theta) = sin(theta + m) / sin(theta), which falls to 0
    at theta = pi - m; its fallback and the easy margin's theta > pi/2 branch have slope 1."""
    if loss not in ("arcface", "subcenter") or m == 0.0:
        return np.ones_like(theta)
    exact = np.sin(theta + m) / np.maximum(np.sin(theta), 1e-12)
    plain = theta > (math.pi / 2 if easy else math.pi - m)
    return np.where(plain, 1.0, exact)


def summary_row(record: dict[str, Any], theta: np.ndarray) -> dict[str, Any]:
    """One run's figures: AUCs, loss, and the probe's measurements (the last epoch's mean unless named)."""
    steps, hist = record["steps"], history(record)
    per_epoch = len(steps) // len(hist)
    last = theta[-per_epoch:].ravel()
    params = record["loss_params"]
    pull = target_pull(last, record["loss"], float(params.get("margin", 0.0)), bool(params.get("easy_margin")))

    def at(step: int, key: str) -> float:  # mean over that epoch's steps
        values = [s[key] for s in steps[step - per_epoch:step] if s[key] == s[key]]
        return float(np.mean(values)) if values else float("nan")

    end = len(steps)
    return {
        "setting": record["setting"], "seed": record["seed"], "epochs": len(hist),
        "best_val_auc": record["metrics"]["best_val_auc"], "best_epoch": record["metrics"]["best_epoch"],
        "open_auc": record.get("open_auc", float("nan")),
        "last_val_auc": hist[-1]["val_auc"], "loss_epoch1": hist[0]["train_loss"], "loss_last": hist[-1]["train_loss"],
        "theta_y_step1": steps[0]["theta_mean"], "theta_y_epoch1": at(per_epoch, "theta_mean"),
        "theta_y_last": at(end, "theta_mean"), "theta_neg_last": at(end, "neg_theta_mean"),
        "fallback_share_max": max((s["fallback_share"] for s in steps), default=float("nan")),
        "feature_cos_last": at(end, "feature_cos_different"), "w_nearest_cos_last": at(end, "w_nearest_cos"),
        "w_norm_last": at(end, "w_norm"), "batch_acc_last": at(end, "batch_acc"),
        "grad_x_epoch1": at(per_epoch, "grad_x"), "scale": steps[0]["scale"],
        "p_target_last": at(end, "p_target"), "share_theta_over_half_pi_last": float((last > math.pi / 2).mean()),
        "target_pull_median_last": float(np.median(pull)), "fallback_share_last": at(end, "fallback_share"),
        "seconds": record["seconds"], "load_1min": record["load_average"][0],
    }


def open_cell(values: Any) -> str:
    """'mean (min-max) [n]' of the synth_open AUCs that were measured, or 'not measured'."""
    known = [v for v in values if v == v]
    if not known:
        return "not measured"
    return f"{np.mean(known):.4f} ({min(known):.4f}-{max(known):.4f}) [{len(known)}]"


def write_summary(out: Path, rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """``out/summary.csv`` (one row per run) and ``out/summary.md`` (one row per setting, means over seeds)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    lines = [
        "# ArcFace diagnosis: summary of the runs",
        "",
        "Generated by `python bench/arcface_diagnosis.py report` from `raw/`; one row per setting, over its seeds.",
        "AUC: verification AUC on the validation pairs of the training identities (never a test set), of the "
        "epoch the trainer chose (best) and of the last epoch; synth_open AUC: the chosen model on the open-set "
        "test pairs (identities never trained on; cosine, no flip; reported only, it chooses nothing; [n] runs). "
        "theta_y: mean angle (rad) between an embedding "
        "and its class weight over the training batches of the first / last epoch; theta_neg: to the nearest "
        "other class weight; fallback: the largest share of a batch with theta_y > pi - m; feat cos: mean cosine "
        "between embeddings of different identities in a batch (last epoch); W cos: mean cosine of each class "
        "weight to its nearest other class weight.",
        "",
        "| setting | seeds | best val AUC: mean (min) | per seed | last-epoch AUC | synth_open AUC: mean (range) | "
        "loss ep 1 -> last | theta_y ep 1 -> last | theta_neg last | fallback max | feat cos | W cos | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, group in table.groupby("setting", sort=False):
        g = group.sort_values("seed")
        lines.append(
            f"| {name} | {len(g)} | {g.best_val_auc.mean():.4f} ({g.best_val_auc.min():.4f}) | "
            + " / ".join(f"{v:.4f}" for v in g.best_val_auc) + f" | {g.last_val_auc.mean():.4f} | "
            f"{open_cell(g.open_auc)} | {g.loss_epoch1.mean():.1f} -> {g.loss_last.mean():.1f} | "
            f"{g.theta_y_epoch1.mean():.3f} -> "
            f"{g.theta_y_last.mean():.3f} | {g.theta_neg_last.mean():.3f} | {g.fallback_share_max.max():.3f} | "
            f"{g.feature_cos_last.mean():.3f} | {g.w_nearest_cos_last.mean():.3f} | {g.scale.iloc[0]:.2f} |")
    lines += [
        "",
        "Training dynamics (last epoch, mean over seeds): batch acc = share of training samples whose nearest class "
        "weight is their own (no margin); p_target = softmax probability of the true class under the margin "
        "logits; share > pi/2 = share of samples with theta_y > pi/2; "
        "fallback = share with theta_y > pi - m (ArcFace); "
        "pull = median over samples of d target / d cos(theta_y) (1 for CosFace and NormFace and in ArcFace's "
        "fallback; ArcFace's exact branch sin(theta + m)/sin(theta), 0 at theta = pi - m); |dL/dx| = mean "
        "norm of one sample's loss gradient with respect to its (unnormalised) embedding, epoch 1; |W| = mean "
        "class-weight norm (1.11 at initialisation).",
        "",
        "| setting | batch acc | p_target | share > pi/2 | fallback | pull | abs dL/dx ep 1 | abs W |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in table.groupby("setting", sort=False):
        lines.append(f"| {name} | {g.batch_acc_last.mean():.3f} | {g.p_target_last.mean():.2g} | "
                     f"{g.share_theta_over_half_pi_last.mean():.3f} | {g.fallback_share_last.mean():.3f} | "
                     f"{g.target_pull_median_last.mean():.3f} | "
                     f"{g.grad_x_epoch1.mean():.2f} | {g.w_norm_last.mean():.2f} |")
    loads = [r["load_average"][0] for r in records]
    lines += ["", f"Machine: {records[0]['cpu']}, {records[0]['torch_threads']} torch thread(s) per run; 1-minute "
              f"load average at the end of the runs {min(loads):.1f}-{max(loads):.1f} (the machine was shared); "
              f"seconds per run {table.seconds.min():.0f}-{table.seconds.max():.0f}.", ""]
    (out / "summary.md").write_text("\n".join(lines))


def target_penalty(theta: np.ndarray, loss: str, m: float) -> np.ndarray:
    """cos(theta) - target(theta): what the margin takes off the true-class cosine (ArcFace with its fallback)."""
    if loss == "cosface":
        return np.full_like(theta, m)
    exact = np.cos(theta) - np.cos(theta + m)
    return np.where(theta <= math.pi - m, exact, m * math.sin(m))


FIGURE_SETTINGS = [  # (setting, colour) on the step panels
    ("arcface-s64-m0.5", "tab:red"), ("arcface-sauto-m0.5", "tab:blue"), ("arcface-s64-m0.5-warm0.5", "tab:orange"),
    ("arcface-s64-m0.5-lr0.01", "tab:brown"), ("cosface-s64-m0.35", "tab:green"), ("normface-s64", "tab:gray"),
]


def write_figure(out: Path, records: list[dict[str, Any]]) -> None:
    """``out/arcface-diagnosis.png``: the margin's cost against theta, and per step of the runs theta_y, the
    cosine between different identities' embeddings and the validation AUC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    theta = np.linspace(0.0, math.pi, 600)
    ax = axes[0, 0]
    curves = (("arcface", 0.5, "tab:red"), ("arcface", 0.2, "tab:purple"), ("cosface", 0.35, "tab:green"))
    for loss, m, colour in curves:
        ax.plot(theta, target_penalty(theta, loss, m), color=colour, label=f"{loss} m = {m}")
    ax.set(xlabel="target angle theta_y (rad)", ylabel="cos(theta_y) - target logit / s",
           title="(a) what the margin costs, in cosine, at each target angle")
    ax.axvline(math.pi / 2, color="k", lw=0.5, ls=":")
    ax.legend(fontsize=8)
    panels = [(axes[0, 1], "theta_mean", "(b) mean target angle theta_y per step (rad)"),
              (axes[1, 0], "feature_cos_different", "(c) mean cosine between embeddings of different identities")]
    for name, colour in FIGURE_SETTINGS:
        runs = [r for r in records if r["setting"] == name]
        for k, r in enumerate(runs):
            label = f"{name} ({len(runs)} seeds)" if k == 0 else None
            steps = [s["step"] for s in r["steps"]]
            for ax, key, _ in panels:
                ax.plot(steps, [s[key] for s in r["steps"]], color=colour, lw=0.8, alpha=0.8, label=label)
            hist = history(r)
            axes[1, 1].plot([h["epoch"] for h in hist], [h["val_auc"] for h in hist], "o-", color=colour, ms=3,
                            lw=0.8, label=label)
    for ax, _, title in panels:
        ax.set(xlabel="optimiser step", title=title)
    axes[0, 1].legend(fontsize=7)
    axes[1, 1].set(xlabel="epoch", ylabel="validation AUC", title="(d) validation AUC per epoch", ylim=(0.5, 1.0))
    axes[1, 1].axhline(0.95, color="k", lw=0.5, ls=":")
    fig.suptitle("ArcFace at the default scale (80 identities, smallcnn 128-D, 8 epochs of 22 steps)")
    fig.tight_layout()
    fig.savefig(out / "arcface-diagnosis.png", dpi=110)
    plt.close(fig)


DISTRIBUTION_SETTINGS = ["arcface-s64-m0.5", "arcface-s64-m0.5-e16", "arcface-s64-m0.8", "arcface-sauto-m0.5",
                         "arcface-s64-m0.5-warm0.5", "cosface-s64-m0.35"]


def write_distribution_figure(out: Path, records: list[dict[str, Any]]) -> None:
    """``out/theta-distribution.png``: histograms of theta_y over all samples of an epoch's training batches
    (epochs 1, 2, E/2 and the last, E; seed 0), one panel per setting, with the theta + m > pi fallback boundary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in DISTRIBUTION_SETTINGS if any(r["setting"] == n and r["seed"] == 0 for r in records)]
    if not names:
        return
    columns = 3
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.4 * rows), sharey=True, squeeze=False)
    bins = np.linspace(0.0, math.pi, 64)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names):
        record = next(r for r in records if r["setting"] == name and r["seed"] == 0)
        theta = np.load(out / "raw" / f"{name}-seed0.npz")["theta"]  # [steps, B]
        epochs = len(history(record))
        per_epoch = len(theta) // epochs
        for epoch, colour in ((1, "tab:gray"), (2, "tab:blue"), (epochs // 2, "tab:orange"), (epochs, "tab:red")):
            rows = theta[(epoch - 1) * per_epoch:epoch * per_epoch].ravel()
            if rows.size:
                ax.hist(rows, bins=bins, histtype="step", color=colour, density=True, label=f"epoch {epoch}")
        margin = record["loss_params"].get("margin", 0.0)
        if record["loss"] == "arcface" and not record["loss_params"].get("easy_margin"):
            ax.axvline(math.pi - margin, color="k", lw=0.6, ls=":", label="pi - m (fallback)")
        ax.set(title=name, xlabel="theta_y (rad)", xlim=(0, math.pi))
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("density over an epoch's samples")
    fig.suptitle("Distribution of the target angle theta_y, seed 0")
    fig.tight_layout()
    fig.savefig(out / "theta-distribution.png", dpi=100)
    plt.close(fig)


def write_report(out: Path) -> None:
    records = load_records(out)
    if not records:
        raise SystemExit(f"{out}/raw holds no runs; run `python bench/arcface_diagnosis.py run --shards ...` first")
    rows = [summary_row(r, np.load(out / "raw" / f"{r['setting']}-seed{r['seed']}.npz")["theta"]) for r in records]
    write_summary(out, rows, records)
    write_figure(out, records)
    write_distribution_figure(out, records)
    print(f"wrote {out}/summary.csv, summary.md, arcface-diagnosis.png, theta-distribution.png ({len(rows)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the settings' runs and write OUT/raw")
    run.add_argument("--shards", type=Path, required=True, help="data/shards of a run of the default pipeline")
    run.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    run.add_argument("--settings", nargs="*", default=list(SETTINGS))
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    run.add_argument("--force", action="store_true")
    sub.add_parser("report", help="summary table and figures from OUT/raw")
    sub.add_parser("list", help="print the settings")
    args = parser.parse_args()
    if args.command == "list":
        for s in SETTINGS.values():
            print(f"{s.name:32s} {s.loss:9s} {s.loss_params} {s.train} {s.note}")
        return
    if args.command == "report":
        write_report(OUT)
        return
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting {unknown[0]!r}; see `list`")
    torch.set_num_threads(int(os.environ.get("FACEPIPE_THREADS", "1")))
    for name in args.settings:
        for seed in args.seeds:
            if (OUT / "raw" / f"{name}-seed{seed}.json.gz").is_file() and not args.force:
                print(f"{name} seed {seed}: exists, skipped", flush=True)
                continue
            rec = run_one(SETTINGS[name], seed, args.shards, args.params)
            m = rec["metrics"]
            print(f"{name} seed {seed}: best val AUC {m['best_val_auc']:.4f} (epoch {m['best_epoch']}), final loss "
                  f"{m['final_train_loss']:.3f}, {rec['seconds']} s, load {rec['load_average'][0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
