r"""Training throughput of ctr's real loop at the MLPerf DLRM-DCNv2 shape, against MLPerf's per-GPU rate.

One run prints every figure of issue 19 for the device it runs on (written for one GPU; runs anywhere):

- The MLPerf Training DLRM-DCNv2 shape (reference ``recommendation_v2/torchrec_dlrm``): 13 dense and 26
  categorical features with Criteo 1TB's table sizes (:data:`MLPERF_TABLE_ROWS`), each capped at
  ``--max_rows_per_table`` so that the tables fit one device (stated in the output); embeddings 128 wide; a
  bottom MLP 512-256-128 on the dense features (``DCNv2.bottom_mlp``); 3 low-rank cross layers of rank 512;
  a top MLP 1024-1024-512-256-1 after them (``DCNv2.structure = 'stacked'``); batch ``--batch`` (65,536).
  Dense Adagrad and row-wise Adagrad on the tables. ONE-HOT: ctr's categorical inputs are single-valued, so
  each example reads 26 rows where MLPerf's multi-hot Criteo reads 214 (:data:`MLPERF_MULTI_HOT`, summed
  bags): the lookups move ~8x fewer bytes than MLPerf's, which the ratio to 0.5M samples/s does not correct.
- A matrix over compute dtype (``--dtypes``: ``DCNv2.dtype``, with ``LookupOptions.rows_dtype`` following it)
  and lookup (``--lookups``): ``xla`` (``LookupOptions.path = 'xla'``: XLA's gather and scatter), ``kernel``
  (``path = 'shard_map'``, ``local_gather = 'kernel'``: ``kernels.lookup``, whose ``auto`` backend is the
  Pallas Triton kernel on CUDA and XLA's gather on CPU) and ``shard_map`` (the same routing with
  ``jnp.take``, which tells the routing's cost from the kernel's) and ``mosaic_gpu`` (the routing with the
  Mosaic GPU row gather, ``kernels.lookup_mosaic_gpu``: GPU only).
- The shipped ``configs/criteo_dcnv2.gin`` and ``configs/taobao_interformer.gin`` at their own batch and
  widths, float32, their tables hashed to ``--shipped_rows`` rows per feature instead of a prepared vocabulary.

Data: random in-memory rows at each schema (``--train_rows`` of them, cycled by the trainer's epoch order):
every categorical value is drawn Zipf(``--zipf``) over its feature's rows, fingerprinted and hashed by
``PerFeature`` as real data is; behaviour sequences get uniform lengths. The distinct ids per batch are printed.

How each figure is measured, per cell (each cell in its own process with ``--isolate``, so the peak memory
is the cell's own and a crash or OOM costs only that cell):

- examples/s: ``ctr.trainer.train`` itself (input thread, global batches, the jitted step with its sparse
  update, the loss window read at each log boundary), ``Checkpointer.enabled = False``, no evaluation;
  ``--windows`` log windows of ``--log_every`` steps after a first window that holds the compilation.
- step: ``--batch`` / that rate. Then the split, after the run, on a fresh state of the same shapes:
  ``device step``: the trainer's jitted step (``make_train_step``) on one fixed batch, no input, best of
  ``--reps``; ``lookup``, ``dense`` (forward, backward and the dense optimizer) and ``update`` (the sparse
  optimizer): the step's own parts (``ctr.trainer.step_phases``), each jitted alone (state donated), best
  of ``--reps``; their sum is printed against the device step (XLA fuses across the boundaries in the whole
  step, so it can be a little lower). ``input``: the trainer's producer (``ctr.trainer.device_inputs``: host
  batch, hashing to row ids, host-to-device transfer) alone, best of ``--reps`` batches; in training it runs on a
  background thread, so the loop's step is about max(input, device step) plus the per-boundary sync.
- peak memory: ``device.memory_stats()['peak_bytes_in_use']`` at the end of the cell ('n/a' where the
  backend reports none, e.g. CPU); in one process (``--noisolate``) it is the process's peak so far.
- ratio: examples/s / 500,000 (MLPerf's ~65M samples/s on 128 H100s, per GPU).

    PYTHONPATH=. python benchmarks/gpu_throughput.py                      # the full matrix (one GPU)
    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/gpu_throughput.py --tiny  # end to end, 2-3 min

``--lower_for=cuda`` only lowers every cell's train step at full size for CUDA, from shapes (no memory, no
device): the check a CPU machine can make of the GPU run's real shapes (tests/benchmarks runs it).
``--tiny`` keeps every structure but makes it narrow (:data:`TINY_BINDINGS`) and small: a smoke run of the
script, not a measurement.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, when run as a file

# MLPerf Training DLRM-DCNv2 (Criteo 1TB multi-hot), reference torchrec_dlrm: rows of the 26 tables, in
# feature order C1..C26 (--num_embeddings_per_feature), and the multi-hot bag sizes (--multi_hot_sizes).
MLPERF_TABLE_ROWS = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
                     11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36)  # fmt: skip
MLPERF_MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
MLPERF_PER_GPU = 500_000  # ~65M samples/s on 128 H100s
MLPERF_BINDINGS = [
    "train.model_name = 'dcnv2'",
    "DCNv2.structure = 'stacked'",
    "DCNv2.bottom_mlp = (512, 256, 128)",
    "DCNv2.num_cross_layers = 3",
    "DCNv2.cross_rank = 512",
    "DCNv2.mlp = (1024, 1024, 512, 256)",  # the top MLP; the logit layer of width 1 is DCNv2's own
    "DCNv2.dropout = 0.0",
    "train.embedding_fn = @build_collection",
    "build_collection.families = {'per_feature': @PerFeature()}",
    "build_collection.default_dim = 128",
    "dense_optimizer.name = 'adagrad'",
    "train.sparse_optimizer = @SparseRowwiseAdagrad()",
]
LOOKUPS = {
    "xla": ["LookupOptions.path = 'xla'"],
    "shard_map": ["LookupOptions.path = 'shard_map'", "LookupOptions.local_gather = 'take'"],
    "kernel": ["LookupOptions.path = 'shard_map'", "LookupOptions.local_gather = 'kernel'"],
    "mosaic_gpu": ["LookupOptions.path = 'shard_map'", "LookupOptions.local_gather = 'kernel'",
                   "LookupOptions.kernel_backend = 'mosaic_gpu'"],
}
SHIPPED = ("criteo_dcnv2", "taobao_interformer")
# --tiny: the same structures, narrow, so that the CPU run is about compilation, not arithmetic.
TINY_BINDINGS = {
    "mlperf": ["DCNv2.bottom_mlp = (16, 8)", "DCNv2.cross_rank = 8", "DCNv2.mlp = (32, 16)",
               "build_collection.default_dim = 8"],
    "criteo_dcnv2": ["DCNv2.mlp = (32, 32)"],
    "taobao_interformer": ["InterFormer.dim = 8", "InterFormer.head = (16,)", "DHENStack.dcn_rank = 8",
                           "build_collection.default_dim = 8"],
}  # fmt: skip
TINY_MAX_LEN = 8  # TaobaoAds behaviours per sequence under --tiny (50 otherwise)

TINY = flags.DEFINE_boolean("tiny", False, "Small sizes for a CPU run of the whole matrix (2-3 minutes on 2 busy "
                            "cores): overrides batch, rows, widths, windows and repeats.")  # fmt: skip
BATCH = flags.DEFINE_integer("batch", 65536, "Global batch of the MLPerf-shape cells.")
MAX_ROWS = flags.DEFINE_integer("max_rows_per_table", 10_000_000, "Cap on each MLPerf table's rows (the 40M-row "
                                "tables do not fit one device with their optimizer slots at full size).")  # fmt: skip
DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes of the MLPerf-shape cells (bfloat16 "
                            "first: the target is in bfloat16).")
LOOKUP_FLAG = flags.DEFINE_list("lookups", ["xla", "kernel"], f"Lookups of the MLPerf-shape cells: {sorted(LOOKUPS)}.")
SHIPPED_FLAG = flags.DEFINE_list("shipped", list(SHIPPED), "Shipped configs run at their own shapes (float32, xla).")
SHIPPED_ROWS = flags.DEFINE_integer("shipped_rows", 1_000_000, "Hashed rows per feature of the shipped configs.")
SHIPPED_BATCH = flags.DEFINE_integer("shipped_batch", None, "Batch of the shipped configs (default: theirs).")
TRAIN_ROWS = flags.DEFINE_integer("train_rows", None, "Rows of the synthetic train split (default 4 batches).")
ZIPF = flags.DEFINE_float("zipf", 1.1, "Zipf exponent of the categorical values (> 1).")
LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps per log window of the timed trainer run.")
WINDOWS = flags.DEFINE_integer("windows", 3, "Timed log windows after the first (which holds the compilation).")
REPS = flags.DEFINE_integer("reps", 10, "Repeats of each timed part of the split (the best counts, "
                            "step_breakdown.best_ms).")  # fmt: skip
PHASES = flags.DEFINE_boolean("phases", True, "Measure the step split after the trainer run.")
TOP_OPS = flags.DEFINE_integer("top_ops", 12, "With --phases: profile one whole step (jax.profiler) and print its "
                               "costliest ops, summed by name (0: no profile).")  # fmt: skip
ISOLATE = flags.DEFINE_boolean("isolate", True, "Run each cell in its own process (own peak memory; a crash "
                               "costs one cell).")  # fmt: skip
CELL_TIMEOUT = flags.DEFINE_integer("cell_timeout_s", 240, "With --isolate: a cell still running after this is "
                                    "killed and reported.")  # fmt: skip
BUDGET = flags.DEFINE_integer("budget_s", 0, "With --isolate: stop starting cells once this many seconds have "
                               "passed, and cut each cell's timeout to what is left, so the table is always "
                               "printed (0: no budget).")  # fmt: skip
CELLS = flags.DEFINE_list("cells", [], "Run only these cells (names as printed), e.g. mlperf/bfloat16/xla.")
CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", os.path.join(tempfile.gettempdir(), "ctr_throughput_xla"),
                                "Persistent XLA cache (the split's device step reuses the trainer's compilation); "
                                "'' for none.")  # fmt: skip
JSON_OUT = flags.DEFINE_string("json_out", None, "Write every cell's result here (JSON).")
STDERR_LOG = flags.DEFINE_string("stderr_log", None, "With --isolate: append each cell's stderr here (else "
                                 "shown only when the cell fails).")  # fmt: skip
SEED = flags.DEFINE_integer("seed", 0, "Data and initialisation seed.")
LOWER_FOR = flags.DEFINE_string("lower_for", None, "Only lower every cell's train step at full size for this "
                                 "platform (e.g. cuda, on a CPU machine) from shapes, in this process: no run.")
WORKER = flags.DEFINE_string("worker", None, "Internal: run this one cell in this process.")
RESULT = flags.DEFINE_string("result", None, "Internal: where the worker writes its JSON result.")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sizes a run uses (``--tiny`` replaces the flags' values)."""

    batch: int
    max_rows: int
    shipped_rows: int
    shipped_batch: int | None
    train_rows: int | None
    log_every: int
    windows: int
    reps: int

    @classmethod
    def from_flags(cls) -> Settings:
        if TINY.value:
            return cls(batch=256, max_rows=4096, shipped_rows=1024, shipped_batch=256, train_rows=1024,
                       log_every=2, windows=1, reps=2)  # fmt: skip
        return cls(BATCH.value, MAX_ROWS.value, SHIPPED_ROWS.value, SHIPPED_BATCH.value, TRAIN_ROWS.value,
                   LOG_EVERY.value, WINDOWS.value, REPS.value)  # fmt: skip


