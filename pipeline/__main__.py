"""Command line: ``python -m pipeline STAGE`` runs one stage (dvc.yaml calls these).

Every command reads and validates ``params.yaml`` first; a bad value stops it with
one line and exit status 2 before anything is written.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import time as _time

_STARTED = _time.time()  # before any import that takes time: a command's wall time includes its imports

from pipeline import cpu  # noqa: E402

cpu.pin_instruction_set()  # before numpy / cv2 / torch load: same kernels on every x86-64 host

import typer  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.config import ConfigError, Params, load_params  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file to use.")
ProgressOption = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.baselines.dlib_resnet import DlibNotInstalled
    from pipeline.datasets import DatasetError
    from pipeline.embed import ModelFileError
    from pipeline.shards import ShardError
    from pipeline.train import TrainingError

    return DatasetError, ShardError, TrainingError, ModelFileError, DlibNotInstalled, FileNotFoundError


def stage(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr: exit 2 for bad params, 1 otherwise."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.restore import after_failure

        try:
            return func(*args, **kwargs)
        except ConfigError as err:
            typer.echo(f"error: {err}{after_failure()}", err=True)
            raise typer.Exit(2) from None
        except _user_errors() as err:
            typer.echo(f"error: {err}{after_failure()}", err=True)
            raise typer.Exit(1) from None
        except typer.Exit as done:  # e.g. the exit status of a torchrun child
            if done.exit_code:
                after_failure()
            raise
        except BaseException:
            # a crash or Ctrl-C under DVC: put the previous outputs back before the traceback
            after_failure()
            raise

    return wrapper


def _params(path: Path, *, check_models: bool = True) -> Params:
    cpu.thread_count()  # a bad FACEPIPE_THREADS stops here, before any work, like a bad param
    return load_params(path, check_models=check_models)


@app.command()
@stage
def validate(params_file: Path = ParamsOption) -> None:
    """Check params.yaml and exit (status 2 and one line per problem if it is wrong)."""
    params = _params(params_file)
    typer.echo(f"{params_file}: ok ({len(params.train_losses)} losses: {', '.join(params.train_losses)})")


SetArgument = typer.Argument(None, help="A data set: train, or a test set named in data.tests "
                                         "(omit for every set, one after the other).")


def _sets(params: Params, name: str | None) -> list[str]:
    if name is None:
        return params.data_sets
    params.data_spec(name)  # ConfigError naming the configured sets
    return [name]


@app.command()
@stage
def data(name: str = SetArgument, params_file: Path = ParamsOption, progress: bool = ProgressOption) -> None:
    """Resolve one configured data set (synthetic faces generated, .bin faces unpacked) into index tables."""
    from pipeline.data import run_data

    params = _params(params_file, check_models=False)
    for set_name in _sets(params, name):
        image_set = run_data(params, set_name, progress=progress)
        pairs = "" if image_set.pairs is None else f", {len(image_set.pairs)} pairs"
        pairs += "" if image_set.labelled else " without labels (predicted only)"
        typer.echo(f"{set_name}: {len(image_set.images)} images of {len(image_set.identities)} identities{pairs}")


@app.command()
@stage
def detect(name: str = SetArgument, params_file: Path = ParamsOption, progress: bool = ProgressOption) -> None:
    """Detect one face (MTCNN, 5 landmarks) per image of a data set; count what is dropped."""
    from pipeline.data import read_index, read_precropped
    from pipeline.detect import plan_detect, run_detect

    params = _params(params_file, check_models=False)
    for set_name in _sets(params, name):
        detect_params = params.detect_for(set_name)
        plan = plan_detect(detect_params)  # detect.device: cuda without a GPU stops here, before any reading
        precropped = read_precropped(set_name) is not None
        c = run_detect(detect_params, set_name, read_index(set_name).images, paths.detect_dir(set_name),
                       paths.detection_counts(set_name), progress=progress, plan=plan, precropped=precropped)
        kept = "pre-cropped images, not detected" if c.get("precropped") else "faces"
        typer.echo(f"{set_name}: {c['images']} -> {c['faces']} {kept} ({c['dropped']} dropped)")


@app.command()
@stage
def align(name: str = SetArgument, params_file: Path = ParamsOption, progress: bool = ProgressOption) -> None:
    """Warp every detected face of a data set onto the 5-point ArcFace template; write its contact sheet."""
    from pipeline.align import Crop, run_align
    from pipeline.data import read_precropped
    from pipeline.detect import read_detections

    params = _params(params_file, check_models=False)
    for set_name in _sets(params, name):
        crop = read_precropped(set_name)
        s = run_align(params.align, set_name, read_detections(paths.detect_dir(set_name)),
                      paths.aligned_dir(set_name), paths.contact_sheet(set_name), paths.alignment_stats(set_name),
                      seed=params.seeds.data, progress=progress, crop=None if crop is None else Crop(*crop))
        if s.get("precropped"):
            typer.echo(f"{set_name}: {s['aligned']} pre-cropped faces resized ({s['crop']}) to {s['output_size']} px")
        else:
            typer.echo(f"{set_name}: {s['aligned']} aligned, mean landmark residual {s['residual_mean_px'] or 0:.2f} px")


@app.command()
@stage
def shard(name: str = SetArgument, params_file: Path = ParamsOption, progress: bool = ProgressOption) -> None:
    """Pack the aligned faces of a data set into Parquet / WebDataset shards with a manifest."""
    from pipeline.data import read_index
    from pipeline.shards import run_shard

    params = _params(params_file, check_models=False)
    for set_name in _sets(params, name):
        pairs = _pairs_with_paths(read_index(set_name))
        m = run_shard(params.shard, set_name, paths.aligned_dir(set_name), pairs, paths.shards_dir(set_name),
                      progress=progress)
        typer.echo(f"{set_name}: {m['images']} images, {m['identities']} identities, {len(m['files'])} shard file(s)")


def _pairs_with_paths(image_set):
    """The set's pairs with the source path of both images (so score files name the files)."""
    if image_set.pairs is None:
        return None
    where = dict(zip(image_set.images["image_id"], image_set.images["path"]))
    pairs = image_set.pairs.copy()
    pairs["path1"] = pairs["image_id1"].map(where)
    pairs["path2"] = pairs["image_id2"].map(where)
    return pairs


