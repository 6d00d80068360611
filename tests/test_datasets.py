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


def _label_sorted_csv(tmp_path: Path, n_same: int, n_diff: int, *, fold_column: list[int] | None = None) -> Path:
    """A pairs CSV listing all same pairs first, then all different pairs (distinct rows)."""
    for name in ("a/1.jpg", "b/1.jpg"):
        write_image(tmp_path / name, PIXELS)
    labels = [1] * n_same + [0] * n_diff
    lines = ["path1,path2,same" + (",fold" if fold_column else "")]
    for k, label in enumerate(labels):
        row = f"a/1.jpg,{'a' if label else 'b'}/x{k}.jpg,{label}"
        lines.append(row + (f",{fold_column[k]}" if fold_column else ""))
    csv = tmp_path / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_pairs_csv_without_fold_column_gets_stratified_folds(tmp_path):
    # 23 same then 37 different pairs, 10 folds: by file order the first folds would hold
    # only same pairs and the last ones only different pairs.
    csv = _label_sorted_csv(tmp_path, 23, 37)
    image_set = load_pairs_csv(csv, seed=5)
    pairs = image_set.pairs
    assert image_set.folds_assigned == "stratified by label, seed 5"
    assert pairs["same"].tolist() == [1] * 23 + [0] * 37  # rows stay in file order
    assert sorted(pairs["fold"].unique()) == list(range(1, 11))
    counts = pairs.groupby("fold")["same"].agg(["sum", "size"])
    same_per_fold, size_per_fold = counts["sum"].to_numpy(), counts["size"].to_numpy()
    diff_per_fold = size_per_fold - same_per_fold
    assert set(same_per_fold) <= {2, 3} and same_per_fold.sum() == 23  # 23 / 10 per fold
    assert set(diff_per_fold) <= {3, 4} and diff_per_fold.sum() == 37  # 37 / 10 per fold
    assert set(size_per_fold) == {6}  # 60 / 10: equal folds


def test_pairs_csv_fold_assignment_is_seeded(tmp_path):
    csv = _label_sorted_csv(tmp_path, 20, 20)
    first = load_pairs_csv(csv, seed=1).pairs["fold"].tolist()
    assert load_pairs_csv(csv, seed=1).pairs["fold"].tolist() == first
    assert load_pairs_csv(csv, seed=2).pairs["fold"].tolist() != first
    # Uneven sizes: folds differ by at most one pair, and so does each class.
    folds = load_pairs_csv(_label_sorted_csv(tmp_path, 7, 16), default_folds=4, seed=0).pairs
    sizes = folds.groupby("fold")["same"].agg(["sum", "size"])
    assert sizes["size"].max() - sizes["size"].min() <= 1
    assert sizes["sum"].max() - sizes["sum"].min() <= 1
    assert (sizes["size"] - sizes["sum"]).max() - (sizes["size"] - sizes["sum"]).min() <= 1


def test_pairs_csv_keeps_its_fold_column(tmp_path):
    given = [3, 1, 2, 2, 1, 3]
    csv = _label_sorted_csv(tmp_path, 3, 3, fold_column=given)
    for seed in (0, 9):
        image_set = load_pairs_csv(csv, seed=seed)
        assert image_set.pairs["fold"].tolist() == given
        assert image_set.folds_assigned == "from file"


def test_data_stage_records_how_folds_were_assigned(tmp_path):
    import json

    from pipeline.config import Params
    from pipeline.data import run_data

    _lfw_tree(tmp_path / "lfw", {"Alice": 2, "Bob": 2, "Carol": 2})
    (tmp_path / "lfw_pairs.txt").write_text(PAIRS_2_FOLDS)
    sorted_csv = _label_sorted_csv(tmp_path / "csv", 4, 4)
    params = Params.model_validate({
        "seeds": {"data": 7, "train": [0]},
        "train_losses": ["softmax"],
        "data": {
            "train": {"kind": "folder", "path": str(tmp_path / "lfw")},
            "tests": {
                "lfw": {"kind": "lfw", "path": str(tmp_path / "lfw"), "pairs": str(tmp_path / "lfw_pairs.txt")},
                "web": {"kind": "pairs_csv", "path": str(sorted_csv), "exclude_identities_of": ["train"]},
            },
        },
    })
    resolved = {name: run_data(params, name, tmp_path / "out" / name, progress=False) for name in params.data_sets}
    summary = {name: json.loads((tmp_path / "out" / name / "summary.json").read_text()) for name in params.data_sets}
    assert "folds_assigned" not in summary["train"]  # no pairs
    assert summary["lfw"]["folds_assigned"] == "from file"
    assert summary["web"]["folds_assigned"] == "stratified by label, seed 7"
    # The data seed drives the deal: the same folds as the adapter given that seed.
    assert resolved["web"].pairs["fold"].tolist() == load_pairs_csv(sorted_csv, seed=7).pairs["fold"].tolist()


