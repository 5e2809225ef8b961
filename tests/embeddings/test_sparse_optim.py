"""Sparse optimizers against dense references restricted to touched rows; row gradients against jnp.take's."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from embeddings import table_placement, sparse_optim

V, D = 200, 8
STEPS = 3


def _steps(seed: int = 0):
    """Per step: ids [64] (duplicates, a fixed set of never-touched rows) and row gradients [64, D]."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        ids = rng.integers(0, V // 2, 64).astype(np.int32)  # rows >= V/2 are never touched
        yield jnp.asarray(ids), jnp.asarray(rng.normal(size=(64, D)), jnp.float32)


def _dense_grad(ids, grads):
    """The gradient of ``sum(take(table, ids) * grads)`` w.r.t. the table: what autodiff of jnp.take gives."""
    return jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0) * grads))(jnp.zeros((V, D)))


def _sparse(optimizer, table):
    update = jax.jit(
        lambda t, s, i, g, step: table_placement.update_rows(t, s, [i], [g], optimizer, step, None, table_placement.LookupOptions())
    )
    slots = optimizer.init(table)
    for step, (ids, grads) in enumerate(_steps()):
        table, slots = update(table, slots, ids, grads, jnp.int32(step))
    return table, slots


def _table():
    return jax.random.uniform(jax.random.key(0), (V, D), jnp.float32, -0.05, 0.05)


def test_row_gradients_equal_take_gradient():
    """Deduplicated, summed row gradients scattered into a zero table == jax.grad through jnp.take."""
    table = _table()
    ids, upstream = next(_steps())
    rows = jnp.take(table, ids, axis=0)
    g_rows = jax.grad(lambda r: jnp.sum(jnp.tanh(r) * upstream))(rows)
    unique, summed, valid = sparse_optim.dedupe_row_grads(ids, g_rows, V)
    sparse = jnp.zeros((V, D)).at[unique].add(summed, mode="drop")
    dense = jax.grad(lambda t: jnp.sum(jnp.tanh(jnp.take(t, ids, axis=0)) * upstream))(table)
    np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=1e-7)
    assert int(valid.sum()) == len(np.unique(np.asarray(ids)))
    assert np.all(np.asarray(unique)[~np.asarray(valid)] == V)


