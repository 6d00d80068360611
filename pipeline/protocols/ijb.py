"""IJB-B / IJB-C from the released files: read, align, embed, pool templates, score template pairs.

Layout of a set folder (``IJBC/`` or ``IJBB/``; ``<set>`` is ``ijbc`` or ``ijbb``, found from the
one ``meta/*_face_tid_mid.txt``)::

    meta/<set>_face_tid_mid.txt          image template_id media_id              (one line per face)
    meta/<set>_name_5pts_score.txt       image x1 y1 ... x5 y5 detector_score    (one line per image)
    meta/<set>_template_pair_label.txt   template_id1 template_id2 label (1 genuine, 0 impostor)
    meta/<set>_1N_gallery_G1.csv, _G2    IJB-C galleries (IJB-B: _S1, _S2); CSV with a header row,
    meta/<set>_1N_probe_mixed.csv        columns TEMPLATE_ID, SUBJECT_ID, ... (one row per face)
    loose_crop/<image>                   the face crops the landmarks refer to

Fields are separated by whitespace; landmarks are pixel (x, y) in the crop, in the order left eye,
right eye, nose, left and right mouth corner (image left / right, as MTCNN gives them).

Pooling (:func:`pool_templates`): each face's feature (optionally times its detector score, and
optionally L2-normalised first) is averaged within its (template, media) group, the media means are
summed over the template, and the sum is L2-normalised. Groups are per (template, media), never per
media alone: a media id that several templates (even of different subjects) share stays separate
in each. Template pairs are scored by cosine (:func:`pair_scores`), float32, from blocks of the
template Gram matrix where the pairs are dense enough, otherwise by gathering in chunks.

A stage calls :func:`read_ijb` then :func:`embed_ijb` (see :mod:`pipeline.protocols.stages`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd
import scipy.sparse

if TYPE_CHECKING:  # torch loads only where a model embeds: evaluating from features does without it (0.5 GB)
    import torch

from pipeline.protocols import ProtocolError
from pipeline.protocols.params import ProtocolParams

FACES = "{}_face_tid_mid.txt"
POINTS = "{}_name_5pts_score.txt"
PAIRS = "{}_template_pair_label.txt"
GALLERY = "{}_1N_gallery_{}.csv"
PROBES = "{}_1N_probe_mixed.csv"
GALLERY_NAMES = {"ijbc": ("G1", "G2"), "ijbb": ("S1", "S2")}
CROPS = "loose_crop"

# elements of one block of the template Gram matrix (float32: 4 bytes each)
_GRAM_BLOCK_ELEMENTS = 32 * 2**20
_GATHER_CHUNK = 1 << 16


@dataclass
class TemplateList:
    """Templates of a gallery or probe file: ``templates`` [n] int64 (sorted, unique) and their
    ``subjects`` [n] int64."""

    path: Path
    templates: np.ndarray
    subjects: np.ndarray


@dataclass
class IJBSet:
    """One IJB set as read from its files.

    ``images`` [M]: the images to embed (5-point file order, those the face list uses);
    ``landmarks`` [M, 5, 2] float64, ``detector`` [M] float32. One entry per line of the face list:
    ``face_image`` [R] (index into ``images``), ``face_template`` [R], ``face_media`` [R] int64.
    Template pairs: ``pair_t1``, ``pair_t2`` [P] int32 (int64 for ids beyond it) and ``pair_label`` [P]
    bool. ``galleries``: name (G1, G2 / S1, S2) -> :class:`TemplateList`; ``probes``: the mixed probe templates, or None
    when the set has no 1:N files.
    """

    root: Path
    prefix: str
    images: np.ndarray
    landmarks: np.ndarray
    detector: np.ndarray
    face_image: np.ndarray
    face_template: np.ndarray
    face_media: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_label: np.ndarray
    galleries: dict[str, TemplateList] = field(default_factory=dict)
    probes: TemplateList | None = None

    def meta(self, pattern: str, *args: str) -> Path:
        return self.root / "meta" / pattern.format(self.prefix, *args)


# ------------------------------------------------------------------------------- parsing
def _line_of_row(path: Path, row: int, header_lines: int = 0) -> int:
    """1-based line number of data row ``row`` (0-based; blank lines are skipped as pandas does)."""
    seen = -1
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if number <= header_lines or not line.strip():
                continue
            seen += 1
            if seen == row:
                return number
    return row + header_lines + 1


def _first_bad_line(path: Path, check: Callable[[list[str]], None], header_lines: int = 0) -> None:
    """Raise the one-line error of the first line ``check`` rejects (``check`` raises ValueError)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if number <= header_lines or not line.strip():
                continue
            try:
                check(line.split())
            except ValueError as err:
                raise ProtocolError(f"{path}:{number}: {err}") from None


