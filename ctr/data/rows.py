"""Parsed examples in storage form (row-major arrays), and their conversion to batches.

Readers produce :class:`Rows`, prepare writes their arrays to shards, the prepared dataset gathers rows of
them back and :func:`to_batch` turns them into the batch layout of :mod:`ctr.data.schema`. Row-major arrays
(one ``[n, n_categorical]`` id matrix rather than one array per feature) make a random row one contiguous
read, which is what a shuffled input pipeline does all day.

Sequences: every sequence feature of a dataset is one view of the same event history (TaobaoAds: the
cate, brand and btag of each behaviour), so they share ``L`` and one length per row. Events are oldest to
newest and right-aligned: the most recent real event is at position ``L - 1``; padding (mask False, id 0) is
on the left.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ctr.data import schema as schema_lib

Batch = dict[str, np.ndarray]
# Arrays prepare stores per row (``day`` only drives the split and is not stored).
STORED = ("label", "dense", "ids", "seq", "seq_len", "group")


@dataclasses.dataclass
class Rows:
    """``n`` examples.

    Attributes:
      label: ``[n]`` float32, 0 or 1.
      dense: ``[n, n_dense]`` float32 (``n_dense`` may be 0).
      ids: ``[n, n_categorical]`` int64 fingerprints, columns in ``schema.categorical`` order.
      day: ``[n]`` int64 time key for time-ordered splits (a date as YYYYMMDD, or a file/day index).
      seq: ``[n, n_sequences, L]`` int64 event ids (schema order), or None.
      seq_len: ``[n]`` int32 real events per row (<= L), or None.
      group: ``[n]`` int64 gAUC group (e.g. the user), or None.
    """

    label: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    day: np.ndarray
    seq: np.ndarray | None = None
    seq_len: np.ndarray | None = None
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays that are present, by name."""
        return {name: getattr(self, name) for name in STORED if getattr(self, name) is not None}

    def take(self, index: np.ndarray) -> "Rows":
        return Rows(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                       for f in dataclasses.fields(self)})

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        if not parts:
            raise ValueError("no rows")
        return Rows(**{f.name: None if getattr(parts[0], f.name) is None
                       else np.concatenate([getattr(p, f.name) for p in parts])
                       for f in dataclasses.fields(Rows)})


def sequence_mask(seq_len: np.ndarray, max_len: int) -> np.ndarray:
    """``[n, L]`` bool, True at the ``seq_len`` right-most positions (the real events)."""
    return np.arange(max_len) >= (max_len - np.asarray(seq_len))[:, None]


def to_batch(schema: schema_lib.FeatureSchema, arrays: dict[str, np.ndarray]) -> Batch:
    """The batch layout of :mod:`ctr.data.schema` from stored arrays (``label``, ``dense``, ``ids``...).

    Every array of the result is C-contiguous (one transpose of the id matrix, not one strided copy per
    feature).
    """
    batch: Batch = {schema_lib.LABEL: np.asarray(arrays["label"], np.float32)}
    if schema.dense:
        batch[schema_lib.DENSE] = arrays["dense"]
    ids_by_feature = np.ascontiguousarray(arrays["ids"].T)
    for j, name in enumerate(schema.categorical):
        batch[name] = ids_by_feature[j]
    if schema.sequences:
        mask = sequence_mask(arrays["seq_len"], schema.sequences[0].max_len)
        for s, seq in enumerate(schema.sequences):
            batch[seq.name] = np.ascontiguousarray(arrays["seq"][:, s])
            batch[seq.mask_key] = mask
    if schema.group_key is not None:
        batch[schema_lib.GROUP] = arrays["group"]
    return batch
