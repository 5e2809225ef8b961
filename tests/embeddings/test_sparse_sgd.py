"""SparseSGD against a NumPy loop over (id, gradient) pairs, on one device and through the shard_map route with
rows over all 8 devices: a touched row moves by -lr times the sum of its gradients (duplicates summed), every
other row stays bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embeddings import table_placement, sparse_optim

V, D, LR, STEPS = 64, 4, 0.3, 3
AUTO = jax.sharding.AxisType.Auto


def _steps():
    """Per step: a feature's ids [16] and a sequence's ids [8, 3] (duplicates; rows >= V/2 never touched),
    with their row gradients."""
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        ids = [rng.integers(0, V // 2, (16,)), rng.integers(0, V // 2, (8, 3))]
        yield [jnp.asarray(i, jnp.int32) for i in ids], [jnp.asarray(rng.normal(size=(*i.shape, D)), jnp.float32)
                                                          for i in ids]  # fmt: skip


def _numpy_sgd(table):
    w = np.array(table, np.float64)
    for ids, grads in _steps():
        for i, g in zip(ids, grads):
            for row, grad in zip(np.asarray(i).reshape(-1), np.asarray(g, np.float64).reshape(-1, D)):
                w[row] -= LR * grad
    return w


@pytest.mark.parametrize("placed", [False, True], ids=["one_device", "shard_map_8"])
def test_sparse_sgd_moves_touched_rows_by_the_summed_gradient(placed):
    table = jnp.asarray(np.random.default_rng(1).uniform(-0.05, 0.05, (V, D)), jnp.float32)
    optimizer = sparse_optim.SparseSGD(learning_rate=LR)
    placement, options = None, table_placement.LookupOptions()
    state = table
    if placed:
        mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AUTO, AUTO))
        placement, options = table_placement.Placement(mesh, ("data", "model")), table_placement.LookupOptions(path="shard_map")
        state = jax.device_put(table, table_placement.row_sharding(mesh, placement.row_axes))
    assert optimizer.init(table) == {}
    update = jax.jit(lambda t, i, g, step: table_placement.update_rows(t, {}, i, g, optimizer, step, placement, options))
    for step, (ids, grads) in enumerate(_steps()):
        state, slots = update(state, ids, grads, jnp.int32(step))
        assert slots == {}
    np.testing.assert_allclose(state, _numpy_sgd(table), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state)[V // 2:], np.asarray(table)[V // 2:])
