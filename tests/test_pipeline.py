"""End to end: the real dvc.yaml on a tiny synthetic config, in a fresh git+DVC project.

Checks what a user relies on: `dvc repro` builds the report; a second `dvc repro`
runs nothing; a run killed (SIGKILL) inside every stage in turn and restarted ends
with the same report as the clean run; changing the ArcFace margin reruns only
ArcFace's runs and the report; a loss's recipe override retrains only that loss;
adding a training seed runs only its stages, removing one only the report; adding a
test set runs only its own data stages and its embed and score stages for every run,
removing one only the report, and changing one set's detection params only that set's
stages; changing a scoring switch reruns only scoring; the report's numbers equal a
recomputation from the per-pair score files; fixed thresholds come from each run's
validation pairs and every run writes its prediction files; a facepipe model file outside
the repository is scored like the run it came from and embedded again when its content
changes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "data": {
        "synthetic": {
            "train_identities": 8, "train_images_per_identity": 6, "closed_images_per_identity": 2,
            "open_identities": 6, "domain_identities": 6, "test_images_per_identity": 3,
            "image_size": 128, "folds": 2, "pairs_per_fold": 8,
        }
    },
    "detect": {"batch_size": 16},
    "align": {"contact_sheet": 16},
    # val_fraction 0.25: two validation images per identity, so the validation pairs hold both classes
    "train": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0, "pk_identities": 4, "pk_images": 2,
              "val_fraction": 0.25},
    "model": {"embedding_size": 32},
    # the validation and test pairs of this tiny set are few: allow thresholds on them
    "score": {"bootstrap": 20, "threshold": {"min_pairs": 4}},
    "report": {"bootstrap": 100},
    "seeds": {"data": 0, "train": [0, 1]},
    "train_losses": ["softmax", "arcface"],
}
RUNS = [f"{loss}-{seed}" for loss in ("softmax", "arcface") for seed in (0, 1)]
SETS = ("synth_open", "synth_closed", "synth_domain")
DATA_KINDS = ("data", "detect", "align", "shard")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(os.cpu_count() or 1))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_param(project: Path, dotted: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    node = params
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _new_project(where: Path, params: dict) -> Path:
    shutil.copytree(ROOT / "pipeline", where / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", where / "dvc.yaml")
    (where / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "dvc-defaults.yaml", where / "configs" / "dvc-defaults.yaml")
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], where)
    _run(["dvc", "init", "-q"], where)
    shutil.copy(ROOT / ".dvc" / "config", where / ".dvc" / "config")  # the repository's cache settings
    return where


def _repro_killed_in(project: Path, stage: str, delay: float) -> bool:
    """Start `dvc repro`, SIGKILL it (and its stage process) `delay` s into `stage`.

    Returns False when the run finished before reaching the stage (nothing left to kill).
    """
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if f"Running stage '{stage}'" in line:
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True
        proc.wait(timeout=60)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _recover_lock(project: Path) -> bool:
    """DVC rewrites dvc.lock in place after each stage, so a kill during that write leaves it cut short
    ("'./dvc.lock' validation failed"). The README's recovery: remove it (or `git checkout dvc.lock`)
    and rerun; the stages that had finished come back from DVC's run cache. True when it was needed."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    lock = project / "dvc.lock"
    if not lock.exists():  # killed before the first stage finished
        return False
    try:
        COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(lock.read_text()))
        return False
    except Exception:
        lock.unlink()
        return True


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    project = _new_project(tmp_path_factory.mktemp("facepipe"), params)
    first = _run(["dvc", "repro"], project)
    (project / "first_run.log").write_text(first.stdout)
    return project


def _stages(kind: str, runs=RUNS, sets=SETS) -> set[str]:
    """The stages of ``kind``: per run (train) or per test set (embed, score; every run at once)."""
    if kind in ("embed", "score"):
        return {f"{kind}@{name}" for name in sets}
    return {f"{kind}@{run}" for run in runs}


def _run_stages(runs=RUNS, sets=SETS) -> set[str]:
    """What retraining ``runs`` reruns: their train stages, then every set's embedding and scoring and
    the validation embeddings (those stages serve every run at once)."""
    return _stages("train", runs) | {"embed_train"} | _stages("embed", runs, sets) | _stages("score", runs, sets)


def _data_stages(name: str) -> set[str]:
    return {f"{kind}_train" for kind in DATA_KINDS} if name == "train" else {f"{kind}@{name}" for kind in DATA_KINDS}


