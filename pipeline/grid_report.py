"""The report of a grid of experiments (``python -m pipeline grid report FILE``).

It reads the finished experiments through DVC (:class:`pipeline.grid.ExperimentRuns`: their
params from the experiment commits, the per-pair score files from the DVC cache) and never
trains. Each *model* is one loss in one cell (:class:`GridModel`), its runs are the cell's
training seeds (:class:`CellRun`), and the statistics are the single-pipeline report's own
"statistics per table" step (:func:`pipeline.report.statistics.table_statistics`), rendered
by the same section renderers (:mod:`pipeline.report.render`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import yaml

from pipeline import grid as grids
from pipeline.config import Params, load_params, run_name
from pipeline.io import atomic_dir, write_csv, write_json, write_text
from pipeline.metrics import DEFAULT_FPRS, fpr_key
from pipeline.report.figures import ROC_GRID, _pyplot, mean_roc
from pipeline.report.render import cross_domain_markdown, markdown_table, method_lines, verdict_sentences
from pipeline.report.statistics import ModelStats, Statistics, cross_domain_drops, table_statistics
from pipeline.report.tables import load_tables
from pipeline.score import variant_name

Grid, Cell, CellState, GridError, METRICS = grids.Grid, grids.Cell, grids.CellState, grids.GridError, grids.METRICS


class CellRun(NamedTuple):
    """One training run of one cell: the cell (experiment) name and the run's name in it."""

    cell: str
    run: str

    def __str__(self) -> str:
        return f"{self.cell}/{self.run}"


@dataclass
class GridModel:
    """One loss in one cell: its runs (the cell's training seeds), the experiment commit and the cell."""

    key: str                      # "<cell>/<loss>", as in results.csv and verdicts.csv
    cell: Cell
    loss: str
    runs: list[CellRun]
    seeds: tuple[int, ...]
    rev: str

    @property
    def readable(self) -> str:
        """``margin=CM1 combined`` for ``combined-margins-marginCM1-f5d974/combined``."""
        return " ".join([", ".join(f"{d}={v}" for d, v in self.cell.labels.items()), self.loss]).strip()


class CellRuns:
    """The runs of several finished experiments, each read from its own cell's source."""

    def __init__(self, sources: dict[str, Any]) -> None:
        self.sources = sources

    def test_sets(self, run: CellRun) -> list[str]:
        return self.sources[run.cell].test_sets(run.run)

    def scores(self, run: CellRun, test_set: str, variant: str) -> pd.DataFrame:
        return self.sources[run.cell].scores(run.run, test_set, variant)

    def metrics(self, run: CellRun) -> dict:
        return self.sources[run.cell].metrics(run.run)

    def thresholds(self, run: CellRun) -> dict:
        return self.sources[run.cell].thresholds(run.run)


# ------------------------------------------------------------------------- reading
def _cell_params(source, grid: Grid, out_root: Path) -> Params:
    """A finished cell's params, validated as params.yaml is (the paths need not exist here)."""
    params_path = out_root / f".{grid.name}.params.yaml"
    params_path.parent.mkdir(parents=True, exist_ok=True)
    params_path.write_text(yaml.safe_dump(source.params()))
    try:
        return load_params(params_path, check_paths=False, check_models=False)
    finally:
        params_path.unlink()


def read_models(grid: Grid, finished: list[CellState], workspace: Path, out_root: Path
                ) -> tuple[dict[str, GridModel], CellRuns, Params]:
    """Every (cell, loss) model of the finished cells, a source reading their runs, and the first cell's params."""
    models: dict[str, GridModel] = {}
    sources, first = {}, None
    for state in finished:
        source = grids.ExperimentRuns(workspace, state.rev)
        params = _cell_params(source, grid, out_root)
        first = first or params
        sources[state.cell.name] = source
        for loss in params.train_losses:
            key = f"{state.cell.name}/{loss}"
            models[key] = GridModel(key, state.cell, loss,
                                    [CellRun(state.cell.name, run_name(loss, s)) for s in params.seeds.train],
                                    tuple(params.seeds.train), state.rev)
    return models, CellRuns(sources), first


def grid_statistics(grid: Grid, models: dict[str, GridModel], source: CellRuns, first: Params) -> Statistics:
    """The statistics per table of every model (the report's own step), on the grid's test sets and variants."""
    report = first.report
    primary = variant_name(report.primary_distance, report.primary_normalize)
    runs = {key: m.runs for key, m in models.items()}
    tables = load_tables(runs, grid.variants or [primary], source)
    if grid.test_sets:
        missing = set(grid.test_sets) - {t.test_set for t in tables}
        if missing:
            raise GridError(f"{grid.path}: table.test_sets {', '.join(sorted(missing))} not scored by the cells")
        tables = [t for t in tables if t.test_set in grid.test_sets]
    return table_statistics(tables, runs, {key: [source.metrics(r) for r in m.runs] for key, m in models.items()},
                            alpha=report.alpha, n_boot=report.bootstrap, seed=first.seeds.data, primary=primary,
                            pairing=report.pairing, seeds={key: m.seeds for key, m in models.items()})


