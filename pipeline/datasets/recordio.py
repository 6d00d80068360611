"""MXNet RecordIO (``.rec`` + ``.idx``) read and written without MXNet.

Framing (dmlc-core's ``recordio``), all words little-endian ``uint32``::

    frame   = magic (0xced7230a) | lrec | payload | zero padding to a multiple of 4 bytes
    lrec    = cflag << 29 | length          (length: the payload bytes of this frame, < 2**29)
    cflag   = 0 whole record, 1 first part, 2 middle part, 3 last part

A record is split over several frames only where its payload holds the magic word at an
offset that is a multiple of 4: the writer drops those four bytes and ends a frame there
(so a reader that scans for the magic word never mistakes payload for a frame start), and
the reader puts the magic word back between the parts it joins (:func:`encode_record`,
:func:`read_record`).

``.idx``: one text line per record, ``key<TAB>byte offset of its first frame``
(:func:`read_index`). Image records (:func:`unpack_image_record`) start with a header packed
as ``<IfQQ`` (flag, label, id, id2); when ``flag > 0`` it is followed by ``flag`` float32
labels, which replace the header's label; the image bytes (JPEG) follow.

Errors are :class:`RecordIOError` (a :class:`~pipeline.datasets.DatasetError`), one line that
names the file, the key or byte offset and the problem.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.datasets import DatasetError
from pipeline.io import atomic_file

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FRAME_HEAD = struct.Struct("<II")  # magic, lrec
LENGTH_MASK = (1 << 29) - 1
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3
IMAGE_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes


class RecordIOError(DatasetError):
    """A ``.rec`` / ``.idx`` pair that cannot be read as RecordIO (one-line message)."""


def _padded(length: int) -> int:
    return (length + 3) & ~3


def _frame(cflag: int, data: bytes | memoryview) -> bytes:
    return FRAME_HEAD.pack(MAGIC, (cflag << 29) | len(data)) + bytes(data) + b"\0" * (_padded(len(data)) - len(data))


def _aligned_magic(payload: bytes) -> list[int]:
    """Offsets (multiples of 4) where the magic word occurs in ``payload``."""
    found, pos = [], payload.find(MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            found.append(pos)
            pos = payload.find(MAGIC_BYTES, pos + 4)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    return found


def encode_record(payload: bytes) -> bytes:
    """The frames of one record: a single ``WHOLE`` frame, or, where ``payload`` holds the magic
    word at 4-byte aligned offsets, ``FIRST``, ``MIDDLE``... and ``LAST`` frames without those words."""
    payload = bytes(payload)
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"a RecordIO record holds at most {LENGTH_MASK} bytes, got {len(payload)}")
    cuts = _aligned_magic(payload)
    if not cuts:
        return _frame(WHOLE, payload)
    view, frames, start = memoryview(payload), [], 0
    for k, cut in enumerate(cuts):
        frames.append(_frame(FIRST if k == 0 else MIDDLE, view[start:cut]))
        start = cut + 4
    frames.append(_frame(LAST, view[start:]))
    return b"".join(frames)


ReadAt = Callable[[int, int], bytes]  # (size, offset) -> at most size bytes


def _reader_of(source: str | os.PathLike | BinaryIO | int) -> tuple[ReadAt, str, Callable[[], None]]:
    """``(read_at, name, close)`` for a path, an open binary file or a file descriptor."""
    if isinstance(source, int):
        return (lambda n, pos: os.pread(source, n, pos)), f"fd {source}", lambda: None
    if isinstance(source, (str, os.PathLike)):
        f = open(source, "rb")  # noqa: SIM115 - closed by the caller through the returned close
        return _reader_of(f)[0], str(source), f.close
    name = str(getattr(source, "name", "<stream>"))

    def read_at(n: int, pos: int) -> bytes:
        source.seek(pos)
        return source.read(n)

    return read_at, name, lambda: None


def _where(name: str, offset: int, key: int | None) -> str:
    return f"{name}: record {key} at byte {offset}" if key is not None else f"{name}: record at byte {offset}"


def _read_frames(read_at: ReadAt, name: str, offset: int, key: int | None) -> tuple[bytes, int]:
    """``(payload, end)``: the record whose first frame is at ``offset``; ``end`` is the byte after it."""
    parts, pos = [], offset
    while True:
        head = read_at(FRAME_HEAD.size, pos)
        if len(head) < FRAME_HEAD.size:
            what = "past the end of the file" if not head and pos == offset else "truncated (the file ends inside it)"
            raise RecordIOError(f"{_where(name, offset, key)}: {what}")
        magic, lrec = FRAME_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"{_where(name, offset, key)}: wrong magic word 0x{magic:08x} at byte {pos} "
                                f"(expected 0x{MAGIC:08x}); not a RecordIO file, or a wrong .idx offset")
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        allowed = (WHOLE, FIRST) if not parts else (MIDDLE, LAST)
        if cflag not in allowed:
            raise RecordIOError(f"{_where(name, offset, key)}: frame at byte {pos} has continuation flag {cflag}, "
                                f"expected {' or '.join(map(str, allowed))}")
        padded = _padded(length)
        data = read_at(padded, pos + FRAME_HEAD.size)
        if len(data) < length:  # (a last frame whose padding the file's end cut off is complete)
            raise RecordIOError(f"{_where(name, offset, key)}: truncated (frame at byte {pos} announces {length} "
                                f"bytes, the file holds {len(data)})")
        parts.append(data[:length] if len(data) != length else data)
        pos += FRAME_HEAD.size + padded
        if cflag in (WHOLE, LAST):
            return (parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)), pos


def read_record(source: str | os.PathLike | BinaryIO | int, offset: int, *, key: int | None = None,
                name: str | None = None) -> bytes:
    """The payload of the record whose first frame starts at byte ``offset`` of ``source`` (a path,
    an open binary file, or a file descriptor read with ``os.pread``); split records are joined
    with the magic word between the parts. ``key`` and ``name`` (default: the file's) only name
    the record in errors."""
    read_at, own_name, close = _reader_of(source)
    try:
        return _read_frames(read_at, name or own_name, int(offset), key)[0]
    finally:
        close()


# -- image records -------------------------------------------------------------------------------


def pack_image_record(label: float | Sequence[float] | np.ndarray, image: bytes, *, id: int = 0,  # noqa: A002
                      id2: int = 0) -> bytes:
    """An image record: ``<IfQQ`` header, then (for a sequence ``label``) its float32 values, then ``image``.

    A number gives ``flag = 0`` and the number in the header; a sequence of ``k`` values gives
    ``flag = k``, 0 in the header's label, and the values after it (MXNet's ``recordio.pack``).
    """
    if np.ndim(label) == 0:
        return IMAGE_HEADER.pack(0, float(label), int(id), int(id2)) + bytes(image)
    values = np.asarray(label, dtype="<f4").ravel()
    return IMAGE_HEADER.pack(values.size, 0.0, int(id), int(id2)) + values.tobytes() + bytes(image)


@dataclass(frozen=True)
class ImageHeader:
    """A record's header: ``flag``, ``labels`` (float32 ``[max(1, flag)]``: the header's label when
    ``flag == 0``, else the ``flag`` values after the header), ``id``, ``id2``, and ``size``, the
    bytes it takes before the image."""

    flag: int
    labels: np.ndarray
    id: int
    id2: int
    size: int

    @property
    def label(self) -> float | np.ndarray:
        """MXNet's ``header.label``: a float when ``flag == 0``, else the array of labels."""
        return float(self.labels[0]) if self.flag == 0 else self.labels


