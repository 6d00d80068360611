"""MXNet RecordIO without MXNet: frames, split records, the .idx, image headers, byte ranges, errors.

The expected bytes are built here by hand with ``struct`` from the format's description
(dmlc-core's recordio: magic 0xced7230a, lrec = cflag << 29 | length, zero padding to 4 bytes;
a record holding the magic word at an aligned offset is split there, the word dropped and put
back by the reader), never with the module under test.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest

from pipeline.datasets import DatasetError
from pipeline.datasets.recordio import (
    MAGIC,
    RecordIOError,
    RecordWriter,
    byte_ranges,
    encode_record,
    iter_records,
    pack_image_record,
    read_headers,
    read_index,
    read_record,
    unpack_header,
    unpack_image_record,
)

M = struct.pack("<I", 0xCED7230A)


def frame(cflag: int, data: bytes) -> bytes:
    """One frame, by hand."""
    pad = (-len(data)) % 4
    return struct.pack("<II", 0xCED7230A, (cflag << 29) | len(data)) + data + b"\0" * pad


def test_magic_constant_and_whole_frame_bytes():
    assert MAGIC == 0xCED7230A
    assert encode_record(b"abcde") == bytes.fromhex("0a23d7ce" "05000000") + b"abcde" + b"\0\0\0"
    assert encode_record(b"") == bytes.fromhex("0a23d7ce" "00000000")
    assert encode_record(b"abcd") == frame(0, b"abcd")


@pytest.mark.parametrize("payload,frames", [
    # magic at offset 4: first part "abcd", last part "xyz"
    (b"abcd" + M + b"xyz", [(1, b"abcd"), (3, b"xyz")]),
    # magic at 0 (empty first part), twice in a row (empty middle part), and at the very end (empty last part)
    (M + b"ab12" + M + M + b"tail" + M, [(1, b""), (2, b"ab12"), (2, b""), (2, b"tail"), (3, b"")]),
    # the magic bytes at an unaligned offset are ordinary payload: one whole frame
    (b"ab" + M + b"cd", [(0, b"ab" + M + b"cd")]),
])
def test_records_holding_the_magic_word_are_split_where_dmlc_splits_them(payload, frames):
    expected = b"".join(frame(flag, data) for flag, data in frames)
    assert encode_record(payload) == expected
    assert read_record(io.BytesIO(expected), 0) == payload


def test_a_hand_built_split_record_among_others_is_read_whole(tmp_path):
    """Three records by hand: whole, split over three frames (with padding on the last), whole."""
    first = frame(0, b"hello")
    split = frame(1, b"12345678") + frame(2, b"") + frame(3, b"xy")
    last = frame(0, b"end!")
    rec = tmp_path / "a.rec"
    rec.write_bytes(first + split + last)
    offsets = [0, len(first), len(first) + len(split)]
    (tmp_path / "a.idx").write_text("".join(f"{k}\t{o}\n" for k, o in zip([5, 6, 7], offsets)))
    index = read_index(tmp_path / "a.idx")
    assert index.keys.tolist() == [5, 6, 7] and index.offsets.tolist() == offsets
    assert read_record(rec, index.offset_of(6)) == b"12345678" + M + M + b"xy"
    with open(rec, "rb") as f:
        assert read_record(f, offsets[2]) == b"end!"
        fd = os.open(rec, os.O_RDONLY)
        try:
            assert read_record(fd, offsets[0]) == b"hello"
        finally:
            os.close(fd)
    got = list(iter_records(rec, index.keys, index.offsets))
    assert [(k, o) for k, o, _ in got] == list(zip([5, 6, 7], offsets))
    assert [p for _, _, p in got] == [b"hello", b"12345678" + M + M + b"xy", b"end!"]


def test_writer_offsets_and_index_lines_match_the_frame_sizes(tmp_path):
    rng = np.random.default_rng(3)
    payloads = []
    for n in [0, 1, 3, 4, 5, 17, 64, 1001]:
        body = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        for at in range(0, n - 3, 12):  # plant the magic word at aligned places in some records
            if rng.random() < 0.4:
                body[at:at + 4] = M
        payloads.append(bytes(body))
    with RecordWriter(tmp_path / "w.rec", tmp_path / "w.idx") as writer:
        returned = [writer.write(k * 10, p) for k, p in enumerate(payloads)]
    expected_offsets, position = [], 0
    for p in payloads:
        expected_offsets.append(position)
        pieces = [p]
        cuts = [i for i in range(0, len(p) - 3, 4) if p[i:i + 4] == M]
        if cuts:
            bounds = [0] + [c + 4 for c in cuts]
            ends = cuts + [len(p)]
            pieces = [p[a:b] for a, b in zip(bounds, ends)]
        position += sum(8 + len(piece) + (-len(piece)) % 4 for piece in pieces)
    assert returned == expected_offsets
    assert (tmp_path / "w.rec").stat().st_size == position
    lines = (tmp_path / "w.idx").read_text().splitlines()
    assert lines == [f"{k * 10}\t{o}" for k, o in enumerate(expected_offsets)]
    for k, p in enumerate(payloads):
        assert read_record(tmp_path / "w.rec", expected_offsets[k]) == p


def test_writer_keeps_the_old_pair_when_writing_fails(tmp_path):
    with RecordWriter(tmp_path / "w.rec", tmp_path / "w.idx") as writer:
        writer.write(1, b"old")
    before = (tmp_path / "w.rec").read_bytes(), (tmp_path / "w.idx").read_text()
    with pytest.raises(ValueError, match="key 1 written twice"):
        with RecordWriter(tmp_path / "w.rec", tmp_path / "w.idx") as writer:
            writer.write(1, b"new")
            writer.write(1, b"again")
    assert ((tmp_path / "w.rec").read_bytes(), (tmp_path / "w.idx").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.idx", "w.rec"]


def test_image_headers_by_hand():
    jpeg = b"\xff\xd8fake"
    scalar = struct.pack("<IfQQ", 0, 7.0, 42, 0) + jpeg
    assert pack_image_record(7, jpeg, id=42) == scalar
    label, image = unpack_image_record(scalar)
    assert label == 7.0 and isinstance(label, float) and image == jpeg
    array = struct.pack("<IfQQ", 2, 0.0, 9, 1) + struct.pack("<2f", 3.0, 0.5) + jpeg
    assert pack_image_record([3.0, 0.5], jpeg, id=9, id2=1) == array
    label, image = unpack_image_record(array)
    assert label.tolist() == [3.0, 0.5] and image == jpeg
    header = unpack_header(array)
    assert (header.flag, header.id, header.id2, header.size) == (2, 9, 1, 32)


def test_truncated_headers_are_one_line_errors():
    with pytest.raises(RecordIOError, match=r"^rec 3: 10 bytes, too short for an image record header"):
        unpack_image_record(b"x" * 10, where="rec 3")
    with pytest.raises(RecordIOError, match="header announces 4 labels"):
        unpack_image_record(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)


def test_header_scan_reads_labels_including_a_split_header(tmp_path):
    """Record 2's id is the magic number, so its header itself is split over two frames."""
    payloads = {1: pack_image_record(4.0, b"\xff\xd8" + b"a" * 50),
                2: pack_image_record(8.0, b"\xff\xd8" + b"b" * 9, id=0xCED7230A),
                3: pack_image_record([6.0, 1.0], b"\xff\xd8"),
                4: struct.pack("<IfQQ", 1, 0.0, 0, 0) + M + b"\xff\xd8"}  # label 0xced7230a read as float32
    assert encode_record(payloads[2]).count(M) == 2  # FIRST and LAST frames
    with RecordWriter(tmp_path / "h.rec", tmp_path / "h.idx") as writer:
        for key, payload in payloads.items():
            writer.write(key, payload)
    index = read_index(tmp_path / "h.idx")
    labels = read_headers(tmp_path / "h.rec", index.keys, index.offsets)
    label_of_magic = struct.unpack("<f", M)[0]
    assert labels.tolist() == [4.0, 8.0, 6.0, label_of_magic]


