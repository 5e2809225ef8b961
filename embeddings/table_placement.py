"""Where tables live on a mesh, and the two ways of reading and updating their rows there.

Placement. A table ``[V, D]`` and every optimizer slot of it (``[V, ...]``) are row-sharded over
``row_axes`` (all mesh axes, or e.g. ``("model",)``): shard ``s`` holds rows ``[s*V/S, (s+1)*V/S)`` where
``S`` is the product of those axes' sizes and ``s`` their row-major index; mesh axes not in ``row_axes`` hold
replicas. :func:`row_sharding`, :func:`table_shardings` and :func:`slot_shardings` give the NamedShardings.
Tables have mesh-independent shapes (rows are aligned at build time, see
:func:`embeddings.specs.build_collection`), so a checkpoint restores onto any mesh.

Lookup paths (``LookupOptions.path``, gin):

- ``"xla"``: plain ``jnp.take`` and a plain sparse update on the sharded arrays inside ``jit``; XLA's SPMD
  partitioner inserts the communication (ids gathered to every shard, masked local gathers, a sum over shards).
- ``"shard_map"``: explicit routing in ``jax.shard_map``. Each device takes its slice of the batch's ids
  (``n`` of them), deduplicates them, sends each distinct id to the shard owning its row with one
  ``all_to_all`` of fixed per-destination capacity ``cap = ceil(capacity_factor * n / S)``, the owner gathers
  locally (``jnp.take`` or ``kernels.lookup.lookup``, per ``local_gather``) and a second ``all_to_all``
  returns the rows, which are scattered back to the original (duplicated) positions. The sparse update routes
  (id, summed gradient) pairs the same way; owners pool what their replicas received, sum duplicates and
  update their rows and slots in place. If any device has more distinct ids for one shard than ``cap``, every
  device takes an exact fallback for that step instead (all-gather the ids, or ids and gradients; masked
  local gather and reduce-scatter for the lookup), chosen with a global ``lax.cond``: results never depend on
  the capacity, only speed does. The optimizer update itself runs after the ``cond``, on its small output
  lists: a table or slot updated inside a conditional would be copied whole every step.

Cost per device and step, with ``M`` devices: the XLA path and the fallback move every id and row (or
gradient) of the batch, ``~M * n * D`` words; the routed path moves ``~capacity_factor * n * D``. Compute is
O(ids x D) per device in either path (the routed update applies the optimizer to a static
``min(V/S, M * n)`` padded entries, so that both branches share one update); nothing scans a table.

Both paths return exactly the rows of a single-device ``jnp.take``. The sparse update sums duplicate
gradients in a different order on different meshes, so updated rows agree to float32 rounding; untouched rows
and slots are bit for bit unchanged.

``rows_dtype="bfloat16"`` casts gathered rows to bf16 (after the local gather, so the returned rows travel at
half the bytes); tables, slots and the update stay float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embeddings import sparse_optim
from embeddings.tables import TableConfig

PATHS = ("xla", "shard_map")
LOCAL_GATHERS = ("take", "kernel")
ROWS_DTYPES = ("float32", "bfloat16")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LookupOptions:
    """How table rows are read and updated.

    Attributes:
      path: ``"xla"`` (auto-partitioned) or ``"shard_map"`` (explicit all-to-all routing); see module doc.
      local_gather: gather from a local table (one device, or a shard inside ``shard_map``): ``"take"``
        (``jnp.take``) or ``"kernel"`` (``kernels.lookup.lookup``; ``shard_map`` path only, as the XLA path on
        a placed table always uses XLA's gather).
      kernel_backend: ``backend`` argument of ``kernels.lookup.lookup``.
      kernel_interpret: run the Pallas kernel in interpret mode (CPU tests).
      capacity_factor: ``shard_map`` per-destination capacity, in multiples of an even split of a device's
        distinct ids over the shards (>= 1; larger = fewer fallbacks, more bytes per all-to-all).
      rows_dtype: dtype of gathered rows, ``"float32"`` or ``"bfloat16"``.
    """

    path: str = "xla"
    local_gather: str = "take"
    kernel_backend: str = "auto"
    kernel_interpret: bool = False
    capacity_factor: float = 2.0
    rows_dtype: str = "float32"

    def __post_init__(self):
        for name, value, allowed in (
            ("path", self.path, PATHS),
            ("local_gather", self.local_gather, LOCAL_GATHERS),
            ("rows_dtype", self.rows_dtype, ROWS_DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"LookupOptions.{name} must be one of {allowed}, got {value!r}")
        if self.capacity_factor < 1:
            raise ValueError(f"LookupOptions.capacity_factor must be >= 1, got {self.capacity_factor}")
        if self.local_gather == "kernel" and self.path == "xla":
            # The trainer always places tables on its mesh, where the XLA path reads through XLA's gather: the
            # kernel would silently never run.
            raise ValueError("LookupOptions.local_gather = 'kernel' is read only on the shard_map path: also set "
                             "LookupOptions.path = 'shard_map'")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Tables row-sharded over ``row_axes`` of ``mesh``."""

    mesh: Mesh
    row_axes: tuple[str, ...]

    def __post_init__(self):
        unknown = set(self.row_axes) - set(self.mesh.axis_names)
        if unknown:
            raise ValueError(f"row axes {sorted(unknown)} are not axes of the mesh {self.mesh.axis_names}")

    @property
    def num_shards(self) -> int:
        return axis_size(self.mesh, self.row_axes)

    @property
    def replica_axes(self) -> tuple[str, ...]:
        """Mesh axes holding replicas of each shard."""
        return tuple(a for a in self.mesh.axis_names if a not in self.row_axes)


def axis_size(mesh: Mesh, axes: Sequence[str]) -> int:
    """Devices an array dimension split over ``axes`` of ``mesh`` is split over (the product of their sizes)."""
    return math.prod(mesh.shape[a] for a in axes)


def row_sharding(mesh: Mesh, row_axes: Sequence[str], ndim: int = 2) -> NamedSharding:
    """Rows (dimension 0) split over ``row_axes``, other dimensions whole."""
    return NamedSharding(mesh, P(tuple(row_axes) or None, *([None] * (ndim - 1))))


def table_shardings(
    tables: Mapping[str, TableConfig], mesh: Mesh, row_axes: Sequence[str]
) -> dict[str, NamedSharding]:
    """NamedSharding of every table (``jit`` ``out_shardings`` for ``collection.init``)."""
    return {name: row_sharding(mesh, row_axes, 2) for name in tables}


def slot_shardings(slots: Any, mesh: Mesh, row_axes: Sequence[str]) -> Any:
    """NamedShardings for a pytree of optimizer slots (arrays or ``jax.ShapeDtypeStruct``), all row-sharded."""
    return jax.tree.map(lambda x: row_sharding(mesh, row_axes, x.ndim), slots)


# -- reading rows ------------------------------------------------------------------------------------------------
def _local_gather(table: jax.Array, ids: jax.Array, options: LookupOptions) -> jax.Array:
    """Rows of a table this device holds whole; ``ids`` in range."""
    if options.local_gather == "kernel":
        from kernels import lookup as kernel_lookup  # the Pallas kernels are only loaded when asked for

        rows = kernel_lookup.lookup(table, ids, backend=options.kernel_backend, interpret=options.kernel_interpret)
    else:
        rows = jnp.take(table, ids, axis=0)
    return rows.astype(options.rows_dtype)


def gather_rows(
    table: jax.Array, ids: Sequence[jax.Array], placement: Placement | None, options: LookupOptions
) -> list[jax.Array]:
    """Rows ``[*i.shape, D]`` of ``table`` for every id array ``i`` (ids in range)."""
    if placement is None:
        return [_local_gather(table, i, options) for i in ids]
    if options.path == "xla":
        return [jnp.take(table, i, axis=0).astype(options.rows_dtype) for i in ids]
    return _RowRouter(placement, table.shape[0], options).gather(table, ids)


def update_rows(
    table: jax.Array,
    slots: sparse_optim.Slots,
    ids: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    optimizer: sparse_optim.SparseOptimizer,
    step: jax.Array,
    placement: Placement | None,
    options: LookupOptions,
) -> tuple[jax.Array, sparse_optim.Slots]:
    """Applies ``optimizer`` to the rows ``ids`` touched, with their gradients ``grads [*i.shape, D]``."""
    if options.path == "xla" or placement is None:
        flat_ids = jnp.concatenate([i.reshape(-1) for i in ids])
        flat_grads = jnp.concatenate([g.reshape(-1, table.shape[1]).astype(jnp.float32) for g in grads])
        rows, summed, _ = sparse_optim.dedupe_row_grads(flat_ids, flat_grads, table.shape[0])
        return optimizer.update(table, slots, rows, summed, step)
    return _RowRouter(placement, table.shape[0], options).update(table, slots, ids, grads, optimizer, step)


@dataclasses.dataclass(frozen=True)
class _RowRouter:
    """The ``shard_map`` path for one table of ``num_rows`` rows (see module docstring)."""

    placement: Placement
    num_rows: int
    options: LookupOptions

    def __post_init__(self):
        if self.num_rows % self.placement.num_shards:
            raise ValueError(f"{self.num_rows} table rows do not split over {self.placement.num_shards} shards")

    @property
    def _all_axes(self) -> tuple[str, ...]:
        return tuple(self.placement.mesh.axis_names)

    @property
    def _shards(self) -> int:
        return self.placement.num_shards

    @property
    def _rows_per_shard(self) -> int:
        return self.num_rows // self._shards

    def _batch_spec(self, x: jax.Array) -> P:
        if x.shape[0] % self.placement.mesh.size:
            raise ValueError(
                f"the shard_map lookup splits ids over all {self.placement.mesh.size} devices, but an id array "
                f"has leading dimension {x.shape[0]}"
            )
        return P(self._all_axes, *([None] * (x.ndim - 1)))

    def _capacity(self, n: int) -> int:
        return min(n, math.ceil(self.options.capacity_factor * n / self._shards))

    def _route(self, unique: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For sorted distinct ids (padding = ``num_rows``): owner shard, slot within the owner's block of the
        send buffer, and ids per owner ``[S]``. Padding gets owner ``S`` (out of range: dropped)."""
        owner = unique // self._rows_per_shard
        counts = jnp.zeros(self._shards + 1, jnp.int32).at[owner].add(1)[: self._shards]
        first = jnp.cumsum(counts) - counts  # ids are sorted, so each owner's ids are contiguous
        slot = jnp.arange(unique.shape[0], dtype=jnp.int32) - first[jnp.minimum(owner, self._shards - 1)]
        return owner, slot, counts

    def _overflow(self, counts: jax.Array, capacity: int) -> jax.Array:
        return lax.pmax(jnp.max(counts), self._all_axes) > capacity

    def _my_first_row(self) -> jax.Array:
        return lax.axis_index(self.placement.row_axes) * self._rows_per_shard

    # -- gather --------------------------------------------------------------------------------------------------
    def gather(self, table: jax.Array, ids: Sequence[jax.Array]) -> list[jax.Array]:
        mesh, row_spec = self.placement.mesh, P(self.placement.row_axes or None, None)
        specs = [self._batch_spec(i) for i in ids]
        fn = jax.shard_map(self._gather_local, mesh=mesh, in_specs=(row_spec, *specs), out_specs=tuple(specs))
        return list(fn(table, *ids))

    def _gather_local(self, shard: jax.Array, *ids: jax.Array) -> tuple[jax.Array, ...]:
        flat = jnp.concatenate([i.reshape(-1) for i in ids])
        if self._shards == 1:
            rows = _local_gather(shard, flat, self.options)
        else:
            unique, inverse = sparse_optim.unique_rows(flat, self.num_rows)
            owner, slot, counts = self._route(unique)
            capacity = self._capacity(flat.shape[0])
            distinct_rows = lax.cond(
                self._overflow(counts, capacity),
                lambda: self._gather_fallback(shard, unique),
                lambda: self._gather_routed(shard, unique, owner, slot, capacity),
            )
            rows = distinct_rows[inverse]
        out, start = [], 0
        for i in ids:
            out.append(rows[start : start + i.size].reshape(*i.shape, rows.shape[-1]))
            start += i.size
        return tuple(out)

    def _gather_routed(self, shard, unique, owner, slot, capacity) -> jax.Array:
        axes, r = self.placement.row_axes, self._rows_per_shard
        request = jnp.full((self._shards, capacity), self.num_rows, jnp.int32).at[owner, slot].set(unique, mode="drop")
        received = lax.all_to_all(request, axes, 0, 0)  # [S, cap]: row s = ids shard s asks me for
        local = jnp.clip(received - self._my_first_row(), 0, r - 1)  # padding reads a row nobody uses
        answer = lax.all_to_all(_local_gather(shard, local, self.options), axes, 0, 0)
        return answer.at[owner, slot].get(mode="fill", fill_value=0)

    def _gather_fallback(self, shard, unique) -> jax.Array:
        axes, r = self.placement.row_axes, self._rows_per_shard
        wanted = lax.all_gather(unique, axes, tiled=True)  # every id of the row group
        local = wanted - self._my_first_row()
        mine = (local >= 0) & (local < r)
        rows = _local_gather(shard, jnp.clip(local, 0, r - 1), self.options)
        rows = jnp.where(mine[:, None], rows, jnp.zeros((), rows.dtype))
        return lax.psum_scatter(rows, axes, scatter_dimension=0, tiled=True)  # one nonzero term per id: exact

    # -- update --------------------------------------------------------------------------------------------------
    def update(self, table, slots, ids, grads, optimizer, step) -> tuple[jax.Array, sparse_optim.Slots]:
        mesh, row_axes = self.placement.mesh, self.placement.row_axes
        table_spec = P(row_axes or None, None)
        slot_specs = jax.tree.map(lambda x: P(row_axes or None, *([None] * (x.ndim - 1))), slots)
        id_specs = [self._batch_spec(i) for i in ids]
        grad_specs = [self._batch_spec(g) for g in grads]

        def local(shard, slot_shards, step, ids, grads):
            return self._update_local(shard, slot_shards, step, ids, grads, optimizer)

        fn = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(table_spec, slot_specs, P(), id_specs, grad_specs),
            out_specs=(table_spec, slot_specs),
        )
        return fn(table, slots, step, list(ids), list(grads))

    def _update_local(self, shard, slot_shards, step, ids, grads, optimizer):
        dim = shard.shape[1]
        flat = jnp.concatenate([i.reshape(-1) for i in ids])
        flat_grads = jnp.concatenate([g.reshape(-1, dim).astype(jnp.float32) for g in grads])
        # Pre-aggregate on the sender: one (id, summed gradient) per distinct id leaves this device.
        unique, summed, _ = sparse_optim.dedupe_row_grads(flat, flat_grads, self.num_rows)
        if self._shards == 1:
            rows, row_grads = self._dedupe_local(*self._gather_replicas(unique, summed), flat.shape[0])
        else:
            owner, slot, counts = self._route(unique)
            capacity = self._capacity(flat.shape[0])
            # The update runs after the cond, on its small (rows, gradients) output: a table or slot updated
            # inside a conditional would be copied whole every step.
            rows, row_grads = lax.cond(
                self._overflow(counts, capacity),
                lambda: self._update_fallback(unique, summed),
                lambda: self._update_routed(unique, summed, owner, slot, capacity, dim),
            )
        return optimizer.update(shard, slot_shards, rows, row_grads, step)

    def _gather_replicas(self, ids: jax.Array, grads: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every replica of a shard must apply the same update: pool what the replicas received."""
        axes = self.placement.replica_axes
        if not axes:
            return ids, grads
        # "invarying": the pooled arrays are identical on every replica, which lets shard_map check that the
        # updated shard is too.
        return tuple(lax.all_gather(x, axes, tiled=True, to="invarying") for x in (ids, grads))

    def _update_routed(self, unique, summed, owner, slot, capacity, dim):
        axes = self.placement.row_axes
        send_ids = jnp.full((self._shards, capacity), self.num_rows, jnp.int32).at[owner, slot].set(unique, mode="drop")
        send_grads = jnp.zeros((self._shards, capacity, dim), jnp.float32).at[owner, slot].set(summed, mode="drop")
        got_ids = lax.all_to_all(send_ids, axes, 0, 0).reshape(-1)
        got_grads = lax.all_to_all(send_grads, axes, 0, 0).reshape(-1, dim)
        got_ids, got_grads = self._gather_replicas(got_ids, got_grads)
        local = jnp.where(got_ids < self.num_rows, got_ids - self._my_first_row(), self._rows_per_shard)
        return self._dedupe_local(local, got_grads, unique.shape[0])

    def _update_fallback(self, unique, summed):
        r = self._rows_per_shard
        every_id, every_grad = (lax.all_gather(x, self._all_axes, tiled=True, to="invarying") for x in (unique, summed))
        local = every_id - self._my_first_row()
        local = jnp.where((local >= 0) & (local < r), local, r)
        return self._dedupe_local(local, every_grad, unique.shape[0])

    def _dedupe_local(self, local_ids, grads, n) -> tuple[jax.Array, jax.Array]:
        """Distinct shard-local rows (``rows_per_shard`` = not mine) and summed gradients, as many entries as
        this shard can receive in any branch: ``min(rows_per_shard, all devices' ids)``."""
        size = min(self._rows_per_shard, n * self.placement.mesh.size)
        rows, summed, _ = sparse_optim.dedupe_row_grads(local_ids, grads, self._rows_per_shard, size=size)
        return rows, summed