def _check(sparse_table, dense_table, table, sparse_slots=None, dense_slots=None, initial_slots=None):
    untouched = np.arange(V) >= V // 2
    np.testing.assert_allclose(sparse_table, dense_table, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(sparse_table)[untouched], np.asarray(table)[untouched])
    for name in sparse_slots or {}:
        np.testing.assert_allclose(sparse_slots[name], dense_slots[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(
            np.asarray(sparse_slots[name])[untouched], np.asarray(initial_slots[name])[untouched]
        )


def test_sparse_adagrad_equals_dense_adagrad_on_touched_rows():
    opt = sparse_optim.SparseAdagrad(learning_rate=0.1, initial_accumulator=0.1, epsilon=1e-7)
    table = _table()
    w, acc = table, jnp.full((V, D), 0.1)
    for ids, grads in _steps():  # dense Keras Adagrad on the full table
        g = _dense_grad(ids, grads)
        acc = acc + g * g
        w = w - 0.1 * g / (jnp.sqrt(acc) + 1e-7)
    got, slots = _sparse(opt, table)
    _check(got, w, table, slots, {"accumulator": acc}, opt.init(table))


def test_sparse_rowwise_adagrad_equals_dense_reference():
    opt = sparse_optim.SparseRowwiseAdagrad(learning_rate=0.1)
    table = _table()
    w, acc = table, jnp.zeros((V,))
    for ids, grads in _steps():
        g = _dense_grad(ids, grads)
        acc = acc + jnp.mean(g * g, axis=-1)
        w = w - (0.1 / (jnp.sqrt(acc) + 1e-8))[:, None] * g
    got, slots = _sparse(opt, table)
    touched = np.arange(V) < V // 2
    np.testing.assert_allclose(np.asarray(got)[touched], np.asarray(w)[touched], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got)[~touched], np.asarray(table)[~touched])
    np.testing.assert_allclose(slots["accumulator"], acc, rtol=1e-6)


def test_sparse_adam_equals_dense_optax_adam():
    """Default SparseAdam == optax.adam on the whole table with dense (mostly zero) gradients, over steps where
    rows skip many updates, before and after ``flush``; rows never touched stay bit for bit."""
    opt = sparse_optim.SparseAdam(learning_rate=0.01)
    table = _table()
    tx = optax.adam(0.01)
    dense, dense_state = table, tx.init(table)
    sparse, slots = table, opt.init(table)
    update = jax.jit(
        lambda t, s, i, g, step: table_placement.update_rows(t, s, [i], [g], opt, step, None, table_placement.LookupOptions())
    )
    rng = np.random.default_rng(1)
    num_steps = 40
    for step in range(num_steps):
        # Few rows a step, from a pool of 60 (rows >= 60 never touched): most rows skip several steps.
        ids = jnp.asarray(rng.integers(0, 60, 6).astype(np.int32))
        grads = jnp.asarray(rng.normal(size=(6, D)), jnp.float32)
        updates, dense_state = tx.update(_dense_grad(ids, grads), dense_state, dense)
        dense = optax.apply_updates(dense, updates)
        sparse, slots = update(sparse, slots, ids, grads, jnp.int32(step))
        if step == 19:  # a flush in the middle changes nothing later
            sparse, slots = jax.jit(opt.flush)(sparse, slots, jnp.int32(step + 1))
            np.testing.assert_allclose(sparse, dense, rtol=2e-5, atol=2e-6)
    moved = np.abs(np.asarray(sparse) - np.asarray(table)).max(axis=1) > 0
    assert moved[:60].sum() > 50 and not moved[60:].any()
    lagging = np.abs(np.asarray(sparse) - np.asarray(dense)).max()
    assert lagging > 1e-4  # before the flush, rows not read this step still owe their moves
    flushed, flushed_slots = jax.jit(opt.flush)(sparse, slots, jnp.int32(num_steps))
    np.testing.assert_allclose(flushed, dense, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flushed_slots["mu"], dense_state[0].mu, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(flushed_slots["nu"], dense_state[0].nu, rtol=2e-5, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(flushed)[60:], np.asarray(table)[60:])


def test_adam_tail_matches_direct_sum():
    """The closed-form catch-up coefficient Q(s) - r^k Q(s+k) against the direct sum over skipped steps."""
    b1, b2 = 0.9, 0.999
    tail = sparse_optim._adam_tail(b1, b2)
    r = b1 / np.sqrt(b2)
    for s, k in [(1, 1), (3, 10), (50, 200), (5000, 7), (30000, 40)]:
        m = np.arange(s + 1, s + k + 1, dtype=np.float64)
        direct = np.sum(r ** np.arange(1, k + 1) * np.sqrt(1 - b2**m) / (1 - b1**m))
        top = len(tail) - 1
        closed = tail[min(s, top)] - r**k * tail[min(s + k, top)]
        np.testing.assert_allclose(closed, direct, rtol=1e-5)


def test_sparse_adam_lazy_equals_dense_lazy_adam():
    """Lazy Adam: touched rows follow optax.adam's formula with the global step; other rows and moments stay."""
    opt = sparse_optim.SparseAdam(learning_rate=0.01, lazy=True)
    table = _table()
    w, mu, nu = table, jnp.zeros((V, D)), jnp.zeros((V, D))
    for t, (ids, grads) in enumerate(_steps(), start=1):
        g = _dense_grad(ids, grads)
        hit = jnp.zeros((V, 1), bool).at[ids].set(True)
        mu = jnp.where(hit, 0.9 * mu + 0.1 * g, mu)
        nu = jnp.where(hit, 0.999 * nu + 0.001 * g * g, nu)
        tf32 = jnp.float32(t)  # bias corrections in float32, as on device
        step = 0.01 * (mu / (1 - 0.9**tf32)) / (jnp.sqrt(nu / (1 - 0.999**tf32)) + 1e-8)
        w = jnp.where(hit, w - step, w)
    got, slots = _sparse(opt, table)
    _check(got, w, table, slots, {"mu": mu, "nu": nu}, opt.init(table))


def test_sparse_adam_first_step_equals_optax_adam():
    opt = sparse_optim.SparseAdam(learning_rate=0.01)
    table = _table()
    ids, grads = next(_steps())
    g = _dense_grad(ids, grads)
    tx = optax.adam(0.01)
    updates, _ = tx.update(g, tx.init(table), table)
    want = optax.apply_updates(table, updates)
    got, _ = opt.update(table, opt.init(table), *sparse_optim.dedupe_row_grads(ids, grads, V)[:2], jnp.int32(0))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "optimizer",
    [
        sparse_optim.SparseAdagrad(),
        sparse_optim.SparseRowwiseAdagrad(),
        sparse_optim.SparseAdam(),
        sparse_optim.SparseAdam(lazy=True),
    ],
)
def test_update_cost_does_not_grow_with_table_size(optimizer):
    """Compiled with donation, the only whole-table instructions are the in-place scatters: no copy, no
    elementwise pass over a table, and the same FLOPs for a 100x larger table."""
    flops = []
    for num_rows in (10_000, 1_000_000):
        table = jax.ShapeDtypeStruct((num_rows, 16), jnp.float32)
        slots = jax.eval_shape(optimizer.init, table)
        ids = [jax.ShapeDtypeStruct((4096,), jnp.int32)]
        grads = [jax.ShapeDtypeStruct((4096, 16), jnp.float32)]
        options = table_placement.LookupOptions()
        update = jax.jit(
            lambda t, s, i, g: table_placement.update_rows(t, s, i, g, optimizer, jnp.int32(0), None, options),
            donate_argnums=(0, 1),
        )
        compiled = update.lower(table, slots, ids, grads).compile()
        for line in compiled.as_text().splitlines():
            match = re.match(rf"\s*(?:ROOT )?%(\S+) = f32\[{num_rows}(?:,16)?\]\S* (\S+?)\(", line)
            if match:
                name, op = match.groups()
                assert op in ("parameter", "scatter") or (op == "fusion" and "scatter" in name), line
        flops.append(compiled.cost_analysis()["flops"])
    assert flops[0] == flops[1]
