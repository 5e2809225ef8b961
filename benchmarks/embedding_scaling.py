"""Train-step time versus embedding-table size, and against the same model in Keras.

One step = table lookup + DCNv2 forward/backward + sparse table update + dense Adam, jitted with the state
donated, on a Criteo-layout batch (26 categorical features, 13 dense, batch 4096, all features 16 wide in one
stacked per-feature table). The same step runs with a small and a large table (100k and 10M rows by default);
a step's cost should follow the batch, not the table. Then the same 10M-row model in Keras (tf-keras, as
tensorflow-recommenders uses it: ``tf.keras.layers.Embedding`` + ``tfrs.layers.dcn.Cross``) trains with
stock Adam (whose sparse gradient still updates every row's moments and weights) and with stock Adagrad
(already sparse).

Timing: after compiling and warming up, configurations are measured in interleaved rounds of ``--steps``
steps each (so load from other processes spreads over all of them); each configuration reports the median
round. Ids are Zipf-distributed over a large vocabulary per feature, pre-hashed and already on the device,
so input processing is not timed.

    PYTHONPATH=. TF_USE_LEGACY_KERAS=1 python benchmarks/embedding_scaling.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tensorflow-recommenders needs tf-keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ctr.data import criteo  # noqa: E402
from ctr.data import schema as schema_lib  # noqa: E402
from ctr.models.dcnv2 import DCNv2  # noqa: E402
from embeddings import per_feature_tables, sparse_optim  # noqa: E402

CROSS_LAYERS, CROSS_RANK, MLP = 1, 32, (128, 64)


def make_batches(num_batches: int, batch_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Host batches in the Criteo layout: Zipf(1.1) value ranks over 10^6 values per feature, fingerprinted."""
    rng = np.random.default_rng(seed)
    schema = criteo.feature_schema()
    batches = []
    for _ in range(num_batches):
        batch = {
            schema_lib.LABEL: rng.integers(0, 2, batch_size).astype(np.float32),
            schema_lib.DENSE: rng.normal(size=(batch_size, schema.num_dense)).astype(np.float32),
        }
        for f, name in enumerate(schema.categorical):
            rank = np.minimum(rng.zipf(1.1, batch_size), 10**6)
            batch[name] = (rank * 0x9E3779B1 + f * 0x85EBCA77) % (2**63 - 1)
        batches.append(batch)
    return batches


class CTRModel(nn.Module):
    collection: object

    @nn.compact
    def __call__(self, rows, batch):
        inputs = self.collection.combine(rows, batch)
        return DCNv2(num_cross_layers=CROSS_LAYERS, cross_rank=CROSS_RANK, mlp=MLP)(inputs, train=True)


def ctr_runner(table_rows: int, optimizer, host_batches, dim: int) -> Callable[[], None]:
    """Returns ``run_one_step()`` for a ctr model whose stacked table has ~``table_rows`` rows."""
    schema = criteo.feature_schema()
    collection = per_feature_tables(schema, dim=dim, num_buckets=table_rows // len(schema.categorical))
    model, tx = CTRModel(collection), optax.adam(1e-3)
    batches = [
        ({k: jnp.asarray(b[k]) for k in (schema_lib.LABEL, schema_lib.DENSE)}, jax.device_put(collection.host_ids(b)))
        for b in host_batches
    ]

    def init(rng):
        tables = collection.init(rng)
        params = model.init(rng, collection.read_rows(tables, batches[0][1]), batches[0][0])["params"]
        return tables, {n: optimizer.init(t) for n, t in tables.items()}, params, tx.init(params), jnp.int32(0)

    def step(state, batch, ids):
        tables, slots, params, opt_state, t = state
        rows = collection.read_rows(tables, ids)

        def loss_fn(params, rows):
            logits = model.apply({"params": params}, rows, batch)
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch[schema_lib.LABEL]))

        _, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, rows)
        updates, opt_state = tx.update(g_params, opt_state, params)
        tables, slots = collection.sparse_update(tables, slots, ids, g_rows, optimizer, t)
        return tables, slots, optax.apply_updates(params, updates), opt_state, t + 1

    step = jax.jit(step, donate_argnums=0)
    state = [jax.jit(init)(jax.random.key(0))]
    cursor = [0]

    def run_one_step():
        batch, ids = batches[cursor[0] % len(batches)]
        cursor[0] += 1
        state[0] = step(state[0], batch, ids)

    def sync():
        jax.block_until_ready(state[0])

    run_one_step.sync = sync
    run_one_step.table_rows = next(iter(collection.tables.values())).num_rows
    return run_one_step


