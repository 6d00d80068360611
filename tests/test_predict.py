"""``python -m pipeline predict`` on a handful of synthetic faces, with a model trained here.

The reference is assembled in the test from lower-level pieces: MTCNN landmarks, the
template warp, a JPEG round trip, the network's forward pass on the image and its
mirror, and the cosine of the two embeddings, written out with numpy, so a predict
command that pairs the wrong images, forgets the flip, aligns at another size or uses
another threshold rule gives other numbers.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

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
    assert result.returncode == 0, result.stderr
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
    assert (f"accuracy {(tp + tn) / len(d):.4f} on the {len(d)} decided labelled pairs at threshold {threshold:g}: "
            f"TP {tp}, FP {fp}, TN {tn}, FN {fn}") in result.stdout
    assert "7 pairs, 6 decided, 1 n/a (1 images without a face, 0 unreadable, of 7 images)" in result.stdout

    # unlabelled, at a threshold equal to one pair's score exactly: that pair is "different" (score > t)
    exact = float(table["score"].dropna().sort_values().iloc[2])
    result = _cli(tmp_path, "--model", str(model), "--pairs", "lists/open.csv", "--threshold", repr(exact),
                  "--out", "open_predictions.txt")
    assert result.returncode == 0, result.stderr
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
    # a score stage's thresholds.json: that variant's threshold
    (tmp_path / "thresholds.json").write_text('{"cosine_norm": {"threshold": "-inf", "source": "validation"}}')
    result = _cli(tmp_path, "--model", str(model), "--pairs", "p.csv", "-t", "thresholds.json", "-o", "all.txt")
    assert result.returncode == 0, result.stderr
    assert read_predictions(tmp_path / "all.txt")["decision"].tolist() == ["1", "1", "1"]
    # a missing model file: one line naming it
    result = _cli(tmp_path, "--model", "nowhere/model.pt", "--pairs", "p.csv", "-t", "0.5")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "nowhere/model.pt" in lines[0]
