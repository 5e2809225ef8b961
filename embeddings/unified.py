"""Unified Embedding (Coleman et al. 2023, "Unified Embedding: Battle-Tested Feature Representations for
Web-Scale ML Systems"): many features multiplexed onto a few shared tables.

Layout. The family owns ``num_tables`` backend tables of ``rows x dim_per_chunk``. A feature of width ``d``
takes ``d / dim_per_chunk`` chunk lookups; chunk ``c`` of feature ``f`` hashes the fingerprint with its own
salt ``salt(f, c)`` into a backend table and the chunks' rows are concatenated (the paper's multi-probe,
variable-length form). Chunks are dealt round-robin over the tables in feature order, so lookups spread evenly
(table of the ``j``-th chunk overall = ``j mod num_tables``). Because every (feature, chunk) has its own salt,
two features that share a table collide only at random, and the two chunks of one feature are independent
probes: a value is confused with another only if all its chunks collide.

Budget. ``budget_bytes`` (float32 parameters) or ``budget_rows`` (rows of width ``dim_per_chunk``, over all
tables) sizes the tables: each gets ``budget_rows // num_tables`` rows, rounded down to the row alignment, so
the family never exceeds its budget.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import gin

from embeddings import hashing
from embeddings.specs import FeatureSpec
from embeddings.tables import Lookup, TableConfig, TablePart

BYTES_PER_PARAM = 4  # float32 tables


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Unified:
    """The Unified Embedding family.

    Attributes:
      budget_bytes: float32 table bytes over all backend tables (give this or ``budget_rows``).
      budget_rows: rows over all backend tables.
      num_tables: backend tables (a few, for placement: each is sharded on its own).
      dim_per_chunk: width of one lookup; every feature's width must be a multiple of it.
      init_scale: uniform initialisation range (+-).
    """

    budget_bytes: int | None = None
    budget_rows: int | None = None
    num_tables: int = 1
    dim_per_chunk: int = 8
    init_scale: float = 0.05

    def rows_per_table(self, row_alignment: int) -> int:
        if (self.budget_bytes is None) == (self.budget_rows is None):
            raise ValueError("Unified needs exactly one of budget_bytes and budget_rows")
        total = self.budget_rows
        if total is None:
            total = self.budget_bytes // (BYTES_PER_PARAM * self.dim_per_chunk)
        rows = total // self.num_tables // row_alignment * row_alignment
        if rows == 0:
            raise ValueError(
                f"Unified budget of {total} rows is too small for {self.num_tables} tables of at least "
                f"{row_alignment} rows (the row alignment)"
            )
        return rows

    def build(self, key: str, specs: Sequence[FeatureSpec], row_alignment: int) -> TablePart:
        rows = self.rows_per_table(row_alignment)
        tables = tuple(
            TableConfig(f"{key}_{t}", rows, self.dim_per_chunk, self.init_scale) for t in range(self.num_tables)
        )
        lookups, outputs = [], []
        dealt = 0  # chunks dealt so far: the next one goes to table ``dealt % num_tables``
        for spec in specs:
            if spec.dim % self.dim_per_chunk:
                raise ValueError(
                    f"feature {spec.name!r}: width {spec.dim} is not a multiple of dim_per_chunk {self.dim_per_chunk}"
                )
            chunks = spec.dim // self.dim_per_chunk
            chunk_tables = [tables[(dealt + c) % self.num_tables].name for c in range(chunks)]
            dealt += chunks
            for source in spec.inputs:
                keys = tuple(f"{source}#{c}" for c in range(chunks))
                for c, (lk_key, table) in enumerate(zip(keys, chunk_tables)):
                    lookups.append(Lookup(lk_key, source, table, 0, rows, hashing.salt(spec.name, c)))
                outputs.append((source, keys))
        return TablePart(family=key, tables=tables, lookups=tuple(lookups), outputs=tuple(outputs))
