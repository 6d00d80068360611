"""Alignment: the similarity transform, the template, residuals, the contact sheet."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.align import ARCFACE_TEMPLATE_112, align_face, apply_transform, contact_sheet, similarity_transform, template


def _similarity(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def _least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference without SVD: x' = a x - b y + tx, y' = b x + a y + ty is linear in
    (a, b, tx, ty), so the best non-reflective similarity is one linear least squares."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_recovers_a_known_similarity():
    truth = _similarity(0.3, 1.7, (12.0, -5.0))
    src = np.random.default_rng(0).random((5, 2)) * 100
    c, s = np.cos(0.3), np.sin(0.3)  # written out, not through apply_transform
    dst = np.stack([1.7 * (c * src[:, 0] - s * src[:, 1]) + 12.0, 1.7 * (s * src[:, 0] + c * src[:, 1]) - 5.0], 1)
    np.testing.assert_allclose(similarity_transform(src, dst), truth, atol=1e-9)
    np.testing.assert_allclose(apply_transform(truth, src), dst, atol=1e-12)


@pytest.mark.parametrize("case", ["noisy", "mirrored"])
def test_matches_the_least_squares_similarity(case):
    # The best proper similarity, also when only a reflection would fit exactly (mirrored
    # landmarks): same matrix as the linear least-squares reference, and never a reflection.
    rng = np.random.default_rng(4)
    src = ARCFACE_TEMPLATE_112 + rng.normal(0, 2.0, ARCFACE_TEMPLATE_112.shape)
    if case == "mirrored":
        dst = src.copy()
        dst[:, 0] = 112 - dst[:, 0]
    else:
        dst = src @ np.array([[0.9, 0.4], [-0.4, 0.9]]) + rng.normal(0, 3.0, src.shape) + 30
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix, _least_squares_similarity(src, dst), atol=1e-9)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_template_scales_with_size():
    np.testing.assert_allclose(template(224), ARCFACE_TEMPLATE_112 * 2)
    assert template(112)[0].tolist() == pytest.approx([38.2946, 51.6963])


def test_align_puts_landmarks_on_template():
    # Landmarks of a face rotated by 20 degrees and scaled 2.5x inside a 400x400 image.
    truth = _similarity(np.deg2rad(20), 2.5, (80.0, 60.0))
    landmarks = apply_transform(truth, ARCFACE_TEMPLATE_112)
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    for x, y in landmarks:
        image[int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3] = 255
    crop, residual = align_face(image, landmarks, 112)
    assert crop.shape == (112, 112, 3)
    assert residual < 1e-6
    for x, y in ARCFACE_TEMPLATE_112:  # the bright dots land on the template points
        assert crop[int(round(y)), int(round(x))].max() > 100
    noisy = landmarks + np.random.default_rng(1).normal(0, 3.0, landmarks.shape)
    _, noisy_residual = align_face(image, noisy, 112)
    assert 0.2 < noisy_residual < 5.0


def test_degenerate_landmarks_raise():
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE_112)


def test_contact_sheet_shape():
    crops = [np.full((112, 112, 3), k * 20, dtype=np.uint8) for k in range(5)]
    sheet = contact_sheet(crops, [str(k) for k in range(5)], columns=4)
    assert sheet.shape == (2 * (112 + 12), 4 * 112, 3)


# ----------------------------------------------------------------------------- the stage at scale
def _faces_on_disk(root, n, *, size=128, bad=()):
    """``n`` synthetic faces as JPEG files with their true landmarks: a detection table
    (status ok), as the detect stage writes it. Rows in ``bad`` get landmarks that coincide."""
    import pandas as pd

    from pipeline.datasets import synthetic
    from pipeline.detect import LANDMARK_COLUMNS
    from tests.conftest import write_image

    rows = []
    for k in range(n):
        rng = np.random.default_rng(k)
        identity = synthetic.sample_identity(rng, "a")
        variation = synthetic.sample_variation(rng, "a")
        path = write_image(root / f"id{k % 4}" / f"img{k}.jpg", synthetic.render_face(identity, variation, size),
                           quality=90)
        marks = synthetic.face_landmarks(identity, variation, size)
        if k in bad:
            marks = np.ones_like(marks)
        rows.append({"image_id": f"id{k % 4}/img{k}.jpg", "path": str(path), "identity": f"id{k % 4}",
                     "status": "ok", **dict(zip(LANDMARK_COLUMNS, marks.reshape(-1)))})
    return pd.DataFrame(rows)


def _packed(out_dir):
    """{file: JPEG bytes} of every part of an aligned set, and the part files' bytes."""
    import pyarrow.parquet as pq

    blobs, parts = {}, {}
    for part in sorted(out_dir.glob("part-*.parquet")):
        table = pq.read_table(part)
        blobs.update(zip(table.column("file").to_pylist(), table.column("image").to_pylist()))
        parts[part.name] = part.read_bytes()
    return blobs, parts


