r"""Serving: export time, SavedModel size, CPU latency and throughput of the SavedModel beside JAX's jitted eval.

    python benchmarks/serving.py [--models=dcnv2,interformer] [--work_dir=/tmp/ctr_serving_bench]

Per model (DCNv2 on Criteo with ``configs/criteo_dcnv2.gin``, InterFormer on TaobaoAds with
``configs/taobao_interformer.gin``, both on synthetic raw data prepared with the shipped data configs, so
per-feature vocabulary tables): trains ``--steps`` steps, exports (restore + conversion + save, timed), then
scores raw rows of the dataset's own layout:

- SavedModel: ``serving_default`` on raw string columns, in a child process that cannot import JAX (as TF
  Serving would run it, minus the server): latency p50/p99 of one call at batch 1 and 256, examples/s at
  batch 1024. Preprocessing (fingerprints, vocabularies, row ids) is inside.
- JAX: the trainer's jitted forward pass on the same rows, from the host batch the training reader produced
  (numpy ``host_ids`` per call included; parsing the raw text is not, as it happens in the reader).

Both run on this machine's CPUs; the load average is printed with every figure (shared machines vary).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve_child":
    # The SavedModel side: no JAX in this process.
    sys.modules["jax"] = None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    with open(sys.argv[2], "rb") as f:
        job = pickle.load(f)
    fn = tf.saved_model.load(job["path"]).signatures["serving_default"]
    columns = {k: tf.constant(v) for k, v in job["columns"].items()}
    out = {}
    for batch, calls in ((1, 300), (256, 60), (1024, 20)):
        part = {k: v[:batch] for k, v in columns.items()}
        for _ in range(5):
            fn(**part)["probability"].numpy()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn(**part)["probability"].numpy()
            times.append(time.perf_counter() - start)
        out[batch] = times
    print(json.dumps(out))
    sys.exit(0)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from ctr import export as export_lib  # noqa: E402
from ctr import prepare, serving, trainer  # noqa: E402
from ctr import train as train_cli
from ctr import train_state as train_state_lib  # noqa: E402
from ctr.data import criteo, raw, splits, synthetic, taobao  # noqa: E402
from ctr.data import row_accounting  # noqa: E402
from ctr.data import rows as rows_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["dcnv2", "interformer"], "Models to measure (dcnv2: Criteo, interformer: TaobaoAds).")
flags.DEFINE_string("work_dir", "/tmp/ctr_serving_bench", "Raw data, prepared data, runs and exports.")
flags.DEFINE_integer("steps", 30, "Training steps before the export.")
flags.DEFINE_integer("batch_size", 1024, "Training batch size.")
flags.DEFINE_integer("criteo_rows", 200_000, "Synthetic Criteo rows.")
flags.DEFINE_integer("taobao_users", 3_000, "Synthetic TaobaoAds users.")

SETUP = {
    "dcnv2": ("criteo", "configs/criteo_dcnv2.gin", "configs/criteo_data.gin"),
    "interformer": ("taobao", "configs/taobao_interformer.gin", "configs/taobao_data.gin"),
}


def _load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def _data(dataset: str, data_gin: str) -> tuple[str, str]:
    raw_dir = os.path.join(FLAGS.work_dir, f"{dataset}_raw")
    out_dir = os.path.join(FLAGS.work_dir, f"{dataset}_prepared")
    if not os.path.isdir(raw_dir):
        os.makedirs(raw_dir + ".partial", exist_ok=True)
        if dataset == "criteo":
            synthetic.criteo.write_synthetic(os.path.join(raw_dir + ".partial", "train.txt"), FLAGS.criteo_rows, seed=0)
        else:
            synthetic.taobao.write_synthetic(raw_dir + ".partial", num_users=FLAGS.taobao_users, seed=0)
        os.replace(raw_dir + ".partial", raw_dir)
    if not os.path.isdir(out_dir):
        gin.clear_config()
        train_cli.parse_config([data_gin], [])
        spec = splits.SplitSpec("time", valid="test") if dataset == "taobao" else splits.SplitSpec()
        prepare.prepare(dataset, raw_dir, out_dir, spec, emit=lambda *_: None)
    return raw_dir, out_dir


def _rows(dataset: str, raw_dir: str, max_len: int, n: int = 1024):
    """(serving columns, the reader's host batch) of the first ``n`` raw rows."""
    if dataset == "criteo":
        lines = open(os.path.join(raw_dir, "train.txt")).read(400 * n).splitlines()[:n]
        blob = ("\n".join(lines) + "\n").encode()
        block = raw.Block("rows", np.frombuffer(blob, np.uint8), 1, n, False, len(blob))
        rows, _ = criteo.parse_block(block, int_buckets=True)
        fields = [line.split("\t") for line in lines]
        columns = {c: np.array([f[i] for f in fields], object) for i, c in enumerate(criteo.COLUMNS) if i}
        return columns, rows_lib.to_batch(criteo.feature_schema(True), rows.arrays())
    source = taobao.open_raw(raw_dir, processing=taobao.Processing(max_len=max_len), options=raw.ReadOptions(accounting=row_accounting.RowAccounting()))
    rows = rows_lib.Rows.concat(list(source.rows))
    batch = {k: v[:n] for k, v in rows_lib.to_batch(source.schema, rows.arrays()).items()}
    return serving.taobao_requests(raw_dir, max_len, limit=n), batch


def _stats(times: list[float], batch: int) -> dict[str, float]:
    t = np.asarray(times)
    return {"p50_ms": 1e3 * np.percentile(t, 50), "p99_ms": 1e3 * np.percentile(t, 99), "ex_per_s": batch / np.median(t)}


def _jax_times(restored, batch_np) -> dict[int, list[float]]:
    schema, collection = restored.schema, restored.collection
    module = train_state_lib.CTRModule(collection=collection, network=restored.module.network)
    vocab = restored.vocab  # prepared ids are already vocabulary-mapped; raw-reader ids need the mapping
    from ctr.data import vocab as vocab_lib

    vocab_of = vocab_lib.vocab_features(schema)
    batch_np = dict(batch_np)
    for name in schema.categorical if vocab is not None else ():
        batch_np[name] = vocab.apply(vocab_of[name], batch_np[name])
    for seq in schema.sequences if vocab is not None else ():
        batch_np[seq.name] = np.where(batch_np[seq.mask_key], vocab.apply(vocab_of[seq.name], batch_np[seq.name]), 0)

    @jax.jit
    def forward(params, tables, dev, ids):
        return module.network.logits(module.apply({"params": params}, collection.read_rows(tables, ids), dev, train=False))

    params, tables = jax.device_put(restored.params), jax.device_put(restored.tables)
    out = {}
    for batch, calls in ((1, 300), (256, 60), (1024, 20)):
        part = {k: v[:batch] for k, v in batch_np.items()}

        def call():
            ids = collection.host_ids(part)
            return np.asarray(forward(params, tables, train_state_lib.device_batch(schema, part), ids))

        for _ in range(5):
            call()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[batch] = times
    return out


def measure(model: str) -> dict:
    dataset, model_gin, data_gin = SETUP[model]
    raw_dir, out_dir = _data(dataset, data_gin)
    run_dir = os.path.join(FLAGS.work_dir, f"run_{model}")
    gin.clear_config()
    train_cli.parse_config([model_gin], [f'DATA_DIR = "{out_dir}"', f"train.num_steps = {FLAGS.steps}",
                                         f"train.batch_size = {FLAGS.batch_size}", 'train.final_eval_splits = ("test",)',
                                         "train.eval_every = 0", "train.progress = False"])  # fmt: skip
    if not os.path.exists(os.path.join(run_dir, "results.json")):
        trainer.train(run_dir=run_dir)
    export_lib.parse_run_config(run_dir)
    export_dir = os.path.join(FLAGS.work_dir, f"export_{model}")
    start = time.time()
    path = export_lib.export(run_dir, export_dir, verbose=False)
    export_s = time.time() - start
    load_export = _load()
    restored = export_lib.restore(run_dir)
    max_len = restored.schema.sequences[0].max_len if restored.schema.sequences else 0
    columns, batch = _rows(dataset, raw_dir, max_len)
    jax_times = _jax_times(restored, batch)
    load_jax = _load()
    gin.clear_config()
    job = os.path.join(FLAGS.work_dir, f"job_{model}.pkl")
    with open(job, "wb") as f:
        pickle.dump({"path": path, "columns": columns}, f)
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve_child", job], check=True,
                           capture_output=True, text=True)  # fmt: skip
    tf_times = {int(k): v for k, v in json.loads(child.stdout.strip().splitlines()[-1]).items()}
    def megabytes(sub: str) -> float:
        top = os.path.join(path, sub)
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(top) for f in fs) / 1e6
    table_bytes = sum(t.nbytes for t in restored.tables.values())
    return {
        "model": model, "dataset": dataset, "export_s": export_s, "load_during_export": load_export,
        "saved_model_pb_mb": os.path.getsize(os.path.join(path, "saved_model.pb")) / 1e6,
        "total_mb": megabytes(""), "variables_mb": megabytes("variables"), "assets_mb": megabytes("assets"),
        "table_mb": table_bytes / 1e6,
        "savedmodel": {b: _stats(t, b) for b, t in tf_times.items()}, "load_savedmodel": _load(),
        "jax": {b: _stats(t, b) for b, t in jax_times.items()}, "load_jax": load_jax,
    }  # fmt: skip


