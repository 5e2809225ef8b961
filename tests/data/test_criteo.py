"""Criteo reader: values checked field by field against an independent computation, and every bad input."""
import gzip
import math

import numpy as np
import pytest
import tensorflow as tf

from ctr.data import criteo, raw, row_accounting, synthetic
from ctr.data import rows as rows_lib
from ctr.data.fingerprint import fingerprint

# label, I1..I13, C1..C26: missing values, I2 negatives, a large count, a zero.
LINES = [
    "1\t5\t-2\t\t0\t1234567\t3\t\t\t9\t\t\t1\t2\t68fd1e64\t80e26c9b\tfb936136\t7b4723c4\t25c83c98\t\tdb2b1d04\t0b153874"
    "\ta73ee510\t3b08e48b\t7e0ccccf\t9f32b866\tb28479f6\t\t07d13a8f\t3475f8a4\t\te5ba7672\t1e88c74f\t\t\tb1252a9d"
    "\t\t\t3a171ecb\t",
    "0\t\t0\t44\t1\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
    "0\t123456789012\t-1\t2\t3\t4\t5\t6\t7\t8\t9\t10\t11\t12\t" + "\t".join(f"{i:08x}" for i in range(26)),
]


def _expected(lines):
    """The batch, computed with Python string ops and TensorFlow's fingerprint (not the numpy reader)."""
    fields = [line.split("\t") for line in lines]
    out = {"label": np.array([float(f[0]) for f in fields], np.float32)}
    ints = [[int(v) if v else None for v in f[1:14]] for f in fields]
    out["dense"] = np.array([[math.log1p(max(x or 0, 0)) for x in row] for row in ints], np.float32)
    for j, name in enumerate(criteo.CAT_FIELDS):
        out[name] = fingerprint(name, tf.constant([f[14 + j] for f in fields])).numpy()
    for j, name in enumerate(criteo.INT_FIELDS):
        values = [row[j] for row in ints]
        buckets = ["" if x is None else str(math.floor(math.log(x) ** 2) if x > 2 else x) for x in values]
        out[criteo.bucket_field(name)] = fingerprint(criteo.bucket_field(name), tf.constant(buckets)).numpy()
    return out


def _assert_batch_equal(batch, expected):
    """Fingerprint ids exactly (int64: a float tolerance would pass ids 2^30 apart); floats to float32 rounding."""
    assert set(batch) == set(expected)
    for key, value in expected.items():
        got = np.asarray(batch[key])
        if np.issubdtype(value.dtype, np.integer):
            assert got.dtype == np.int64, (key, got.dtype)
            np.testing.assert_array_equal(got, value, err_msg=key)
        else:
            np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=key)


def _write(path, lines, compress=False):
    content = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(content) if compress else content)
    return str(path)


def _read(paths, accounting=None, **kw):
    parts = list(criteo.read(paths, accounting or row_accounting.RowAccounting(), **kw))
    return rows_lib.Rows.concat(parts)


@pytest.mark.parametrize("compress", [False, True])
def test_fields_match_independent_parse(tmp_path, compress):
    path = _write(tmp_path / "train.txt", LINES, compress)
    rows = _read([path], int_buckets=True)
    batch = rows_lib.to_batch(criteo.feature_schema(int_buckets=True), rows.arrays())
    expected = _expected(LINES)
    _assert_batch_equal(batch, expected)
    assert rows.day.tolist() == [0, 0, 0]


def test_parse_lines_is_the_same_parser():
    batch = criteo.parse_lines(tf.constant(LINES), int_buckets=True)
    _assert_batch_equal(batch, _expected(LINES))
    bad = LINES[:1] + ["2" + LINES[1][1:]]
    with pytest.raises(criteo.ParseError, match=r"^f.txt:11: field label: label must be 0 or 1, got b'2'$"):
        criteo.parse_lines(tf.constant(bad), source="f.txt", first_line=10)


def test_bucket_ids_match_the_serving_strings():
    ints = np.array([[-3, 0, 2, 3, 20, 10**12, 7, 8, 100, 1000, -1, 5, 6]] * 2)
    present = np.ones_like(ints, bool)
    present[1, ::2] = False
    strings = criteo.int_bucket_strings_tf(tf.constant(ints), tf.constant(present))
    ids = criteo.bucket_ids(ints, present)
    for j, name in enumerate(criteo.INT_FIELDS):
        np.testing.assert_array_equal(ids[:, j], fingerprint(criteo.bucket_field(name), strings[:, j]).numpy())
    assert strings[0, :6].numpy().tolist() == [b"-3", b"0", b"2", b"1", b"8", b"763"]


