"""Put a failed stage's previous outputs back.

DVC deletes a stage's outputs before it runs the stage's command (``Stage.run`` removes every
non-persistent output first), so a stage that then stops on bad input, a bad param or a
crash would leave its earlier, good outputs deleted, and every later stage without its
inputs. The stages write through temporary paths (:mod:`pipeline.io`), so nothing they
wrote is half-done; what is missing is what DVC removed. When a stage command fails while
DVC runs it (``DVC_STAGE`` is set), :func:`restore_outputs` links them back from the DVC
cache as ``dvc.lock`` records them (and the uncached small ones, metrics and figures, from
git's last commit), so the workspace is as it was before the failed run and ``dvc status``
names only what the user changed.

Only files whose recorded hash is found are restored; anything else is left as DVC left it
(the message then says to run ``dvc checkout STAGE``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml


def _cache_root(root: Path) -> Path:
    config = root / ".dvc" / "config"
    text = config.read_text() if config.is_file() else ""
    for line in text.splitlines():  # [cache] dir = ... (relative to .dvc)
        key, _, value = line.partition("=")
        if key.strip() == "dir" and value.strip():
            return (root / ".dvc" / value.strip()).resolve()
    return root / ".dvc" / "cache"


def _cached(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _restore_one(root: Path, cache: Path, out: dict) -> bool:
    """One output of dvc.lock back in place; False when its content is not in the cache or git."""
    path, md5 = root / out["path"], out.get("md5") or ""
    if path.exists() or not md5:
        return path.exists()
    if md5.endswith(".dir"):
        listing = _cached(cache, md5)
        if not listing.is_file():
            return False
        entries = json.loads(listing.read_text())
        if not all(_cached(cache, e["md5"]).is_file() for e in entries):
            return False
        for entry in entries:
            _place(_cached(cache, entry["md5"]), path / entry["relpath"])
        path.mkdir(parents=True, exist_ok=True)  # an empty folder output
        return True
    if _cached(cache, md5).is_file():
        _place(_cached(cache, md5), path)
        return True
    shown = subprocess.run(["git", "show", f"HEAD:{out['path']}"], cwd=root, capture_output=True)
    if shown.returncode != 0:
        return False
    import hashlib

    if hashlib.md5(shown.stdout).hexdigest() != md5:  # noqa: S324 - DVC's own content hash
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(shown.stdout)
    return True


def restore_outputs(stage: str, root: str | Path = ".") -> list[str]:
    """Restore the outputs ``dvc.lock`` records for ``stage`` that are missing; returns those still
    missing afterwards (empty: everything is back)."""
    root = Path(root)
    lock = root / "dvc.lock"
    if not lock.is_file():
        return []
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage) or {}
    cache = _cache_root(root)
    missing = []
    for out in entry.get("outs", []):
        try:
            ok = _restore_one(root, cache, out)
        except (OSError, ValueError, KeyError):
            ok = False
        if not ok:
            missing.append(out["path"])
    return missing


def after_failure() -> str:
    """Called by the CLI when a stage command fails: restore the outputs DVC removed before running
    it, and return the sentence to append to the error line ("" outside DVC)."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    root = Path(os.environ.get("DVC_ROOT") or ".")
    lock = root / "dvc.lock"
    if not lock.is_file() or stage not in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}):
        return ""  # never ran before: nothing to put back
    missing = restore_outputs(stage, root)
    if missing:
        return f" (its previous outputs could not all be restored: run `dvc checkout {stage}`)"
    return " (its previous outputs are back in place)"