def keras_runner(table_rows: int, optimizer_name: str, host_batches, dim: int) -> Callable[[], None]:
    """The same model in tf-keras: one Embedding of the same rows, TFRS Cross layers, Dense MLP."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    schema = criteo.feature_schema()
    collection = per_feature_tables(schema, dim=dim, num_buckets=table_rows // len(schema.categorical))
    rows = next(iter(collection.tables.values())).num_rows
    n_cat = len(schema.categorical)
    ids_in = tf.keras.Input((n_cat,), dtype=tf.int32)
    dense_in = tf.keras.Input((schema.num_dense,), dtype=tf.float32)
    emb = tf.keras.layers.Embedding(
        rows, dim, embeddings_initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05)
    )(ids_in)
    x0 = tf.keras.layers.Concatenate()([tf.keras.layers.Reshape((n_cat * dim,))(emb), dense_in])
    x = x0
    for _ in range(CROSS_LAYERS):
        x = tfrs.layers.dcn.Cross(projection_dim=CROSS_RANK)(x0, x)
    for width in MLP:
        x = tf.keras.layers.Dense(width, activation="relu")(x)
    model = tf.keras.Model([ids_in, dense_in], tf.keras.layers.Dense(1)(x))
    optimizer = {"adam": tf.keras.optimizers.Adam(1e-3), "adagrad": tf.keras.optimizers.Adagrad(0.05)}[optimizer_name]
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)

    batches = []
    for b in host_batches:
        ids = collection.host_ids(b)
        stacked = np.stack([ids[name] for name in schema.categorical], axis=1)
        batches.append(tuple(tf.constant(x) for x in (stacked, b[schema_lib.DENSE], b[schema_lib.LABEL][:, None])))

    @tf.function
    def step(ids, dense, label):
        with tf.GradientTape() as tape:
            loss = loss_fn(label, model([ids, dense], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    cursor, last = [0], [None]

    def run_one_step():
        last[0] = step(*batches[cursor[0] % len(batches)])
        cursor[0] += 1

    def sync():
        if last[0] is not None:
            last[0].numpy()

    run_one_step.sync = sync
    run_one_step.table_rows = rows
    return run_one_step


def measure(runners: dict[str, Callable[[], None]], steps: int, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each runner over interleaved rounds."""
    for run in runners.values():
        for _ in range(warmup):
            run()
        run.sync()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            run.sync()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--small_rows", type=int, default=100_000)
    parser.add_argument("--large_rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keras_steps", type=int, default=3, help="steps per timed round for Keras")
    parser.add_argument("--skip_keras", action="store_true")
    args = parser.parse_args()

    host_batches = make_batches(4, args.batch_size)
    print(f"devices: {jax.devices()}; batch {args.batch_size}; 26 features x {args.dim}; DCNv2 "
          f"{CROSS_LAYERS} cross (rank {CROSS_RANK}) + MLP {MLP}")

    ctr = {
        "ctr SparseAdam, small table": ctr_runner(args.small_rows, sparse_optim.SparseAdam(), host_batches, args.dim),
        "ctr SparseAdam, large table": ctr_runner(args.large_rows, sparse_optim.SparseAdam(), host_batches, args.dim),
        "ctr SparseAdagrad, large table": ctr_runner(
            args.large_rows, sparse_optim.SparseAdagrad(), host_batches, args.dim
        ),
    }
    results = measure(ctr, args.steps, args.rounds, warmup=3)
    rows = {name: run.table_rows for name, run in ctr.items()}
    del ctr  # free the device tables before Keras allocates its own
    if not args.skip_keras:
        keras = {
            "Keras Adam, large table": keras_runner(args.large_rows, "adam", host_batches, args.dim),
            "Keras Adagrad, large table": keras_runner(args.large_rows, "adagrad", host_batches, args.dim),
        }
        results |= measure(keras, args.keras_steps, args.rounds, warmup=2)
        rows |= {name: run.table_rows for name, run in keras.items()}

    print("\n| configuration | table rows | ms/step | examples/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in results.items():
        print(f"| {name} | {rows[name]:,} | {seconds * 1e3:.1f} | {args.batch_size / seconds:,.0f} |")
    large, small = results["ctr SparseAdam, large table"], results["ctr SparseAdam, small table"]
    print(f"\nstep time, large / small table (ctr SparseAdam): {large / small:.2f}")
    if not args.skip_keras:
        print(f"examples/s, ctr SparseAdam / Keras Adam: {results['Keras Adam, large table'] / large:.1f}x")
        print(
            "examples/s, ctr SparseAdagrad / Keras Adagrad: "
            f"{results['Keras Adagrad, large table'] / results['ctr SparseAdagrad, large table']:.2f}x"
        )


if __name__ == "__main__":
    main()
