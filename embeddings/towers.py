"""Per-tower embeddings for ensembles whose towers own their tables (CETNet).

CETNet's towers are meant to see the data through *different* embeddings (e.g. a Unified Embedding tower and
a DHE tower), so their errors decorrelate. :func:`tower_collections` builds one
:class:`~embeddings.collection.EmbeddingCollection` per tower and presents them to the trainer as one
collection: table and lookup names get a ``"<tower>/"`` prefix, every tower's tables are sharded and updated
like any other, and ``combine`` returns ``ModelInputs`` whose ``towers[name]`` holds that tower's inputs
(the ensemble reads only those). In gin, each tower's collection is a scoped ``build_collection``::

    train.embedding_fn = @tower_collections
    tower_collections.towers = {"interformer": @interformer/build_collection, "dhen": @dhen/build_collection}
    interformer/build_collection.families = {"unified": @Unified()}
    dhen/build_collection.families = {"dhe": @DeepHashEmbedding()}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ctr.data import schema as schema_lib
from ctr.model_io import ModelInputs
from embeddings import sparse_optim
from embeddings.collection import EmbeddingCollection
from embeddings.tables import TableConfig

SEP = "/"


class _TowerEmbedding(nn.Module):
    """Runs one tower's ``combine`` in its own Flax scope, so same-named DHE networks of two towers differ."""

    collection: EmbeddingCollection

    @nn.compact
    def __call__(self, rows: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> ModelInputs:
        return self.collection.combine(rows, batch)


@dataclasses.dataclass(frozen=True)
class TowerCollections:
    """Several towers' collections behind the :class:`~embeddings.collection.Embeddings` contract the trainer uses.

    Attributes:
      schema: the dataset schema (shared by every tower).
      towers: ``(tower name, collection)`` pairs, in the ensemble's tower order.
    """

    schema: schema_lib.FeatureSchema
    towers: tuple[tuple[str, EmbeddingCollection], ...]

    def __post_init__(self):
        for name, _ in self.towers:
            if not name or SEP in name:
                raise ValueError(f"tower names must be non-empty and contain no {SEP!r}, got {name!r}")

    @property
    def tables(self) -> dict[str, TableConfig]:
        return {f"{t}{SEP}{k}": v for t, c in self.towers for k, v in c.tables.items()}

    def with_mesh(self, mesh: Mesh, row_axes: Sequence[str] | None = None) -> TowerCollections:
        return dataclasses.replace(self, towers=tuple((t, c.with_mesh(mesh, row_axes)) for t, c in self.towers))

    def table_shardings(self) -> dict[str, NamedSharding]:
        return self._merge(c.table_shardings() for _, c in self.towers)

    def slot_shardings(self, slots: Any) -> Any:
        return self._merge(c.slot_shardings(part) for (_, c), part in zip(self.towers, self._split(slots)))

    def host_ids(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._merge(c.host_ids(batch) for _, c in self.towers)

    def host_ids_tf(self, batch: Mapping[str, Any], index_tables: Mapping[str, Any]) -> dict[str, Any]:
        return self._merge(c.host_ids_tf(batch, t) for (_, c), t in zip(self.towers, self._split(index_tables)))

    def index_tables_tf(self, make_table: Callable[[np.ndarray], Any]) -> dict[str, Any]:
        return self._merge(c.index_tables_tf(make_table) for _, c in self.towers)

    def init(self, rng: jax.Array) -> dict[str, jax.Array]:
        keys = jax.random.split(rng, len(self.towers))
        return self._merge(c.init(k) for (_, c), k in zip(self.towers, keys))

    def read_rows(self, tables: Mapping[str, jax.Array], ids: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return self._merge(
            c.read_rows(t, i) for (_, c), t, i in zip(self.towers, self._split(tables), self._split(ids))
        )

    def combine(self, rows: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> ModelInputs:
        """``ModelInputs`` with only ``towers`` (and the shared dense features) set; call inside ``@nn.compact``."""
        per_tower = {
            name: _TowerEmbedding(c, name=f"{name}_embedding")(r, batch)
            for (name, c), r in zip(self.towers, self._split(rows))
        }
        return ModelInputs(
            features={}, dense=batch.get(schema_lib.DENSE), sequences={}, masks={}, towers=per_tower
        )

    def sparse_update(self, tables, slots, ids, row_grads, optimizer: sparse_optim.SparseOptimizer, step):
        updated = [
            c.sparse_update(t, s, i, g, optimizer, step)
            for (_, c), t, s, i, g in zip(
                self.towers, self._split(tables), self._split(slots), self._split(ids), self._split(row_grads)
            )
        ]
        return self._merge(t for t, _ in updated), self._merge(s for _, s in updated)

    def flush(self, tables, slots, optimizer: sparse_optim.SparseOptimizer, step):
        flushed = [
            c.flush(t, s, optimizer, step) for (_, c), t, s in zip(self.towers, self._split(tables), self._split(slots))
        ]
        return self._merge(t for t, _ in flushed), self._merge(s for _, s in flushed)

    def num_parameters(self) -> int:
        return sum(c.num_parameters() for _, c in self.towers)

    def parameter_bytes(self) -> int:
        return sum(c.parameter_bytes() for _, c in self.towers)

    # -- names ---------------------------------------------------------------------------------------------------
    def _merge(self, per_tower) -> dict[str, Any]:
        """Tower-local dicts (in tower order) -> one dict with ``"<tower>/"`` prefixed keys."""
        return {f"{t}{SEP}{k}": v for (t, _), d in zip(self.towers, per_tower) for k, v in d.items()}

    def _split(self, merged: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {t: {} for t, _ in self.towers}
        for key, value in merged.items():
            tower, _, local = key.partition(SEP)
            out[tower][local] = value
        return [out[t] for t, _ in self.towers]


@gin.configurable
def tower_collections(
    schema: schema_lib.FeatureSchema,
    towers: Mapping[str, Callable[[schema_lib.FeatureSchema], EmbeddingCollection]] = gin.REQUIRED,
) -> TowerCollections:
    """One embedding collection per ensemble tower (the trainer's ``embedding_fn`` for CETNet).

    Args:
      schema: dataset schema.
      towers: tower name (as in ``CETNet.towers``) -> collection builder, typically a scoped
        ``@<tower>/build_collection``.
    """
    return TowerCollections(schema, tuple((name, build(schema)) for name, build in towers.items()))
