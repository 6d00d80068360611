"""Shards: Parquet and WebDataset round trips carry every record and the pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ShardParams
from pipeline.shards import ShardError, iter_webdataset, read_shards, write_set
from tests.conftest import write_image


def _aligned(tmp_path, n_ids=3, per=5):
    root = tmp_path / "aligned"
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n_ids):
        for k in range(per):
            name = f"id{i}/img{k}.jpg"
            write_image(root / name, (rng.random((112, 112, 3)) * 255).astype(np.uint8), quality=95)
            rows.append({"image_id": f"id{i}/{k}", "identity": f"id{i}", "source_path": f"/raw/{name}",
                         "file": name, "residual": 0.5, "error": ""})
    rows.append({"image_id": "broken", "identity": "id0", "source_path": "/raw/x", "file": "x.jpg",
                 "residual": np.nan, "error": "could not read"})
    pd.DataFrame(rows).to_csv(root / "_index.csv", index=False)
    return root


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "both"])
def test_round_trip(tmp_path, fmt):
    aligned = _aligned(tmp_path)
    pairs = pd.DataFrame({"fold": [1, 1], "image_id1": ["id0/0", "id0/1"], "image_id2": ["id0/1", "id1/0"],
                          "same": [1, 0]})
    manifest = write_set(aligned, tmp_path / "out", ShardParams(format=fmt, images_per_shard=6), pairs,
                         progress=False)
    assert manifest["images"] == 15 and manifest["identities"] == 3
    shards = read_shards(tmp_path / "out")
    assert len(shards) == 15 and "broken" not in shards.image_ids
    assert sorted(set(shards.labels.tolist())) == [0, 1, 2]
    assert shards.identity_names == ["id0", "id1", "id2"]
    original = (aligned / "id1" / "img3.jpg").read_bytes()
    k = shards.image_ids.index("id1/3")
    assert shards.images[k] == original and shards.labels[k] == 1
    assert shards.decode(k).shape == (112, 112, 3)
    assert shards.pairs["same"].tolist() == [1, 0]
    if fmt != "parquet":
        tars = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
        assert len(tars) == 3
        records = list(iter_webdataset(tars))
        assert [r["image_id"] for r in records] == shards.image_ids


def test_decode_all_matches_the_files_decoded_by_pil(tmp_path):
    """decode_all splits the work over threads; every slot must hold its own image, as RGB.

    Reference: the aligned JPEG files decoded by Pillow, not the shard's own decoder.
    Both use libjpeg(-turbo); a different build may round a few values by a level or two,
    while a channel swap or a misplaced slot is off by tens of levels.
    """
    from PIL import Image

    aligned = _aligned(tmp_path, n_ids=4, per=9)
    write_set(aligned, tmp_path / "out", ShardParams(format="parquet"), None, progress=False)
    shards = read_shards(tmp_path / "out")
    all_images = shards.decode_all()
    assert all_images.shape == (36, 112, 112, 3) and all_images.dtype == np.uint8
    for k, image_id in enumerate(shards.image_ids):
        identity, number = image_id.split("/")
        ref = np.asarray(Image.open(aligned / identity / f"img{number}.jpg").convert("RGB")).astype(int)
        assert np.abs(all_images[k].astype(int) - ref).max() <= 2, image_id
        assert np.abs(shards.decode(k).astype(int) - ref).max() <= 2, image_id


def test_missing_manifest(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        read_shards(tmp_path)


@pytest.fixture
def http_root(tmp_path):
    """tmp_path served over real HTTP on loopback (Python's http.server, no range requests)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _same_records(a, b):
    assert a.image_ids == b.image_ids and a.images == b.images and a.identities == b.identities
    assert np.array_equal(a.labels, b.labels) and a.identity_names == b.identity_names
    if a.pairs is None:
        assert b.pairs is None
    else:
        pd.testing.assert_frame_equal(a.pairs, b.pairs)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_sets_read_over_http_equal_the_local_read(tmp_path, http_root, fmt):
    aligned = _aligned(tmp_path)
    pairs = pd.DataFrame({"fold": [1], "image_id1": ["id0/0"], "image_id2": ["id1/0"], "same": [0]})
    write_set(aligned, tmp_path / "out", ShardParams(format=fmt, images_per_shard=4), pairs, progress=False)
    local = read_shards(tmp_path / "out")
    remote = read_shards(f"{http_root}/out/")
    assert len(remote) == 15
    _same_records(local, remote)
    _same_records(local, read_shards(f"file://{tmp_path / 'out'}"))


def test_missing_remote_set_is_one_clear_error(http_root):
    with pytest.raises(ShardError, match=r"http://127\.0\.0\.1:\d+/nothing/here: no manifest\.json"):
        read_shards(f"{http_root}/nothing/here")


def test_tar_shards_stream_from_a_pipe_command_and_the_webdataset_package_reads_them(tmp_path):
    import shlex

    import webdataset as wds

    aligned = _aligned(tmp_path)
    write_set(aligned, tmp_path / "out", ShardParams(format="webdataset", images_per_shard=100), None,
              progress=False)
    tar = tmp_path / "out" / "shard-00000.tar"
    piped = list(iter_webdataset([f"pipe:cat {shlex.quote(str(tar))}"]))
    assert [r["image_id"] for r in piped] == read_shards(tmp_path / "out").image_ids
    # the format is the WebDataset convention: the reference reader groups the same records
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [s["jpg"] for s in samples] == [r["image"] for r in piped]


def test_a_corrupt_tar_shard_names_the_file(tmp_path):
    bad = tmp_path / "shard-00000.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ShardError, match="shard-00000.tar: not a readable tar shard"):
        list(iter_webdataset([str(bad)]))


def _pack(loose, packed, per_part):
    """The loose aligned set ``loose`` in the packed layout of the align stage (parts of ``per_part``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.align import PART_SCHEMA

    index = pd.read_csv(loose / "_index.csv", keep_default_na=False, dtype=str)
    packed.mkdir(parents=True)
    parts = []
    for k, start in enumerate(range(0, len(index), per_part)):
        rows = index.iloc[start : start + per_part]
        images = [(loose / f).read_bytes() if e == "" else None for f, e in zip(rows["file"], rows["error"])]
        residual = [float(r) if r else float("nan") for r in rows["residual"]]
        pq.write_table(pa.table({"file": rows["file"].tolist(), "image": images, "residual": residual,
                                 "error": rows["error"].tolist()}, schema=PART_SCHEMA),
                       packed / f"part-{k:05d}.parquet")
        parts += [f"part-{k:05d}.parquet"] * len(rows)
    index.assign(part=parts).to_csv(packed / "_index.csv", index=False)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "both"])
def test_shards_from_packed_parts_on_threads_equal_the_serial_shards_of_loose_files(tmp_path, fmt):
    """The shard files do not depend on the aligned layout (one JPEG per face, or packed parts
    of any size) nor on the number of writer threads."""
    loose = _aligned(tmp_path, n_ids=4, per=6)
    pairs = pd.DataFrame({"fold": [1], "image_id1": ["id0/0"], "image_id2": ["id1/0"], "same": [0]})
    params = ShardParams(format=fmt, images_per_shard=5)
    reference = write_set(loose, tmp_path / "ref", params, pairs, progress=False, threads=1)
    _pack(loose, tmp_path / "packed", per_part=7)
    for threads in (1, 3):
        out = tmp_path / f"out{threads}"
        assert write_set(tmp_path / "packed", out, params, pairs, progress=False, threads=threads) == reference
        written = sorted(p.name for p in out.iterdir())
        assert written == sorted(p.name for p in (tmp_path / "ref").iterdir())
        for name in written:
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (threads, name)
    assert len(reference["files"]) == (10 if fmt == "both" else 5)  # 24 faces in shards of 5
