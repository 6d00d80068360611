"""``export rec|bin``: a sharded set to the insightface formats and back, byte for byte."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ShardParams
from pipeline.datasets.insightface import load_bin, load_rec, read_bin
from pipeline.export import export_bin, export_rec
from pipeline.images import read_image_bytes
from pipeline.shards import ShardError, read_shards, write_set
from tests.conftest import ROOT, write_image

IDENTITIES = ["carol", "alice", "bob"]  # sorted: alice 0, bob 1, carol 2


def _shards(tmp_path, pairs: pd.DataFrame | None, fmt: str = "parquet"):
    """Twelve aligned faces in the one-file-per-face layout, identities interleaved (so the
    shards are not grouped by label), one failed face; sharded by the real shard writer."""
    aligned = tmp_path / "aligned"
    rng = np.random.default_rng(0)
    rows = []
    for k in range(12):
        identity = IDENTITIES[k % 3]
        name = f"{identity}/{k}.jpg"
        write_image(aligned / name, (rng.random((64, 48, 3)) * 255).astype(np.uint8), quality=90)
        rows.append({"image_id": f"{identity}/{k}", "identity": identity, "source_path": f"/raw/{name}",
                     "file": name, "residual": 0.5, "error": ""})
    rows.append({"image_id": "alice/lost", "identity": "alice", "source_path": "/raw/x", "file": "x.jpg",
                 "residual": np.nan, "error": "could not read"})
    pd.DataFrame(rows).to_csv(aligned / "_index.csv", index=False)
    out = tmp_path / "shards" / "set"
    write_set(aligned, out, ShardParams(format=fmt, images_per_shard=5), pairs, progress=False)
    return out


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_export_rec_round_trip_is_byte_identical(tmp_path, fmt):
    shards_dir = _shards(tmp_path, None, fmt)
    shards = read_shards(shards_dir)
    summary = export_rec(shards_dir, tmp_path / "rec")
    assert summary["images"] == 12 and summary["classes"] == 3
    assert (tmp_path / "rec" / "property").read_text().strip() == "3,64,48"
    names = pd.read_csv(tmp_path / "rec" / "identities.csv")
    assert names["identity"].tolist() == ["alice", "bob", "carol"] and names["label"].tolist() == [0, 1, 2]
    table = load_rec(tmp_path / "rec", progress=False).images
    # expected: the shard records grouped by label, in shard order within a label (computed here)
    expected = [k for label in range(3) for k in range(len(shards)) if shards.labels[k] == label]
    assert table["identity"].tolist() == [str(shards.labels[k]) for k in expected]
    assert [read_image_bytes(p) for p in table["path"]] == [shards.images[k] for k in expected]
    assert [names["identity"][int(i)] for i in table["identity"]] == [shards.identities[k] for k in expected]


def _pairs(folds):
    ids = [f"{IDENTITIES[k % 3]}/{k}" for k in range(12)]
    first = [ids[k % 12] for k in range(len(folds))]
    second = [ids[(5 * k + 1) % 12] for k in range(len(folds))]
    same = [int(a.split("/")[0] == b.split("/")[0]) for a, b in zip(first, second)]
    return pd.DataFrame({"fold": folds, "image_id1": first, "image_id2": second, "same": same})


def test_export_bin_round_trip_pairs_and_images(tmp_path):
    folds = [f for f in range(1, 11) for _ in range(2)]  # ten blocks of two: a .bin keeps them
    pairs = _pairs(folds)
    pairs.loc[len(pairs)] = [3, "alice/lost", "bob/1", 0]  # its first image failed alignment
    shards_dir = _shards(tmp_path, pairs)
    shards = read_shards(shards_dir)
    summary = export_bin(shards_dir, tmp_path / "set.bin")
    assert summary == {"pairs": 20, "skipped": 1, "folds_kept": True}
    images, same = read_bin(tmp_path / "set.bin")
    kept = pairs.iloc[:20]  # already in fold order
    image_of = dict(zip(shards.image_ids, shards.images))
    assert images[0::2] == [image_of[i] for i in kept["image_id1"]]
    assert images[1::2] == [image_of[i] for i in kept["image_id2"]]
    assert same.astype(int).tolist() == kept["same"].tolist()
    back = load_bin(tmp_path / "set.bin", tmp_path / "back")
    assert back.pairs["fold"].tolist() == folds and back.pairs["same"].tolist() == kept["same"].tolist()
    files = dict(zip(back.images["image_id"], back.images["path"]))
    assert [open(files[i], "rb").read() for i in back.pairs["image_id1"]] == images[0::2]


def test_export_bin_orders_pairs_by_fold_and_says_when_folds_change(tmp_path):
    folds = [2, 1, 2, 1, 3, 3, 1]
    shards_dir = _shards(tmp_path, _pairs(folds))
    summary = export_bin(shards_dir, tmp_path / "set.bin")
    assert summary == {"pairs": 7, "skipped": 0, "folds_kept": False}
    images, _ = read_bin(tmp_path / "set.bin")
    shards = read_shards(shards_dir)
    image_of = dict(zip(shards.image_ids, shards.images))
    order = [1, 3, 6, 0, 2, 4, 5]  # stable by fold, worked out by hand
    assert images[0::2] == [image_of[_pairs(folds)["image_id1"][k]] for k in order]


def test_export_bin_needs_labelled_pairs(tmp_path):
    with pytest.raises(ShardError, match="no pairs.csv; a .bin holds a test set's pairs"):
        export_bin(_shards(tmp_path / "a", None), tmp_path / "a.bin")
    unlabelled = _pairs([1, 1]).assign(same=pd.array([pd.NA, pd.NA], dtype="Int64"))
    with pytest.raises(ShardError, match="unlabelled pairs; a .bin needs a same/different label"):
        export_bin(_shards(tmp_path / "b", unlabelled), tmp_path / "b.bin")
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "b.bin").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_export_command(tmp_path):
    shards_dir = _shards(tmp_path, _pairs([1, 2, 3]))
    done = _cli("rec", shards_dir, tmp_path / "rec")
    assert done.returncode == 0, done.stderr
    assert "12 images, 3 classes" in done.stdout and (tmp_path / "rec" / "train.idx").is_file()
    bad = _cli("zip", shards_dir, tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: export format 'zip': expected one of rec, bin"
