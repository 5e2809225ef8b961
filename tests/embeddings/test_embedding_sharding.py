"""Sharded lookups and updates (8 CPU devices) against the single-device reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from embeddings import table_placement, sparse_optim

V, D = 1024, 8
AUTO = jax.sharding.AxisType.Auto

# (mesh shape, row axes): rows over all 8 devices; over "model" only (4 replicas); over both axes of a 4x2 mesh.
PLACEMENTS = {
    "8x1/all": ((8, 1), ("data", "model")),
    "4x2/model": ((4, 2), ("model",)),
    "4x2/all": ((4, 2), ("data", "model")),
}
# "routed": spread ids and room for all of them (never overflows); "fallback": every id on shard 0 and the
# smallest capacity (always overflows, so the exact fallback runs).
REGIMES = {"routed": 8.0, "fallback": 1.0}


def _placement(name: str) -> table_placement.Placement:
    shape, row_axes = PLACEMENTS[name]
    return table_placement.Placement(jax.make_mesh(shape, ("data", "model"), axis_types=(AUTO, AUTO)), row_axes)


def _inputs(regime: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    high = V // 8 if regime == "fallback" else V  # V/8 rows = shard 0 of the 8-way split
    ids = [rng.integers(0, high, (64,)), rng.integers(0, high, (32, 3))]  # a feature and a sequence
    ids = [jnp.asarray(i, jnp.int32) for i in ids]
    grads = [jnp.asarray(rng.normal(size=(*i.shape, D)), jnp.float32) for i in ids]
    table = jnp.asarray(rng.uniform(-0.05, 0.05, (V, D)), jnp.float32)
    return table, ids, grads


def _batch_sharded(placement, arrays):
    spec = lambda x: P(tuple(placement.mesh.axis_names), *([None] * (x.ndim - 1)))
    return [jax.device_put(x, jax.sharding.NamedSharding(placement.mesh, spec(x))) for x in arrays]


# The XLA path has no capacity, so it runs on spread ids only; the fallback runs with and without replicas.
CASES = [
    ("8x1/all", "routed", "xla"),
    ("4x2/model", "routed", "xla"),
    ("8x1/all", "routed", "shard_map"),
    ("4x2/model", "routed", "shard_map"),
    ("4x2/all", "routed", "shard_map"),
    ("8x1/all", "fallback", "shard_map"),
    ("4x2/model", "fallback", "shard_map"),
]


@jax.jit
def _reference_update(table, slots, ids, grads, step):
    optimizer = sparse_optim.SparseAdam(learning_rate=0.01)
    return table_placement.update_rows(table, slots, ids, grads, optimizer, step, None, table_placement.LookupOptions())


@pytest.mark.parametrize("where, regime, path", CASES)
def test_sharded_lookup_and_update_equal_single_device(where, regime, path):
    placement = _placement(where)
    options = table_placement.LookupOptions(path=path, capacity_factor=REGIMES[regime])
    table, ids, grads = _inputs(regime)
    mesh, axes = placement.mesh, placement.row_axes

    sharded_table = jax.device_put(table, table_placement.row_sharding(mesh, axes))
    got = jax.jit(lambda t, i: table_placement.gather_rows(t, i, placement, options))(
        sharded_table, _batch_sharded(placement, ids)
    )
    for rows, i in zip(got, ids):
        np.testing.assert_array_equal(rows, jnp.take(table, i, axis=0))  # exact

    optimizer = sparse_optim.SparseAdam(learning_rate=0.01)
    slots = optimizer.init(table)
    step = jnp.int32(3)
    want_table, want_slots = _reference_update(table, slots, ids, grads, step)
    update = jax.jit(
        lambda t, s, i, g: table_placement.update_rows(t, s, i, g, optimizer, step, placement, options),
        out_shardings=(table_placement.row_sharding(mesh, axes), table_placement.slot_shardings(slots, mesh, axes)),
        donate_argnums=(0, 1),
    )
    got_table, got_slots = update(
        sharded_table,
        jax.device_put(slots, table_placement.slot_shardings(slots, mesh, axes)),
        _batch_sharded(placement, ids),
        _batch_sharded(placement, grads),
    )
    touched = np.zeros(V, bool)
    for i in ids:
        touched[np.asarray(i).reshape(-1)] = True
    for got_x, want_x, before in [(got_table, want_table, table)] + [
        (got_slots[k], want_slots[k], slots[k]) for k in slots
    ]:
        # Duplicate gradients are summed in another order on a mesh: touched rows agree to rounding...
        np.testing.assert_allclose(got_x, want_x, rtol=2e-6, atol=1e-7)
        # ...and untouched rows and slots are bit for bit unchanged.
        np.testing.assert_array_equal(np.asarray(got_x)[~touched], np.asarray(before)[~touched])


@pytest.mark.parametrize("where", ["4x2/model", "8x1/all"])
def test_dense_equivalent_adam_over_steps_equals_single_device(where):
    """SparseAdam's catch-up state (the per-row ``count`` slot) routed to the owning shards: over several steps
    with different rows, the shard_map update equals the single-device one bit for bit."""
    placement = _placement(where)
    mesh, axes = placement.mesh, placement.row_axes
    optimizer = sparse_optim.SparseAdam(learning_rate=0.01)
    options = table_placement.LookupOptions(path="shard_map")
    table, _, _ = _inputs("routed")
    slots = optimizer.init(table)
    want = (table, slots)
    got = (jax.device_put(table, table_placement.row_sharding(mesh, axes)),
           jax.device_put(slots, table_placement.slot_shardings(slots, mesh, axes)))  # fmt: skip
    update = jax.jit(lambda t, s, i, g, step: table_placement.update_rows(t, s, i, g, optimizer, step, placement, options))
    rng = np.random.default_rng(3)
    for step in range(5):
        ids = [jnp.asarray(rng.integers(0, V, (64,)), jnp.int32)]
        grads = [jnp.asarray(rng.normal(size=(64, D)), jnp.float32)]
        want = _reference_update(*want, ids, grads, jnp.int32(step))
        got = update(*got, _batch_sharded(placement, ids), _batch_sharded(placement, grads), jnp.int32(step))
    np.testing.assert_array_equal(got[0], want[0])
    for name in want[1]:
        np.testing.assert_array_equal(got[1][name], want[1][name])
    assert int(np.asarray(got[1]["count"]).max()) == 5


def test_bf16_rows_on_both_paths():
    placement = _placement("8x1/all")
    table, ids, _ = _inputs("routed")
    sharded = jax.device_put(table, table_placement.row_sharding(placement.mesh, placement.row_axes))
    for path in table_placement.PATHS:
        options = table_placement.LookupOptions(path=path, rows_dtype="bfloat16")
        got = jax.jit(lambda t, i: table_placement.gather_rows(t, i, placement, options))(sharded, ids)
        for rows, i in zip(got, ids):
            assert rows.dtype == jnp.bfloat16
            np.testing.assert_array_equal(rows, jnp.take(table, i, axis=0).astype(jnp.bfloat16))


def test_rowwise_slots_shard_with_their_table():
    """A 1-D slot (row-wise Adagrad) is row-sharded like its table, and the routed update handles it."""
    placement = _placement("4x2/model")
    mesh, axes = placement.mesh, placement.row_axes
    optimizer = sparse_optim.SparseRowwiseAdagrad()
    table, ids, grads = _inputs("routed", seed=1)
    slots = optimizer.init(table)
    shardings = table_placement.slot_shardings(slots, mesh, axes)
    assert shardings["accumulator"].spec == P(("model",))
    assert table_placement.row_sharding(mesh, axes).spec == P(("model",), None)
    options = table_placement.LookupOptions(path="shard_map")
    want = jax.jit(lambda t, s: table_placement.update_rows(t, s, ids, grads, optimizer, jnp.int32(0), None, options))(
        table, slots
    )
    got = jax.jit(lambda t, s: table_placement.update_rows(t, s, ids, grads, optimizer, jnp.int32(0), placement, options))(
        jax.device_put(table, table_placement.row_sharding(mesh, axes)), jax.device_put(slots, shardings)
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7)


def test_shard_map_local_gather_through_the_kernel():
    placement = _placement("8x1/all")
    table, ids, _ = _inputs("routed")
    options = table_placement.LookupOptions(path="shard_map", local_gather="kernel", kernel_backend="xla")
    sharded = jax.device_put(table, table_placement.row_sharding(placement.mesh, placement.row_axes))
    got = jax.jit(lambda t, i: table_placement.gather_rows(t, i, placement, options))(sharded, ids)
    for rows, i in zip(got, ids):
        np.testing.assert_array_equal(rows, np.asarray(table)[np.asarray(i)])


def test_options_and_placement_are_validated():
    with pytest.raises(ValueError, match="path"):
        table_placement.LookupOptions(path="magic")
    with pytest.raises(ValueError, match="capacity_factor"):
        table_placement.LookupOptions(capacity_factor=0.5)
    with pytest.raises(ValueError, match="shard_map path"):
        table_placement.LookupOptions(local_gather="kernel")  # the XLA path would never call it
    mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AUTO, AUTO))
    with pytest.raises(ValueError, match="not axes of the mesh"):
        table_placement.Placement(mesh, ("rows",))
    with pytest.raises(ValueError, match="leading dimension"):
        table_placement.gather_rows(
            jnp.zeros((V, D)), [jnp.zeros((12,), jnp.int32)], table_placement.Placement(mesh, ("data",)),
            table_placement.LookupOptions(path="shard_map"),
        )
