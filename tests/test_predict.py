"""``python -m pipeline predict`` on a handful of synthetic faces, with a model trained here.

The reference is assembled in the test from lower-level pieces: MTCNN landmarks, the
template warp, a JPEG round trip, the network's forward pass on the image and its
mirror, and the cosine of the two embeddings, written out with numpy, so a predict
command that pairs the wrong images, forgets the flip, aligns at another size or uses
another threshold rule gives other numbers.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.align import Crop
from pipeline.predict import rejects_path
from pipeline.predictions import read_predictions
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]
LABELLED = [("A/0.png", "A/1.png", 1), ("A/0.png", "B/0.png", 0), ("B/0.png", "B/1.png", 1),
            ("C/0.png", "blank.png", 0), ("B/1.png", "C/1.png", 0), ("C/0.png", "C/1.png", 1),
            ("A/1.png", "C/0.png", 0)]


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Three synthetic people, two photos each, and one image without a face."""
    from pipeline.datasets import synthetic

    root = tmp_path_factory.mktemp("faces")
    for k, person in enumerate("ABC"):
        rng = np.random.default_rng(100 + k)
        identity = synthetic.sample_identity(rng, "a")
        for n in range(2):
            photo = synthetic.render_face(identity, synthetic.sample_variation(rng, "a"), 160)
            write_image(root / person / f"{n}.png", photo)
    write_image(root / "blank.png", np.full((160, 160, 3), 120, np.uint8))
    return root


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "predict", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FACEPIPE_THREADS": "2",
                                          "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=600)