def cell_names() -> list[str]:
    """Every cell of the matrix, in run order (``--cells`` selects among them)."""
    names = [f"mlperf/{d}/{lk}" for d in DTYPES.value for lk in LOOKUP_FLAG.value]
    names += [f"{c}/float32/xla" for c in SHIPPED_FLAG.value]
    for name in names:
        config, dtype, lookup = name.split("/")
        if dtype not in ("float32", "bfloat16") or lookup not in LOOKUPS or config not in ("mlperf", *SHIPPED):
            raise app.UsageError(f"unknown cell {name}: --dtypes float32|bfloat16, --lookups {sorted(LOOKUPS)}, "
                                 f"--shipped {list(SHIPPED)}")  # fmt: skip
    unknown = sorted(set(CELLS.value) - set(names))
    if unknown:
        raise app.UsageError(f"--cells {unknown} are not in this matrix: {names}")
    return list(CELLS.value) if CELLS.value else names  # --cells: in the order given


# -- data -------------------------------------------------------------------------------------------------------
def synthetic_dataset(schema, values: dict[str, int], rows: int, seed: int, zipf: float):
    """Random rows at ``schema``: feature ``f``'s values Zipf(``zipf``) over ``values[f]`` (sequences with an
    item feature over that feature's values, the others over ``values[name]``), as int64 fingerprints; an
    :class:`~ctr.data.dataset.InMemoryDataset` with 4096-row valid and test splits (shape probes only)."""
    import numpy as np

    from ctr.data import dataset as dataset_lib
    from ctr.data import schema as schema_lib

    rng = np.random.default_rng(seed)
    keyed = {name: i for i, name in enumerate(list(schema.categorical) + [s.name for s in schema.sequences])}

    def draw(name: str, shape) -> np.ndarray:
        value = np.minimum(rng.zipf(zipf, shape) - 1, values[name] - 1)
        return (np.int64(keyed[name]) << np.int64(40)) + value  # fingerprints of (feature, value), >= 0

    def block(n: int) -> dict[str, np.ndarray]:
        out = {schema_lib.LABEL: (rng.random(n) < 0.25).astype(np.float32)}
        if schema.dense:
            out[schema_lib.DENSE] = np.log1p(rng.exponential(10.0, (n, schema.num_dense))).astype(np.float32)
        for name in schema.categorical:
            out[name] = draw(name, n)
        for seq in schema.sequences:
            out[seq.name] = draw(seq.item_feature or seq.name, (n, seq.max_len))
            lengths = rng.integers(1, seq.max_len + 1, n)
            out[seq.mask_key] = np.arange(seq.max_len)[None] >= (seq.max_len - lengths)[:, None]  # right-aligned
        if schema.group_key is not None:
            out[schema_lib.GROUP] = rng.integers(0, 1 << 20, n).astype(np.int64)
        return out

    probe = block(4096)
    return dataset_lib.InMemoryDataset(schema=schema, splits={"train": block(rows), "valid": probe, "test": probe})


