"""Vocabularies with a minimum count: rare values of a feature share one out-of-vocabulary (OOV) id.

Ids stay fingerprints (:mod:`ctr.data.fingerprint`), so every embedding family works unchanged: a value seen
at least ``min_count`` times in the train split keeps its own fingerprint, every other value becomes
``fingerprint(feature, OOV_VALUE)``. A vocabulary indexes a per-feature table exactly (:func:`index`: row ``i``
for the ``i``-th kept value, one OOV row after them; ``embeddings.per_feature.PerFeature(vocabularies=...)``),
and the exported model applies the same mappings with :meth:`Vocabulary.apply_tf` and :func:`index_tf`.

A sequence that shares an item feature's embedding (``cate_his`` -> ``cate_id``) shares its vocabulary, and
its events count towards it; a sequence with its own ids (``btag_his``) has its own vocabulary.

Counting is exact and streaming: per chunk, ``np.unique`` counts per feature are merged into a sorted
(value, count) pair of arrays. Memory is ~16 bytes per distinct value (Criteo Kaggle: ~33M distinct values
over its 26 features, ~0.5 GiB, plus the same again while merging).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np

from ctr import paths, tf_import
from ctr.data import schema as schema_lib
from ctr.data.fingerprint import fingerprint_strings

OOV_VALUE = "\x00<oov>"  # a raw value no dataset contains (NUL never occurs in its text)
_DIR = "vocab"


def vocab_features(schema: schema_lib.FeatureSchema) -> dict[str, str]:
    """Batch key -> the vocabulary it uses: each categorical feature its own, each sequence its item
    feature's (or its own)."""
    features = {name: name for name in schema.categorical}
    for seq in schema.sequences:
        features[seq.name] = seq.item_feature or seq.name
    return features


def index(kept: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each id in a table indexed by vocabulary position: ``i`` for ``kept[i]`` (``kept`` sorted int64
    fingerprints), ``len(kept)`` (the OOV row) for every other id. int64, same shape as ``ids``."""
    ids = np.asarray(ids, np.int64)
    if not len(kept):
        return np.zeros(ids.shape, np.int64)
    pos = np.minimum(np.searchsorted(kept, ids), len(kept) - 1)
    return np.where(kept[pos] == ids, pos, len(kept))


def index_table_tf(kept: np.ndarray, path: str | None = None) -> Any:
    """A TensorFlow static hash table from each kept fingerprint to its position, ``len(kept)`` for any other.

    Build it once per vocabulary (an exported model tracks it as a resource). With ``path``, the fingerprints
    are written there (one decimal per line) and the table reads that file, which a SavedModel keeps as an
    asset; without, they are a constant of the graph (which caps a SavedModel at 2 GB of protobuf).
    """
    tf = tf_import.tensorflow()  # only serving needs TF here

    kept = np.asarray(kept, np.int64)
    default = len(kept)
    if not len(kept):  # TF refuses an empty table: one key no fingerprint has (they are >= 0), at position 0
        kept = np.array([-1], np.int64)
    if path is None:
        keys = tf.constant(kept, tf.int64)
        positions = tf.range(len(kept), dtype=tf.int64)
        return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, positions), default)
    np.savetxt(path, kept, fmt="%d")
    initializer = tf.lookup.TextFileInitializer(
        path, tf.int64, 0, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, delimiter="\t"
    )
    return tf.lookup.StaticHashTable(initializer, default)


def index_tf(kept: np.ndarray, ids: Any, table: Any = None) -> Any:
    """TensorFlow twin of :func:`index`, through ``table`` (:func:`index_table_tf` of ``kept``; built here
    when not given)."""
    import tensorflow as tf

    table = index_table_tf(kept) if table is None else table
    return table.lookup(tf.cast(ids, tf.int64))


class Counter:
    """Exact streaming counts of ids per vocabulary."""

    def __init__(self, names: list[str]):
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._merged: dict[str, tuple[np.ndarray, np.ndarray]] = {n: empty for n in names}
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}

    def add(self, name: str, ids: np.ndarray) -> None:
        keys, counts = np.unique(ids, return_counts=True)
        self._pending[name].append((keys, counts))
        pending = sum(len(k) for k, _ in self._pending[name])
        if pending > max(len(self._merged[name][0]), 1 << 20):  # amortised: merged size at least doubles
            self._merge(name)

    def counts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct ids and their counts."""
        self._merge(name)
        return self._merged[name]

    def _merge(self, name: str) -> None:
        if not self._pending[name]:
            return
        keys = np.concatenate([self._merged[name][0]] + [k for k, _ in self._pending[name]])
        counts = np.concatenate([self._merged[name][1]] + [c for _, c in self._pending[name]])
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, bool)
        starts = np.flatnonzero(first)
        self._merged[name] = (keys[starts], np.add.reduceat(counts, starts) if len(starts) else counts[:0])
        self._pending[name] = []


