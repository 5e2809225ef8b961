"""TaobaoAds reader: the join and the behaviour sequences checked field by field, no future leakage, bad input."""
import gzip
import math

import numpy as np
import pytest
import tensorflow as tf

from ctr.data import raw, row_accounting, synthetic, taobao
from ctr.data import rows as rows_lib
from ctr.data.fingerprint import fingerprint

T0 = 1494000000  # 2017-05-06 00:00 in China time (UTC+8)
ADS = ["10,6406,83237,1,95471,170.0", "11,4520,1,2,NULL,0.01", "12,6406,5,3,247789,5"]
USERS = ["234,0,5,2,5,,3,0,3", "523,5,2,2,2,1,3,1,2"]  # user 777 has no profile; 234 has no pvalue_level
SAMPLE = [
    f"234,{T0 + 3600},10,430548_1007,1,0",
    f"777,{T0},11,430539_1007,0,1",
    f"523,{T0 + 7 * 86400},12,430548_1007,1,0",  # 2017-05-13 00:00: the test day
    f"234,{T0 + 7 * 86400 - 1},12,430548_1007,0,1",
]
BEHAVIORS = [  # user 234: before, exactly at and after its first impression; unsorted, as in the real log
    f"234,{T0 + 3600},pv,1,2",  # at the impression time: must not enter
    f"234,{T0 + 100},cart,6406,NULL",
    f"234,{T0 + 7200},buy,3,4",  # after the first impression, before the second
    f"234,{T0 - 86400},pv,5,95471",
    f"234,{T0 + 100},fav,7,8",  # same second as the cart: log order breaks the tie
    f"777,{T0 + 1},pv,9,9",  # after 777's only impression
] + [f"523,{T0 + i},pv,{i},{i}" for i in range(60)]  # more than max_len


def _write(tmp_path, sample=SAMPLE, ads=ADS, users=USERS, behaviors=BEHAVIORS, trailing_space=True, compress=False):
    last = "new_user_class_level" + (" " if trailing_space else "")
    files = {
        "raw_sample": (taobao.SAMPLE_COLUMNS, sample),
        "ad_feature": (taobao.AD_COLUMNS, ads),
        "user_profile": (taobao.USER_COLUMNS[:-1] + (last,), users),
        "behavior_log": (taobao.BEHAVIOR_COLUMNS, behaviors),
    }
    for name, (header, lines) in files.items():
        content = ("\n".join([",".join(header)] + lines) + "\n").encode()
        if compress:
            (tmp_path / f"{name}.csv.gz").write_bytes(gzip.compress(content))
        else:
            (tmp_path / f"{name}.csv").write_bytes(content)
    return str(tmp_path)


def _read(raw_dir, accounting=None, max_len=taobao.MAX_LEN, partition_bytes=1 << 30):
    processing = taobao.Processing(max_len=max_len, partition_bytes=partition_bytes)
    source = taobao.open_raw(raw_dir, processing=processing, options=raw.ReadOptions(
        accounting=accounting or row_accounting.RowAccounting(), tmp_dir=raw_dir))
    return source.schema, rows_lib.Rows.concat(list(source.rows))


def _fp(field, values):
    return fingerprint(field, tf.constant(values, tf.string)).numpy()


def _expected_history(user, ts, max_len):
    """Independent: the user's behaviours strictly before ts, by (time, log order), the last max_len."""
    events = [(int(b.split(",")[1]), i, b.split(",")) for i, b in enumerate(BEHAVIORS) if b.split(",")[0] == user]
    before = [e[2] for e in sorted(events) if e[0] < ts][-max_len:] if max_len else []
    return before