def test_byte_ranges_cover_every_record_once_in_order(tmp_path):
    rng = np.random.default_rng(1)
    with RecordWriter(tmp_path / "r.rec", tmp_path / "r.idx") as writer:
        for key in rng.permutation(200):  # keys out of order in the file
            writer.write(int(key), bytes(int(rng.integers(0, 300))) + struct.pack("<q", int(key)))
    index = read_index(tmp_path / "r.idx")
    size = (tmp_path / "r.rec").stat().st_size
    for parts in (1, 3, 7, 500):
        ranges = byte_ranges(index.offsets, size, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == size and len(ranges) <= parts
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo in set(index.offsets.tolist()) for lo, _ in ranges)  # ranges start at records
        seen = []
        for lo, hi in ranges:
            for key, offset, payload in iter_records(tmp_path / "r.rec", index.keys, index.offsets, lo, hi):
                assert lo <= offset < hi and struct.unpack("<q", payload[-8:])[0] == key
                seen.append(offset)
        assert seen == sorted(index.offsets.tolist())


def test_index_lookup_by_key(tmp_path):
    (tmp_path / "k.idx").write_text("3\t40\n1\t0\n\n2\t16\n")  # blank line skipped, any order
    index = read_index(tmp_path / "k.idx")
    assert index.offset_of(2) == 16 and index.offsets_of(np.array([3, 1, 2])).tolist() == [40, 0, 16]
    with pytest.raises(RecordIOError, match="no key 9"):
        index.offset_of(9)
    with pytest.raises(RecordIOError, match="no key 7"):
        index.offsets_of(np.array([1, 7]))