@app.command()
@stage
def recipes(params_file: Path = ParamsOption) -> None:
    """Resolve each loss's training recipe (its params, train with its overrides, model) into data/recipes/."""
    from pipeline.recipes import run_recipes

    for loss, path in run_recipes(_params(params_file), paths.RECIPES).items():
        typer.echo(f"{loss}: {path}")


@app.command("augment-preview")
@stage
def augment_preview(params_file: Path = ParamsOption) -> None:
    """Contact sheet of augmented training faces (what the model sees) for train.augment."""
    from pipeline.augment import write_preview

    params = _params(params_file, check_models=False)
    target = write_preview(params.train.augment, paths.shards_dir("train"), paths.AUGMENT_PREVIEW,
                           grayscale_model=params.model.grayscale)
    typer.echo(f"wrote {target}")


SeedOption = typer.Option(None, "--seed", "-s", help="Training seed of the run (one of seeds.train); "
                                                     "omit for a pretrained model.")


@app.command()
@stage
def train(loss: str = typer.Argument(..., help="A loss in train_losses (its recipe is data/recipes/LOSS.json)."),
          seed: int = typer.Option(..., "--seed", "-s", help="Training seed: initialisation, sampling order, "
                                                             "augmentation."),
          progress: bool = ProgressOption,
          shards: str = typer.Option(str(paths.SHARDS), "--shards",
                                     help="Shards to train on: a directory or a URL (https://, s3://, file://) "
                                          "holding train/manifest.json, e.g. the shard stage's output copied "
                                          "to object storage.")) -> None:
    """Train the run LOSS-SEED (checkpoints every epoch; resumes after a crash).

    Reads only the loss's recipe (written by the recipes stage) and the shards.
    Set FACEPIPE_NPROC=N to train with N processes (torchrun + DistributedDataParallel:
    NCCL on GPUs, gloo on CPU); the global batch stays train.batch_size.
    """
    from pipeline.config import run_name
    from pipeline.recipes import read_recipe

    cpu.thread_count()  # a bad FACEPIPE_THREADS stops here, before any work
    if seed < 0:
        raise ConfigError(f"--seed {seed}: training seeds are >= 0")
    recipe_path = paths.recipe_file(loss)
    recipe = read_recipe(recipe_path)
    nproc = int(os.environ.get("FACEPIPE_NPROC", "1") or 1)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "pipeline", "train", loss, "--seed", str(seed), "--shards", shards,
                   "--progress" if progress else "--no-progress"]
        raise typer.Exit(subprocess.call(command))
    from pipeline.train import TrainSetup
    from pipeline.train import train as run_train

    run = run_name(loss, seed)
    setup = TrainSetup.from_recipe(recipe, seed)
    metrics = run_train(setup, shards, paths.model_dir(run), paths.checkpoint_dir(run),
                        paths.train_report_dir(run), progress=progress)
    if metrics:  # empty on ranks other than 0 of a distributed run
        typer.echo(f"{run}: best epoch {metrics['best_epoch']} with validation AUC {metrics['best_val_auc']:.4f}")