def cell_setup(name: str, settings: Settings):
    """(gin files, bindings, schema, values per feature, batch) of a cell."""
    from ctr import train as train_cli
    from ctr.data import criteo, taobao

    config, dtype, lookup = name.split("/")
    if config == "mlperf":
        schema = criteo.feature_schema(int_buckets=False)
        values = {f: min(r, settings.max_rows) for f, r in zip(schema.categorical, MLPERF_TABLE_ROWS)}
        buckets = ", ".join(f"'{f}': {r}" for f, r in values.items())
        bindings = MLPERF_BINDINGS + LOOKUPS[lookup] + [
            f"DCNv2.dtype = '{dtype}'",
            f"LookupOptions.rows_dtype = '{dtype}'",
            f"PerFeature.buckets_per_feature = {{{buckets}}}",
            "build_collection.lookup = @LookupOptions()",
        ]
        files = [os.path.join(train_cli.REPO_ROOT, "configs", "base", "train.gin")]
        batch = settings.batch
    else:
        max_len = TINY_MAX_LEN if TINY.value else taobao.MAX_LEN
        schema = criteo.feature_schema(int_buckets=True) if config == "criteo_dcnv2" else taobao.feature_schema(max_len)
        names = list(schema.categorical) + [s.name for s in schema.sequences if s.item_feature is None]
        values = {f: settings.shipped_rows for f in names}
        bindings = ["PerFeature.vocabularies = None", f"PerFeature.num_buckets = {settings.shipped_rows}"]
        files = [os.path.join(train_cli.REPO_ROOT, "configs", f"{config}.gin")]
        batch = settings.shipped_batch
    if TINY.value:
        bindings += TINY_BINDINGS[config]
    return files, bindings, schema, values, batch


