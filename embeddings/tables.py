"""Table-backed embeddings: tables, the lookups that read them, and the part that turns rows into vectors.

The per-feature / hashing-trick family (:mod:`embeddings.per_feature`) and Unified Embedding
(:mod:`embeddings.unified`) differ only in how they lay lookups onto tables, so both build a :class:`TablePart`.

Numerics: tables are float32, initialised uniform in ``[-init_scale, init_scale]`` (0.05 by default, the
classic small-uniform embedding init: features start nearly orthogonal and small next to the dense inputs).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctr.data import vocab as vocab_lib
from embeddings import hashing


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """One (possibly stacked) table: ``num_rows x dim`` float32, uniform in ``[-init_scale, init_scale]``."""

    name: str
    num_rows: int
    dim: int
    init_scale: float = 0.05

    def init(self, rng: jax.Array) -> jax.Array:
        return jax.random.uniform(rng, (self.num_rows, self.dim), jnp.float32, -self.init_scale, self.init_scale)


@dataclasses.dataclass(frozen=True)
class Lookup:
    """One int32 id array of the device batch and the table rows it reads.

    A fingerprint ``fp`` of batch key ``source`` reads row ``offset + bucket(fp, salt, num_buckets)`` of
    ``table`` (see :mod:`embeddings.hashing`), or, with a ``vocabulary``, row ``offset + index(fp)``: its
    position among the kept values, the OOV row ``len(vocabulary)`` for any other (:func:`ctr.data.vocab.index`).

    Attributes:
      key: key of the row-index array in the ids dict (and of its rows in the rows dict).
      source: batch key of the fingerprints (a categorical feature or a sequence feature).
      table: table name.
      offset: first row of this lookup's slice of the table (0 when the whole table is shared).
      num_buckets: rows in that slice.
      salt: 64-bit hash salt (:func:`embeddings.hashing.salt`).
      vocabulary: sorted int64 fingerprints of the kept values (``num_buckets == len(vocabulary) + 1``), or None
        for the bucket hash.
    """

    key: str
    source: str
    table: str
    offset: int
    num_buckets: int
    salt: int
    vocabulary: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.vocabulary is not None and self.num_buckets != len(self.vocabulary) + 1:
            raise ValueError(f"lookup {self.key}: {self.num_buckets} rows for a vocabulary of {len(self.vocabulary)}")

    def host_rows(self, fingerprints: np.ndarray) -> np.ndarray:
        """Row indices, int32, same shape as ``fingerprints``."""
        if self.vocabulary is not None:
            rows = vocab_lib.index(self.vocabulary, fingerprints)
        else:
            rows = hashing.bucket_np(fingerprints, self.salt, self.num_buckets)
        return (rows + self.offset).astype(np.int32)

    def host_rows_tf(self, fingerprints: Any, index_table: Any = None) -> Any:
        """TensorFlow twin of :meth:`host_rows` (the exported model's preprocessing): int32, same shape.

        ``index_table``: ``vocab.index_table_tf(self.vocabulary)``, built once by the caller (a resource the
        SavedModel tracks); required with a vocabulary.
        """
        import tensorflow as tf  # only the export path needs TF

        if self.vocabulary is not None:
            rows = vocab_lib.index_tf(self.vocabulary, fingerprints, index_table)
        else:
            rows = hashing.bucket_tf(fingerprints, self.salt, self.num_buckets)
        return tf.cast(rows + self.offset, tf.int32)


def align_rows(num_rows: int, alignment: int) -> int:
    """``num_rows`` rounded up to a multiple of ``alignment`` (so tables split evenly over any device count
    dividing it; the extra rows are never addressed)."""
    return -(-num_rows // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class TablePart:
    """The features one table family serves.

    Attributes:
      family: the family's key in the collection config.
      tables: its tables.
      lookups: its lookups (a feature may take several: Unified Embedding chunks).
      outputs: ``(batch key, lookup keys)`` pairs: the embedding of a batch key is its lookups' rows
        concatenated in this order along the last axis.
    """

    family: str
    tables: tuple[TableConfig, ...]
    lookups: tuple[Lookup, ...]
    outputs: tuple[tuple[str, tuple[str, ...]], ...]

    def host_ids(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {lk.key: lk.host_rows(batch[lk.source]) for lk in self.lookups}

    def host_ids_tf(self, batch: Mapping[str, Any], index_tables: Mapping[str, Any]) -> dict[str, Any]:
        """TensorFlow twin of :meth:`host_ids`; ``index_tables``: lookup key -> its vocabulary's table."""
        return {lk.key: lk.host_rows_tf(batch[lk.source], index_tables.get(lk.key)) for lk in self.lookups}

    def encode(self, ids: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {}  # rows come from the tables (the collection gathers them)

    def embed(self, rows: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``{batch key: [*ids.shape, dim]}`` from the gathered rows."""
        return {
            name: rows[keys[0]] if len(keys) == 1 else jnp.concatenate([rows[k] for k in keys], axis=-1)
            for name, keys in self.outputs
        }

    def num_parameters(self) -> int:
        return sum(t.num_rows * t.dim for t in self.tables)