def _run_of(params: Params, model: str, seed: int | None) -> str:
    from pipeline.config import run_name

    run = model if seed is None else run_name(model, seed)
    params.check_run(run)
    return run


TestSetOption = typer.Option(..., "--set", help="A test set named in data.tests.")


def _test_set(params: Params, name: str) -> str:
    if name not in params.data.tests:
        raise ConfigError(f"--set {name}: not a test set of data.tests ({', '.join(params.data.tests)})")
    return name


@app.command()
@stage
def embed(test_set: str = TestSetOption, params_file: Path = ParamsOption) -> None:
    """Embed one test set with every trained run (raw vectors, optional flip fusion) into data/embeddings/SET/RUN."""
    from pipeline.embed import run_embed_set

    params = _params(params_file)
    name = _test_set(params, test_set)
    models = {run: paths.model_dir(run) / "model.pt" for loss in params.train_losses for run in params.runs[loss]}
    run_embed_set(params.embed, models, paths.shards_dir(name), paths.EMBEDDINGS / name, name=name)


@app.command("embed-train")
@stage
def embed_train(params_file: Path = ParamsOption) -> None:
    """Embed every trained run's validation pairs (the trainer's split, rebuilt from data/recipes/LOSS.json and the
    train shards) and the angle distributions of its training faces."""
    from pipeline.embed import run_embed_train_all
    from pipeline.recipes import read_recipe

    params = _params(params_file)
    runs = {run: (paths.model_dir(run) / "model.pt", read_recipe(paths.recipe_file(loss)))
            for loss in params.train_losses for run in params.runs[loss]}
    run_embed_train_all(params.embed, runs, paths.shards_dir("train"), paths.EMBEDDINGS / paths.VALIDATION,
                        paths.EMBEDDINGS / paths.TRAIN_ANGLES)


@app.command("pretrained-model")
@stage
def pretrained_model(name: str = typer.Argument(..., help="A model named in params.yaml pretrained."),
                     params_file: Path = ParamsOption) -> None:
    """Fingerprint the model file(s) of a pretrained entry (SHA-256) into data/pretrained/NAME.json."""
    from pipeline.pretrained import run_fingerprint

    params = _params(params_file, check_models=False)
    record = run_fingerprint(params, name, paths.pretrained_fingerprint(name))
    for role, info in record["files"].items():
        typer.echo(f"{name} ({record['kind']}) {role}: {info['path']} sha256 {info['sha256'][:16]}… "
                   f"({info['bytes']} bytes)")


@app.command("embed-pretrained")
@stage
def embed_pretrained(name: str = typer.Argument(..., help="A model named in params.yaml pretrained."),
                     test_set: str = TestSetOption, params_file: Path = ParamsOption,
                     progress: bool = ProgressOption) -> None:
    """Embed one test set with an off-the-shelf model: dlib's ResNet from the original images, or a facepipe
    model.pt from elsewhere (kind facepipe) from the shards, like a trained run."""
    from pipeline.embed import run_embed_pretrained

    params = _params(params_file)
    if name not in params.pretrained:
        raise ConfigError(f"{params_file}: pretrained.{name} is not configured")
    set_name = _test_set(params, test_set)
    run_embed_pretrained(name, params.pretrained[name], set_name, paths.detect_dir(set_name),
                         paths.shards_dir(set_name), paths.set_embeddings(name, set_name, pretrained=True),
                         progress=progress, embed=params.embed)


