"""Embed stage: the run's validation pairs (the trainer's own), a facepipe ``model.pt`` as a
pretrained entry (same embeddings and scores as the run it came from), one-line errors for
model files that are missing or unreadable, and the pretrained fingerprint stage."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import EmbedParams, PretrainedParams, ScoreParams, ShardParams
from pipeline.embed import ModelFileError, run_embed, run_embed_pretrained, run_embed_train
from pipeline.score import ThresholdSource, read_set, run_score
from pipeline.shards import read_shards, write_set
from pipeline.train import embed_array, load_model
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


def _test_set(shards: Path, name: str = "faces", n_ids: int = 4, per: int = 3) -> None:
    """A small labelled test set of 112 px images beside the train shards."""
    aligned = shards.parent / f"aligned_{name}"
    rng = np.random.default_rng(7)
    rows, ids = [], []
    for i in range(n_ids):
        base = rng.integers(30, 225, 3)
        for k in range(per):
            img = np.clip(base + rng.normal(0, 30, (112, 112, 3)), 0, 255).astype(np.uint8)
            img[(i * 20) % 100:(i * 20) % 100 + 10] = 0
            image_id = f"p{i}/{k}.jpg"
            write_image(aligned / image_id, img, quality=95)
            rows.append({"image_id": image_id, "identity": f"p{i}", "source_path": f"/src/{image_id}",
                         "file": image_id, "residual": 0.0, "error": ""})
            ids.append(image_id)
    pd.DataFrame(rows).to_csv(aligned / "_index.csv", index=False)
    pairs = [(1 + k % 2, ids[a], ids[b], int(a // per == b // per))
             for k, (a, b) in enumerate([(0, 1), (0, 4), (3, 5), (2, 9), (6, 7), (1, 10), (9, 11), (4, 8)])]
    pairs = pd.DataFrame(pairs, columns=["fold", "image_id1", "image_id2", "same"])
    write_set(aligned, shards / name, ShardParams(), pairs, progress=False)


@pytest.fixture(scope="module")
def shards(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's train shards plus a test set, in a folder of their own."""
    out = tmp_path_factory.mktemp("embed") / "shards"
    out.mkdir()
    (out / "train").symlink_to(Path(tiny_model["shards"]) / "train")
    _test_set(out)
    return out


def test_validation_pairs_are_the_ones_the_trainer_used(tiny_model, shards, tmp_path):
    run_embed_train(EmbedParams(flip=False, device="cpu"), tiny_model["model"], shards / "train",
                    tiny_model["recipe"], tmp_path / "emb" / "validation", tmp_path / "emb" / "train")
    pairs = pd.read_csv(tmp_path / "emb" / "validation" / "pairs.csv", dtype={"image_id1": str, "image_id2": str})
    train = read_shards(shards / "train")
    decoded = dict(zip(train.image_ids, train.decode_all()))
    seen_images, seen_pairs = tiny_model["val_images"], tiny_model["val_pairs"]
    assert len(pairs) == len(seen_pairs) > 0
    assert pairs["same"].tolist() == seen_pairs[:, 2].tolist()
    assert set(pairs["fold"]) == {1}
    for row, (i, j, _) in zip(pairs.itertuples(), seen_pairs):  # same images, pair by pair
        np.testing.assert_array_equal(decoded[row.image_id1], seen_images[i])
        np.testing.assert_array_equal(decoded[row.image_id2], seen_images[j])
    with np.load(tmp_path / "emb" / "validation" / "embeddings.npz") as z:
        ids, emb = list(z["image_ids"]), z["embeddings"]
    model, _ = load_model(tiny_model["model"])
    reference = embed_array(model, torch.from_numpy(np.stack([decoded[i] for i in ids])), grayscale=False,
                            device=torch.device("cpu"))
    np.testing.assert_allclose(emb, reference, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "emb" / "train" / "angles.npz").is_file()


def test_no_validation_images_writes_empty_validation_pairs(tiny_model, shards, tmp_path):
    recipe = {"train": {"val_fraction": 0.0}, "data_seed": 5}
    count = run_embed_train(EmbedParams(device="cpu"), tiny_model["model"], shards / "train", recipe,
                            tmp_path / "validation", tmp_path / "train")
    assert count == 0
    assert pd.read_csv(tmp_path / "validation" / "pairs.csv").empty
    assert read_set(tmp_path / "validation") is None  # nothing to choose a threshold on: the score stage falls back


def test_one_test_set_per_embed_stage(tiny_model, shards, tmp_path):
    count = run_embed(EmbedParams(flip=False, device="cpu"), tiny_model["model"], shards / "faces",
                      tmp_path / "faces", name="faces")
    assert count == 12
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == ["embeddings.npz", "pairs.csv"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "faces" / "pairs.csv"), pd.read_csv(shards / "faces" /
                                                                                             "pairs.csv"))
    with np.load(tmp_path / "faces" / "embeddings.npz") as z:
        ids, emb = list(z["image_ids"]), z["embeddings"]
    faces = read_shards(shards / "faces")
    decoded = dict(zip(faces.image_ids, faces.decode_all()))
    model, _ = load_model(tiny_model["model"])
    reference = embed_array(model, torch.from_numpy(np.stack([decoded[i] for i in ids])), grayscale=False,
                            device=torch.device("cpu"))
    np.testing.assert_allclose(emb, reference, rtol=1e-5, atol=1e-5)


