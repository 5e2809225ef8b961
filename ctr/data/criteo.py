"""Criteo display-ads logs: raw layout, schema, streaming parser, processing options (generator: ctr.data.synthetic).

Raw layout (Kaggle ``train.txt``; the 1TB ``day_0``..``day_23`` files are the same, often gzipped): one example
per line, 40 tab-separated fields, no header: ``label`` (0/1), ``I1``..``I13`` integer counts (``I2`` has small
negatives), ``C1``..``C26`` 8-hex-digit hashed categoricals. An empty field is a missing value.

Features: each ``C`` field becomes a categorical id (:mod:`ctr.data.fingerprint`); each ``I`` field becomes a
dense input ``log(1 + max(x, 0))`` (missing = 0) and, with ``int_buckets=True``, also a categorical feature
``I<k>_bucket`` holding the BARS bucket ``floor(ln(x)^2)`` for ``x > 2`` and ``x`` itself otherwise (missing =
the empty string).

Validation is cheap and vectorised (field counts from the tab positions, integers by an 8-byte digit test,
label by one byte), so it costs a small part of the parse; a bad row is named by file, line and field.
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
from ctr.data.raw import ParseError  # noqa: F401  (part of this module's interface)

if TYPE_CHECKING:
    import tensorflow as tf

NAME = "criteo"
INT_FIELDS = tuple(f"I{i}" for i in range(1, 14))
CAT_FIELDS = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = ("label",) + INT_FIELDS + CAT_FIELDS
NUM_COLUMNS = len(COLUMNS)
KAGGLE_TRAIN_ROWS = 45_840_617  # train.txt, 7 days in time order
KAGGLE_DAYS = 7
_LAYOUT = f"{NUM_COLUMNS} tab-separated fields"
# BARS buckets of x > 2 are floor(ln(x)^2) <= floor(ln(2**63)^2) = 1907; x <= 2 is its own bucket. Ids of the
# buckets in [_BUCKET_LOW, _BUCKET_HIGH] come from a table; anything else (x < -1024) is hashed directly.
_BUCKET_LOW, _BUCKET_HIGH = -1024, 1907


@gin.configurable(module="criteo")
@dataclasses.dataclass(frozen=True)
class Processing:
    """Prepare-time feature processing of Criteo (bound in ``configs/criteo_data.gin``).

    Attributes:
      int_buckets: also emit the ``I<k>_bucket`` categorical features.
      min_count: vocabulary threshold (values seen fewer times in train map to one OOV id); 0 = no vocabulary.
    """

    int_buckets: bool = True
    min_count: int = 0


def bucket_field(name: str) -> str:
    return name + "_bucket"


def feature_schema(int_buckets: bool = False) -> schema_lib.FeatureSchema:
    """The batch schema of parsed Criteo rows (13 dense + 26 categorical, + 13 int buckets if asked)."""
    categorical = CAT_FIELDS + (tuple(bucket_field(f) for f in INT_FIELDS) if int_buckets else ())
    return schema_lib.FeatureSchema(name=NAME, dense=INT_FIELDS, categorical=categorical)


def input_files(raw_dir: str, patterns: Sequence[str] = ()) -> list[str]:
    """The raw files of a Criteo download in time order: ``train.txt[.gz]`` (Kaggle) or ``day_<k>[.gz]`` (1TB),
    ordered by ``k``. Only files matching ``patterns`` (``--raw_files``) when given.

    Raises:
      ParseError: no Criteo file; two encodings of one file; the Kaggle file beside day files; a day missing
        between the first and the last day file.
    """
    names = raw.list_dir(raw_dir, patterns)
    kaggle = [n for n in names if re.fullmatch(r"train\.txt(\.gz)?", n)]
    days: dict[int, list[str]] = {}
    for n in names:
        if re.fullmatch(r"day_\d+(\.gz)?", n):
            days.setdefault(file_day(n), []).append(n)
    if kaggle and days:
        raise ParseError(f"{raw_dir}: both the Kaggle file {kaggle[0]} and daily logs day_*; choose with "
                         f"--raw_files={kaggle[0]} or --raw_files='day_*' (or move one away)")  # fmt: skip
    if len(kaggle) > 1:
        raise raw.ambiguous(raw_dir, kaggle)
    if kaggle:
        return [os.path.join(raw_dir, kaggle[0])]
    if not days:
        raise ParseError(f"{raw_dir}: no Criteo files (expected train.txt[.gz] or day_0..day_23[.gz])")
    for found in days.values():
        if len(found) > 1:
            raise raw.ambiguous(raw_dir, found)
    missing = sorted(set(range(min(days), max(days) + 1)) - set(days))
    if missing:
        raise ParseError(f"{raw_dir}: day_{missing[0]} is missing between day_{min(days)} and day_{max(days)} "
                         f"({len(missing)} day(s) missing; a row's day is its file's number)")  # fmt: skip
    return [os.path.join(raw_dir, days[d][0]) for d in sorted(days)]


def file_day(path: str) -> int | None:
    """``k`` of a ``day_<k>[.gz]`` file; None for other names."""
    match = re.fullmatch(r"day_(\d+)(\.gz)?", os.path.basename(path))
    return int(match[1]) if match else None


def open_raw(raw_dir: str, *, processing: Processing, options: raw.ReadOptions) -> raw.RawSource:
    """Criteo's raw files (those matching ``options.raw_files`` when given) as a stream of parsed rows.

    The ``day`` of a row is ``k`` of its 1TB ``day_k`` file. For the single Kaggle file it is
    ``(line - 1) // ceil(lines / 7)`` (the file holds 7 days in time order without timestamps); counting the
    lines costs an extra streaming pass, made only when ``options.time_split`` needs days. Streams straight through
    (no temporary files).
    """
    paths = input_files(raw_dir, options.raw_files)
    lines_per_day = None
    if options.time_split and file_day(paths[0]) is None:
        lines_per_day = -(-raw.count_lines(paths[0]) // KAGGLE_DAYS)
    progress = raw.progress_for(NAME, paths, options.emit)
    rows = read(paths, options.accounting, processing.int_buckets, options.threads, lines_per_day, progress)
    return raw.RawSource(feature_schema(processing.int_buckets), rows, raw.estimate_lines(paths), NAME)


def read(
    paths: list[str],
    accounting: row_accounting.RowAccounting,
    int_buckets: bool = False,
    threads: int = 2,
    lines_per_day: int | None = None,
    progress: raw.Progress | None = None,
) -> Iterator[rows_lib.Rows]:
    """Parsed rows of raw Criteo files, streaming (memory bounded by the block size).

    Args:
      paths: raw files in time order (plain or gzip).
      accounting: receives lines read and bad rows (and raises on bad rows beyond its budget).
      int_buckets: also emit the ``I<k>_bucket`` ids (after the 26 ``C`` ids).
      threads: parser threads.
      lines_per_day: day = (line - 1) // lines_per_day; None: day = ``k`` of a ``day_k`` file, else the file's
        index in ``paths``.
      progress: progress reporter.
    """
    day_of_file = {path: i if file_day(path) is None else file_day(path) for i, path in enumerate(paths)}

    def parse(block: raw.Block) -> tuple[rows_lib.Rows, list[row_accounting.Rejection]]:
        return parse_block(block, int_buckets, day_of_file[block.source], lines_per_day)

    return raw.stream_rows(paths, parse, accounting, NAME, threads, progress=progress)


def parse_block(
    block: raw.Block, int_buckets: bool = False, day: int = 0, lines_per_day: int | None = None
) -> tuple[rows_lib.Rows, list[row_accounting.Rejection]]:
    """Parses one block of raw lines: the well-formed rows, and a rejection per bad row.

    Returns:
      ``Rows`` with ``label [n]``, ``dense [n, 13]``, ``ids [n, 26 (+13)]``, ``day [n]``; and the rejections.
    """
    data = block.data
    spans = text.split_fields(data, b"\t", NUM_COLUMNS)
    words = text.Words(data)
    starts, ends = spans.starts, spans.ends
    label_byte = data[starts[:, 0]]  # the tab or newline when the label is empty
    label_ok = (ends[:, 0] - starts[:, 0] == 1) & ((label_byte == ord("0")) | (label_byte == ord("1")))
    ints, present, valid = text.parse_ints(words, starts[:, 1:14], ends[:, 1:14])

    def shown(row: int, col: int) -> str:
        return errors.quote(text.span_bytes(data, starts[row, col], ends[row, col]))

    checks: list[row_accounting.Check] = [
        (label_ok, "bad_label", "label", lambda r: f"label must be 0 or 1, got {shown(r, 0)}")
    ]
    for j, field in enumerate(INT_FIELDS):
        checks.append((valid[:, j], "not_an_integer", field, lambda r, j=j: f"not an integer {shown(r, 1 + j)}"))
    keep, rejections = row_accounting.block_rejections(block, spans, checks, _LAYOUT)
    line_index = spans.line_index
    if not keep.all():
        starts, ends, label_byte, ints, present = starts[keep], ends[keep], label_byte[keep], ints[keep], present[keep]
        line_index = line_index[keep]
    ids = fingerprint_spans(CAT_FIELDS, words, starts[:, 1 + len(INT_FIELDS) :], ends[:, 1 + len(INT_FIELDS) :])
    if int_buckets:
        ids = np.concatenate([ids, bucket_ids(ints, present)], axis=1)
    if lines_per_day:
        days = (block.first_line - 1 + line_index) // lines_per_day
    else:
        days = np.full(len(line_index), day, np.int64)
    rows = rows_lib.Rows(
        label=(label_byte == ord("1")).astype(np.float32),
        dense=np.log1p(np.maximum(ints, 0).astype(np.float32)),
        ids=ids,
        day=days,
    )
    return rows, rejections


def parse_lines(
    lines: tf.Tensor, *, source: str = "<memory>", first_line: int = 1, int_buckets: bool = False
) -> dict[str, np.ndarray]:
    """Parses a batch of raw lines into a host batch (see :mod:`ctr.data.schema`).

    Args:
      lines: ``[N]`` tf.string, one raw line each (no trailing newline).
      source: file name used in error messages.
      first_line: 1-based line number of ``lines[0]`` in ``source``.
      int_buckets: also emit the ``I<k>_bucket`` categorical features.

    Returns:
      ``label [N]`` float32, ``dense [N, 13]`` float32, one ``[N]`` int64 id array per categorical feature.

    Raises:
      ParseError: naming the file, line and field of the first row that does not fit the layout.
    """
    values = lines.numpy().tolist()
    data = b"".join(line + b"\n" for line in values)
    block = raw.Block(source, np.frombuffer(data, np.uint8), first_line, len(values), False, len(data))
    rows, rejections = parse_block(block, int_buckets)
    row_accounting.RowAccounting(max_bad_rows=0).reject(NAME, source, rejections)
    return rows_lib.to_batch(feature_schema(int_buckets), rows.arrays())


def int_bucket_values(ints: np.ndarray) -> np.ndarray:
    """BARS integer buckets: ``floor(ln(x)^2)`` for x > 2, ``x`` itself otherwise (int64, same shape)."""
    x = ints.astype(np.float64)
    return np.where(ints > 2, np.floor(np.log(np.maximum(x, 1.0)) ** 2), x).astype(np.int64)


def int_bucket_strings_tf(ints: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """The raw string of each ``I<k>_bucket`` value in TensorFlow (for serving): the bucket in decimal, or the
    empty string where the integer is missing. ``fingerprint(bucket_field(f), ...)`` of it is the id.

    Not a second evaluation of ``floor(ln(x)^2)``: TensorFlow's ``log`` differs from numpy's in the last bit,
    which moves ~0.5% of values next to a bucket edge. The bucket of ``x > 2`` is the number of
    :func:`bucket_edges` at or below it, edges found from :func:`int_bucket_values` itself.
    """
    tf = tf_import.tensorflow()  # serving-side; the readers are numpy only

    ints = tf.cast(ints, tf.int64)
    edges = tf.constant(bucket_edges()[None, :])
    flat = tf.reshape(ints, [1, -1])
    counted = tf.reshape(tf.searchsorted(edges, flat, side="right", out_type=tf.int64), tf.shape(ints))
    bucket = tf.where(ints > 2, counted, ints)
    return tf.where(present, tf.strings.as_string(bucket), "")


@functools.lru_cache(maxsize=None)
def bucket_edges() -> np.ndarray:
    """``[K]`` int64: edge ``k - 1`` is the smallest ``x > 2`` with ``int_bucket_values(x) >= k`` (``k = 1..K``,
    ``K`` the bucket of the largest int64), found by bisection on :func:`int_bucket_values`, which is
    non-decreasing for ``x > 2`` and steps by at most 1, so the bucket of ``x > 2`` is the count of edges
    ``<= x``."""
    top = int(int_bucket_values(np.array([2**63 - 1]))[0])
    k = np.arange(1, top + 1)
    lo = np.full(len(k), 3, np.int64)  # invariant: the edge lies in [lo, hi]
    hi = np.full(len(k), 2**63 - 1, np.int64)
    while np.any(lo < hi):
        mid = lo + (hi - lo) // 2
        reached = int_bucket_values(mid) >= k
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid + 1)
    return lo


def bucket_ids(ints: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``[n, 13]`` ids of the ``I<k>_bucket`` features of ``[n, 13]`` integers (missing where not present)."""
    table = _bucket_table()
    column = int_bucket_values(ints) - _BUCKET_LOW
    in_table = (column >= 0) & (column <= _BUCKET_HIGH - _BUCKET_LOW)
    column = np.where(present & in_table, column, table.shape[1] - 1)
    ids = np.empty(ints.shape, np.int64)
    for j in range(len(INT_FIELDS)):
        ids[:, j] = table[j][column[:, j]]
    for row, j in zip(*np.nonzero(present & ~in_table)):
        bucket = str(int(int_bucket_values(ints[row, j])))
        ids[row, j] = fingerprint_strings(bucket_field(INT_FIELDS[j]), [bucket])[0]
    return ids


@functools.lru_cache(maxsize=None)
def _bucket_table() -> np.ndarray:
    """``[13, B + 1]`` ids: bucket ``b`` of feature ``I<k>_bucket`` at column ``b - _BUCKET_LOW``; the last
    column is the missing value."""
    values = [str(b) for b in range(_BUCKET_LOW, _BUCKET_HIGH + 1)] + [""]
    return np.stack([fingerprint_strings(bucket_field(f), values) for f in INT_FIELDS])
