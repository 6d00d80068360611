"""insightface formats: RecordIO training folders, .rec image references, pickled .bin pairs.

Expected layouts are read here by hand (``struct`` over the frames, the pickle opcodes of a
Python 2 file written out byte by byte), not with the module under test.
"""

from __future__ import annotations

import codecs
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.datasets import DatasetError
from pipeline.datasets.insightface import (
    bin_folds,
    check_bin_file,
    check_rec_layout,
    load_bin,
    load_rec,
    read_bin,
    write_bin,
    write_rec,
)
from pipeline.datasets.recordio import RecordIOError, RecordWriter, pack_image_record
from pipeline.images import BadImage, load_rgb, read_image_bytes, rec_reference
from tests.conftest import synthetic_face

MAGIC = 0xCED7230A
pytestmark = pytest.mark.filterwarnings("ignore:.*classes the property file names")


def jpeg(seed: int, size: int = 112) -> bytes:
    """A cheap, distinct JPEG: a gradient with seeded noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    image = (ramp[None, :, None] + rng.normal(0, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def walk_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Every record of a .rec image as (offset, payload), by hand (asserts no record is split)."""
    out, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC and lrec >> 29 == 0
        length = lrec & ((1 << 29) - 1)
        out.append((pos, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length + (-length) % 4
    return out


def labels_of(payload: bytes) -> list[float]:
    flag, label, _, _ = struct.unpack_from("<IfQQ", payload)
    return [label] if flag == 0 else list(struct.unpack_from(f"<{flag}f", payload, 24))


# -- RecordIO training folders --------------------------------------------------------------------


@pytest.fixture
def rec_set(tmp_path):
    """Nine images of four classes (class 2 has none); the writer's folder."""
    labels = [0, 0, 0, 1, 1, 3, 3, 3, 3]
    images = [jpeg(k) for k in range(len(labels))]
    summary = write_rec(tmp_path / "casia", zip(labels, images), 4, 112)
    return tmp_path / "casia", labels, images, summary


def test_write_rec_layout_read_by_hand(rec_set):
    folder, labels, images, summary = rec_set
    assert summary["images"] == 9 and summary["classes"] == 4
    assert (folder / "property").read_text().strip() == "4,112,112"
    records = dict(walk_frames((folder / "train.rec").read_bytes()))
    idx = [line.split("\t") for line in (folder / "train.idx").read_text().splitlines()]
    offset = {int(k): int(o) for k, o in idx}
    assert sorted(offset) == list(range(0, 9 + 1 + 4))
    assert labels_of(records[offset[0]]) == [10.0, 14.0]  # images 1..9, identities 10..13
    for key in range(1, 10):
        payload = records[offset[key]]
        assert labels_of(payload) == [float(labels[key - 1])] and payload[24:] == images[key - 1]
    ranges = [labels_of(records[offset[k]]) for k in range(10, 14)]
    assert ranges == [[1.0, 4.0], [4.0, 6.0], [10.0, 10.0], [6.0, 10.0]]  # class 2: an empty range


def test_load_rec_lists_every_image_as_a_reference(rec_set):
    folder, labels, images, _ = rec_set
    with pytest.warns(UserWarning, match="images carry 3 of the 4 classes"):
        image_set = load_rec(folder, progress=False)
    table = image_set.images
    assert table["image_id"].tolist() == [str(k) for k in range(1, 10)]
    assert table["identity"].tolist() == [str(label) for label in labels]
    offsets = _offsets(folder)
    assert table["path"].tolist() == [f"{folder / 'train.rec'}#{offsets[k]}" for k in range(1, 10)]
    assert [read_image_bytes(p) for p in table["path"]] == images
    assert image_set.pairs is None


def test_label_arrays_and_sets_without_a_header_record(tmp_path):
    """im2rec style: no header record (record 0 has flag 0, so it is an image, as insightface's readers
    take it), every key an image, labels as arrays elsewhere (the first value is the identity)."""
    folder = tmp_path / "plain"
    folder.mkdir()
    with RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        for key, label in [(0, 2.0), (5, 0.0), (3, 1.0)]:
            writer.write(key, pack_image_record(label if key == 0 else [label, 99.0], jpeg(key)))
    (folder / "property").write_text("3,112,112")
    table = load_rec(folder, progress=False).images
    assert table["image_id"].tolist() == ["0", "3", "5"] and table["identity"].tolist() == ["2", "1", "0"]
    assert read_image_bytes(table["path"][1]) == jpeg(3)
    arrays = tmp_path / "arrays"
    write_rec(arrays, [(0, jpeg(1)), (1, jpeg(2))], 2, (112, 96), label_arrays=True)
    assert (arrays / "property").read_text().strip() == "2,112,96"
    payload = dict(walk_frames((arrays / "train.rec").read_bytes()))[0]
    assert struct.unpack_from("<I", payload)[0] == 1  # flag 1: the label as a one-value array
    assert load_rec(arrays, progress=False).images["identity"].tolist() == ["0", "1"]


def test_keys_beyond_float32_fall_back_to_telling_identity_records_by_their_empty_image(rec_set, monkeypatch):
    """Glint360K's 17 M keys do not fit float32 exactly; the same rule, made to apply from 8 keys on."""
    import pipeline.datasets.insightface as insightface

    folder, labels, images, _ = rec_set
    exact = load_rec(folder, progress=False).images
    monkeypatch.setattr(insightface, "FLOAT32_EXACT", 8)
    fallback = load_rec(folder, progress=False).images
    pd.testing.assert_frame_equal(fallback, exact)
    assert len(fallback) == 9 and fallback["identity"].tolist() == [str(label) for label in labels]


def test_parallel_scan_equals_the_serial_scan(tmp_path):
    items = [(k // 7, jpeg(k % 5, 32)) for k in range(300)]
    write_rec(tmp_path / "p", items, 43, 32)
    serial = load_rec(tmp_path / "p", progress=False, threads=1).images
    parallel = load_rec(tmp_path / "p", progress=False, threads=2, parallel_from=1).images
    pd.testing.assert_frame_equal(serial, parallel)
    assert serial["identity"].astype(int).tolist() == [k // 7 for k in range(300)]


def test_write_rec_refuses_scattered_labels_and_keeps_the_old_files(rec_set):
    folder, _, _, _ = rec_set
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="item 3: label 0 comes again after other labels"):
        write_rec(folder, [(0, jpeg(1)), (1, jpeg(2)), (0, jpeg(3))], 2, 112)
    with pytest.raises(ValueError, match="item 1: label 5 outside 0..1"):
        write_rec(folder, [(5, jpeg(1))], 2, 112)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def _error(folder, needle):
    with pytest.raises(RecordIOError, match=needle) as err:
        load_rec(folder, progress=False)
    assert "\n" not in str(err.value) and isinstance(err.value, DatasetError)
    return str(err.value)


def test_missing_and_malformed_property(rec_set):
    folder, _, _, _ = rec_set
    (folder / "property").write_text("4;112;112")
    _error(folder, r"property: '4;112;112' is not num_classes,height,width")
    (folder / "property").unlink()
    _error(folder, r"casia/property: missing property file; expected a folder with train.rec")
    (folder / "train.idx").unlink()
    _error(folder, r"casia/train.idx: not found")


def test_labels_outside_the_property_classes(rec_set):
    folder, _, _, _ = rec_set
    (folder / "property").write_text("3,112,112")
    _error(folder, r"train.rec: record 6: label 3 is outside 0..2 \(property says 3 classes\)")


def _offsets(folder) -> dict[int, int]:
    return dict(tuple(map(int, line.split("\t"))) for line in (folder / "train.idx").read_text().splitlines())


def test_truncated_rec_gives_offsets_past_the_end(rec_set):
    folder, _, _, _ = rec_set
    rec = folder / "train.rec"
    rec.write_bytes(rec.read_bytes()[: _offsets(folder)[5] + 100])  # ends inside image 5
    _error(folder, r"train.idx: key 6: byte offset \d+ is past the end of .*train.rec \(\d+ bytes\)")


def test_a_key_the_header_lists_is_missing_from_the_idx(rec_set):
    folder, _, _, _ = rec_set
    lines = (folder / "train.idx").read_text().splitlines()
    (folder / "train.idx").write_text("".join(line + "\n" for line in lines if not line.startswith("6\t")))
    _error(folder, r"train.idx: no key 6, which record 0 of .*train.rec lists \(images are keys 1..9, "
                   r"identities 10..13\)")


def test_truncated_image_record_is_found_by_the_label_scan(rec_set):
    folder, _, _, _ = rec_set
    rec, offset = folder / "train.rec", _offsets(folder)[9]
    data = bytearray(rec.read_bytes())
    lrec = struct.unpack_from("<I", data, offset + 4)[0]
    struct.pack_into("<I", data, offset + 4, lrec + (1 << 20))  # image 9 announces a megabyte more
    rec.write_bytes(bytes(data))
    _error(folder, rf"train.rec: record 9 at byte {offset}: truncated")


def test_identity_ranges_are_checked(tmp_path):
    folder = tmp_path / "ranges"
    folder.mkdir()
    with RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        for key, label in [(1, 0), (2, 0), (3, 1), (4, 1)]:
            writer.write(key, pack_image_record(label, jpeg(key)))
        writer.write(5, pack_image_record([1, 4], b""))  # identity 0 claims image 3, which is label 1
        writer.write(6, pack_image_record([4, 5], b""))
        writer.write(0, pack_image_record([5, 7], b""))
    (folder / "property").write_text("2,112,112")
    _error(folder, r"identity record 5 at byte \d+: images 1..3 carry labels 0 and 1; expected one identity")


def test_cheap_checks_of_a_rec_folder(rec_set):
    folder, _, _, _ = rec_set
    check_rec_layout(folder)  # a good folder passes
    idx = folder / "train.idx"
    lines = idx.read_text()
    idx.write_text("1\t4\n" + lines)  # an offset inside a record
    with pytest.raises(RecordIOError, match=r"train.rec: record 1 at byte 4: wrong magic word 0x[0-9a-f]{8}"):
        check_rec_layout(folder)
    idx.write_text("1\t999999999\n")
    with pytest.raises(RecordIOError, match=r"train.idx: key 1: byte offset 999999999 is past the end"):
        check_rec_layout(folder)
    idx.write_text("one\t0\n")
    with pytest.raises(RecordIOError, match=r"train.idx:1: cannot parse 'one\\t0'"):
        check_rec_layout(folder)
    idx.write_text(lines)
    (folder / "property").unlink()
    with pytest.raises(RecordIOError, match="missing property file"):
        check_rec_layout(folder)


def test_cheap_checks_of_a_bin(tmp_path):
    write_bin(tmp_path / "a.bin", [b"x", b"y"], [True])
    check_bin_file(tmp_path / "a.bin")
    (tmp_path / "py2.bin").write_bytes(_py2_protocol0([b"x", b"y"], [True]))
    check_bin_file(tmp_path / "py2.bin")
    (tmp_path / "b.bin").write_bytes(b"\xff\xd8 a jpeg")
    with pytest.raises(DatasetError, match=r"b.bin: not a pickle \(starts with b'\\xff\\xd8'\)"):
        check_bin_file(tmp_path / "b.bin")
    with pytest.raises(DatasetError, match="c.bin: .bin file not found"):
        check_bin_file(tmp_path / "c.bin")


# -- image references ----------------------------------------------------------------------------


def test_load_rgb_decodes_a_record_exactly_as_the_same_jpeg_file(rec_set, tmp_path):
    folder, _, images, _ = rec_set
    table = load_rec(folder, progress=False).images
    for k in (0, 4, 8):
        (tmp_path / f"{k}.jpg").write_bytes(images[k])
        from_file, _ = load_rgb(tmp_path / f"{k}.jpg")
        from_record, scale = load_rgb(table["path"][k])
        assert scale == 1.0 and np.array_equal(from_record, from_file)
        bgr = cv2.imdecode(np.frombuffer(images[k], np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(from_record.astype(int) - bgr[:, :, ::-1]).max() <= 2  # and RGB, not BGR
    shrunk, scale = load_rgb(table["path"][0], max_side=56)
    assert shrunk.shape == (56, 56, 3) and scale == 0.5
    with ThreadPoolExecutor(4) as pool:  # one descriptor shared by threads: pread has no file position
        threaded = list(pool.map(lambda p: load_rgb(p)[0], list(table["path"]) * 3))
    serial = [load_rgb(p)[0] for p in table["path"]] * 3
    assert all(np.array_equal(a, b) for a, b in zip(threaded, serial))


def test_bad_records_are_bad_images_naming_the_rec_and_offset(tmp_path):
    rec, idx = tmp_path / "bad.rec", tmp_path / "bad.idx"
    good = jpeg(1)
    with RecordWriter(rec, idx) as writer:
        ok = writer.write(1, pack_image_record(0, good))
        corrupt = writer.write(2, pack_image_record(0, good[: len(good) // 3]))
        text = writer.write(3, pack_image_record(0, b"not an image at all"))
        header = writer.write(0, pack_image_record([3, 3], b""))
    assert load_rgb(rec_reference(rec, ok))[0].shape == (112, 112, 3)
    cases = [(corrupt, "corrupt or truncated image"), (text, "not an image file"),
             (header, r"no image bytes \(a header record"), (ok + 4, "wrong magic word"),
             (rec.stat().st_size + 8, "past the end of the file")]
    for offset, needle in cases:
        with pytest.raises(BadImage, match=rf"^{rec}: record at byte {offset}: .*{needle}"):
            load_rgb(rec_reference(rec, offset))
    with pytest.raises(BadImage, match=rf"{tmp_path}/missing.rec: record at byte 0: cannot read file"):
        read_image_bytes(f"{tmp_path}/missing.rec#0")


def test_a_rewritten_rec_is_read_anew_and_a_file_named_like_a_reference_is_a_file(tmp_path):
    rec = tmp_path / "x.rec"
    with RecordWriter(rec, tmp_path / "x.idx") as writer:
        writer.write(1, pack_image_record(0, jpeg(1)))
    assert read_image_bytes(rec_reference(rec, 0)) == jpeg(1)
    with RecordWriter(rec, tmp_path / "x.idx") as writer:
        writer.write(1, pack_image_record(0, jpeg(2)))
    assert read_image_bytes(rec_reference(rec, 0)) == jpeg(2)
    odd = tmp_path / "odd.rec#12"
    odd.write_bytes(jpeg(3))
    assert read_image_bytes(odd) == jpeg(3) and load_rgb(odd)[0].shape == (112, 112, 3)


def test_a_rec_set_flows_through_the_precropped_detect_and_align_path(tmp_path):
    from pipeline.align import Crop, aligned_images, align_set
    from pipeline.config import AlignParams, DetectParams
    from pipeline.detect import PRECROPPED, precropped_set

    faces = [cv2.imencode(".jpg", synthetic_face(k, 112)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
             for k in range(4)]
    write_rec(tmp_path / "faces", [(k // 2, face) for k, face in enumerate(faces)], 2, 112)
    images = load_rec(tmp_path / "faces", progress=False).images
    detections = precropped_set(images, DetectParams(), threads=2)
    assert (detections["status"] == PRECROPPED).all()
    assert detections["width"].tolist() == [112] * 4 and detections["box_h"].tolist() == [112.0] * 4
    index = align_set(detections, tmp_path / "aligned", AlignParams(size=112, chunk_size=3), progress=False,
                      crop=Crop(), threads=1)
    assert (index["error"] == "").all() and index["source_path"].tolist() == images["path"].tolist()
    for (_, blob), face in zip(aligned_images(tmp_path / "aligned", index), faces):
        aligned = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        original = cv2.imdecode(np.frombuffer(face, np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(aligned.astype(int) - original).mean() < 2.0  # 112 -> 112: re-encoded, not resampled


# -- .bin verification sets ----------------------------------------------------------------------


def test_bin_folds_are_sklearn_kfold_blocks():
    from sklearn.model_selection import KFold

    for n in (10, 23, 6000, 7001):
        expected = np.zeros(n, dtype=int)
        for fold, (_, test) in enumerate(KFold(n_splits=10, shuffle=False).split(np.zeros(n)), start=1):
            expected[test] = fold
        assert bin_folds(n).tolist() == expected.tolist()
    assert bin_folds(3).tolist() == [1, 2, 3]


def test_write_bin_then_load_bin(tmp_path):
    images = [jpeg(k, 64) for k in range(24)]
    same = [k % 3 == 0 for k in range(12)]
    assert write_bin(tmp_path / "lfw.bin", images, same) == 12
    with open(tmp_path / "lfw.bin", "rb") as f:
        assert pickle.load(f, encoding="bytes") == (images, same)  # what insightface's loader does
    image_set = load_bin(tmp_path / "lfw.bin", tmp_path / "lfw")
    table, pairs = image_set.images, image_set.pairs
    assert table["image_id"].tolist() == [f"{k:05d}" for k in range(24)]
    assert [open(p, "rb").read() for p in table["path"]] == images
    assert table["path"].tolist() == [str(tmp_path / "lfw" / f"{k:05d}.jpg") for k in range(24)]
    assert table["identity"].nunique() == 24 and table["identity"][0] == "lfw-00000"
    assert pairs["image_id1"].tolist() == [f"{2 * k:05d}" for k in range(12)]
    assert pairs["image_id2"].tolist() == [f"{2 * k + 1:05d}" for k in range(12)]
    assert pairs["same"].tolist() == [int(s) for s in same]
    assert pairs["fold"].tolist() == [1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def _py2_protocol2(images: list[bytes], same: list[bool]) -> bytes:
    """The opcodes Python 2's pickle writes at protocol 2 for a (list of str, list of bool) tuple."""
    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for image in images:
        out += (b"U" + bytes([len(image)]) if len(image) < 256 else b"T" + struct.pack("<i", len(image))) + image
    out += b"e]q\x01("  # APPENDS, EMPTY_LIST, BINPUT 1, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in same)  # NEWTRUE / NEWFALSE
    return bytes(out + b"e\x86q\x02.")  # APPENDS, TUPLE2, BINPUT 2, STOP


def _py2_protocol0(images: list[bytes], same: list[bool]) -> bytes:
    """Python 2's text protocol 0: quoted, escaped str; bools as I01/I00."""
    out = bytearray(b"((lp0\n")
    for image in images:
        escaped = codecs.escape_encode(image)[0]  # as Python 2's repr: quotes, newlines, backslashes escaped
        out += b"S'" + escaped + b"'\np1\na"
    out += b"(lp2\n" + b"".join(b"I01\na" if s else b"I00\na" for s in same)
    return bytes(out + b"tp3\n.")


def _py2_numpy_protocol2(images: list[bytes], same: list[bool]) -> bytes:
    """Python 2 with numpy 1.x at protocol 2, each image a uint8 array: numpy.core.multiarray._reconstruct,
    the dtype's state with a byte-string byte order, the data as a byte string."""
    def short(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    out = bytearray(b"\x80\x02(")  # PROTO 2, MARK (the list's items)
    for image in images:
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
        out += b"(K\x01K" + bytes([len(image)]) if len(image) < 256 else b"(K\x01M" + struct.pack("<H", len(image))
        out += b"\x85cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
        out += b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # its state, BUILD
        out += b"\x89T" + struct.pack("<i", len(image)) + image + b"tb"  # NEWFALSE (C order), data; BUILD
    out += b"l(" + b"".join(b"\x88" if v else b"\x89" for v in same) + b"l\x86."  # LIST, MARK, bools, LIST, TUPLE2
    return bytes(out)


@pytest.mark.parametrize("writer", [_py2_protocol2, _py2_protocol0, _py2_numpy_protocol2])
def test_python2_bins_are_read(tmp_path, writer):
    images = [jpeg(k, 48) for k in range(4)] + [b"\xff\xd8tiny", b"\xff\xd8'quote\n"]
    same = [True, False, True]
    (tmp_path / "py2.bin").write_bytes(writer(images, same))
    got, labels = read_bin(tmp_path / "py2.bin")
    assert got == images and labels.tolist() == same
    table = load_bin(tmp_path / "py2.bin", tmp_path / "out").images
    assert [open(p, "rb").read() for p in table["path"]] == images


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_uint8_bins_at_each_protocol(tmp_path, protocol):
    images = [jpeg(k, 40) for k in range(4)]
    arrays = [np.frombuffer(image, dtype=np.uint8).copy() for image in images]
    for same in ([True, False], np.array([True, False]), [np.bool_(True), np.bool_(False)]):
        with open(tmp_path / "np.bin", "wb") as f:
            pickle.dump((arrays, same), f, protocol=protocol)
        got, labels = read_bin(tmp_path / "np.bin")
        assert got == images and labels.tolist() == [True, False]


class _Runs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Shaped:
    def __reduce__(self):
        return codecs.encode, ("abc", "rot13")


def _bin_error(tmp_path, payload: bytes, needle: str) -> None:
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "keep.jpg").write_bytes(b"earlier output")
    (tmp_path / "x.bin").write_bytes(payload)
    with pytest.raises(DatasetError, match=needle) as err:
        load_bin(tmp_path / "x.bin", tmp_path / "out")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{tmp_path / 'x.bin'}: ")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.jpg"]  # left as it was


def test_bins_naming_other_types_are_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps(([b"a", b"b"], [_Runs(marker)]), protocol=2)
    _bin_error(tmp_path, evil, rf"refused to unpickle {os.system.__module__}\.system")
    assert not marker.exists()
    _bin_error(tmp_path, pickle.dumps(([b"a", b"b"], [_Shaped()])), r"refused to unpickle _codecs.encode with "
                                                                      r"encoding 'rot13'")
    from collections import OrderedDict

    _bin_error(tmp_path, pickle.dumps((OrderedDict(), [True])), r"refused to unpickle collections.OrderedDict")


@pytest.mark.parametrize("payload,needle", [
    (b"", r"not a readable pickle \(EOFError"),
    (b"\xff\xd8\xff\xe0 a jpeg, not a pickle", "not a readable pickle"),
    (pickle.dumps(([b"a", b"b"], [True]))[:-9], "not a readable pickle"),
    (pickle.dumps([b"a", b"b", b"c"]), "holds a list, expected a pickle of \\(bins, issame_list\\)"),
    (pickle.dumps(([b"a", b"b", b"c"], [True])), "3 images, an odd number"),
    (pickle.dumps(([b"a", b"b", b"c", b"d"], [True])), "1 labels in issame_list for 2 pairs \\(4 images\\)"),
    (pickle.dumps(([b"a", "b"], [True])), "image 1 is a str, expected encoded image bytes"),
    (pickle.dumps(([np.zeros((4, 4, 3), np.uint8)] * 2, [True])), r"image 0 is a uint8 \(4, 4, 3\) ndarray"),
    (pickle.dumps(([b"a", b"b"], [2])), r"issame_list\[0\] is 2, expected True/False"),
])
def test_malformed_bins(tmp_path, payload, needle):
    _bin_error(tmp_path, payload, needle)
