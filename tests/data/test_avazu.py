"""Avazu reader: values checked field by field against an independent computation, and the bad inputs."""
import datetime
import gzip

import numpy as np
import pytest
import tensorflow as tf

from ctr.data import avazu, raw, row_accounting, synthetic
from ctr.data import rows as rows_lib
from ctr.data.fingerprint import fingerprint

HEADER = ",".join(avazu.COLUMNS)
LINES = [
    "1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    "ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
    "10000169349117863715,1,14102523,1002,1,85f751fd,c4e18dd6,50e219e0,98fed791,d9b5648e,0f2161f8,a99f214a,"
    "6dec2796,aad45b01,1,0,20596,320,50,2161,0,35,100034,157",
    "18446744073709551615,0,14103007,1010,7,,,,,,,,,,,,,,,,,,,",
]


def _write(path, lines, compress=False, header=HEADER):
    content = "\n".join([header] + lines).encode() + b"\n"
    path.write_bytes(gzip.compress(content) if compress else content)
    return str(path)


def _read(path, accounting=None):
    return rows_lib.Rows.concat(list(avazu.read([path], accounting or row_accounting.RowAccounting())))


@pytest.mark.parametrize("compress", [False, True])
def test_fields_match_independent_parse(tmp_path, compress):
    rows = _read(_write(tmp_path / "train.csv", LINES, compress))
    batch = rows_lib.to_batch(avazu.feature_schema(), rows.arrays())
    fields = [line.split(",") for line in LINES]
    np.testing.assert_array_equal(batch["label"], [float(f[1]) for f in fields])
    for j, name in enumerate(avazu.RAW_CATEGORICAL):
        np.testing.assert_array_equal(batch[name], fingerprint(name, tf.constant([f[3 + j] for f in fields])).numpy())
    dates = [datetime.date(2000 + int(f[2][:2]), int(f[2][2:4]), int(f[2][4:6])) for f in fields]
    expected = {
        "hour": [f[2][6:] for f in fields],
        "weekday": [str(d.weekday()) for d in dates],  # Monday = 0
        "weekend": ["1" if d.weekday() >= 5 else "0" for d in dates],
    }
    assert expected["weekend"] == ["0", "1", "0"]  # 2014-10-25 was a Saturday
    for name, values in expected.items():
        np.testing.assert_array_equal(batch[name], fingerprint(name, tf.constant(values)).numpy(), err_msg=name)
    assert rows.day.tolist() == [20141021, 20141025, 20141030]
    assert "dense" not in batch and "id" not in batch


def test_time_features_tf_matches():
    hours = [line.split(",")[2] for line in LINES] + ["16022912"]  # a leap day
    strings = avazu.time_features_tf(tf.constant(hours))
    assert strings["weekday"].numpy().tolist() == [b"1", b"5", b"3", b"0"]
    assert strings["hour"].numpy().tolist() == [b"00", b"23", b"07", b"12"]


def test_header_must_match(tmp_path):
    path = _write(tmp_path / "train.csv", LINES, header=HEADER.replace("click", "clicked"))
    with pytest.raises(raw.ParseError, match=rf"{path}:1: field \*: expected the Avazu header"):
        _read(path)


BAD = {
    "wrong_field_count": (LINES[0] + ",extra", r"field \*: expected 24 comma-separated fields, got 25"),
    "bad_label": (LINES[0].replace(",0,14102100", ",2,14102100"), r"field click: click must be 0 or 1, got b'2'"),
    "bad_hour": (LINES[0].replace("14102100", "14102124"),
                 r"field hour: hour must be a valid YYMMDDHH, got b'14102124'"),  # fmt: skip
    "bad_date": (LINES[0].replace("14102100", "14023100"), r"field hour: hour must be a valid YYMMDDHH"),
    "not_an_integer": (LINES[0].replace("14102100", "1410210x"), r"field hour: hour must be a valid YYMMDDHH"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_row_is_an_error_naming_file_line_field(tmp_path, reason):
    line, message = BAD[reason]
    path = _write(tmp_path / "train.csv", LINES + [line])
    with pytest.raises(raw.ParseError, match=rf"^{path}:5: {message}"):
        _read(path)


def test_skip_policy_and_truncated_last_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(("\n".join([HEADER] + LINES + [BAD["bad_label"][0], LINES[0][:30]])).encode())
    accounting = row_accounting.RowAccounting(max_bad_rows=2)
    assert len(_read(str(path), accounting)) == 3
    assert accounting.rejected["avazu"] == {"bad_label": 1, "truncated_last_line": 1}
    assert accounting.read_rows["avazu"] == 5


def test_synthetic_file_parses_in_time_order(tmp_path):
    path = str(tmp_path / "train.csv.gz")
    synthetic.avazu.write_synthetic(path, 300, seed=3, days=3)
    rows = _read(path)
    assert len(rows) == 300 and rows.day.tolist() == sorted(rows.day.tolist())
    assert set(rows.day.tolist()) == {20141021, 20141022, 20141023}
    assert 0.05 < rows.label.mean() < 0.6


def test_two_train_files_are_refused_unless_one_is_picked(tmp_path):
    for name in ("train.gz", "train.csv"):
        (tmp_path / name).write_text("x\n")
    with pytest.raises(raw.ParseError, match=f"{tmp_path}: both train.csv and train.gz.*--raw_files=train.csv"):
        avazu.input_files(str(tmp_path))
    assert avazu.input_files(str(tmp_path), ["train.gz"]) == [str(tmp_path / "train.gz")]
