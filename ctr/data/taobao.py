"""TaobaoAds (Ali_Display_Ad_Click): raw layout, join, behaviour sequences, schema (generator: ctr.data.synthetic).

Raw layout (four CSV files with headers, each plain or gzip):

- ``raw_sample.csv`` ``user,time_stamp,adgroup_id,pid,nonclk,clk``: one impression per line (26,557,961 over 8
  days, 2017-05-06..13); ``clk`` is the label, ``nonclk`` is ignored.
- ``ad_feature.csv`` ``adgroup_id,cate_id,campaign_id,customer,brand,price``; ``brand`` may be ``NULL``.
- ``user_profile.csv`` ``userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,
  shopping_level,occupation,new_user_class_level`` (the last name arrives with a trailing space: names are
  compared stripped); ``pvalue_level`` is often empty; some users have no profile.
- ``behavior_log.csv`` ``user,time_stamp,btag,cate,brand``: 723M behaviours over 22 days; ``btag`` is one of
  pv, cart, fav, buy; ``brand`` may be ``NULL``.

An example is an impression joined with its ad's features and its user's profile (a user without a profile
is kept, every profile feature missing), plus three behaviour sequences: ``cate_his``, ``brand_his`` and
``btag_his``, the cate, brand and btag of the user's last ``max_len`` (50) behaviours strictly before the
impression's ``time_stamp`` (so nothing at or after the impression leaks in). ``cate_his`` and ``brand_his``
ids are fingerprints under the item features' names (``cate_id``, ``brand``), so they share those embeddings;
``btag_his`` has its own. ``NULL`` brands are missing values (the empty string). An impression whose ad is
not in ``ad_feature`` is a bad row (``unknown_ad``). The gAUC group is the user. ``price`` is the one dense
feature, as ``log(1 + price)``. Days are dates in China time (UTC+8): 2017-05-13 is the standard test day.

Memory: the ad and user tables (846k and 1.06M rows) are held in memory. The behaviour log is not: the
impressions and the behaviours are first partitioned by user into temporary files (one streaming pass each,
~25 bytes per behaviour on disk), then each partition's behaviours are sorted by (user, time) and every
impression finds its history with one binary search. Memory is then bounded by one partition (set by
``partition_bytes``), whatever the log's size.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from typing import Iterator, Sequence

import gin
import numpy as np

from ctr import errors
from ctr.data import raw, row_accounting, side_tables
from ctr.data import rows as rows_lib
from ctr.data import schema as schema_lib
from ctr.data import text
from ctr.data.fingerprint import fingerprint_spans, fingerprint_strings

NAME = "taobao"
FILES = ("raw_sample", "ad_feature", "user_profile", "behavior_log")
SAMPLE_COLUMNS = ("user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk")
AD_COLUMNS = ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price")
USER_COLUMNS = ("userid", "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
                "shopping_level", "occupation", "new_user_class_level")  # fmt: skip
BEHAVIOR_COLUMNS = ("user", "time_stamp", "btag", "cate", "brand")
AD_FEATURES = ("cate_id", "campaign_id", "customer", "brand")
PROFILE_FEATURES = USER_COLUMNS[1:]
CATEGORICAL = ("userid", "adgroup_id", "pid") + AD_FEATURES + PROFILE_FEATURES
DENSE = ("price",)
BTAGS = ("pv", "cart", "fav", "buy")
RAW_SAMPLE_ROWS = 26_557_961
TEST_DAY = 20170513
MAX_LEN = 50
UTC8 = 8 * 3600  # seconds: TaobaoAds timestamps are Beijing time
_IMPRESSION = np.dtype([("user", "<i8"), ("ts", "<i8"), ("ad", "<i8"), ("userid", "<i8"), ("adgroup_id", "<i8"),
                        ("pid", "<i8"), ("label", "<f4")])  # fmt: skip
# 25 bytes per behaviour on disk (user and time are checked to fit in int32).
BEHAVIOR_DTYPE = np.dtype([("user", "<i4"), ("ts", "<i4"), ("btag", "i1"), ("cate", "<i8"), ("brand", "<i8")])


@gin.configurable(module="taobao")
@dataclasses.dataclass(frozen=True)
class Processing:
    """Prepare-time feature processing of TaobaoAds (bound in ``configs/taobao_data.gin``).

    Attributes:
      max_len: behaviours kept per sequence (the most recent ones before the impression).
      min_count: vocabulary threshold (values seen fewer times in train map to one OOV id); 0 = no vocabulary.
      partition_bytes: raw behaviour-log bytes per user partition (bounds memory: ~2x this while a partition
        is joined).
    """

    max_len: int = MAX_LEN
    min_count: int = 0
    partition_bytes: int = 1 << 30


def feature_schema(max_len: int = MAX_LEN) -> schema_lib.FeatureSchema:
    return schema_lib.FeatureSchema(
        name=NAME,
        dense=DENSE,
        categorical=CATEGORICAL,
        sequences=(
            schema_lib.SequenceFeature("cate_his", "cate_id", max_len),
            schema_lib.SequenceFeature("brand_his", "brand", max_len),
            schema_lib.SequenceFeature("btag_his", None, max_len),
        ),
        group_key="userid",
    )


def input_files(raw_dir: str, patterns: Sequence[str] = ()) -> dict[str, str]:
    """``{name: path}`` of the four raw files (``<name>.csv`` or ``<name>.csv.gz``) in ``raw_dir``; only files
    matching ``patterns`` (``--raw_files``) when given. Both encodings of one file are an error."""
    names = raw.list_dir(raw_dir, patterns)
    found = {}
    for name in FILES:
        match = [n for n in names if re.fullmatch(rf"{name}\.csv(\.gz)?", n)]
        if not match:
            raise raw.ParseError(f"{raw_dir}: no TaobaoAds file {name}.csv[.gz]")
        if len(match) > 1:
            raise raw.ambiguous(raw_dir, match)
        found[name] = os.path.join(raw_dir, match[0])
    return found


def check_header(path: str, expected: tuple[str, ...]) -> None:
    names = raw.read_header(path)  # stripped, so "new_user_class_level " is accepted
    if tuple(names) != expected:
        raise raw.ParseError(f"{path}:1: field *: expected the header {','.join(expected)}, got {','.join(names)}")


def open_raw(raw_dir: str, *, processing: Processing, options: raw.ReadOptions) -> raw.RawSource:
    """TaobaoAds' raw files (matching ``options.raw_files`` when given) as a stream of joined rows with behaviour
    sequences (``day`` = YYYYMMDD, UTC+8, whatever the split).

    Rows come partition by partition (users grouped by ``user % partitions``), each partition in impression
    order. Temporary partition files live in ``options.tmp_dir`` (default: the system's) and are removed at the
    end. Progress of the two streaming passes goes to ``options.emit``.
    """
    paths = input_files(raw_dir, options.raw_files)
    for name, columns in zip(FILES, (SAMPLE_COLUMNS, AD_COLUMNS, USER_COLUMNS, BEHAVIOR_COLUMNS)):
        check_header(paths[name], columns)
    partitions = max(1, -(-os.path.getsize(paths["behavior_log"]) // processing.partition_bytes))
    rows = _joined_rows(paths, options.accounting, processing.max_len, partitions, options.threads, options.emit,
                        options.tmp_dir)  # fmt: skip
    estimated_rows = raw.estimate_lines([paths["raw_sample"]], 1)
    return raw.RawSource(feature_schema(processing.max_len), rows, estimated_rows, "raw_sample")


# --------------------------------------------------------------------------------------------------------------
# Side-table defaults (the tables themselves: ctr.data.side_tables).


@functools.lru_cache(maxsize=None)
def _missing_profile_ids() -> np.ndarray:
    return np.array([fingerprint_strings(f, [""])[0] for f in PROFILE_FEATURES], np.int64)


@functools.lru_cache(maxsize=None)
def _btag_ids() -> np.ndarray:
    return fingerprint_strings("btag_his", list(BTAGS))


# --------------------------------------------------------------------------------------------------------------
# Impressions and behaviours, partitioned by user.


def _day_key(ts: np.ndarray) -> np.ndarray:
    """YYYYMMDD of unix seconds, in China time (UTC+8)."""
    days = ((ts + UTC8) // 86_400).astype("datetime64[D]")
    months = days.astype("datetime64[M]")
    years = months.astype("datetime64[Y]").astype(np.int64) + 1970
    return years * 10_000 + (months.astype(np.int64) % 12 + 1) * 100 + (days - months).astype(np.int64) + 1


def _parse_impressions(
    block: raw.Block, ads: side_tables.SideTable
) -> tuple[np.ndarray, list[row_accounting.Rejection]]:
    data = block.data
    spans = text.split_fields(data, b",", len(SAMPLE_COLUMNS))
    words = text.Words(data)
    starts, ends = spans.starts, spans.ends
    ints, present, valid = text.parse_ints(words, starts[:, :3], ends[:, :3])
    clk = data[starts[:, 5]]
    clk_ok = (ends[:, 5] - starts[:, 5] == 1) & ((clk == ord("0")) | (clk == ord("1")))
    ad_row, ad_found = ads.find(ints[:, 2])
    checks: list[row_accounting.Check] = []
    for j, field in enumerate(SAMPLE_COLUMNS[:3]):
        checks.append((valid[:, j] & present[:, j], "not_an_integer", field, _describe_int(data, starts, ends, j)))
        if j < 2:  # user and time form one 64-bit sort key
            checks.append((_in_key_range(ints[:, j]), "out_of_range", field, _describe_range(ints, j)))
    checks.append((clk_ok, "bad_label", "clk", lambda r: f"clk must be 0 or 1, got {_shown(data, starts, ends, r, 5)}"))
    checks.append((ad_found, "unknown_ad", "adgroup_id", lambda r: f"adgroup_id {ints[r, 2]} is not in ad_feature"))
    layout = f"{len(SAMPLE_COLUMNS)} comma-separated fields"
    keep, rejections = row_accounting.block_rejections(block, spans, checks, layout)
    starts, ends = starts[keep], ends[keep]
    ids = fingerprint_spans(("userid", "adgroup_id", "pid"), words, starts[:, [0, 2, 3]], ends[:, [0, 2, 3]])
    out = np.empty(int(keep.sum()), _IMPRESSION)
    out["user"], out["ts"], out["ad"] = ints[keep, 0], ints[keep, 1], ad_row[keep]
    out["userid"], out["adgroup_id"], out["pid"] = ids[:, 0], ids[:, 1], ids[:, 2]
    out["label"] = clk[keep] == ord("1")
    return out, rejections


def _parse_behaviors(block: raw.Block) -> tuple[np.ndarray, list[row_accounting.Rejection]]:
    data = block.data
    spans = text.split_fields(data, b",", len(BEHAVIOR_COLUMNS))
    words = text.Words(data)
    starts, ends = spans.starts, spans.ends
    ints, present, valid = text.parse_ints(words, starts[:, :2], ends[:, :2])
    btag_len = ends[:, 2] - starts[:, 2]
    btag_word = words(starts[:, 2])
    btag = np.full(len(starts), -1, np.int8)
    for code, name in enumerate(BTAGS):
        mask = np.uint64((1 << (8 * len(name))) - 1)
        value = np.uint64(int.from_bytes(name.encode(), "little"))
        btag[(btag_len == len(name)) & ((btag_word & mask) == value)] = code
    checks: list[row_accounting.Check] = []
    for j, field in enumerate(BEHAVIOR_COLUMNS[:2]):
        checks.append((valid[:, j] & present[:, j], "not_an_integer", field, _describe_int(data, starts, ends, j)))
        checks.append((_in_key_range(ints[:, j]), "out_of_range", field, _describe_range(ints, j)))

    def btag_detail(row: int) -> str:
        return f"btag must be one of {'/'.join(BTAGS)}, got {_shown(data, starts, ends, row, 2)}"

    checks.append((btag >= 0, "bad_btag", "btag", btag_detail))
    layout = f"{len(BEHAVIOR_COLUMNS)} comma-separated fields"
    keep, rejections = row_accounting.block_rejections(block, spans, checks, layout)
    starts, ends = starts[keep][:, 3:], spans.ends[keep][:, 3:]
    ids = fingerprint_spans(("cate_id", "brand"), words, starts, side_tables.null_as_missing(words, starts, ends))
    out = np.empty(int(keep.sum()), BEHAVIOR_DTYPE)
    out["user"], out["ts"], out["btag"] = ints[keep, 0], ints[keep, 1], btag[keep]
    out["cate"], out["brand"] = ids[:, 0], ids[:, 1]
    return out, rejections


def _shown(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, row: int, col: int) -> str:
    return errors.quote(text.span_bytes(data, starts[row, col], ends[row, col]))


def _describe_int(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, col: int):
    return lambda r: f"not an integer {_shown(data, starts, ends, r, col)}"


def _in_key_range(values: np.ndarray) -> np.ndarray:
    return (values >= 0) & (values < 2**31)


def _describe_range(ints: np.ndarray, col: int):
    return lambda r: f"{ints[r, col]} is outside [0, 2**31)"


def _partition(records: Iterator[np.ndarray], partitions: int, directory: str, prefix: str) -> list[str]:
    """Appends records to one file per ``user % partitions``; returns the file paths."""
    paths = [os.path.join(directory, f"{prefix}-{p:05d}.bin") for p in range(partitions)]
    files = [open(p, "wb") for p in paths]
    try:
        for chunk in records:
            part = chunk["user"] % partitions
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(partitions + 1))
            for p in np.flatnonzero(np.diff(bounds)):
                chunk[order[bounds[p] : bounds[p + 1]]].tofile(files[p])
    finally:
        for f in files:
            f.close()
    return paths


def histories(
    behaviors: np.ndarray, users: np.ndarray, times: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each impression's last ``max_len`` behaviours strictly before its time.

    Args:
      behaviors: ``BEHAVIOR_DTYPE`` records sorted by (user, ts) (ties in log order).
      users, times: ``[m]`` the impressions' user and time.
      max_len: L.

    Returns:
      ``index [m, L]`` into ``behaviors`` (right-aligned, oldest first; 0 where padding) and ``length [m]``.
    """
    keys = (behaviors["user"].astype(np.int64) << 32) + behaviors["ts"]
    users = np.asarray(users, np.int64) << 32
    end = np.searchsorted(keys, users + times, side="left")  # the first behaviour at or after the time
    begin = np.searchsorted(keys, users, side="left")  # the user's first behaviour
    length = np.minimum(end - begin, max_len)
    index = end[:, None] - max_len + np.arange(max_len)
    index = np.where(np.arange(max_len) >= max_len - length[:, None], index, 0)
    return index, length.astype(np.int32)


def _joined_rows(
    paths: dict[str, str],
    accounting: row_accounting.RowAccounting,
    max_len: int,
    partitions: int,
    threads: int,
    emit: raw.Emit | None,
    tmp_dir: str | None,
    chunk_rows: int = 65_536,
) -> Iterator[rows_lib.Rows]:
    ads = side_tables.load(paths["ad_feature"], AD_COLUMNS, AD_FEATURES, accounting, "ad_feature", threads,
                           price_column=5)  # fmt: skip
    users = side_tables.load(paths["user_profile"], USER_COLUMNS, PROFILE_FEATURES, accounting, "user_profile",
                             threads)  # fmt: skip
    btag_ids = _btag_ids()
    with tempfile.TemporaryDirectory(prefix="taobao-", dir=tmp_dir) as tmp:
        samples = [paths["raw_sample"]]
        sample_parts = _partition(
            raw.stream_rows(samples, lambda b: _parse_impressions(b, ads), accounting, "raw_sample", threads,
                            skip_lines=1, progress=raw.progress_for("taobao raw_sample", samples, emit)),
            partitions, tmp, "impressions",
        )  # fmt: skip
        logs = [paths["behavior_log"]]
        behavior_parts = _partition(
            raw.stream_rows(logs, _parse_behaviors, accounting, "behavior_log", threads,
                            skip_lines=1, progress=raw.progress_for("taobao behavior_log", logs, emit)),
            partitions, tmp, "behaviors",
        )  # fmt: skip
        for sample_path, behavior_path in zip(sample_parts, behavior_parts):
            impressions = np.fromfile(sample_path, _IMPRESSION)
            behaviors = np.fromfile(behavior_path, BEHAVIOR_DTYPE)
            os.remove(sample_path)
            os.remove(behavior_path)
            behaviors = behaviors[np.lexsort((behaviors["ts"], behaviors["user"]))]  # stable: ties keep log order
            for begin in range(0, len(impressions), chunk_rows):
                chunk = impressions[begin : begin + chunk_rows]
                yield _join(chunk, behaviors, ads, users, btag_ids, max_len, accounting)


def _join(
    imp: np.ndarray, behaviors: np.ndarray, ads: side_tables.SideTable, users: side_tables.SideTable,
    btag_ids: np.ndarray, max_len: int,
    accounting: row_accounting.RowAccounting,
) -> rows_lib.Rows:
    user_row, has_profile = users.find(imp["user"])
    accounting.note("raw_sample: user without a profile (profile features missing)", int((~has_profile).sum()))
    profile = np.where(has_profile[:, None], users.ids[user_row], _missing_profile_ids()[None, :])
    ids = np.concatenate([
        np.stack([imp["userid"], imp["adgroup_id"], imp["pid"]], axis=1), ads.ids[imp["ad"]], profile,
    ], axis=1)  # fmt: skip
    seq = np.zeros((len(imp), 3, max_len), np.int64)
    length = np.zeros(len(imp), np.int32)
    if len(behaviors):
        index, length = histories(behaviors, imp["user"], imp["ts"], max_len)
        real = rows_lib.sequence_mask(length, max_len)
        seq[:] = np.stack([behaviors["cate"][index], behaviors["brand"][index], btag_ids[behaviors["btag"][index]]], 1)
        seq *= real[:, None, :]
    return rows_lib.Rows(
        label=imp["label"].astype(np.float32),
        dense=ads.dense[imp["ad"]],
        ids=ids,
        day=_day_key(imp["ts"]),
        seq=seq,
        seq_len=length,
        group=imp["user"].copy(),
    )
