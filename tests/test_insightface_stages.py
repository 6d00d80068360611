"""The insightface layout through the per-set stages: a ``.rec`` training set and ``.bin`` test sets
(written by the project's own writers, as the miniature) go through data, detect, align and shard
without MTCNN and without re-encoding (the shards hold the ``.rec``'s JPEG bytes at 112 px), the
``.bin``'s pairs and ten consecutive folds reach the shards, and the CLI's stages run from a
params file of that layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.datasets.insightface import read_bin
from pipeline.datasets.insightface_synth import write_miniature
from pipeline.datasets.recordio import read_index, read_record, unpack_image_record
from pipeline.shards import read_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder with a miniature (8 identities x 4 faces; .bin sets of 2 folds x 8 pairs) and a params
    file pointing at it; the data..shard stages of every set run through the CLI."""
    root = tmp_path_factory.mktemp("insightface")
    write_miniature(root / "mini", train_identities=8, images_per_identity=4, test_identities=6, test_images=3,
                    folds=2, pairs_per_fold=8)
    folder = root / "mini" / "faces_synth_112x112"
    params = yaml.safe_load((ROOT / "configs" / "insightface-synth.yaml").read_text())
    params["data"]["train"]["path"] = str(folder)
    for name, spec in params["data"]["tests"].items():
        spec["path"] = str(folder / f"{name}.bin")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FACEPIPE_THREADS": "1"}
    for kind in ("data", "detect", "align", "shard"):
        result = subprocess.run([sys.executable, "-m", "pipeline", kind, "--no-progress"], cwd=root, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_the_rec_reaches_the_shards_byte_for_byte(project):
    folder = project / "mini" / "faces_synth_112x112"
    summary = json.loads((project / "data" / "datasets" / "train" / "summary.json").read_text())
    assert summary["kind"] == "insightface_rec" and summary["prealigned"] and summary["precropped"]
    assert (summary["images"], summary["identities"]) == (32, 8)
    counts = json.loads((project / "reports" / "detection" / "train.json").read_text())
    assert counts["precropped"] and counts["faces"] == 32 and counts["source_sizes"] == {"112x112": 32}
    index = read_index(folder / "train.idx")
    with open(folder / "train.rec", "rb") as rec:
        by_hand = {}
        for key in range(1, 33):  # images are keys 1..32; read straight from the file, not through the stages
            label, image = unpack_image_record(read_record(rec, index.offset_of(key)))
            by_hand[str(key)] = (str(int(label)), image)
    shards = read_shards(project / "data" / "shards" / "train")
    assert sorted(shards.image_ids, key=int) == sorted(by_hand, key=int)
    for k, image_id in enumerate(shards.image_ids):
        label, image = by_hand[image_id]
        assert shards.identities[k] == label
        assert shards.images[k] == image  # not decoded and re-encoded


def test_a_bin_keeps_its_pairs_and_its_ten_consecutive_folds(project):
    folder = project / "mini" / "faces_synth_112x112"
    images, same = read_bin(folder / "cfp_fp.bin")
    shards = read_shards(project / "data" / "shards" / "cfp_fp")
    pairs = shards.pairs
    assert pairs["same"].tolist() == [int(v) for v in same]
    # folds: ten consecutive blocks of pairs (16 pairs: blocks of 2, as numpy.array_split cuts them)
    expected = np.concatenate([np.full(len(block), k + 1) for k, block in enumerate(np.array_split(np.arange(16), 10))])
    assert pairs["fold"].tolist() == expected.tolist()
    where = dict(zip(shards.image_ids, range(len(shards))))
    for i, row in enumerate(pairs.itertuples()):
        assert shards.images[where[row.image_id1]] == images[2 * i]
        assert shards.images[where[row.image_id2]] == images[2 * i + 1]
    summary = json.loads((project / "data" / "datasets" / "cfp_fp" / "summary.json").read_text())
    assert summary["folds_assigned"].startswith("10 consecutive blocks")


def test_a_bad_rec_is_one_line_and_keeps_the_previous_index(project, tmp_path):
    folder = project / "mini" / "faces_synth_112x112"
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train.idx", "property"):
        (broken / name).write_bytes((folder / name).read_bytes())
    (broken / "train.rec").write_bytes((folder / "train.rec").read_bytes()[:1000])  # truncated
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["train"]["path"] = str(broken)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    before = (project / "data" / "datasets" / "train" / "index.csv").read_bytes()
    result = subprocess.run([sys.executable, "-m", "pipeline", "data", "train", "--params", str(tmp_path /
                                                                                                "params.yaml")],
                            cwd=project, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "train.rec" in lines[0], result.stderr
    assert (project / "data" / "datasets" / "train" / "index.csv").read_bytes() == before


def test_the_miniature_runs_end_to_end_through_dvc(tmp_path):
    """configs/insightface-synth.yaml on a small miniature, through the real dvc.yaml: trained on the
    .rec, tested on three .bin sets, and the report carries the papers' table of the three."""
    import os
    import shutil

    write_miniature(tmp_path / "mini", train_identities=8, images_per_identity=5, test_identities=6, test_images=3,
                    folds=10, pairs_per_fold=4)
    folder = tmp_path / "mini" / "faces_synth_112x112"
    project = tmp_path / "project"
    shutil.copytree(ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "dvc-defaults.yaml", project / "configs" / "dvc-defaults.yaml")
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((ROOT / "configs" / "insightface-synth.yaml").read_text())
    params["data"]["train"]["path"] = str(folder)
    for name, spec in params["data"]["tests"].items():
        spec["path"] = str(folder / f"{name}.bin")
    params.update(train_losses=["softmax", "arcface"], seeds={"data": 0, "train": [0]})
    params["train"].update(epochs=1, batch_size=16, warmup_epochs=0)
    params["model"]["embedding_size"] = 16
    params["score"]["threshold"]["min_pairs"] = 4
    params["report"]["bootstrap"] = 100
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               FACEPIPE_THREADS="1", DVC_NO_ANALYTICS="1")
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        result = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    index = (project / "reports" / "index.md").read_text()
    section = index[index.index("## Benchmarks as the papers report them"):]
    section = section[:section.index("\n## ", 3)] if "\n## " in section[3:] else section  # that section only
    header = next(line for line in section.splitlines() if line.startswith("| model"))
    assert header == "| model | lfw | cfp_fp | agedb_30 |"
    assert sum(line.startswith(("| softmax", "| arcface")) for line in section.splitlines()) == 2
    assert "pre-cropped: not detected or aligned, scored at 112 px" in index