@pytest.mark.parametrize("trailing_space, compress", [(True, False), (False, True)])
def test_join_and_sequences_field_by_field(tmp_path, trailing_space, compress):
    max_len = 50
    schema, rows = _read(_write(tmp_path, trailing_space=trailing_space, compress=compress), max_len=max_len)
    batch = rows_lib.to_batch(schema, rows.arrays())
    sample = [s.split(",") for s in SAMPLE]
    ads = {a.split(",")[0]: a.split(",") for a in ADS}
    users = {u.split(",")[0]: u.split(",") for u in USERS}
    np.testing.assert_array_equal(batch["label"], [float(s[5]) for s in sample])
    np.testing.assert_array_equal(batch["group"], [int(s[0]) for s in sample])
    np.testing.assert_array_equal(batch["userid"], _fp("userid", [s[0] for s in sample]))
    np.testing.assert_array_equal(batch["adgroup_id"], _fp("adgroup_id", [s[2] for s in sample]))
    np.testing.assert_array_equal(batch["pid"], _fp("pid", [s[3] for s in sample]))
    for j, name in enumerate(taobao.AD_COLUMNS[1:5]):
        values = [ads[s[2]][1 + j] for s in sample]
        values = ["" if v == "NULL" else v for v in values]  # NULL brand: missing
        np.testing.assert_array_equal(batch[name], _fp(name, values), err_msg=name)
    for j, name in enumerate(taobao.PROFILE_FEATURES):
        values = [users[s[0]][1 + j] if s[0] in users else "" for s in sample]  # no profile: all missing
        np.testing.assert_array_equal(batch[name], _fp(name, values), err_msg=name)
    np.testing.assert_allclose(batch["dense"][:, 0], [math.log1p(float(ads[s[2]][5])) for s in sample], rtol=1e-6)
    assert rows.day.tolist() == [20170506, 20170506, 20170513, 20170512]

    for i, s in enumerate(sample):
        history = _expected_history(s[0], int(s[1]), max_len)
        pad = max_len - len(history)
        mask = [False] * pad + [True] * len(history)  # oldest first, right-aligned
        for key, field, col in [("cate_his", "cate_id", 3), ("brand_his", "brand", 4), ("btag_his", "btag_his", 2)]:
            values = [e[col] if e[col] != "NULL" else "" for e in history]
            expected = np.concatenate([np.zeros(pad, np.int64), _fp(field, values) if values else []])
            np.testing.assert_array_equal(batch[key][i], expected, err_msg=f"{key} of impression {i}")
            np.testing.assert_array_equal(batch[key + "_mask"][i], mask)
    # The sequences share the item features' ids: the ad's category appears in its user's history.
    assert batch["cate_id"][0] in batch["cate_his"][0]


def test_nothing_at_or_after_the_impression_enters(tmp_path):
    _, rows = _read(_write(tmp_path), max_len=50)
    cate = dict(zip(_fp("cate_id", [b.split(",")[3] for b in BEHAVIORS]).tolist(), BEHAVIORS))
    for i, s in enumerate(SAMPLE):
        ts = int(s.split(",")[1])
        seen = [cate[c] for c in rows.seq[i, 0, 50 - rows.seq_len[i] :].tolist()]
        assert all(int(b.split(",")[1]) < ts for b in seen), (i, seen)
    assert rows.seq_len.tolist() == [3, 0, 50, 5]  # 234: 3 before 01:00; 777: only a later one; 523: last 50


def test_histories_against_brute_force():
    rng = np.random.default_rng(0)
    n = 3000
    behaviors = np.zeros(n, taobao.BEHAVIOR_DTYPE)
    behaviors["user"], behaviors["ts"] = rng.integers(0, 30, n), rng.integers(0, 500, n)
    behaviors = behaviors[np.lexsort((behaviors["ts"], behaviors["user"]))]
    users, times = rng.integers(0, 32, 400), rng.integers(0, 520, 400)
    index, length = taobao.histories(behaviors, users, times, 7)
    for u, t, idx, k in zip(users, times, index, length):
        expected = np.flatnonzero((behaviors["user"] == u) & (behaviors["ts"] < t))[-7:]
        assert k == len(expected)
        np.testing.assert_array_equal(idx[7 - k :], expected)


def test_partitions_do_not_change_the_examples(tmp_path):
    raw_dir = _write(tmp_path)
    _, one = _read(raw_dir, max_len=4)
    _, many = _read(raw_dir, max_len=4, partition_bytes=64)  # one partition per user id mod k
    order = np.lexsort((many.ids[:, 1], many.group))
    reference = np.lexsort((one.ids[:, 1], one.group))
    for name, value in one.arrays().items():
        np.testing.assert_array_equal(getattr(many, name)[order], value[reference], err_msg=name)


def test_unknown_ad_is_an_error_or_a_counted_skip(tmp_path):
    raw_dir = _write(tmp_path, sample=SAMPLE + [f"234,{T0},99,430548_1007,1,0"])
    with pytest.raises(raw.ParseError, match="raw_sample.csv:6: field adgroup_id: adgroup_id 99 is not in ad_feature"):
        _read(raw_dir)
    accounting = row_accounting.RowAccounting(max_bad_rows=1)
    _, rows = _read(raw_dir, accounting)
    assert len(rows) == len(SAMPLE)
    assert accounting.rejected["raw_sample"] == {"unknown_ad": 1}
    assert accounting.notes["raw_sample: user without a profile (profile features missing)"] == 1