# -- one cell ---------------------------------------------------------------------------------------------------
def top_ops(run: Callable[[], None], top: int) -> list[dict]:
    """The ``top`` costliest op names of one call of ``run`` under ``jax.profiler``: complete events summed by
    name, on a GPU those of its streams (kernels), elsewhere all but the Python tracer's; the share is of all
    such events' time (overlapping streams or threads count twice)."""
    import collections
    import glob
    import gzip

    import jax

    out = tempfile.mkdtemp(prefix="gpu_throughput_trace_")
    try:
        with jax.profiler.trace(out, create_perfetto_trace=True):
            run()
        trace = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(trace))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    events = events["traceEvents"] if isinstance(events, dict) else events
    # On a GPU, only the device's streams (processes named "/device:..."); elsewhere every event but Python's.
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M"
             and e.get("name") == "process_name"}  # fmt: skip
    device = {pid for pid, n in names.items() if "/device:" in n}
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and (e.get("pid") in device if device else e["name"][:1] != "$"):
            per_op[e["name"]] += e["dur"] / 1e3
    total = sum(per_op.values()) or 1.0
    return [{"name": n[:100], "ms": ms, "share": ms / total} for n, ms in per_op.most_common(top)]


def memory() -> dict:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_limit")}


def trainer_objects(dataset):
    """(mesh, rules, collection, module, dense optimizer, sparse optimizer) as ``trainer.train`` builds them from
    the parsed config."""
    import gin

    from ctr import mesh as mesh_lib
    from ctr import models as model_zoo
    from ctr import optimizers
    from ctr import train_state as train_state_lib

    query = gin.query_parameter
    mesh, rules = mesh_lib.make_mesh(), mesh_lib.logical_rules()
    collection = query("train.embedding_fn").scoped_configurable_fn(dataset.schema)
    collection = collection.with_mesh(mesh, rules["table_rows"])
    module = train_state_lib.CTRModule(collection=collection, network=model_zoo.get(query("train.model_name"))())
    return mesh, rules, collection, module, optimizers.dense_optimizer(), \
        query("train.sparse_optimizer").scoped_configurable_fn()


