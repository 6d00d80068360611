"""Dataset adapters: folder, LFW (pairs.txt, folds, download), pairs CSV."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import DatasetError
from pipeline.datasets.folder import load_folder
from pipeline.datasets.lfw import download_lfw, load_lfw, parse_pairs
from pipeline.datasets.pairs_csv import load_pairs_csv
from tests.conftest import write_image

PIXELS = np.zeros((8, 8, 3), dtype=np.uint8)


def _lfw_tree(root: Path, people: dict[str, int]) -> Path:
    for name, count in people.items():
        for k in range(1, count + 1):
            write_image(root / name / f"{name}_{k:04d}.jpg", PIXELS)
    return root


PAIRS_2_FOLDS = """2\t1
Alice\t1\t2
Alice\t1\tBob\t1
Carol\t1\t2
Bob\t2\tCarol\t2
"""


def test_folder_lists_every_file(tmp_path):
    _lfw_tree(tmp_path, {"Alice": 2, "Bob": 1})
    (tmp_path / "Bob" / "notes.txt").write_text("not an image")
    (tmp_path / "Bob" / ".hidden.jpg").write_text("skipped")
    images = load_folder(tmp_path).images
    assert sorted(images["identity"].unique()) == ["Alice", "Bob"]
    assert "Bob/notes.txt" in set(images["image_id"])  # rejected later, with a reason
    assert not any(".hidden" in i for i in images["image_id"])
    only_pairs = load_folder(tmp_path, min_images_per_identity=2).images
    assert set(only_pairs["identity"]) == {"Alice", "Bob"}  # Bob has 2 files (one is text)


def test_folder_errors_name_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"no_such.*one sub-folder per identity"):
        load_folder(tmp_path / "no_such")
    (tmp_path / "flat.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="no identity sub-folders"):
        load_folder(tmp_path)


def test_parse_pairs_folds_and_labels(tmp_path):
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text(PAIRS_2_FOLDS)
    pairs = parse_pairs(pairs_file)
    assert pairs["fold"].tolist() == [1, 1, 2, 2]
    assert pairs["same"].tolist() == [1, 0, 1, 0]
    assert pairs.iloc[1]["image_id2"] == "Bob/Bob_0001.jpg"


@pytest.mark.parametrize(
    "text,needle",
    [("2\t1\nAlice\t1\t2\n", "header says 2 folds"), ("1\t1\nAlice\tone\t2\nA\t1\tB\t1\n", ":2:"),
     ("1\t1\nAlice\t1\nA\t1\tB\t1\n", "expected 'name i j'")],
)
def test_malformed_pairs_file(tmp_path, text, needle):
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text(text)
    with pytest.raises(DatasetError, match=needle):
        parse_pairs(pairs_file)


def test_load_lfw_selects_folds(tmp_path):
    root = _lfw_tree(tmp_path / "lfw", {"Alice": 2, "Bob": 2, "Carol": 2})
    (tmp_path / "pairs.txt").write_text(PAIRS_2_FOLDS)
    fold2 = load_lfw(root, tmp_path / "pairs.txt", folds=[2])
    assert fold2.pairs["fold"].unique().tolist() == [2]
    assert set(fold2.images["identity"]) == {"Bob", "Carol"}
    with pytest.raises(DatasetError, match="no fold 3"):
        load_lfw(root, tmp_path / "pairs.txt", folds=[3])


def test_download_lfw_from_a_local_archive(tmp_path):
    source = _lfw_tree(tmp_path / "src" / "lfw", {"Alice": 2, "Bob": 2, "Carol": 2})
    archive = tmp_path / "lfw.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="lfw")
    (tmp_path / "pairs_src.txt").write_text(PAIRS_2_FOLDS)
    dest = tmp_path / "downloaded"
    root = download_lfw(dest, archive_url=archive.as_uri(), pairs_url=(tmp_path / "pairs_src.txt").as_uri())
    image_set = load_lfw(root, dest / "pairs.txt")
    assert len(image_set.pairs) == 4 and all(Path(p).is_file() for p in image_set.images["path"])
    with pytest.raises(DatasetError, match="download failed"):
        download_lfw(tmp_path / "other", archive_url=(tmp_path / "missing.tgz").as_uri(),
                     pairs_url=(tmp_path / "missing.txt").as_uri())


def test_real_lfw_pairs_file(lfw_dev):
    pairs = parse_pairs(lfw_dev / "pairs.txt")
    assert pairs["fold"].nunique() == 8 and len(pairs) == 4800
    assert pairs.groupby("fold")["same"].mean().eq(0.5).all()
    image_set = load_lfw(lfw_dev / "images", lfw_dev / "pairs.txt", folds=[7, 8])
    assert len(image_set.pairs) == 1200


def test_pairs_csv(tmp_path):
    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg"):
        write_image(tmp_path / name, PIXELS)
    csv = tmp_path / "pairs.csv"
    csv.write_text("path1,path2,same\na/1.jpg,a/2.jpg,same\na/1.jpg,b/1.jpg,0\n")
    image_set = load_pairs_csv(csv)
    assert image_set.pairs["same"].tolist() == [1, 0]
    assert image_set.images["identity"].tolist() == ["a", "a", "b"]
    csv.write_text("path1,path2,same\na/1.jpg,a/2.jpg,maybe\n")
    with pytest.raises(DatasetError, match=r"pairs.csv:2: same = 'maybe'"):
        load_pairs_csv(csv)
    csv.write_text("left,right,label\nx,y,1\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_pairs_csv(csv)