def test_unlabelled_pairs_csv_is_a_dataset(tmp_path):
    from pipeline.datasets.pairs_csv import has_labels

    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg"):
        write_image(tmp_path / name, PIXELS)
    csv = tmp_path / "pairs.csv"
    csv.write_text("path1,path2\na/1.jpg,a/2.jpg\na/1.jpg,b/1.jpg\nb/1.jpg,a/2.jpg\n")
    assert not has_labels(csv)
    image_set = load_pairs_csv(csv, seed=3)
    assert not image_set.labelled
    assert image_set.pairs["same"].isna().all() and len(image_set.pairs) == 3
    assert image_set.pairs["fold"].tolist() == [1, 1, 1]
    assert image_set.folds_assigned == "none (no labels)"
    csv.write_text("path1,path2,fold\na/1.jpg,a/2.jpg,2\na/1.jpg,b/1.jpg,1\n")
    assert load_pairs_csv(csv).pairs["fold"].tolist() == [2, 1]
    csv.write_text(" PATH1 , Path2 , Same \na/1.jpg,a/2.jpg,1\n")
    assert has_labels(csv) and load_pairs_csv(csv).labelled
    csv.write_text("path1,path2,same\na/1.jpg,a/2.jpg,1\na/1.jpg,b/1.jpg,\n")  # a same column must be filled
    with pytest.raises(DatasetError, match=r"pairs.csv:3: same = ''"):
        load_pairs_csv(csv)


def test_unlabelled_pairs_go_through_the_data_stage(tmp_path):
    import json

    from pipeline.config import Params
    from pipeline.data import read_index, run_data

    _lfw_tree(tmp_path / "lfw", {"Alice": 2, "Bob": 2})
    for name in ("x/1.jpg", "y/1.jpg"):
        write_image(tmp_path / "web" / name, PIXELS)
    (tmp_path / "web" / "pairs.csv").write_text("path1,path2\nx/1.jpg,y/1.jpg\ny/1.jpg,x/1.jpg\n")
    params = Params.model_validate({
        "seeds": {"data": 0, "train": [0]}, "train_losses": ["softmax"],
        "data": {"train": {"kind": "folder", "path": str(tmp_path / "lfw")},
                 "tests": {"web": {"kind": "pairs_csv", "path": str(tmp_path / "web" / "pairs.csv")}}},
    })
    for name in params.data_sets:
        run_data(params, name, tmp_path / "out" / name, progress=False)
    summary = {name: json.loads((tmp_path / "out" / name / "summary.json").read_text()) for name in params.data_sets}
    assert summary["web"]["labelled"] is False and summary["web"]["pairs"] == 2
    assert "labelled" not in summary["train"]
    lines = (tmp_path / "out" / "web" / "pairs.csv").read_text().splitlines()
    assert lines == ["fold,image_id1,image_id2,same", "1,x/1.jpg,y/1.jpg,", "1,y/1.jpg,x/1.jpg,"]
    back = read_index("web", tmp_path / "out" / "web")
    assert not back.labelled and back.pairs["same"].isna().all()


