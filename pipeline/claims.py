"""The studies' claims as a scoreboard computed from the committed reports (``reports/claims.md``).

Each claim of the papers and course reports this project grew from is tested by one experiment: a
grid of DVC experiments (``configs/grids/<grid>.yaml``, report in ``reports/experiments/<grid>/``)
or the default run (``reports/``). This module reads those reports only (their ``results.csv``,
``verdicts.csv``, ``comparison.csv``, ``cross_domain.csv``: never the runs themselves, never typed
numbers) and writes one row per claim: the experiment, its data and scale, the measured effect
with its interval and the verdict:

* **supported**: every part of the claim holds with a Holm-adjusted interval that excludes 0 in the
  claimed direction (for "A is not better than B" and "about equal": no significant difference);
* **contradicted**: some part is significant in the opposite direction;
* **not distinguishable at this scale**: neither (or the experiment has not run: "not run").

A claim is made of *parts*, each one comparison of two models on one test set (primary variant,
cosine on normalised embeddings): ``better`` (A beats B), ``not_better`` (A does not beat B),
``equal`` (neither beats the other). Effects are A minus B in mean AUC with the Holm interval of the
verdict table they come from (per-table family, as the reports compute them). Comparisons of
scoring variants within one model, which the reports do not test as paired differences, use the
variants' 95% intervals: they decide only when the intervals do not overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml

from pipeline.io import write_text

SUPPORTED, CONTRADICTED, NOT_DISTINGUISHABLE, NOT_RUN = (
    "supported", "contradicted", "not distinguishable at this scale", "not run")
PRIMARY = "cosine_norm"


@dataclass
class Part:
    """One comparison: ``kind`` better | not_better | equal; ``a``, ``b`` label filters (a model's
    dimension values, ``loss`` included) or, for the default report, loss names."""

    kind: str
    a: dict[str, str]
    b: dict[str, str]
    test_set: str = "synth_open"
    text: str = ""


@dataclass
class Outcome:
    text: str
    effect: float | None = None
    low: float | None = None
    high: float | None = None
    verdict: str = NOT_RUN

    def shown(self) -> str:
        if self.effect is None:
            return self.text
        interval = "" if self.low is None else f" [{self.low:+.4f}, {self.high:+.4f}]"
        return f"{self.text}: ΔAUC {self.effect:+.4f}{interval}"


@dataclass
class Claim:
    key: str
    claim: str
    source: str
    experiment: str            # a grid name, or a whole run's report (RUN_REPORTS: "default", "lfw-dev")
    parts: list[Part] = field(default_factory=list)
    note: str = ""
    custom: str | None = None  # a special test (see CUSTOM)
    test_set: str = "synth_open"  # the set a special test reads

    @property
    def run_report(self) -> bool:
        return self.experiment in RUN_REPORTS

    @property
    def data(self) -> str:
        return RUN_REPORTS[self.experiment].data if self.run_report else "synthetic"


class RunReport(NamedTuple):
    folder: str  # under reports/
    data: str    # what it ran on
    link: str    # how the board names it


#: Reports of whole runs rather than grids.
RUN_REPORTS = {
    "default": RunReport(".", "synthetic", "`reports/` (default run)"),
    "lfw-dev": RunReport("lfw-dev", "real faces (LFW photos)",
                         "[lfw-dev](lfw-dev/index.md) (`configs/lfw-dev.yaml`, `scripts/run_config.py`)"),
}


# --------------------------------------------------------------------------- reading reports
class Report:
    """The results and verdicts of one report folder (a grid's, or the default run's)."""

    def __init__(self, folder: Path, *, grid: bool) -> None:
        self.folder, self.grid = folder, grid
        self.results = pd.read_csv(folder / ("results.csv" if grid else "comparison.csv"), dtype=str)
        self.verdicts = pd.read_csv(folder / "verdicts.csv", dtype=str)
        if grid:
            self.scale = _scale(folder / "index.md")
        else:  # a whole run: its index's first line, and how its margin losses were set where it kept its params
            recipes = _run_recipes(folder / "params.yaml")
            self.scale = _default_scale(folder / "index.md") + (f"; {recipes}" if recipes else "")
        self.holm_intervals = "holm_low" in self.verdicts.columns  # reports before them show unadjusted ones

    def model(self, labels: dict[str, str]) -> str:
        """The key of the one model whose labels match (a grid's ``cell/loss``; the default's loss)."""
        if not self.grid:
            return labels["loss"]
        rows = self.results
        for column, value in labels.items():
            if column not in rows.columns:
                raise KeyError(f"{self.folder}: no column {column!r} in results.csv")
            rows = rows[rows[column] == str(value)]
        models = sorted(set(rows["model"]))
        if len(models) != 1:
            raise KeyError(f"{self.folder}: {labels} matches {len(models)} models")
        return models[0]

    def metric(self, model: str, test_set: str, variant: str = PRIMARY, metric: str = "auc"
               ) -> tuple[float, float, float]:
        row = self.results[(self.results["model"] == model) & (self.results["test_set"] == test_set)
                           & (self.results["variant"] == variant)]
        if row.empty:
            raise KeyError(f"{self.folder}: no {metric} of {model} on {test_set} ({variant})")
        row = row.iloc[0]
        low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
        return float(row[metric]), _num(low), _num(high)

    def compare(self, a: str, b: str, test_set: str) -> tuple[float, float | None, float | None, str]:
        """(A − B in mean AUC, Holm interval of the difference, who wins: "a" | "b" | "")."""
        v = self.verdicts[(self.verdicts["test_set"] == test_set) & (self.verdicts["variant"] == PRIMARY)]
        row = v[((v["a"] == a) & (v["b"] == b)) | ((v["a"] == b) & (v["b"] == a))]
        if row.empty:
            raise KeyError(f"{self.folder}: no verdict between {a} and {b} on {test_set}")
        row = row.iloc[0]
        sign = 1.0 if row["a"] == a else -1.0
        low = _num(row.get("holm_low", row.get("diff_low")))
        high = _num(row.get("holm_high", row.get("diff_high")))
        if sign < 0 and low is not None:
            low, high = -high, -low
        effect = sign * float(row["auc_diff"])
        significant = str(row["verdict"]) != "not distinguishable"
        return effect, low, high, ("a" if effect > 0 else "b") if significant else ""


def _num(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(out) else out


def _scale(index: Path) -> str:
    text = index.read_text() if index.is_file() else ""
    found = re.search(r"Scale of the base params: (.*?)\. The same grid", text)
    return found.group(1) if found else "scale not stated"


def _run_recipes(params_file: Path) -> str:
    """How a whole run's margin losses were set, from the params.yaml copied beside its report: whether it
    carries tuning records (the selected recipes), and the scale and margin each one ran with."""
    if not params_file.is_file():
        return ""
    tree = yaml.safe_load(params_file.read_text()) or {}
    loss, losses = tree.get("loss") or {}, tree.get("losses") or {}
    cosface, sphereface = losses.get("cosface") or {}, losses.get("sphereface") or {}
    values = (f"ArcFace s = {loss.get('scale', '–')}, m = {loss.get('margin', '–')}; CosFace s = "
              f"{cosface.get('scale', '–')}, m = {cosface.get('margin', '–')}; SphereFace m = "
              f"{sphereface.get('margin', '–')}")
    if tree.get("tuning"):
        return f"each loss at the recipe its tuning grid selected ({values})"
    return f"no tuning records in its params: {values}"


def _default_scale(index: Path) -> str:
    text = index.read_text() if index.is_file() else ""
    first = next((line for line in text.splitlines() if line.startswith("Backbone")), "")
    return first.split(". Regenerated")[0] if first else "the default run"


# --------------------------------------------------------------------------- judging
def judge_part(report: Report, part: Part) -> Outcome:
    a, b = report.model(part.a), report.model(part.b)
    effect, low, high, winner = report.compare(a, b, part.test_set)
    text = part.text or f"{_label(part.a)} vs {_label(part.b)} ({part.test_set})"
    if not report.holm_intervals:
        text += " (unadjusted 95% interval: the report predates Holm intervals)"
    if part.kind == "better":
        verdict = SUPPORTED if winner == "a" else CONTRADICTED if winner == "b" else NOT_DISTINGUISHABLE
    elif part.kind == "not_better":
        verdict = CONTRADICTED if winner == "a" else SUPPORTED
    elif part.kind == "equal":
        verdict = SUPPORTED if winner == "" else CONTRADICTED
    else:  # pragma: no cover - the claims below use these three
        raise ValueError(f"unknown part kind {part.kind!r}")
    return Outcome(text, effect, low, high, verdict)


def overall(outcomes: list[Outcome]) -> str:
    verdicts = [o.verdict for o in outcomes]
    if not verdicts or NOT_RUN in verdicts:
        return NOT_RUN
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else NOT_DISTINGUISHABLE


def _label(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" if k != "loss" else v for k, v in labels.items())


# --------------------------------------------------------------------------- the claims
def _loss(name: str, **labels: str) -> dict[str, str]:
    return {**labels, "loss": name}


ARCFACE_STUDY, COURSE, APD_STUDY, COURSE_NOTES = (
    "ArcFace study (Deng et al.)", "course report", "APD study", "course notes")

CLAIMS = [
    Claim("ranking", "ArcFace ≥ CosFace ≥ SphereFace, each at its selected recipe", ARCFACE_STUDY, "default",
          [Part("not_better", _loss("cosface"), _loss("arcface")), Part("not_better", _loss("sphereface"),
                                                                        _loss("cosface"))],
          note="'≥' holds unless the lower loss beats the higher one; the report's verdicts on synth_open"),
    Claim("ranking-lfw", "The same ranking on real faces: ArcFace ≥ CosFace ≥ SphereFace", ARCFACE_STUDY, "lfw-dev",
          [Part("not_better", _loss("cosface"), _loss("arcface"), "lfw_test"),
           Part("not_better", _loss("sphereface"), _loss("cosface"), "lfw_test")],
          note="trained from scratch on the LFW identities outside folds 7–8, with the params the data column "
               "names (from the run's own params.yaml); verdicts on the official pairs of folds 7–8"),
    Claim("best-margins", "Best margins: ArcFace m2 = 0.5, CosFace m3 = 0.35, SphereFace m1 = 1.35 (combined-margin "
          "notation)", ARCFACE_STUDY, "best-margins",
          [Part("not_better", _loss("combined", margin=other), _loss("combined", margin=best))
           for best, others in (("m2-0.5", ("m2-0.3", "m2-0.7")), ("m3-0.35", ("m3-0.25", "m3-0.45")),
                                ("m1-1.35", ("m1-1.2", "m1-1.5"))) for other in others],
          note="the claimed value is not beaten by a smaller or a larger one of its family"),
    Claim("combined", "CM1 (1, 0.3, 0.2) and CM2 (0.9, 0.4, 0.15) beat SphereFace and CosFace but not ArcFace",
          ARCFACE_STUDY, "combined-margins",
          [Part(kind, _loss("combined", margin=cm), _loss(other, margin="single"))
           for cm in ("CM1", "CM2") for kind, other in (("better", "sphereface"), ("better", "cosface"),
                                                        ("not_better", "arcface"))]),
    Claim("subcenter", "Sub-center ArcFace (K = 3) holds up better than ArcFace under noisy labels (20%, 40%) and "
          "is about equal on clean labels", ARCFACE_STUDY, "subcenter-noise",
          [Part("better", _loss("subcenter", noise=n), _loss("arcface", noise=n)) for n in ("20%", "40%")]
          + [Part("equal", _loss("subcenter", noise="0%"), _loss("arcface", noise="0%"))],
          note="sub-center ArcFace at ArcFace's selected s and m (not tuned on its own); the study's second phase, "
               "dropping non-dominant sub-centres and the samples far from them, is not part of facepipe's loss"),
    Claim("intra-inter", "Norm-Softmax + an intra-class term helps, + an inter-class term only slightly; a triplet "
          "margin is less effective than ArcFace's", ARCFACE_STUDY, "intra-inter",
          [Part("better", _loss("intra"), _loss("normface")), Part("not_better", _loss("normface"), _loss("inter")),
           Part("better", _loss("arcface"), _loss("triplet"))],
          note="'only slightly': NormFace + inter is not worse than NormFace; ArcFace + intra / inter / triplet "
               "(the study's other half) is not a facepipe loss and was not run"),
    Claim("margin-open-closed", "ArcFace m = 0.8 against 0.5: better on the open set, worse on the closed set",
          COURSE, "arcface-margins",
          [Part("better", _loss("arcface", **{"loss.margin": "0.8", "input": "colour"}),
                _loss("arcface", **{"loss.margin": "0.5", "input": "colour"}), "synth_open"),
           Part("better", _loss("arcface", **{"loss.margin": "0.5", "input": "colour"}),
                _loss("arcface", **{"loss.margin": "0.8", "input": "colour"}), "synth_closed")]),
    Claim("grayscale", "Grayscale input lowers false negatives and raises false positives at similar accuracy",
          COURSE, "arcface-margins", custom="grayscale"),
    Claim("test-norm", "Test-time L2 normalisation does not change cosine scores (an identity) but changes "
          "L2-distance results; softmax features do better with L2 on raw features, angular-softmax and triplet "
          "features with normalised ones", APD_STUDY, "default", custom="test_norm"),
    Claim("test-norm-lfw", "The same on real faces: cosine unchanged by test-time normalisation, L2 changed; softmax "
          "better with L2 on raw features, angular-softmax and triplet with normalised ones", APD_STUDY, "lfw-dev",
          custom="test_norm", test_set="lfw_test"),
    Claim("train-norm", "Training-time L2 normalisation of the features hurts (softmax, A-Softmax); ResNet-34 is no "
          "clear gain over ResNet-18 at this data size; a model loses accuracy on another population", APD_STUDY,
          "loss-normalisation", custom="train_norm"),
    Claim("center-start", "Center loss added from the start of training improves softmax features for verification; "
          "switched on late it does not", COURSE_NOTES, "center-start",
          [Part("better", _loss("center", start="first-step"), _loss("softmax", start="first-step")),
           Part("not_better", _loss("center", start="half-way"), _loss("softmax", start="half-way"))]),
    Claim("center-lfw", "On real faces: center loss from the start improves softmax features for verification",
          COURSE_NOTES, "lfw-dev", [Part("better", _loss("center"), _loss("softmax"), "lfw_test")],
          note="the first half of the claim only: center loss switched on late has not run on real faces"),
]


# --------------------------------------------------------------------------- special tests
def _overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    return not (a[1] > b[2] or b[1] > a[2])


def _interval_part(report: Report, text: str, higher: tuple[str, str], lower: tuple[str, str], test_set: str
                   ) -> Outcome:
    """``higher`` = (model, variant) should exceed ``lower``; decided only by non-overlapping 95% intervals."""
    x = report.metric(higher[0], test_set, higher[1])
    y = report.metric(lower[0], test_set, lower[1])
    if None in (x[1], y[1]) or _overlap(x, y):
        verdict = NOT_DISTINGUISHABLE
    else:
        verdict = SUPPORTED if x[0] > y[0] else CONTRADICTED
    return Outcome(text, x[0] - y[0], None, None, verdict)


def test_norm(report: Report, test_set: str) -> list[Outcome]:
    table = report.results.copy()
    table["auc"] = table["auc"].astype(float)
    by = table.pivot_table(index=["model", "test_set"], columns="variant", values="auc", aggfunc="first")
    identity = float(np.max(np.abs(by["cosine_norm"] - by["cosine_raw"])))
    l2 = float(np.max(np.abs(by["l2_norm"] - by["l2_raw"])))
    out = [Outcome(f"max |AUC cosine norm − raw| = {identity:.1e} (an identity)", None, None, None,
                   SUPPORTED if identity < 1e-9 else CONTRADICTED),
           Outcome(f"max |AUC L2 norm − raw| = {l2:.4f}", None, None, None,
                   SUPPORTED if l2 > 1e-6 else CONTRADICTED)]
    models = set(table["model"])
    if "softmax" in models:
        out.append(_interval_part(report, f"softmax: L2 raw vs L2 norm ({test_set})", ("softmax", "l2_raw"),
                                  ("softmax", "l2_norm"), test_set))
    for loss in ("sphereface", "triplet"):
        if loss in models:
            out.append(_interval_part(report, f"{loss}: L2 norm vs L2 raw ({test_set})", (loss, "l2_norm"),
                                      (loss, "l2_raw"), test_set))
    return out


def train_norm(report: Report, test_set: str) -> list[Outcome]:
    out = []
    for backbone in ("resnet18", "resnet34"):
        for loss in ("softmax", "sphereface"):
            out.append(judge_part(report, Part("better", {"model.backbone": backbone, "train_norm": "off", "loss": loss},
                                               {"model.backbone": backbone, "train_norm": "on", "loss": loss}, test_set,
                                               text=f"{backbone} {loss}: norm off vs on ({test_set})")))
    for loss in ("softmax", "sphereface", "triplet"):
        out.append(judge_part(report, Part("equal", {"model.backbone": "resnet34", "train_norm": "off", "loss": loss},
                                           {"model.backbone": "resnet18", "train_norm": "off", "loss": loss}, test_set,
                                           text=f"{loss}: ResNet-34 vs ResNet-18 ({test_set})")))
    drops = pd.read_csv(report.folder / "cross_domain.csv", dtype=str) if (report.folder / "cross_domain.csv"
                                                                         ).is_file() else pd.DataFrame()
    if not drops.empty:
        readings = drops["reading"].tolist()
        verdict = SUPPORTED if all(r == "drops" for r in readings) else CONTRADICTED if any(
            r == "rises" for r in readings) else NOT_DISTINGUISHABLE
        out.append(Outcome(f"cross-domain: {readings.count('drops')} of {len(readings)} models drop", None, None, None,
                           verdict))
    return out


def grayscale(report: Report, test_set: str) -> list[Outcome]:
    colour = report.model({"loss.margin": "0.5", "input": "colour", "loss": "arcface"})
    gray = report.model({"loss.margin": "0.5", "input": "gray", "loss": "arcface"})
    fn = [report.metric(m, test_set, metric="fn")[0] for m in (colour, gray)]
    fp = [report.metric(m, test_set, metric="fp")[0] for m in (colour, gray)]
    accuracy = [report.metric(m, test_set, metric="accuracy") for m in (colour, gray)]
    similar = _overlap(*accuracy)
    against = [what for what, held in (("FN does not fall", fn[1] < fn[0]), ("FP does not rise", fp[1] > fp[0]))
               if not held]
    text = (f"m = 0.5, {test_set}: FN {fn[0]:.1f} → {fn[1]:.1f}, FP {fp[0]:.1f} → {fp[1]:.1f} (colour → gray; "
            f"counts carry no interval), accuracy {accuracy[0][0]:.4f} → {accuracy[1][0]:.4f}")
    verdict = CONTRADICTED if not similar else NOT_DISTINGUISHABLE
    if similar and against:
        text += "; against the claim: " + " and ".join(against)
    return [Outcome(text, None, None, None, verdict)]


CUSTOM = {"test_norm": test_norm, "train_norm": train_norm, "grayscale": grayscale}


# --------------------------------------------------------------------------- the board
@dataclass
class Row:
    claim: Claim
    outcomes: list[Outcome]
    verdict: str
    scale: str


def evaluate(claim: Claim, reports_root: Path) -> Row:
    if claim.run_report:
        folder, needed = reports_root / RUN_REPORTS[claim.experiment].folder, "comparison.csv"
    else:
        folder, needed = reports_root / "experiments" / claim.experiment, "results.csv"
    if not (folder / needed).is_file():
        return Row(claim, [], NOT_RUN, "–")
    report = Report(folder, grid=not claim.run_report)
    try:
        outcomes = (CUSTOM[claim.custom](report, claim.test_set) if claim.custom
                    else [judge_part(report, p) for p in claim.parts])
    except KeyError as err:  # the report lacks a model or comparison the claim needs
        return Row(claim, [Outcome(f"not in the report: {err}")], NOT_RUN, report.scale)
    return Row(claim, outcomes, overall(outcomes), report.scale)


def board_markdown(rows: list[Row]) -> str:
    counts = {v: sum(r.verdict == v for r in rows) for v in (SUPPORTED, CONTRADICTED, NOT_DISTINGUISHABLE, NOT_RUN)}
    real = sum(r.claim.data != "synthetic" for r in rows)
    lines = ["# The studies' claims, tested", "",
             "Regenerated by `python -m pipeline claims` from the committed reports (`reports/` and "
             "`reports/experiments/<grid>/`); never edited by hand. Verdicts: **supported** (every part holds with a "
             "Holm interval that excludes 0 in the claimed direction, or, for 'not better' / 'about equal', no "
             "significant difference), **contradicted** (a part is significant the other way), **not "
             "distinguishable at this scale**. Effects: difference of mean AUC (A − B) on synth_open unless said, "
             "cosine on normalised embeddings, with the Holm interval of its table. The data column says where "
             f"each row was measured: {real} of the {len(rows)} rows on real faces (the LFW photos of "
             "`configs/lfw-dev.yaml`, at laptop scale), the others on the built-in synthetic faces only (a grid's "
             "base params point it at real data).", "",
             f"Summary: {counts[SUPPORTED]} supported, {counts[CONTRADICTED]} contradicted, "
             f"{counts[NOT_DISTINGUISHABLE]} not distinguishable at this scale, {counts[NOT_RUN]} not run.", "",
             "| claim | source | experiment | data and scale | measured | verdict |", "|---|---|---|---|---|---|"]
    for row in rows:
        c = row.claim
        where = RUN_REPORTS[c.experiment].link if c.run_report else \
            f"[{c.experiment}](experiments/{c.experiment}/index.md) (`configs/grids/{c.experiment}.yaml`)"
        measured = "<br>".join(f"{o.shown()} ({o.verdict})" for o in row.outcomes) or "–"
        note = f"<br>*{c.note}*" if c.note else ""
        lines.append(f"| {c.claim} | {c.source} | {where} | {c.data}; {row.scale} | {measured}{note} | "
                     f"**{row.verdict}** |")
    return "\n".join(lines) + "\n"


def run_claims(reports_root: Path = Path("reports"), out: Path | None = None) -> list[Row]:
    rows = [evaluate(claim, reports_root) for claim in CLAIMS]
    write_text(out or reports_root / "claims.md", board_markdown(rows))
    return rows