def test_repro_builds_the_report(project):
    log = (project / "first_run.log").read_text()
    every_set = set().union(*(_data_stages(name) for name in ("train", *SETS)))
    assert every_set | {"recipes", "report", "augment_preview"} | _run_stages() == _ran(log)
    table = pd.read_csv(project / "reports" / "comparison.csv")
    assert set(table["model"]) == {"softmax", "arcface"}
    assert set(table["runs"]) == {2}
    assert set(table["test_set"]) == {"synth_open", "synth_closed", "synth_domain"}
    assert set(table["variant"]) == {"cosine_norm", "cosine_raw", "l2_norm", "l2_raw"}
    assert table["auc"].between(0, 1).all()
    assert (table["auc_low"] <= table["auc"]).all() and (table["auc"] <= table["auc_high"]).all()
    index = (project / "reports" / "index.md").read_text()
    assert "## Readings" in index and "synth_domain" in index and "2 seeds (0, 1)" in index
    detection = json.loads((project / "reports" / "detection" / "train.json").read_text())
    assert detection["images"] == 8 * 6
    figures = list((project / "reports" / "figures" / "roc").rglob("*.png"))
    assert {f.name for f in figures} >= {"smallcnn_cosine_norm.png", "smallcnn_l2_raw.png"}
    assert {f.name for f in (project / "reports" / "figures" / "seeds").glob("*.png")} == {
        "synth_open.png", "synth_closed.png", "synth_domain.png"}
    verdicts = pd.read_csv(project / "reports" / "verdicts.csv")
    assert len(verdicts) == 3 * 4  # one pair of models per test set and variant
    summary = json.loads((project / "reports" / "summary.json").read_text())
    assert set(summary["synth_open"]) == {"softmax", "arcface"}
    # fixed thresholds chosen on each run's validation pairs, and the prediction files
    assert set(table["threshold_from"]) == {"validation"} and not table["threshold_on_itself"].any()
    assert table["fixed_accuracy"].between(0, 1).all() and table["fixed_fp"].notna().all()
    for run in RUNS:
        assert (project / "data" / "embeddings" / "validation" / run / "embeddings.npz").is_file()
        for test_set in SETS:
            assert (project / "data" / "scores" / test_set / run / f"{test_set}_{run}_predict.txt").is_file()
    # what the model sees; closed-set identification; angle distributions
    assert (project / "reports" / "figures" / "augmented.png").read_bytes()[:4] == b"\x89PNG"
    closed = table.query("test_set == 'synth_closed'")
    assert closed["n_way_accuracy"].between(0, 1).all()  # both are classifier losses
    assert table.query("test_set != 'synth_closed'")["n_way_accuracy"].isna().all()
    assert "N-way (head)" in index and "## Angle distributions" in index
    assert {f.name for f in (project / "reports" / "figures" / "angles").glob("*.png")} == {"softmax.png",
                                                                                          "arcface.png"}
    assert "Warning: checkpoint chosen on a test set" not in index
    for run in RUNS:
        assert json.loads((project / "reports" / "train" / run / "metrics.json").read_text())["selected_on"] == \
            "validation"
    # outputs are linked from the DVC cache (.dvc/config cache.type), not copied: every stage
    # above wrote through a temporary path, so the linked, read-only files never got in the way
    part = project / "data" / "aligned" / "train" / "part-00000.parquet"
    assert part.is_symlink() or part.stat().st_nlink >= 2
    assert not any((project / "data" / "aligned").rglob(".partial/**/*.parquet"))


def test_report_numbers_equal_a_recomputation_from_the_score_files(project):
    """Per-run AUCs (scikit-learn) and their mean, straight from data/scores/RUN/<set>/<variant>.csv."""
    from sklearn.metrics import roc_auc_score

    table = pd.read_csv(project / "reports" / "comparison.csv")
    runs = pd.read_csv(project / "reports" / "runs.csv")
    for loss in ("softmax", "arcface"):
        for test_set in ("synth_open", "synth_domain"):
            aucs = []
            for seed in (0, 1):
                pairs = pd.read_csv(project / "data" / "scores" / test_set / f"{loss}-{seed}" / "l2_raw.csv")
                pairs = pairs[pairs["status"] == "scored"]
                aucs.append(roc_auc_score(pairs["same"], pairs["score"]))
                run = f"{loss}-{seed}"
                row = runs.query("run == @run and test_set == @test_set and variant == 'l2_raw'")
                assert row["auc"].item() == pytest.approx(aucs[-1], abs=1e-12)
            row = table.query("model == @loss and test_set == @test_set and variant == 'l2_raw'")
            assert row["auc"].item() == pytest.approx(sum(aucs) / 2, abs=1e-12)
            assert row["auc_per_run"].item() == " / ".join(f"{a:.4f}" for a in aucs)


