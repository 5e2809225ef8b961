r"""ctr against Keras + tensorflow-recommenders on the same rows: test AUC, logloss, examples/s, peak RSS.

The same model on both sides (``--model``), with one embedding table per feature, indexed by the prepared
vocabulary (values seen >= 10 times in train; one OOV row), 16 wide; one epoch at batch 4096:

- ``dcnv2``: the 16-wide embeddings and the 13 dense ``log(1+x)`` inputs (Criteo) concatenated, 3 full-rank
  cross layers parallel with an MLP 400-400, one logit over both.
- ``dlrm``: the shape of the DLRM reference's Criteo Kaggle runs (``--arch-mlp-bot=13-512-256-64-16
  --arch-mlp-top=512-256-1``): the dense inputs through a ReLU bottom MLP 512-256-64-16, the dot products of
  all distinct pairs of [bottom output, embeddings] (``tfrs.layers.feature_interaction.DotInteraction``)
  next to the bottom output, a ReLU top MLP 512-256 and the logit. Avazu has no dense features: the top MLP
  sees the embeddings' pairwise dots alone. ``DotInteraction`` selects the triangle by ``tf.boolean_mask``,
  which XLA cannot compile (its output shape is not static), so with ``jit_compile`` the Keras side takes the
  same triangle, in the same order, by a ``tf.gather`` of fixed positions: the same function.

- Data: ctr's synthetic generator in the raw layout (Criteo: 1.5M rows split at random 1.2M / 100k / 200k;
  Avazu: 11 days, day 10 valid, day 11 test), prepared once by ``ctr.prepare``; both sides read the same
  prepared rows and the same vocabulary.
- ctr: ``configs/<dataset>_<model>.gin`` as shipped (its optimizers and learning rates), with only the model
  shape bound to the peer's, through ``ctr.train`` in its own process. examples/s is the steady rate it logs
  after the first window (which holds the compilation).
- Keras + TFRS: ``tfrs.layers.dcn.Cross`` or ``DotInteraction``, ``tf.keras.layers.Embedding`` tables, Adam
  1e-3 on everything (TFRS's documented DCN and DLRM setting), in its own process. Its input is the best we
  found for it: the rows already as int32 vocabulary positions in memory, shuffled and cut into whole batches
  up front, fed as one batch per ``tf.data`` element (no per-example work at all). The first seed runs with
  and without ``jit_compile`` (XLA), the other seeds in the faster of the two; the ratio is against the
  faster. examples/s is timed over the epoch after a 20-step warm-up.
- Both sides' test AUC and logloss come from ``ctr.metrics`` over their logits (exact AUC); >= 3 seeds, mean
  and spread (half the max-min range). Peak RSS is each worker's ``VmHWM``.

    PYTHONPATH=. python benchmarks/peers.py --dataset=criteo --seeds=0,1,2
    PYTHONPATH=. python benchmarks/peers.py --dataset=avazu --seeds=0,1,2
    PYTHONPATH=. python benchmarks/peers.py --dataset=criteo --model=dlrm --seeds=0,1,2
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tensorflow-recommenders needs Keras 2
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: configs/, and ctr for workers

DATASET = flags.DEFINE_enum("dataset", "criteo", ["criteo", "avazu"], "Raw layout of the synthetic data.")
MODEL = flags.DEFINE_enum("model", "dcnv2", ["dcnv2", "dlrm"], "The model both sides train (see above).")
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (the data is the same for all).")
SYSTEMS = flags.DEFINE_list("systems", ["ctr", "keras"], "Which sides to run.")
ROWS = flags.DEFINE_integer("rows", None, "Raw rows to generate (default: Criteo 1.5M, Avazu 2.2M).")
EPOCHS = flags.DEFINE_float("epochs", 1.0, "Training epochs.")
OUT = flags.DEFINE_string("out", None, "Directory for data and runs (default: a temporary one; reused if given).")
BINDINGS = flags.DEFINE_multi_string("binding", [], "Extra gin bindings for the ctr side (ablations).")
WORKER = flags.DEFINE_enum("worker", None, ["ctr", "keras"], "Internal: run one side in this process.")
DATA = flags.DEFINE_string("data", None, "Internal: prepared data directory.")
SEED = flags.DEFINE_integer("seed", 0, "Internal: the worker's seed.")
JIT = flags.DEFINE_boolean("jit_compile", False, "Internal: Keras jit_compile.")
RESULT = flags.DEFINE_string("result", None, "Internal: where the worker writes its JSON result.")

BATCH = 4096
EMBED_DIM = 16
MLP = (400, 400)
CROSS_LAYERS = 3
BOTTOM_MLP = (512, 256, 64)  # DLRM: and a last layer of width EMBED_DIM
TOP_MLP = (512, 256)  # DLRM: and the logit
SHAPE_BINDINGS = {
    "dcnv2": [
        "DCNv2.structure = 'parallel'",
        f"DCNv2.num_cross_layers = {CROSS_LAYERS}",
        "DCNv2.cross_rank = None",
        f"DCNv2.mlp = {MLP}",
        "DCNv2.dropout = 0.0",
        f"build_collection.default_dim = {EMBED_DIM}",
    ],
    "dlrm": [
        f"DLRM.dim = {EMBED_DIM}",
        f"DLRM.bottom_mlp = {BOTTOM_MLP}",
        f"DLRM.top_mlp = {TOP_MLP}",
        "DLRM.dropout = 0.0",
        f"build_collection.default_dim = {EMBED_DIM}",
    ],
}


def _dense_flops(widths: tuple[int, ...]) -> int:
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def model_flops_per_example(num_categorical: int, num_dense: int) -> float:
    """Multiply-adds x2 of one forward pass of ``--model`` (shapes above) on ``num_categorical`` embeddings and
    ``num_dense`` dense inputs, x3 for forward + backward (the usual training estimate)."""
    if MODEL.value == "dcnv2":
        d = num_categorical * EMBED_DIM + num_dense
        forward = CROSS_LAYERS * 2 * d * d + _dense_flops((d,) + MLP)
        forward += 2 * (d + MLP[-1])  # the logit over [cross, deep]
    else:
        tokens = num_categorical + bool(num_dense)
        forward = _dense_flops((num_dense, *BOTTOM_MLP, EMBED_DIM)) if num_dense else 0
        forward += 2 * tokens * tokens * EMBED_DIM  # the whole Gram matrix, as both sides compute it
        top_in = EMBED_DIM * bool(num_dense) + tokens * (tokens - 1) // 2
        forward += _dense_flops((top_in, *TOP_MLP, 1))
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


# -- data -------------------------------------------------------------------------------------------------------
def make_data(out: str) -> str:
    """Synthetic raw files -> ``ctr.prepare`` (min count 10) -> the prepared directory (reused when present)."""
    import gin

    from ctr import prepare
    from ctr.data import avazu, criteo, splits, synthetic

    data_dir = os.path.join(out, f"{DATASET.value}_prepared")
    if os.path.exists(os.path.join(data_dir, "metadata.json")):
        return data_dir
    raw_dir = os.path.join(out, f"{DATASET.value}_raw")
    os.makedirs(raw_dir, exist_ok=True)
    gin.clear_config()
    if DATASET.value == "criteo":
        rows = ROWS.value or 1_500_000
        synthetic.criteo.write_synthetic(os.path.join(raw_dir, "train.txt"), rows, seed=0)
        gin.parse_config(["criteo.Processing.int_buckets = True", "criteo.Processing.min_count = 10"])
        spec = splits.SplitSpec("random", (0.8, 1 / 15, 2 / 15))
    else:
        rows = ROWS.value or 2_200_000
        synthetic.avazu.write_synthetic(os.path.join(raw_dir, "train.csv"), rows, seed=0, days=11)
        gin.parse_config(["avazu.Processing.min_count = 10"])
        spec = splits.SplitSpec("time", valid="20141030")
    prepare.prepare(DATASET.value, raw_dir, data_dir, spec, shard_bytes=64 << 20)
    gin.clear_config()
    return data_dir


# -- workers ----------------------------------------------------------------------------------------------------
def run_ctr_worker() -> dict:
    import gin
    import jax

    from ctr import train as train_cli
    from ctr import trainer

    # Named after the result (seed and bindings), so that two comparisons sharing --out never share a run.
    run_dir = os.path.splitext(RESULT.value)[0] + "_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an earlier one
    gin.clear_config()
    train_cli.parse_config(
        [os.path.join(REPO, "configs", f"{DATASET.value}_{MODEL.value}.gin")],
        SHAPE_BINDINGS[MODEL.value]
        + [
            f'DATA_DIR = "{DATA.value}"',
            f"train.num_epochs = {EPOCHS.value}",
            f"train.seed = {SEED.value}",
            "train.log_every = 20",
            "train.eval_every = 0",
            "train.progress = False",
            "Checkpointer.every_steps = 0",
        ]
        + BINDINGS.value,
    )
    results = trainer.train(run_dir=run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if "train/examples_per_s" in line]
    timed = logged[1:]  # the first window holds the compilation
    seconds = sum(20 * BATCH / r["train/examples_per_s"] for r in timed)
    rate = len(timed) * 20 * BATCH / seconds
    peak = measure_matmul_peak()
    return {
        "valid": results["valid"],
        "test": results["test"],
        "examples_per_s": rate,
        "matmul_peak_flops": peak,
        "devices": jax.device_count(),
        "steps": results["steps"],
    }


def run_keras_worker() -> dict:
    import numpy as np
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    from ctr import metrics
    from ctr.data import prepared, vocab

    tf.keras.utils.set_random_seed(SEED.value)
    data = prepared.prepared(DATA.value)
    kept = prepared.vocabularies(DATA.value)
    schema = data.schema

    def arrays(split: str):
        batch = next(data.eval_batches(split, data.num_rows(split)))[0]
        features = {name: vocab.index(kept[name], batch[name]).astype(np.int32) for name in schema.categorical}
        if schema.dense:
            features["dense_input"] = batch["dense"].astype(np.float32)
        return features, batch["label"].astype(np.float32)

    train_x, train_y = arrays("train")
    n = len(train_y)
    steps_per_epoch = n // BATCH
    num_steps = max(1, round(EPOCHS.value * steps_per_epoch))
    # Whole batches up front, one per tf.data element, every epoch in its own order (seeded).
    rng = np.random.default_rng(SEED.value)
    orders = [rng.permutation(n)[: steps_per_epoch * BATCH] for _ in range(-(-num_steps // steps_per_epoch))]
    order = np.concatenate(orders)[: num_steps * BATCH]

    def batched(values):
        return values[order].reshape((num_steps, BATCH) + values.shape[1:])

    ds = tf.data.Dataset.from_tensor_slices(
        ({k: batched(v) for k, v in train_x.items()}, batched(train_y))
    ).prefetch(tf.data.AUTOTUNE)

    inputs = {name: tf.keras.Input((), dtype=tf.int32, name=name) for name in schema.categorical}
    embedded = [
        tf.keras.layers.Embedding(len(kept[name]) + 1, EMBED_DIM, name=f"emb_{name}")(inputs[name])
        for name in schema.categorical
    ]
    if schema.dense:
        inputs["dense_input"] = tf.keras.Input((len(schema.dense),), name="dense_input")
    if MODEL.value == "dcnv2":
        x0 = tf.keras.layers.Concatenate()(embedded + ([inputs["dense_input"]] if schema.dense else []))
        x = x0
        for _ in range(CROSS_LAYERS):
            x = tfrs.layers.dcn.Cross()(x0, x)
        deep = x0
        for width in MLP:
            deep = tf.keras.layers.Dense(width, activation="relu")(deep)
        logit = tf.keras.layers.Dense(1)(tf.keras.layers.Concatenate()([x, deep]))
    else:
        tokens, top = embedded, []
        if schema.dense:
            bottom = inputs["dense_input"]
            for width in BOTTOM_MLP + (EMBED_DIM,):
                bottom = tf.keras.layers.Dense(width, activation="relu")(bottom)
            tokens, top = [bottom] + embedded, [bottom]
        if JIT.value:
            rows, cols = np.tril_indices(len(tokens), k=-1)  # DotInteraction's order
            stacked = tf.keras.layers.Lambda(lambda t: tf.stack(t, axis=1))(tokens)
            gram = tf.keras.layers.Lambda(lambda t: tf.matmul(t, t, transpose_b=True))(stacked)
            flat = tf.keras.layers.Reshape((len(tokens) ** 2,))(gram)
            dots = tf.keras.layers.Lambda(lambda g: tf.gather(g, rows * len(tokens) + cols, axis=1))(flat)
        else:
            dots = tfrs.layers.feature_interaction.DotInteraction()(tokens)
        top = tf.keras.layers.Concatenate()(top + [dots])
        for width in TOP_MLP:
            top = tf.keras.layers.Dense(width, activation="relu")(top)
        logit = tf.keras.layers.Dense(1)(top)
    model = tf.keras.Model(inputs, logit)
    model.compile(
        tf.keras.optimizers.Adam(1e-3),
        tf.keras.losses.BinaryCrossentropy(from_logits=True),
        jit_compile=JIT.value,
    )

    class Timer(tf.keras.callbacks.Callback):
        warmup = 20

        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 == self.warmup:
                self.start = time.perf_counter()

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    model.fit(ds, epochs=1, verbose=0, callbacks=[timer])
    rate = (num_steps - timer.warmup) * BATCH / timer.seconds

    def evaluate(split: str) -> dict:
        x, y = arrays(split)
        logits = model.predict(x, batch_size=16384, verbose=0)[:, 0]
        return metrics.evaluate(y, logits.astype(np.float64))

    return {"valid": evaluate("valid"), "test": evaluate("test"), "examples_per_s": rate, "steps": num_steps}


# -- driver -----------------------------------------------------------------------------------------------------
def _configs_digest() -> str:
    """A digest of every file under ``configs/`` (the ctr side's config and whatever it includes)."""
    root = os.path.join(REPO, "configs")
    digest = hashlib.sha1()
    for dirpath, _, filenames in sorted(os.walk(root)):
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def spawn(worker: str, data_dir: str, seed: int, out: str, jit: bool = False) -> dict:
    """Runs one side in a fresh process; a result already in ``out`` for the same inputs is reused (so an
    interrupted comparison can be resumed), the ctr side's keyed by its extra bindings and the shipped configs'
    contents (an edited config must not reuse the result of the one before)."""
    key = f"{DATASET.value}_{worker}_{seed}_{int(jit)}" + ("" if MODEL.value == "dcnv2" else f"_{MODEL.value}")
    if worker == "ctr":
        key += "_" + hashlib.sha1("\n".join(BINDINGS.value + [_configs_digest()]).encode()).hexdigest()[:10]
    result = os.path.join(out, f"result_{key}_{EPOCHS.value:g}ep.json")
    if os.path.exists(result):
        with open(result) as f:
            return json.load(f)
    cmd = [
        sys.executable, os.path.abspath(__file__), f"--worker={worker}", f"--data={data_dir}", f"--seed={seed}",
        f"--dataset={DATASET.value}", f"--model={MODEL.value}", f"--epochs={EPOCHS.value}", f"--result={result}",
        f"--{'' if jit else 'no'}jit_compile",
    ] + [f"--binding={b}" for b in BINDINGS.value]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    subprocess.run(cmd, check=True, env=env)
    with open(result) as f:
        return json.load(f)


def print_collisions(data_dir: str) -> None:
    """What vocabulary-position indexing fixes: the kept values against the distinct rows they would occupy in
    tables of the same size addressed by the salted bucket hash (ctr's per-feature tables before)."""
    import numpy as np

    from ctr.data import prepared
    from embeddings import hashing

    kept = prepared.vocabularies(data_dir)
    values = sum(len(v) for v in kept.values())
    hashed = sum(len(np.unique(hashing.bucket_np(v, hashing.salt(n, 0), len(v) + 1))) for n, v in kept.items())
    print(f"vocabulary: {values:,} kept values; hashed into tables of that size they would occupy {hashed:,} "
          f"distinct rows ({1 - hashed / values:.1%} fewer rows than values); indexed by position, {values:,}")


def peak_rss_mib() -> float:
    """This process's peak resident memory since its exec, in MiB.

    Not ``ru_maxrss``: Linux keeps the high-water mark of the address space an exec replaces, so a worker
    started from the (large) parent reports the parent's peak. ``VmHWM`` belongs to the current address space.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.4f} ± {(max(values) - min(values)) / 2:.4f}"


def main(argv):
    if WORKER.value:
        result = run_ctr_worker() if WORKER.value == "ctr" else run_keras_worker()
        result["peak_rss_mib"] = peak_rss_mib()
        with open(RESULT.value, "w") as f:
            json.dump(result, f)
        return
    out = OUT.value or tempfile.mkdtemp(prefix="ctr-peers-")
    os.makedirs(out, exist_ok=True)
    t = time.time()
    data_dir = make_data(out)
    print(f"data: {data_dir} ({time.time() - t:.0f} s)", flush=True)
    print_collisions(data_dir)
    seeds = [int(s) for s in SEEDS.value]
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        if "ctr" in SYSTEMS.value:
            runs.setdefault("ctr", []).append(spawn("ctr", data_dir, seed, out))
            print("ctr", seed, json.dumps(runs["ctr"][-1]), flush=True)
        if "keras" in SYSTEMS.value:
            for jit in (False, True) if seed == seeds[0] else (faster_jit,):
                runs.setdefault(f"keras_jit{int(jit)}", []).append(spawn("keras", data_dir, seed, out, jit))
                print(f"keras jit_compile={jit}", seed, json.dumps(runs[f"keras_jit{int(jit)}"][-1]), flush=True)
            if seed == seeds[0]:  # later seeds run only the faster mode (the AUC does not depend on it)
                faster_jit = runs["keras_jit1"][0]["examples_per_s"] > runs["keras_jit0"][0]["examples_per_s"]

    from ctr.data import prepared

    metadata = prepared.read_metadata(data_dir)
    flops = model_flops_per_example(len(metadata["schema"]["categorical"]), len(metadata["schema"]["dense"]))
    print(f"\n{DATASET.value}, {MODEL.value}: train {metadata['splits']['train']['rows']:,} rows, "
          f"{EPOCHS.value} epoch(s), batch {BATCH}, seeds {seeds}; model {flops / 1e6:.2f} MFLOP per training example")
    print("| side | test AUC | test logloss | valid AUC | examples/s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    rates = {}
    for name, results in runs.items():
        rate = sum(r["examples_per_s"] for r in results) / len(results)
        rates[name] = rate
        print(f"| {name} | {_summary([r['test']['auc'] for r in results])} | "
              f"{_summary([r['test']['logloss'] for r in results])} | {_summary([r['valid']['auc'] for r in results])} | "
              f"{rate:,.0f} | {max(r['peak_rss_mib'] for r in results):,.0f} |")
    if "ctr" in runs:
        peak = max(r["matmul_peak_flops"] for r in runs["ctr"])
        print(f"ctr: {rates['ctr'] * flops / peak:.1%} of the measured f32 matmul peak ({peak / 1e9:.1f} GFLOP/s)")
    keras = [k for k in rates if k.startswith("keras")]
    if "ctr" in rates and keras:
        best = max(keras, key=lambda k: rates[k])
        auc = {k: sum(r["test"]["auc"] for r in runs[k]) / len(runs[k]) for k in ["ctr", best]}
        print(f"ctr / Keras ({best}, the faster): examples/s {rates['ctr'] / rates[best]:.2f}x, "
              f"test AUC {auc['ctr'] - auc[best]:+.4f}")


if __name__ == "__main__":
    app.run(main)
