"""Select each loss's recipe from its tuning grid, on validation pairs only.

A comparison of losses is fair only when each loss was trained as well as the same budget
allows at the scale run. The tuning grids (``configs/grids/tune-<loss>.yaml``) give every loss
the same budget: the same number of configurations, training seeds and epochs. Each
configuration is judged on the **validation pairs of the training identities** (the trainer's
own split, embedded by ``embed_train``; never a test set): per run, the AUC, EER and TPR at
FPR = 1e-2 of the cosine scores of the normalised embeddings; per configuration, their mean over
the runs (training seeds).

**Rule.** The configuration with the highest mean validation AUC; configurations within
:data:`TIE` of that AUC count as tied (the validation pairs cannot tell them apart), and among
them the lowest mean EER wins, then the first in the grid file. The rule is fixed before any
grid runs, and is the same for every loss.

``python -m pipeline tune select GRID...`` reads the finished cells of each grid through DVC
(:func:`pipeline.grid.cell_states`), writes ``reports/experiments/tuning/`` (``index.md``,
``configurations.csv`` with every run, ``selected.yaml``) and, with ``--apply``, writes each
loss's selected configuration into ``params.yaml`` (comments kept).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.io import atomic_dir, write_csv, write_text

#: Mean validation AUCs closer than this to the best count as a tie (broken by the EER).
TIE = 0.001
#: The TPR column of the table.
TPR_FPR = 1e-2


@dataclass
class ConfigResult:
    """One configuration of one loss: its overrides and per-run validation figures."""

    loss: str
    name: str
    overrides: dict[str, Any]
    runs: list[str]
    auc: list[float]
    eer: list[float]
    tpr: list[float]
    epochs: int
    rev: str | None = None
    grid: str = ""

    @property
    def mean_auc(self) -> float:
        return float(np.mean(self.auc)) if self.auc else float("nan")

    @property
    def mean_eer(self) -> float:
        return float(np.mean(self.eer)) if self.eer else float("nan")


def validation_figures(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(AUC, EER, TPR at FPR <= 1e-2) of validation pair scores."""
    from pipeline.metrics import eer, roc_auc, tpr_at_fpr

    tpr = tpr_at_fpr(scores, labels, (TPR_FPR,), interpolate=False)[TPR_FPR]
    return float(roc_auc(scores, labels)), float(eer(scores, labels)[0]), float("nan") if tpr is None else float(tpr)


def cosine_scores(embeddings: dict[str, np.ndarray], pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of the normalised embeddings of every pair whose two images are embedded, and
    their labels."""
    where = {image_id: k for k, image_id in enumerate(embeddings["image_ids"].astype(str))}
    first = pairs["image_id1"].astype(str).map(where)
    second = pairs["image_id2"].astype(str).map(where)
    ok = (first.notna() & second.notna()).to_numpy()
    x = embeddings["embeddings"].astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    a, b = first[ok].astype(int).to_numpy(), second[ok].astype(int).to_numpy()
    return (x[a] * x[b]).sum(axis=1), pairs["same"].to_numpy()[ok].astype(int)


def select(results: list[ConfigResult]) -> ConfigResult:
    """The configuration the rule (module doc) picks among one loss's ``results`` (grid order)."""
    done = [r for r in results if r.auc]
    if not done:
        raise ValueError(f"{results[0].loss if results else '?'}: no configuration has finished runs")
    best = max(r.mean_auc for r in done)
    tied = [r for r in done if r.mean_auc >= best - TIE]
    return min(tied, key=lambda r: (round(r.mean_eer, 12), done.index(r)))


# ----------------------------------------------------------------------------- reading the grids
def _experiment_bytes(workspace: Path, rev: str, path: str) -> bytes:
    import dvc.api

    with dvc.api.open(path, repo=str(workspace), rev=rev, mode="rb") as handle:
        return handle.read()


def grid_results(grid_path: str | Path, workspace: Path) -> list[ConfigResult]:
    """Every configuration of one tuning grid with the validation figures of its finished runs."""
    from pipeline.config import Params
    from pipeline.grid import cell_states, load_grid

    grid = load_grid(grid_path)
    if list(grid.dimensions) != ["config"]:
        raise ValueError(f"{grid_path}: a tuning grid varies one named dimension, `config`")
    out = []
    for state in cell_states(grid, workspace):
        params = Params.model_validate(state.cell.params)
        if len(params.train_losses) != 1:
            raise ValueError(f"{grid_path}: a tuning grid trains one loss (train_losses: [LOSS])")
        loss = params.train_losses[0]
        result = ConfigResult(loss, state.cell.labels["config"], grid.dimensions["config"][state.cell.labels["config"]],
                              params.runs[loss], [], [], [], params.train_for(loss).epochs, state.rev, grid.name)
        if state.rev is not None:
            for run in result.runs:
                folder = f"data/embeddings/validation/{run}"
                with np.load(io.BytesIO(_experiment_bytes(workspace, state.rev, f"{folder}/embeddings.npz"))) as z:
                    embeddings = {k: z[k] for k in z.files}
                pairs = pd.read_csv(io.BytesIO(_experiment_bytes(workspace, state.rev, f"{folder}/pairs.csv")),
                                    dtype={"image_id1": str, "image_id2": str})
                auc, eer, tpr = validation_figures(*cosine_scores(embeddings, pairs))
                result.auc.append(auc)
                result.eer.append(eer)
                result.tpr.append(tpr)
        out.append(result)
    return out


# ----------------------------------------------------------------------------- writing
def results_frame(by_loss: dict[str, list[ConfigResult]], chosen: dict[str, ConfigResult]) -> pd.DataFrame:
    rows = []
    for loss, results in by_loss.items():
        for r in results:
            for k, run in enumerate(r.runs):
                done = k < len(r.auc)
                rows.append({"loss": loss, "config": r.name, "run": run, "epochs": r.epochs,
                             "val_auc": r.auc[k] if done else None, "val_eer": r.eer[k] if done else None,
                             f"val_tpr@fpr_{TPR_FPR:.0e}": r.tpr[k] if done else None,
                             "selected": r is chosen.get(loss), "experiment": r.rev})
    return pd.DataFrame(rows)


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.4f}" for v in values) if values else "not run"