@app.command()
@stage
def score(model: str = typer.Argument(None, help="A pretrained model (omit: every trained run)."),
          test_set: str = TestSetOption, params_file: Path = ParamsOption) -> None:
    """Score one test set: distance x test-time normalisation for every trained run (or one pretrained model);
    per-pair files, metrics, the fixed thresholds (score.threshold) and the prediction files of the primary
    variant."""
    from pipeline.score import run_score, run_score_set, threshold_source

    params = _params(params_file, check_models=False)  # no PyTorch: scoring starts in a fraction of the time
    name = _test_set(params, test_set)
    if model is None:
        run_score_set(params, name)
        return
    if model not in params.pretrained:
        raise ConfigError(f"{model}: not a pretrained model of params.yaml; trained runs are scored together: "
                          f"python -m pipeline score --set {name}")
    run_score(params.score, name, paths.set_embeddings(model, name, pretrained=True),
              threshold_source(params, model, model), paths.set_scores(model, name, pretrained=True),
              paths.metrics_file(model, name, pretrained=True), seed=params.seeds.data, run=model,
              primary=(params.report.primary_distance, params.report.primary_normalize))


@app.command()
@stage
def predict(model: Path = typer.Option(..., "--model", "-m", help="A model.pt saved by the trainer."),
            pairs: Path = typer.Option(..., "--pairs", help="A pairs CSV: path1,path2[,same][,fold]; relative "
                                                             "paths against its folder (or --root)."),
            threshold: str = typer.Option(None, "--threshold", "-t",
                                          help="cosine: same iff similarity > T; l2: T is a distance, same iff "
                                               "distance < T (negative refused). Or a run's "
                                               "data/scores/SET/RUN/thresholds.json (score thresholds: minus distances "
                                               "for l2). Default: the threshold stored in the model file "
                                               "(trainer-saved models have none: then required)."),
            distance: str = typer.Option(None, "--distance", help="cosine | l2 (default: report.primary_distance "
                                                                   "of --params, else cosine)."),
            norm: bool = typer.Option(None, "--norm/--no-norm", help="L2-normalise the embeddings before scoring "
                                                                     "(default: report.primary_normalize, else "
                                                                     "--norm)."),
            precropped: bool = typer.Option(False, "--precropped", help="The images are face crops: no detection, "
                                                                        "no warp; resized like a precropped set."),
            crop: str = typer.Option(None, "--crop", help="With --precropped: resize (whole image, default) | center "
                                                          "(central square, then resize)."),
            crop_fraction: float = typer.Option(None, "--crop-fraction", help="With --crop center: side of the "
                                                                              "square / shorter side (default 1)."),
            out: Path = typer.Option(None, "--out", "-o", help="Prediction file to write (default: "
                                                              "<pairs stem>_<model>_predict.txt here); the rejected "
                                                              "images go to <its stem>_rejects.csv beside it."),
            root: Path = typer.Option(None, "--root", help="Folder the pairs file's relative paths start from."),
            params_file: Path = typer.Option(Path("params.yaml"), "--params", "-p",
                                             help="Detection, alignment, embedding and scoring settings (defaults "
                                                  "when the file does not exist)."),
            device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
            progress: bool = typer.Option(False, "--progress/--no-progress", help="Show progress bars.")) -> None:
    """Verify the pairs of one file with a saved model, outside the DVC graph: detect (or take pre-cropped faces),
    align, embed, score, decide at a threshold; writes a prediction file (path1, path2, score, decision, same) and
    a rejects file. Exit status 0 when every pair was decided, 3 when some could not be (see the rejects file)."""
    from pipeline.predict import EXIT_NOT_ALL_DECIDED, crop_of
    from pipeline.predict import predict as run_predict

    cpu.thread_count()  # a bad FACEPIPE_THREADS stops here, before any work
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    summary = run_predict(model, pairs, threshold=threshold, out=out, root=root, params_path=params_file,
                          device=device, progress=progress, distance=distance, normalize=norm,
                          crop=crop_of(precropped, crop, crop_fraction))
    if summary["not_decided"]:
        typer.echo(f"predict: {summary['not_decided']} of {summary['pairs']} pairs not decided (exit status "
                   f"{EXIT_NOT_ALL_DECIDED}); the reasons are in {summary['rejects']}", err=True)
        raise typer.Exit(EXIT_NOT_ALL_DECIDED)


