"""Markdown renderers shared by the report and the grid report: numbers, tables, verdicts, drops.

Every interval printed beside a verdict is its Holm interval (:func:`pipeline.repeats.holm_family`),
which excludes 0 exactly when the verdict is "beats" (or the drop's reading "drops" / "rises");
the unadjusted 95% interval stands in its own column, labelled so.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pandas as pd

from pipeline.repeats import METHOD, Interval, verdict_method
from pipeline.report.statistics import FixedStats, ModelStats

ON_ITSELF_MARK, FALLBACK_MARK = "‡", "†"


# --------------------------------------------------------------------------- numbers
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _interval_text(iv: Interval | None, digits: int = 4) -> str:
    """``mean [low, high]``; the mean alone where there is no interval."""
    if iv is None:
        return "–"
    if math.isnan(iv.low):
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def _per_run(values: tuple[float, ...], digits: int = 4) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def signed_interval(low: float, high: float) -> str:
    """``[+0.0012, +0.0034]``: signed, so a bound rounded to 0 still shows its side of 0."""
    return f"[{low:+.4f}, {high:+.4f}]"


def holm_interval_text(low: float, high: float, level: float) -> str:
    """A Holm interval and its confidence: ``[+0.0012, +0.0034] (99.7%)``."""
    return f"{signed_interval(low, high)} ({100 * (1 - level):.3g}%)"


def variant_label(variant: str) -> str:
    distance, norm = variant.split("_")
    return f"{distance}, test-time norm {'on' if norm == 'norm' else 'off'}"


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def method_lines(pairing: str = "independent") -> list[str]:
    """The "Intervals: ..." and "Verdicts: ..." paragraphs at the top of a comparison."""
    return [f"Intervals: {METHOD}.", "", f"Verdicts: {verdict_method(pairing)}.", ""]


def family_text(alpha: float) -> str:
    """How Holm's family and α are stated wherever a verdict is read: per table."""
    return f"Holm within this table, family-wise α = {alpha:g}"


# -------------------------------------------------------------------- model tables
def _model_label(model: str, st: ModelStats) -> str:
    return f"{st.label or model} ({len(st.runs)} run{'s' if len(st.runs) != 1 else ''})"


def _fixed_mark(fx: FixedStats | None) -> str:
    if fx is None:
        return ""
    return (FALLBACK_MARK if fx.fallback else "") + (ON_ITSELF_MARK if fx.on_itself else "")


def fixed_header(per_model: dict[str, ModelStats]) -> str | None:
    """``accuracy @ threshold from SOURCE (RULE)``: the requested source and rule of the table's models."""
    found = [s.fixed for s in per_model.values() if s.fixed is not None]
    if not found:
        return None
    return f"accuracy @ threshold from {found[0].requested} ({found[0].rule})"


def fixed_notes(per_model: dict[str, ModelStats], test_set: str) -> list[str]:
    """Footnotes for the marks of :func:`stats_markdown`."""
    notes = []
    fallback = sorted({s.fixed.source for s in per_model.values() if s.fixed is not None and s.fixed.fallback})
    if fallback:
        models = [m for m, s in per_model.items() if s.fixed is not None and s.fixed.fallback]
        notes.append(f"{FALLBACK_MARK} {', '.join(models)}: no validation pairs (pretrained), so the threshold "
                     f"was chosen on {' / '.join(fallback)} (score.threshold.fallback).")
    itself = [m for m, s in per_model.items() if s.fixed is not None and s.fixed.on_itself]
    if itself:
        notes.append(f"{ON_ITSELF_MARK} threshold chosen on {test_set} itself ({', '.join(itself)}): its accuracy "
                     "there is optimistic, not a held-out figure.")
    missing = [m for m, s in per_model.items() if s.fixed is not None and s.fixed.accuracy is None]
    if missing:
        notes.append(f"no fixed threshold for {', '.join(missing)} (no labelled pairs to choose it on).")
    return notes


def stats_markdown(per_model: dict[str, ModelStats], test_set: str | None = None) -> str:
    """One table's models, best mean AUC first: every metric's mean and 95% interval."""
    order = sorted(per_model.values(), key=lambda s: -s.auc.mean)
    view = pd.DataFrame({
        "model": [_model_label(s.model, s) for s in order],
        "AUC mean [95%]": [_interval_text(s.auc) for s in order],
        "AUC per run": [_per_run(s.auc.per_run) for s in order],
        "accuracy (LFW protocol) [95%]": [_interval_text(s.accuracy) for s in order],
        "EER [95%]": [_interval_text(s.eer) for s in order],
        "TPR@FPR≤1e-2 [95%]": [_interval_text(s.tpr[1e-2]) for s in order],
        "TPR@FPR≤1e-3": [_fmt(None if s.tpr[1e-3] is None else s.tpr[1e-3].mean) for s in order],
        "rank-1": [_fmt(None if s.rank1 is None else s.rank1.mean) for s in order],
        "N-way (head)": [_fmt(None if s.n_way is None else s.n_way.mean) for s in order],
        "FP / FN": [f"{s.fp:.1f} / {s.fn:.1f}" for s in order],
    })
    header = fixed_header(per_model)
    if header is None:
        return markdown_table(view)
    position = view.columns.get_loc("accuracy (LFW protocol) [95%]") + 1
    view.insert(position, f"{header} [95%]", [
        ("–" if s.fixed is None or s.fixed.accuracy is None else _interval_text(s.fixed.accuracy))
        + _fixed_mark(s.fixed)
        for s in order])
    view.insert(position + 1, "FP / FN @ threshold", [
        "–" if s.fixed is None or s.fixed.fp is None else f"{s.fixed.fp:.1f} / {s.fixed.fn:.1f}" for s in order])
    view = view.rename(columns={"FP / FN": "FP / FN (LFW protocol)"})
    notes = fixed_notes(per_model, test_set or "")
    return "\n\n".join([markdown_table(view), *notes])