def unpack_header(payload: bytes | memoryview, *, where: str = "record") -> ImageHeader:
    """Parse the header at the start of an image record; ``where`` starts the error message."""
    if len(payload) < IMAGE_HEADER.size:
        raise RecordIOError(f"{where}: {len(payload)} bytes, too short for an image record header "
                            f"({IMAGE_HEADER.size} bytes)")
    flag, label, id_, id2 = IMAGE_HEADER.unpack_from(payload)
    size = IMAGE_HEADER.size + 4 * flag
    if flag == 0:
        labels = np.array([label], dtype=np.float32)
    elif len(payload) < size:
        raise RecordIOError(f"{where}: header announces {flag} labels ({4 * flag} bytes), the record holds "
                            f"{len(payload) - IMAGE_HEADER.size}")
    else:
        labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=IMAGE_HEADER.size).astype(np.float32)
    return ImageHeader(flag, labels, id_, id2, size)


def unpack_image_record(payload: bytes, *, where: str = "record") -> tuple[float | np.ndarray, bytes]:
    """``(label, image bytes)`` of an image record: ``label`` is a float (``flag == 0``) or the
    float32 array of its ``flag`` labels (the identity is its first value)."""
    header = unpack_header(payload, where=where)
    return header.label, bytes(payload[header.size:])


# -- the .idx file -------------------------------------------------------------------------------