@dataclasses.dataclass
class Vocabulary:
    """Kept values per vocabulary.

    Attributes:
      min_count: a value is kept when seen at least this often in the train split.
      kept: vocabulary name -> sorted int64 fingerprints of the kept values.
    """

    min_count: int
    kept: dict[str, np.ndarray]

    @staticmethod
    def from_counter(counter: Counter, names: list[str], min_count: int) -> "Vocabulary":
        kept = {}
        for name in names:
            keys, counts = counter.counts(name)
            kept[name] = keys[counts >= min_count]
        return Vocabulary(min_count, kept)

    def oov_id(self, name: str) -> int:
        return int(fingerprint_strings(name, [OOV_VALUE])[0])

    def sizes(self) -> dict[str, int]:
        """Vocabulary name -> table rows it needs (kept values + 1 OOV row)."""
        return {name: len(values) + 1 for name, values in self.kept.items()}

    def apply(self, name: str, ids: np.ndarray) -> np.ndarray:
        """``ids`` (any shape) with every value outside the vocabulary replaced by the OOV id."""
        kept = self.kept[name]
        if not len(kept):
            return np.full_like(ids, self.oov_id(name))
        pos = np.minimum(np.searchsorted(kept, ids), len(kept) - 1)
        return np.where(kept[pos] == ids, ids, self.oov_id(name))

    def apply_tf(self, name: str, ids: Any, table: Any = None) -> Any:
        """TensorFlow twin of :meth:`apply` for the exported model, through ``table``:
        :func:`index_table_tf` of ``kept[name]`` (built here when not given)."""
        tf = tf_import.tensorflow()  # only serving needs TF here

        ids = tf.cast(ids, tf.int64)
        kept = len(self.kept[name])
        return tf.where(index_tf(self.kept[name], ids, table) < kept, ids, tf.constant(self.oov_id(name), tf.int64))

    def save(self, out_dir: str) -> None:
        os.makedirs(os.path.join(out_dir, _DIR), exist_ok=True)
        for name, values in self.kept.items():
            np.save(os.path.join(out_dir, _DIR, f"{name}.npy"), values)
        info = {"min_count": self.min_count, "sizes": self.sizes(), "oov_value": OOV_VALUE}
        with open(os.path.join(out_dir, _DIR, "vocab.json"), "w") as f:
            json.dump(info, f, indent=1)

    @staticmethod
    def load(data_dir: str) -> "Vocabulary":
        """The vocabulary :meth:`save` wrote into ``data_dir`` (local or remote).

        Raises:
          OSError: a file is missing or unreadable.
          ValueError: a ``.npy`` file's kept values disagree with the size ``vocab.json`` records (kept + OOV).
        """
        info = json.loads(paths.read_text(paths.join(data_dir, _DIR, "vocab.json")))
        kept = {name: np.load(io.BytesIO(paths.read_bytes(paths.join(data_dir, _DIR, f"{name}.npy"))))
                for name in info["sizes"]}
        for name, values in kept.items():
            if len(values) + 1 != info["sizes"][name]:
                raise ValueError(f"{paths.join(data_dir, _DIR, name + '.npy')}: {len(values)} kept values, vocab.json "
                                 f"says {info['sizes'][name]} rows (kept + OOV)")  # fmt: skip
        return Vocabulary(info["min_count"], kept)