# ---------------------------------------------------------------------- results
def _metric_interval(st: ModelStats, metric: str):
    if metric in ("auc", "accuracy", "eer"):
        return getattr(st, metric)
    if metric.startswith("tpr@"):
        for f in DEFAULT_FPRS:
            if metric == f"tpr@{fpr_key(f)}":
                return st.tpr[f]
    if metric == "rank1":
        return st.rank1
    return None


def _metric_value(st: ModelStats, metric: str) -> tuple[float, float, float]:
    """(mean, low, high) of ``metric`` for one model's stats (low/high NaN where none)."""
    if metric in ("fp", "fn"):
        return getattr(st, metric), math.nan, math.nan
    iv = _metric_interval(st, metric)
    if iv is None:
        return math.nan, math.nan, math.nan
    return iv.mean, iv.low, iv.high


def results_frame(stats: Statistics, models: dict[str, GridModel]) -> pd.DataFrame:
    """results.csv: one row per model, test set and variant, every metric with its interval."""
    rows = []
    for table in stats.tables:
        for key, st in stats.of(table).items():
            m = models[key]
            row = {"model": key, "cell": m.cell.name, "experiment_rev": m.rev, "loss": m.loss, **m.cell.labels,
                   "test_set": table.test_set, "variant": table.variant, "runs": len(st.runs)}
            for metric in METRICS:
                mean, low, high = _metric_value(st, metric)
                row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = mean, low, high
            row["auc_per_run"] = " / ".join(f"{v:.4f}" for v in st.auc.per_run)
            rows.append(row)
    return pd.DataFrame(rows)


def _pivot(view: pd.DataFrame, grid: Grid, metric: str) -> pd.DataFrame:
    def text(r):
        mean, low, high = r[metric], r[f"{metric}_low"], r[f"{metric}_high"]
        if math.isnan(mean):
            return "–"
        digits = 1 if metric in ("fp", "fn") else 4
        return f"{mean:.{digits}f}" + ("" if math.isnan(low) else f" [{low:.{digits}f}, {high:.{digits}f}]")

    frame = view.assign(value=[text(r) for _, r in view.iterrows()])
    rows = grid.rows or ["loss"]
    columns = grid.columns
    if not columns:
        return frame.set_index(rows)[["value"]].rename(columns={"value": METRICS[metric]})
    return frame.pivot_table(index=rows, columns=columns, values="value", aggfunc="first")


def _flat(pivot: pd.DataFrame) -> pd.DataFrame:
    """The pivot with its row labels as columns and multi-level column labels joined: "off / cosine_norm"."""
    frame = pivot.reset_index()
    if isinstance(frame.columns, pd.MultiIndex):
        frame.columns = [" / ".join(str(p) for p in c if str(p) != "") for c in frame.columns]
    return frame


# ---------------------------------------------------------------------- sections
def _scale_line(params: Params) -> str:
    synth = params.data.synthetic
    data = ("built-in synthetic faces: " f"{synth.train_identities} training identities x "
            f"{synth.train_images_per_identity} images" if params.data.train.kind == "synthetic"
            else f"training data: {params.data.train.kind} {params.data.train.path}")
    return (f"Scale of the base params: {data}; {params.model.backbone}, {params.model.embedding_size}-D, "
            f"{params.align.size} px faces, {params.train.epochs} epochs, seeds {params.seeds.train}. The same grid "
            "file runs at CASIA scale by pointing its base params at the real data and a larger backbone.")


def _table_groups(grid: Grid, stats: Statistics) -> dict[tuple[str, str | None], list]:
    """One pivot per test set and variant; when the grid lays variants out as rows or columns, one per
    test set with the variants side by side (the loss study's four distance / norm columns)."""
    variant_is_a_dimension = "variant" in grid.rows + grid.columns
    groups: dict[tuple[str, str | None], list] = {}
    for table in stats.tables:
        groups.setdefault((table.test_set, None if variant_is_a_dimension else table.variant), []).append(table)
    return groups


