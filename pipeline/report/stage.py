"""The report stage: read every run's scores, compute the statistics once, write every file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.config import Params
from pipeline.io import atomic_dir, write_csv, write_json, write_text
from pipeline.report import datasets, index
from pipeline.report.figures import plot_roc, plot_seeds, write_roc_csvs
from pipeline.report.frames import comparison_frame, runs_frame, summary_json
from pipeline.report.statistics import Statistics, cross_domain_drops, table_statistics
from pipeline.report.tables import WorkspaceRuns, load_tables, params_variants, predicted_only_sets
from pipeline.report.training import (angles_markdown, model_labels, plot_angles, plot_training, recipes_section,
                                      selection_warnings, training_table)
from pipeline.report.render import markdown_table
from pipeline.score import variant_name


def primary_variant(params: Params) -> str:
    return variant_name(params.report.primary_distance, params.report.primary_normalize)


def model_seeds(params: Params) -> dict[str, tuple[int, ...] | None]:
    """The training seeds of each model's runs (in run order); None for a pretrained model."""
    return {model: tuple(params.seeds.train) if model in params.train_losses else None for model in params.runs}


def compute(params: Params, source: WorkspaceRuns) -> tuple[Statistics, pd.DataFrame]:
    """Every table's statistics and the cross-domain drops of this workspace's runs."""
    report, primary = params.report, primary_variant(params)
    tables = load_tables(params.runs, params_variants(params), source)
    stats = table_statistics(
        tables, params.runs, {model: [source.metrics(run) for run in runs] for model, runs in params.runs.items()},
        alpha=report.alpha, n_boot=report.bootstrap, seed=params.seeds.data, primary=primary,
        pairing=report.pairing, seeds=model_seeds(params), labels=model_labels(params))
    xd = cross_domain_drops(stats, in_domain=report.in_domain, targets=report.cross_domain, primary=primary,
                            models=list(params.runs), alpha=report.alpha)
    return stats, xd


def _figures(params: Params, stats: Statistics, root: Path) -> tuple[list[Path], bool, dict]:
    """ROC CSVs and figures, per-seed figures, training curves, angle figures; returns
    (figure files, whether training curves were drawn, what the angle figures show)."""
    primary = primary_variant(params)
    with atomic_dir(root / "roc") as tmp:
        write_roc_csvs(stats.tables, primary, Path(tmp))
    with atomic_dir(root / "figures" / "roc") as tmp:
        figures = [root / "figures" / "roc" / f.relative_to(tmp) for f in plot_roc(params, stats, Path(tmp))]
    with atomic_dir(root / "figures" / "seeds") as tmp:
        figures += [root / "figures" / "seeds" / f.relative_to(tmp) for f in plot_seeds(stats, primary, Path(tmp))]
    has_curves = plot_training(params, root / "figures" / "training_curves.png")
    with atomic_dir(root / "figures" / "angles") as tmp:
        angles = plot_angles(params, model_labels(params), Path(tmp))
    figures += [root / "figures" / "angles" / f"{loss}.png" for loss in angles]
    return figures, has_curves, angles


def index_markdown(params: Params, stats: Statistics, xd: pd.DataFrame, figures: list[Path], has_curves: bool,
                   angles: dict, unlabelled: dict[str, dict[str, int]]) -> str:
    """index.md, section by section."""
    primary = primary_variant(params)
    tested = sorted({t.test_set for t in stats.tables})
    scored = {t.test_set: (int(t.labels.size), t.pairs_total) for t in stats.tables}
    lines = [*index.header_lines(params), *selection_warnings(params, tested), *index.one_run_notice(params),
             "## Readings", "", *index.readings(params, stats, xd, primary), "",
             *index.how_to_read(params, stats, primary),
             *datasets.test_sets_section([*tested, *unlabelled], scored),
             *index.comparison_section(stats, primary),
             *index.papers_table_section(params, WorkspaceRuns(list(params.data.tests), params.pretrained), primary),
             *index.cross_domain_section(xd),
             *index.predicted_only_section(unlabelled), *index.prediction_files_section(params, primary),
             *datasets.detection_section(params.data_sets)]
    lines += recipes_section(params)
    train = training_table(params)
    if not train.empty:
        lines += ["## Training", "", markdown_table(train), ""]
        if has_curves:
            lines += ["![training curves](figures/training_curves.png)", ""]
    lines += angles_markdown(angles)
    lines += index.roc_section(params, [f for f in figures if f.parent.parent.name == "roc"])
    return "\n".join(lines) + "\n"


def run_report(params: Params, root: str | Path = paths.REPORTS) -> list[Path]:
    """Write every report file; returns their paths."""
    root = Path(root)
    source = WorkspaceRuns(list(params.data.tests), params.pretrained)
    stats, xd = compute(params, source)
    written = [root / name for name in ("comparison.csv", "runs.csv", "verdicts.csv", "cross_domain.csv",
                                        "summary.json", "comparison.md", "index.md")]
    write_csv(written[0], comparison_frame(stats, params.pretrained))
    write_csv(written[1], runs_frame(stats))
    write_csv(written[2], stats.verdicts)
    write_csv(written[3], xd)
    write_json(written[4], summary_json(stats, primary_variant(params)))
    figures, has_curves, angles = _figures(params, stats, root)
    write_text(written[5], index.comparison_markdown(stats, params.report.pairing))
    unlabelled = predicted_only_sets(params.runs, params_variants(params), source)
    write_text(written[6], index_markdown(params, stats, xd, figures, has_curves, angles, unlabelled))
    return written[:5] + figures + written[5:] + ([root / "figures" / "training_curves.png"] if has_curves else [])