# ------------------------------------------------------------------------ verdicts
def _named(names: Callable[[str], str] | None) -> Callable[[str], str]:
    return names or (lambda model: model)


def verdict_sentences(v: pd.DataFrame, models: list[str], alpha: float,
                      names: Callable[[str], str] | None = None) -> list[str]:
    """Computed readings of one table's verdicts, each "beats" with its Holm interval.

    ``models``: the table's models, best mean AUC first; ``names``: display name of a model.
    """
    name = _named(names)
    beats = v[v["verdict"] != "not distinguishable"]
    n = len(v)
    if n == 0:
        return ["only one model: nothing to compare."]
    if beats.empty:
        if n == 1:
            return [f"the two models are not distinguishable (α = {alpha:g})."]
        return [f"no model beats another: all {n} pairs are not distinguishable ({family_text(alpha)})."]
    beaten = set(beats["b"])
    top = [name(m) for m in models if m not in beaten]
    lines = [f"not beaten by any other model: {', '.join(top)}."]
    for a, group in beats.groupby("a", sort=False):
        parts = [f"{name(r.b)} (ΔAUC {r.auc_diff:+.4f}, Holm interval {signed_interval(r.holm_low, r.holm_high)}, "
                 f"Holm p = {r.p_holm:.2g})" for r in group.itertuples()]
        lines.append(f"{name(a)} beats {'; '.join(parts)}.")
    lines.append(f"{n - len(beats)} of {n} pairs are not distinguishable ({family_text(alpha)}).")
    return lines


def verdicts_markdown(v: pd.DataFrame, names: Callable[[str], str] | None = None) -> str:
    """Every pair of one table: difference, unadjusted 95% interval, Holm interval, p-values, verdict."""
    name = _named(names)
    view = pd.DataFrame({
        "A (higher mean AUC)": v["a"].map(name), "B": v["b"].map(name),
        "ΔAUC [unadjusted 95%]": [f"{d:+.4f} {signed_interval(lo, hi)}"
                                  for d, lo, hi in zip(v["auc_diff"], v["diff_low"], v["diff_high"])],
        "Holm interval": [holm_interval_text(lo, hi, lv)
                          for lo, hi, lv in zip(v["holm_low"], v["holm_high"], v["holm_level"])],
        "p": [f"{p:.2g}" for p in v["p"]], "Holm p": [f"{p:.2g}" for p in v["p_holm"]], "verdict": v["verdict"],
    })
    if (v["pairing"] == "seed").any():
        view.insert(len(view.columns) - 1, "runs", ["paired by seed" if p == "seed" else "independent"
                                                     for p in v["pairing"]])
    return markdown_table(view)


def cross_domain_markdown(xd: pd.DataFrame, names: Callable[[str], str] | None = None) -> str:
    """The AUC drop of each model from the in-domain set to a cross-domain set."""
    name = _named(names)
    return markdown_table(pd.DataFrame({
        "model": xd["model"].map(name), "runs": xd["runs"], "from → to": xd["in_domain"] + " → " + xd["cross_domain"],
        "AUC in": xd["auc_in"].map(_fmt), "AUC cross": xd["auc_cross"].map(_fmt),
        "drop [unadjusted 95%]": [f"{d:+.4f} {signed_interval(lo, hi)}"
                                  for d, lo, hi in zip(xd["drop"], xd["drop_low"], xd["drop_high"])],
        "Holm interval": [holm_interval_text(lo, hi, lv)
                          for lo, hi, lv in zip(xd["drop_holm_low"], xd["drop_holm_high"], xd["holm_level"])],
        "Holm p": [f"{p:.2g}" for p in xd["p_holm"]], "reading": xd["reading"]}))


def cross_domain_sentences(xd: pd.DataFrame, alpha: float, names: Callable[[str], str] | None = None) -> list[str]:
    """One reading per cross-domain set: how many models drop, rise or show no clear change."""
    name = _named(names)
    lines = []
    words = {"drops": "AUC drops for", "rises": "AUC rises for", "no clear change": "no clear change for"}
    for target, block in xd.groupby("cross_domain", sort=False):
        counts = block["reading"].value_counts()
        parts = [f"{words[w]} {counts[w]} of {len(block)} models" for w in words if counts.get(w, 0)]
        worst = block.loc[block["drop"].idxmax()]
        lines.append(
            f"- **cross-domain** ({block['in_domain'].iloc[0]} → {target}; a drop or rise is read where its Holm "
            f"interval over the models excludes 0, family-wise α = {alpha:g} per cross-domain set): "
            + "; ".join(parts) + f". Largest mean drop: {name(worst['model'])} {worst['drop']:+.4f} (Holm interval "
            f"{signed_interval(worst['drop_holm_low'], worst['drop_holm_high'])}, {worst['reading']}); "
            f"mean over models {block['drop'].mean():+.4f}.")
    return lines
