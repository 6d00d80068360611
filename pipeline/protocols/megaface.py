"""The distractor set on disk (MegaFace protocol, in the layout of the aligned MegaFace test pack).

::

    facescrub_lst                    probe images, one path a line, relative to facescrub_images/:
                                     <identity>/<file> (the identity is the folder)
    facescrub_images/<identity>/...  aligned probe faces
    megaface_lst                     distractor images, one path a line, relative to megaface_images/
    megaface_images/...              aligned distractor faces
    facescrub_noises.txt             optional: probe file names to leave out (``#`` starts a comment)
    megaface_noises.txt              optional: distractor paths to leave out (a tab-separated line
                                     gives the path in its last field)

The faces are already aligned (the pack's 112 x 112 crops); they are resized to the model's input
size. The gallery of size N is the first N distractors of ``megaface_lst`` (nested subsets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.protocols import ProtocolError

PROBE_LIST, PROBE_DIR, PROBE_NOISE = "facescrub_lst", "facescrub_images", "facescrub_noises.txt"
DISTRACTOR_LIST, DISTRACTOR_DIR, DISTRACTOR_NOISE = "megaface_lst", "megaface_images", "megaface_noises.txt"


@dataclass
class DistractorSet:
    """``probes`` [P] paths relative to ``root / facescrub_images``, ``identities`` [P] (their folder),
    ``distractors`` [N] paths relative to ``root / megaface_images`` (list order), noise removed."""

    root: Path
    probes: np.ndarray
    identities: np.ndarray
    distractors: np.ndarray
    probe_lines: np.ndarray
    distractor_lines: np.ndarray


def _list(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise ProtocolError(f"{path}: file not found")
    entries, lines = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            text = line.strip()
            if text:
                entries.append(text)
                lines.append(number)
    return entries, lines


def _noise(path: Path, last_part: bool) -> set[str]:
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            text = text.split("\t")[-1].strip()
            out.add(text.rsplit("/", 1)[-1] if last_part else text)
    return out


def _check_files(list_path: Path, folder: Path, entries: list[str], lines: list[int]) -> None:
    if not folder.is_dir():
        raise ProtocolError(f"{folder}: folder not found (named by {list_path.name})")
    for entry, number in zip(entries, lines):
        if not (folder / entry).is_file():
            raise ProtocolError(f"{list_path}:{number}: image {folder.name}/{entry} is not on disk")


def read_distractor_set(root: str | Path, *, check_images: bool = True) -> DistractorSet:
    """Read the lists (and check every listed image is on disk); one-line errors naming list and line.

    An identity with a single probe image is kept as a probe list entry but can never be searched;
    a set where no identity has two probe images is an empty probe set (an error)."""
    root = Path(root)
    probe_list = root / PROBE_LIST
    probes, probe_lines = _list(probe_list)
    noise = _noise(root / PROBE_NOISE, last_part=True)
    kept = [(p, n) for p, n in zip(probes, probe_lines) if p.rsplit("/", 1)[-1] not in noise]
    for p, n in kept:
        if "/" not in p.strip("/"):
            raise ProtocolError(f"{probe_list}:{n}: {p!r} is not <identity>/<file>")
    identities = np.array([p.strip("/").rsplit("/", 1)[0] for p, _ in kept], dtype=str)
    _, counts = np.unique(identities, return_counts=True)
    if not kept or (counts < 2).all():
        raise ProtocolError(f"{probe_list}: empty probe set (no identity has two probe images"
                            f"{' after removing the noise list' if noise else ''})")
    distractor_list = root / DISTRACTOR_LIST
    distractors, distractor_lines = _list(distractor_list)
    noise = _noise(root / DISTRACTOR_NOISE, last_part=False)
    kept_d = [(d, n) for d, n in zip(distractors, distractor_lines) if d not in noise]
    if not kept_d:
        raise ProtocolError(f"{distractor_list}: no distractor images")
    if check_images:
        _check_files(probe_list, root / PROBE_DIR, [p for p, _ in kept], [n for _, n in kept])
        _check_files(distractor_list, root / DISTRACTOR_DIR, [d for d, _ in kept_d], [n for _, n in kept_d])
    return DistractorSet(root, np.array([p for p, _ in kept], dtype=str), identities,
                         np.array([d for d, _ in kept_d], dtype=str), np.array([n for _, n in kept]),
                         np.array([n for _, n in kept_d]))
