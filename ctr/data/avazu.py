"""Avazu mobile-ads CTR logs: raw layout, schema, streaming parser, processing options (generator: ctr.data.synthetic).

Raw layout (Kaggle ``train.csv``, plain or gzip): a header line, then one example per line, 24 comma-separated
fields: ``id`` (row id, dropped), ``click`` (0/1), ``hour`` (``YYMMDDHH``, UTC), then 21 anonymised
categorical columns (``C1``, ``banner_pos``, ``site_id`` ... ``device_conn_type``, ``C14``..``C21``).
40,428,967 rows over 10 days (2014-10-21..30) in time order.

Features (BARS Avazu_x4 convention): every categorical column is a fingerprint id; ``hour`` becomes three
categorical features: ``hour`` (the ``HH`` hour of day, as its two raw characters), ``weekday`` (0 = Monday ..
6 = Sunday) and ``weekend`` (1 on Saturday and Sunday, else 0). No dense features. :func:`time_features_tf`
computes the same three strings in TensorFlow for serving.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import TYPE_CHECKING, Iterator, Sequence

import gin
import numpy as np

from ctr import errors, tf_import
from ctr.data import raw, row_accounting
from ctr.data import rows as rows_lib
from ctr.data import schema as schema_lib
from ctr.data import text
from ctr.data.fingerprint import fingerprint_spans, fingerprint_strings

if TYPE_CHECKING:
    import tensorflow as tf

NAME = "avazu"
RAW_CATEGORICAL = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
COLUMNS = ("id", "click", "hour") + RAW_CATEGORICAL
NUM_COLUMNS = len(COLUMNS)
TIME_FEATURES = ("hour", "weekday", "weekend")
CATEGORICAL = RAW_CATEGORICAL + TIME_FEATURES
TRAIN_ROWS = 40_428_967
_LAYOUT = f"{NUM_COLUMNS} comma-separated fields"
_CLICK, _HOUR, _FIRST_CATEGORICAL = 1, 2, 3


@gin.configurable(module="avazu")
@dataclasses.dataclass(frozen=True)
class Processing:
    """Prepare-time feature processing of Avazu (bound in ``configs/avazu_data.gin``).

    Attributes:
      min_count: vocabulary threshold (values seen fewer times in train map to one OOV id); 0 = no vocabulary.
    """

    min_count: int = 0


def feature_schema() -> schema_lib.FeatureSchema:
    """21 raw categorical features + hour of day, weekday, weekend; no dense features."""
    return schema_lib.FeatureSchema(name=NAME, dense=(), categorical=CATEGORICAL)


def input_files(raw_dir: str, patterns: Sequence[str] = ()) -> list[str]:
    """``train.csv`` or ``train.csv.gz`` (or ``train``/``train.gz``, as some mirrors name it) in ``raw_dir``; only
    files matching ``patterns`` (``--raw_files``) when given. Two of them are an error (which one is meant?)."""
    found = [n for n in raw.list_dir(raw_dir, patterns) if re.fullmatch(r"train(\.csv)?(\.gz)?", n)]
    if not found:
        raise raw.ParseError(f"{raw_dir}: no Avazu file (expected train.csv[.gz])")
    if len(found) > 1:
        raise raw.ambiguous(raw_dir, found)
    return [os.path.join(raw_dir, found[0])]


def check_header(path: str) -> None:
    names = raw.read_header(path)
    if tuple(names) != COLUMNS:
        raise raw.ParseError(f"{path}:1: field *: expected the Avazu header {','.join(COLUMNS)}, got {','.join(names)}")


def open_raw(raw_dir: str, *, processing: Processing, options: raw.ReadOptions) -> raw.RawSource:
    """Avazu's raw file (matching ``options.raw_files`` when given) as a stream of parsed rows (a row's ``day``
    is its date as YYYYMMDD, whatever the split). ``processing`` has no reader options (prepare applies the
    vocabulary); no temporary files."""
    paths = input_files(raw_dir, options.raw_files)
    rows = read(paths, options.accounting, options.threads, raw.progress_for(NAME, paths, options.emit))
    return raw.RawSource(feature_schema(), rows, raw.estimate_lines(paths, 1), NAME)


def read(
    paths: list[str], accounting: row_accounting.RowAccounting, threads: int = 2, progress: raw.Progress | None = None
) -> Iterator[rows_lib.Rows]:
    """Parsed rows of raw Avazu CSV files (each with its header), streaming."""
    for path in paths:
        check_header(path)
    return raw.stream_rows(paths, parse_block, accounting, NAME, threads, skip_lines=1, progress=progress)


def parse_block(block: raw.Block) -> tuple[rows_lib.Rows, list[row_accounting.Rejection]]:
    """Parses one block of raw lines: ``Rows`` (``label [n]``, ``ids [n, 24]``, ``day [n]`` = YYYYMMDD) and a
    rejection per bad row."""
    data = block.data
    spans = text.split_fields(data, b",", NUM_COLUMNS)
    words = text.Words(data)
    starts, ends = spans.starts, spans.ends
    click = data[starts[:, _CLICK]]
    click_ok = (ends[:, _CLICK] - starts[:, _CLICK] == 1) & ((click == ord("0")) | (click == ord("1")))
    hour, _, hour_int = text.parse_ints(words, starts[:, _HOUR], ends[:, _HOUR])
    yy, mm, dd, hh = hour // 1_000_000, hour // 10_000 % 100, hour // 100 % 100, hour % 100
    hour_ok = hour_int & (ends[:, _HOUR] - starts[:, _HOUR] == 8) & _valid_date(2000 + yy, mm, dd) & (hh < 24)

    def shown(row: int, col: int) -> str:
        return errors.quote(text.span_bytes(data, starts[row, col], ends[row, col]))

    checks: list[row_accounting.Check] = [
        (click_ok, "bad_label", "click", lambda r: f"click must be 0 or 1, got {shown(r, _CLICK)}"),
        (hour_ok, "bad_hour", "hour", lambda r: f"hour must be a valid YYMMDDHH, got {shown(r, _HOUR)}"),
    ]
    keep, rejections = row_accounting.block_rejections(block, spans, checks, _LAYOUT)
    if not keep.all():
        starts, ends, click, yy, mm, dd = starts[keep], ends[keep], click[keep], yy[keep], mm[keep], dd[keep]
    weekday = (days_from_civil(2000 + yy, mm, dd) + 3) % 7  # 1970-01-01 was a Thursday (3)
    weekday_ids, weekend_ids = _time_tables()
    ids = np.empty((len(starts), len(CATEGORICAL)), np.int64)
    first = _FIRST_CATEGORICAL
    ids[:, : len(RAW_CATEGORICAL)] = fingerprint_spans(RAW_CATEGORICAL, words, starts[:, first:], ends[:, first:])
    hour_of_day = starts[:, _HOUR, None] + 6  # the raw "HH" characters
    ids[:, len(RAW_CATEGORICAL)] = fingerprint_spans(["hour"], words, hour_of_day, hour_of_day + 2)[:, 0]
    ids[:, len(RAW_CATEGORICAL) + 1] = weekday_ids[weekday]
    ids[:, len(RAW_CATEGORICAL) + 2] = weekend_ids[(weekday >= 5).astype(np.int64)]
    rows = rows_lib.Rows(
        label=(click == ord("1")).astype(np.float32),
        dense=np.zeros((len(starts), 0), np.float32),
        ids=ids,
        day=(2000 + yy) * 10_000 + mm * 100 + dd,
    )
    return rows, rejections


def days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date, in integer arithmetic only (``+ - * // %``), so
    the same code runs on numpy arrays and TensorFlow tensors (H. Hinnant's ``days_from_civil``)."""
    y = year - 1 + (month + 9) // 12  # January and February count as months 10 and 11 of the previous year
    era = y // 400
    year_of_era = y - era * 400
    day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _valid_date(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    leap = ((year % 4 == 0) & (year % 100 != 0)) | (year % 400 == 0)
    month_days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 0, 12)]
    return (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days + (leap & (month == 2)))


@functools.lru_cache(maxsize=None)
def _time_tables() -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``weekday`` values "0".."6" and ``weekend`` values "0", "1"."""
    return fingerprint_strings("weekday", [str(d) for d in range(7)]), fingerprint_strings("weekend", ["0", "1"])


def time_features_tf(hour: tf.Tensor) -> dict[str, tf.Tensor]:
    """The raw strings of the ``hour``, ``weekday`` and ``weekend`` features from raw ``YYMMDDHH`` strings
    (serving; ``fingerprint(name, ...)`` of each gives the ids prepare wrote)."""
    tf = tf_import.tensorflow()  # serving-side; the reader is numpy only

    value = tf.strings.to_number(hour, tf.int64)
    yy, mm, dd = value // 1_000_000, value // 10_000 % 100, value // 100 % 100
    weekday = (days_from_civil(2000 + yy, mm, dd) + 3) % 7
    return {
        "hour": tf.strings.substr(hour, 6, 2),
        "weekday": tf.strings.as_string(weekday),
        "weekend": tf.strings.as_string(tf.cast(weekday >= 5, tf.int64)),
    }
