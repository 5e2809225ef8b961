"""Per-feature tables and the hashing trick: each feature owns a slice of rows.

A feature with a vocabulary (``vocabularies``, e.g. ``@vocabularies()`` of a prepared dataset) gets the classic
per-feature table: one row per kept value plus one OOV row, indexed by vocabulary position, no collisions. A
feature without one, or whose table is made smaller than its vocabulary (``buckets_per_feature``,
``budget_bytes``), is indexed by a salted hash: the hashing trick (the build logs which features those are). A ``budget_bytes`` scales every feature's bucket count by the same factor,
so "the hashing trick at 1/4 of the full tables" is the full per-feature config plus a budget. Features of
equal width are stored stacked in one table (each at its own row offset), so a step does one gather and one
sparse update per width, as TPU embedding engines do; this changes no result.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import gin
import numpy as np

from ctr.data import schema as schema_lib
from embeddings import hashing
from embeddings.collection import EmbeddingCollection
from embeddings.specs import FeatureSpec, build_collection
from embeddings.tables import Lookup, TableConfig, TablePart, align_rows

BYTES_PER_PARAM = 4  # float32 tables


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PerFeature:
    """The per-feature / hashing-trick family.

    Attributes:
      num_buckets: rows of a feature not named in ``buckets_per_feature``.
      buckets_per_feature: per-feature bucket counts (e.g. vocabulary sizes), as ``((name, rows), ...)`` or a
        dict in gin.
      budget_bytes: if set, every feature's rows are scaled by one factor (<= 1) so that the tables, alignment
        padding included, take at most this many bytes of float32 parameters.
      init_scale: uniform initialisation range (+-).
      vocabularies: feature -> sorted int64 fingerprints of its kept values; such a feature's rows default to
        ``len(vocabulary) + 1`` and are indexed by position.
    """

    num_buckets: int = 100_000
    buckets_per_feature: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    budget_bytes: int | None = None
    init_scale: float = 0.05
    vocabularies: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, compare=False, repr=False)

    def build(self, key: str, specs: Sequence[FeatureSpec], row_alignment: int) -> TablePart:
        overrides = dict(self.buckets_per_feature)
        vocabularies = dict(self.vocabularies or {})
        served = {s.name for s in specs}
        for what, names in (("buckets_per_feature", overrides), ("vocabularies", vocabularies)):
            unknown = set(names) - served
            if unknown:
                raise ValueError(f"{what} of family {key!r} names features it does not serve: {sorted(unknown)}")
        rows = {
            s.name: overrides.get(s.name, len(vocabularies[s.name]) + 1 if s.name in vocabularies else self.num_buckets)
            for s in specs
        }
        dims = sorted({s.dim for s in specs})
        if self.budget_bytes is not None:
            padding = len(dims) * (row_alignment - 1) * max(dims) * BYTES_PER_PARAM
            full = sum(rows[s.name] * s.dim for s in specs) * BYTES_PER_PARAM
            scale = min(1.0, (self.budget_bytes - padding) / full)
            if scale <= 0:
                raise ValueError(f"family {key!r}: budget {self.budget_bytes} B is below the alignment padding")
            rows = {name: max(1, math.floor(r * scale)) for name, r in rows.items()}
        # A vocabulary indexes its table only when the table has a row for every kept value and OOV.
        exact = {n: v for n, v in vocabularies.items() if rows[n] >= len(v) + 1}
        rows.update({n: len(v) + 1 for n, v in exact.items()})
        hashed = sorted(set(vocabularies) - set(exact))
        if hashed:
            logging.info(
                "embedding family %r: %s hashed into fewer rows than their vocabulary (%s)", key, hashed,
                ", ".join(f"{n}: {rows[n]} < {len(vocabularies[n]) + 1}" for n in hashed),
            )

        tables, lookups, outputs = [], [], []
        for dim in dims:
            table = f"{key}_d{dim}"
            offset = 0
            for spec in (s for s in specs if s.dim == dim):
                lk_salt = hashing.salt(spec.name, 0)
                vocabulary = exact.get(spec.name)
                for source in spec.inputs:
                    lookups.append(Lookup(source, source, table, offset, rows[spec.name], lk_salt, vocabulary))
                    outputs.append((source, (source,)))
                offset += rows[spec.name]
            tables.append(TableConfig(table, align_rows(offset, row_alignment), dim, self.init_scale))
        return TablePart(family=key, tables=tuple(tables), lookups=tuple(lookups), outputs=tuple(outputs))


@gin.configurable
def per_feature_tables(
    schema: schema_lib.FeatureSchema,
    dim: int = 16,
    num_buckets: int = 100_000,
    buckets_per_feature: Mapping[str, int] | None = None,
    init_scale: float = 0.05,
    vocabularies: Mapping[str, np.ndarray] | None = None,
) -> EmbeddingCollection:
    """Shortcut for the one-family collection: every feature ``dim`` wide in a per-feature table.

    Same as :func:`embeddings.specs.build_collection` with ``families={"per_feature": PerFeature(...)}``.
    """
    family = PerFeature(num_buckets, tuple((buckets_per_feature or {}).items()), None, init_scale, vocabularies)
    return build_collection(schema, families={"per_feature": family}, default_dim=dim)