def lower_cell(name: str, settings: Settings, platform: str) -> dict:
    """The cell's train step at full size lowered for ``platform`` from shapes alone (no table is allocated):
    catches a lowering error of the real shapes on a machine without that device. Counts the kernel calls."""
    import gin
    import jax
    import numpy as np

    from ctr import mesh as mesh_lib
    from ctr import train as train_cli
    from ctr import train_state as train_state_lib
    from ctr import trainer

    t0 = time.perf_counter()
    files, bindings, schema, values, batch = cell_setup(name, settings)
    gin.clear_config()
    train_cli.parse_config(files, bindings)
    batch = batch or gin.query_parameter("train.batch_size")
    dataset = synthetic_dataset(schema, values, batch, SEED.value, ZIPF.value)
    mesh, rules, collection, module, tx, sparse_optimizer = trainer_objects(dataset)
    init, _, _ = train_state_lib.init_state_fn(dataset, collection, module, tx, sparse_optimizer, 1)
    abstract = jax.eval_shape(init, jax.random.key(SEED.value))
    host = next(dataset.train_batches(batch, 0, SEED.value))
    dev, ids = train_state_lib.device_batch(schema, host), collection.host_ids(host)

    def batch_shardings(tree):
        return jax.tree.map(lambda x: mesh_lib.batch_sharding(mesh, rules, np.ndim(x)), tree)

    shardings = train_state_lib.Shardings(state=jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract),
                                          batch=batch_shardings(dev), ids=batch_shardings(ids))  # fmt: skip
    step = trainer.make_train_step(module, tx, sparse_optimizer, shardings, mesh)
    text = step.trace(abstract, dev, ids).lower(lowering_platforms=(platform,)).as_text()
    result = {"cell": name, "batch": batch, "lowered_for": platform, "triton_calls": text.count("xla.gpu.triton"),
              "mosaic_gpu_calls": text.count("mosaic_gpu_v2"), "wall_s": time.perf_counter() - t0,
              "table_gib": sum(t.num_rows * t.dim * 4 for t in collection.tables.values()) / 2**30}  # fmt: skip
    print(f"  {name}: batch {batch:,}, tables {result['table_gib']:.1f} GiB: the train step lowers for {platform} "
          f"({result['triton_calls']} Triton, {result['mosaic_gpu_calls']} Mosaic GPU calls)", flush=True)
    return result