def test_second_repro_runs_nothing(project):
    status = _run(["dvc", "status"], project)
    assert "up to date" in status.stdout
    again = _run(["dvc", "repro"], project)
    assert _ran(again.stdout) == set()


def test_a_failing_stage_leaves_its_previous_outputs_in_place(project):
    """DVC deletes a stage's outputs before running it; when the stage then fails (here: a synthetic
    size the pair sampler cannot meet), the stage puts them back, so nothing already made is lost."""
    before = {p.relative_to(project): p.read_bytes() for p in (project / "data" / "datasets" / "train").rglob("*")
              if p.is_file()}
    params_text = (project / "params.yaml").read_text()
    _set_param(project, "data.synthetic.pairs_per_fold", 9)  # odd: half same, half different is impossible
    result = subprocess.run(["dvc", "repro"], cwd=project, env=_env(), capture_output=True, text=True)
    assert result.returncode != 0
    assert "pairs_per_fold must be even" in result.stderr + result.stdout
    assert "previous outputs are back in place" in result.stderr + result.stdout
    after = {p.relative_to(project): p.read_bytes() for p in (project / "data" / "datasets" / "train").rglob("*")
             if p.is_file()}
    assert after == before
    (project / "params.yaml").write_text(params_text)
    assert "up to date" in _run(["dvc", "status"], project).stdout


def test_dvc_plots_and_metrics_load_without_errors(project):
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], project).stdout)
    assert not shown.get("errors"), shown.get("errors")
    names = set(shown["data"])
    assert {"reports/roc/synth_open/arcface.csv", "reports/roc/synth_domain/softmax.csv",
            "reports/train/arcface-0/history.csv"} <= names
    roc = shown["data"]["reports/roc/synth_open/arcface.csv"][0]["content"]
    assert {"fpr", "tpr"} <= set(roc["data"]["values"][0])
    assert "fpr" in json.dumps(roc["encoding"]["x"]) and "tpr" in json.dumps(roc["encoding"]["y"])
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert "reports/summary.json" in json.dumps(metrics)