def test_facepipe_pretrained_entry_scores_like_its_run(tiny_model, shards, tmp_path):
    params = EmbedParams(flip=True, device="cpu", batch_size=5)
    run_embed(params, tiny_model["model"], shards / "faces", tmp_path / "emb" / "arcface-0" / "faces", name="faces")
    entry = PretrainedParams(kind="facepipe", path=str(tiny_model["model"]))
    run_embed_pretrained("elsewhere", entry, "faces", tmp_path / "no_detect_needed", shards / "faces",
                         tmp_path / "emb" / "elsewhere" / "faces", progress=False, embed=params)
    with np.load(tmp_path / "emb" / "arcface-0" / "faces" / "embeddings.npz") as a, \
            np.load(tmp_path / "emb" / "elsewhere" / "faces" / "embeddings.npz") as b:
        for key in ("image_ids", "identities", "embeddings"):
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.allclose(a["embeddings"][0], a["embeddings"][1])  # not a constant model
    # same source for both: same thresholds (8 pairs: the minimum lowered for this tiny set)
    score = ScoreParams(bootstrap=0, threshold={"source": "faces", "min_pairs": 5})
    for run in ("arcface-0", "elsewhere"):
        folder = tmp_path / "emb" / run / "faces"
        run_score(score, "faces", folder, ThresholdSource("faces", folder, "faces"), tmp_path / "scores" / run,
                  tmp_path / f"{run}.json", run=run)
    for variant in ("cosine_norm", "l2_raw"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "scores" / "arcface-0" / f"{variant}.csv"),
                                      pd.read_csv(tmp_path / "scores" / "elsewhere" / f"{variant}.csv"))
    mine = json.loads((tmp_path / "arcface-0.json").read_text())
    theirs = json.loads((tmp_path / "elsewhere.json").read_text())
    assert mine == theirs


def test_missing_or_unreadable_model_file_is_one_line(tiny_model, shards, tmp_path):
    with pytest.raises(ModelFileError, match=r"nowhere\.pt: model file not found \(pretrained\.x\.path\)"):
        run_embed_pretrained("x", PretrainedParams(kind="facepipe", path=str(tmp_path / "nowhere.pt")), "faces",
                             tmp_path, shards / "faces", tmp_path / "out", embed=EmbedParams(device="cpu"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError) as err:
        run_embed(EmbedParams(device="cpu"), junk, shards / "faces", tmp_path / "out", name="faces")
    assert str(junk) in str(err.value) and "\n" not in str(err.value) and "not a readable facepipe model.pt" in str(
        err.value)
    plain = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, plain)  # a torch file, but not one of ours
    with pytest.raises(ModelFileError, match="state_dict.pt: not a readable facepipe model.pt"):
        run_embed(EmbedParams(device="cpu"), plain, shards / "faces", tmp_path / "out", name="faces")
    assert not (tmp_path / "out").exists()


def _project(tmp_path: Path, pretrained: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pretrained"] = {name: {"threshold_source": "synth_open", **entry} for name, entry in pretrained.items()}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FACEPIPE_THREADS": "1"})


def test_cli_embed_pretrained_names_an_unreadable_model_file(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    project = _project(tmp_path, {"mine": {"kind": "facepipe", "path": str(junk)}})
    result = _cli(project, "embed-pretrained", "mine", "--set", "synth_open", "--no-progress")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1 and str(junk) in lines[0], result.stderr


def test_pretrained_fingerprint_follows_the_file_content(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"first weights")
    project = _project(tmp_path, {"mine": {"kind": "facepipe", "path": str(model)}})
    result = _cli(project, "pretrained-model", "mine")
    assert result.returncode == 0, result.stderr
    out = project / "data" / "pretrained" / "mine.json"
    record = json.loads(out.read_text())
    assert record["kind"] == "facepipe"
    assert record["files"]["model"]["sha256"] == hashlib.sha256(b"first weights").hexdigest()
    before = out.read_bytes()
    assert _cli(project, "pretrained-model", "mine").returncode == 0
    assert out.read_bytes() == before  # unchanged file: identical fingerprint, so DVC reruns nothing after it
    model.write_bytes(b"other weights")
    assert _cli(project, "pretrained-model", "mine").returncode == 0
    assert json.loads(out.read_text())["files"]["model"]["sha256"] == hashlib.sha256(b"other weights").hexdigest()
    model.unlink()
    result = _cli(project, "pretrained-model", "mine")
    assert result.returncode == 2 and "pretrained.mine.path" in result.stderr
