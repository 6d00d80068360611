"""A synthetic miniature of the insightface data layout, written with the project's own writers.

Researchers hold their training set as ``faces_webface_112x112/{train.rec, train.idx, property}``
and their quick benchmarks as ``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin`` beside it. This module
writes the same files from the built-in synthetic faces, so that the insightface path
(``kind: insightface_rec`` / ``insightface_bin``) runs end to end without the real data:
``configs/insightface-synth.yaml`` and the tests use it.

Faces are rendered by :mod:`pipeline.datasets.synthetic` and aligned onto the 112 x 112 ArcFace
template with their exact landmarks (:func:`pipeline.datasets.synthetic.face_landmarks`, no
detector), as insightface's own sets were aligned. The training identities and the three test
sets' identities are disjoint; each ``.bin`` holds ``folds x pairs_per_fold`` pairs in ten
consecutive blocks, half of each block same, half different.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.align import align_face
from pipeline.datasets.insightface import write_bin, write_rec
from pipeline.datasets.synthetic import face_landmarks, render_face, sample_identity, sample_variation

#: The three benchmarks of the miniature: name -> (identity group seed, skin/lighting domain)
BENCHMARKS = {"lfw": ("mini-lfw", "a"), "cfp_fp": ("mini-cfp", "a"), "agedb_30": ("mini-agedb", "b")}
SIZE = 112


def aligned_face(seed: int, group: str, identity: int, image: int, domain: str = "a", *, render: int = 160
                 ) -> bytes:
    """One synthetic face of ``identity`` in ``group``, aligned to 112 x 112 with its exact landmarks
    (JPEG, quality 95)."""
    who = sample_identity(np.random.default_rng([seed, _code(group), identity]), domain)
    how = sample_variation(np.random.default_rng([seed, _code(group), identity, image]), domain)
    picture = render_face(who, how, render)
    face, _ = align_face(picture, face_landmarks(who, how, render), SIZE)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(face, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:  # pragma: no cover - a uint8 crop always encodes
        raise RuntimeError("JPEG encoding failed")
    return encoded.tobytes()


def _code(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")


def _bin_pairs(seed: int, group: str, domain: str, identities: int, images: int, folds: int,
               pairs_per_fold: int) -> tuple[list[bytes], list[bool]]:
    """Images (two per pair) and labels of one benchmark: pairs of ``identities`` x ``images`` faces,
    ``folds`` consecutive blocks of ``pairs_per_fold`` pairs, the first half of each block same."""
    rng = np.random.default_rng([seed, _code(group), 7])
    faces: dict[tuple[int, int], bytes] = {}

    def face(i: int, j: int) -> bytes:
        if (i, j) not in faces:
            faces[(i, j)] = aligned_face(seed, group, i, j, domain)
        return faces[(i, j)]

    bins, same = [], []
    for _ in range(folds):
        for k in range(pairs_per_fold):
            if k < pairs_per_fold // 2:
                i = int(rng.integers(identities))
                a, b = rng.choice(images, 2, replace=False)
                pair = ((i, int(a)), (i, int(b)))
            else:
                i, j = rng.choice(identities, 2, replace=False)
                pair = ((int(i), int(rng.integers(images))), (int(j), int(rng.integers(images))))
            bins += [face(*pair[0]), face(*pair[1])]
            same.append(pair[0][0] == pair[1][0])
    return bins, same


def write_miniature(out_dir: str | Path, *, seed: int = 0, train_identities: int = 40, images_per_identity: int = 12,
                    test_identities: int = 30, test_images: int = 4, folds: int = 10, pairs_per_fold: int = 40
                    ) -> dict[str, int]:
    """Write ``out_dir/faces_synth_112x112/{train.rec, train.idx, property}`` and
    ``out_dir/faces_synth_112x112/{lfw,cfp_fp,agedb_30}.bin``; returns the count of each."""
    folder = Path(out_dir) / "faces_synth_112x112"
    folder.mkdir(parents=True, exist_ok=True)
    items = ((label, aligned_face(seed, "mini-train", label, k))
             for label in range(train_identities) for k in range(images_per_identity))
    counts = {"train": write_rec(folder, items, train_identities, SIZE)["images"]}
    for name, (group, domain) in BENCHMARKS.items():
        bins, same = _bin_pairs(seed, group, domain, test_identities, test_images, folds, pairs_per_fold)
        counts[name] = write_bin(folder / f"{name}.bin", bins, same)
    return counts
