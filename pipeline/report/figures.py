"""The report's figures of the comparison: ROC curves (per-run and averaged; CSVs for DVC plots) and
per-seed AUC strip plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.io import write_csv
from pipeline.metrics import roc_on_grid
from pipeline.report.statistics import Statistics
from pipeline.report.tables import Table

#: The FPRs at which the report reads every ROC (log-spaced and linear).
ROC_GRID = np.unique(np.concatenate([np.logspace(-4, 0, 81), np.linspace(0, 1, 101)]))


def run_roc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """TPR of one run on :data:`ROC_GRID` (highest TPR with FPR <= each grid point)."""
    return roc_on_grid(scores, y, ROC_GRID)


def mean_roc(runs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The ROC of a model averaged over its runs ([R, N] scores) on :data:`ROC_GRID`."""
    return np.mean([run_roc(s, y) for s in runs], axis=0)


def write_roc_csvs(tables: list[Table], primary: str, out_dir: Path) -> None:
    """``<set>/<model>.csv`` (fpr, tpr): the ROC averaged over the model's runs, primary variant."""
    for table in tables:
        if table.variant != primary:
            continue
        for model, scores in table.scores.items():
            write_csv(out_dir / table.test_set / f"{model}.csv",
                      pd.DataFrame({"fpr": ROC_GRID, "tpr": mean_roc(scores, table.labels)}))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def plot_roc(params: Params, stats: Statistics, out_dir: Path) -> list[Path]:
    """One figure per test set and variant: each model's runs (thin) and their average (thick)."""
    plt, sns = _pyplot()
    written = []
    backbone = params.model.backbone
    for table in stats.tables:
        distance, norm = table.variant.split("_")
        fig, ax = plt.subplots(figsize=(6.4, 5))
        models = list(table.scores)
        palette = sns.color_palette("tab10", n_colors=max(len(models), 3))
        for colour, model in zip(palette, models):
            runs = [run_roc(s, table.labels) for s in table.scores[model]]
            for tpr in runs if len(runs) > 1 else []:
                ax.plot(ROC_GRID, tpr, color=colour, lw=0.6, alpha=0.35)
            st = stats.of(table)[model]
            ax.plot(ROC_GRID, np.mean(runs, axis=0), color=colour, lw=1.8,
                    label=f"{st.label or model} (AUC {st.auc.mean:.3f}, {len(runs)} run{'s' if len(runs) > 1 else ''})")
        if params.report.log_fpr:
            ax.set_xscale("log")
            ax.set_xlim(left=max(1e-4, 0.5 / max(1, int((table.labels == 0).sum()))), right=1.0)
        else:
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("false positive rate" + (" (log)" if params.report.log_fpr else ""))
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{table.test_set}: {backbone}, {distance}, test-time norm {'on' if norm == 'norm' else 'off'}",
                     fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        target = out_dir / table.test_set / f"{backbone}_{distance}_{norm}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def plot_seeds(stats: Statistics, primary: str, out_dir: Path) -> list[Path]:
    """Per test set: every run's AUC as a point (seeded jitter), the mean and its 95% interval as a bar."""
    plt, _ = _pyplot()
    written = []
    for table in stats.tables:
        if table.variant != primary:
            continue
        per_model = stats.of(table)
        order = sorted(per_model, key=lambda m: -per_model[m].auc.mean)
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(order), 4))
        jitter = np.random.default_rng(0)  # seeded: the same figure on every regeneration
        for x, m in enumerate(order):
            runs = np.asarray(per_model[m].auc.per_run)
            offsets = jitter.uniform(-0.12, 0.12, runs.size) if runs.size > 1 else np.zeros(1)
            ax.scatter(x + offsets, runs, s=36, color="0.25", edgecolors="none", zorder=3)
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylabel("AUC")
        for x, m in enumerate(order):
            iv = per_model[m].auc
            ax.errorbar(x + 0.25, iv.mean, yerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="o", color="C3",
                        capsize=4, lw=1.5, zorder=4)
        ax.set_title(f"{table.test_set}: AUC per run (dots), mean and 95% interval (red)", fontsize=9)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        target = out_dir / f"{table.test_set}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written
