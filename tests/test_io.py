"""Atomic writes: complete or absent, and no litter from an earlier killed write."""

from __future__ import annotations

import json

import pytest

from pipeline.io import atomic_dir, atomic_file, write_json


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"auc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"auc": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "shards"
    with atomic_dir(target) as tmp:
        (tmp / "a.parquet").write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.parquet").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_leftovers_of_a_sigkilled_write_are_removed_by_the_next_one(tmp_path):
    # what SIGKILL leaves: the temp file (no finally ran) and, for directories, the .old copy
    (tmp_path / ".metrics.json.k2j4_x9a.tmp").write_text("{half")
    (tmp_path / ".shards.ab12cd34.tmp").mkdir()
    (tmp_path / ".shards.ab12cd34.tmp" / "x.parquet").write_text("half")
    (tmp_path / ".shards.old").mkdir()
    # someone else's files that only look similar must survive
    (tmp_path / ".metrics.json.backup.tmp").write_text("keep")
    (tmp_path / ".metrics.jsonl.abcdefgh.tmp").write_text("keep")
    write_json(tmp_path / "metrics.json", {"auc": 0.5})
    with atomic_dir(tmp_path / "shards") as tmp:
        (tmp / "a.parquet").write_text("complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".metrics.json.backup.tmp", ".metrics.jsonl.abcdefgh.tmp", "metrics.json", "shards",
    ]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_written_files_and_folders_follow_the_umask(tmp_path, mask):
    """The final file / folder gets the mode plain open() / mkdir() give under the umask (not mkstemp's 0600)."""
    import os
    import stat

    from pipeline.io import current_umask, write_text

    previous = os.umask(mask)
    try:
        assert current_umask() == mask
        write_text(tmp_path / "predictions.txt", "a\n")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x.txt").write_text("x")
        (tmp_path / "plain.txt").write_text("a\n")  # what the umask gives an ordinary file and folder
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "predictions.txt") == 0o666 & ~mask == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "folder") == 0o777 & ~mask == mode(tmp_path / "plain")
    assert mode(tmp_path / "folder" / "x.txt") == 0o666 & ~mask