@pytest.mark.parametrize(
    "files, message",
    [
        ({"behaviors": BEHAVIORS + ["234,1494000000,click,1,2"]}, "behavior_log.csv:68: field btag: btag must be one"),
        ({"behaviors": BEHAVIORS + ["234,14940x0000,pv,1,2"]}, "behavior_log.csv:68: field time_stamp: not an integer"),
        ({"sample": SAMPLE + ["234,1494000000,10,430548_1007,1,3"]}, "raw_sample.csv:6: field clk: clk must be 0 or 1"),
        ({"ads": ADS + ["13,1,1,1,1,cheap"]}, r"ad_feature.csv:5: field price: price must be a number"),
        ({"ads": ADS + ["10,1,1,1,1,1.0"]}, r"ad_feature.csv:5: field adgroup_id: adgroup_id 10 appeared before"),
        ({"users": USERS + ["523,1,2"]}, r"user_profile.csv:4: field \*: expected 9 comma-separated fields, got 3"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, files, message):
    with pytest.raises(raw.ParseError, match=message):
        _read(_write(tmp_path, **files))


def test_missing_file(tmp_path):
    raw_dir = _write(tmp_path)
    (tmp_path / "behavior_log.csv").unlink()
    with pytest.raises(raw.ParseError, match="no TaobaoAds file behavior_log.csv"):
        _read(raw_dir)


def test_both_encodings_of_a_file_are_refused(tmp_path):
    raw_dir = _write(tmp_path)
    (tmp_path / "ad_feature.csv.gz").write_bytes(b"")
    with pytest.raises(raw.ParseError, match="both ad_feature.csv and ad_feature.csv.gz"):
        taobao.input_files(raw_dir)
    assert taobao.input_files(raw_dir, ["*.csv"])["ad_feature"].endswith("ad_feature.csv")


def test_synthetic_clicks_follow_the_history(tmp_path):
    synthetic.taobao.write_synthetic(str(tmp_path), num_users=300, seed=1)
    _, rows = _read(str(tmp_path))
    real = rows_lib.sequence_mask(rows.seq_len, taobao.MAX_LEN)
    cate_seen = ((rows.seq[:, 0] == rows.ids[:, 3][:, None]) & real).any(axis=1)
    assert rows.label[cate_seen].mean() > 2 * rows.label[~cate_seen].mean()
    assert sorted(set(rows.day.tolist())) == list(range(20170506, 20170514))
    # The generator's true logits (the benchmarks' ceiling) cover exactly the test day's impressions the reader
    # produced, and clicks have the higher ones.
    oracle = np.load(tmp_path / "oracle.npz")
    test = rows.day == 20170513
    assert (len(oracle["label"]), oracle["label"].sum()) == (test.sum(), rows.label[test].sum())
    clicked = oracle["label"] == 1
    assert oracle["logit"][clicked].mean() > oracle["logit"][~clicked].mean() + 0.5


def test_synthetic_click_mechanisms_follow_their_rules(tmp_path):
    def rows_of(mechanism):
        raw_dir = str(tmp_path / mechanism)
        synthetic.taobao.write_synthetic(raw_dir, num_users=300, seed=1, mechanism=mechanism)
        rows = _read(raw_dir)[1]
        return rows, rows_lib.sequence_mask(rows.seq_len, taobao.MAX_LEN)  # left-padded: most recent last

    rows, real = rows_of("cate_share")
    share = ((rows.seq[:, 0] == rows.ids[:, 3][:, None]) & real).sum(1) / np.maximum(rows.seq_len, 1)
    assert rows.label[share > 0.2].mean() > 3 * rows.label[share == 0].mean()
    rows, real = rows_of("brand_recency")
    brand_match = (rows.seq[:, 1] == rows.ids[:, 6][:, None]) & real
    recent, older_only = brand_match[:, -5:].any(1), brand_match.any(1) & ~brand_match[:, -5:].any(1)
    assert rows.label[recent].mean() > 2 * rows.label[older_only].mean()
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        synthetic.taobao.write_synthetic(str(tmp_path / "x"), num_users=10, mechanism="nope")