def _need(path: Path) -> Path:
    if not path.is_file():
        raise ProtocolError(f"{path}: file not found")
    return path


def _read_whitespace(path: Path, names: list[str], dtypes: dict, check: Callable[[list[str]], None]
                     ) -> pd.DataFrame:
    """A whitespace-separated table with no header; a line that does not parse is named."""
    _need(path)
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, names=names, dtype=dtypes, engine="c")
    except pd.errors.EmptyDataError:
        raise ProtocolError(f"{path}: the file is empty") from None
    except (ValueError, pd.errors.ParserError, OverflowError) as err:
        _first_bad_line(path, check)
        raise ProtocolError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from None
    if frame.isna().any(axis=None):  # a short line pandas padded with NaN (float or string columns)
        _first_bad_line(path, check)
    if frame.empty:
        raise ProtocolError(f"{path}: the file has no lines")
    return frame


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an integer") from None


def _check_face_line(fields: list[str]) -> None:
    if len(fields) != 3:
        raise ValueError(f"expected 3 fields (image template_id media_id), got {len(fields)}")
    _int(fields[1], "template id")
    _int(fields[2], "media id")


def _check_pair_line(fields: list[str]) -> None:
    if len(fields) != 3:
        raise ValueError(f"expected 3 fields (template_id1 template_id2 label), got {len(fields)}")
    _int(fields[0], "template id")
    _int(fields[1], "template id")
    if fields[2] not in ("0", "1"):
        raise ValueError(f"label {fields[2]!r} is not 0 or 1")


def _check_points_line(fields: list[str]) -> None:
    if len(fields) != 12:
        raise ValueError(f"landmarks do not parse: expected an image name, 10 coordinates and a detector "
                         f"score (12 fields), got {len(fields)}")
    try:
        values = np.array([float(v) for v in fields[1:]])
    except ValueError:
        raise ValueError(f"landmarks do not parse: {' '.join(fields[1:])!r} are not all numbers") from None
    if not np.isfinite(values).all():
        raise ValueError(f"landmarks do not parse: {' '.join(fields[1:])!r} holds a non-finite value")


def read_faces(path: Path) -> pd.DataFrame:
    """``<set>_face_tid_mid.txt`` -> columns ``image`` (str), ``template``, ``media`` (int64)."""
    return _read_whitespace(path, ["image", "template", "media"], {"image": str, "template": np.int64,
                                                                   "media": np.int64}, _check_face_line)


def _narrow(values: np.ndarray) -> np.ndarray:
    """int32 when every value fits (IJB-C's 15.7 M pairs: 63 MB a column instead of 125)."""
    if len(values) and values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max:
        return values.astype(np.int32)
    return values


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<set>_template_pair_label.txt`` -> ``(t1 [P], t2 [P] int32 (int64 if ids need it), label [P] bool)``."""
    names = ["t1", "t2", "label"]
    try:  # ids as int32 and labels as int8 straight from the parser (IJB-C: 15.7 M lines)
        frame = pd.read_csv(_need(path), sep=r"\s+", header=None, names=names, engine="c",
                            dtype={"t1": np.int32, "t2": np.int32, "label": np.int8})
        if frame.empty or frame.isna().any(axis=None):
            raise ValueError("short line or empty file")
    except (ValueError, OverflowError, pd.errors.ParserError, pd.errors.EmptyDataError):
        frame = _read_whitespace(path, names, {"t1": np.int64, "t2": np.int64, "label": np.int64}, _check_pair_line)
    label = frame["label"].to_numpy()
    bad = (label != 0) & (label != 1)
    if bad.any():
        raise ProtocolError(f"{path}:{_line_of_row(path, int(np.argmax(bad)))}: label "
                            f"{int(label[bad][0])} is not 0 or 1")
    return _narrow(frame["t1"].to_numpy()), _narrow(frame["t2"].to_numpy()), label == 1


def read_points(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<set>_name_5pts_score.txt`` -> ``(names [M], landmarks [M, 5, 2] float64, scores [M] float32)``."""
    columns = ["image"] + [f"v{i}" for i in range(11)]
    frame = _read_whitespace(path, columns, {"image": str} | {c: np.float64 for c in columns[1:]},
                             _check_points_line)
    values = frame[columns[1:]].to_numpy(np.float64)
    if not np.isfinite(values).all():
        _first_bad_line(path, _check_points_line)
    names = frame["image"].to_numpy(str)
    dup = pd.Index(names).duplicated()
    if dup.any():
        row = int(np.argmax(dup))
        first = int(np.flatnonzero(names == names[row])[0])
        raise ProtocolError(f"{path}:{_line_of_row(path, row)}: image {names[row]!r} is listed again "
                            f"(first on line {_line_of_row(path, first)})")
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10].astype(np.float32)


