"""Avazu mobile-ads CTR logs: raw layout, schema, streaming parser, processing options, synthetic generator.

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
import gzip
import os
import re
from typing import TYPE_CHECKING, Iterator, Sequence

import gin
import numpy as np

from ctr import errors
from ctr.data import raw
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


def open_raw(
    raw_dir: str,
    accounting: raw.RowAccounting,
    processing: Processing,
    time_split: bool = False,
    threads: int = 2,
    emit: raw.Emit | None = None,
    tmp_dir: str | None = None,
    raw_files: Sequence[str] = (),
) -> raw.RawSource:
    """Avazu's raw file (matching ``raw_files`` when given) as a stream of parsed rows (a row's ``day`` is its
    date as YYYYMMDD); progress goes to ``emit``."""
    del processing, time_split, tmp_dir  # the vocabulary is applied by prepare; days are dates; no temp files
    paths = input_files(raw_dir, raw_files)
    rows = read(paths, accounting, threads, raw.progress_for(NAME, paths, emit))
    return raw.RawSource(feature_schema(), rows, raw.estimate_lines(paths, 1), NAME)


def read(
    paths: list[str], accounting: raw.RowAccounting, threads: int = 2, progress: raw.Progress | None = None
) -> Iterator[rows_lib.Rows]:
    """Parsed rows of raw Avazu CSV files (each with its header), streaming."""
    for path in paths:
        check_header(path)
    return raw.stream_rows(paths, parse_block, accounting, NAME, threads, skip_lines=1, progress=progress)


def parse_block(block: raw.Block) -> tuple[rows_lib.Rows, list[raw.Rejection]]:
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

    checks: list[raw.Check] = [
        (click_ok, "bad_label", "click", lambda r: f"click must be 0 or 1, got {shown(r, _CLICK)}"),
        (hour_ok, "bad_hour", "hour", lambda r: f"hour must be a valid YYMMDDHH, got {shown(r, _HOUR)}"),
    ]
    keep, rejections = raw.block_rejections(block, spans, checks, _LAYOUT)
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
    import tensorflow as tf  # serving-side; the reader is numpy only

    value = tf.strings.to_number(hour, tf.int64)
    yy, mm, dd = value // 1_000_000, value // 10_000 % 100, value // 100 % 100
    weekday = (days_from_civil(2000 + yy, mm, dd) + 3) % 7
    return {
        "hour": tf.strings.substr(hour, 6, 2),
        "weekday": tf.strings.as_string(weekday),
        "weekend": tf.strings.as_string(tf.cast(weekday >= 5, tf.int64)),
    }


# --------------------------------------------------------------------------------------------------------------
# Synthetic data in the raw layout, with learnable structure.


def write_synthetic(path: str, num_rows: int, seed: int = 0, days: int = 10, start_date: str = "141021") -> None:
    """Writes ``num_rows`` raw Avazu lines (with header) to ``path`` whose clicks a CTR model can learn.

    Rows are spread evenly over ``days`` days from ``start_date`` (YYMMDD) in time order, as in the real file.
    The click logit sums a per-value effect of every categorical column (Zipf-like value frequencies,
    vocabularies from 2 to ~20k values), a cross between ``site_id`` and ``device_model`` that only feature
    interactions capture, and an hour-of-day and weekend effect. ``.gz`` paths are written gzip-compressed.
    """
    rng = np.random.default_rng(seed)
    n_cat = len(RAW_CATEGORICAL)
    vocab = np.exp(rng.uniform(np.log(2), np.log(20_000), n_cat)).astype(np.int64)
    zipf = rng.uniform(1.5, 4.0, n_cat)
    effects = [rng.normal(0.0, s, v) for s, v in zip(rng.uniform(0.1, 0.5, n_cat), vocab)]
    cross_a, cross_b = RAW_CATEGORICAL.index("site_id"), RAW_CATEGORICAL.index("device_model")
    factors = {f: rng.normal(0.0, 0.6, (vocab[f], 3)) for f in (cross_a, cross_b)}
    hour_effect = 0.4 * np.sin(np.arange(24) / 24 * 2 * np.pi)
    hex_fields = {"site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_id",
                  "device_ip", "device_model"}  # fmt: skip
    salt = rng.integers(1, 2**31, n_cat)
    row_rng = np.random.default_rng([seed, 1])
    idx = np.empty((num_rows, n_cat), np.int64)
    for f in range(n_cat):
        idx[:, f] = np.minimum((vocab[f] * row_rng.random(num_rows) ** zipf[f]).astype(np.int64), vocab[f] - 1)
    position = np.arange(num_rows) * days * 24 // max(num_rows, 1)  # hours since the start, in time order
    start = np.datetime64(f"20{start_date[:2]}-{start_date[2:4]}-{start_date[4:]}")
    dates = start + (position // 24).astype("timedelta64[D]")
    weekday = (dates.astype(np.int64) + 3) % 7
    logit = -1.6 + hour_effect[position % 24] + 0.3 * (weekday >= 5)
    for f in range(n_cat):
        logit += effects[f][idx[:, f]]
    logit += np.sum(factors[cross_a][idx[:, cross_a]] * factors[cross_b][idx[:, cross_b]], axis=1)
    click = (row_rng.random(num_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    month_start = dates.astype("datetime64[M]")
    yymmddhh = (
        (month_start.astype("datetime64[Y]").astype(np.int64) + 70) % 100 * 1_000_000
        + (month_start.astype(np.int64) % 12 + 1) * 10_000
        + ((dates - month_start).astype(np.int64) + 1) * 100
        + position % 24
    )
    columns = [
        row_rng.integers(0, 2**63, num_rows, dtype=np.uint64).astype(str).tolist(),
        click.astype(str).tolist(),
        [f"{h:08d}" for h in yymmddhh.tolist()],
    ]
    for f, name in enumerate(RAW_CATEGORICAL):
        if name in hex_fields:
            columns.append([f"{h:08x}" for h in ((idx[:, f] * 2654435761 + salt[f]) & 0xFFFFFFFF).tolist()])
        else:
            columns.append((idx[:, f] + (1000 if name.startswith("C") else 0)).astype(str).tolist())
    lines = [",".join(row) for row in zip(*columns)]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="ascii") as out:
        out.write(",".join(COLUMNS) + "\n")
        out.write("\n".join(lines) + "\n")