def test_killed_anywhere_then_rerun_gives_the_clean_report(project, tmp_path):
    """SIGKILL `dvc repro` at a random point inside each stage in turn, restart, compare."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    crashed = _new_project(tmp_path / "crashed", params)
    wanted = {"data_train", "detect_train", "align_train", "shard_train", "detect@synth_open", "recipes",
              "train@softmax-0", "train@arcface-1", "embed_train", "embed@synth_open", "embed@synth_domain",
              "score@synth_closed", "score@synth_domain", "report"}
    # in the order DVC runs them (a stage that ran before the kill is not run again)
    order = re.findall(r"Running stage '([^']+)'", (project / "first_run.log").read_text())
    stages = [stage for stage in order if stage in wanted]
    rng = random.Random(7)
    killed = []
    for stage in stages:
        if _repro_killed_in(crashed, stage, rng.uniform(0.0, 2.5)):
            killed.append(stage)
            _recover_lock(crashed)
    assert len(killed) >= 6, f"only killed inside {killed}"
    _run(["dvc", "repro"], crashed)
    assert "up to date" in _run(["dvc", "status"], crashed).stdout
    for name in ("comparison.csv", "verdicts.csv", "runs.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(crashed / "reports" / name), pd.read_csv(project / "reports" / name))
    for run in RUNS:
        for test_set in SETS:
            name = f"reports/metrics/{test_set}/{run}.json"
            assert json.loads((crashed / name).read_text()) == json.loads((project / name).read_text())
    # no temporary leftovers anywhere in the outputs
    leftovers = [p for p in (crashed / "data").rglob("*") if ".tmp" in p.name]
    leftovers += [p for p in (crashed / "reports").rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_margin_change_reruns_only_arcface(project):
    _set_param(project, "loss.margin", 0.8)
    result = _run(["dvc", "repro"], project)
    arcface = [r for r in RUNS if r.startswith("arcface")]
    assert _ran(result.stdout) == {"recipes", "report"} | _run_stages(arcface)


def test_recipe_override_retrains_only_that_loss(project):
    """Also: training-time normalisation shows in the label, a checkpoint chosen on a test set warns."""
    _set_param(project, "losses.softmax", {"normalize": True, "train": {"lr": 0.05, "select_on": "synth_closed"}})
    result = _run(["dvc", "repro"], project)
    softmax = [r for r in RUNS if r.startswith("softmax")]
    assert _ran(result.stdout) == {"recipes", "report"} | _run_stages(softmax)
    index = (project / "reports" / "index.md").read_text()
    assert "> **Warning: checkpoint chosen on a test set.** softmax (softmax-0, softmax-1)" in index
    assert index.index("Warning: checkpoint chosen") < index.index("## Readings")  # at the top
    assert "softmax (train-norm) (2 runs)" in index
    assert json.loads((project / "reports" / "train" / "softmax-0" / "metrics.json").read_text())["selected_on"] == \
        "synth_closed"


def test_adding_a_seed_runs_only_its_stages_and_removing_one_only_the_report(project):
    _set_param(project, "seeds.train", [0, 1, 2])
    added = _run(["dvc", "repro"], project)
    new = ["softmax-2", "arcface-2"]
    assert _ran(added.stdout) == {"report"} | _run_stages(new)  # only the new seed's runs train
    assert set(pd.read_csv(project / "reports" / "comparison.csv")["runs"]) == {3}
    _set_param(project, "seeds.train", [0, 2])
    removed = _run(["dvc", "repro"], project)
    assert _ran(removed.stdout) == {"report"}
    runs = pd.read_csv(project / "reports" / "runs.csv")
    assert set(runs["run"]) == {"softmax-0", "softmax-2", "arcface-0", "arcface-2"}


def test_adding_a_test_set_runs_only_its_stages_and_removing_it_only_the_report(project):
    """A new test set: its own data, detect, align and shard stages, and its embed and score stages
    for every run; nothing is retrained and no other set is touched. Removing it reruns the report."""
    _set_param(project, "data.tests.synth_extra", {"kind": "synthetic", "set": "synth_domain"})
    added = _run(["dvc", "repro"], project)
    assert _ran(added.stdout) == _data_stages("synth_extra") | {"embed@synth_extra", "score@synth_extra", "report"}
    table = pd.read_csv(project / "reports" / "comparison.csv")
    assert "synth_extra" in set(table["test_set"])
    # the same faces and pairs as synth_domain, scored by the same runs: the same numbers
    extra = table.query("test_set == 'synth_extra'").set_index(["model", "variant"])["auc"]
    domain = table.query("test_set == 'synth_domain'").set_index(["model", "variant"])["auc"]
    pd.testing.assert_series_equal(extra, domain)
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["data"]["tests"]["synth_extra"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    removed = _run(["dvc", "repro"], project)
    assert _ran(removed.stdout) == {"report"}
    assert "synth_extra" not in set(pd.read_csv(project / "reports" / "comparison.csv")["test_set"])
    assert "up to date" in _run(["dvc", "status"], project).stdout


def test_one_sets_detection_params_touch_only_that_set(project):
    before = (project / "data" / "detect" / "synth_domain" / "detections.parquet").read_bytes()
    _set_param(project, "data.tests.synth_domain.detect", {"scale_factor": 0.75})  # another image pyramid
    result = _run(["dvc", "repro"], project)
    ran = _ran(result.stdout)
    assert {"data@synth_domain", "detect@synth_domain", "report"} <= ran
    allowed = _data_stages("synth_domain") | {"embed@synth_domain", "score@synth_domain", "report"}
    assert ran <= allowed, ran - allowed  # no other set's stages, no training
    changed = (project / "data" / "detect" / "synth_domain" / "detections.parquet").read_bytes() != before
    assert ("align@synth_domain" in ran) == changed  # downstream reruns exactly when the detections changed


def test_scoring_switch_reruns_only_scoring(project):
    _set_param(project, "score.bootstrap", 10)
    result = _run(["dvc", "repro"], project)
    # score.bootstrap changes the per-run intervals in reports/metrics/SET/RUN.json; the per-pair scores
    # stay the same, so no training or embedding reruns; the report reads the whole params file
    assert _ran(result.stdout) == _stages("score") | {"report"}
    assert "up to date" in _run(["dvc", "status"], project).stdout


def test_benchmarks_run_their_own_stages_and_rerun_only_what_changed(project):
    """IJB and distractor miniatures (written by the project, in the released layouts) as benchmarks:
    every run is embedded and evaluated on each and each gets its report; a second repro runs nothing;
    a protocol param the evaluation reads reruns the evaluations, not the embeddings."""
    from pipeline.datasets.ijb_synth import write_distractor_miniature, write_ijb_miniature

    write_ijb_miniature(project / "bench" / "ijb", subjects=6, probe_templates=2, size=96)
    write_distractor_miniature(project / "bench" / "distractors", identities=5, images_per_identity=3,
                               distractors=30)
    runs = ["softmax-0", "softmax-2", "arcface-0", "arcface-2"]
    _set_param(project, "benchmarks", {"ijb": {"kind": "ijb", "path": "bench/ijb"},
                                       "distractors": {"kind": "distractors", "path": "bench/distractors"}})
    _set_param(project, "protocol.n_boot", 50)
    _set_param(project, "protocol.distractor_sizes", [10, 30])
    benches = ("ijb", "distractors")
    result = _run(["dvc", "repro"], project)
    per_run = {f"{kind}@{run}-{bench}" for kind in ("bench_embed", "bench_eval") for run in runs for bench in benches}
    assert _ran(result.stdout) == per_run | {f"bench_report@{bench}" for bench in benches} | {"report"}
    summary = json.loads((project / "reports" / "protocols" / "ijb" / "summary.json").read_text())
    assert "softmax" in json.dumps(summary) and "arcface" in json.dumps(summary)
    assert (project / "reports" / "protocols" / "distractors" / "summary.md").is_file()
    assert _ran(_run(["dvc", "repro"], project).stdout) == set()
    _set_param(project, "protocol.n_boot", 60)
    result = _run(["dvc", "repro"], project)
    assert _ran(result.stdout) == {f"bench_eval@{run}-{bench}" for run in runs for bench in benches} | {
        f"bench_report@{bench}" for bench in benches} | {"report"}


def test_a_facepipe_model_file_outside_the_repository_is_scored_like_its_run(project):
    """Last: a pretrained entry keeps `dvc status` from being "up to date" (its fingerprint stage always runs)."""
    outside = project.parent / "elsewhere" / "model.pt"
    outside.parent.mkdir(exist_ok=True)
    shutil.copy(project / "data" / "models" / "arcface-0" / "model.pt", outside)
    _set_param(project, "pretrained", {"other": {"kind": "facepipe", "path": str(outside)}})
    result = _run(["dvc", "repro"], project)
    assert _ran(result.stdout) == {"pretrained_model@other", "report"} | {
        f"{kind}_pretrained@other-{name}" for kind in ("embed", "score") for name in SETS}
    for test_set in ("synth_open", "synth_domain"):
        mine = pd.read_csv(project / "data" / "scores" / test_set / "arcface-0" / "l2_raw.csv")
        theirs = pd.read_csv(project / "data" / "scores" / "pretrained" / "other" / test_set / "l2_raw.csv")
        pd.testing.assert_series_equal(mine["score"], theirs["score"])
        assert (project / "data" / "scores" / "pretrained" / "other" / test_set / f"{test_set}_other_predict.txt"
                ).is_file()
    table = pd.read_csv(project / "reports" / "comparison.csv")
    assert set(table.query("model == 'other'")["threshold_from"]) == {"synth_open"}  # report.in_domain
    assert _ran(_run(["dvc", "repro"], project).stdout) == {"pretrained_model@other"}  # same file: nothing after it
    with open(outside, "ab") as handle:  # another file at the same path: embedded again
        handle.write(b"\0")
    result = subprocess.run(["dvc", "repro"], cwd=project, env=_env(), capture_output=True, text=True)
    assert "embed_pretrained@other-synth_open" in _ran(result.stdout)


def test_a_params_file_without_pretrained_means_none(tmp_path):
    """`pretrained` may be left out: DVC parses the pipeline (configs/dvc-defaults.yaml) and the
    stages treat it as empty."""
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    del params["pretrained"]
    project = _new_project(tmp_path / "p", params)
    listed = _run(["dvc", "stage", "list"], project).stdout
    assert "pretrained" not in listed and "report" in listed
    assert _run([sys.executable, "-m", "pipeline", "validate"], project).returncode == 0
