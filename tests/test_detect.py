"""Detection and alignment on real inputs: the subject face, junk files, real LFW photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.align import align_set, aligned_images, template
from pipeline.config import AlignParams, DetectParams
from pipeline.datasets.folder import list_identity_folder
from pipeline.detect import Face, TorchDetector, choose_face, detect_set, landmarks_of
from tests.conftest import synthetic_face, write_image


def _face(x, y, w, h, conf=0.99):
    return Face((x, y, w, h), conf, np.zeros((5, 2)))


def test_choose_face_prefers_the_central_subject():
    subject = _face(90, 90, 70, 70)           # centred in a 250x250 image
    bystander = _face(0, 0, 110, 110)         # bigger, but in the corner
    small_centre = _face(115, 115, 20, 20)    # tiny blob in the middle
    assert choose_face([bystander, subject, small_centre], (250, 250), 0.9) is subject
    assert choose_face([_face(90, 90, 70, 70, conf=0.5)], (250, 250), 0.9) is None
    near = _face(100, 80, 90, 90)             # larger and slightly off-centre beats a small centred one
    assert choose_face([small_centre, near], (250, 250), 0.9) is near


@pytest.fixture(scope="module")
def salted(tmp_path_factory):
    """A folder dataset with good faces in odd formats and every kind of bad file."""
    root = tmp_path_factory.mktemp("salted")
    good, bad = {}, {}
    faces = [synthetic_face(seed) for seed in range(4)]
    good["ok/rgb.jpg"] = write_image(root / "ok" / "rgb.jpg", faces[0], quality=92)
    good["ok/gray.jpg"] = write_image(root / "ok" / "gray.jpg", np.asarray(Image.fromarray(faces[1]).convert("L")))
    rgba = np.dstack([faces[2], np.full(faces[2].shape[:2], 255, np.uint8)])
    good["ok/rgba.png"] = write_image(root / "ok" / "rgba.png", rgba)
    Image.fromarray(faces[3]).convert("CMYK").save(root / "ok" / "cmyk.jpg")
    good["ok/cmyk.jpg"] = root / "ok" / "cmyk.jpg"
    gray16 = (np.asarray(Image.fromarray(faces[0]).convert("L")).astype(np.uint16) * 257)
    Image.fromarray(gray16).save(root / "ok" / "gray16.png")
    good["ok/gray16.png"] = root / "ok" / "gray16.png"
    huge = np.asarray(Image.fromarray(faces[1]).resize((3000, 3000), Image.BILINEAR))
    good["ok/huge.jpg"] = write_image(root / "ok" / "huge.jpg", huge, quality=85)
    (root / "bad").mkdir()
    (root / "bad" / "empty.jpg").write_bytes(b"")
    bad["bad/empty.jpg"] = "empty file"
    full = (root / "ok" / "rgb.jpg").read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    bad["bad/truncated.jpg"] = "corrupt or truncated"
    (root / "bad" / "notes.txt").write_text("not an image")
    bad["bad/notes.txt"] = "not an image"
    write_image(root / "bad" / "tiny.png", faces[0][:10, :10])
    bad["bad/tiny.png"] = "too small"
    noise = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    write_image(root / "bad" / "noface.png", np.full_like(noise, 128))
    bad["bad/noface.png"] = "no face"
    # readable images without a face between faces of the same batch, the last one a
    # checkerboard whose PNet proposals all die in RNet (it used to crash the detector)
    yy, xx = np.mgrid[0:160, 0:160]
    between = {
        "1_face.png": synthetic_face(4),
        "2_black.png": np.zeros((160, 160, 3), np.uint8),
        "3_face.jpg": synthetic_face(5),
        "4_gray.png": np.full((160, 160, 3), 128, np.uint8),
        "5_flat.png": np.tile(np.array([30, 160, 90], np.uint8), (120, 200, 1)),
        "6_face.png": synthetic_face(6),
        "7_checker.png": ((((yy // 10) + (xx // 10)) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2),
    }
    for name, array in between.items():
        write_image(root / "withblanks" / name, array, **({"quality": 92} if name.endswith(".jpg") else {}))
        if "face" in name:
            good[f"withblanks/{name}"] = root / "withblanks" / name
        else:
            bad[f"withblanks/{name}"] = "no face found"
    images = list_identity_folder(root)
    detector = TorchDetector(DetectParams())
    detections = detect_set(images, detector, DetectParams(), progress=False)
    return root, good, bad, detections


def test_salted_folder_keeps_good_and_explains_bad(salted):
    root, good, bad, detections = salted
    by_id = detections.set_index("image_id")
    for image_id in good:
        assert by_id.loc[image_id, "status"] == "ok", (image_id, by_id.loc[image_id, "reason"])
    for image_id, reason in bad.items():
        assert by_id.loc[image_id, "status"] == "rejected"
        assert reason in by_id.loc[image_id, "reason"], (image_id, by_id.loc[image_id, "reason"])
    # the huge image was detected on a shrunken copy; landmarks come back in file pixels
    huge = landmarks_of(detections[detections["image_id"] == "ok/huge.jpg"])[0]
    assert huge[:, 0].max() > 1000


def test_salted_folder_aligns_every_good_image(salted, tmp_path):
    import io

    root, good, bad, detections = salted
    index = align_set(detections, tmp_path, AlignParams(), progress=False)
    assert set(index["image_id"]) == set(good)
    assert (index["error"] == "").all()
    assert index["residual"].max() < 6.0
    faces = dict(aligned_images(tmp_path, index))
    assert list(faces) == index["file"].tolist()
    for blob in faces.values():
        crop = np.asarray(Image.open(io.BytesIO(blob)))
        assert crop.shape == (112, 112, 3)


def test_real_lfw_detection_and_alignment(lfw_dev, tmp_path):
    people = sorted(p for p in (lfw_dev / "images").iterdir() if p.is_dir())[:: max(1, 4859 // 40)][:40]
    rows = [(f"{p.name}/{f.name}", str(f), p.name) for p in people for f in sorted(p.glob("*.jpg"))[:1]]
    images = pd.DataFrame(rows, columns=["image_id", "path", "identity"])
    detections = detect_set(images, TorchDetector(DetectParams()), DetectParams(), progress=False)
    found = (detections["status"] == "ok").mean()
    assert found >= 0.975  # the stage finds 99.5%+ over all of lfw-dev; 40 images leave room for one miss
    index = align_set(detections, tmp_path, AlignParams(), progress=False)
    assert index["residual"].mean() < 3.0
    # eyes level and on the template: the aligned eye landmarks sit within a few px of it
    marks = landmarks_of(detections[detections["status"] == "ok"])
    assert np.all(marks[:, 0, 0] < marks[:, 1, 0])  # left eye (image left) before right eye
    assert template(112)[0, 1] == pytest.approx(51.6963)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_run_detect_keeps_every_lfw_face_with_blanks_between(lfw_dev, tmp_path, monkeypatch, capsys, threads):
    """The stage's own entry point on real photos with faceless images between them, in
    batches of 4 per thread (blanks first, in the middle, last and in runs), cut into 1-3
    worker parts."""
    import json

    from pipeline.detect import run_detect

    monkeypatch.setenv("FACEPIPE_THREADS", threads)
    people = sorted(p for p in (lfw_dev / "images").iterdir() if p.is_dir())[:6]
    faces = [(f"{p.name}/{f.name}", str(f), p.name) for p in people for f in sorted(p.glob("*.jpg"))[:1]]
    yy, xx = np.mgrid[0:250, 0:250]
    blank_arrays = {
        "black.png": np.zeros((250, 250, 3), np.uint8),
        "checker.png": ((((yy // 10) + (xx // 10)) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2),
        "gray.png": np.full((250, 250, 3), 128, np.uint8),
        "flat.png": np.tile(np.array([200, 30, 30], np.uint8), (180, 220, 1)),
        "white.png": np.full((300, 200, 3), 255, np.uint8),
        "small.png": np.full((30, 30, 3), 90, np.uint8),
    }
    blanks = [(f"blank/{name}", str(write_image(tmp_path / "blank" / name, a)), "blank")
              for name, a in blank_arrays.items()]
    order = "BFFBFBBFFBFB"  # 1 thread: BFFB FBBF FBFB; 2: BFFBFBBF FBFB; 3: one batch
    pick = {"F": iter(faces), "B": iter(blanks)}
    images = pd.DataFrame([next(pick[c]) for c in order], columns=["image_id", "path", "identity"])
    params = DetectParams(batch_size=4)
    counts = run_detect(params, "mixed", images, tmp_path / "detect", tmp_path / "counts.json", progress=False)
    start_line = capsys.readouterr().out.splitlines()[0]
    assert start_line == f"detect: device cpu, {threads} threads, batch {4 * int(threads)} images"
    table = pd.read_parquet(tmp_path / "detect" / "detections.parquet").set_index("image_id")
    for image_id, _, _ in faces:
        assert table.loc[image_id, "status"] == "ok", (image_id, table.loc[image_id, "reason"])
    for image_id, _, _ in blanks:
        assert table.loc[image_id, "status"] == "rejected" and table.loc[image_id, "reason"] == "no face found"
    expected = {"images": 12, "faces": 6, "dropped": 6, "reasons": {"no face found": 6}}
    assert counts == expected
    assert json.loads((tmp_path / "counts.json").read_text()) == expected


def test_plan_sizes_batches_and_threads_from_the_machine(monkeypatch):
    import torch

    from pipeline.config import ConfigError
    from pipeline.detect import plan_detect

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_detect(DetectParams(), threads=2) == plan_detect(DetectParams(device="cpu"), threads=2)
    plan = plan_detect(DetectParams(), threads=2)
    assert (plan.device, plan.threads, plan.batch_size) == ("cpu", 2, 32)  # the committed run's batches
    assert plan_detect(DetectParams(), threads=16).batch_size == 64  # 4 images per thread
    assert plan_detect(DetectParams(batch_size=100), threads=16).batch_size == 100
    monkeypatch.setenv("FACEPIPE_THREADS", "3")
    assert plan_detect(DetectParams()).threads == 3
    assert plan_detect(DetectParams(backend="package")).device == "tensorflow"
    with pytest.raises(ConfigError, match=r"detect.device is 'cuda' but PyTorch sees no CUDA GPU") as err:
        plan_detect(DetectParams(device="cuda"))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan_detect(DetectParams()).device == "cuda"
    assert plan_detect(DetectParams(device="cpu")).device == "cpu"


def test_decode_pool_and_batches_follow_the_thread_count(tmp_path, monkeypatch):
    """12 threads (above the old cap of 8 decoders): 12 decoders, batches of 48."""
    import pipeline.detect as detect_module

    pools = []

    class RecordingPool(detect_module.ThreadPoolExecutor):
        def __init__(self, max_workers):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers)

    class CountingDetector:
        def __init__(self):
            self.calls = []

        def detect(self, images):
            self.calls.append(len(images))
            return [[] for _ in images]

    monkeypatch.setattr(detect_module, "ThreadPoolExecutor", RecordingPool)
    path = write_image(tmp_path / "a" / "gray.png", np.full((40, 40, 3), 128, np.uint8))
    images = pd.DataFrame({"image_id": [f"a/{k}" for k in range(50)], "path": [str(path)] * 50, "identity": "a"})
    detector = CountingDetector()
    table = detect_set(images, detector, DetectParams(), progress=False, threads=12)
    assert pools == [12] and detector.calls == [48, 2]
    assert (table["reason"] == "no face found").all()


def test_cli_cuda_without_gpu_is_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["detect"]["device"] = "cuda"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "pipeline", "detect", "--params", str(path), "--no-progress"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "detect.device is 'cuda'" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# ----------------------------------------------------------------------------- resumable by chunks
def _mixed_images(root: Path, n_faces: int, blanks: tuple[int, ...] = (2, 7)) -> pd.DataFrame:
    """Synthetic faces with a few faceless images between them, as a data-stage index."""
    rows = []
    for k in range(n_faces):
        array = np.full((140, 140, 3), 90, np.uint8) if k in blanks else synthetic_face(k, 140)
        path = write_image(root / f"id{k % 3}" / f"{k:03d}.jpg", array, quality=92)
        rows.append((f"id{k % 3}/{k:03d}.jpg", str(path), f"id{k % 3}"))
    return pd.DataFrame(rows, columns=["image_id", "path", "identity"])


def test_chunked_detection_writes_the_bytes_of_one_pass(tmp_path, monkeypatch):
    """Chunks are whole batches, so the tables are those of one pass over the set."""
    from pipeline.detect import plan_detect, run_detect
    from pipeline.io import write_parquet

    monkeypatch.setenv("FACEPIPE_THREADS", "1")
    images = _mixed_images(tmp_path / "raw", 11)
    params = DetectParams(batch_size=4, chunk_size=3)  # chunks of 4 images: 4 + 4 + 3
    plan = plan_detect(params)
    chunked = run_detect(params, "s", images, tmp_path / "chunked", tmp_path / "c.json", progress=False, plan=plan)
    whole = run_detect(params.model_copy(update={"chunk_size": 1000}), "s", images, tmp_path / "whole",
                       tmp_path / "w.json", progress=False, plan=plan)
    one_pass = detect_set(images, make_detector_for_test(params, plan), params, progress=False, threads=1)
    write_parquet(tmp_path / "one_pass.parquet", one_pass)
    assert chunked == whole and chunked["dropped"] == 2
    for name in ("detections.parquet", "rejects.csv"):
        assert (tmp_path / "chunked" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert (tmp_path / "chunked" / "detections.parquet").read_bytes() == (tmp_path / "one_pass.parquet").read_bytes()
    assert len(list((tmp_path / ".partial" / "chunked").glob("*.pkl"))) == 3  # kept after the run
    assert len(list((tmp_path / ".partial" / "whole").glob("*.pkl"))) == 1


def make_detector_for_test(params, plan):
    from pipeline.detect import make_detector

    return make_detector(params, plan)


def test_detect_killed_midway_resumes_from_its_finished_chunks(tmp_path):
    """SIGKILL `python -m pipeline detect` after a few chunks; the rerun computes only the rest
    and writes the same files as an uninterrupted run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    root = Path(__file__).resolve().parents[1]
    images = _mixed_images(tmp_path / "raw", 40, blanks=(3, 17, 30))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["detect"].update(batch_size=4, chunk_size=4, device="cpu")
    params["data"]["tests"] = {"t": {"kind": "folder", "path": str(tmp_path / "raw")}}
    params["report"].update(in_domain="t", cross_domain=[])
    projects = {}
    for name in ("clean", "killed"):
        project = projects[name] = tmp_path / name
        for set_name, rows in (("train", images), ("t", images.iloc[5:8])):
            (project / "data" / "datasets" / set_name).mkdir(parents=True)
            rows.to_csv(project / "data" / "datasets" / set_name / "index.csv", index=False)
            (project / "data" / "datasets" / set_name / "summary.json").write_text("{}")
        (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(root), FACEPIPE_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "pipeline", "detect", "train", "--no-progress"]

    def run(project):
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run(projects["clean"])
    staging = projects["killed"] / "data" / "detect" / ".partial" / "train"
    proc = subprocess.Popen(command, cwd=projects["killed"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(staging.glob("*.pkl"))) < 3:
            assert proc.poll() is None, "detect finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finished = len(list(staging.glob("*.pkl")))
    assert 3 <= finished < 10 and not (projects["killed"] / "data" / "detect" / "train").exists()
    out = run(projects["killed"])
    reused = int(out.split("detect train: 10 chunk(s) of up to 4 images, ")[1].split(" reused")[0])
    assert reused == finished, out  # every finished chunk, and only those: 10 - reused computed
    for name in ("data/detect/train/detections.parquet", "data/detect/train/rejects.csv",
                 "reports/detection/train.json"):
        assert (projects["killed"] / name).read_bytes() == (projects["clean"] / name).read_bytes(), name
    rejects = pd.read_csv(projects["killed"] / "data/detect/train/rejects.csv")
    assert {"id0/003.jpg", "id2/017.jpg", "id0/030.jpg"} <= set(rejects["image_id"])  # the blanks
    assert json.loads((projects["killed"] / "reports/detection/train.json").read_text())["images"] == 40
    assert len(list(staging.iterdir())) == 10  # this run's chunks only
    # another set's stage keeps its own chunks apart: detecting t leaves train's staging alone
    t_run = subprocess.run([*command[:4], "t", "--no-progress"], cwd=projects["killed"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert t_run.returncode == 0, t_run.stderr[-3000:]
    assert len(list(staging.iterdir())) == 10
    assert len(list((staging.parent / "t").glob("*.pkl"))) == 1
