"""Stage ``report``: compare the models over their training runs, in ``reports/``.

A *model* is a trained loss (one run per training seed, ``LOSS-SEED``) or a pretrained
model (one run). Everything is recomputed from the per-pair score files of the runs
params.yaml lists (``data/scores/<set>/RUN/<variant>.csv``), so a run left on disk by a
removed seed is ignored. Statistics are those of :mod:`pipeline.repeats`. Writes:

* ``comparison.csv``  model x test set x variant: mean, 95% interval and per-run values of
                      AUC, LFW-protocol accuracy, EER, TPR@FPR; FP/FN, rank-1, pairs; accuracy
                      (with interval), FP/FN, TPR/FPR at each run's fixed threshold and where that
                      threshold came from (``threshold_from``, ``threshold_on_itself``)
* ``runs.csv``        the same metrics for every single run
* ``verdicts.csv``    every pair of models per test set and variant: difference of mean
                      AUCs, unadjusted interval, p-value, Holm-adjusted p-value, verdict, the
                      Holm interval and its level, and how the pair's runs were paired
* ``comparison.md``   readable tables of the above, one section per test set
* ``cross_domain.csv`` per loss, the AUC drop from the in-domain to each cross-domain set
                      (unadjusted and Holm intervals)
* ``summary.json``    a compact DVC metrics file (primary variant): mean AUC, its interval
                      and mean accuracy per test set and model, for ``dvc exp show``
* ``roc/<set>/<model>.csv``  the run-averaged ROC (DVC plots)
* ``figures/``        ROC overlays, per-seed strip plots, training curves, and per loss
                      ``angles/<loss>.png``: the angle distributions of the training faces at
                      the chosen epoch (the embed stage's ``train/angles.npz``, runs pooled)
* ``index.md``        all of it tied together; every sentence is computed from the numbers,
                      and what the data stages recorded about each set (folds, pre-cropped,
                      rejected images: :mod:`pipeline.report.inputs`)

Fixed thresholds come from each run's ``data/scores/<set>/RUN/thresholds.json`` (score stage).
Test sets without labels (an unlabelled pairs CSV) are in no table: ``index.md`` lists them
as "predicted only", and its "Prediction files" section says where every run's prediction
files are (DVC outputs of the score stages, not in git).

Modules: :mod:`~pipeline.report.tables` (inputs), :mod:`~pipeline.report.statistics` (the
statistics per table, shared with the grid report), :mod:`~pipeline.report.render` (shared
Markdown renderers), :mod:`~pipeline.report.index` and :mod:`~pipeline.report.datasets`
(index.md's sections), :mod:`~pipeline.report.frames` (CSV and JSON), :mod:`~pipeline.report.figures`,
:mod:`~pipeline.report.training`, :mod:`~pipeline.report.stage` (:func:`run_report`).
"""

from __future__ import annotations

from pipeline.report.figures import ROC_GRID, _pyplot, mean_roc, plot_roc, plot_seeds, run_roc, write_roc_csvs
from pipeline.report.frames import comparison_frame, runs_frame, summary_json
from pipeline.report.render import (markdown_table, stats_markdown, verdict_sentences, verdicts_markdown)
from pipeline.report.stage import run_report
from pipeline.report.statistics import (FixedStats, ModelStats, Statistics, _n_way_interval, cross_domain_drops,
                                        fixed_stats, model_stats, table_statistics, verdict_table)
from pipeline.report.tables import Table, WorkspaceRuns, load_tables, params_variants, predicted_only_sets
from pipeline.report.training import (angles_markdown, model_labels, plot_angles, plot_training,
                                      selection_warnings, training_table)

__all__ = [
    "ROC_GRID", "FixedStats", "ModelStats", "Statistics", "Table", "WorkspaceRuns", "_n_way_interval", "_pyplot",
    "angles_markdown", "comparison_frame", "cross_domain_drops", "fixed_stats", "load_tables", "markdown_table",
    "mean_roc", "model_labels", "model_stats", "params_variants", "plot_angles", "plot_roc", "plot_seeds",
    "plot_training", "predicted_only_sets", "run_report", "run_roc", "runs_frame", "selection_warnings",
    "stats_markdown", "summary_json", "table_statistics", "training_table", "verdict_sentences", "verdict_table",
    "verdicts_markdown", "write_roc_csvs",
]
