"""The insightface data formats: RecordIO training sets and pickled ``.bin`` verification sets.

**Training sets** (``faces_webface_112x112``, ``faces_emore``, Glint360K...): a folder with
``train.rec``, ``train.idx`` (:mod:`pipeline.datasets.recordio`) and ``property``
(``num_classes,height,width``). Record 0, when its header has ``flag > 0``, describes the
set: images are keys ``1 .. label[0] - 1`` and keys ``label[0] .. label[1] - 1`` are one
record per identity whose labels ``[a, b)`` are the keys of its images. Without such a
header every key of the ``.idx`` is an image; past 2**24 keys (Glint360K), where the float32
header cannot name every key, every key but 0 is read and the records without image bytes (the
identity records) are dropped. An image's identity is its label (the first one when the record
carries several). :func:`load_rec` reads only the headers (in parallel,
by byte ranges of the file) and lists every image as a reference ``<folder>/train.rec#<byte
offset>`` that :func:`pipeline.images.load_rgb` decodes; :func:`write_rec` writes the layout.

**Verification sets** (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``...): a pickle of
``(bins, issame_list)``; images ``2i`` and ``2i + 1`` (encoded bytes, or uint8 arrays of
them) are pair ``i``, and the folds are ten consecutive blocks of pairs. A pickle runs code
when it is loaded, so :func:`read_bin` admits only the globals such files need (numpy array
reconstruction, and ``_codecs.encode`` for latin-1 text as Python 3 writes bytes at protocol 2)
and refuses any other. :func:`load_bin` writes the images as files, so the set is an ordinary
pre-cropped pairs set; :func:`write_bin` writes the format. The files carry no identities:
each image is its own identity (``<file stem>-<image id>``).
"""

from __future__ import annotations

import codecs
import io
import pickle
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.datasets import DatasetError, ImageSet
from pipeline.datasets.recordio import (
    MAGIC_BYTES,
    RecordIndex,
    RecordIOError,
    RecordWriter,
    byte_ranges,
    pack_image_record,
    read_headers,
    read_index,
    read_record,
    unpack_header,
)
from pipeline.io import atomic_dir, atomic_file, write_text

REC_LAYOUT = "a folder with train.rec, train.idx and property (num_classes,height,width)"
BIN_LAYOUT = "a pickle of (bins, issame_list): images 2i and 2i+1 form pair i"
BIN_FOLDS = 10
FLOAT32_EXACT = 1 << 24  # keys above this cannot be stored exactly in a float32 header label


# -- RecordIO training sets ----------------------------------------------------------------------