def _reference_scores(faces: Path, model_path: Path) -> dict[str, float | None]:
    """Flip-fused embedding of each image (None: no face), built step by step."""
    from pipeline.align import template
    from pipeline.config import DetectParams
    from pipeline.detect import TorchDetector, choose_face
    from pipeline.images import load_rgb
    from pipeline.train import load_model

    model, saved = load_model(model_path)
    size = saved["image_size"]
    detector = TorchDetector(DetectParams(), device="cpu", threads=2)
    out = {}
    for name in ["A/0.png", "A/1.png", "B/0.png", "B/1.png", "C/0.png", "C/1.png", "blank.png"]:
        image, _ = load_rgb(faces / name)
        face = choose_face(detector.detect([image])[0], image.shape[:2], DetectParams().min_confidence)
        if face is None:
            out[name] = None
            continue
        src = np.asarray(face.landmarks, np.float64)
        matrix, _ = cv2.estimateAffinePartial2D(src, template(size), method=cv2.LMEDS)  # similarity, other solver
        crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR)
        crop = cv2.cvtColor(cv2.imdecode(cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                                                      [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB)
        x = (torch.from_numpy(crop).permute(2, 0, 1)[None].float() - 127.5) / 128.0
        with torch.no_grad():
            out[name] = (model(x) + model(torch.flip(x, dims=[3])))[0].double().numpy()
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_predict_labelled_and_unlabelled_pairs(faces, tiny_model, tmp_path):
    model = tiny_model["model"]
    lists = tmp_path / "lists"
    lists.mkdir()
    rel = lambda name: f"../faces_link/{name}"  # noqa: E731 - relative to the CSV's folder
    (tmp_path / "faces_link").symlink_to(faces)
    pd.DataFrame([(rel(a), rel(b), s) for a, b, s in LABELLED], columns=["path1", "path2", "same"]).to_csv(
        lists / "labelled.csv", index=False)
    pd.DataFrame([(rel(a), rel(b)) for a, b, _ in LABELLED], columns=["path1", "path2"]).to_csv(
        lists / "open.csv", index=False)
    reference = _reference_scores(faces, model)
    assert reference["blank.png"] is None and all(v is not None for k, v in reference.items() if k != "blank.png")
    expected = [None if reference[a] is None or reference[b] is None else _cosine(reference[a], reference[b])
                for a, b, _ in LABELLED]
    decided = [s for s in expected if s is not None]
    threshold = float(np.median(decided))  # a threshold with pairs on both sides

    result = _cli(tmp_path, "--model", str(model), "--pairs", "lists/labelled.csv", "--threshold", repr(threshold))
    assert result.returncode == 3, result.stderr  # one pair could not be decided (blank.png has no face)
    assert f"decision: same iff cosine similarity > {threshold:g} (--threshold)" in result.stdout
    out = tmp_path / "labelled_model_predict.txt"
    table = read_predictions(out)
    assert table["path1"].tolist() == [rel(a) for a, _, _ in LABELLED]  # as the pairs file lists them
    assert table["path2"].tolist() == [rel(b) for _, b, _ in LABELLED]
    assert table["same"].tolist() == [s for _, _, s in LABELLED]
    for row, want in zip(table.itertuples(), expected):
        if want is None:
            assert math.isnan(row.score) and row.decision == "n/a"
        else:
            assert row.score == pytest.approx(want, abs=3e-6)  # skipping the JPEG round trip moves it ~1e-5
            assert row.decision == ("1" if row.score > threshold else "0")
    assert (table["decision"] == "1").any() and (table["decision"] == "0").any()
    decided_rows = table[table["decision"] != "n/a"]
    d, y = decided_rows["decision"] == "1", decided_rows["same"] == 1
    tp, fp, tn, fn = int((d & y).sum()), int((d & ~y).sum()), int((~d & ~y).sum()), int((~d & y).sum())
    assert (f"accuracy {(tp + tn) / len(d):.4f} on the {len(d)} decided labelled pairs (same iff cosine similarity "
            f"> {threshold:g}): TP {tp}, FP {fp}, TN {tn}, FN {fn}") in result.stdout
    assert ("7 pairs, 6 decided, 1 n/a; 1 of 7 images rejected (1 without a face, 0 unreadable or missing, "
            "0 not aligned), listed in labelled_model_predict_rejects.csv") in result.stdout
    rejects = pd.read_csv(tmp_path / "labelled_model_predict_rejects.csv")
    blank = f"lists/{rel('blank.png')}"  # the file read: the CSV's folder joined with the path it lists
    assert rejects.to_dict("records") == [{"image": rel("blank.png"), "path": blank, "reason": "no face found",
                                           "pairs": 1}]
    assert f"rejected: {blank}: no face found (1 pair n/a)" in result.stderr.splitlines()

    # unlabelled, at a threshold equal to one pair's score exactly: that pair is "different" (score > t)
    exact = float(table["score"].dropna().sort_values().iloc[2])
    result = _cli(tmp_path, "--model", str(model), "--pairs", "lists/open.csv", "--threshold", repr(exact),
                  "--out", "open_predictions.txt")
    assert result.returncode == 3, result.stderr
    unlabelled = read_predictions(tmp_path / "open_predictions.txt")
    assert unlabelled["same"].isna().all() and "accuracy" not in result.stdout
    pd.testing.assert_frame_equal(unlabelled[["path1", "path2", "score"]], table[["path1", "path2", "score"]])
    assert unlabelled["decision"].tolist() == ["n/a" if math.isnan(s) else ("1" if s > exact else "0")
                                               for s in unlabelled["score"]]
    assert unlabelled.loc[unlabelled["score"] == exact, "decision"].tolist() == ["0"]
    assert "1 n/a" in result.stdout


def test_predict_threshold_sources_and_errors(faces, tiny_model, tmp_path):
    model = tiny_model["model"]
    pd.DataFrame([(str(faces / a), str(faces / b), s) for a, b, s in LABELLED[:3]],
                 columns=["path1", "path2", "same"]).to_csv(tmp_path / "p.csv", index=False)
    # without --threshold and with a trainer-saved model: one line, exit 2, nothing written
    result = _cli(tmp_path, "--model", str(model), "--pairs", "p.csv")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--threshold" in lines[0] and str(model) in lines[0]
    assert not list(tmp_path.glob("*_predict.txt"))
    # a model file that stores a threshold (as the trainer could): used without --threshold
    saved = torch.load(model, weights_only=False)
    saved["threshold"] = {"value": 2.0, "distance": "cosine", "normalize": True}  # cosine <= 1: all different
    torch.save(saved, tmp_path / "with_threshold.pt")
    result = _cli(tmp_path, "--model", "with_threshold.pt", "--pairs", "p.csv")
    assert result.returncode == 0, result.stderr
    assert read_predictions(tmp_path / "p_with_threshold_predict.txt")["decision"].tolist() == ["0", "0", "0"]
    assert (tmp_path / "p_with_threshold_predict_rejects.csv").read_text() == "image,path,reason,pairs\n"  # none
    # a score stage's thresholds.json: that variant's threshold
    (tmp_path / "thresholds.json").write_text('{"cosine_norm": {"threshold": "-inf", "source": "validation"}}')
    result = _cli(tmp_path, "--model", str(model), "--pairs", "p.csv", "-t", "thresholds.json", "-o", "all.txt")
    assert result.returncode == 0, result.stderr
    assert read_predictions(tmp_path / "all.txt")["decision"].tolist() == ["1", "1", "1"]
    # a missing model file: one line naming it
    result = _cli(tmp_path, "--model", "nowhere/model.pt", "--pairs", "p.csv", "-t", "0.5")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "nowhere/model.pt" in lines[0]


# ----------------------------------------------------------------- pre-cropped faces, l2 and cosine
# The tiny model was trained on identities that are a colour plus a white stripe (tests/test_train.py
# _shards, rng seed 0); new crops of those identities, at other sizes than the model's 112 px, are a
# case where the right answer is known: same identity or not.
CROP_SIDES = {0: (110, 110), 1: (150, 150), 2: (110, 110), 3: (120, 100), 4: (110, 110), 5: (150, 150)}
CROP_PAIRS = [(i, i, 1) for i in range(6)] + [(i, (i + 1) % 6, 0) for i in range(6)] + [(3, 4, 0), (4, 3, 0)]


def _identity_colours() -> list[np.ndarray]:
    """The base colours of the tiny model's training identities (replaying _shards' draws)."""
    rng = np.random.default_rng(0)
    bases = []
    for _ in range(6):
        bases.append(rng.integers(40, 215, 3))
        for _ in range(8):
            rng.normal(0, 25, (112, 112, 3))
    return bases


def _identity_crop(base: np.ndarray, i: int, seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    column, stripe = round((i * 15) % 100 * width / 112), max(1, round(8 * width / 112))
    img[:, column : column + stripe] = 255
    return img


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Two tight crops per identity (``id<i>/<k>.png``), a truncated one, and a labelled pairs CSV."""
    root = tmp_path_factory.mktemp("crops")
    arrays = {}
    for i, base in enumerate(_identity_colours()):
        for k in range(2):
            arrays[f"id{i}/{k}.png"] = _identity_crop(base, i, 1000 + 10 * i + k, *CROP_SIDES[i])
            write_image(root / f"id{i}/{k}.png", arrays[f"id{i}/{k}.png"])
    whole = (root / "id0" / "0.png").read_bytes()
    (root / "id0" / "cut.png").write_bytes(whole[: len(whole) // 3])
    rows = [(f"id{a}/0.png", f"id{b}/1.png", same) for a, b, same in CROP_PAIRS] + [("id0/cut.png", "id1/0.png", 0)]
    pd.DataFrame(rows, columns=["path1", "path2", "same"]).to_csv(root / "pairs.csv", index=False)
    return root, arrays


def _crop_reference(arrays: dict[str, np.ndarray], model_path: Path) -> dict[str, np.ndarray]:
    """Flip-fused embedding of each crop, made here: the whole crop resized with OpenCV (squashed when
    it is not square), JPEG q95, the forward pass on it and its mirror."""
    from pipeline.train import load_model

    model, _ = load_model(model_path)
    out = {}
    for name, array in arrays.items():
        small = min(array.shape[:2]) < 112
        face = cv2.resize(array, (112, 112), interpolation=cv2.INTER_LINEAR if small else cv2.INTER_AREA)
        jpeg = cv2.imencode(".jpg", cv2.cvtColor(face, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
        face = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        x = (torch.from_numpy(face).permute(2, 0, 1)[None].float() - 127.5) / 128.0
        with torch.no_grad():
            out[name] = (model(x) + model(torch.flip(x, dims=[3])))[0].double().numpy()
    return out


def _gap_threshold(distances: list[float], labels: list[int]) -> float:
    """A distance between the farthest same pair and the nearest different pair (asserts there is a gap)."""
    far_same = max(d for d, y in zip(distances, labels) if y == 1)
    near_other = min(d for d, y in zip(distances, labels) if y == 0)
    assert far_same < near_other, "the tiny model no longer separates its identities: the known case is gone"
    return math.sqrt(far_same * near_other)  # geometric middle: the gap spans orders of magnitude


def test_precropped_l2_and_cosine_decide_a_known_case(crops, tiny_model, tmp_path):
    """Same identity or not, decided right with cosine, l2 on normalised and l2 on raw embeddings."""
    root, arrays = crops
    model = tiny_model["model"]
    ref = _crop_reference(arrays, model)
    unit = {k: v / np.linalg.norm(v) for k, v in ref.items()}
    names = [(f"id{a}/0.png", f"id{b}/1.png") for a, b, _ in CROP_PAIRS]
    labels = [y for _, _, y in CROP_PAIRS]
    raw_l2 = [float(np.linalg.norm(ref[a] - ref[b])) for a, b in names]
    unit_l2 = [float(np.linalg.norm(unit[a] - unit[b])) for a, b in names]
    d_unit, d_raw = _gap_threshold(unit_l2, labels), _gap_threshold(raw_l2, labels)
    cosine = 1 - d_unit**2 / 2  # on unit vectors ||a - b||^2 = 2 - 2 cos: the same split as a cosine
    runs = {"cosine_norm": (["--distance", "cosine"], repr(cosine), [1 - d**2 / 2 for d in unit_l2]),
            "l2_norm": (["--distance", "l2", "--norm"], repr(d_unit), [-d for d in unit_l2]),
            "l2_raw": (["--distance", "l2", "--no-norm"], repr(d_raw), [-d for d in raw_l2])}
    for variant, (flags, threshold, expected) in runs.items():
        out = tmp_path / f"{variant}.txt"
        result = _cli(tmp_path, "--model", str(model), "--pairs", str(root / "pairs.csv"), "--precropped",
                      *flags, "--threshold", threshold, "--out", str(out))
        assert result.returncode == 3, result.stderr  # the truncated crop's pair is n/a
        rule = "cosine similarity >" if variant == "cosine_norm" else "L2 distance <"
        assert f"decision: same iff {rule} {float(threshold):g}" in result.stdout, result.stdout
        assert f"{variant}, flip=True, pre-cropped faces, resize (fraction 1) to 112 px" in result.stdout
        table = read_predictions(out)
        assert table["decision"].tolist() == [str(y) for y in labels] + ["n/a"], variant  # the right answer
        assert "accuracy 1.0000 on the 14 decided labelled pairs" in result.stdout
        # and the scores are the reference's (cosine, or minus the distance), up to float32 rounding
        np.testing.assert_allclose(table["score"].to_numpy()[:-1], expected, rtol=1e-4, atol=1e-6)
        rejects = pd.read_csv(rejects_path(out))
        assert rejects["image"].tolist() == ["id0/cut.png"] and "truncated" in rejects["reason"].iloc[0]


def test_precropped_scores_equal_the_pipeline_stages(crops, tiny_model, tmp_path):
    """predict --precropped gives the numbers the data, detect, align, shard, embed and score stages
    give the same crops in a `precropped: true` set (both crop modes), and their decisions."""
    import yaml

    from pipeline.align import Crop, run_align
    from pipeline.config import load_params
    from pipeline.data import read_index, read_precropped, run_data
    from pipeline.detect import run_detect
    from pipeline.embed import run_embed
    from pipeline.predict import predict
    from pipeline.predictions import file_name
    from pipeline.score import ThresholdSource, run_score
    from pipeline.shards import run_shard

    root, _ = crops
    for crop in (Crop("resize"), Crop("center", 0.8)):
        work = tmp_path / crop.mode
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["data"]["train"] = {"kind": "folder", "path": str(root), "precropped": True}
        spec = {"crop": crop.mode, "crop_fraction": crop.fraction} if crop.mode == "center" else {}
        raw["data"]["tests"] = {"crops": {"kind": "pairs_csv", "path": str(root / "pairs.csv"), "precropped": True,
                                          **spec}}
        raw["report"].update(in_domain="crops", cross_domain=[], primary_distance="l2", primary_normalize=True)
        raw["score"]["threshold"] = {"source": "crops", "min_pairs": 10}
        raw["align"]["size"] = 112  # the tiny model's input size
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        params = load_params(work / "params.yaml", check_models=False)
        run_data(params, "crops", work / "datasets", progress=False)
        recorded = read_precropped("crops", work / "datasets")
        assert recorded == (crop.mode, crop.fraction)
        image_set = read_index("crops", work / "datasets")
        run_detect(params.detect, "crops", image_set.images, work / "detect", work / "detection.json",
                   progress=False, precropped=True)
        run_align(params.align, "crops", pd.read_parquet(work / "detect" / "detections.parquet"), work / "aligned",
                  work / "sheet.png", work / "alignment.json", progress=False, crop=Crop(*recorded), threads=1)
        where = dict(zip(image_set.images["image_id"], image_set.images["path"]))
        pairs = image_set.pairs.assign(path1=image_set.pairs["image_id1"].map(where),
                                       path2=image_set.pairs["image_id2"].map(where))
        run_shard(params.shard, "crops", work / "aligned", pairs, work / "shards", progress=False)
        run_embed(params.embed, tiny_model["model"], work / "shards", work / "embeddings", name="crops")
        run_score(params.score, "crops", work / "embeddings", ThresholdSource("crops", work / "embeddings", "crops"),
                  work / "scores", work / "metrics.json", seed=params.seeds.data, run="tiny", primary=("l2", True))
        stage = read_predictions(work / "scores" / file_name("crops", "tiny"))

        summary = predict(tiny_model["model"], root / "pairs.csv", threshold=str(work / "scores" / "thresholds.json"),
                          out=work / "predict.txt", params_path=work / "params.yaml", device="cpu", crop=crop)
        mine = read_predictions(work / "predict.txt")
        assert summary["rule"].startswith("same iff L2 distance < ") and summary["not_decided"] == 1
        assert mine["score"].isna().tolist() == stage["score"].isna().tolist() == [False] * 14 + [True]
        assert mine["score"].tolist()[:14] == stage["score"].tolist()[:14], crop  # the same numbers, bit for bit
        assert mine["decision"].tolist() == stage["decision"].tolist()
        assert len(set(mine["score"].dropna())) > 10  # not a degenerate case (e.g. every crop the same)


def test_l2_thresholds_are_distances_and_the_sign_trap_is_refused(tmp_path):
    """--threshold is a distance for l2 (score threshold = minus it); a negative one, or a positive L2
    score threshold in a thresholds.json / model file, stops with one line saying the convention."""
    from pipeline.config import ConfigError
    from pipeline.metrics import apply_threshold
    from pipeline.predict import resolve_threshold

    distances = np.array([0.2, 0.49, 0.5, 0.51, 1.3])
    rule = resolve_threshold("0.5", {}, "m.pt", "l2", True)
    assert rule.rule() == "same iff L2 distance < 0.5" and "--threshold is a distance" in rule.convention()
    # the decisions made on the pipeline's scores (minus the distances) are "distance < 0.5"
    assert apply_threshold(-distances, rule.value).tolist() == [True, True, False, False, False]
    cosine = resolve_threshold("0.5", {}, "m.pt", "cosine", True)
    assert cosine.value == 0.5 and cosine.rule() == "same iff cosine similarity > 0.5"
    assert resolve_threshold("-0.2", {}, "m.pt", "cosine", False).value == -0.2  # a cosine may be negative
    for bad in ("-0.5", "-inf"):
        with pytest.raises(ConfigError, match=r"with --distance l2 the threshold is an L2 distance .* cannot be "
                                              r"negative") as err:
            resolve_threshold(bad, {}, "m.pt", "l2", True)
        assert "\n" not in str(err.value)
    # a score stage's file holds score thresholds: minus distances for l2
    file = tmp_path / "thresholds.json"
    file.write_text('{"l2_norm": {"threshold": -0.8, "source": "validation"}, "l2_raw": {"threshold": 0.8}}')
    from_file = resolve_threshold(str(file), {}, "m.pt", "l2", True)
    assert from_file.value == -0.8 and from_file.rule() == "same iff L2 distance < 0.8"
    with pytest.raises(ConfigError, match=r"l2_raw threshold = 0.8 is positive, but L2 scores are minus distances"):
        resolve_threshold(str(file), {}, "m.pt", "l2", False)
    file.write_text('{"l2_raw": {"threshold": "inf", "source": "synth_open"}}')  # "all different" is allowed
    assert resolve_threshold(str(file), {}, "m.pt", "l2", False).value == math.inf
    stored = {"threshold": {"value": 0.7, "distance": "l2", "normalize": True}}
    with pytest.raises(ConfigError, match=r"m.pt: stored threshold = 0.7 is positive"):
        resolve_threshold(None, stored, "m.pt", "l2", True)


def test_negative_l2_threshold_stops_the_command(faces, tiny_model, tmp_path):
    pd.DataFrame([(str(faces / "A/0.png"), str(faces / "A/1.png"), 1)], columns=["path1", "path2", "same"]).to_csv(
        tmp_path / "p.csv", index=False)
    result = _cli(tmp_path, "--model", str(tiny_model["model"]), "--pairs", "p.csv", "--distance", "l2",
                  "--threshold", "-0.5")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --threshold -0.5: with --distance l2 the threshold is an L2 distance")
    from pipeline.config import ConfigError
    from pipeline.predict import PredictSettings, crop_of

    for args, needle in (((False, "center", None), "add --precropped"), ((True, None, 0.5), "--crop center only"),
                         ((True, "centre", None), "--crop 'centre'"), ((True, "center", 1.5), "(0, 1]")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            crop_of(*args)
    assert crop_of(True, "center", 0.8) == Crop("center", 0.8) and crop_of(True, None, None) == Crop("resize", 1.0)
    assert crop_of(False, None, None) is None
    with pytest.raises(ConfigError, match="--distance 'l1': expected cosine or l2"):
        PredictSettings.from_params(None, distance="l1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # nothing written


def test_rejected_images_are_named_and_listed(faces, tiny_model, tmp_path):
    """Missing, empty, non-image, truncated, too small and faceless files: the first five named on stderr,
    then a count; all six in the rejects file with their reason and the pairs they leave undecided;
    exit status 3."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not a picture")
    whole = (faces / "A" / "0.png").read_bytes()
    (bad / "cut.png").write_bytes(whole[: len(whole) // 3])
    write_image(bad / "tiny.png", np.full((5, 5, 3), 90, np.uint8))
    good, blank = str(faces / "A/0.png"), str(faces / "blank.png")
    files = {"bad/missing.jpg": "cannot read file (No such file or directory)", "bad/empty.jpg": "empty file (0 bytes)",
             "bad/notes.jpg": "not an image file (format not recognised)", "bad/cut.png": "corrupt or truncated image",
             "bad/tiny.png": "image too small (5x5; need at least 24 px a side)", blank: "no face found"}
    rows = [(good, str(faces / "A/1.png"))] + [(good, name) for name in files] + [("bad/missing.jpg", blank)]
    pd.DataFrame(rows, columns=["path1", "path2"]).to_csv(tmp_path / "p.csv", index=False)
    result = _cli(tmp_path, "--model", str(tiny_model["model"]), "--pairs", "p.csv", "-t", "0.5")
    assert result.returncode == 3, result.stderr
    rejects = pd.read_csv(tmp_path / "p_model_predict_rejects.csv").set_index("image")
    assert sorted(rejects.index) == sorted(files)
    for name, reason in files.items():
        assert rejects.loc[name, "reason"].startswith(reason), (name, rejects.loc[name, "reason"])
        assert rejects.loc[name, "pairs"] == (2 if name in ("bad/missing.jpg", blank) else 1)
        assert rejects.loc[name, "path"] == name  # the CSV's folder (here ".") joined with the path it lists
    stderr = result.stderr.splitlines()
    named = [ln for ln in stderr if ln.startswith("rejected: ") and not ln.startswith("rejected: ...")]
    assert len(named) == 5 and all(any(f"{path}: {rejects.loc[i, 'reason']}" in ln for i, path in
                                       rejects["path"].items()) for ln in named)
    assert f"rejected: ... and 1 more image(s); all 6 in p_model_predict_rejects.csv" in stderr
    assert stderr[-1] == ("predict: 7 of 8 pairs not decided (exit status 3); the reasons are in "
                          "p_model_predict_rejects.csv")
    table = read_predictions(tmp_path / "p_model_predict.txt")
    assert table["decision"].tolist()[1:] == ["n/a"] * 7 and table["decision"].iloc[0] in ("0", "1")
    assert "6 of 8 images rejected (1 without a face, 5 unreadable or missing, 0 not aligned)" in result.stdout