@dataclass
class RecordIndex:
    """The lines of an ``.idx`` file: ``keys`` and ``offsets`` (int64 ``[N]``), in file order."""

    path: Path
    keys: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def offset_of(self, key: int) -> int:
        """Byte offset of ``key`` (binary search; no per-key dict, so 5.8 M keys stay small)."""
        order = self._order()
        at = int(np.searchsorted(self.keys, key, sorter=order))
        if at == len(order) or self.keys[order[at]] != key:
            raise RecordIOError(f"{self.path}: no key {key}")
        return int(self.offsets[order[at]])

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Byte offsets of ``keys`` (int64 array); a missing key raises :class:`RecordIOError` naming it."""
        keys = np.asarray(keys, dtype=np.int64)
        order = self._order()
        at = np.searchsorted(self.keys, keys, sorter=order).clip(0, max(0, len(order) - 1))
        found = self.keys[order[at]] == keys if len(order) else np.zeros(len(keys), bool)
        if not found.all():
            raise RecordIOError(f"{self.path}: no key {int(keys[np.argmin(found)])}")
        return self.offsets[order[at]]

    def _order(self) -> np.ndarray:
        if getattr(self, "_sorted", None) is None:
            self._sorted = np.argsort(self.keys, kind="stable")
        return self._sorted

    def check_offsets(self, rec_path: str | Path) -> int:
        """Raise for an offset that leaves no room for a frame header before the end of ``rec_path``;
        returns the file's size."""
        size = Path(rec_path).stat().st_size
        bad = np.flatnonzero(self.offsets > size - FRAME_HEAD.size)
        if len(bad):
            k = int(bad[0])
            raise RecordIOError(f"{self.path}: key {int(self.keys[k])}: byte offset {int(self.offsets[k])} is past "
                                f"the end of {rec_path} ({size} bytes); the .rec is truncated or belongs to another "
                                ".idx")
        return size


def read_index(idx_path: str | Path) -> RecordIndex:
    """Read an ``.idx`` file (``key<TAB>offset`` lines; blank lines are skipped).

    Raises :class:`RecordIOError` for a missing file, a line that is not two integers (naming
    its line number), a negative offset or a key listed twice.
    """
    import pandas as pd

    path = Path(idx_path)
    if not path.is_file():
        raise RecordIOError(f"{path}: index file not found")
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=np.int64, engine="c")
        if table.shape[1] != 2:
            raise ValueError("not two columns")
        keys, offsets = table[0].to_numpy(), table[1].to_numpy()
    except pd.errors.EmptyDataError:
        keys = offsets = np.zeros(0, dtype=np.int64)
    except (ValueError, OverflowError, pd.errors.ParserError, UnicodeDecodeError):
        keys, offsets = _parse_index_slowly(path)  # finds and names the bad line
    index = RecordIndex(path, np.ascontiguousarray(keys, dtype=np.int64), np.ascontiguousarray(offsets, np.int64))
    if len(index) and (index.offsets < 0).any():
        k = int(np.argmax(index.offsets < 0))
        raise RecordIOError(f"{path}: key {int(index.keys[k])}: negative byte offset {int(index.offsets[k])}")
    sorted_keys = index.keys[index._order()]
    repeated = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(repeated):
        raise RecordIOError(f"{path}: key {int(sorted_keys[repeated[0]])} is listed twice")
    return index


def _parse_index_slowly(path: Path) -> tuple[np.ndarray, np.ndarray]:
    keys, offsets = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split(b"\t")
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
            except ValueError:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                raise RecordIOError(f"{path}:{number}: cannot parse {text[:60]!r}; expected "
                                    "'key<TAB>byte offset' (two integers)") from None
            keys.append(key)
            offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


# -- reading many records ------------------------------------------------------------------------