def read_template_list(path: Path, *, what: str) -> TemplateList:
    """A 1:N CSV (header row with TEMPLATE_ID and SUBJECT_ID; one row per face) -> its templates.

    A template listed with two subjects, a value that is not an integer and an empty list are
    errors naming the file (and line)."""
    _need(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, ValueError) as err:
        raise ProtocolError(f"{path}: cannot be read as a CSV ({str(err).splitlines()[0]})") from None
    frame.columns = [str(c).strip().upper() for c in frame.columns]
    missing = [c for c in ("TEMPLATE_ID", "SUBJECT_ID") if c not in frame.columns]
    if missing:
        raise ProtocolError(f"{path}:1: the header lacks {', '.join(missing)} (has {', '.join(frame.columns)})")
    if frame.empty:
        raise ProtocolError(f"{path}: empty {what} set (a header and no rows)")
    numbers = {}
    for column in ("TEMPLATE_ID", "SUBJECT_ID"):
        parsed = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        bad = parsed.isna() | (parsed != parsed.round())
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise ProtocolError(f"{path}:{_line_of_row(path, row, 1)}: {column} {frame[column].iloc[row]!r} "
                                "is not an integer")
        numbers[column] = parsed.to_numpy(np.int64)
    templates, subjects = numbers["TEMPLATE_ID"], numbers["SUBJECT_ID"]
    unique, first, inverse = np.unique(templates, return_index=True, return_inverse=True)
    clash = subjects != subjects[first][inverse]
    if clash.any():
        row = int(np.argmax(clash))
        raise ProtocolError(f"{path}:{_line_of_row(path, row, 1)}: template {templates[row]} has subject "
                            f"{subjects[row]} here but {subjects[first[inverse[row]]]} on line "
                            f"{_line_of_row(path, int(first[inverse[row]]), 1)}")
    return TemplateList(path, unique, subjects[first])


# ---------------------------------------------------------------------------------- the set
def find_prefix(root: Path) -> str:
    """``ijbc`` from ``meta/ijbc_face_tid_mid.txt`` (exactly one face list must be there)."""
    meta = root / "meta"
    if not meta.is_dir():
        raise ProtocolError(f"{meta}: no meta folder (an IJB set holds meta/ and loose_crop/)")
    found = sorted(p.name[: -len(FACES.format(""))] for p in meta.glob(FACES.format("*")))
    if len(found) != 1:
        raise ProtocolError(f"{meta}: expected one *_face_tid_mid.txt, found {len(found)}")
    return found[0]


def _check_on_disk(root: Path, faces_path: Path, names: np.ndarray) -> None:
    crops = root / CROPS
    if not crops.is_dir():
        raise ProtocolError(f"{crops}: the loose_crop folder is missing")
    present = set(os.listdir(crops))
    missing = np.fromiter(((n not in present) and not (crops / n).is_file() for n in names), bool, len(names))
    if missing.any():
        row = int(np.argmax(missing))
        raise ProtocolError(f"{faces_path}:{_line_of_row(faces_path, row)}: image {CROPS}/{names[row]} "
                            "is not on disk")