def main(argv):
    del argv
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    print(f"{jax.device_count()} JAX device(s), {os.cpu_count()} CPUs")
    for model in FLAGS.models:
        r = measure(model)
        print(f"\n{model} on synthetic {r['dataset']}: export {r['export_s']:.1f}s ({r['load_during_export']}), "
              f"saved_model.pb {r['saved_model_pb_mb']:.2f} MB, variables/ {r['variables_mb']:.1f} MB (tables "
              f"{r['table_mb']:.1f} MB), assets/ {r['assets_mb']:.1f} MB, {r['total_mb']:.1f} MB in all")  # fmt: skip
        print("| | batch 1 p50 / p99 ms | batch 256 p50 / p99 ms | batch 1024 examples/s |")
        print("| --- | ---: | ---: | ---: |")
        for side, label, load in (("savedmodel", "SavedModel (raw strings in)", r["load_savedmodel"]),
                                  ("jax", "JAX jitted eval (reader's ids in)", r["load_jax"])):  # fmt: skip
            s = r[side]
            print(f"| {label} | {s[1]['p50_ms']:.2f} / {s[1]['p99_ms']:.2f} | {s[256]['p50_ms']:.2f} / "
                  f"{s[256]['p99_ms']:.2f} | {s[1024]['ex_per_s']:,.0f} | ({load})")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