def byte_ranges(offsets: np.ndarray, rec_size: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``[0, rec_size)`` into at most ``parts`` byte ranges ``[lo, hi)`` that start at record
    offsets and hold about the same number of bytes; every offset falls in exactly one range.
    Reading range by range, in offset order, reads the file front to back in ``parts`` pieces."""
    starts = np.unique(np.asarray(offsets, dtype=np.int64))
    if not len(starts):
        return []
    targets = np.linspace(0, rec_size, max(1, int(parts)) + 1)[1:-1]
    cuts = np.unique(starts[np.searchsorted(starts, targets).clip(0, len(starts) - 1)])
    bounds = [0, *[int(c) for c in cuts if c > 0], int(rec_size)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if a < b]


def iter_records(rec_path: str | Path, keys: np.ndarray, offsets: np.ndarray, lo: int = 0,
                 hi: int | None = None, *, buffer_size: int = 1 << 20) -> Iterator[tuple[int, int, bytes]]:
    """``(key, offset, payload)`` of the records whose offset is in ``[lo, hi)``, in offset order.

    The file is read front to back through one buffered handle: seeks are skipped when the next
    record starts where the last one ended (the usual layout), so a range is one sequential read.
    Only one record is held at a time.
    """
    keys, offsets = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    chosen = (offsets >= lo) & (offsets < (np.iinfo(np.int64).max if hi is None else hi))
    order = np.flatnonzero(chosen)[np.argsort(offsets[chosen], kind="stable")]
    name = str(rec_path)
    with open(rec_path, "rb", buffering=buffer_size) as f:
        state = {"pos": 0}

        def read_at(n: int, pos: int) -> bytes:
            if pos != state["pos"]:
                f.seek(pos)
            data = f.read(n)
            state["pos"] = pos + len(data)
            return data

        for k in order:
            offset = int(offsets[k])
            payload, _ = _read_frames(read_at, name, offset, int(keys[k]))
            yield int(keys[k]), offset, payload


def read_headers(rec_path: str | Path, keys: np.ndarray, offsets: np.ndarray, *, rec_size: int | None = None,
                 image_sizes: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``[N]`` float64: the first label of each record's image header, reading only the headers;
    with ``image_sizes``, also ``[N]`` int64: the bytes of image after each header (0 for the
    header and identity records of insightface sets).

    Each record's first frame header and image header are read with ``os.pread`` (a few dozen
    bytes, never the image); the frame's announced length is checked against the file's size,
    so a truncated last record is found without reading it. A record split over frames (rare:
    its payload holds the magic word) is read whole.
    """
    keys, offsets = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    name = str(rec_path)
    labels = np.empty(len(keys), dtype=np.float64)
    sizes = np.empty(len(keys), dtype=np.int64)
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size if rec_size is None else rec_size
        want = FRAME_HEAD.size + IMAGE_HEADER.size + 4
        for k in range(len(keys)):
            offset, key = int(offsets[k]), int(keys[k])
            labels[k], sizes[k] = _first_label(os.pread(fd, want, offset), fd, name, offset, key, size)
    finally:
        os.close(fd)
    return (labels, sizes) if image_sizes else labels


def _first_label(head: bytes, fd: int, name: str, offset: int, key: int, size: int) -> tuple[float, int]:
    """``(first label, image bytes)`` of the record at ``offset``, from ``head`` (its first bytes) when possible."""
    where = _where(name, offset, key)
    if len(head) >= FRAME_HEAD.size:
        magic, lrec = FRAME_HEAD.unpack_from(head)
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        if magic == MAGIC and cflag == WHOLE and length >= IMAGE_HEADER.size:
            if offset + FRAME_HEAD.size + length > size:
                raise RecordIOError(f"{where}: truncated (frame announces {length} bytes, the file ends "
                                    f"{size - offset - FRAME_HEAD.size} bytes after its header)")
            flag, label = struct.unpack_from("<If", head, FRAME_HEAD.size)
            if flag == 0:
                return float(label), length - IMAGE_HEADER.size
            if length >= IMAGE_HEADER.size + 4 * flag:
                first = struct.unpack_from("<f", head, FRAME_HEAD.size + IMAGE_HEADER.size)[0]
                return float(first), length - IMAGE_HEADER.size - 4 * flag
    payload = _read_frames(lambda n, pos: os.pread(fd, n, pos), name, offset, key)[0]  # split, short or bad
    header = unpack_header(payload, where=where)
    return float(header.labels[0]), len(payload) - header.size


# -- writing -------------------------------------------------------------------------------------


class RecordWriter:
    """Write a ``.rec`` and its ``.idx`` atomically: both appear only when the ``with`` block ends
    without an error (an earlier pair at those paths is kept otherwise).

    ``write(key, payload)`` appends one record (split over frames where the format says, see
    :func:`encode_record`) and its index line; it returns the record's byte offset.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self.position = 0
        self._keys: set[int] = set()

    def __enter__(self) -> RecordWriter:
        self._stack = contextlib.ExitStack()
        with self._stack:  # closed here only if opening fails
            rec_tmp = self._stack.enter_context(atomic_file(self.rec_path))
            idx_tmp = self._stack.enter_context(atomic_file(self.idx_path))
            self._rec = self._stack.enter_context(open(rec_tmp, "wb", buffering=1 << 20))
            self._idx = self._stack.enter_context(open(idx_tmp, "w", buffering=1 << 16, newline="\n"))
            self._stack = self._stack.pop_all()
        return self

    def write(self, key: int, payload: bytes) -> int:
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        self._keys.add(key)
        frames = encode_record(payload)
        offset = self.position
        self._rec.write(frames)
        self._idx.write(f"{key}\t{offset}\n")
        self.position += len(frames)
        return offset

    def __exit__(self, *exc) -> bool | None:
        # files closed, then the .idx renamed, then the .rec (or both temporaries removed on an error)
        return self._stack.__exit__(*exc)
