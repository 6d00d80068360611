"""Pre-cropped sets: no MTCNN, no warp; each crop resized (or centre-cropped and resized) to align.size."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.align import Crop, read_index, run_align
from pipeline.config import ConfigError, Params, load_params
from tests.conftest import ROOT, synthetic_face, write_image

SIZE = 64  # align.size: smaller than some crops, larger than others


@pytest.fixture
def crops(tmp_path):
    """Face crops at three sizes (one not square) and one truncated file, with a pairs CSV."""
    root = tmp_path / "crops"
    arrays = {
        "ann/a1.png": synthetic_face(1, 200),                     # 200x200: shrunk (INTER_AREA)
        "ann/a2.png": synthetic_face(2, 160)[:120, 5:155],        # 150 wide x 120 high: shrunk
        "bob/b1.png": synthetic_face(3, 96)[:, :80],               # 80 x 96: enlarged (INTER_LINEAR)
        "bob/b2.png": synthetic_face(4, 200),
    }
    for name, array in arrays.items():
        write_image(root / name, array)
    whole = (root / "bob" / "b2.png").read_bytes()
    (root / "bob" / "b3.png").write_bytes(whole[: len(whole) // 4])  # truncated: rejected, counted
    pd.DataFrame({"path1": ["ann/a1.png", "ann/a1.png", "bob/b1.png"],
                  "path2": ["ann/a2.png", "bob/b1.png", "bob/b3.png"],
                  "same": [1, 0, 1], "fold": [1, 1, 2]}).to_csv(root / "pairs.csv", index=False)
    return root, arrays


def _params(tmp_path, root, **test_spec) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["train"] = {"kind": "folder", "path": str(root), "precropped": True}
    raw["data"]["tests"] = {"crops": {"kind": "pairs_csv", "path": str(root / "pairs.csv"), "precropped": True,
                                      **test_spec}}
    raw["report"].update(in_domain="crops", cross_domain=[])
    raw["align"].update(size=SIZE, contact_sheet=8, chunk_size=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path, check_models=False)


def _expected(array: np.ndarray, crop: Crop) -> np.ndarray:
    """The crop made here with OpenCV directly (not through the stage's code)."""
    h, w = array.shape[:2]
    if crop.mode == "center":
        side = int(round(crop.fraction * min(h, w)))
        top, left = (h - side) // 2, (w - side) // 2
        array = array[top : top + side, left : left + side]
    shrink = min(array.shape[:2]) >= SIZE
    return cv2.resize(array, (SIZE, SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@pytest.mark.parametrize("crop", [Crop("resize"), Crop("center", 0.8)])
def test_precropped_sets_skip_mtcnn_and_are_resized(tmp_path, crops, monkeypatch, crop):
    import pipeline.detect as detect_module
    from pipeline.data import read_index as read_dataset, read_precropped, run_data

    root, arrays = crops
    spec = {"crop": crop.mode, "crop_fraction": crop.fraction} if crop.mode == "center" else {}
    params = _params(tmp_path, root, **spec)
    data_dir = tmp_path / "data" / "datasets"
    for name in ("train", "crops"):
        run_data(params, name, data_dir / name, progress=False)
    recorded = {name: read_precropped(name, data_dir / name) for name in ("train", "crops")}
    assert recorded == {"train": ("resize", 1.0), "crops": (crop.mode, crop.fraction)}
    summary = json.loads((data_dir / "crops" / "summary.json").read_text())
    assert summary["precropped"] is True and summary["crop"] == crop.mode

    def no_mtcnn(*args, **kwargs):
        raise AssertionError("MTCNN must not run on a pre-cropped set")

    monkeypatch.setattr(detect_module, "make_detector", no_mtcnn)
    counts = {name: detect_module.run_detect(params.detect, name, read_dataset(name, data_dir / name).images,
                                             tmp_path / "detect" / name, tmp_path / f"detection-{name}.json",
                                             progress=False, precropped=True)
              for name in ("train", "crops")}
    expected_sizes = {"200x200": 2, "150x120": 1, "80x96": 1}
    reasons = counts["train"].pop("reasons")
    assert counts["train"] == {"images": 5, "faces": 4, "dropped": 1, "precropped": True,
                               "source_sizes": expected_sizes}
    assert list(reasons.values()) == [1] and "corrupt or truncated" in next(iter(reasons))
    counts["train"]["reasons"] = reasons
    assert counts["crops"]["faces"] == 3 and counts["crops"]["dropped"] == 1  # the pairs name 4 images
    for name in counts:
        assert json.loads((tmp_path / f"detection-{name}.json").read_text()) == counts[name]
    table = pd.read_parquet(tmp_path / "detect" / "train" / "detections.parquet").set_index("image_id")
    assert table.loc["ann/a2.png", "status"] == "precropped"
    assert table.loc["ann/a2.png", ["box_x", "box_y", "box_w", "box_h"]].tolist() == [0, 0, 150, 120]
    assert table.loc["ann/a2.png", "left_eye_x":"mouth_right_y"].isna().all()
    assert table.loc["bob/b3.png", "status"] == "rejected"

    stats = {name: run_align(params.align, name, pd.read_parquet(tmp_path / "detect" / name / "detections.parquet"),
                             tmp_path / "aligned" / name, tmp_path / f"sheet-{name}.png",
                             tmp_path / f"align-{name}.json", progress=False, crop=Crop(*recorded[name]))
             for name in ("train", "crops")}
    assert stats["crops"] == {"aligned": 3, "failed": 0, "residual_mean_px": None, "residual_p95_px": None,
                              "precropped": True, "crop": crop.mode, "crop_fraction": crop.fraction,
                              "source_sizes": {"200x200": 1, "150x120": 1, "80x96": 1}, "output_size": SIZE}
    assert stats["train"]["crop"] == "resize" and stats["train"]["source_sizes"] == expected_sizes
    for name in stats:
        assert json.loads((tmp_path / f"align-{name}.json").read_text()) == stats[name]
    import pyarrow.parquet as pq

    for name, mode in (("train", Crop("resize")), ("crops", crop)):
        index = read_index(tmp_path / "aligned" / name)
        assert (index["error"] == "").all() and index["residual"].isna().all()
        faces = {}
        for part in sorted((tmp_path / "aligned" / name).glob("part-*.parquet")):
            t = pq.read_table(part)
            faces.update(zip(t.column("file").to_pylist(), t.column("image").to_pylist()))
        assert len(faces) == len(index)
        for row in index.itertuples():
            expected = _expected(arrays[row.image_id], mode)
            ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(expected, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, params.align.jpeg_quality])
            assert faces[row.file] == encoded.tobytes(), (name, row.file)
            decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(faces[row.file], np.uint8), cv2.IMREAD_COLOR),
                                   cv2.COLOR_BGR2RGB)
            assert decoded.shape == (SIZE, SIZE, 3)
            assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 5  # JPEG loss only (q95, 64 px)


def test_crop_settings_need_a_precropped_set(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["tests"]["synth_open"]["crop"] = "center"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data\.tests\.synth_open.*apply to pre-cropped sets only"):
        load_params(path, check_models=False)
    raw["data"]["tests"]["synth_open"].update(precropped=True, crop="resize", crop_fraction=0.5)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="crop_fraction.*applies to `crop: center` only"):
        load_params(path, check_models=False)
