"""Synthetic miniatures of the IJB and MegaFace benchmarks, in their exact on-disk layouts.

:func:`write_ijb_miniature` writes an IJB-C-shaped (or IJB-B-shaped) set folder that
:mod:`pipeline.protocols.ijb` reads like the released one: subjects with a gallery template (in G1
or G2, alternately) and probe templates of several media, still images (one frame) and videos
(several frames of one pose drift), one media id shared by templates of two subjects, loose crops
rendered by :func:`pipeline.datasets.synthetic.render_face` with the landmarks
:func:`~pipeline.datasets.synthetic.face_landmarks` puts on them (written to 3 decimals), detector
scores, the 1:1 pair list (every gallery template against every probe template, as IJB-C's mixed
protocol) and the 1:N gallery and probe CSVs.

:func:`write_distractor_miniature` writes a distractor set in the layout of
:mod:`pipeline.protocols.megaface`: probe identities with a few aligned images each, distractor
images of other identities, and noise lists naming one image of each to leave out.

Both are deterministic in their arguments, write atomically and return what they wrote (the truth
the readers are tested against).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.align import align_face
from pipeline.datasets.synthetic import face_landmarks, identity_rng, image_rng, render_face, sample_identity, \
    sample_variation
from pipeline.io import atomic_dir

CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"


@dataclass
class IJBTruth:
    """What :func:`write_ijb_miniature` wrote. Per face (face-list line): ``face_image``, ``face_template``,
    ``face_media``; per image (5-point line, same order): ``images``, ``landmarks`` [M, 5, 2] and
    ``detector`` [M] as written (rounded); ``pairs`` [P, 3] (t1, t2, label); ``template_subject``;
    ``galleries`` name -> template ids; ``probes`` template ids; ``shared_media`` the media id two
    subjects' templates share."""

    prefix: str
    images: list[str] = field(default_factory=list)
    landmarks: list[np.ndarray] = field(default_factory=list)
    detector: list[float] = field(default_factory=list)
    face_image: list[str] = field(default_factory=list)
    face_template: list[int] = field(default_factory=list)
    face_media: list[int] = field(default_factory=list)
    template_subject: dict[int, int] = field(default_factory=dict)
    galleries: dict[str, list[int]] = field(default_factory=dict)
    probes: list[int] = field(default_factory=list)
    pairs: np.ndarray | None = None
    shared_media: int = -1


def _frames(rng: np.random.Generator, base, n: int) -> list:
    """``n`` variations of one media: a still is the base itself; a video drifts its pose and light."""
    if n == 1:
        return [base]
    out = []
    for k in range(n):
        out.append(dataclasses.replace(
            base, yaw=base.yaw + rng.normal(0, 0.06), pitch=base.pitch + rng.normal(0, 0.04),
            roll=base.roll + rng.normal(0, 0.03), light_azimuth=base.light_azimuth + rng.normal(0, 0.1),
            detail_seed=int(base.detail_seed) + 7919 * (k + 1)))
    return out