def run_cell(name: str, settings: Settings) -> dict:
    """Trains the cell with ``ctr.trainer.train`` (the rate), then times the step's parts (the split)."""
    import gin
    import jax
    import numpy as np

    from ctr import train as train_cli
    from ctr import train_state as train_state_lib
    from ctr import trainer

    t0 = time.perf_counter()
    files, bindings, schema, values, batch = cell_setup(name, settings)
    gin.clear_config()
    train_cli.parse_config(files, bindings)
    batch = batch or gin.query_parameter("train.batch_size")
    train_rows = settings.train_rows or 4 * batch
    dataset = synthetic_dataset(schema, values, max(train_rows, batch), SEED.value, ZIPF.value)
    steps = settings.log_every * (1 + settings.windows)
    run_dir = tempfile.mkdtemp(prefix="gpu_throughput_run_")
    with gin.unlock_config():
        gin.bind_parameter("train.dataset_fn", lambda: dataset)
        for key, value in [("train.batch_size", batch), ("train.num_steps", steps), ("train.log_every",
                           settings.log_every), ("train.eval_every", 0), ("train.final_eval_splits", ()),
                           ("train.progress", False), ("train.seed", SEED.value), ("Checkpointer.enabled", False)]:
            gin.bind_parameter(key, value)
    result: dict = {"cell": name, "batch": batch, "steps": steps}
    try:
        trainer.train(run_dir=run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            windows = [json.loads(line) for line in f if "train/examples_per_s" in line]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    timed = windows[1:]
    seconds = sum(settings.log_every * batch / w["train/examples_per_s"] for w in timed)
    result["examples_per_s"] = len(timed) * settings.log_every * batch / seconds
    result["step_ms"] = 1000 * batch / result["examples_per_s"]
    result["first_window_s"] = settings.log_every * batch / windows[0]["train/examples_per_s"]
    result["train_s"] = time.perf_counter() - t0
    print(f"  {name}: {result['examples_per_s']:,.0f} examples/s over {len(timed)} windows of {settings.log_every} "
          f"steps (step {result['step_ms']:.1f} ms; first window, with compilation, {result['first_window_s']:.1f} s)",
          flush=True)  # fmt: skip

    if PHASES.value:
        from benchmarks import step_breakdown

        # Each timed function is already compiled and warmed below; the calls move state, so no extra warm-up.
        best_ms = functools.partial(step_breakdown.best_ms, repeats=settings.reps, warmup=False)
        mesh, rules, collection, module, tx, sparse_optimizer = trainer_objects(dataset)
        state, shardings = train_state_lib.build(dataset, collection, module, tx, sparse_optimizer, mesh, rules,
                                                 SEED.value)  # fmt: skip
        result["table_rows"] = {t.name: t.num_rows for t in collection.tables.values()}
        result["table_gib"] = sum(t.num_rows * t.dim * 4 for t in collection.tables.values()) / 2**30
        inputs = trainer.device_inputs(dataset, collection, mesh, rules, batch, 0, SEED.value)
        dev, ids = next(inputs)
        host = next(dataset.train_batches(batch, 0, SEED.value))
        host_ids = collection.host_ids(host)
        distinct = sum(len(np.unique(v)) for v in host_ids.values())
        result["distinct_ids"] = distinct / sum(v.size for v in host_ids.values())
        result["input_ms"] = best_ms(lambda: next(inputs))

        step = trainer.make_train_step(module, tx, sparse_optimizer, shardings, mesh)
        holder = {"state": step(state, dev, ids)[0]}
        jax.block_until_ready(holder["state"])

        def run_step():
            holder["state"], loss = step(holder["state"], dev, ids)
            jax.block_until_ready(loss)

        result["device_step_ms"] = best_ms(run_step)
        if TOP_OPS.value:
            try:
                result["top_ops"] = top_ops(run_step, TOP_OPS.value)
            except Exception as e:  # the profile is a diagnosis, never the reason a cell fails
                print(f"  {name}: no profile: {type(e).__name__}: {e}", flush=True)
            for op in result.get("top_ops", []):
                print(f"    {op['ms']:8.2f} ms {op['share']:6.1%}  {op['name']}", flush=True)
        state = holder.pop("state")
        phases = trainer.step_phases(module, tx, sparse_optimizer)
        lookup = jax.jit(phases.lookup)
        dense = jax.jit(phases.dense, donate_argnums=(0, 1))
        update = jax.jit(phases.update, donate_argnums=(0, 1))
        rng = jax.random.fold_in(state.rng, 0)
        rows = jax.block_until_ready(lookup(state.tables, ids))
        result["lookup_ms"] = best_ms(lambda: lookup(state.tables, ids))
        holder.update(params=state.params, opt=state.opt_state, tables=state.tables, slots=state.table_slots)
        del state

        def run_dense():
            loss, holder["params"], holder["opt"], holder["g_rows"] = dense(holder["params"], holder["opt"], rows,
                                                                             dev, rng)  # fmt: skip
            jax.block_until_ready(loss)

        run_dense()
        result["dense_ms"] = best_ms(run_dense)

        def run_update():
            holder["tables"], holder["slots"] = update(holder["tables"], holder["slots"], ids, holder["g_rows"],
                                                       jax.numpy.int32(1))  # fmt: skip
            jax.block_until_ready(holder["tables"])

        run_update()
        result["update_ms"] = best_ms(run_update)
        holder.clear()
        parts = result["lookup_ms"] + result["dense_ms"] + result["update_ms"]
        result["parts_over_device_step"] = parts / result["device_step_ms"]
        print(f"  {name}: device step {result['device_step_ms']:.1f} ms = lookup {result['lookup_ms']:.1f} + dense "
              f"{result['dense_ms']:.1f} + update {result['update_ms']:.1f} (sum {parts:.1f} ms, "
              f"{result['parts_over_device_step']:.2f}x); input {result['input_ms']:.1f} ms per batch on its thread; "
              f"{result['distinct_ids']:.0%} of a batch's ids distinct; tables {result['table_gib']:.2f} GiB",
              flush=True)  # fmt: skip
    result.update(memory())
    result["ratio_to_mlperf"] = result["examples_per_s"] / MLPERF_PER_GPU
    result["wall_s"] = time.perf_counter() - t0
    return result


# -- driver -----------------------------------------------------------------------------------------------------
def spawn(name: str, out_dir: str, timeout_s: float, env: dict) -> dict:
    """Runs one cell in a fresh process (``--worker``); its failure or timeout becomes an ``error`` entry."""
    result_path = os.path.join(out_dir, name.replace("/", "_") + ".json")
    passed = [a for a in sys.argv[1:] if not a.startswith(("--worker", "--result", "--cells", "--json_out"))]
    cmd = [sys.executable, os.path.abspath(__file__), *passed, f"--worker={name}", f"--result={result_path}"]
    err_path = os.path.join(out_dir, name.replace("/", "_") + ".stderr")
    t0 = time.perf_counter()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, start_new_session=True, env=env)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    with open(err_path) as f:
        stderr = f.read()
    if STDERR_LOG.value:
        with open(STDERR_LOG.value, "a") as f:
            f.write(f"==== {name} (exit {code})\n{stderr}\n")
    if code == 0 and os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    why = f"killed after {timeout_s:.0f} s (--cell_timeout_s, --budget_s)" if code is None else f"exit code {code}"
    print(f"  {name}: FAILED ({why}); its stderr ends:\n{tail}", flush=True)
    return {"cell": name, "error": why + ": " + (tail.splitlines()[-1] if tail else ""),
            "wall_s": time.perf_counter() - t0}  # fmt: skip