def index_markdown(by_loss: dict[str, list[ConfigResult]], chosen: dict[str, ConfigResult]) -> str:
    lines = ["# Tuning: each loss's recipe, selected on validation pairs", "",
             "Regenerated by `python -m pipeline tune select configs/grids/tune-*.yaml`; do not edit by hand. "
             "Every loss had the same budget: the configurations, training seeds and epochs below. Each "
             "configuration is judged on the validation pairs of the training identities only (the trainer's own "
             "split; never a test set): cosine scores of the normalised embeddings, per run. The rule: the highest "
             f"mean validation AUC; configurations within {TIE} of it are tied and the lowest mean EER among them "
             "wins, then the first in the grid file.", ""]
    for loss, results in by_loss.items():
        runs = max(len(r.runs) for r in results)
        epochs = sorted({r.epochs for r in results})
        lines += [f"## {loss}", "",
                  f"Budget: {len(results)} configurations x {runs} training seeds x {'/'.join(map(str, epochs))} "
                  "epochs.", "",
                  "| configuration | validation AUC per seed | mean AUC | mean EER | mean TPR@FPR≤1e-2 | selected |",
                  "|---|---|---|---|---|---|"]
        for r in results:
            mark = "**selected**" if r is chosen.get(loss) else ""
            tpr = f"{np.mean(r.tpr):.4f}" if r.tpr and not np.isnan(np.mean(r.tpr)) else "–"
            auc = f"{r.mean_auc:.4f}" if r.auc else "–"
            eer = f"{r.mean_eer:.4f}" if r.eer else "–"
            lines.append(f"| {r.name} | {_fmt(r.auc)} | {auc} | {eer} | {tpr} | {mark} |")
        if loss in chosen:
            lines += ["", f"Selected recipe: `{yaml.safe_dump(chosen[loss].overrides, default_flow_style=True).strip()}`"]
        lines.append("")
    return "\n".join(lines) + "\n"


def tuning_record(result: ConfigResult, budget: list[ConfigResult]) -> dict[str, Any]:
    """``tuning.<loss>`` of params.yaml: the selected configuration and the budget it was chosen from."""
    return {"grid": result.grid, "config": result.name, "overrides": result.overrides,
            "configurations": len(budget), "seeds": max(len(r.runs) for r in budget),
            "epochs": max(r.epochs for r in budget), "mean_val_auc": round(result.mean_auc, 6)}