def pivot_sections(grid: Grid, stats: Statistics, results: pd.DataFrame, models: dict[str, GridModel],
                   out: Path, summary: dict, alpha: float) -> list[str]:
    """Per test set (and variant): one pivot per metric (written as CSV too, and into ``summary``)
    and the reading of the verdicts."""
    sections = []
    for (test_set, variant), group in _table_groups(grid, stats).items():
        names = [t.variant for t in group]
        view = results[(results["test_set"] == test_set) & (results["variant"].isin(names))]
        for metric in grid.metrics:
            pivot = _flat(_pivot(view, grid, metric))
            write_csv(out / f"pivot_{metric}_{test_set}{'_' + variant if variant else ''}.csv", pivot)
            note = "; interval over runs only" if metric == "rank1" else ""
            sections += [f"## {METRICS[metric]}: {test_set} ({', '.join(names)}; {group[0].labels.size} pairs{note})",
                         "", markdown_table(pivot), ""]
            for name in names:
                summary.setdefault(test_set, {}).setdefault(name, {})[metric] = {
                    k: None if math.isnan(v) else round(float(v), 6)
                    for k, v in view[view["variant"] == name].set_index("model")[metric].items()}
        for table in group:
            per_model = stats.of(table)
            order = sorted(per_model, key=lambda m: -per_model[m].auc.mean)
            sentences = verdict_sentences(stats.verdicts_of(test_set, table.variant), order, alpha,
                                          names=lambda k: models[k].readable)
            sections += [f"**Verdicts on {test_set} ({table.variant})**: " + " ".join(sentences), ""]
    return sections


def cross_domain_section(first: Params, stats: Statistics, models: dict[str, GridModel], out: Path) -> list[str]:
    """The report's cross-domain drop table over the grid's models (cross_domain.csv too), where the
    cells scored the base params' in-domain set and at least one of its cross-domain sets."""
    report = first.report
    primary = variant_name(report.primary_distance, report.primary_normalize)
    sets = {t.test_set for t in stats.tables}
    if not report.in_domain or report.in_domain not in sets:
        return []
    xd = cross_domain_drops(stats, in_domain=report.in_domain, targets=[c for c in report.cross_domain if c in sets],
                            primary=primary, models=list(models), alpha=report.alpha)
    if xd.empty:
        return []
    write_csv(out / "cross_domain.csv", xd)
    return [f"## Cross-domain drop ({primary}; Holm over the models)", "",
            cross_domain_markdown(xd, names=lambda k: models[k].readable if k in models else k), ""]


def cells_frame(states: list[CellState]) -> pd.DataFrame:
    return pd.DataFrame([{"cell": s.cell.name, **s.cell.labels, "status": s.status, "experiment_rev": s.rev or "",
                          "error": s.error, "overrides": json.dumps(s.cell.overrides, sort_keys=True)} for s in states])


def _header(grid: Grid, states: list[CellState], first: Params) -> list[str]:
    return [f"# Grid `{grid.name}`", "", grid.description, "",
            f"Grid file: `{grid.path}`; {len(states)} cells ({sum(s.rev is not None for s in states)} finished"
            f", {sum(s.status == 'failed' for s in states)} failed). Each cell is one DVC experiment; this report "
            "reads their per-pair score files from the DVC cache and never trains. Regenerate with "
            f"`python -m pipeline grid report {grid.path}`.", "",
            _scale_line(first), "", *method_lines(first.report.pairing)]


