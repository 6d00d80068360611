"""Stage ``shard_train`` / ``shard@SET``: pack one data set's aligned faces into Parquet (and/or
WebDataset) shards.

Layout of set SET (``data/shards/SET``)::

    part-00000.parquet ...   columns: image (JPEG bytes), image_id, identity,
                             label (int, index into the set's sorted identities), source_path
    shard-00000.tar ...      WebDataset: <key>.jpg + <key>.json (same fields)
    manifest.json            counts, identities, shard files, format
    pairs.csv                test sets: the verification pairs (fold, image_id1, image_id2, same,
                             path1, path2)

Writing: :func:`write_set` reads the align stage's packed parts (or its earlier layout, one
JPEG per face) in index order and writes the shards on a thread pool (Parquet writing is C++
and releases the GIL); the files do not depend on the number of threads.

Reading: :func:`read_shards` returns a :class:`FaceShards` with every record in
memory as encoded bytes (decoded on access: the trainer decodes batch by batch, the
embedder a whole test set), from a local directory or a URL-style location;
:func:`iter_webdataset` streams tar shards from a path, a URL or a ``pipe:`` command.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.config import ShardParams
from pipeline.io import atomic_dir, write_csv, write_json

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("image_id", pa.string()),
        ("identity", pa.string()),
        ("label", pa.int32()),
        ("source_path", pa.string()),
    ]
)


class ShardError(ValueError):
    """Shards that are missing or malformed (one-line message)."""



def test_sets(shards_dir: str | Path) -> list[str]:
    """Names of the sharded sets that have verification pairs."""
    return sorted(p.name for p in Path(shards_dir).iterdir() if (p / "pairs.csv").is_file())

def write_set(aligned_dir: Path, out_dir: Path, params: ShardParams, pairs: pd.DataFrame | None, *,
              desc: str = "shard", progress: bool = True, threads: int | None = None) -> dict:
    """Pack one aligned set (``aligned_dir/_index.csv`` + its packed parts, or one JPEG per face) into ``out_dir``.

    Shards are written on ``threads`` threads (default :func:`pipeline.cpu.thread_count`), at most
    two per thread in memory; the files do not depend on the thread count.
    """
    from pipeline import cpu
    from pipeline.align import aligned_images, read_index

    index = read_index(aligned_dir)
    index = index[index["error"] == ""].reset_index(drop=True)
    identities = sorted(index["identity"].unique())
    label_of = {name: k for k, name in enumerate(identities)}
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = cpu.thread_count() if threads is None else int(threads)
    per = params.images_per_shard
    images = aligned_images(aligned_dir, index)
    names: list[list[str]] = []
    bar = tqdm(total=len(index), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for shard_no, start in enumerate(range(0, len(index), per)):
            chunk = index.iloc[start : start + per]
            blobs = []
            for expected in chunk["file"]:
                name, blob = next(images)
                if name != expected:  # pragma: no cover - aligned_images follows the index
                    raise ShardError(f"{aligned_dir}: expected {expected!r}, read {name!r}")
                blobs.append(blob)
            labels = [label_of[i] for i in chunk["identity"]]
            pending.append(pool.submit(_write_shard, out_dir, shard_no, start, params.format, blobs, chunk, labels))
            while len(pending) > 2 * max(1, threads):
                names.append(pending.popleft().result())
                bar.update(per)
        while pending:
            names.append(pending.popleft().result())
    bar.update(len(index) - bar.n)
    bar.close()
    files = [name for shard in names for name in shard]
    if pairs is not None:
        write_csv(out_dir / "pairs.csv", pairs)
    manifest = {
        "format": params.format,
        "images": int(len(index)),
        "identities": len(identities),
        "identity_names": identities,
        "files": files,
        "pairs": None if pairs is None else int(len(pairs)),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _write_shard(out_dir: Path, shard_no: int, start: int, fmt: str, blobs: list[bytes], chunk: pd.DataFrame,
                 labels: list[int]) -> list[str]:
    """Write shard ``shard_no`` (Parquet and/or tar); returns the file names in manifest order."""
    files = []
    if fmt in ("parquet", "both"):
        table = pa.table(
            {
                "image": blobs,
                "image_id": chunk["image_id"].tolist(),
                "identity": chunk["identity"].tolist(),
                "label": labels,
                "source_path": chunk["source_path"].tolist(),
            },
            schema=SCHEMA,
        )
        name = f"part-{shard_no:05d}.parquet"
        pq.write_table(table, out_dir / name, row_group_size=1024)
        files.append(name)
    if fmt in ("webdataset", "both"):
        name = f"shard-{shard_no:05d}.tar"
        _write_tar(out_dir / name, blobs, chunk, labels, start)
        files.append(name)
    return files


def _write_tar(path: Path, blobs: list[bytes], chunk: pd.DataFrame, labels: list[int], start: int) -> None:
    with tarfile.open(path, "w") as tar:
        for k, (blob, row, label) in enumerate(zip(blobs, chunk.itertuples(index=False), labels)):
            key = f"{start + k:09d}"
            meta = json.dumps(
                {"image_id": row.image_id, "identity": row.identity, "label": label, "source_path": row.source_path}
            ).encode()
            for suffix, payload in ((".jpg", blob), (".json", meta)):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(payload)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(payload))


def run_shard(params: ShardParams, name: str, aligned_dir: str | Path, pairs: pd.DataFrame | None,
              out_dir: str | Path, *, progress: bool = True) -> dict:
    """Shard data set ``name`` (its aligned faces in ``aligned_dir``) into ``out_dir``, written
    atomically; ``pairs``: its verification pairs (None for the training set)."""
    with atomic_dir(out_dir) as tmp:
        return write_set(Path(aligned_dir), Path(tmp), params, pairs, desc=f"shard {name}", progress=progress)


@dataclass
class FaceShards:
    """All records of one set, images kept encoded; ``decode(i)`` gives HxWx3 RGB uint8."""

    images: list[bytes]
    image_ids: list[str]
    identities: list[str]
    labels: np.ndarray
    identity_names: list[str]
    pairs: pd.DataFrame | None

    def __len__(self) -> int:
        return len(self.images)

    def decode(self, i: int) -> np.ndarray:
        array = cv2.imdecode(np.frombuffer(self.images[i], dtype=np.uint8), cv2.IMREAD_COLOR)
        if array is None:
            raise ShardError(f"record {self.image_ids[i]!r}: image bytes cannot be decoded")
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)

    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, 3)`` of the images (all records of a set share it)."""
        if not self.images:
            raise ShardError("no images in this set")
        return tuple(self.decode(0).shape)  # type: ignore[return-value]

    def decode_into(self, out: np.ndarray, indices: Sequence[int] | np.ndarray) -> None:
        """Decode records ``indices`` into ``out[:len(indices)]`` (``[n, H, W, 3]`` uint8).

        OpenCV releases the GIL while decoding, so calls on several threads use several cores.
        """
        for row, i in enumerate(indices):
            out[row] = self.decode(int(i))

    def decode_all(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 of every image, or of ``indices`` in that order, decoded on all cores."""
        chosen = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        out = np.empty((len(chosen), *self.image_shape()), dtype=np.uint8)
        workers = max(1, min(os.cpu_count() or 1, 16))
        step = max(1, -(-len(chosen) // workers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(self.decode_into, out[a : a + step], chosen[a : a + step])
                           for a in range(0, len(chosen), step)]:
                future.result()
        return out


def is_url(location: str | Path) -> bool:
    """True for URL-style locations (``https://``, ``s3://``, ``file://``, ...) and ``pipe:`` commands."""
    text = str(location)
    return "://" in text or text.startswith("pipe:")


def join_location(location: str | Path, name: str) -> str:
    """``location/name`` for a local directory or a URL-style location."""
    if is_url(location):
        return f"{str(location).rstrip('/')}/{name}"
    return str(Path(location) / name)


def _read_bytes(location: str) -> bytes:
    """The whole file at a local path or a URL (any protocol fsspec knows: http(s), s3 with s3fs, ...)."""
    if not is_url(location):
        return Path(location).read_bytes()
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    return fs.cat_file(path)


def _open_stream(location: str):
    """A readable binary stream: a local file, a URL through fsspec, or the stdout of a ``pipe:`` command."""
    if location.startswith("pipe:"):
        proc = subprocess.Popen(location[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        return proc.stdout
    if "://" in location:
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def read_shards(set_dir: str | Path) -> FaceShards:
    """Read a set written by :func:`write_set` from a local directory or a URL-style location.

    Parquet parts are read when the manifest lists any, else the WebDataset tar shards
    (streamed). ``set_dir`` may be ``https://host/shards/train``, ``s3://bucket/shards/train``
    (with s3fs installed) or ``file:///...``: training and embedding then read straight
    from object storage, with only the encoded images held in memory.
    """
    if str(set_dir).startswith("pipe:"):
        raise ShardError(f"{set_dir}: a set is read from a directory or URL; pipe: works for single tar shards")
    try:
        manifest = json.loads(_read_bytes(join_location(set_dir, "manifest.json")))
    except FileNotFoundError:
        raise ShardError(f"{set_dir}: no manifest.json; run the shard stage first (dvc repro shard)") from None
    except ImportError as err:
        raise ShardError(f"{set_dir}: reading this kind of location needs {err.name}; pip install it") from None
    except OSError as err:
        raise ShardError(f"{set_dir}: cannot read manifest.json ({err})") from None
    parquet = [join_location(set_dir, f) for f in manifest["files"] if f.endswith(".parquet")]
    records: dict[str, list] = {"image": [], "image_id": [], "identity": [], "label": []}
    if parquet:
        for part in parquet:
            table = pq.read_table(pa.BufferReader(_read_bytes(part)), columns=list(records))
            for column in records:
                records[column].extend(table.column(column).to_pylist())
    else:
        for record in iter_webdataset([join_location(set_dir, f) for f in manifest["files"] if f.endswith(".tar")]):
            for column in records:
                records[column].append(record[column])
    pairs = None
    if manifest.get("pairs") is not None:
        pairs = pd.read_csv(io.BytesIO(_read_bytes(join_location(set_dir, "pairs.csv"))),
                            dtype={"image_id1": str, "image_id2": str})
    return FaceShards(
        images=records["image"],
        image_ids=records["image_id"],
        identities=records["identity"],
        labels=np.asarray(records["label"], dtype=np.int64),
        identity_names=list(manifest["identity_names"]),
        pairs=pairs,
    )


def iter_webdataset(urls: list[str]) -> Iterator[dict]:
    """Stream records from WebDataset tar shards: local paths, URLs (fsspec) or ``pipe:CMD``.

    Each record is ``{"image": JPEG bytes, "image_id", "identity", "label", "source_path"}``;
    a tar is read front to back (``r|``), so a remote shard is never downloaded whole.
    """
    for url in urls:
        stream = _open_stream(url)
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                pending: dict[str, dict] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, suffix = member.name.partition(".")
                    entry = pending.setdefault(key, {})
                    entry[suffix] = tar.extractfile(member).read()
                    if "jpg" in entry and "json" in entry:
                        meta = json.loads(entry["json"])
                        yield {"image": entry["jpg"], **meta}
                        del pending[key]
        except tarfile.TarError as err:
            raise ShardError(f"{url}: not a readable tar shard ({err})") from None
        finally:
            stream.close()