@app.command()
@stage
def export(fmt: str = typer.Argument(..., help="rec (any set) or bin (a test set's pairs)."),
           source: Path = typer.Argument(..., help="A set's shards folder, e.g. data/shards/train."),
           out: Path = typer.Argument(..., help="rec: the folder for train.rec/.idx/property; bin: the .bin file.")
           ) -> None:
    """Write a sharded set in the insightface formats (RecordIO training folder, or .bin pairs)."""
    from pipeline.export import run_export

    typer.echo(run_export(fmt, source, out))


BenchOption = typer.Option(..., "--bench", help="A benchmark named in params.yaml benchmarks.")


def _bench(params: Params, name: str):
    if name not in params.benchmarks:
        raise ConfigError(f"--bench {name}: not a benchmark of params.yaml benchmarks "
                          f"({', '.join(params.benchmarks) or 'none configured'})")
    return params.benchmarks[name]


@app.command("bench-embed")
@stage
def bench_embed(model: str = typer.Argument(..., help="A loss in train_losses."), seed: int = SeedOption,
                bench: str = BenchOption, params_file: Path = ParamsOption,
                progress: bool = ProgressOption) -> None:
    """Embed every image of a benchmark (IJB: aligned with its landmarks; distractors: probes and
    distractors) with the model of run LOSS-SEED into data/protocols/BENCH/RUN/features."""
    from pipeline.protocols.stages import run_distractor_embed, run_ijb_embed

    params = _params(params_file)
    run = _run_of(params, model, seed)
    spec = _bench(params, bench)
    embed = run_ijb_embed if spec.kind == "ijb" else run_distractor_embed
    info = embed(paths.model_dir(run) / "model.pt", spec.path, paths.protocol_dir(bench, run) / "features",
                 params.protocol_params(), device=params.embed.device if params.embed.device != "auto" else "cpu",
                 progress=progress)
    typer.echo(f"{bench} ({spec.kind}) with {run}: {json.dumps(info)}")


@app.command("bench-eval")
@stage
def bench_eval(model: str = typer.Argument(..., help="A loss in train_losses."), seed: int = SeedOption,
               bench: str = BenchOption, params_file: Path = ParamsOption, progress: bool = ProgressOption) -> None:
    """Evaluate run LOSS-SEED on a benchmark from its features: IJB 1:1 (ROC, TPR@FPR) and 1:N (CMC, TPIR);
    distractors: rank-1 and CMC as the gallery grows; with the subject resamples of the intervals."""
    from pipeline.protocols.stages import run_distractor_eval, run_ijb_eval

    params = _params(params_file, check_models=False)
    run = _run_of(params, model, seed)
    spec = _bench(params, bench)
    evaluate = run_ijb_eval if spec.kind == "ijb" else run_distractor_eval
    folder = paths.protocol_dir(bench, run)
    metrics = evaluate(folder / "features", spec.path, folder / "eval", params.protocol_params(), progress=progress)
    typer.echo(f"{bench} ({spec.kind}) with {run}: {json.dumps(metrics.get('values', metrics), default=str)[:400]}")


@app.command("bench-report")
@stage
def bench_report(bench: str = typer.Argument(..., help="A benchmark named in params.yaml benchmarks."),
                 params_file: Path = ParamsOption) -> None:
    """Every model's intervals over its runs and the benchmark's subjects, and paired Holm verdicts, into
    reports/protocols/BENCH (summary.md, summary.json)."""
    from pipeline.protocols.stages import summarise

    params = _params(params_file, check_models=False)
    _bench(params, bench)
    runs = {loss: [paths.protocol_dir(bench, run) / "eval" for run in params.runs[loss]]
            for loss in params.train_losses}
    spec = params.benchmarks[bench]
    summarise(runs, paths.protocol_report(bench), params.protocol_params(),
              title=f"Benchmark {bench} ({spec.kind}: {spec.path})")
    typer.echo(f"wrote {paths.protocol_report(bench) / 'summary.md'}")