# ----------------------------------------------------------------------- figures
def _finish_roc(fig, ax, labels: np.ndarray, title: str, target: Path, written: list[Path]) -> None:
    """Log-FPR axes down to the smallest FPR the set's negative pairs can show, legend, save, close."""
    import matplotlib.pyplot as plt  # already loaded by the caller (report._pyplot)

    ax.set_xscale("log")
    ax.set_xlim(left=max(1e-4, 0.5 / max(1, int((labels == 0).sum()))), right=1.0)
    ax.set_xlabel("false positive rate (log)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    written.append(target)


def _metric_plot(grid: Grid, view: pd.DataFrame, table, out: Path, written: list[Path]) -> None:
    """A metric against the grid's numeric ``plot.x``, one line per ``plot.hue``, with interval bars."""
    plt, _ = _pyplot()
    x, hue = grid.plot.get("x"), grid.plot.get("hue")
    metric = grid.metrics[0] if grid.metrics[0] not in ("fp", "fn") else "auc"
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = view.groupby(hue, sort=False) if hue else [("", view)]
    for k, (label, group) in enumerate(groups):
        xs = pd.to_numeric(group[x], errors="coerce")
        order = np.argsort(xs.to_numpy())
        g = group.iloc[order]
        xv = xs.to_numpy()[order] + (k - 0.5 * (len(list(groups)) - 1)) * 0.004 * (np.nanmax(xs) or 1)
        yerr = np.vstack([g[metric] - g[f"{metric}_low"], g[f"{metric}_high"] - g[metric]])
        ax.errorbar(xv, g[metric], yerr=np.nan_to_num(yerr), fmt="o-", capsize=4,
                    label=f"{hue} = {label}" if hue else None)
    ax.set_xlabel(x)
    ax.set_ylabel(METRICS[metric])
    ax.set_title(f"{grid.name}: {table.test_set} ({table.variant}), mean and 95% interval", fontsize=9)
    if hue:
        ax.legend(fontsize=8)
    fig.tight_layout()
    target = out / "figures" / f"{metric}_vs_{x.split('.')[-1]}_{table.test_set}_{table.variant}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    written.append(target)


def _roc_by_plots(grid: Grid, stats: Statistics, table, models: dict[str, GridModel], out: Path,
                  written: list[Path]) -> None:
    """One ROC figure per value of ``roc_by``: the models of the cells with that value."""
    plt, _ = _pyplot()
    distance, norm = table.variant.split("_")
    for value in grid.dimensions[grid.roc_by]:
        fig, ax = plt.subplots(figsize=(6.4, 5))
        for key, m in models.items():
            if m.cell.labels.get(grid.roc_by) != value:
                continue
            others = ", ".join(f"{d}={v}" for d, v in m.cell.labels.items() if d != grid.roc_by)
            ax.plot(ROC_GRID, mean_roc(table.scores[key], table.labels), lw=1.5,
                    label=f"{m.loss} {others} (AUC {stats.of(table)[key].auc.mean:.3f})")
        _finish_roc(fig, ax, table.labels,
                    f"{table.test_set}: {value}, {distance}, test-time norm {'on' if norm == 'norm' else 'off'}"
                    " (runs averaged)",
                    out / "figures" / "roc" / table.test_set / f"{value}_{table.variant}.png", written)


def _roc_overlay(grid: Grid, stats: Statistics, table, models: dict[str, GridModel], out: Path,
                 written: list[Path]) -> None:
    """The ROC curves of the cells the grid's ``roc`` list names, overlaid."""
    plt, _ = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for choice in grid.roc:
        for key, m in models.items():
            if all(m.cell.labels.get(d) == v for d, v in choice.items()):
                label = ", ".join(f"{d}={v}" for d, v in m.cell.labels.items())
                ax.plot(ROC_GRID, mean_roc(table.scores[key], table.labels), lw=1.6,
                        label=f"{label} {m.loss} (AUC {stats.of(table)[key].auc.mean:.3f})")
    _finish_roc(fig, ax, table.labels, f"{grid.name}: {table.test_set} ({table.variant}), runs averaged",
                out / "figures" / f"roc_{table.test_set}_{table.variant}.png", written)


def plots(grid: Grid, results: pd.DataFrame, stats: Statistics, models: dict[str, GridModel], out: Path
          ) -> list[Path]:
    """The grid's figures per table: metric against ``plot.x``, ROC per ``roc_by`` value, ``roc`` overlay."""
    written: list[Path] = []
    for table in stats.tables:
        if grid.plot.get("x"):
            view = results[(results["test_set"] == table.test_set) & (results["variant"] == table.variant)]
            _metric_plot(grid, view, table, out, written)
        if grid.roc_by:
            _roc_by_plots(grid, stats, table, models, out, written)
        if grid.roc:
            _roc_overlay(grid, stats, table, models, out, written)
    return written


# ------------------------------------------------------------------------- write
def write_grid_report(grid: Grid, workspace: Path, out_root: Path, *, states: list[CellState],
                      echo=print) -> Path:
    """Write ``out_root/<grid>/``: index.md, cells.csv, results.csv, verdicts.csv, pivot CSVs,
    cross_domain.csv, summary.json, figures."""
    finished = [s for s in states if s.rev]
    if not finished:
        raise GridError(f"grid {grid.name}: no cell has finished yet; run `python -m pipeline grid run {grid.path}`")
    models, source, first = read_models(grid, finished, workspace, out_root)
    echo(f"reading {sum(len(m.runs) for m in models.values())} runs of {len(models)} models from "
         f"{len(finished)} experiments")
    stats = grid_statistics(grid, models, source, first)
    results = results_frame(stats, models)
    out_dir = out_root / grid.name
    with atomic_dir(out_dir) as tmp:
        tmp = Path(tmp)
        write_csv(tmp / "results.csv", results)
        write_csv(tmp / "verdicts.csv", stats.verdicts)
        cells = cells_frame(states)
        write_csv(tmp / "cells.csv", cells)
        summary: dict = {}
        sections = [*_header(grid, states, first),
                    *pivot_sections(grid, stats, results, models, tmp, summary, first.report.alpha),
                    *cross_domain_section(first, stats, models, tmp)]
        sections += [f"![{f.stem}]({f.relative_to(tmp).as_posix()})" for f in plots(grid, results, stats, models, tmp)]
        sections += ["", "## Cells", "", markdown_table(cells.drop(columns=["overrides"]).assign(
            overrides=[", ".join(f"{k}={v}" for k, v in json.loads(o).items()) for o in cells["overrides"]])), ""]
        write_json(tmp / "summary.json", summary)
        write_text(tmp / "index.md", "\n".join(sections) + "\n")
    echo(f"wrote {out_dir}/index.md")
    return out_dir
