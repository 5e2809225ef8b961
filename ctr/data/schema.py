"""The schema every dataset module declares, and the batch layout that follows from it.

A host batch is a flat dict of numpy arrays (the device batch has the same keys):

- ``label``: ``[B]`` float32, 0 or 1.
- ``dense``: ``[B, n_dense]`` float32 (absent when the dataset has no dense features).
- one ``[B]`` int64 array per categorical feature: a 63-bit non-negative fingerprint of (field, raw value)
  (see :mod:`ctr.data.fingerprint`); a missing value is the fingerprint of the empty string.
- per sequence feature: ``[B, L]`` int64 fingerprints plus ``<name>_mask`` ``[B, L]`` bool (True = real event).
  Events run oldest to newest and are right-aligned: the most recent is at ``L - 1``, padding (id 0) on the left.
- ``group`` ``[B]`` int64 when the schema has a group key (gAUC groups, e.g. the TaobaoAds user).
"""
from __future__ import annotations

import dataclasses

LABEL = "label"
DENSE = "dense"
GROUP = "group"
MASK_SUFFIX = "_mask"


@dataclasses.dataclass(frozen=True)
class SequenceFeature:
    """A behaviour sequence, e.g. TaobaoAds ``cate_his``.

    Attributes:
      name: batch key of the ``[B, L]`` ids.
      item_feature: the categorical feature whose embedding the sequence shares (e.g. ``cate_id``), or None
        for a sequence with its own vocabulary (e.g. ``btag_his``).
      max_len: L, the number of most recent events kept (older ones are dropped, shorter ones padded).
    """

    name: str
    item_feature: str | None
    max_len: int

    @property
    def mask_key(self) -> str:
        return self.name + MASK_SUFFIX


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """Names and kinds of one dataset's features.

    Attributes:
      name: dataset name (``criteo``, ``avazu``, ``taobao``).
      dense: names of the dense features, in the column order of ``batch["dense"]``.
      categorical: names of the single-valued categorical features (one ``[B]`` id array each).
      sequences: behaviour sequences.
      group_key: the raw field whose value forms the gAUC groups, or None.
    """

    name: str
    dense: tuple[str, ...]
    categorical: tuple[str, ...]
    sequences: tuple[SequenceFeature, ...] = ()
    group_key: str | None = None

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    def batch_keys(self) -> tuple[str, ...]:
        """Every key of a batch of this schema, in a fixed order."""
        keys = [LABEL]
        if self.dense:
            keys.append(DENSE)
        keys.extend(self.categorical)
        for seq in self.sequences:
            keys.extend((seq.name, seq.mask_key))
        if self.group_key is not None:
            keys.append(GROUP)
        return tuple(keys)
