r"""Where a DCNv2 training step's time goes on this machine: the dense model step and the sparse table update.

At the Avazu shape of ``benchmarks/peers.py`` (24 features x 16 wide, one stacked 44k-row table, batch 4096):
(a) the dense step alone (DCNv2 forward, backward and Adam in Flax, embeddings as inputs); (b) the sparse
update of the table at one step's ids (98,304 Zipf-distributed ids) for each table optimizer, and the
deduplication alone; (c) for comparison, an elementwise update over the whole table, the cost of a dense
optimizer on a table this small. Best of 5 timings each, after compilation.

    PYTHONPATH=. python benchmarks/step_breakdown.py
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctr.models.dcnv2 import DCNv2
from ctr.model_io import ModelInputs
from embeddings import table_placement, sparse_optim

BATCH, FEATURES, DIM, ROWS = 4096, 24, 16, 44_032


def best_ms(f, *args, repeats: int = 5, warmup: bool = True) -> float:
    """Milliseconds of ``f(*args)`` (its result waited for), the best of ``repeats`` calls after a first
    (compiling) one; ``warmup=False`` skips that call, for an ``f`` that moves state the caller has warmed up."""
    if warmup:
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def dense_step_ms() -> float:
    rng = np.random.default_rng(0)
    feats = {f"f{i}": jnp.asarray(rng.normal(size=(BATCH, DIM)) * 0.05, jnp.float32) for i in range(FEATURES)}
    labels = jnp.asarray(rng.integers(0, 2, BATCH), jnp.float32)
    model = DCNv2(num_cross_layers=3, cross_rank=None, mlp=(400, 400), structure="parallel")

    def inputs(f):
        return ModelInputs(features=f, dense=None, sequences={}, masks={})

    params = model.init(jax.random.key(0), inputs(feats))["params"]
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, feats):
        def loss(p, f):
            return jnp.mean(optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, inputs(f)), labels))

        _, (g_params, g_feats) = jax.value_and_grad(loss, argnums=(0, 1))(params, feats)
        updates, opt_state = tx.update(g_params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, g_feats

    return best_ms(step, params, tx.init(params), feats)


def main() -> None:
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.minimum(rng.zipf(1.3, BATCH * FEATURES) - 1, ROWS - 1), jnp.int32)
    grads = jnp.asarray(rng.normal(size=(BATCH * FEATURES, DIM)), jnp.float32)
    table = jnp.zeros((ROWS, DIM), jnp.float32)
    ms = dense_step_ms()
    print(f"(a) dense step (DCNv2 fwd + bwd + Adam), batch {BATCH}: {ms:.0f} ms = {BATCH / ms * 1000:,.0f} examples/s")
    for name, opt in [("SparseAdagrad", sparse_optim.SparseAdagrad()), ("SparseAdam", sparse_optim.SparseAdam()),
                      ("SparseAdam(lazy=True)", sparse_optim.SparseAdam(lazy=True))]:  # fmt: skip
        update = jax.jit(lambda t, s, i, g, opt=opt: table_placement.update_rows(
            t, s, [i], [g], opt, jnp.int32(7), None, table_placement.LookupOptions()))  # fmt: skip
        print(f"(b) sparse update, {name}: {best_ms(update, table, opt.init(table), ids, grads):.1f} ms")
    dedupe = jax.jit(lambda i, g: sparse_optim.dedupe_row_grads(i, g, ROWS))
    print(f"(b) deduplication alone: {best_ms(dedupe, ids, grads):.1f} ms")
    dense = jax.jit(lambda t, g: t - 1e-3 * g)
    print(f"(c) elementwise update of the whole {ROWS:,}-row table: {best_ms(dense, table, jnp.ones_like(table)):.2f} ms")


if __name__ == "__main__":
    main()