@app.command()
@stage
def miniature(kind: str = typer.Argument(..., help="insightface, ijb or distractors."),
              out: Path = typer.Argument(..., help="Folder to write it in, e.g. data/miniature/insightface."),
              seed: int = typer.Option(0, "--seed", help="Seed of the synthetic faces.")) -> None:
    """Write a small synthetic data set in a layout of the field (from the built-in synthetic faces), to try
    the pipeline's readers end to end: insightface (a .rec training set and three .bin benchmarks, for
    configs/insightface-synth.yaml), ijb (an IJB-C-shaped release folder) or distractors (MegaFace-style probes
    and distractors), for configs/benchmarks-synth.yaml."""
    if kind == "insightface":
        from pipeline.datasets.insightface_synth import write_miniature

        for name, count in write_miniature(out, seed=seed).items():
            typer.echo(f"{name}: {count} {'images' if name == 'train' else 'pairs'}")
    elif kind == "ijb":
        from pipeline.datasets.ijb_synth import write_ijb_miniature

        truth = write_ijb_miniature(out, seed=seed, subjects=24, probe_templates=2)
        typer.echo(f"ijb: {len(truth.images)} images of {len(truth.template_subject)} templates, "
                   f"{len(truth.pairs)} template pairs in {out}")
    elif kind == "distractors":
        from pipeline.datasets.ijb_synth import write_distractor_miniature

        truth = write_distractor_miniature(out, seed=seed, identities=20, images_per_identity=4, distractors=400)
        typer.echo(f"distractors: {len(truth.probes)} probe images of {len(set(truth.identities))} identities, "
                   f"{len(truth.distractors)} distractors in {out}")
    else:
        raise ConfigError(f"miniature {kind!r}: unknown kind; expected insightface, ijb or distractors")


@app.command()
@stage
def report(params_file: Path = ParamsOption) -> None:
    """Regenerate reports/: comparison tables, ROC figures, cross-domain and detection tables."""
    from pipeline.report import run_report

    written = run_report(_params(params_file, check_models=False))
    for path in written:
        typer.echo(f"wrote {path}")


grid_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Grids of experiments: one DVC experiment per cell, one report across them.")
app.add_typer(grid_app, name="grid")
GridFile = typer.Argument(..., help="A grid file, e.g. configs/grids/arcface-margins.yaml.")
GridOut = typer.Option(Path("reports/experiments"), "--out", help="Where the grid's report folder goes.")


def _grid(func: Callable[..., Any]) -> Callable[..., Any]:
    """Grid commands: a bad grid file or a failing DVC call is one line and exit 2 / 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.grid import GridError

        try:
            return func(*args, **kwargs)
        except GridError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@grid_app.command("run")
@_grid
def grid_run(grid_file: Path = GridFile, jobs: int = typer.Option(1, "--jobs", "-j", help="Cells run side by side."),
             out: Path = GridOut,
             retry_failed: bool = typer.Option(False, "--retry-failed", help="Queue again the cells that failed "
                                               "on their current inputs (else they are reported, not rerun).")) -> None:
    """Queue every cell without a current experiment (dvc exp run --queue), run the queue, write the report."""
    from pipeline.grid import build_report, load_grid, run_grid

    grid = load_grid(grid_file)
    states = run_grid(grid, Path.cwd(), jobs=jobs, retry_failed=retry_failed, out_root=out, echo=typer.echo)
    failed = [s for s in states if s.status == "failed"]
    for state in failed:
        typer.echo(f"cell {state.cell.name} failed: {state.error}", err=True)
    if any(s.rev for s in states) or not failed:  # with no finished cell, build_report says so
        build_report(grid, Path.cwd(), out, states=states, echo=typer.echo)
    if failed:
        typer.echo(f"error: {len(failed)} of {len(states)} cells failed (errors above); fix the cause and run "
                   f"`python -m pipeline grid run {grid_file} --retry-failed`", err=True)
        raise typer.Exit(1)


@grid_app.command("report")
@_grid
def grid_report(grid_file: Path = GridFile, out: Path = GridOut) -> None:
    """Build the grid's report from its finished experiments (reads DVC; never trains)."""
    from pipeline.grid import build_report, load_grid

    build_report(load_grid(grid_file), Path.cwd(), out, echo=typer.echo)