def apply_recipes(params_path: Path, chosen: dict[str, ConfigResult],
                  by_loss: dict[str, list[ConfigResult]] | None = None) -> list[str]:
    """Write each selected configuration's overrides into ``params_path`` (ruamel round trip: comments
    and order kept), and its provenance into ``tuning.<loss>`` (see :func:`tuning_record`); returns the
    dotted keys of the recipes written."""
    from ruamel.yaml import YAML

    doc_yaml = YAML()
    doc_yaml.preserve_quotes = True
    doc_yaml.representer.add_representer(  # keep `null` written out (ruamel leaves the value empty)
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = doc_yaml.load(params_path.read_text())
    trailing = {key: _last_entry(doc[key]) for key in doc}
    written = []
    for loss, result in chosen.items():
        for dotted, value in result.overrides.items():
            written += _assign(doc, dotted, value)
        if "tuning" not in doc or doc["tuning"] is None:
            doc["tuning"] = {}
            doc.yaml_set_comment_before_after_key(
                "tuning", before="\nHow each loss's recipe was selected (written by `python -m pipeline tune select "
                                 "--apply`;\nthe report states it, or that the loss's params were edited since)")
        doc["tuning"][loss] = tuning_record(result, (by_loss or {}).get(loss) or [result])
    for key, before in trailing.items():
        _keep_trailing_comment(before, _last_entry(doc[key]))
    buffer = io.StringIO()
    doc_yaml.dump(doc, buffer)
    write_text(params_path, buffer.getvalue())
    return written


def _last_entry(node: Any) -> tuple[Any, Any] | None:
    """(mapping, key) of the last scalar entry printed inside ``node``, descending into nested mappings:
    ruamel keeps the comment lines that follow a section (up to the next one) on that entry."""
    entry = None
    while isinstance(node, dict) and node:
        entry = (node, list(node)[-1])
        node = node[entry[1]]
    return entry


def _keep_trailing_comment(before: tuple[Any, Any] | None, after: tuple[Any, Any] | None) -> None:
    """Move the comment that followed a section's last entry to its new last entry, so that keys appended
    to the section do not land below the comment that introduces the next section."""
    if before is None or after is None or before == after or isinstance(after[0][after[1]], dict):
        return
    (old, old_key), (new, new_key) = before, after
    tokens = getattr(old, "ca", None) and old.ca.items.get(old_key)
    if not tokens or len(tokens) < 3 or tokens[2] is None or not hasattr(new, "ca"):
        return
    from ruamel.yaml.tokens import CommentToken

    token = tokens[2]
    inline, newline, rest = token.value.partition("\n")  # "# on the entry's own line\n" + the lines below
    if not rest.strip():
        return
    tokens[2] = CommentToken(inline + newline, token.start_mark, None) if inline.strip() else None
    new.ca.items.setdefault(new_key, [None, None, None, None])[2] = CommentToken("\n" + rest, token.start_mark, None)


def _assign(doc: Any, dotted: str, value: Any) -> list[str]:
    """Set ``dotted`` in a ruamel mapping; a mapping value is merged key by key (other keys kept)."""
    keys = dotted.split(".")
    node = doc
    for key in keys[:-1]:
        if key not in node or node[key] is None:
            node[key] = type(node)()  # a ruamel mapping in a ruamel document: it can carry comments
        node = node[key]
    last = keys[-1]
    if isinstance(value, dict):
        if last not in node or not isinstance(node[last], dict):
            node[last] = type(node)()
        return [f"{dotted}.{key}" for name, sub in value.items() for key in _assign(node[last], name, sub)]
    node[last] = value
    return [last] if len(keys) == 1 else [dotted]


def run_select(grid_paths: list[Path], workspace: Path, out_dir: Path, *, apply_to: Path | None = None,
               echo=print) -> dict[str, ConfigResult]:
    """Select every grid's loss recipe; write the tuning report (and the recipes into ``apply_to``)."""
    by_loss: dict[str, list[ConfigResult]] = {}
    for path in grid_paths:
        results = grid_results(path, workspace)
        by_loss[results[0].loss] = results
    chosen = {}
    for loss, results in by_loss.items():
        try:
            chosen[loss] = select(results)
        except ValueError as err:
            echo(f"tune: {err}")
    with atomic_dir(out_dir) as tmp:
        write_text(Path(tmp) / "index.md", index_markdown(by_loss, chosen))
        write_csv(Path(tmp) / "configurations.csv", results_frame(by_loss, chosen))
        write_text(Path(tmp) / "selected.yaml", yaml.safe_dump(
            {loss: {"config": r.name, "overrides": r.overrides, "mean_val_auc": round(r.mean_auc, 6),
                    "mean_val_eer": round(r.mean_eer, 6)} for loss, r in chosen.items()}, sort_keys=False))
    for loss, r in chosen.items():
        echo(f"{loss}: {r.name} (mean validation AUC {r.mean_auc:.4f}, EER {r.mean_eer:.4f})")
    if apply_to is not None and chosen:
        keys = apply_recipes(apply_to, chosen, by_loss)
        echo(f"wrote {len(keys)} keys into {apply_to}")
    return chosen
