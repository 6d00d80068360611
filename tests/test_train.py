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


def test_short_run_learns_and_saves(tmp_path):
    shards = _shards(tmp_path)
    metrics = train(_setup(), shards, tmp_path / "model", tmp_path / "ckpt", tmp_path / "report", progress=False)
    history = pd.read_csv(tmp_path / "report" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert metrics["best_val_auc"] == pytest.approx(history["val_auc"].max())
    model, saved = load_model(tmp_path / "model" / "model.pt")
    assert saved["epoch"] == metrics["best_epoch"]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 16)


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
    monkeypatch.setattr(train_module, "_available_memory", lambda: 4 * decoded_bytes)
    assert batch_source(data, "auto")[0] == "upfront"
    assert batch_source(data, "auto", processes_per_machine=2)[0] == "per_batch"  # each rank holds a copy
    monkeypatch.setattr(train_module, "_available_memory", lambda: 4 * decoded_bytes - 4)
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


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    epochs = 4
    clean = _project(tmp_path / "clean", epochs)
    assert _train_cli(clean).wait(timeout=600) == 0

    crashed = _project(tmp_path / "crashed", epochs)
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