LEGEND = ("examples/s: ctr.trainer.train's log windows after the first; x 0.5M/s: over MLPerf's per-GPU rate; step: "
          "batch / examples/s; device step: the trainer's jitted step alone on one batch, no input; lookup, dense "
          "(fwd + bwd + dense optimizer), update (sparse optimizer): trainer.step_phases, each jitted alone; input: "
          "trainer.device_inputs alone, per batch (a background thread in training); peak: the cell process's "
          "peak_bytes_in_use; timings are the best of --reps. MLPerf cells are one-hot (26 ids per example; MLPerf's "
          "multi-hot: 214).")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def markdown_table(results: list[dict]) -> str:
    head = ("| cell | batch | examples/s | x 0.5M/s | step ms | device step ms | lookup ms | dense ms | update ms "
            "| input ms | peak GiB |\n|" + " --- |" * 11)  # fmt: skip
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['cell']} | failed: {r['error'][:120]} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['cell']} | {r['batch']:,} | {r['examples_per_s']:,.0f} | {r['ratio_to_mlperf']:.2f} | "
            f"{r['step_ms']:.1f} | {_fmt(r.get('device_step_ms'), '.1f')} | {_fmt(r.get('lookup_ms'), '.1f')} | "
            f"{_fmt(r.get('dense_ms'), '.1f')} | {_fmt(r.get('update_ms'), '.1f')} | {_fmt(r.get('input_ms'), '.1f')} "
            f"| {_fmt(r.get('peak_bytes_in_use'), '.1f', 2**30)} |"
        )
    return "\n".join(lines)