def read_property(folder: str | Path) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from ``folder/property``."""
    path = Path(folder) / "property"
    if not path.is_file():
        raise RecordIOError(f"{path}: missing property file; expected {REC_LAYOUT}")
    text = path.read_text(errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) < 1:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"{path}: {text[:60]!r} is not num_classes,height,width (three positive integers)") \
            from None
    return values  # type: ignore[return-value]


def check_rec_layout(folder: str | Path) -> None:
    """Cheap check (``python -m pipeline validate``): ``folder`` holds ``train.rec``, ``train.idx``
    and a readable ``property``; the ``.idx``'s first line parses and points at a frame (the magic
    word) inside the ``.rec``. Reads a few bytes, not the index or the records."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordIOError(f"{folder}: folder not found; expected {REC_LAYOUT}")
    rec_path, idx_path = folder / "train.rec", folder / "train.idx"
    for needed in (rec_path, idx_path):
        if not needed.is_file():
            raise RecordIOError(f"{needed}: not found; expected {REC_LAYOUT}")
    read_property(folder)
    with open(idx_path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    fields = first.strip().split(b"\t")
    if len(fields) != 2 or not all(field.lstrip(b"-").isdigit() for field in fields):
        raise RecordIOError(f"{idx_path}:1: cannot parse {first.decode('utf-8', 'replace').strip()[:60]!r}; "
                            "expected 'key<TAB>byte offset' (two integers)")
    key, offset = int(fields[0]), int(fields[1])
    with open(rec_path, "rb") as f:
        f.seek(max(0, offset))
        head = f.read(4)
    if len(head) < 4 or offset < 0:
        raise RecordIOError(f"{idx_path}: key {key}: byte offset {offset} is past the end of {rec_path}")
    if head != MAGIC_BYTES:
        raise RecordIOError(f"{rec_path}: record {key} at byte {offset}: wrong magic word 0x{head[::-1].hex()} "
                            f"(expected 0x{MAGIC_BYTES[::-1].hex()}); not a RecordIO file, or not this .idx's")


def check_bin_file(path: str | Path) -> None:
    """Cheap check (``python -m pipeline validate``): ``path`` is a non-empty file whose first bytes
    open a pickle (protocol 2 to 5, or Python 2's protocols 0 and 1). Nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: .bin file not found; expected {BIN_LAYOUT}")
    with open(path, "rb") as f:
        head = f.read(2)
    if not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) and head[:1] not in (b"(", b"]"):
        raise DatasetError(f"{path}: not a pickle (starts with {head!r}); expected {BIN_LAYOUT}")


def rec_layout(rec_path: Path, index: RecordIndex) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(image keys, identity record keys, exact)`` of a ``.rec`` (int64 arrays).

    Without a ``flag > 0`` record 0 every key is an image and there are no identity records.
    With one, images are keys ``1 .. label[0] - 1`` and identities ``label[0] .. label[1] - 1``
    (``exact``). When those labels reach 2**24 (Glint360K: 17 M images) float32 cannot hold
    them exactly: then every key but 0 is returned and ``exact`` is False, for the caller to
    drop the records without image bytes (the identity records).
    """
    if not len(index) or not (index.keys == 0).any():
        return np.sort(index.keys), np.zeros(0, dtype=np.int64), True
    where = f"{rec_path}: record 0 at byte {index.offset_of(0)}"
    header = unpack_header(read_record(rec_path, index.offset_of(0), key=0), where=where)
    if header.flag == 0:
        return np.sort(index.keys), np.zeros(0, dtype=np.int64), True
    if header.labels[: min(2, header.flag)].max() >= FLOAT32_EXACT:
        return np.sort(index.keys[index.keys != 0]), np.zeros(0, dtype=np.int64), False
    end = int(header.labels[0])
    if end != header.labels[0] or end < 1:
        raise RecordIOError(f"{where}: header label {float(header.labels[0])} is not the end of the image keys")
    images = np.arange(1, end, dtype=np.int64)
    identities = np.zeros(0, dtype=np.int64)
    if header.flag >= 2 and header.labels[1] > end:
        identities = np.arange(end, int(header.labels[1]), dtype=np.int64)
    present = np.isin(np.concatenate([images, identities]), index.keys)
    if not present.all():
        missing = int(np.concatenate([images, identities])[np.argmin(present)])
        raise RecordIOError(f"{index.path}: no key {missing}, which record 0 of {rec_path} lists (images are keys "
                            f"1..{end - 1}, identities {end}..{end + len(identities) - 1})")
    return images, identities, True


def _scan(task: tuple[str, np.ndarray, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    rec_path, keys, offsets, size = task
    return read_headers(rec_path, keys, offsets, rec_size=size, image_sizes=True)


def scan_labels(rec_path: str | Path, keys: np.ndarray, offsets: np.ndarray, *, threads: int | None = None,
                progress: bool = True, parallel_from: int = 200_000,
                desc: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """``([N] float64, [N] int64)``: the first label of every record and the bytes of image after
    its header, reading only the record headers.

    The records are cut into byte ranges of the file (:func:`~pipeline.datasets.recordio.byte_ranges`),
    read front to back, on ``threads`` worker processes (default :func:`pipeline.cpu.thread_count`)
    when there are at least ``parallel_from`` records, else in this process. Memory: a few
    arrays of N numbers; no image is read.
    """
    from pipeline import cpu

    rec_path = str(rec_path)
    keys, offsets = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    size = Path(rec_path).stat().st_size
    threads = cpu.thread_count() if threads is None else int(threads)
    order = np.argsort(offsets, kind="stable")
    sorted_offsets = offsets[order]
    parallel = threads > 1 and len(keys) >= parallel_from
    # byte ranges of about 50,000 records (a progress step), at least 8 per worker when parallel
    parts = max(1, len(keys) // 50_000, 8 * threads if parallel else 1)
    bounds = [int(np.searchsorted(sorted_offsets, lo)) for lo, _ in byte_ranges(sorted_offsets, size, parts)]
    slices = [(a, b) for a, b in zip(bounds, bounds[1:] + [len(keys)]) if a < b]
    labels, sizes = np.empty(len(keys), dtype=np.float64), np.empty(len(keys), dtype=np.int64)
    bar = tqdm(total=len(keys), desc=desc, unit="rec", disable=not progress, dynamic_ncols=True)
    tasks = {(a, b): (rec_path, keys[order[a:b]], sorted_offsets[a:b], size) for a, b in slices}
    try:
        if parallel:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=threads, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_scan, task): span for span, task in tasks.items()}
                for future in as_completed(futures):
                    a, b = futures[future]
                    labels[order[a:b]], sizes[order[a:b]] = future.result()
                    bar.update(b - a)
        else:
            for (a, b), task in tasks.items():
                labels[order[a:b]], sizes[order[a:b]] = _scan(task)
                bar.update(b - a)
    finally:
        bar.close()
    return labels, sizes


def check_labels(rec_path: Path, keys: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The labels as int64 after checking them against ``num_classes`` (the property file's):
    each must be a whole number in ``0 .. num_classes - 1``. Classes without an image only warn."""
    whole = np.floor(labels) == labels
    if not whole.all():
        k = int(np.argmin(whole))
        raise RecordIOError(f"{rec_path}: record {int(keys[k])}: label {labels[k]} is not a whole number")
    inside = (labels >= 0) & (labels < num_classes)
    if not inside.all():
        k = int(np.argmin(inside))
        raise RecordIOError(f"{rec_path}: record {int(keys[k])}: label {int(labels[k])} is outside 0..{num_classes - 1}"
                            f" (property says {num_classes} classes)")
    labels = labels.astype(np.int64)
    used = len(np.unique(labels))
    if used != num_classes:
        warnings.warn(f"{rec_path}: images carry {used} of the {num_classes} classes the property file names",
                      stacklevel=2)
    return labels


def check_identity_ranges(rec_path: Path, index: RecordIndex, image_keys: np.ndarray, labels: np.ndarray,
                          identity_keys: np.ndarray) -> None:
    """Check the identity records: each range ``[a, b)`` lies within the image keys and its images
    all carry one label, a different one for every range. ``labels[i]`` is the label of ``image_keys[i]``
    (keys ``1 .. N``, in order)."""
    first = int(image_keys[0]) if len(image_keys) else 1
    seen: dict[int, int] = {}
    offsets = index.offsets_of(identity_keys)
    for key, offset in zip(identity_keys.tolist(), offsets.tolist()):
        where = f"{rec_path}: identity record {key} at byte {offset}"
        header = unpack_header(read_record(rec_path, offset, key=key), where=where)
        if header.flag < 2:
            raise RecordIOError(f"{where}: {header.flag} labels, expected the range of its image keys [a, b)")
        a, b = int(header.labels[0]), int(header.labels[1])
        if not first <= a <= b <= first + len(image_keys):
            last = first + len(image_keys) - 1
            raise RecordIOError(f"{where}: range [{a}, {b}) is outside the image keys {first}..{last}")
        if a == b:
            continue
        span = labels[a - first : b - first]
        if span.min() != span.max():
            raise RecordIOError(f"{where}: images {a}..{b - 1} carry labels {int(span.min())} and {int(span.max())}; "
                                "expected one identity")
        if int(span[0]) in seen:
            raise RecordIOError(f"{where}: label {int(span[0])} also fills identity record {seen[int(span[0])]}")
        seen[int(span[0])] = key


def load_rec(folder: str | Path, *, threads: int | None = None, progress: bool = True,
             parallel_from: int = 200_000) -> ImageSet:
    """The images of an insightface RecordIO training set (``folder/train.rec``, ``train.idx``, ``property``).

    Images table: ``image_id`` the record key (as a string), ``path`` ``<folder>/train.rec#<byte
    offset>``, ``identity`` the integer label (as a string), in key order. Only the record
    headers are read (:func:`scan_labels`); identity records, when the set has them, are checked
    (:func:`check_identity_ranges`), and the labels against the property file (:func:`check_labels`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordIOError(f"{folder}: folder not found; expected {REC_LAYOUT}")
    rec_path, idx_path = folder / "train.rec", folder / "train.idx"
    for needed in (rec_path, idx_path):
        if not needed.is_file():
            raise RecordIOError(f"{needed}: not found; expected {REC_LAYOUT}")
    num_classes, _, _ = read_property(folder)
    index = read_index(idx_path)
    index.check_offsets(rec_path)
    image_keys, identity_keys, exact = rec_layout(rec_path, index)
    offsets = index.offsets_of(image_keys)
    raw, sizes = scan_labels(rec_path, image_keys, offsets, threads=threads, progress=progress,
                             parallel_from=parallel_from, desc=f"labels {folder.name}")
    if not exact:  # keys beyond float32: the identity records are told apart by having no image
        image_keys, offsets, raw = image_keys[sizes > 0], offsets[sizes > 0], raw[sizes > 0]
    if not len(image_keys):
        raise RecordIOError(f"{rec_path}: no image records")
    labels = check_labels(rec_path, image_keys, raw, num_classes)
    if len(identity_keys):
        check_identity_ranges(rec_path, index, image_keys, labels, identity_keys)
    return ImageSet(_image_table(rec_path, image_keys, offsets, labels, num_classes))


def _image_table(rec_path: Path, keys: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                 num_classes: int) -> pd.DataFrame:
    """The images table, built without numpy string arrays (5.8 M fixed-width strings would take
    ~0.5 GB a column): one Python string per key and per path, one shared string per class."""
    prefix = f"{rec_path}#"
    names = np.array([str(k) for k in range(num_classes)], dtype=object)
    return pd.DataFrame({
        "image_id": pd.Series([str(k) for k in keys.tolist()], dtype=object),
        "path": pd.Series([prefix + str(o) for o in offsets.tolist()], dtype=object),
        "identity": pd.Series(names[labels], dtype=object),
    })


def write_rec(folder: str | Path, items: Iterable[tuple[int, bytes]], num_classes: int,
              size: int | tuple[int, int], *, label_arrays: bool = False) -> dict:
    """Write an insightface training set: ``folder/train.rec``, ``train.idx`` and ``property``.

    ``items``: ``(label, encoded image)`` with labels in ``0 .. num_classes - 1``, each label's
    items together (ascending order is the usual layout, not required). Images become keys
    ``1 .. N`` (header label a float, or a one-value array with ``label_arrays``), then one
    record per class ``j`` at key ``N + 1 + j`` with labels ``[a, b)``, the keys of its images,
    then record 0 with labels ``[N + 1, N + 1 + num_classes]`` (written last, as its values are
    known only then; the ``.idx`` gives its offset). ``size``: the images' side, or ``(height, width)``.
    The ``.rec``/``.idx`` pair is written atomically, then ``property``. Returns the counts.
    """
    folder = Path(folder)
    height, width = (size, size) if isinstance(size, int) else size
    ranges = np.zeros((num_classes, 2), dtype=np.int64)
    done: set[int] = set()
    current, key = None, 1
    with RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        for label, image in items:
            label = int(label)
            if not 0 <= label < num_classes:
                raise ValueError(f"item {key}: label {label} outside 0..{num_classes - 1}")
            if label != current:
                if label in done:
                    raise ValueError(f"item {key}: label {label} comes again after other labels; give each "
                                     "label's images together")
                if current is not None:
                    ranges[current, 1] = key
                done.add(label)
                current, ranges[label] = label, (key, key)
            writer.write(key, pack_image_record([label] if label_arrays else label, image, id=key))
            key += 1
        n_images = key - 1
        if current is not None:
            ranges[current, 1] = key
        for j in range(num_classes):
            if j not in done:
                ranges[j] = (key, key)  # a class without images: an empty range
        if n_images + 1 + num_classes > FLOAT32_EXACT:
            raise ValueError(f"{n_images} images and {num_classes} classes: keys beyond 2**24 do not fit the "
                             "float32 header labels exactly")
        for j in range(num_classes):
            writer.write(n_images + 1 + j, pack_image_record(ranges[j].astype(float), b"", id=j))
        writer.write(0, pack_image_record([n_images + 1, n_images + 1 + num_classes], b""))
    write_text(folder / "property", f"{num_classes},{height},{width}\n")
    return {"images": n_images, "classes": num_classes, "rec_bytes": (folder / "train.rec").stat().st_size}


# -- .bin verification sets ----------------------------------------------------------------------


def _latin1(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2 (latin-1 only)."""
    try:
        name = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        name = None
    if name != "iso8859-1" or not isinstance(text, str):
        raise RefusedType(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1", errors)


def _admitted() -> dict[tuple[str, str], object]:
    """The globals a .bin may name: numpy array and scalar reconstruction, bytes and bytearray."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    objects = {"multiarray._reconstruct": multiarray._reconstruct, "multiarray.scalar": multiarray.scalar,
               "numeric._frombuffer": numeric._frombuffer}
    admitted: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                               ("_codecs", "encode"): _latin1}
    for package in ("numpy.core", "numpy._core"):
        for qualified, obj in objects.items():
            module, name = qualified.split(".")
            admitted[(f"{package}.{module}", name)] = obj
    for module in ("builtins", "__builtin__"):
        admitted[(module, "bytes")] = bytes
        admitted[(module, "bytearray")] = bytearray
    return admitted


class RefusedType(pickle.UnpicklingError):
    """A pickle names a global that a .bin file has no need for."""


class _BinUnpickler(pickle.Unpickler):
    admitted = None

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if _BinUnpickler.admitted is None:
            _BinUnpickler.admitted = _admitted()
        found = _BinUnpickler.admitted.get((module, name))
        if found is None:
            raise RefusedType(f"{module}.{name}")
        return found


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """``(images, same)``: the encoded images (``2 * P`` bytes objects) and ``[P]`` bool labels of a
    ``.bin`` file, loaded with a restricted unpickler (Python 2 files too: ``encoding="bytes"``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: .bin file not found; expected {BIN_LAYOUT}")
    try:
        with open(path, "rb") as f:
            loaded = _BinUnpickler(io.BufferedReader(f, 1 << 20), encoding="bytes").load()
    except RefusedType as err:
        raise DatasetError(f"{path}: refused to unpickle {err} (only bytes, lists, booleans and numpy uint8 arrays "
                           "are admitted; a pickle naming other types can run code when loaded)") from None
    except Exception as err:  # noqa: BLE001 - whatever a damaged pickle raises
        text = str(err).splitlines()[0] if str(err) else ""
        raise DatasetError(f"{path}: not a readable pickle ({type(err).__name__}: {text}); expected {BIN_LAYOUT}") \
            from None
    return _bin_contents(path, loaded)


def _bin_contents(path: Path, loaded: object) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise DatasetError(f"{path}: holds a {type(loaded).__name__}, expected {BIN_LAYOUT}")
    bins, same = loaded
    if not isinstance(bins, (list, tuple)):
        raise DatasetError(f"{path}: bins is a {type(bins).__name__}, expected a list of encoded images")
    if not isinstance(same, (list, tuple, np.ndarray)) or np.ndim(same) != 1:
        raise DatasetError(f"{path}: issame_list is a {type(same).__name__}, expected a list of booleans")
    if len(bins) % 2:
        raise DatasetError(f"{path}: {len(bins)} images, an odd number; images 2i and 2i+1 form pair i")
    if len(same) != len(bins) // 2:
        raise DatasetError(f"{path}: {len(same)} labels in issame_list for {len(bins) // 2} pairs "
                           f"({len(bins)} images); expected one label per pair")
    images = []
    for i, item in enumerate(bins):
        if isinstance(item, (bytes, bytearray)):
            images.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
            images.append(item.tobytes())
        else:
            shape = f" {item.dtype} {item.shape}" if isinstance(item, np.ndarray) else ""
            raise DatasetError(f"{path}: image {i} is a{shape} {type(item).__name__}, expected encoded image bytes")
    labels = np.empty(len(same), dtype=bool)
    for i, value in enumerate(same):
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            labels[i] = bool(value)
        else:
            raise DatasetError(f"{path}: issame_list[{i}] is {value!r}, expected True/False")
    return images, labels


def bin_folds(n_pairs: int, k: int = BIN_FOLDS) -> np.ndarray:
    """``[n_pairs]`` fold numbers ``1..k``: ``k`` consecutive blocks, the first ``n_pairs % k`` one pair
    longer (scikit-learn's unshuffled ``KFold``, as insightface evaluates); fewer folds when
    there are fewer than ``k`` pairs."""
    k = max(1, min(k, n_pairs))
    sizes = np.full(k, n_pairs // k) + (np.arange(k) < n_pairs % k)
    return np.repeat(np.arange(1, k + 1), sizes)


def _extension(image: bytes) -> str:
    if image.startswith(b"\xff\xd8"):
        return ".jpg"
    if image.startswith(b"\x89PNG"):
        return ".png"
    return ".bmp" if image.startswith(b"BM") else ".img"


def load_bin(path: str | Path, out_dir: str | Path) -> ImageSet:
    """An insightface ``.bin`` as a pre-cropped pairs set: its images written (atomically) as
    ``out_dir/<image id>.<jpg|png>`` (ids ``00000``, ``00001``... in file order), the pairs in file
    order with folds from :func:`bin_folds`. Each image is its own identity (the file has none)."""
    path, out_dir = Path(path), Path(out_dir)
    images, same = read_bin(path)
    width = max(5, len(str(len(images) - 1)))
    ids = [f"{i:0{width}d}" for i in range(len(images))]
    files = [f"{image_id}{_extension(image)}" for image_id, image in zip(ids, images)]
    with atomic_dir(out_dir) as tmp:
        for name, image in zip(files, images):
            (tmp / name).write_bytes(image)
    table = pd.DataFrame({"image_id": ids, "path": [str(out_dir / name) for name in files],
                          "identity": [f"{path.stem}-{image_id}" for image_id in ids]})
    pairs = pd.DataFrame({"fold": bin_folds(len(same)), "image_id1": ids[0::2], "image_id2": ids[1::2],
                          "same": same.astype(int)})
    return ImageSet(table, pairs, folds_assigned=f"{BIN_FOLDS} consecutive blocks of pairs (insightface .bin)")


def write_bin(path: str | Path, images: Iterable[bytes], same: Iterable[bool], *, protocol: int = 4) -> int:
    """Write an insightface ``.bin``: the pickle (``protocol`` 4 by default) of ``(bins, issame_list)``,
    ``bins`` a list of ``bytes`` (images ``2i``, ``2i + 1`` form pair ``i``), ``issame_list`` a list
    of bools. Written atomically; returns the number of pairs."""
    bins = [bytes(image) for image in images]
    labels = [bool(v) for v in same]
    if len(bins) != 2 * len(labels):
        raise ValueError(f"{len(bins)} images for {len(labels)} pairs; expected two images per pair")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((bins, labels), f, protocol=protocol)
    return len(labels)