DvcRemote = typer.Option(None, "--dvc-remote", help="DVC remote for the experiments' data "
                                                   "(default: the default DVC remote).")


@grid_app.command("commands")
@_grid
def grid_commands(grid_file: Path = GridFile,
                  remote: str = typer.Option("origin", "--remote", help="Git remote the experiments are pushed to."),
                  dvc_remote: str = DvcRemote) -> None:
    """Print one shell line per cell (dvc exp run --temp, then dvc exp push with the data), e.g. for a job array."""
    from pipeline.grid import cluster_commands, load_grid

    for line in cluster_commands(load_grid(grid_file), Path.cwd(), remote, dvc_remote):
        typer.echo(line)


@grid_app.command("pull")
@_grid
def grid_pull(grid_file: Path = GridFile, remote: str = typer.Option("origin", "--remote"),
              dvc_remote: str = DvcRemote) -> None:
    """Fetch the grid's experiments (git refs and DVC data) from a shared remote (dvc exp pull)."""
    from pipeline.grid import load_grid, pull

    pull(load_grid(grid_file), Path.cwd(), remote, dvc_remote, echo=typer.echo)


#: Options whose value is a path (made absolute before moving to the project root).
PATH_OPTIONS = {"--params", "-p", "--pairs", "--model", "-m", "--out", "-o", "--root", "--shards"}


def project_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding dvc.yaml and params.yaml, or None."""
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return None


def _from_project_root(argv: list[str]) -> list[str]:
    """Run from the project root when started in a folder inside it (the stages read and write
    paths relative to the root): the arguments that name files are made absolute first."""
    here = Path.cwd()
    root = project_root(here)
    if root is None or root == here:
        return argv
    out = []
    for k, arg in enumerate(argv):
        after_path_option = k > 0 and argv[k - 1] in PATH_OPTIONS and "://" not in arg and not arg.startswith("pipe:")
        if after_path_option or (not arg.startswith("-") and (here / arg).exists()):
            arg = str((here / arg).resolve())
        out.append(arg)
    os.chdir(root)
    return out


@app.command()
@stage
def claims(reports: Path = typer.Option(Path("reports"), "--reports", help="The reports folder to read."),
           out: Path = typer.Option(None, "--out", help="Where to write (default REPORTS/claims.md).")) -> None:
    """The studies' claims as a scoreboard (reports/claims.md), computed from the committed reports."""
    from pipeline.claims import run_claims

    for row in run_claims(reports, out):
        typer.echo(f"{row.claim.key}: {row.verdict}")


tune_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Each loss's recipe from its tuning grid, selected on validation pairs only.")
app.add_typer(tune_app, name="tune")


@tune_app.command("select")
@_grid
def tune_select(grids: list[Path] = typer.Argument(..., help="Tuning grid files, e.g. configs/grids/tune-*.yaml."),
                out: Path = typer.Option(Path("reports/experiments/tuning"), "--out", help="Report folder."),
                apply: bool = typer.Option(False, "--apply", help="Write each selected recipe into params.yaml.")
                ) -> None:
    """Judge every configuration of each loss's tuning grid on its validation pairs, select one recipe per
    loss by the same rule for all, write the tuning report (and, with --apply, the recipes into params.yaml)."""
    from pipeline.tuning import run_select

    run_select(grids, Path.cwd(), out, apply_to=Path("params.yaml") if apply else None, echo=typer.echo)


def main() -> None:
    sys.argv[1:] = _from_project_root(sys.argv[1:])
    log = os.environ.get("FACEPIPE_STAGE_TIMES")
    if not log:
        app()
        return
    # bench/bench_default_run.py: one JSON line per command (its wall time, from the interpreter's start)
    import time

    status = 0
    try:
        app()
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else 1
        raise
    finally:
        with open(log, "a") as handle:
            handle.write(json.dumps({"command": sys.argv[1:], "seconds": round(time.time() - _STARTED, 3),
                                     "status": status}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
