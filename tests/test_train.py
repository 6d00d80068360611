"""Training: the split, the schedule, a real short run, resume after SIGKILL, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import ModelParams, ShardParams, TrainParams
from pipeline import train as train_module
from pipeline.shards import read_shards, write_set
from pipeline.train import (BatchPrefetcher, TrainingError, TrainSetup, batch_source, load_model, lr_at,
                            split_train_val, train, validation_pairs)
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


def test_split_keeps_identities_and_fraction():
    labels = np.repeat(np.arange(5), [10, 10, 3, 2, 20])
    tr, va = split_train_val(labels, 0.2, seed=0)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == len(labels)
    for label, n in zip(range(5), [10, 10, 3, 2, 20]):
        n_val = int(np.isin(va, np.flatnonzero(labels == label)).sum())
        assert n_val == {10: 2, 3: 1, 2: 0, 20: 4}[n]
    again_tr, _ = split_train_val(labels, 0.2, seed=0)
    assert np.array_equal(tr, again_tr)


def test_validation_pairs_balanced():
    labels = np.repeat(np.arange(6), 3)
    pairs = validation_pairs(labels, seed=0)
    same = pairs[:, 2] == 1
    assert same.sum() == 6 * 3 and (~same).sum() == same.sum()
    assert (labels[pairs[same, 0]] == labels[pairs[same, 1]]).all()
    assert (labels[pairs[~same, 0]] != labels[pairs[~same, 1]]).all()


def test_lr_schedule():
    params = TrainParams(lr=0.1, warmup_epochs=1, schedule="cosine")
    assert lr_at(0, 100, 10, params) == pytest.approx(0.01)
    assert lr_at(9, 100, 10, params) == pytest.approx(0.1)
    assert lr_at(99, 100, 10, params) < 0.001
    step = TrainParams(lr=0.1, warmup_epochs=0, schedule="step", milestones=[2, 4], gamma=0.1)
    assert [round(lr_at(e * 10, 60, 10, step), 6) for e in range(6)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def _shards(root: Path, n_ids: int = 6, per: int = 8) -> Path:
    """Tiny shards whose identities differ in colour and stripe pattern (learnable)."""
    aligned = root / "aligned"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_ids):
        base = rng.integers(40, 215, 3)
        for k in range(per):
            img = np.clip(base + rng.normal(0, 25, (112, 112, 3)), 0, 255).astype(np.uint8)
            img[:, (i * 15) % 100 : (i * 15) % 100 + 8] = 255
            name = f"id{i}/{k}.jpg"
            write_image(aligned / name, img, quality=95)
            rows.append({"image_id": name, "identity": f"id{i}", "source_path": name, "file": name,
                         "residual": 0.0, "error": ""})
    pd.DataFrame(rows).to_csv(aligned / "_index.csv", index=False)
    write_set(aligned, root / "shards" / "train", ShardParams(), None, progress=False)
    return root / "shards"


def _setup(loss="arcface", **train_overrides) -> TrainSetup:
    train_params = dict(epochs=3, batch_size=8, warmup_epochs=0, lr=0.05, val_fraction=0.25)
    train_params.update(train_overrides)
    params = {"scale": 16.0, "margin": 0.3} if loss == "arcface" else {}
    return TrainSetup(loss_name=loss, loss_params=params, model=ModelParams(embedding_size=16),
                      train=TrainParams(**train_params), seed=3, image_size=112)


def test_short_run_learns_and_saves(tmp_path, capsys):
    shards = _shards(tmp_path)
    metrics = train(_setup(), shards, tmp_path / "model", tmp_path / "ckpt", tmp_path / "report", progress=False)
    assert capsys.readouterr().out.startswith("[arcface] device cpu (")  # what computes, said first
    history = pd.read_csv(tmp_path / "report" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert metrics["best_val_auc"] == pytest.approx(history["val_auc"].max())
    model, saved = load_model(tmp_path / "model" / "model.pt")
    assert saved["epoch"] == metrics["best_epoch"]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 16)
    timing = json.loads((tmp_path / "report" / "timing.json").read_text())
    assert timing["precision"] == "float32" and timing["global_batch"] == timing["batch_per_process"] == 8
    # the embed stage says where it computes too
    import shutil

    from pipeline.config import EmbedParams
    from pipeline.embed import run_embed

    shutil.copytree(shards / "train", tmp_path / "tests" / "probe")
    (tmp_path / "tests" / "probe" / "pairs.csv").write_text("")
    run_embed(EmbedParams(flip=False), tmp_path / "model" / "model.pt", tmp_path / "tests" / "probe", tmp_path / "emb",
              name="probe")
    assert capsys.readouterr().out.startswith("embed: device cpu (")


def test_sphereface_run_ends_at_lambda_min_and_reports_it(tmp_path):
    """The trainer tells the loss the run length, so the default (fraction) schedule reaches
    lambda_min by the end of even a short run, and metrics.json records the lambda reached."""
    shards = _shards(tmp_path)
    metrics = train(_setup("sphereface", epochs=2), shards, tmp_path / "model", tmp_path / "ckpt", tmp_path / "report",
                    progress=False)
    assert 0 < metrics["steps"] < 100  # the caffe schedule would still be at 1000 / (1 + 0.12 * steps) > 75
    assert metrics["loss_state"] == {"lambda": 5.0}
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["loss_state"] == {"lambda": 5.0}
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)["criterion"]
    assert int(saved["total_steps"]) == int(saved["iteration"]) == metrics["steps"]


@pytest.mark.parametrize("mode", ["upfront", "per_batch"])
@pytest.mark.parametrize("depth", [1, 3, 50])
def test_prefetched_batches_hold_the_right_images_in_order(tmp_path, mode, depth):
    data = read_shards(_shards(tmp_path, n_ids=5, per=7) / "train")
    decoded = data.decode_all()
    records = np.random.default_rng(1).permutation(len(data))[:30]  # training positions -> records
    labels = torch.from_numpy(data.labels[records])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randperm(30, generator=g)[:b], torch.rand(b, generator=g) < 0.5) for b in (8, 8, 5, 8, 1)]
    chosen, fill = batch_source(data, mode)
    assert chosen == mode
    loader = BatchPrefetcher(fill, data.image_shape(), records, labels, batches, workers=3, depth=depth, chunk=3)
    seen = list(loader)
    assert len(seen) == len(loader) == 5
    for (images, got_labels, flips), (positions, want_flips) in zip(seen, batches):
        np.testing.assert_array_equal(images.numpy(), decoded[records[positions.numpy()]])
        assert torch.equal(got_labels, labels[positions]) and torch.equal(flips, want_flips)
    assert loader.wait_seconds >= 0


def test_auto_decodes_upfront_only_when_the_set_fits(tmp_path, monkeypatch):
    data = read_shards(_shards(tmp_path, n_ids=3, per=4) / "train")
    decoded_bytes = len(data) * 112 * 112 * 3
    from pipeline.training import data as data_module

    monkeypatch.setattr(data_module, "_available_memory", lambda: 4 * decoded_bytes)
    assert batch_source(data, "auto")[0] == "upfront"
    assert batch_source(data, "auto", processes_per_machine=2)[0] == "per_batch"  # each rank holds a copy
    monkeypatch.setattr(data_module, "_available_memory", lambda: 4 * decoded_bytes - 4)
    assert batch_source(data, "auto")[0] == "per_batch"
    with pytest.raises(ValueError, match="train.decode = 'lazy'"):
        batch_source(data, "lazy")


def test_per_batch_decoding_trains_the_same_model_as_decoding_upfront(tmp_path):
    shards = _shards(tmp_path)
    results = {}
    for mode in ("upfront", "per_batch"):
        out = tmp_path / mode
        metrics = train(_setup(decode=mode, workers=2), shards, out / "model", out / "ckpt", out / "report",
                        progress=False)
        timing = json.loads((out / "report" / "timing.json").read_text())
        assert timing["input"] == mode
        weights = torch.load(out / "model" / "model.pt", weights_only=False)["model"]
        results[mode] = (metrics, weights)
    assert results["upfront"][0] == results["per_batch"][0]
    for name, tensor in results["upfront"][1].items():
        assert torch.equal(tensor, results["per_batch"][1][name]), name


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    shards = _shards(tmp_path)
    with pytest.raises(TrainingError) as err:
        train(_setup(lr=1e30), shards, tmp_path / "model", tmp_path / "ckpt", tmp_path / "report", progress=False)
    message = str(err.value)
    assert "arcface" in message and "step" in message and "margin" in message


def _project(tmp_path: Path, epochs: int, *, model: dict | None = None, train: dict | None = None) -> Path:
    project = tmp_path / f"project{epochs}"
    (project / "data").mkdir(parents=True)
    _shards(project / "data")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=epochs, batch_size=8, warmup_epochs=0, lr=0.05, val_fraction=0.25, **(train or {}))
    params["model"].update(embedding_size=16, **(model or {}))
    params["align"]["size"] = 112  # the size of the faces _shards writes (the default run uses 64)
    params["loss"].update(scale=16.0, margin=0.3)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _write_recipes(project)
    return project


def _write_recipes(project: Path) -> None:
    """What the recipes stage writes, which is all the train command reads besides the shards."""
    from pipeline.config import load_params
    from pipeline.recipes import run_recipes

    run_recipes(load_params(project / "params.yaml", check_paths=False), project / "data" / "recipes")


def _train_cli(project: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "arcface", "--seed", "0", "--no-progress"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("augment", [None, {"crop_area": [0.7, 1.0], "brightness": 0.3, "grayscale": 0.3}],
                         ids=["flip-only", "augmented"])
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, augment):
    epochs = 4
    setting = {"train": {"augment": augment}} if augment else {}
    clean = _project(tmp_path / "clean", epochs, **setting)
    assert _train_cli(clean).wait(timeout=600) == 0

    crashed = _project(tmp_path / "crashed", epochs, **setting)
    proc = _train_cli(crashed)
    checkpoint = crashed / "data" / "checkpoints" / "arcface-0" / "last.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # mid-epoch 3
    proc.wait()
    resumed = _train_cli(crashed)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming from" in out

    def history(project):
        return pd.read_csv(project / "reports" / "train" / "arcface-0" / "history.csv")

    pd.testing.assert_frame_equal(history(clean), history(crashed), check_exact=False, rtol=1e-5)
    a = json.loads((clean / "reports" / "train" / "arcface-0" / "metrics.json").read_text())
    b = json.loads((crashed / "reports" / "train" / "arcface-0" / "metrics.json").read_text())
    assert a == b


def test_two_gloo_processes_match_one(tmp_path):
    """FACEPIPE_NPROC=2 (torchrun, DDP over gloo) equals one process with the same global batch.

    BatchNorm is the one thing that cannot match on CPU (each rank normalises over its
    own half batch; SyncBatchNorm needs a GPU), so the backbone is frozen (BN in eval
    mode) and the head has no BN: what is left is exactly the data split across ranks,
    the gradient averaging and the loss's class weights, which must agree to rounding.
    """
    setting = {"model": {"head": "pool_fc"}, "train": {"freeze_backbone": True}}
    single = _project(tmp_path / "single", 3, **setting)
    assert _train_cli(single).wait(timeout=600) == 0
    double = _project(tmp_path / "double", 3, **setting)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FACEPIPE_NPROC="2", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "arcface", "--seed", "0", "--no-progress"],
                            cwd=double, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    timing = json.loads((double / "reports" / "train" / "arcface-0" / "timing.json").read_text())
    assert timing["processes"] == 2
    one = pd.read_csv(single / "reports" / "train" / "arcface-0" / "history.csv")
    two = pd.read_csv(double / "reports" / "train" / "arcface-0" / "history.csv")
    assert one["step"].tolist() == two["step"].tolist()
    assert one["train_loss"].iloc[0] != one["train_loss"].iloc[-1]  # it did train
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["val_auc"], one["val_auc"], atol=1e-4)


def _center_loss_run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Four SGD steps of center loss on fixed global batches of 8; this rank takes its slice.

    With ``world`` > 1 the loss runs under DistributedDataParallel over gloo, as in the
    trainer (DDP broadcasts rank 0's buffers, here the centres, at every forward).
    Saves the centres, the class weights and the global-batch loss of each step.
    """
    from datetime import timedelta

    from pipeline import losses

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if world > 1:
            torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                                 world_size=world, timeout=timedelta(seconds=120))
        torch.manual_seed(0)  # the same initial class weights on every rank
        loss = losses.build("center", num_classes=5, embedding_size=6, center_weight=0.1, center_lr=0.5)
        module = torch.nn.parallel.DistributedDataParallel(loss) if world > 1 else loss
        optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        per_rank, values = 8 // world, []
        for _ in range(4):
            x = torch.randn(8, 6, generator=g) + 2.0
            y = torch.randint(0, 5, (8,), generator=g)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            value = module(x[mine], y[mine])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            shown = value.detach().clone()
            if world > 1:
                torch.distributed.all_reduce(shown)
            values.append(float(shown) / world)
        torch.save({"centers": loss.centers.clone(), "weight": loss.weight.detach().clone(), "losses": values},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)