def _galleries(root: Path, prefix: str) -> tuple[dict[str, TemplateList], TemplateList | None]:
    meta = root / "meta"
    probes_path = meta / PROBES.format(prefix)
    names = GALLERY_NAMES.get(prefix) or tuple(sorted(p.stem.rsplit("_", 1)[-1]
                                                      for p in meta.glob(GALLERY.format(prefix, "*"))))
    present = [n for n in names if (meta / GALLERY.format(prefix, n)).is_file()]
    if not present and not probes_path.is_file():
        return {}, None
    if not probes_path.is_file():
        raise ProtocolError(f"{probes_path}: file not found (the set has 1:N galleries, so it needs probes)")
    if not present:
        raise ProtocolError(f"{meta}: {probes_path.name} but no gallery file ({GALLERY.format(prefix, '*')})")
    galleries = {n: read_template_list(meta / GALLERY.format(prefix, n), what="gallery") for n in present}
    return galleries, read_template_list(probes_path, what="probe")


def _check_templates_known(path: Path, templates: Iterable[np.ndarray], known: np.ndarray, header: int = 0,
                           what: str = "template") -> None:
    for column in templates:
        unknown = ~np.isin(column, known)
        if unknown.any():
            row = int(np.argmax(unknown))
            raise ProtocolError(f"{path}:{_line_of_row(path, row, header)}: {what} {column[row]} has no images "
                                "in the face list")


def read_ijb(root: str | Path, *, check_images: bool = True) -> IJBSet:
    """Read and cross-check an IJB set folder (see the module docstring); one-line errors.

    ``check_images``: also check that every face-list image is in ``loose_crop/`` (needed to
    embed; evaluating from features does not need the images).
    """
    root = Path(root)
    prefix = find_prefix(root)
    meta = root / "meta"
    faces_path = meta / FACES.format(prefix)
    faces = read_faces(faces_path)
    points_path = meta / POINTS.format(prefix)
    names, landmarks, scores = read_points(points_path)
    face_names = faces["image"].to_numpy(str)
    where = pd.Index(names).get_indexer(face_names)
    if (where < 0).any():
        row = int(np.argmax(where < 0))
        raise ProtocolError(f"{faces_path}:{_line_of_row(faces_path, row)}: image {face_names[row]!r} has no "
                            f"landmarks in {points_path.name}")
    if check_images:
        _check_on_disk(root, faces_path, face_names)
    used, face_image = np.unique(where, return_inverse=True)
    templates = faces["template"].to_numpy(np.int64)
    pairs_path = meta / PAIRS.format(prefix)
    t1, t2, label = read_pairs(pairs_path)
    known = np.unique(templates)
    _check_templates_known(pairs_path, (t1, t2), known)
    galleries, probes = _galleries(root, prefix)
    for listed in [*galleries.values(), *([probes] if probes else [])]:
        if not np.isin(listed.templates, known).all():  # find the line only when there is one to name
            raw = pd.read_csv(listed.path, dtype=str, usecols=lambda c: c.strip().upper() == "TEMPLATE_ID")
            _check_templates_known(listed.path, (pd.to_numeric(raw.iloc[:, 0]).to_numpy(np.int64),), known, 1)
    return IJBSet(root, prefix, names[used], landmarks[used], scores[used], face_image.astype(np.int64),
                  templates, faces["media"].to_numpy(np.int64), t1, t2, label, galleries, probes)


