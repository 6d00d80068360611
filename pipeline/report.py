"""Stage ``report``: regenerate the comparison of losses in ``reports/``.

Reads what the other stages wrote (metrics JSON per loss, per-pair score files,
training histories, detection and alignment counts) and writes:

* ``comparison.csv``  every loss x test set x distance x normalisation, all metrics
* ``comparison.md``   the same as a readable table (AUC [95% CI], accuracy mean ± std,
                      TPR@FPR=1e-2, EER), with a DeLong test against the best loss
* ``cross_domain.csv`` in-domain vs cross-domain AUC per loss and the drop
* ``figures/roc/<test set>/<backbone>_<distance>_<norm>.png``  ROC curves of all losses
* ``figures/training_curves.png``  training loss and validation AUC per epoch
* ``index.md``        everything above tied together, with one-line readings
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import Params
from pipeline.io import atomic_dir, atomic_file, write_csv, write_text
from pipeline.metrics import delong_test, fpr_key, roc_curve
from pipeline.score import variant_name

SIGNIFICANCE = 0.05


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _tpr(metrics: dict, fpr: float) -> float | None:
    """TPR at ``fpr`` from a metrics dict (``None`` where too few negative pairs)."""
    return metrics.get("tpr_at_fpr", {}).get(fpr_key(fpr))


def comparison_rows(params: Params) -> pd.DataFrame:
    """One row per loss x test set x variant, from ``reports/metrics/<loss>.json``."""
    rows = []
    for loss in params.models:
        path = paths.metrics_file(loss)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `dvc repro score@{loss}` first")
        metrics = json.loads(path.read_text())
        for test_set, per_set in metrics.items():
            for distance in params.score.distances:
                for normalize in params.score.normalize:
                    variant = variant_name(distance, normalize)
                    m = per_set.get(variant)
                    if m is None:
                        continue
                    auc_ci = m.get("auc_ci") or [None, None]
                    acc_ci = m.get("accuracy_ci") or [None, None]
                    rows.append(
                        {
                            "loss": loss,
                            "test_set": test_set,
                            "distance": distance,
                            "normalize": normalize,
                            "variant": variant,
                            "auc": m["auc"],
                            "auc_ci_low": auc_ci[0],
                            "auc_ci_high": auc_ci[1],
                            "eer": m["eer"],
                            "accuracy": m["accuracy_mean"],
                            "accuracy_std": m["accuracy_std"],
                            "accuracy_ci_low": acc_ci[0],
                            "accuracy_ci_high": acc_ci[1],
                            "tpr@fpr=1e-1": _tpr(m, 1e-1),
                            "tpr@fpr=1e-2": _tpr(m, 1e-2),
                            "tpr@fpr=1e-3": _tpr(m, 1e-3),
                            "tpr@fpr=1e-4": _tpr(m, 1e-4),
                            "fp": m["confusion"]["fp"],
                            "fn": m["confusion"]["fn"],
                            "pairs_scored": per_set.get("pairs_scored"),
                            "pairs_missing": per_set.get("pairs_missing"),
                            "rank1": per_set.get("rank1"),
                        }
                    )
    return pd.DataFrame(rows)


def _pair_scores(loss: str, test_set: str, variant: str) -> pd.DataFrame:
    table = pd.read_csv(paths.scores_dir(loss) / test_set / f"{variant}.csv")
    return table[table["status"] == "scored"]


def significance(params: Params, rows: pd.DataFrame) -> pd.DataFrame:
    """DeLong test of each loss against the best loss (by AUC) per test set and variant."""
    out = []
    for (test_set, variant), group in rows.groupby(["test_set", "variant"], sort=False):
        best = group.loc[group["auc"].idxmax(), "loss"]
        best_scores = _pair_scores(best, test_set, variant)
        for loss in group["loss"]:
            if loss == best:
                out.append({"test_set": test_set, "variant": variant, "loss": loss, "vs_best": "best",
                            "delong_p": None})
                continue
            other = _pair_scores(loss, test_set, variant)
            merged = best_scores.merge(other, on=["image_id1", "image_id2", "fold", "same"], suffixes=("_a", "_b"))
            result = delong_test(merged["score_a"].to_numpy(), merged["score_b"].to_numpy(), merged["same"].to_numpy())
            p = float(result["p_value"])
            verdict = f"worse (p={p:.2g})" if p < SIGNIFICANCE else f"tied (p={p:.2g})"
            out.append({"test_set": test_set, "variant": variant, "loss": loss, "vs_best": verdict, "delong_p": p})
    return pd.DataFrame(out)


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def comparison_markdown(rows: pd.DataFrame, sig: pd.DataFrame) -> str:
    merged = rows.merge(sig, on=["test_set", "variant", "loss"], how="left")
    parts = []
    for test_set, group in merged.groupby("test_set", sort=False):
        view = pd.DataFrame(
            {
                "loss": group["loss"],
                "distance": group["distance"],
                "test-time norm": np.where(group["normalize"], "on", "off"),
                "AUC [95% CI]": [
                    f"{_fmt(a)} [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
                    for a, lo, hi in zip(group["auc"], group["auc_ci_low"], group["auc_ci_high"])
                ],
                "accuracy (LFW protocol)": [f"{_fmt(a)} ± {_fmt(s)}" for a, s in zip(group["accuracy"], group["accuracy_std"])],
                "TPR@FPR=1e-2": [_fmt(v) for v in group["tpr@fpr=1e-2"]],
                "EER": [_fmt(v) for v in group["eer"]],
                "vs best (DeLong)": group["vs_best"].fillna("–"),
                "pairs scored (missing)": [f"{a} ({b})" for a, b in zip(group["pairs_scored"], group["pairs_missing"])],
            }
        )
        parts.append(f"### {test_set}\n\n{markdown_table(view)}\n")
    return "\n".join(parts)


def cross_domain(params: Params, rows: pd.DataFrame) -> pd.DataFrame:
    """In-domain vs cross-domain AUC per loss on the primary variant."""
    if not params.report.in_domain or not params.report.cross_domain:
        return pd.DataFrame()
    primary = variant_name(params.report.primary_distance, params.report.primary_normalize)
    view = rows[rows["variant"] == primary].set_index(["loss", "test_set"])["auc"]
    out = []
    for loss in params.models:
        for target in params.report.cross_domain:
            a = view.get((loss, params.report.in_domain))
            b = view.get((loss, target))
            if a is None or b is None:
                continue
            out.append({"loss": loss, "in_domain": params.report.in_domain, "cross_domain": target,
                        "auc_in": a, "auc_cross": b, "drop": a - b})
    return pd.DataFrame(out)


def detection_table() -> pd.DataFrame:
    if not paths.DETECTION_COUNTS.is_file():
        return pd.DataFrame()
    counts = json.loads(paths.DETECTION_COUNTS.read_text())
    align = json.loads(paths.ALIGNMENT_STATS.read_text()) if paths.ALIGNMENT_STATS.is_file() else {}
    rows = []
    for name, c in counts.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in c["reasons"].items()) or "–"
        residual = align.get(name, {}).get("residual_mean_px")
        rows.append({"set": name, "images": c["images"], "faces kept": c["faces"], "dropped": c["dropped"],
                     "why dropped": reasons, "mean landmark residual (px)": _fmt(residual, 2)})
    return pd.DataFrame(rows)


def _plot_roc(params: Params, rows: pd.DataFrame, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    written = []
    backbone = params.model.backbone
    for (test_set, variant), group in rows.groupby(["test_set", "variant"], sort=False):
        distance, norm = variant.split("_")
        fig, ax = plt.subplots(figsize=(6, 5))
        palette = sns.color_palette("tab10", n_colors=max(len(group), 3))
        for colour, row in zip(palette, group.itertuples(index=False)):
            pairs = _pair_scores(row.loss, test_set, variant)
            fpr, tpr, _ = roc_curve(pairs["score"].to_numpy(), pairs["same"].to_numpy())
            if params.report.log_fpr:
                keep = fpr > 0
                fpr, tpr = fpr[keep], tpr[keep]
            ax.plot(fpr, tpr, color=colour, lw=1.6, label=f"{row.loss} (AUC {row.auc:.3f})")
        if params.report.log_fpr:
            ax.set_xscale("log")
            ax.set_xlim(left=max(1e-4, 0.5 / max(1, int(group["pairs_scored"].iloc[0]))), right=1.0)
        else:
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("false positive rate" + (" (log)" if params.report.log_fpr else ""))
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{test_set}: {backbone}, {distance}, test-time norm {'on' if norm == 'norm' else 'off'}")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        target = out_dir / test_set / f"{backbone}_{distance}_{norm}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def _plot_training(params: Params, target: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    frames = []
    for loss in params.train_losses:
        path = paths.train_report_dir(loss) / "history.csv"
        if path.is_file():
            frames.append(pd.read_csv(path).assign(loss=loss))
    if not frames:
        return False
    history = pd.concat(frames, ignore_index=True)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(history, x="epoch", y="train_loss", hue="loss", ax=axes[0], marker="o")
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (each loss on its own scale)")
    sns.lineplot(history, x="epoch", y="val_auc", hue="loss", ax=axes[1], marker="o")
    axes[1].set_title("validation verification AUC")
    fig.tight_layout()
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def _readings(params: Params, rows: pd.DataFrame, sig: pd.DataFrame, xd: pd.DataFrame) -> list[str]:
    primary = variant_name(params.report.primary_distance, params.report.primary_normalize)
    lines = []
    for test_set, group in rows[rows["variant"] == primary].groupby("test_set", sort=False):
        ordered = group.sort_values("auc", ascending=False)
        best = ordered.iloc[0]
        tied = sig[(sig["test_set"] == test_set) & (sig["variant"] == primary) & sig["vs_best"].astype(str).str.startswith("tied")]
        tied_names = ", ".join(tied["loss"]) if len(tied) else "none"
        lines.append(
            f"- **{test_set}** ({primary}): best {best['loss']} AUC {best['auc']:.4f}; "
            f"worst {ordered.iloc[-1]['loss']} AUC {ordered.iloc[-1]['auc']:.4f}; "
            f"not distinguishable from the best at p<{SIGNIFICANCE}: {tied_names}."
        )
    if not xd.empty:
        worst = xd.loc[xd["drop"].idxmax()]
        lines.append(
            f"- **cross-domain**: every loss loses AUC from {worst['in_domain']} to {worst['cross_domain']}; "
            f"the largest drop is {worst['loss']} ({worst['drop']:.4f}), the mean drop {xd['drop'].mean():.4f}."
        )
    by_variant = rows.groupby("variant")["auc"].mean().sort_values(ascending=False)
    lines.append(
        "- **distance / normalisation** (mean AUC over losses and test sets): "
        + ", ".join(f"{v} {a:.4f}" for v, a in by_variant.items())
        + ". Cosine is unchanged by test-time normalisation by construction."
    )
    return lines


def run_report(params: Params, root: str | Path = paths.REPORTS) -> list[Path]:
    """Write every report file; returns their paths."""
    root = Path(root)
    rows = comparison_rows(params)
    sig = significance(params, rows)
    xd = cross_domain(params, rows)
    det = detection_table()
    written: list[Path] = []

    write_csv(root / "comparison.csv", rows.merge(sig, on=["test_set", "variant", "loss"], how="left"))
    written.append(root / "comparison.csv")
    table_md = comparison_markdown(rows, sig)
    write_text(root / "comparison.md", "# Loss comparison\n\n" + table_md)
    written.append(root / "comparison.md")
    write_csv(root / "cross_domain.csv", xd)
    written.append(root / "cross_domain.csv")
    with atomic_dir(root / "figures" / "roc") as tmp:
        figures = _plot_roc(params, rows, Path(tmp))
    written.extend(root / "figures" / "roc" / f.relative_to(tmp) for f in figures)
    curves = root / "figures" / "training_curves.png"
    has_curves = _plot_training(params, curves)
    if has_curves:
        written.append(curves)

    primary = variant_name(params.report.primary_distance, params.report.primary_normalize)
    train_rows = []
    for loss in params.train_losses:
        path = paths.train_report_dir(loss) / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            train_rows.append({"loss": loss, "best epoch": m["best_epoch"], "validation AUC": _fmt(m["best_val_auc"]),
                               "final train loss": _fmt(m["final_train_loss"])})
    sections = [
        "# facepipe report",
        "",
        f"Backbone `{params.model.backbone}`, {params.model.embedding_size}-D embeddings, "
        f"losses: {', '.join(params.train_losses)}. Regenerated by `dvc repro`; do not edit by hand.",
        "",
        "## Readings",
        "",
        *_readings(params, rows, sig, xd),
        "",
        f"## Comparison ({primary}; every variant in [comparison.md](comparison.md) and [comparison.csv](comparison.csv))",
        "",
        comparison_markdown(rows[rows["variant"] == primary], sig),
    ]
    if not xd.empty:
        view = xd.assign(auc_in=xd["auc_in"].map(_fmt), auc_cross=xd["auc_cross"].map(_fmt), drop=xd["drop"].map(_fmt))
        sections += ["## Cross-domain", "", markdown_table(view), ""]
    if not det.empty:
        sections += ["## Detection (images before and after MTCNN)", "", markdown_table(det), "",
                     "Aligned faces: [figures/contact_sheet.png](figures/contact_sheet.png)", ""]
    if train_rows:
        sections += ["## Training", "", markdown_table(pd.DataFrame(train_rows)), ""]
        if has_curves:
            sections += ["![training curves](figures/training_curves.png)", ""]
    sections += ["## ROC curves", ""]
    for figure in figures:
        rel = Path("figures/roc") / figure.parent.name / figure.name
        if figure.stem.endswith(f"{params.report.primary_distance}_{'norm' if params.report.primary_normalize else 'raw'}"):
            sections.append(f"![{figure.parent.name}]({rel.as_posix()})")
    write_text(root / "index.md", "\n".join(sections) + "\n")
    written.append(root / "index.md")
    return written