def setup_jax() -> None:
    import jax

    if not CACHE_DIR.value:
        return
    for name, value in [("jax_compilation_cache_dir", CACHE_DIR.value),
                        ("jax_persistent_cache_min_compile_time_secs", 0.0),
                        ("jax_persistent_cache_min_entry_size_bytes", 0)]:  # fmt: skip
        try:
            jax.config.update(name, value)
        except (AttributeError, ValueError) as e:  # another jax version: run without the cache
            print(f"no persistent compilation cache: {name}: {e}", flush=True)
            return


def main(argv: list[str]) -> None:
    del argv
    if ZIPF.value <= 1:
        raise app.UsageError(f"--zipf must be > 1 (a Zipf exponent), got {ZIPF.value}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint manager step at INFO
    settings = Settings.from_flags()
    setup_jax()
    if WORKER.value:
        result = run_cell(WORKER.value, settings)
        with open(RESULT.value, "w") as f:
            json.dump(result, f)
        return
    child_env = dict(os.environ)
    if ISOLATE.value:  # this process only prints: leave the device's memory to the cells (JAX takes 75% at start)
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    names = cell_names()
    if LOWER_FOR.value:
        for name in names:
            lower_cell(name, settings, LOWER_FOR.value)
        return
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({device.platform}); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"settings: {dataclasses.asdict(settings)}, zipf {ZIPF.value}, isolate {ISOLATE.value}, phases "
          f"{PHASES.value}, seed {SEED.value}")
    print(f"MLPerf shape: 13 dense + 26 categorical ONE-HOT (MLPerf: multi-hot, 214 ids per example), dim 128, "
          f"tables capped at {settings.max_rows:,} rows (MLPerf's rows: {MLPERF_TABLE_ROWS}), bottom MLP "
          f"512-256-128, 3 low-rank (512) cross layers, top MLP 1024-1024-512-256-1, batch {settings.batch:,}; "
          f"shipped configs' tables hashed to {settings.shipped_rows:,} rows per feature", flush=True)
    print(f"cells: {names}", flush=True)
    results, t0 = [], time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix="gpu_throughput_")
    try:
        for name in names:
            print(f"\n{name}", flush=True)
            left = BUDGET.value - (time.perf_counter() - t0) if BUDGET.value else float("inf")
            if ISOLATE.value and left < 10:
                print(f"  {name}: skipped: --budget_s={BUDGET.value} spent", flush=True)
                results.append({"cell": name, "error": f"skipped: --budget_s={BUDGET.value} spent"})
            elif ISOLATE.value:
                results.append(spawn(name, out_dir, min(CELL_TIMEOUT.value, left), child_env))
            else:
                try:
                    results.append(run_cell(name, settings))
                except Exception as e:  # a cell that fails (OOM, lowering) is reported; the next one runs
                    traceback.print_exc()
                    print(f"  {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    results.append({"cell": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"  ({results[-1].get('wall_s', 0):.0f} s)", flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"\nall cells: {time.perf_counter() - t0:.0f} s; jax {jax.__version__}, {device.device_kind}\n")
    print(LEGEND + ("" if device.platform == "gpu" else " Not a GPU: kernel cells ran kernels.lookup's fallback "
                    "(XLA's gather) behind the shard_map routing."))  # fmt: skip
    print(markdown_table(results), flush=True)
    if JSON_OUT.value:
        with open(JSON_OUT.value, "w") as f:
            json.dump({"jax": jax.__version__, "device": device.device_kind, "settings": dataclasses.asdict(settings),
                       "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