def test_center_loss_two_gloo_processes_end_with_the_centres_of_one(tmp_path):
    """Center loss updates its centres in ``forward``: with 2 processes the update must use
    the global batch (both halves), not rank 0's half that DDP broadcasts."""
    import torch.multiprocessing as mp

    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    _center_loss_run(0, 1, "", str(single))
    mp.spawn(_center_loss_run, args=(2, str(tmp_path / "rendezvous"), str(double)), nprocs=2, join=True)
    one = torch.load(single / "rank0.pt")
    assert one["centers"].abs().sum() > 0  # the centres did move
    for rank in (0, 1):
        two = torch.load(double / f"rank{rank}.pt")
        torch.testing.assert_close(two["centers"], one["centers"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two["weight"], one["weight"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)


def test_training_from_shards_over_http_equals_training_from_the_directory(tmp_path):
    """Shards copied to a web server / object store: the same run, the same bits."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    shards = _shards(tmp_path)
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{shards.name}"
        runs = {}
        for name, location in (("local", shards), ("http", url)):
            out = tmp_path / name
            runs[name] = train(_setup(epochs=2), location, out / "model", out / "ckpt", out / "report", progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert runs["local"] == runs["http"]


def test_cli_names_an_unreachable_shards_url_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    _write_recipes(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "arcface", "--seed", "0", "--no-progress",
                             "--shards", "http://127.0.0.1:9/shards"], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: http://127.0.0.1:9/shards/train: cannot read manifest.json")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["recipes"]  # nothing written by train


def test_training_seed_changes_the_run_but_not_the_validation_split(tmp_path, monkeypatch):
    """Runs that differ only in the training seed are validated on the same images; the data seed moves them."""
    import dataclasses

    from pipeline.train import split_train_val, validation_pairs

    shards = _shards(tmp_path)
    base = dataclasses.replace(_setup(epochs=1), data_seed=5)
    splits = []

    def recording_split(labels, fraction, seed):
        out = split_train_val(labels, fraction, seed)
        splits.append(out[1])
        return out

    monkeypatch.setattr(train_module, "split_train_val", recording_split)
    for name, setup in (("a", base), ("b", dataclasses.replace(base, seed=base.seed + 1))):
        train(setup, shards, tmp_path / name / "model", tmp_path / name / "ckpt", tmp_path / name / "report",
              progress=False)
    assert len(splits) == 2 and np.array_equal(splits[0], splits[1])
    a = torch.load(tmp_path / "a" / "model" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "model" / "model.pt", weights_only=False)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other initialisation and batches
    labels = read_shards(shards / "train").labels
    _, val0 = split_train_val(labels, 0.25, base.data_seed)
    _, val1 = split_train_val(labels, 0.25, base.data_seed + 1)
    assert not np.array_equal(val0, val1)  # the data seed, not the training seed, moves the split
    assert not np.array_equal(validation_pairs(labels[val0], 0), validation_pairs(labels[val0], 1))


# ----------------------------------------------------------------- GPU readiness
# No GPU runs these tests: the device and precision decisions are plain functions fed with
# what a GPU machine would report; the step itself is checked for reads back to the host by
# tracing it with torch.compile(fullgraph=True), which fails on any such read.


def _cuda(**fields):
    from pipeline.train import CudaStatus

    base = dict(usable=False, torch_version="2.14.1+cu130", torch_cuda="13.0",
                arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"))
    return CudaStatus(**(base | fields))


def test_auto_device_is_the_cpu_only_where_there_is_no_gpu():
    from pipeline.train import choose_device

    assert choose_device("auto", _cuda()) == "cpu"
    assert choose_device("auto", _cuda(visible_devices="")) == "cpu"  # GPUs hidden on purpose
    assert choose_device("auto", _cuda(visible_devices="-1")) == "cpu"
    h200 = _cuda(usable=True, count=1, names=("NVIDIA H200",), capabilities=((9, 0),))
    assert choose_device("auto", h200) == choose_device("cuda", h200) == "cuda"
    assert choose_device("cpu", h200) == "cpu"
    for capability in ((7, 5), (8, 6), (8, 9), (10, 3), (12, 1)):  # same major, newer minor: binary compatible
        assert choose_device("auto", _cuda(usable=True, count=1, names=("GPU",), capabilities=(capability,))) == "cuda"
    with pytest.raises(TrainingError, match="no NVIDIA GPU or driver was found.*train.device: cpu"):
        choose_device("cuda", _cuda())


@pytest.mark.parametrize("status, needles", [
    # driver too old for the CUDA 13 wheel: torch sees nothing, nvidia-smi does
    (dict(driver_gpu="Tesla T4, compute capability 7.5", driver="535.104.05"),
     ["Tesla T4", "CUDA 13.0", "driver >= 580", "535.104.05", "whl/cu126", "torch==2.14.1", "train.device: cpu"]),
    # torch counts the GPU through NVML but cannot initialise CUDA, driver version unknown
    (dict(count=2), ["torch counts 2 GPU(s)", "driver >= 580", "nvidia-smi"]),
    # only CUDA_VISIBLE_DEVICES says a GPU was meant to be used
    (dict(visible_devices="0"), ["CUDA_VISIBLE_DEVICES=0"]),
    # a CPU-only wheel on a GPU machine
    (dict(torch_cuda=None, torch_version="2.14.1+cpu", driver_gpu="NVIDIA A100, compute capability 8.0",
          driver="580.65.06"), ["CPU-only build", "scripts/setup.sh"]),
    # the driver is new enough: the GPU is hidden from this process
    (dict(driver_gpu="NVIDIA L4, compute capability 8.9", driver="580.82.07"),
     ["recent enough", "CUDA_VISIBLE_DEVICES"]),
    # torch runs, but the wheel has no kernels for this GPU (Volta: CUDA 13 dropped it)
    (dict(usable=True, count=1, names=("Tesla V100-SXM2-16GB",), capabilities=((7, 0),)),
     ["Tesla V100", "sm_70", "kernels only for sm_75", "whl/cu126"]),
    # ... or a GPU newer than the wheel
    (dict(usable=True, count=1, names=("Future GPU",), capabilities=((13, 0),)), ["sm_130", "newer torch"]),
])
def test_auto_device_stops_in_one_line_when_torch_cannot_use_the_gpu(status, needles):
    from pipeline.train import choose_device

    for choice in ("auto", "cuda"):
        with pytest.raises(TrainingError) as err:
            choose_device(choice, _cuda(**status))
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"train.device = {choice}")
        for needle in needles:
            assert needle in message, (needle, message)
    assert choose_device("cpu", _cuda(**status)) == "cpu"  # an explicit cpu never looks at the GPU


def _fake_nvidia_smi(folder: Path, line: str) -> str:
    """A stand-in for the driver's nvidia-smi on a machine whose driver is too old for the wheel:
    it answers the query the trainer makes. Returns a PATH with it first."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{line}'\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use this machine's GPU")
def test_cli_stops_in_one_line_on_a_gpu_machine_that_torch_cannot_use(tmp_path):
    """The real probe and CLI on this (GPU-less) machine, with nvidia-smi saying there is a T4
    on driver 535: train with device auto must stop instead of training on the CPU."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    _write_recipes(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               PATH=_fake_nvidia_smi(tmp_path / "bin", "Tesla T4, 535.104.05, 7.5"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "arcface", "--seed", "0", "--no-progress"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: train.device = auto and this machine has a GPU (nvidia-smi: Tesla T4, "
                               "compute capability 7.5) that torch cannot use")
    assert "driver >= 580" in lines[0] and "535.104.05" in lines[0] and "train.device: cpu" in lines[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["recipes"]  # nothing trained or written


def test_arch_support_follows_binary_and_ptx_compatibility():
    from pipeline.train import arch_supported

    wheel = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert arch_supported((9, 0), wheel) and arch_supported((8, 9), wheel) and arch_supported((12, 0), wheel)
    assert not arch_supported((7, 0), wheel) and not arch_supported((6, 1), wheel)
    assert not arch_supported((8, 0), ["sm_86"])  # a binary runs on the same or a newer minor only
    assert arch_supported((10, 0), ["sm_80", "compute_90"])  # PTX: the driver compiles it for newer GPUs
    assert arch_supported((9, 0), ["sm_90a"])
    assert arch_supported((7, 0), [])  # a build that does not list its architectures: left to torch


def test_bf16_only_from_ampere_on():
    from pipeline.train import amp_dtype_for

    assert amp_dtype_for("cuda", (7, 0), True) == torch.float16  # V100: bf16 only emulated
    assert amp_dtype_for("cuda", (7, 5), True) == torch.float16  # T4
    assert amp_dtype_for("cuda", (8, 0), True) == torch.bfloat16
    assert amp_dtype_for("cuda", (9, 0), True) == torch.bfloat16
    assert amp_dtype_for("cuda", (9, 0), False) is None
    assert amp_dtype_for("cpu", None, True) is None


def test_device_line_names_the_device_precision_and_processes():
    from pipeline.train import describe_device, device_line, gpu_text

    line = device_line(gpu_text(1, "NVIDIA H200", (9, 0), 141 * 2**30), torch.bfloat16, 8, "2.14.1+cu130", "13.0")
    assert line == ("device cuda:1 NVIDIA H200 (compute capability 9.0, 141 GiB); precision bf16 autocast (backbone), "
                    "fp32 head and loss; 8 processes; torch 2.14.1+cu130 built for CUDA 13.0")
    assert "fp16 autocast" in device_line("x", torch.float16, 1, "v", "12.6") and "gradient scaler" in device_line(
        "x", torch.float16, 1, "v", "12.6")
    cpu_line = describe_device(torch.device("cpu"), None, 1)
    assert cpu_line.startswith("device cpu (") and "precision fp32; 1 process;" in cpu_line


def test_cuda_backend_settings_trade_autotuning_for_determinism():
    from pipeline.train import cuda_backend_settings

    assert cuda_backend_settings(False) == {"cudnn.benchmark": True, "cudnn.deterministic": False,
                                            "use_deterministic_algorithms": False, "CUBLAS_WORKSPACE_CONFIG": None}
    assert cuda_backend_settings(True) == {"cudnn.benchmark": False, "cudnn.deterministic": True,
                                           "use_deterministic_algorithms": True, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_sync_batchnorm_only_for_small_per_gpu_batches():
    from pipeline.train import use_sync_bn

    assert use_sync_bn("auto", "cuda", 8, 8)  # batch 64 over 8 GPUs
    assert not use_sync_bn("auto", "cuda", 2, 32)  # 32 images per GPU: plain BN, no all-gather per layer
    assert not use_sync_bn("auto", "cpu", 2, 4)  # SyncBatchNorm does not run on the CPU
    assert not use_sync_bn("auto", "cuda", 1, 4) and not use_sync_bn(True, "cuda", 1, 4)  # one process: nothing to sync
    assert use_sync_bn(True, "cuda", 2, 64) and not use_sync_bn(False, "cuda", 8, 8)
    with pytest.raises(TrainingError, match="sync_bn = true needs GPUs"):
        use_sync_bn(True, "cpu", 2, 4)


def test_batch_per_device_gives_each_process_its_slice_of_the_same_global_batches():
    from pipeline.train import Distributed, _epoch_batches, batch_layout

    assert batch_layout(TrainParams(batch_size=64), 2, pk=False) == (64, 32)
    assert batch_layout(TrainParams(batch_size=64, batch_per_device=16), 4, pk=False) == (64, 16)
    assert batch_layout(TrainParams(batch_size=64, batch_per_device=16, pk_identities=4, pk_images=3), 2,
                        pk=True) == (24, 12)
    with pytest.raises(TrainingError, match="divisible by the 3 processes.*batch_per_device"):
        batch_layout(TrainParams(batch_size=64), 3, pk=False)
    # batch_per_device=4 on 2 processes draws exactly the batches of batch_size=8 on 2 processes
    for rank in (0, 1):
        dist = Distributed(rank=rank, world=2)
        global_a, _ = batch_layout(TrainParams(batch_size=8), 2, pk=False)
        global_b, per = batch_layout(TrainParams(batch_size=100, batch_per_device=4), 2, pk=False)
        a = _epoch_batches(0, 40, global_a, None, 5, torch.Generator().manual_seed(1), dist)
        b = _epoch_batches(0, 40, global_b, None, 5, torch.Generator().manual_seed(1), dist)
        assert per == 4 and all(len(i) == 4 and torch.equal(i, j) and torch.equal(f, g)
                                for (i, f), (j, g) in zip(a, b))


def test_labels_are_checked_once_on_the_host():
    from pipeline.train import check_labels

    check_labels(np.array([0, 3, 1]), 4, "shards/train")
    with pytest.raises(TrainingError, match="shards/train: label 4 is outside \\[0, 3\\]"):
        check_labels(np.array([0, 4]), 4, "shards/train")
    with pytest.raises(TrainingError, match="label -1"):
        check_labels(np.array([-1, 2]), 4, "shards/train")


def test_flip_is_a_selection_with_the_values_and_layout_of_boolean_indexing():
    from pipeline.train import flip_rows, to_input

    images = torch.randint(0, 256, (6, 112, 112, 3), dtype=torch.uint8)
    flips = torch.tensor([True, False, True, True, False, False])
    old = to_input(images, grayscale=False)
    old[flips] = old[flips].flip(-1)  # what the trainer did before
    new = to_input(images, grayscale=False)
    out = flip_rows(new, flips)
    assert out is new and torch.equal(new, old) and new.stride() == old.stride()


@pytest.mark.parametrize("loss", ["arcface", "triplet"])
def test_training_forward_reads_nothing_back_from_the_device(loss):
    """On a GPU every read of a device value (``int(t)``, ``bool(t)``, ``x[mask]``) makes the host
    wait. torch.compile(fullgraph=True) refuses exactly those, so a step that traces as one graph
    has none: input conversion, flips, backbone, fp32 head and loss, as the trainer runs them."""
    from pipeline.train import _TrainStep, build_modules, flip_rows

    torch._dynamo.reset()
    model, criterion = build_modules(_setup(loss), num_classes=6)
    criterion.check_values = False  # as the trainer sets it after checking the labels once
    criterion.begin_training(10)
    step = _TrainStep(model, criterion, None).train()

    def forward(images, flips, labels):
        from pipeline.train import to_input

        return step(flip_rows(to_input(images, grayscale=False), flips), labels)

    images = torch.randint(0, 256, (8, 112, 112, 3), dtype=torch.uint8)
    flips = torch.rand(8) < 0.5
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    value = torch.compile(forward, backend="eager", fullgraph=True)(images, flips, labels)
    assert value.ndim == 0 and torch.isfinite(value)
    criterion.check_values = True  # the per-batch value checks do read back, and the trace says so
    torch._dynamo.reset()
    with pytest.raises(Exception, match="data-dependent"):
        torch.compile(forward, backend="eager", fullgraph=True)(images, flips, labels)


def test_fingerprint_separates_device_precision_and_global_batch(tmp_path):
    from pipeline.train import fingerprint

    data = read_shards(_shards(tmp_path, n_ids=3, per=4) / "train")
    setup = _setup()

    def key(setup=setup, device_type="cpu", amp_dtype=None, global_batch=8):
        return fingerprint(setup, data, device_type=device_type, amp_dtype=amp_dtype, global_batch=global_batch)

    keys = {key(), key(device_type="cuda"), key(device_type="cuda", amp_dtype=torch.bfloat16),
            key(device_type="cuda", amp_dtype=torch.float16), key(global_batch=16)}
    assert len(keys) == 5  # a CPU checkpoint never resumes a GPU run, nor bf16 an fp16 one
    assert key() == key()
    # what does not change the trained model does not block a resume
    assert key(_setup(nan_check_every=1, workers=3, decode="per_batch", device="cpu")) == key()


def test_validation_embeds_only_the_images_in_its_pairs():
    from pipeline.train import validation_subset

    labels = np.repeat(np.arange(40), 5)
    pairs = validation_pairs(labels, seed=0, max_pairs=30)
    needed, remapped = validation_subset(pairs)
    assert len(needed) < len(labels)  # fewer images than the validation set
    assert np.array_equal(needed[remapped[:, :2]], pairs[:, :2]) and np.array_equal(remapped[:, 2], pairs[:, 2])


def test_nan_is_read_every_k_steps_and_still_named_with_its_step(tmp_path):
    shards = _shards(tmp_path)
    messages = {}
    for every in (1, 20):
        out = tmp_path / f"every{every}"
        with pytest.raises(TrainingError) as err:
            train(_setup(lr=1e30, nan_check_every=every), shards, out / "model", out / "ckpt", out / "report",
                  progress=False)
        messages[every] = str(err.value)
    import re

    steps = {every: int(re.search(r"became \w+ at step (\d+)", m).group(1)) for every, m in messages.items()}
    assert steps[1] == steps[20]  # the same first bad step, found late
    first, last = map(int, re.search(r"covered steps (\d+)-(\d+)", messages[20]).groups())
    assert first <= steps[20] <= last and "read every 20 steps" in messages[20]
    assert "arcface" in messages[20] and "margin" in messages[20] and "\n" not in messages[20]


def test_reading_the_loss_less_often_trains_the_same_model(tmp_path):
    shards = _shards(tmp_path)
    results = {}
    for every in (1, 3):
        out = tmp_path / f"every{every}"
        metrics = train(_setup(epochs=2, nan_check_every=every), shards, out / "model", out / "ckpt", out / "report",
                        progress=False)
        results[every] = (metrics, pd.read_csv(out / "report" / "history.csv"),
                          torch.load(out / "model" / "model.pt", weights_only=False)["model"],
                          (out / "model" / "model.pt").read_bytes(), (out / "ckpt" / "last.pt").read_bytes())
    assert results[1][0] == results[3][0]
    pd.testing.assert_frame_equal(results[1][1], results[3][1], check_exact=True)
    for name, tensor in results[1][2].items():
        assert torch.equal(tensor, results[3][2][name]), name
    # the same model gives the same file, so a forced rerun leaves dvc.lock as it was
    assert results[1][3] == results[3][3] and results[1][4] == results[3][4]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_process_stops_when_process_0_fails_while_checkpointing(tmp_path):
    """Two processes started as a cluster scheduler starts them (no torchrun agent to stop the
    survivor). Process 0 cannot write its checkpoint (best.pt is a directory, something only
    process 0 touches): both must stop, process 1 with one line saying why. Before, process 1
    was left in the epoch's barrier: over gloo it died with a connection traceback once
    process 0 had exited; over NCCL, which does not always notice a dead peer, it could
    wait for the collective timeout (10 minutes by default)."""
    project = _project(tmp_path, 2, train={"device": "cpu"})  # gloo, also on a machine with one GPU
    (project / "data" / "checkpoints" / "arcface-0" / "best.pt" / "blocker").mkdir(parents=True)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FACEPIPE_THREADS="1", WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        env.pop("FACEPIPE_NPROC", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", "train", "arcface", "--seed", "0",
                                       "--no-progress"], cwd=project, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=240) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a process was still waiting 240 s after the other one failed")
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert "best.pt" in results[0][1]  # process 0: why it failed
    lines = [ln for ln in results[1][1].splitlines() if ln.strip()]
    assert lines == ["error: process 1 stops: process 0 failed while validating or checkpointing epoch 1 "
                     "(process 0 prints why)"], results[1][1]


# ----------------------------------------------------------------- files and processes


def test_equal_models_are_saved_as_equal_bytes_and_old_files_still_load(tmp_path):
    """torch.save names the zip archive's folder after the file it writes; written through a
    randomly named temporary, the same model gave other bytes on every save."""
    from pipeline.train import save_model

    data = read_shards(_shards(tmp_path, n_ids=3, per=4) / "train")
    setup = _setup()
    torch.manual_seed(0)
    model, criterion = train_module.build_modules(setup, num_classes=3)
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "best.pt"
    save_model(first, model, setup, data, 2, 0.75, criterion)
    save_model(second, model, setup, data, 2, 0.75, criterion)
    assert first.read_bytes() == second.read_bytes()
    save_model(second, model, setup, data, 3, 0.75, criterion)  # other content, other bytes
    assert first.read_bytes() != second.read_bytes()
    # a model.pt written as before (torch.save to its path) loads as it did
    old = tmp_path / "old" / "model.pt"
    old.parent.mkdir()
    torch.save(torch.load(first, weights_only=False), old)
    loaded, saved = load_model(old)
    assert saved["epoch"] == 2 and saved["identity_names"] == list(data.identity_names)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_an_unreadable_checkpoint_stops_the_run_in_one_line_naming_it(tmp_path):
    shards = _shards(tmp_path)
    checkpoint = tmp_path / "ckpt" / "last.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(TrainingError) as err:
        train(_setup(epochs=1), shards, tmp_path / "model", tmp_path / "ckpt", tmp_path / "report", progress=False)
    message = str(err.value)
    assert message.startswith(f"{checkpoint}: not a readable checkpoint (") and "delete it" in message
    assert "\n" not in message and not (tmp_path / "model").exists()


def test_decode_threads_are_shared_by_the_processes_of_a_machine():
    from pipeline.train import decode_threads, local_processes

    assert decode_threads(0, 1, threads=16) == 16  # one process: every thread, as before
    assert decode_threads(0, 8, threads=16) == 2  # 8 processes share 16 threads (not 8 x 16)
    assert decode_threads(0, 3, threads=16) == 5 and decode_threads(0, 3, threads=2) == 1  # at least one
    assert decode_threads(6, 8, threads=16) == 6  # train.workers set: per process, as given
    assert local_processes({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}) == 4  # torchrun: 2 machines x 4
    assert local_processes({"WORLD_SIZE": "2"}) == 2 and local_processes({}) == 1


def _launch_rank(project: Path, rank: int, port: str, threads: int = 1) -> subprocess.Popen:
    """Process ``rank`` of 2, started as a cluster scheduler starts it (no torchrun agent), in ``project``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FACEPIPE_THREADS=str(threads), WORLD_SIZE="2",
               RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port)
    env.pop("FACEPIPE_NPROC", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "arcface", "--seed", "0", "--no-progress"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_process_resumes_from_process_0s_checkpoint(tmp_path):
    """Node-local checkpoint folders: only process 0's holds last.pt (after epoch 1 of 2). Process 0
    decides and sends its checkpoint, so both processes train epoch 2 from the same state and the
    run ends as an uninterrupted one. Before, process 1 started again at epoch 1 while process 0
    trained epoch 2: their collectives no longer matched.

    As in test_two_gloo_processes_match_one, the backbone is frozen and the head has no BN, so two
    processes train what one does, to rounding; one process trains the reference and the
    checkpoint (a run stopped in epoch 2's validation, which leaves epoch 1's checkpoint)."""
    from pipeline.recipes import read_recipe

    setting = {"model": {"head": "pool_fc"}, "train": {"freeze_backbone": True, "device": "cpu"}}
    first, second = _project(tmp_path / "rank0", 2, **setting), _project(tmp_path / "rank1", 2, **setting)
    setup = TrainSetup.from_recipe(read_recipe(first / "data" / "recipes" / "arcface.json"), 0)
    clean = train(setup, first / "data" / "shards", tmp_path / "clean" / "model", tmp_path / "clean" / "ckpt",
                  tmp_path / "clean" / "report", progress=False)
    real, calls = train_module.validation_auc, {"n": 0}

    def stop_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("stopped before epoch 2's checkpoint")
        return real(*args, **kwargs)

    checkpoints = first / "data" / "checkpoints" / "arcface-0"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "validation_auc", stop_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train(setup, first / "data" / "shards", tmp_path / "stopped" / "model", checkpoints,
                  tmp_path / "stopped" / "report", progress=False)
    assert torch.load(checkpoints / "last.pt", weights_only=False)["epoch"] == 1
    assert not (second / "data" / "checkpoints").exists()
    port = str(_free_port())
    procs = [_launch_rank(project, rank, port, threads=4) for rank, project in enumerate((first, second))]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the processes were still running after 240 s (waiting for each other?)")
    assert [p.returncode for p in procs] == [0, 0], results
    assert "resuming from data/checkpoints/arcface-0/last.pt after epoch 1" in results[0][0]
    report = first / "reports" / "train" / "arcface-0"
    history = pd.read_csv(report / "history.csv")
    reference = pd.read_csv(tmp_path / "clean" / "report" / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["step"].tolist() == reference["step"].tolist()
    assert history["train_loss"].iloc[0] == reference["train_loss"].iloc[0]  # epoch 1: from the checkpoint
    np.testing.assert_allclose(history["train_loss"], reference["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(history["val_auc"], reference["val_auc"], atol=1e-4)
    assert json.loads((report / "metrics.json").read_text())["steps"] == clean["steps"]
    timing = json.loads((report / "timing.json").read_text())
    assert timing["processes"] == 2 and timing["decode_threads_per_process"] == 2  # FACEPIPE_THREADS=4 shared
    assert not (second / "reports").exists()  # only process 0 writes
