"""The three passes of :mod:`ctr.prepare`: shuffle buckets, one shard per split and bucket, the vocabulary.

1. :func:`write_buckets`: every row into one of ``K`` temporary bucket files chosen by a hash of (seed, row
   ordinal), ``K`` sized so a bucket is about ``shard_bytes``.
2. :func:`write_shards`: per bucket, assign each row its split, count the train vocabulary, permute each split's
   rows (seeded) and write them as one shard per split.
3. :func:`apply_vocab`: rewrite every shard's rare ids to the OOV id in place.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ctr.data import raw, row_accounting, splits
from ctr.data import rows as rows_lib
from ctr.data import schema as schema_lib
from ctr.data import vocab as vocab_lib

_MAX_BUCKETS = 256  # open temporary files at once


class Bucket:
    """A temporary file of shuffled records (pass 1), and how many it holds."""

    def __init__(self, path: str):
        self.path, self.rows, self.file = path, 0, open(path, "wb")


def record_dtype(schema: schema_lib.FeatureSchema) -> np.dtype:
    """One row of ``schema`` as a fixed-width record (what the temporary buckets hold)."""
    fields = [("ordinal", "<i8"), ("day", "<i8"), ("label", "<f4"), ("dense", "<f4", (len(schema.dense),)),
              ("ids", "<i8", (len(schema.categorical),))]  # fmt: skip
    if schema.sequences:
        fields += [("seq", "<i8", (len(schema.sequences), schema.sequences[0].max_len)), ("seq_len", "<i4")]
    if schema.group_key is not None:
        fields.append(("group", "<i8"))
    return np.dtype(fields)


def write_buckets(
    source: raw.RawSource, seed: int, shard_bytes: int, tmp: str
) -> tuple[list[Bucket], tuple[int, int]]:
    """Pass 1: every row into a random temporary bucket; returns the buckets and the first and last day seen."""
    dtype = record_dtype(source.schema)
    count = int(np.clip(math.ceil(source.estimated_rows * dtype.itemsize / shard_bytes), 1, _MAX_BUCKETS))
    buckets = [Bucket(os.path.join(tmp, f"bucket-{k:05d}.bin")) for k in range(count)]
    ordinal, first_day, last_day = 0, None, -1
    try:
        for rows in source.rows:
            n = len(rows)
            records = np.empty(n, dtype)
            records["ordinal"] = np.arange(ordinal, ordinal + n)
            for name, values in {"day": rows.day, **rows.arrays()}.items():
                records[name] = values
            ordinal += n
            if n:
                last_day = max(last_day, int(rows.day.max()))
                first_day = min(first_day if first_day is not None else last_day, int(rows.day.min()))
            which = (splits.uniform(records["ordinal"], seed, stream=3) * count).astype(np.int64)
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(count + 1))
            for k in np.flatnonzero(np.diff(bounds)):
                records[order[bounds[k] : bounds[k + 1]]].tofile(buckets[k].file)
                buckets[k].rows += int(bounds[k + 1] - bounds[k])
    finally:
        for b in buckets:
            b.file.close()
    return buckets, (last_day if first_day is None else first_day, last_day)


def write_shards(
    schema: schema_lib.FeatureSchema,
    buckets: list[Bucket],
    spec: splits.SplitSpec,
    seed: int,
    last_day: int,
    out_dir: str,
    counter: vocab_lib.Counter | None,
    accounting: row_accounting.RowAccounting,
    emit: raw.Emit,
) -> dict[str, list[dict]]:
    """Pass 2: per bucket, split, count train vocabulary, permute, write one shard per split."""
    shards: dict[str, list[dict]] = {name: [] for name in splits.NAMES}
    progress = raw.Progress("writing shards", None, emit)
    vocab_of = vocab_lib.vocab_features(schema)
    for k, bucket in enumerate(buckets):
        records = np.fromfile(bucket.path, record_dtype(schema))
        os.remove(bucket.path)
        split = splits.assign(spec, records["day"], records["ordinal"], seed, last_day)
        for s, name in enumerate(splits.NAMES):
            part = records[split == s]
            if not len(part):
                continue
            part = part[np.random.default_rng([seed, k, s]).permutation(len(part))]
            if counter is not None and name == splits.TRAIN:
                _count(schema, vocab_of, counter, part)
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
            path = f"{name}/{k:05d}"
            for array in (a for a in rows_lib.STORED if a in part.dtype.names):
                np.save(os.path.join(out_dir, f"{path}.{array}.npy"), np.ascontiguousarray(part[array]))
            shards[name].append({"path": path, "rows": len(part)})
            accounting.write(name, len(part))
        progress.update(len(records))
    progress.done()
    return shards


def _count(
    schema: schema_lib.FeatureSchema, vocab_of: dict[str, str], counter: vocab_lib.Counter, part: np.ndarray
) -> None:
    for j, name in enumerate(schema.categorical):
        counter.add(vocab_of[name], part["ids"][:, j])
    if schema.sequences:
        real = rows_lib.sequence_mask(part["seq_len"], schema.sequences[0].max_len)
        for s, seq in enumerate(schema.sequences):
            counter.add(vocab_of[seq.name], part["seq"][:, s][real])


def apply_vocab(
    schema: schema_lib.FeatureSchema, vocab: vocab_lib.Vocabulary, out_dir: str, shards: dict[str, list[dict]],
    emit: raw.Emit,
) -> None:
    """Pass 3: rare ids -> OOV, in place, in every shard."""
    vocab_of = vocab_lib.vocab_features(schema)
    progress = raw.Progress("applying vocabulary", None, emit)
    for name in splits.NAMES:
        for shard in shards[name]:
            ids = np.load(os.path.join(out_dir, f"{shard['path']}.ids.npy"), mmap_mode="r+")
            for j, feature in enumerate(schema.categorical):
                ids[:, j] = vocab.apply(vocab_of[feature], ids[:, j])
            ids.flush()
            if schema.sequences:
                seq = np.load(os.path.join(out_dir, f"{shard['path']}.seq.npy"), mmap_mode="r+")
                seq_len = np.load(os.path.join(out_dir, f"{shard['path']}.seq_len.npy"))
                real = rows_lib.sequence_mask(seq_len, schema.sequences[0].max_len)
                for s, sequence in enumerate(schema.sequences):
                    seq[:, s] = np.where(real, vocab.apply(vocab_of[sequence.name], seq[:, s]), 0)
                seq.flush()
            progress.update(shard["rows"])
    progress.done()
