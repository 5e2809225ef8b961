"""An embedding collection: how a batch's feature ids become vectors, and how the tables learn.

A collection is built from gin feature specs (:func:`embeddings.specs.build_collection`) and composed of
*parts*, one per configured family: table parts (per-feature / hashing trick, Unified Embedding) and DHE parts
(hash encoding + MLP, no table). The path of one id, split so that autodiff never sees a whole table:

1. ``host_ids(batch)`` (numpy, input pipeline): 63-bit fingerprints -> one array per *lookup* (a feature may
   take several, e.g. Unified Embedding chunks). Table lookups give int32 row indices of the fingerprints'
   shape; DHE lookups give the fingerprint as ``uint32 [..., 2]`` words (JAX runs without int64).
2. ``read_rows(tables, ids)`` (device, outside differentiation): ``rows`` per lookup: table rows
   ``[*ids.shape, dim]`` (sharded lookups, see :mod:`embeddings.table_placement`), or for DHE the deterministic dense
   hash encoding ``[..., k]``.
3. ``combine(rows, batch)`` (device, differentiated, inside the model's Flax ``@nn.compact`` scope): rows ->
   per-feature vectors and sequence tensors; DHE's MLP is a Flax submodule created here, so its parameters
   are ordinary dense parameters trained by optax.
4. The train step differentiates the loss w.r.t. the rows and calls ``sparse_update``, which deduplicates each
   table's touched rows, sums their gradients and lets a sparse optimizer update only them (on the shards that
   own them). Gradients w.r.t. DHE encodings are ignored (and removed by XLA as dead code).

Numerics: tables and optimizer slots are float32, initialised uniform in ``[-init_scale, init_scale]``
(0.05 by default); ``LookupOptions.rows_dtype="bfloat16"`` gathers rows as bf16 (gradients come back bf16 and
are summed and applied in float32).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ctr.data import schema as schema_lib
from ctr.model_io import ModelInputs
from embeddings import table_placement, sparse_optim
from embeddings.tables import Lookup, TableConfig

Tables = dict[str, jax.Array]


class Part(Protocol):
    """The features one family serves (see :class:`embeddings.tables.TablePart`, :class:`embeddings.dhe.DHEPart`).

    ``tables``/``lookups`` are empty for a family without tables; ``encode`` is empty for table families.
    """

    family: str
    tables: tuple[TableConfig, ...]
    lookups: tuple[Lookup, ...]

    def host_ids(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def host_ids_tf(self, batch: Mapping[str, Any], index_tables: Mapping[str, Any]) -> dict[str, Any]: ...

    def encode(self, ids: Mapping[str, jax.Array]) -> dict[str, jax.Array]: ...

    def embed(self, rows: Mapping[str, jax.Array]) -> dict[str, jax.Array]: ...

    def num_parameters(self) -> int: ...


class Family(Protocol):
    """A configured family (``PerFeature``, ``Unified``, ``DeepHashEmbedding``): builds the part serving ``specs``."""

    def build(self, key: str, specs: Sequence[Any], row_alignment: int) -> Part: ...


class Embeddings(Protocol):
    """What the trainer needs of a schema's embeddings (see the module docstring for the path of one id).

    Implementations: :class:`EmbeddingCollection`, and :class:`embeddings.towers.TowerCollections` (one
    collection per ensemble tower). Tables are float32 ``[rows, dim]`` arrays keyed by table name; ``ids`` and
    ``rows`` are keyed by lookup (a feature may take several lookups).
    """

    @property
    def tables(self) -> dict[str, TableConfig]:
        """Every table's configuration (name, rows, dim), by table name."""

    def with_mesh(self, mesh: Mesh, row_axes: Sequence[str] | None = None) -> Embeddings:
        """These embeddings with tables row-sharded over ``row_axes`` of ``mesh`` (default: all axes)."""

    def table_shardings(self) -> dict[str, NamedSharding]:
        """The NamedSharding of every table (after :meth:`with_mesh`)."""

    def slot_shardings(self, slots: Any) -> Any:
        """NamedShardings of a pytree of per-table optimizer slots ``[rows, ...]`` (after :meth:`with_mesh`)."""

    def host_ids(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host side: a batch's int64 fingerprints -> each lookup's device input (int32 row indices of the
        fingerprints' shape, or ``uint32 [..., 2]`` fingerprint words for table-free lookups)."""

    def init(self, rng: jax.Array) -> Tables:
        """Every table, initialised."""

    def read_rows(self, tables: Tables, ids: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Device side, outside autodiff: each lookup's rows ``[*ids.shape, dim]`` (or hash encoding)."""

    def combine(self, rows: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> ModelInputs:
        """Rows (differentiated) + the device batch -> the model's inputs, inside the model's Flax scope."""

    def sparse_update(self, tables: Tables, slots: Mapping[str, sparse_optim.Slots], ids: Mapping[str, jax.Array],
                      row_grads: Mapping[str, jax.Array], optimizer: sparse_optim.SparseOptimizer,
                      step: jax.Array) -> tuple[Tables, dict[str, sparse_optim.Slots]]:  # fmt: skip
        """Applies ``optimizer`` to the rows the lookups touched, given the loss's gradients w.r.t. ``rows``."""

    def flush(self, tables: Tables, slots: Mapping[str, sparse_optim.Slots], optimizer: sparse_optim.SparseOptimizer,
              step: jax.Array) -> tuple[Tables, dict[str, sparse_optim.Slots]]:  # fmt: skip
        """Every table as its dense optimizer would hold it after ``step`` updates (before an evaluation)."""

    def num_parameters(self) -> int:
        """Embedding parameters (table entries incl. alignment padding, plus table-free networks)."""

    def parameter_bytes(self) -> int:
        """Bytes of those parameters."""


@dataclasses.dataclass(frozen=True)
class EmbeddingCollection:
    """All embeddings of one schema (an :class:`Embeddings`).

    Attributes:
      schema: the dataset schema.
      specs: the resolved :class:`embeddings.specs.FeatureSpec` of every feature.
      parts: one per family in use.
      lookup: how table rows are read and updated.
      placement: the mesh and row axes the tables are sharded over (:meth:`with_mesh`), or None (unsharded,
        or sharded but left to XLA).
    """

    schema: schema_lib.FeatureSchema
    specs: tuple[Any, ...]
    parts: tuple[Part, ...]
    lookup: table_placement.LookupOptions = table_placement.LookupOptions()
    placement: table_placement.Placement | None = None

    @property
    def tables(self) -> dict[str, TableConfig]:
        return {t.name: t for part in self.parts for t in part.tables}

    @property
    def lookups(self) -> tuple[Lookup, ...]:
        return tuple(lk for part in self.parts for lk in part.lookups)

    # -- placement -----------------------------------------------------------------------------------------------
    def with_mesh(self, mesh: Mesh, row_axes: Sequence[str] | None = None) -> EmbeddingCollection:
        """This collection with tables row-sharded over ``row_axes`` of ``mesh`` (default: all axes).

        Required for ``LookupOptions.path="shard_map"``; harmless for ``"xla"``.
        """
        axes = tuple(mesh.axis_names) if row_axes is None else tuple(row_axes)
        placement = table_placement.Placement(mesh, axes)
        for table in self.tables.values():
            if table.num_rows % placement.num_shards:
                raise ValueError(
                    f"table {table.name} has {table.num_rows} rows, not divisible by the {placement.num_shards} "
                    f"shards of {axes}: raise build_collection.row_alignment"
                )
        return dataclasses.replace(self, placement=placement)

    def table_shardings(self) -> dict[str, NamedSharding]:
        """NamedSharding of every table (needs :meth:`with_mesh`)."""
        placement = self._placement()
        return table_placement.table_shardings(self.tables, placement.mesh, placement.row_axes)

    def slot_shardings(self, slots: Any) -> Any:
        """NamedShardings for a pytree of table slots (arrays or ShapeDtypeStructs; needs :meth:`with_mesh`)."""
        placement = self._placement()
        return table_placement.slot_shardings(slots, placement.mesh, placement.row_axes)

    def _placement(self) -> table_placement.Placement:
        if self.placement is None:
            raise ValueError("the collection has no mesh: call with_mesh(mesh) first")
        return self.placement

    # -- host side -----------------------------------------------------------------------------------------------
    def host_ids(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every lookup's device input (see module docstring, step 1)."""
        return {key: value for part in self.parts for key, value in part.host_ids(batch).items()}

    def host_ids_tf(self, batch: Mapping[str, Any], index_tables: Mapping[str, Any]) -> dict[str, Any]:
        """TensorFlow twin of :meth:`host_ids` (serving); ``index_tables``: see :meth:`index_tables_tf`."""
        return {key: value for part in self.parts for key, value in part.host_ids_tf(batch, index_tables).items()}

    def index_tables_tf(self, make_table: Callable[[np.ndarray], Any]) -> dict[str, Any]:
        """Lookup key -> ``make_table(vocabulary)`` (e.g. :func:`ctr.data.vocab.index_table_tf`) for every lookup
        that indexes a vocabulary (build once: the SavedModel tracks them)."""
        return {lk.key: make_table(lk.vocabulary) for lk in self.lookups if lk.vocabulary is not None}

    # -- device side ---------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Tables:
        """Every table, float32, uniform in ``[-init_scale, init_scale]`` (one key per table, by sorted name)."""
        tables = self.tables
        keys = jax.random.split(rng, max(len(tables), 1))
        return {name: tables[name].init(k) for k, name in zip(keys, sorted(tables))}

    def read_rows(self, tables: Tables, ids: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Rows for every lookup (outside autodiff); ids are in range by construction."""
        self._check_placement()
        rows: dict[str, jax.Array] = {}
        for name, mine in self._lookups_by_table().items():
            found = table_placement.gather_rows(tables[name], [ids[lk.key] for lk in mine], self.placement, self.lookup)
            rows.update(zip((lk.key for lk in mine), found))
        for part in self.parts:
            rows.update(part.encode(ids))
        return rows

    def combine(self, rows: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> ModelInputs:
        """The model's inputs: per-feature vectors ``[B, dim]`` (schema order), the batch's dense features,
        sequence tensors ``[B, L, dim]`` and their masks. Call inside the model's Flax ``@nn.compact`` scope."""
        embedded = {name: value for part in self.parts for name, value in part.embed(rows).items()}
        return ModelInputs(
            features={name: embedded[name] for name in self.schema.categorical},
            dense=batch.get(schema_lib.DENSE),
            sequences={seq.name: embedded[seq.name] for seq in self.schema.sequences},
            masks={seq.name: batch[seq.mask_key] for seq in self.schema.sequences},
        )

    def sparse_update(
        self,
        tables: Tables,
        slots: Mapping[str, sparse_optim.Slots],
        ids: Mapping[str, jax.Array],
        row_grads: Mapping[str, jax.Array],
        optimizer: sparse_optim.SparseOptimizer,
        step: jax.Array,
    ) -> tuple[Tables, dict[str, sparse_optim.Slots]]:
        """Applies ``optimizer`` to the rows each table's lookups touched this step (gradients of non-table
        lookups are ignored)."""
        self._check_placement()
        new_tables, new_slots = dict(tables), dict(slots)
        for name, mine in self._lookups_by_table().items():
            new_tables[name], new_slots[name] = table_placement.update_rows(
                tables[name],
                slots[name],
                [ids[lk.key] for lk in mine],
                [row_grads[lk.key] for lk in mine],
                optimizer,
                step,
                self.placement,
                self.lookup,
            )
        return new_tables, new_slots

    def flush(
        self,
        tables: Tables,
        slots: Mapping[str, sparse_optim.Slots],
        optimizer: sparse_optim.SparseOptimizer,
        step: jax.Array,
    ) -> tuple[Tables, dict[str, sparse_optim.Slots]]:
        """Every table as its dense optimizer would hold it after ``step`` updates (``optimizer.flush``: one
        elementwise pass per table, row-sharded as the table; identity for optimizers with no deferred work)."""
        new_tables, new_slots = dict(tables), dict(slots)
        for name in self.tables:
            new_tables[name], new_slots[name] = optimizer.flush(tables[name], slots[name], step)
        return new_tables, new_slots

    def _check_placement(self) -> None:
        if self.lookup.path == "shard_map" and self.placement is None and self.tables:
            raise ValueError('LookupOptions.path="shard_map" needs the mesh: use collection.with_mesh(mesh, row_axes)')

    def _lookups_by_table(self) -> dict[str, list[Lookup]]:
        by_table: dict[str, list[Lookup]] = {name: [] for name in sorted(self.tables)}
        for lk in self.lookups:
            by_table[lk.table].append(lk)
        return {name: mine for name, mine in by_table.items() if mine}

    # -- size ------------------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Embedding parameters: table entries plus DHE network parameters."""
        return sum(part.num_parameters() for part in self.parts)

    def parameter_bytes(self) -> int:
        """Bytes of those parameters (all float32)."""
        return 4 * self.num_parameters()