def _write_image(path: Path, rgb: np.ndarray, quality: int = 95) -> None:
    """RGB uint8 to a JPEG or PNG file (by its suffix)."""
    options = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix == ".jpg" else []
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[..., ::-1]), options)
    if not ok:
        raise RuntimeError(f"encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _template_media(rng: np.random.Generator, gallery: bool, video_first: bool) -> list[int]:
    """Frames per media of one template: galleries hold two stills, probes 1-3 media (videos 2-3
    frames; with ``video_first`` the first media is a video)."""
    if gallery:
        return [1, 1]
    frames = [int(rng.integers(2, 4)) if rng.random() < 0.5 else 1 for _ in range(int(rng.integers(1, 4)))]
    if video_first and frames[0] == 1:
        frames[0] = 2
    return frames


def write_ijb_miniature(root: str | Path, *, flavour: str = "ijbc", subjects: int = 6, probe_templates: int = 2,
                        seed: int = 0, size: int = 96) -> IJBTruth:
    """Write an IJB-shaped set folder at ``root`` (replaced whole); returns its :class:`IJBTruth`.

    ``subjects`` (>= 2): subject i has gallery template ``1 + i`` (G1 for even i, G2 for odd; IJB-B:
    S1 / S2) and ``probe_templates`` probe templates; ``size``: loose-crop side in pixels.
    """
    if flavour not in ("ijbc", "ijbb") or subjects < 2 or probe_templates < 1:
        raise ValueError(f"flavour ijbc/ijbb, subjects >= 2, probe_templates >= 1; got {flavour}, {subjects}, "
                         f"{probe_templates}")
    names = ("G1", "G2") if flavour == "ijbc" else ("S1", "S2")
    truth = IJBTruth(flavour, galleries={n: [] for n in names})
    rng = np.random.default_rng([seed, 1757])
    media_id = 5000
    csv_rows: dict[str, list[str]] = {n: [] for n in (*names, "probe")}
    with atomic_dir(root) as tmp:
        (tmp / "meta").mkdir()
        (tmp / "loose_crop").mkdir()
        for i in range(subjects):
            identity = sample_identity(identity_rng(seed, "ijb", i))
            subject_id = 100 + i
            templates = [(1 + i, True)] + [(1000 + probe_templates * i + k, False) for k in range(probe_templates)]
            for tid, is_gallery in templates:
                truth.template_subject[tid] = subject_id
                (truth.galleries[names[i % 2]] if is_gallery else truth.probes).append(tid)
                first_probe = tid == 1000 + probe_templates * i
                for m, n_frames in enumerate(_template_media(rng, is_gallery, first_probe and i < 2)):
                    mid = media_id
                    media_id += 1
                    if first_probe and m == 0 and i == 0:
                        truth.shared_media = mid  # subject 0's first video; subject 1's first video reuses the id
                    elif first_probe and m == 0 and i == 1:
                        mid = truth.shared_media
                    base = sample_variation(image_rng(seed, "ijb", i, mid))
                    for var in _frames(rng, base, n_frames):
                        name = f"{len(truth.images) + 1}.jpg"
                        _write_image(tmp / "loose_crop" / name, render_face(identity, var, size))
                        truth.images.append(name)
                        truth.landmarks.append(np.round(face_landmarks(identity, var, size), 3))
                        truth.detector.append(round(float(rng.uniform(0.5, 1.0)), 4))
                        truth.face_image.append(name)
                        truth.face_template.append(tid)
                        truth.face_media.append(mid)
                        kind = "frames" if n_frames > 1 else "img"
                        csv_rows[names[i % 2] if is_gallery else "probe"].append(
                            f"{tid},{subject_id},{kind}/{mid}_{len(truth.images)}.jpg,{mid}")
        _write_ijb_files(tmp, truth, csv_rows, names)
    return truth


def _write_ijb_files(tmp: Path, truth: IJBTruth, csv_rows: dict[str, list[str]], names: tuple[str, str]) -> None:
    meta, p = tmp / "meta", truth.prefix
    (meta / f"{p}_face_tid_mid.txt").write_text("".join(
        f"{n} {t} {m}\n" for n, t, m in zip(truth.face_image, truth.face_template, truth.face_media)))
    (meta / f"{p}_name_5pts_score.txt").write_text("".join(
        f"{n} {' '.join(f'{v:.3f}' for v in lm.ravel())} {s:.4f}\n"
        for n, lm, s in zip(truth.images, truth.landmarks, truth.detector)))
    gallery = sorted(t for n in names for t in truth.galleries[n])
    pairs = [(g, q, int(truth.template_subject[g] == truth.template_subject[q]))
             for g in gallery for q in sorted(truth.probes)]
    truth.pairs = np.array(pairs, dtype=np.int64)
    (meta / f"{p}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in pairs))
    for n in names:
        (meta / f"{p}_1N_gallery_{n}.csv").write_text("\n".join([CSV_HEADER, *csv_rows[n]]) + "\n")
    (meta / f"{p}_1N_probe_mixed.csv").write_text("\n".join([CSV_HEADER, *csv_rows["probe"]]) + "\n")


# ------------------------------------------------------------------------------- distractors
@dataclass
class DistractorTruth:
    """What :func:`write_distractor_miniature` wrote: ``probes`` (relative paths, list order, noise
    included), ``identities``, ``distractors`` (relative paths), and the noise entries."""

    probes: list[str] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)
    probe_noise: str = ""
    distractor_noise: str = ""


def _aligned(identity, var, size: int) -> np.ndarray:
    render = max(size, 128)
    image = render_face(identity, var, render)
    return align_face(image, face_landmarks(identity, var, render), size)[0]


def write_distractor_miniature(root: str | Path, *, identities: int = 5, images_per_identity: int = 4,
                               distractors: int = 60, seed: int = 0, size: int = 112) -> DistractorTruth:
    """Write a distractor set at ``root`` (replaced whole); returns its :class:`DistractorTruth`.

    Probe identity i is ``person<i>`` with ``images_per_identity`` aligned images; distractor d is one
    image of another identity. The noise lists name the last probe image and the last distractor.
    """
    if identities < 1 or images_per_identity < 3 or distractors < 2:
        raise ValueError("need identities >= 1, images_per_identity >= 3 (one is noise), distractors >= 2")
    truth = DistractorTruth()
    with atomic_dir(root) as tmp:
        for i in range(identities):
            identity = sample_identity(identity_rng(seed, "megaface_probe", i))
            name = f"person{i:02d}"
            (tmp / "facescrub_images" / name).mkdir(parents=True)
            for j in range(images_per_identity):
                rel = f"{name}/{name}_{j + 1}.png"
                crop = _aligned(identity, sample_variation(image_rng(seed, "megaface_probe", i, j)), size)
                _write_image(tmp / "facescrub_images" / rel, crop)
                truth.probes.append(rel)
                truth.identities.append(name)
        for d in range(distractors):
            identity = sample_identity(identity_rng(seed, "megaface_distractor", d))
            rel = f"{d // 1000:03d}/{d // 10:05d}/{d}_0.jpg"
            (tmp / "megaface_images" / rel).parent.mkdir(parents=True, exist_ok=True)
            crop = _aligned(identity, sample_variation(image_rng(seed, "megaface_distractor", d, 0)), size)
            _write_image(tmp / "megaface_images" / rel, crop)
            truth.distractors.append(rel)
        truth.probe_noise = truth.probes[-1].rsplit("/", 1)[-1]
        truth.distractor_noise = truth.distractors[-1]
        (tmp / "facescrub_lst").write_text("".join(f"{p}\n" for p in truth.probes))
        (tmp / "megaface_lst").write_text("".join(f"{d}\n" for d in truth.distractors))
        (tmp / "facescrub_noises.txt").write_text(f"# probe images to leave out\n{truth.probe_noise}\n")
        (tmp / "megaface_noises.txt").write_text(f"# distractors to leave out\n0\t{truth.distractor_noise}\n")
    return truth