def test_int_buckets_in_tensorflow_equal_numpy_at_every_bucket_boundary():
    """``floor(ln(x)^2)`` in float64 on both sides: equal on a dense range and on both sides of every boundary."""
    edges = np.exp(np.sqrt(np.arange(1, 1908, dtype=np.float64)))
    near = np.floor(edges[edges < 9e18]).astype(np.int64)
    ints = np.unique(np.concatenate([np.arange(-50, 100_000), near - 1, near, near + 1, [2**63 - 1]]))
    ints = np.resize(ints, (-(-len(ints) // 13), 13))
    present = np.ones_like(ints, bool)
    strings = criteo.int_bucket_strings_tf(tf.constant(ints), tf.constant(present)).numpy()
    np.testing.assert_array_equal(strings.astype(np.int64), criteo.int_bucket_values(ints))


BAD = {
    "wrong_field_count": (LINES[0].rsplit("\t", 1)[0], r"field \*: expected 40 tab-separated fields, got 39"),
    "not_an_integer": (LINES[1].replace("0\t44", "0\t4x4", 1), r"field I3: not an integer b'4x4'"),
    "bad_label": ("x" + LINES[1][1:], r"field label: label must be 0 or 1, got b'x'"),
    "empty_label": (LINES[1][1:], r"field label: label must be 0 or 1, got b''"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_row_is_an_error_naming_file_line_field(tmp_path, reason):
    line, message = BAD[reason]
    path = _write(tmp_path / "train.txt", LINES + [line] + LINES)
    with pytest.raises(criteo.ParseError, match=rf"^{path}:4: {message}$"):
        _read([path])


def test_truncated_last_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(("\n".join(LINES) + "\n" + LINES[2][:50]).encode())
    with pytest.raises(criteo.ParseError, match=rf"^{path}:4: field \*: last line has no newline"):
        _read([str(path)])
    # Even when the cut leaves 40 well-formed fields, a missing final newline is a truncation.
    path.write_bytes(("\n".join(LINES)).encode())
    with pytest.raises(criteo.ParseError, match=rf"^{path}:3: field \*: last line has no newline"):
        _read([str(path)])


def test_skip_policy_counts_every_bad_row(tmp_path):
    lines = LINES + [BAD[r][0] for r in sorted(BAD)] + LINES
    path = _write(tmp_path / "train.txt", lines)
    accounting = row_accounting.RowAccounting(max_bad_rows=len(BAD))
    rows = _read([path], accounting)
    assert len(rows) == 2 * len(LINES)
    assert accounting.to_json()["rows_read"] == {"criteo": len(lines)}
    assert accounting.rejected["criteo"] == {"wrong_field_count": 1, "not_an_integer": 1, "bad_label": 2}
    with pytest.raises(criteo.ParseError, match="more than --max_bad_rows=3"):
        _read([path], row_accounting.RowAccounting(max_bad_rows=len(BAD) - 1))


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(criteo.ParseError, match=f"{tmp_path}/empty.txt: empty file"):
        _read([str(tmp_path / "empty.txt")])
    with pytest.raises(criteo.ParseError, match="no such file"):
        _read([str(tmp_path / "absent.txt")])
    with pytest.raises(criteo.ParseError, match="no Criteo files"):
        criteo.input_files(str(tmp_path / "nowhere"))


def test_day_files_stream_in_order_with_the_days_of_their_names(tmp_path):
    for day in (10, 8, 9):  # listed out of order; day_10 sorts after day_9
        synthetic.criteo.write_synthetic(str(tmp_path / f"day_{day}.gz"), 50, seed=day)
    source = criteo.open_raw(str(tmp_path), processing=criteo.Processing(),
                             options=raw.ReadOptions(accounting=row_accounting.RowAccounting(), threads=2))
    rows = rows_lib.Rows.concat(list(source.rows))
    assert rows.day.tolist() == [8] * 50 + [9] * 50 + [10] * 50  # the number in the name, not the position
    assert criteo.input_files(str(tmp_path))[-1].endswith("day_10.gz")
    assert 10 <= source.estimated_rows <= 1000
    one = tmp_path / "one"
    one.mkdir()
    synthetic.criteo.write_synthetic(str(one / "day_5"), 20, seed=0)
    source = criteo.open_raw(str(one), processing=criteo.Processing(),
                             options=raw.ReadOptions(accounting=row_accounting.RowAccounting(), time_split=True))
    assert set(rows_lib.Rows.concat(list(source.rows)).day.tolist()) == {5}  # one day file is not the Kaggle file


@pytest.mark.parametrize(
    "names, message",
    [
        (["day_0", "day_2"], "day_1 is missing between day_0 and day_2"),
        (["day_0", "day_1", "day_1.gz"], "both day_1 and day_1.gz"),
        (["train.txt", "train.txt.gz"], "both train.txt and train.txt.gz.*--raw_files=train.txt"),
        (["train.txt", "day_0"], "both the Kaggle file train.txt and daily logs.*--raw_files='day_\\*'"),
    ],
)
def test_ambiguous_or_incomplete_directories_are_refused(tmp_path, names, message):
    for name in names:
        (tmp_path / name).write_text("x\n")
    with pytest.raises(criteo.ParseError, match=f"{tmp_path}: {message}"):
        criteo.input_files(str(tmp_path))


def test_raw_files_picks_one_input(tmp_path):
    for name in ("train.txt", "train.txt.gz", "day_0", "day_1"):
        (tmp_path / name).write_text("x\n")
    assert criteo.input_files(str(tmp_path), ["train.txt.gz"]) == [str(tmp_path / "train.txt.gz")]
    assert criteo.input_files(str(tmp_path), ["day_*"]) == [str(tmp_path / "day_0"), str(tmp_path / "day_1")]
    with pytest.raises(criteo.ParseError, match="--raw_files=day_9 matches no file"):
        criteo.input_files(str(tmp_path), ["day_9"])


def test_kaggle_file_is_split_into_seven_days(tmp_path):
    synthetic.criteo.write_synthetic(str(tmp_path / "train.txt"), 70, seed=0)
    source = criteo.open_raw(str(tmp_path), processing=criteo.Processing(),
                             options=raw.ReadOptions(accounting=row_accounting.RowAccounting(), time_split=True))
    rows = rows_lib.Rows.concat(list(source.rows))
    assert rows.day.tolist() == sorted([d for d in range(7) for _ in range(10)])
