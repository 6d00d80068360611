"""The report's statements about the data sets: how each test set's folds were made, whether it was
detected and aligned or pre-cropped (and at what size it was scored), the detection table, and the
images the detect stage rejected. Everything comes from the loaders of :mod:`pipeline.report.inputs`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.report import inputs
from pipeline.report.render import _fmt, markdown_table

#: Rejected images named per set before "and N more".
REJECTS_SHOWN = 3


def fold_text(record: dict[str, Any]) -> str:
    """How a set's pairs were dealt into folds, from its data-stage record (``folds_assigned``:
    "from file", "stratified by label, seed S", "none (no labels)"; absent for synthetic sets)."""
    folds = record.get("folds")
    count = f"{folds} fold{'s' if folds != 1 else ''}" if folds is not None else "folds"
    assigned = record.get("folds_assigned")
    kind = record.get("kind")
    if assigned is None and kind == "synthetic":
        return f"{count}, identity-disjoint (the synthetic sets deal whole identities to folds)"
    if assigned == "from file":
        return f"{count} as given in the pairs file" + (" (LFW's official folds are identity-disjoint)"
                                                         if kind == "lfw" else "")
    if assigned and assigned.startswith("none"):
        return "no labels, so no folds are used (predicted only)"
    if assigned and assigned.startswith("stratified"):
        return (f"{count} assigned by stratified split ({assigned}): label-stratified random folds, not "
                "identity-disjoint, so pairs that share an identity can sit in different folds and the fold "
                "spread can understate the pair variance")
    return f"{count} ({assigned})" if assigned else count


def fold_kind(record: dict[str, Any]) -> str:
    """``identity-disjoint``, ``label-stratified`` or ``as given`` (short, for the method text)."""
    assigned = record.get("folds_assigned")
    if assigned is None and record.get("kind") == "synthetic":
        return "identity-disjoint"
    if assigned and assigned.startswith("stratified"):
        return "label-stratified random"
    return "as given in the pairs file"


def preparation_text(name: str, detection: dict[str, dict], alignment: dict[str, dict]) -> str:
    """Detected and aligned (faces kept of images), or pre-cropped: not detected or aligned, scored at N px."""
    d, a = detection.get(name, {}), alignment.get(name, {})
    if d.get("precropped") or a.get("precropped"):
        size = a.get("output_size")
        if a.get("crop", "resize") == "center":
            how = f"crop: center, the central square of {a.get('crop_fraction', 1.0):g} of the shorter side, resized"
        else:
            how = "crop: resize, the whole image resized"
        return (f"pre-cropped: not detected or aligned, scored at {size if size is not None else '?'} px ({how}); "
                f"{d.get('faces', a.get('aligned', '?'))} of {d.get('images', '?')} images readable")
    if d:
        return f"detected and aligned: {d['faces']} of {d['images']} images kept a face"
    return ""


def test_sets_section(names: list[str], scored: dict[str, tuple[int, int]]) -> list[str]:
    """``## Test sets``: per set its kind, pairs, folds and preparation (empty without data-stage records).

    ``names``: the test sets in report order; ``scored``: set -> (pairs scored, pairs in the set).
    """
    summaries, detection = inputs.dataset_summaries(names), inputs.detection_counts(names)
    alignment = inputs.alignment_stats(names)
    lines = []
    for name in names:
        record = summaries.get(name)
        if record is None:
            continue
        pairs = record.get("pairs")
        done = f", {scored[name][0]} scored" if name in scored else ""
        parts = [f"{pairs} pairs{done}" if pairs is not None else "no pairs", fold_text(record)]
        prepared = preparation_text(name, detection, alignment)
        lines.append(f"- **{name}** ({record.get('kind', '?')}): " + "; ".join(parts + ([prepared] if prepared else []))
                     + ".")
    if not lines:
        return []
    return ["## Test sets", "", "How each set's pairs were split into the folds that the LFW-protocol accuracy and its "
            "interval use, and how its faces were prepared (from `data/datasets/SET/summary.json`, "
            "`reports/detection/SET.json` and `reports/alignment/SET.json`).", "", *lines, ""]


def folds_sentence(names: list[str]) -> str:
    """One sentence for the method text: which sets have identity-disjoint and which label-stratified folds."""
    summaries = inputs.dataset_summaries(names)
    groups: dict[str, list[str]] = {}
    for name in names:
        if name in summaries:
            groups.setdefault(fold_kind(summaries[name]), []).append(name)
    if not groups:
        return ""
    return ("Folds: " + "; ".join(f"{kind} for {', '.join(sets)}" for kind, sets in groups.items())
            + " (see Test sets).")


def detection_table(sets: list[str]) -> pd.DataFrame:
    """Images before and after MTCNN per set; a pre-cropped set is marked as not detected."""
    counts, align = inputs.detection_counts(sets), inputs.alignment_stats(sets)
    rows = []
    for name, c in counts.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in c["reasons"].items()) or "–"
        if c.get("precropped"):
            kept, residual = f"{c['faces']} pre-cropped, not detected", "– (not aligned)"
        else:
            kept, residual = c["faces"], _fmt(align.get(name, {}).get("residual_mean_px"), 2)
        rows.append({"set": name, "images": c["images"], "faces kept": kept, "dropped": c["dropped"],
                     "why dropped": reasons, "mean landmark residual (px)": residual})
    return pd.DataFrame(rows)


def rejects_lines(sets: list[str], shown: int = REJECTS_SHOWN) -> list[str]:
    """Per set, the first rejected images with their reasons and how many more, and where all of them are."""
    rejected = inputs.rejected_images(sets)
    lines = []
    for name in sets:
        if name not in rejected:
            continue
        images = rejected[name]
        named = ", ".join(f"`{path}` ({reason})" for path, reason in images[:shown])
        more = f" and {len(images) - shown} more" if len(images) > shown else ""
        lines.append(f"- {name}: {len(images)} rejected: {named}{more} (all in `{inputs.rejects_file(name)}`)")
    if not lines:
        return []
    return ["Rejected images (each set's `rejects.csv` lists every one with its reason):", "", *lines, ""]


def detection_section(sets: list[str]) -> list[str]:
    """``## Detection``: the before / after table, the rejected images and the contact sheets."""
    det = detection_table(sets)
    if det.empty:
        return []
    sheets = ", ".join(f"[{name}](figures/contact_sheets/{name}.png)" for name in det["set"])
    return ["## Detection (images before and after MTCNN)", "", markdown_table(det), "", *rejects_lines(sets),
            f"Aligned faces: {sheets}", ""]
