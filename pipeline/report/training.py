"""The report's training sections: model display names, the checkpoint-choice warning, the
training table and curves, and the angle distributions of the training faces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import Params, flatten_keys, section_of
from pipeline.io import atomic_file
from pipeline.report.figures import _pyplot
from pipeline.report.render import _fmt, markdown_table


def training_table(params: Params) -> pd.DataFrame:
    rows = []
    for loss in params.train_losses:
        found = [json.loads(p.read_text()) for run in params.runs[loss]
                 if (p := paths.train_report_dir(run) / "metrics.json").is_file()]
        if not found:
            continue
        states = [m.get("loss_state") or {} for m in found]
        state_keys = sorted(set().union(*states))
        state = ", ".join(
            f"{k} {np.mean([s[k] for s in states if k in s]):.3g}" for k in state_keys) or "–"
        rows.append({
            "loss": loss, "runs": len(found),
            "best epoch per run": " / ".join(str(m["best_epoch"]) for m in found),
            "checkpoint chosen on": ", ".join(sorted({m.get("selected_on", "validation") for m in found})),
            "validation AUC (mean)": _fmt(float(np.mean([m["best_val_auc"] for m in found]))),
            "final train loss (mean)": _fmt(float(np.mean([m["final_train_loss"] for m in found]))),
            "loss state at the end (mean)": state,
        })
    return pd.DataFrame(rows)


#: Training keys every recipe line shows; a loss's own overrides of any other key are shown too.
RECIPE_TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "epochs")


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _recipe_text(params: Params, loss: str) -> str:
    """One loss's recipe in a line: its own params, then its training keys (the loss's overrides marked)."""
    own = params.loss_params(loss)
    train = params.train_for(loss).model_dump()
    overridden = set(flatten_keys(params.model_dump()).keys())
    section = section_of(loss)
    shown = [k for k in train if k in RECIPE_TRAIN_KEYS or f"{section}.train.{k}" in overridden]
    parts = [f"{k} {_value(v)}" for k, v in own.items()]
    parts += [f"{k.replace('_', ' ')} {_value(train[k])}" + ("*" if f"{section}.train.{k}" in overridden else "")
              for k in shown]
    return ", ".join(parts)


def recipes_section(params: Params) -> list[str]:
    """How each trained loss was trained and where its recipe came from (``tuning.<loss>`` of the params,
    written by ``tune select --apply``), with the tuning budget when every loss had the same one."""
    if not params.train_losses:
        return []
    tree = params.model_dump()
    rows, budgets = [], set()
    for loss in params.train_losses:
        record = params.tuning.get(loss)
        edited = record.edited_keys(tree) if record else []
        if record is None:
            chosen = "as written in params.yaml (no tuning record)"
        elif edited:
            chosen = (f"edited in params.yaml since tuning grid `{record.grid}` selected `{record.config}` "
                      f"({', '.join(edited)})")
        else:
            budgets.add((record.configurations, record.seeds, record.epochs))
            auc = "" if record.mean_val_auc is None else f" {record.mean_val_auc:.4f}"
            chosen = (f"tuning grid `{record.grid}`: `{record.config}`, the best mean validation AUC{auc} of "
                      f"{record.configurations} configurations × {record.seeds} seeds × {record.epochs} epochs")
        rows.append({"loss": loss, "recipe (* the loss's own training keys)": _recipe_text(params, loss),
                     "chosen by": chosen})
    tuned = len(budgets) == 1 and all(
        params.tuning.get(loss) and not params.tuning[loss].edited_keys(tree) for loss in params.train_losses)
    if tuned:
        configurations, seeds, epochs = next(iter(budgets))
        text = (f"Every loss's recipe was selected by its own tuning grid with the same budget: {configurations} "
                f"configurations × {seeds} training seeds × {epochs} epochs, judged on the validation pairs of the "
                "training identities only (never a test set). Every configuration and its figures: "
                "[experiments/tuning/index.md](experiments/tuning/index.md).")
    else:
        text = ("Not every loss's recipe was selected by a tuning grid with the same budget (see *chosen by*): "
                "a difference between losses may then come from how well each was tuned.")
    return ["## Recipes", "", text, "", markdown_table(pd.DataFrame(rows)), ""]


def plot_training(params: Params, target: Path) -> bool:
    frames = []
    for loss in params.train_losses:
        for run in params.runs[loss]:
            path = paths.train_report_dir(run) / "history.csv"
            if path.is_file():
                frames.append(pd.read_csv(path).assign(loss=loss, run=run))
    if not frames:
        return False
    plt, sns = _pyplot()
    history = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(history, x="epoch", y="train_loss", hue="loss", ax=axes[0], errorbar=("pi", 100))
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (each loss on its own scale; band: range over runs)", fontsize=9)
    sns.lineplot(history, x="epoch", y="val_auc", hue="loss", ax=axes[1], errorbar=("pi", 100))
    axes[1].set_title("validation verification AUC (band: range over runs)", fontsize=9)
    fig.tight_layout()
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


#: Loss params that switch on training-time L2 normalisation of the features (the label says so).
TRAIN_NORM_PARAMS = ("normalize", "normalize_features")


def model_labels(params: Params) -> dict[str, str]:
    """Display name of each model: the loss name, tagged " (train-norm)" when its recipe
    (``data/recipes/LOSS.json``) switches on training-time L2 normalisation of the features."""
    labels = {}
    for model in params.runs:
        path = paths.recipe_file(model)
        recipe = json.loads(path.read_text()) if model in params.train_losses and path.is_file() else {}
        loss_params = recipe.get("loss_params") or {}
        labels[model] = model + (" (train-norm)" if any(loss_params.get(k) for k in TRAIN_NORM_PARAMS) else "")
    return labels


def selection_warnings(params: Params, reported: list[str]) -> list[str]:
    """A warning box (Markdown lines) for every model whose checkpoints were chosen on a set
    that the report also shows as a test (``train.select_on``, recorded in the runs' metrics.json)."""
    lines = []
    for loss in params.train_losses:
        chosen: dict[str, list[str]] = {}
        for run in params.runs[loss]:
            path = paths.train_report_dir(run) / "metrics.json"
            on = json.loads(path.read_text()).get("selected_on", "validation") if path.is_file() else "validation"
            if on in reported:
                chosen.setdefault(on, []).append(run)
        for test_set, runs in chosen.items():
            lines.append(f"> **Warning: checkpoint chosen on a test set.** {loss} ({', '.join(runs)}) kept the epoch "
                         f"with the best verification AUC on **{test_set}** (`train.select_on`), which is also "
                         f"reported below as a test set: its {test_set} results are optimistically biased, not an "
                         "unbiased test. The default `select_on: validation` chooses on held-out training images.")
    return [*lines, ""] if lines else []


def plot_angles(params: Params, labels: dict[str, str], out_dir: Path) -> dict[str, dict[str, Any]]:
    """``out_dir/<loss>.png`` per trained loss whose runs have ``train/angles.npz`` (embed stage):
    histograms of the angle between each training face and its class centre, and between class
    centres (every pair, and each centre's nearest other one), the runs pooled. Returns per loss
    what the figure shows (means in degrees, runs, what a centre is)."""
    shown: dict[str, dict[str, Any]] = {}
    for loss in params.train_losses:
        found = [p for run in params.runs[loss] if (p := paths.training_angles(run)).is_file()]
        if not found:
            continue
        arrays: dict[str, list[np.ndarray]] = {"target": [], "between_centres": [], "nearest_centre": []}
        kinds = set()
        for path in found:
            with np.load(path, allow_pickle=False) as z:
                for key in arrays:
                    arrays[key].append(z[key])
                kinds.add(str(z["centre"]))
        pooled = {key: np.concatenate(values) for key, values in arrays.items()}
        centre = " / ".join(sorted(kinds))
        plt, sns = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        bins = np.linspace(0, 180, 73)
        axes[0].hist(pooled["target"], bins=bins, color="C0")
        axes[0].set_title(f"training face to its class centre (mean {pooled['target'].mean():.1f}°)", fontsize=9)
        axes[1].hist(pooled["between_centres"], bins=bins, color="C1", alpha=0.6, density=True,
                     label=f"every pair of classes (mean {pooled['between_centres'].mean():.1f}°)")
        axes[1].hist(pooled["nearest_centre"], bins=bins, color="C2", alpha=0.6, density=True,
                     label=f"nearest other class (mean {pooled['nearest_centre'].mean():.1f}°)")
        axes[1].set_title("between class centres", fontsize=9)
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("angle (degrees)")
            ax.set_xlim(0, 180)
        axes[0].set_ylabel("training faces")
        axes[1].set_ylabel("density")
        fig.suptitle(f"{labels.get(loss, loss)}: angles at the chosen epoch, {len(found)} run"
                     f"{'s' if len(found) != 1 else ''} pooled; class centre = {centre}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / f"{loss}.png", dpi=100)
        plt.close(fig)
        shown[loss] = {"label": labels.get(loss, loss), "runs": len(found), "centre": centre,
                       "target": float(pooled["target"].mean()),
                       "between": float(pooled["between_centres"].mean()),
                       "nearest": float(pooled["nearest_centre"].mean())}
    return shown


def angles_markdown(angles: dict[str, dict[str, Any]]) -> list[str]:
    """The index.md section linking the angle figures, with their means."""
    if not angles:
        return []
    view = pd.DataFrame({
        "loss": [a["label"] for a in angles.values()],
        "runs pooled": [a["runs"] for a in angles.values()],
        "class centre": [a["centre"] for a in angles.values()],
        "face to its centre (mean °)": [f"{a['target']:.1f}" for a in angles.values()],
        "between centres (mean °)": [f"{a['between']:.1f}" for a in angles.values()],
        "to the nearest other centre (mean °)": [f"{a['nearest']:.1f}" for a in angles.values()],
        "figure": [f"[angles/{loss}.png](figures/angles/{loss}.png)" for loss in angles],
    })
    return ["## Angle distributions (training faces, chosen epoch)", "",
            "As in the ArcFace paper: the angle between each training face's embedding and its class centre, "
            "and between class centres. A class centre is the classifier's class weight for the classifier "
            "losses, and the normalised mean of the class's normalised embeddings for the others (triplet, "
            "contrastive, sub-centre ArcFace). Every image of the training set (validation split included; a "
            "seeded sample of 50,000 in larger sets), each loss's runs pooled.", "", markdown_table(view), ""]