@pytest.mark.parametrize("text,needle", [
    ("0\t0\n1\tabc\n", r"k\.idx:2: cannot parse '1\\tabc'"),
    ("0\t0\n1 8\n", r"k\.idx:2: cannot parse '1 8'"),
    ("0\t0\t5\n", r"k\.idx:1: cannot parse"),
    ("0\t0\n1\t8\n1\t16\n", r"k\.idx: key 1 is listed twice"),
    ("0\t-8\n", r"k\.idx: key 0: negative byte offset -8"),
])
def test_malformed_index_lines_are_named(tmp_path, text, needle):
    (tmp_path / "k.idx").write_text(text)
    with pytest.raises(RecordIOError, match=needle) as err:
        read_index(tmp_path / "k.idx")
    assert "\n" not in str(err.value) and isinstance(err.value, DatasetError)


def _pair(tmp_path, n=3):
    with RecordWriter(tmp_path / "e.rec", tmp_path / "e.idx") as writer:
        for key in range(n):
            writer.write(key, pack_image_record(float(key), b"\xff\xd8" + bytes(40)))
    return tmp_path / "e.rec", read_index(tmp_path / "e.idx")


def test_truncated_rec_names_file_key_and_offset(tmp_path):
    rec, index = _pair(tmp_path)
    data = rec.read_bytes()
    last = int(index.offsets[-1])  # a 66-byte payload (24 + 42) and 2 bytes of padding
    rec.write_bytes(data[:-2])  # only the padding is cut off: the record is whole
    assert read_record(rec, last) == pack_image_record(2.0, b"\xff\xd8" + bytes(40))
    assert read_headers(rec, index.keys, index.offsets).tolist() == [0.0, 1.0, 2.0]
    rec.write_bytes(data[:-10])  # the last record loses 8 bytes of its payload
    with pytest.raises(RecordIOError, match=rf"e\.rec: record 2 at byte {last}: truncated \(frame at byte {last} "
                                            r"announces 66 bytes, the file holds 58\)"):
        read_record(rec, last, key=2)
    with pytest.raises(RecordIOError, match=rf"e\.rec: record 2 at byte {last}: truncated"):
        read_headers(rec, index.keys, index.offsets)
    with pytest.raises(RecordIOError, match=rf"record 2 at byte {last}: truncated"):
        list(iter_records(rec, index.keys, index.offsets))
    rec.write_bytes(data[: last + 5])  # the file ends inside the frame header
    with pytest.raises(RecordIOError, match=rf"record 2 at byte {last}: truncated \(the file ends inside it\)"):
        read_record(rec, last, key=2)


def test_offset_past_the_end_and_wrong_magic(tmp_path):
    rec, index = _pair(tmp_path)
    size = rec.stat().st_size
    (tmp_path / "e.idx").write_text(f"0\t0\n1\t{size + 64}\n")
    with pytest.raises(RecordIOError, match=rf"e\.idx: key 1: byte offset {size + 64} is past the end of .*e\.rec"):
        read_index(tmp_path / "e.idx").check_offsets(rec)
    with pytest.raises(RecordIOError, match=rf"record 1 at byte {size + 64}: past the end of the file"):
        read_record(rec, size + 64, key=1)
    with pytest.raises(RecordIOError, match=r"record 1 at byte 4: wrong magic word 0x[0-9a-f]{8} at byte 4"):
        read_record(rec, 4, key=1)  # an offset inside a record
    data = bytearray(rec.read_bytes())
    data[0:4] = b"RIFF"
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=r"wrong magic word 0x46464952 at byte 0 \(expected 0xced7230a\)"):
        read_headers(rec, index.keys[:1], index.offsets[:1])


def test_continuation_flags_out_of_sequence(tmp_path):
    rec = tmp_path / "c.rec"
    rec.write_bytes(frame(2, b"mid!") + frame(3, b"x"))
    with pytest.raises(RecordIOError, match="frame at byte 0 has continuation flag 2, expected 0 or 1"):
        read_record(rec, 0)
    rec.write_bytes(frame(1, b"head") + frame(0, b"x"))
    with pytest.raises(RecordIOError, match="frame at byte 12 has continuation flag 0, expected 2 or 3"):
        read_record(rec, 0)
