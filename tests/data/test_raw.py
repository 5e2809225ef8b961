"""Streaming blocks (plain and gzip), vectorised text decoding, and the bad-row budget."""
import gzip
import os

import numpy as np
import pytest

from ctr.data import raw, row_accounting, text


def _lines(path, **kw):
    out = []
    for block in raw.read_blocks(path, **kw):
        out += [(block.first_line + i, line) for i, line in enumerate(block.data.tobytes().split(b"\n")[:-1])]
    return out


def test_blocks_carry_lines_across_boundaries_plain_and_gzip(tmp_path):
    lines = [f"{i}\t{'x' * (i % 37)}".encode() for i in range(500)]
    content = b"\n".join(lines) + b"\n"
    (tmp_path / "a.txt").write_bytes(content)
    (tmp_path / "a.gz").write_bytes(gzip.compress(content))  # detected by magic bytes, not the name
    for name in ["a.txt", "a.gz"]:
        got = _lines(str(tmp_path / name), block_bytes=97)
        assert got == list(enumerate(lines, start=1))
    header = _lines(str(tmp_path / "a.txt"), block_bytes=64, skip_lines=1)
    assert header[0] == (2, lines[1])


def test_unterminated_last_line_is_flagged(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"a\nb\nc")
    blocks = list(raw.read_blocks(str(tmp_path / "t.txt"), block_bytes=3))
    assert blocks[-1].truncated and blocks[-1].data.tobytes() == b"c\n"
    assert row_accounting.truncation_rejection(blocks[-1]).line == 3
    assert not any(b.truncated for b in blocks[:-1])


@pytest.mark.parametrize(
    "content, skip, message",
    [(b"", 0, "empty file"), (b"h1,h2\n", 1, "no data rows after the header"), (None, 0, "no such file")],
)
def test_empty_header_only_and_missing_files(tmp_path, content, skip, message):
    path = tmp_path / "f.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(raw.ParseError, match=f"{path}: {message}"):
        list(raw.read_blocks(str(path), skip_lines=skip))


def test_corrupt_and_truncated_gzip_name_file_and_line(tmp_path):
    content = b"".join(b"%d\tabcdef\n" % i for i in range(20000))
    packed = gzip.compress(content)
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    corrupt = bytearray(packed)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\xff" * 64
    (tmp_path / "bad.gz").write_bytes(bytes(corrupt))
    for name in ["cut.gz", "bad.gz"]:
        with pytest.raises(raw.ParseError, match=rf"{tmp_path / name}:\d+: corrupt or truncated gzip stream"):
            list(raw.read_blocks(str(tmp_path / name), block_bytes=4096))


def test_parse_ints_field_by_field():
    cases = {  # raw text -> value, None where invalid; "" is missing (valid, not present)
        b"": 0, b"0": 0, b"-3": -3, b"12345678": 12345678, b"123456789": 123456789,
        b"9999999999999999": 9999999999999999, b"12345678901234567": 12345678901234567,
        b"-9223372036854775808": -(2**63), b"9223372036854775808": None, b"-": None, b"1a": None, b"+5": None,
        b" 5": None, b"007": 7, b"--1": None, b"1.0": None,
    }  # fmt: skip
    data = np.frombuffer(b"\t".join(cases) + b"\n", np.uint8)
    spans = text.split_fields(data, b"\t", len(cases))
    got, present, valid = text.parse_ints(text.Words(data), spans.starts, spans.ends)
    for j, (raw_text, expected) in enumerate(cases.items()):
        assert bool(valid[0, j]) == (expected is not None), raw_text
        assert int(got[0, j]) == (expected or 0), raw_text
        assert bool(present[0, j]) == (raw_text != b"")


def test_split_fields_reports_wrong_counts_and_strips_cr():
    data = np.frombuffer(b"a,b,c\r\nd,e\nf,g,h\n", np.uint8)
    spans = text.split_fields(data, b",", 3)
    assert spans.line_index.tolist() == [0, 2]
    assert spans.bad_lines.tolist() == [1] and spans.bad_counts.tolist() == [2]
    assert text.span_bytes(data, spans.starts[0, 2], spans.ends[0, 2]) == b"c"


def test_accounting_budget():
    rejections = [row_accounting.Rejection(line, "bad_label", "label", "label must be 0 or 1") for line in (3, 7)]
    strict = row_accounting.RowAccounting()
    with pytest.raises(raw.ParseError, match="f.txt:3: field label: label must be 0 or 1$"):
        strict.reject("x", "f.txt", rejections)
    lenient = row_accounting.RowAccounting(max_bad_rows=2)
    lenient.reject("x", "f.txt", rejections)
    assert lenient.to_json()["rows_rejected"] == {"x": {"bad_label": 2}}
    with pytest.raises(raw.ParseError, match=r"f.txt:9: .*more than --max_bad_rows=2"):
        lenient.reject("x", "f.txt", [row_accounting.Rejection(9, "bad_label", "label", "label must be 0 or 1")])


def test_ordered_map_keeps_order():
    assert list(raw.ordered_map(lambda x: x * x, range(50), threads=2)) == [x * x for x in range(50)]


def test_count_and_estimate_lines(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes(b"abc\n" * 1000)
    assert raw.count_lines(str(path)) == 1000
    assert raw.estimate_lines([str(path)]) == 1000
    assert os.path.getsize(path) == 4000
