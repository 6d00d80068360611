"""Resumable stages: work in chunks, keep each finished chunk outside the stage's output.

At CASIA scale the detect and align stages run for hours; written as one atomic unit, a
run killed at 90% would start again from zero. So they cut each set into chunks and write
every finished chunk atomically to a *staging* folder beside their output:
``data/.partial/<output folder name>/`` (:func:`staging_dir`). It is not the output (DVC
deletes a stage's outputs before it reruns the stage) and not a DVC output at all (it is
neither hashed nor cached, nor checked out into queued experiments' workspaces), like the
training checkpoints under ``data/checkpoints``.

A chunk's file is named by a hash of everything that decides its content
(:func:`digest`): the stage's key (its params, how it runs, the source code and library
versions, see :func:`source_digest` and :func:`library_versions`) and the chunk's own
inputs, including the bytes of its image files (:func:`file_digests`). A rerun reuses
every chunk whose name matches and computes the others; the stage assembles its output
from the chunks at the end, in one atomic step as before, and then prunes the staging
folder (:meth:`ChunkStore.prune`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

STAGING = ".partial"


#: Marks an image reference inside a RecordIO file: ``<file>.rec#<byte offset>`` (see pipeline.images).
RECORD_REF = ".rec#"


def staging_dir(out_dir: str | Path) -> Path:
    """Where the chunks of the stage writing ``out_dir`` live: ``<parent>/.partial/<name>``."""
    out_dir = Path(out_dir)
    return out_dir.parent / STAGING / out_dir.name


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``size`` rows covering ``n`` rows; one empty range for ``n == 0``."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [(a, min(a + size, n)) for a in range(0, n, size)] or [(0, 0)]


def digest(value: Any) -> str:
    """SHA-256 (hex) of ``value`` written as canonical JSON (sorted keys; numbers as JSON writes them)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot hash a {type(value).__name__}")


def source_digest(*modules: str) -> str:
    """Hash of the source files of ``modules`` (``pipeline/<name>.py``): changed code never reuses a chunk."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + (root / f"{name}.py").read_bytes() + b"\0")
    return h.hexdigest()


def library_versions(*names: str) -> dict[str, str]:
    """Versions of the libraries that compute a chunk (a new one may round differently): the
    loaded module's ``__version__``, else the installed distribution's, else ``"absent"``
    (nothing is imported here)."""
    import sys
    from importlib import metadata

    versions = {}
    for name in names:
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "absent"
        versions[name] = str(version)
    return versions


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    if RECORD_REF in path:  # an image inside a RecordIO file: hash that record, not the whole file
        from pipeline.images import BadImage, read_image_bytes

        try:
            h.update(read_image_bytes(path))
        except BadImage as err:
            return f"unreadable:{err}"
        return h.hexdigest()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as err:  # unreadable: the stage rejects the image; the key records why
        return f"unreadable:{type(err).__name__}:{err.errno}"
    return h.hexdigest()


def file_digests(paths: Sequence[str], threads: int = 1) -> list[str]:
    """Content hash of every file (BLAKE2b, 160 bits), read on ``threads`` threads."""
    if threads <= 1 or len(paths) < 2:
        return [_file_digest(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(_file_digest, paths, chunksize=64))


class ChunkStore:
    """Finished chunks of one stage in ``root``, one file ``<key><suffix>`` per chunk.

    Writes are atomic (temporary file, then rename), so a chunk file that exists is complete.
    """

    def __init__(self, root: str | Path, suffix: str) -> None:
        self.root = Path(root)
        self.suffix = suffix

    def path(self, key: str) -> Path:
        return self.root / f"{key}{self.suffix}"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def prune(self, keep: Iterable[str]) -> int:
        """Delete every file in the store but the chunks ``keep`` (also what a killed write left behind)."""
        if not self.root.is_dir():
            return 0
        names = {self.path(k).name for k in keep}
        removed = 0
        for entry in self.root.iterdir():
            if entry.name in names:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def clear(self) -> None:
        """Delete the store's folder (and the empty staging folder above it)."""
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.root.parent.rmdir()
        except OSError:
            pass