def _one_line_error(check, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as err:
        check(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_pairs_csv_header_check_agrees_with_the_loader(tmp_path):
    from pipeline.datasets.pairs_csv import check_header

    for name in ("a/1.jpg", "a/2.jpg"):
        write_image(tmp_path / name, PIXELS)
    csv = tmp_path / "pairs.csv"
    bad = {"path1,same\na/1.jpg,1\n": "missing column(s) path2",            # the audit's case
           "left,right\na/1.jpg,a/2.jpg\n": "missing column(s) path1, path2",
           "path1,path2,same\n": "no pairs",                                  # header only
           "": "cannot be read as CSV",                                       # empty file
           '"path1,path2\n': "cannot be read as CSV"}                         # unterminated quote
    for text, needle in bad.items():
        csv.write_text(text)
        message = _one_line_error(check_header, csv)
        assert str(csv) in message and needle in message, (text, message)
        with pytest.raises(DatasetError):  # the full read refuses it too
            load_pairs_csv(csv)
    assert "pairs CSV not found" in _one_line_error(check_header, tmp_path / "absent.csv")
    csv.write_text(" Path1 , PATH2 \na/1.jpg,a/2.jpg\n")
    check_header(csv)
    assert len(load_pairs_csv(csv).pairs) == 1
    assert "root 'nowhere': folder not found" in _one_line_error(check_header, csv, root="nowhere")


def test_lfw_and_folder_layout_checks(tmp_path):
    from pipeline.datasets import folder, lfw

    _lfw_tree(tmp_path / "lfw", {"Alice": 2, "Bob": 2, "Carol": 2})
    pairs = tmp_path / "pairs.txt"  # the default place: beside the image folder
    pairs.write_text(PAIRS_2_FOLDS)
    lfw.check_layout(tmp_path / "lfw")
    lfw.check_layout(tmp_path / "lfw", pairs, folds=[2])
    assert "no fold 3 (the file has 2)" in _one_line_error(lfw.check_layout, tmp_path / "lfw", folds=[3])
    pairs.write_text("2\t1\nAlice\t1\t2\nAlice\t1\tBob\t1\n")  # the header promises 4 pairs
    assert "header says 2 folds x 2 pairs = 4 lines, found 2" in _one_line_error(lfw.check_layout, tmp_path / "lfw")
    pairs.write_text("1\t1\nAlice\t1\nAlice\t1\tBob\t1\n")
    assert f"{pairs}:2: expected 'name i j'" in _one_line_error(lfw.check_layout, tmp_path / "lfw")
    pairs.write_text("1\t1\nDave\t1\t2\nDave\t1\tEve\t1\n")  # names nobody in the folder
    message = _one_line_error(lfw.check_layout, tmp_path / "lfw")
    assert "none of the images named" in message and str(pairs) in message
    with pytest.raises(DatasetError, match="none of the images named"):
        load_lfw(tmp_path / "lfw", pairs)
    pairs.unlink()
    assert f"{pairs}: pairs file not found" in _one_line_error(lfw.check_layout, tmp_path / "lfw")
    assert "LFW image folder not found" in _one_line_error(lfw.check_layout, tmp_path / "nope", pairs)

    folder.check_layout(tmp_path / "lfw", min_images_per_identity=2)
    message = _one_line_error(folder.check_layout, tmp_path / "lfw", min_images_per_identity=3)
    assert "no identity sub-folders with at least 3 images" in message
    with pytest.raises(DatasetError):
        load_folder(tmp_path / "lfw", min_images_per_identity=3)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    assert "no identity sub-folders with images" in _one_line_error(folder.check_layout, tmp_path / "flat")
    assert "folder not found" in _one_line_error(folder.check_layout, tmp_path / "absent")


def test_validate_stops_at_a_pairs_csv_without_path2(tmp_path):
    """`python -m pipeline validate` refuses the file in one line (exit 2), before any stage runs."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    write_image(tmp_path / "web" / "a.jpg", PIXELS)
    (tmp_path / "web" / "pairs.csv").write_text("path1,same\na.jpg,1\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["tests"]["web"] = {"kind": "pairs_csv", "path": str(tmp_path / "web" / "pairs.csv")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = lambda: subprocess.run([sys.executable, "-m", "pipeline", "validate", "-p", "params.yaml"],  # noqa: E731
                                 cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                 env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    result = run()
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: params.yaml: data.tests.web: ")
    assert "missing column(s) path2" in result.stderr
    assert str(tmp_path / "web" / "pairs.csv") in result.stderr
    (tmp_path / "web" / "pairs.csv").write_text("path1,path2,same\na.jpg,a.jpg,1\n")
    result = run()
    assert result.returncode == 0, result.stderr


def test_label_noise_gives_that_share_of_training_images_another_identity():
    import numpy as np
    import pandas as pd

    from pipeline.data import with_label_noise
    from pipeline.datasets import ImageSet

    rows = [(f"id{k % 7}/{k}", f"/x/{k}.jpg", f"id{k % 7}") for k in range(200)]
    clean = ImageSet(pd.DataFrame(rows, columns=["image_id", "path", "identity"]))
    noisy, changed = with_label_noise(clean, 0.2, seed=3)
    moved = noisy.images["identity"] != clean.images["identity"]
    assert changed == 40 and int(moved.sum()) == 40  # exactly 20%, and never to the same identity
    assert set(noisy.images["identity"]) <= set(clean.images["identity"])
    assert noisy.images["image_id"].tolist() == clean.images["image_id"].tolist()  # same images, same order
    again, _ = with_label_noise(clean, 0.2, seed=3)
    assert again.images.equals(noisy.images)  # seeded
    other, _ = with_label_noise(clean, 0.2, seed=4)
    assert not other.images.equals(noisy.images)
    # the wrong identities are spread over the others, not all sent to one
    assert len(set(noisy.images.loc[moved, "identity"])) >= 5
    assert np.isclose(with_label_noise(clean, 0.4, seed=3)[1], 80)
