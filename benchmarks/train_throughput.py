r"""Training throughput: ctr's DCNv2 versus the same model in Keras with tensorflow-recommenders' DCN layers.

Model (both sides): 26 categorical features with 16-wide embeddings (one table per feature, ``--buckets`` rows
each) and 13 dense features -> 3 full-rank cross layers -> MLP 400-400-400 -> logit; batch 4096; Adam (ctr: lazy
sparse Adam on the table rows, optax Adam on the rest; Keras: Adam on everything). Both read the same
synthetic Criteo-layout rows, already parsed (ids as int32 row indices), so the comparison is the training
step plus each framework's own input feeding.

ctr is timed through its real training loop (``ctr.trainer.train``: prefetch thread, sharded global batches,
loss read-backs every ``--log_every`` steps), from the examples/s it logs after the first window (which holds
the compilation). Keras is timed over ``model.fit`` steps after a warm-up epoch. The machine's matmul peak is
measured in the same process (float32 4096x4096 ``jnp.dot``) to report ctr's fraction of it.

    bazel run //benchmarks:train_throughput -- --steps=60
"""
from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tensorflow-recommenders needs Keras 2
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

STEPS = flags.DEFINE_integer("steps", 60, "Timed training steps per framework.")
BATCH = flags.DEFINE_integer("batch_size", 4096, "Global batch size.")
ROWS = flags.DEFINE_integer("rows", 300_000, "Synthetic rows generated (train split is 80%).")
BUCKETS = flags.DEFINE_integer("buckets", 10_000, "Embedding rows per feature.")
LOG_EVERY = flags.DEFINE_integer("log_every", 10, "ctr's loss read-back period (steps).")

EMBED_DIM = 16
MLP = (400, 400, 400)
CROSS_LAYERS = 3


def model_flops_per_example(num_cat: int, num_dense: int) -> float:
    """Multiply-adds x2 of one forward pass, x3 for forward + backward (the usual training estimate)."""
    d = num_cat * EMBED_DIM + num_dense
    forward = CROSS_LAYERS * 2 * d * d
    widths = (d,) + MLP + (1,)
    forward += sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    return 3.0 * forward


def measure_matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """Float32 FLOP/s of a jitted n x n matmul on the default device (best of ``repeats``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def run_ctr(data_dir: str, run_dir: str) -> float:
    import gin

    from ctr import train as train_cli
    from ctr import trainer

    gin.clear_config()
    train_cli.parse_config(
        [os.path.join(train_cli.REPO_ROOT, "configs/base/train.gin")],
        [
            "train.dataset_fn = @synthetic_criteo",
            f'synthetic_criteo.data_dir = "{data_dir}"',
            f"synthetic_criteo.num_rows = {ROWS.value}",
            'train.model_name = "dcnv2"',
            f"train.batch_size = {BATCH.value}",
            f"train.num_steps = {STEPS.value + LOG_EVERY.value}",
            f"train.log_every = {LOG_EVERY.value}",
            "train.final_eval_splits = ()",
            "train.progress = False",
            "train.sparse_optimizer = @SparseAdam()",
            f"per_feature_tables.dim = {EMBED_DIM}",
            f"per_feature_tables.num_buckets = {BUCKETS.value}",
            f"DCNv2.num_cross_layers = {CROSS_LAYERS}",
            f"DCNv2.mlp = {MLP}",
            "Checkpointer.every_steps = 0",
        ],
    )
    trainer.train(run_dir=run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "train/examples_per_s" in line]
    timed = rows[1:]  # the first window includes compilation
    steps = sum(LOG_EVERY.value for _ in timed)
    seconds = sum(LOG_EVERY.value * BATCH.value / r["train/examples_per_s"] for r in timed)
    return steps * BATCH.value / seconds


def run_keras(data_dir: str) -> float:
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    from ctr.data import dataset as dataset_lib
    from embeddings.per_feature import per_feature_tables

    data = dataset_lib.synthetic_criteo(data_dir=data_dir, num_rows=ROWS.value)
    schema = data.schema
    collection = per_feature_tables(schema, dim=EMBED_DIM, num_buckets=BUCKETS.value)
    train = data.splits["train"]
    ids = collection.host_ids(train)
    # Per-feature tables in Keras: local row index = stacked index - the feature's offset.
    offsets = {lk.key: lk.offset for lk in collection.lookups}
    features = {name: ids[name] - offsets[name] for name in schema.categorical}
    features["dense_features"] = train["dense"]
    ds = (
        tf.data.Dataset.from_tensor_slices((features, train["label"]))
        .shuffle(100_000, seed=0)
        .repeat()
        .batch(BATCH.value, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    inputs = {name: tf.keras.Input((), dtype=tf.int32, name=name) for name in schema.categorical}
    inputs["dense_features"] = tf.keras.Input((schema.num_dense,), name="dense_features")
    embedded = [
        tf.keras.layers.Embedding(BUCKETS.value, EMBED_DIM, name=f"emb_{name}")(inputs[name])
        for name in schema.categorical
    ]
    x0 = tf.keras.layers.Concatenate()(embedded + [inputs["dense_features"]])
    x = x0
    for _ in range(CROSS_LAYERS):
        x = tfrs.layers.dcn.Cross()(x0, x)
    for width in MLP:
        x = tf.keras.layers.Dense(width, activation="relu")(x)
    logit = tf.keras.layers.Dense(1)(x)
    model = tf.keras.Model(inputs, logit)
    model.compile(tf.keras.optimizers.Adam(1e-3), tf.keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(ds, steps_per_epoch=LOG_EVERY.value, epochs=1, verbose=0)  # warm-up: tracing, graph build
    t = time.perf_counter()
    model.fit(ds, steps_per_epoch=STEPS.value, epochs=1, verbose=0)
    return STEPS.value * BATCH.value / (time.perf_counter() - t)


def main(argv):
    import jax

    from ctr.data import criteo

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        peak = measure_matmul_peak()
        ctr_rate = run_ctr(data_dir, os.path.join(tmp, "run"))
        keras_rate = run_keras(data_dir)
    flops = model_flops_per_example(len(criteo.CAT_FIELDS), len(criteo.INT_FIELDS))
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, batch {BATCH.value}, "
          f"{STEPS.value} timed steps, {BUCKETS.value} rows per table")
    print(f"matmul peak (f32, measured): {peak / 1e9:.1f} GFLOP/s")
    print(f"model: {flops / 1e6:.2f} MFLOP per training example")
    print(f"ctr DCNv2:           {ctr_rate:10,.0f} examples/s  ({ctr_rate * flops / peak:.1%} of matmul peak)")
    print(f"Keras + TFRS DCNv2:  {keras_rate:10,.0f} examples/s  ({keras_rate * flops / peak:.1%} of matmul peak)")
    print(f"ratio ctr / Keras:   {ctr_rate / keras_rate:.2f}")


if __name__ == "__main__":
    app.run(main)