def test_parallel_align_writes_the_bytes_of_the_serial_recipe(tmp_path):
    """Threads and chunk size change nothing: every face is the bytes of the one-face recipe
    (load_rgb, align_face, JPEG at jpeg_quality, as the stage wrote one file per face before)."""
    import cv2

    from pipeline.align import align_set, aligned_images, unpack_aligned
    from pipeline.config import AlignParams
    from pipeline.images import load_rgb

    detections = _faces_on_disk(tmp_path / "raw", 13, bad={5})
    params = AlignParams(size=96, jpeg_quality=93, chunk_size=4)
    serial = align_set(detections, tmp_path / "serial", params, progress=False, threads=1)
    parallel = align_set(detections, tmp_path / "parallel", params, progress=False, threads=3)
    one_chunk = align_set(detections, tmp_path / "one", params.model_copy(update={"chunk_size": 100}),
                          progress=False, threads=3)
    assert serial.equals(parallel)
    assert serial.drop(columns="part").equals(one_chunk.drop(columns="part"))
    blobs, parts = _packed(tmp_path / "serial")
    assert (blobs, parts) == _packed(tmp_path / "parallel")
    assert blobs == _packed(tmp_path / "one")[0]
    assert sorted(parts) == [f"part-0000{k}.parquet" for k in range(4)]  # 13 faces in chunks of 4
    assert serial.loc[5, "error"] == "the source points coincide; no transform is defined"
    assert blobs[serial.loc[5, "file"]] is None
    for k, row in serial.drop(index=5).iterrows():
        image, _ = load_rgb(row["source_path"])
        marks = detections.iloc[k][[c for c in detections.columns if c.endswith(("_x", "_y"))]]
        crop, residual = align_face(image, marks.to_numpy(dtype=float).reshape(5, 2), 96)
        ok, expected = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 93])
        assert blobs[row["file"]] == expected.tobytes(), row["file"]
        assert row["residual"] == residual
    assert not (tmp_path / "serial" / ".partial").exists()  # staging removed once the set is done
    # the earlier one-file-per-face layout, for tools that want an ImageFolder
    serial.to_csv(tmp_path / "serial" / "_index.csv", index=False)
    assert unpack_aligned(tmp_path / "serial", tmp_path / "folder") == 12
    for name, blob in blobs.items():
        assert (tmp_path / "folder" / name).is_file() == (blob is not None)
        assert blob is None or (tmp_path / "folder" / name).read_bytes() == blob
    assert dict(aligned_images(tmp_path / "folder")) == {k: v for k, v in blobs.items() if v is not None}


def test_an_interrupted_align_run_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    import pipeline.align as align_module
    from pipeline.config import AlignParams

    detections = _faces_on_disk(tmp_path / "raw", 10)
    params = AlignParams(size=64, chunk_size=3, contact_sheet=6)
    clean = align_module.run_align(params, "train", detections, tmp_path / "clean" / "aligned" / "train",
                                   tmp_path / "clean" / "sheet.png", tmp_path / "clean" / "stats.json", progress=False)
    computed = []
    real = align_module._align_chunk

    def crash_on_third(rows, *args, **kwargs):
        if len(computed) == 2:
            raise KeyboardInterrupt("killed")
        computed.append(len(rows))
        return real(rows, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(align_module, "_align_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        align_module.run_align(params, "train", detections, run / "aligned" / "train", run / "sheet.png",
                               run / "stats.json", progress=False)
    assert not (run / "aligned" / "train").exists()  # the output is still all or nothing
    assert len(list((run / "aligned" / ".partial" / "train").glob("*.parquet"))) == 2
    computed.clear()
    monkeypatch.setattr(align_module, "_align_chunk",
                        lambda rows, *a, **k: computed.append(len(rows)) or real(rows, *a, **k))
    stats = align_module.run_align(params, "train", detections, run / "aligned" / "train", run / "sheet.png",
                                   run / "stats.json", progress=False)
    assert computed == [3, 1]  # chunks 3 and 4 of 4 (10 faces in chunks of 3); 1 and 2 reused
    assert stats == clean
    for name in ("stats.json", "sheet.png", "aligned/train/_index.csv"):
        assert (run / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert _packed(run / "aligned" / "train") == _packed(tmp_path / "clean" / "aligned" / "train")
    assert not (run / "aligned" / ".partial" / "train").exists()