# ------------------------------------------------------------------------------- embedding
def _flip_embed(model: torch.nn.Module, images: torch.Tensor, flip: str, *, grayscale: bool,
                device: torch.device, batch_size: int) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [B, D] (sum, none) or [B, 2D] (concat) float32 raw model outputs."""
    from pipeline.train import embed_array

    if flip == "concat":
        plain = embed_array(model, images, grayscale=grayscale, device=device, batch_size=batch_size)
        mirrored = embed_array(model, images.flip(2), grayscale=grayscale, device=device, batch_size=batch_size)
        return np.concatenate([plain, mirrored], axis=1)
    return embed_array(model, images, grayscale=grayscale, device=device, batch_size=batch_size,
                       flip=flip == "sum")


def load_crop(path: Path, where: str) -> np.ndarray:
    """An image as RGB uint8; a file that cannot be decoded is an error naming it and ``where``."""
    from pipeline.images import BadImage, load_rgb

    try:
        return load_rgb(path)[0]
    except BadImage as err:
        raise ProtocolError(f"{path}: {err} ({where})") from None


def embed_ijb(ijb: IJBSet, model: torch.nn.Module, saved: dict, params: ProtocolParams, *,
              device: torch.device | str = "cpu", progress: bool = True) -> np.ndarray:
    """Features [M, D] (or [M, 2D] with ``flip = concat``) float32 of ``ijb.images``, in order.

    Each loose crop is aligned with its 5 landmarks onto the model's template
    (:func:`pipeline.align.align_face` at the model's ``image_size``) and embedded with its mirror
    as ``params.flip`` says. Raw outputs: weighting and normalising happen in pooling.
    """
    import torch
    from tqdm import tqdm

    from pipeline.align import align_face

    device = torch.device(device)
    size = int(saved["image_size"])
    grayscale = bool(saved["model_params"].get("grayscale", False))
    points_name = POINTS.format(ijb.prefix)
    out: list[np.ndarray] = []
    bar = tqdm(total=len(ijb.images), desc=f"embed {ijb.root.name}", unit="img", disable=not progress)
    for start in range(0, len(ijb.images), params.batch_size):
        crops = []
        for i in range(start, min(start + params.batch_size, len(ijb.images))):
            image = load_crop(ijb.root / CROPS / ijb.images[i], f"listed in {points_name}")
            crops.append(align_face(image, ijb.landmarks[i], size)[0])
        batch = torch.from_numpy(np.stack(crops))
        out.append(_flip_embed(model, batch, params.flip, grayscale=grayscale, device=device,
                               batch_size=params.batch_size))
        bar.update(len(crops))
    bar.close()
    features = np.concatenate(out).astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        raise ProtocolError(f"{ijb.root}: the model produced non-finite features")
    return features


# ---------------------------------------------------------------------------------- pooling
def pool_templates(features: np.ndarray, face_feature: np.ndarray, face_template: np.ndarray,
                   face_media: np.ndarray, *, detector: np.ndarray | None = None, keep_norm: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Template features from face features.

    ``features`` [M, D] (any float; not copied); per face (one per face-list line, R of them):
    ``face_feature`` [R] row of ``features``, ``face_template`` [R], ``face_media`` [R] ids;
    ``detector`` [M] scores to weight each feature by (None: no weighting); ``keep_norm=False``
    L2-normalises each feature first. A face's weight is
    ``score / (norm if not keep_norm) / (faces in its (template, media) group)``; the template is
    the weighted sum, L2-normalised. Computed as one sparse [T, M] x [M, D] product (float32).

    Returns ``(template_ids [T] int64 sorted, pooled [T, D] float32)``; a template whose sum is 0
    (every weight 0) stays a zero row (its pairs score 0).
    """
    face_feature = np.asarray(face_feature, dtype=np.int64)
    template_ids, t_index = np.unique(face_template, return_inverse=True)
    _, m_index = np.unique(face_media, return_inverse=True)
    groups, g_index, g_count = np.unique(t_index.astype(np.int64) * (int(m_index.max()) + 1) + m_index,
                                         return_inverse=True, return_counts=True)
    weight = 1.0 / g_count[g_index]
    if detector is not None:
        weight = weight * np.asarray(detector, dtype=np.float64)[face_feature]
    if not keep_norm:
        rows = np.unique(face_feature)
        norms = np.zeros(features.shape[0])
        norms[rows] = _row_norms(features, rows)
        if (norms[rows] == 0).any():
            raise ProtocolError(f"feature row {int(rows[np.argmax(norms[rows] == 0)])} is a zero vector; "
                                "it cannot be normalised (keep_norm: false)")
        weight = weight / norms[face_feature]
    matrix = scipy.sparse.csr_matrix((weight.astype(np.float32), (t_index, face_feature)),
                                     shape=(len(template_ids), features.shape[0]))
    pooled = np.asarray(matrix @ features, dtype=np.float32)
    norms = np.linalg.norm(pooled, axis=1)
    np.divide(pooled, norms[:, None], out=pooled, where=norms[:, None] > 0)
    return template_ids, pooled


def _row_norms(features: np.ndarray, rows: np.ndarray, size: int = 65536) -> np.ndarray:
    """L2 norms [n] float64 of ``features[rows]``, read in chunks (features may be a memory map)."""
    out = np.empty(len(rows))
    for start in range(0, len(rows), size):
        block = np.asarray(features[rows[start:start + size]], dtype=np.float64)
        out[start:start + size] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def template_index(template_ids: np.ndarray, wanted: np.ndarray, what: str = "template") -> np.ndarray:
    """Positions [n] int32 of ``wanted`` ids in the sorted ``template_ids`` (ValueError if absent)."""
    wanted = np.asarray(wanted)
    if len(wanted) == 0:
        return np.zeros(0, dtype=np.int32)
    if len(template_ids) and template_ids[0] >= 0 and template_ids[-1] < 50_000_000:
        table = np.full(int(template_ids[-1]) + 1, -1, dtype=np.int32)
        table[template_ids] = np.arange(len(template_ids), dtype=np.int32)
        if wanted.min() >= 0 and wanted.max() < len(table):
            index = table[wanted]
        else:
            inside = (wanted >= 0) & (wanted < len(table))
            index = np.full(wanted.shape, -1, dtype=np.int32)
            index[inside] = table[wanted[inside]]
    else:
        pos = np.minimum(np.searchsorted(template_ids, wanted), len(template_ids) - 1)
        index = np.where(template_ids[pos] == wanted, pos, -1).astype(np.int32)
    if (index < 0).any():
        raise ValueError(f"{what} {wanted[np.argmax(index < 0)]} has no pooled feature")
    return index


def _compact(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``index`` [P] (< ``size``), sorted, and a table [size] int32 giving each
    one's position among them (by counting, not sorting)."""
    present = np.bincount(index, minlength=size) > 0
    return np.flatnonzero(present), np.cumsum(present, dtype=np.int32) - 1


def pair_scores(pooled: np.ndarray, i1: np.ndarray, i2: np.ndarray, *,
                block_elements: int = _GRAM_BLOCK_ELEMENTS) -> np.ndarray:
    """Cosine scores [P] float32 of template pairs (``i1``, ``i2`` [P]: rows of ``pooled`` [T, D],
    unit or zero rows).

    When the distinct first and second templates span a matrix at most 16 times the number of
    pairs (IJB: gallery x probe templates), blocks of ``pooled[rows] @ pooled[cols].T`` are computed
    (float32 numpy matrix products, each at most ``block_elements``: 128 MB) and the pairs read off them
    (one pass over the pair list per block, in chunks); otherwise the pairs are gathered and
    multiplied in chunks. Beyond the output, memory holds one block and chunk-sized temporaries.
    """
    out = np.empty(len(i1), dtype=np.float32)
    if len(i1) == 0:
        return out
    feats = np.ascontiguousarray(pooled, dtype=np.float32)
    rows, row_of = _compact(np.asarray(i1), len(pooled))
    cols, col_of = _compact(np.asarray(i2), len(pooled))
    if len(rows) * len(cols) > 16 * len(i1):
        for s in range(0, len(i1), _GATHER_CHUNK):
            a, b = feats[i1[s:s + _GATHER_CHUNK]], feats[i2[s:s + _GATHER_CHUNK]]
            out[s:s + _GATHER_CHUNK] = np.einsum("ij,ij->i", a, b)
        return out
    right = np.ascontiguousarray(feats[cols].T)
    per_block = max(1, block_elements // len(cols))
    whole = per_block >= len(rows)
    step = 1 << 22
    for lo in range(0, len(rows), per_block):
        hi = min(lo + per_block, len(rows))
        gram = np.matmul(feats[rows[lo:hi]], right).ravel()  # BLAS sgemm, the process's BLAS threads
        for s in range(0, len(i1), step):  # the pairs whose first template is in this block
            r = row_of[i1[s:s + step]]
            c = col_of[i2[s:s + step]]
            if not whole:
                inside = np.flatnonzero((r >= lo) & (r < hi))
                r, c = r[inside], c[inside]
            flat = (r - lo).astype(np.int64)
            flat *= len(cols)
            flat += c
            if whole:
                out[s:s + step] = gram[flat]
            else:
                out[s + inside] = gram[flat]
    return out
