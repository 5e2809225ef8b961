r"""Training-step speed of the sequence models (InterFormer, CETNet) as shipped: examples/s, matmul FLOPs per
example, the share of the machine's matmul peak, and where the step's time goes.

Each ``--configs`` entry builds ``configs/<config>.gin`` exactly as the trainer does (``ctr.trainer``'s
collection, model, optimizers, state and jitted ``make_train_step``) on synthetic TaobaoAds
(:func:`ctr.data.synthetic.datasets.synthetic_taobao`, ``--num_users`` users, ~20 impressions each; the
configs' vocabulary-indexed tables become ``--table_rows`` hashed rows per feature, as in
``benchmarks/models_taobao.py``: synthetic data has no prepared vocabulary). Then, at ``--batch_size``:

- **examples/s**: ``--steps`` timed steps after one warm-up (compile) step, on one batch, best and median.
  The step time does not depend on the data size (the step is one compiled program on fixed shapes).
- **FLOPs per example**: the multiply-adds x 2 of every ``dot`` in the step's HLO before optimisation (forward,
  backward and optimizer: what the model asks for), divided by the batch size; beside it XLA's own
  ``cost_analysis()`` of the compiled step (which also counts elementwise work). The DCNv2 figure of
  ``benchmarks/peers.py`` is the analytic 3 x forward matmul FLOPs, the same quantity for an MLP.
- **share of peak**: FLOPs per example x examples/s / the float32 peak of a jitted 4096 x 4096 matmul, measured
  in the same process (``benchmarks.peers.measure_matmul_peak``).
- **profile** (``--profile``): one step under ``jax.profiler`` (perfetto trace); every executed HLO op's time,
  summed by the Flax module it came from (the op's ``op_name`` metadata) and by forward / backward / outside
  autodiff (row reads, DHE hash encoding, sparse and dense updates), with the top ops.

    PYTHONPATH=. python benchmarks/sequence_speed.py --configs=taobao_interformer,taobao_cetnet --profile
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from benchmarks import peers  # noqa: E402  (its matmul peak, measured the same way)

CONFIGS = flags.DEFINE_list("configs", ["taobao_interformer", "taobao_cetnet"], "configs/<config>.gin to time.")
BATCH = flags.DEFINE_integer("batch_size", 4096, "Global batch size.")
STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
USERS = flags.DEFINE_integer("num_users", 2_000, "Synthetic users (about 20 impressions each).")
TABLE_ROWS = flags.DEFINE_integer("table_rows", 100_000, "Hashed rows per feature for the vocabulary tables.")
PROFILE = flags.DEFINE_bool("profile", False, "Profile one step and print where its time goes.")
TOP = flags.DEFINE_integer("top", 15, "Top HLO ops printed by --profile.")
DATA = flags.DEFINE_string("data_dir", None, "Where the synthetic raw files go (default: a temporary directory).")
OVERRIDES = flags.DEFINE_multi_string("gin_binding", [], "Extra gin bindings.")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\(([^)]*)\)(.*)$", re.M)


def dot_flops(hlo_text: str) -> int:
    """2 x multiply-adds of every ``dot`` in an HLO module's text."""
    shapes, dots = {}, []
    for m in _INSTRUCTION.finditer(hlo_text):
        name, dims, op, operands, attrs = m.groups()
        shapes[name] = [int(d) for d in dims.split(",") if d]
        if op == "dot":
            dots.append((name, operands.split(",")[0].strip(), attrs))
    total = 0
    for name, lhs, attrs in dots:
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
        k = math.prod(shapes[lhs][int(i)] for i in contracting.split(",") if i)
        total += 2 * math.prod(shapes[name]) * k
    return total


def build(config: str, data_dir: str):
    """The trainer's objects for ``configs/<config>.gin``: (module, state, jitted step, device batch, ids, host batch)."""
    import gin
    import jax

    from ctr import mesh as mesh_lib
    from ctr import models as model_zoo
    from ctr import optimizers
    from ctr import train as train_cli
    from ctr import train_state as train_state_lib
    from ctr import trainer

    gin.clear_config()
    train_cli.parse_config(
        [os.path.join(train_cli.REPO_ROOT, "configs", f"{config}.gin")],
        [
            "train.dataset_fn = @synthetic_taobao",
            f'synthetic_taobao.data_dir = "{data_dir}"',
            f"synthetic_taobao.num_users = {USERS.value}",
            f"train.batch_size = {BATCH.value}",
            "PerFeature.vocabularies = None",
            f"PerFeature.num_buckets = {TABLE_ROWS.value}",
            *OVERRIDES.value,
        ],
    )
    query = gin.query_parameter
    dataset = query("train.dataset_fn").scoped_configurable_fn()
    mesh, rules = mesh_lib.make_mesh(), mesh_lib.logical_rules()
    collection = query("train.embedding_fn").scoped_configurable_fn(dataset.schema)
    collection = collection.with_mesh(mesh, rules["table_rows"])
    network = model_zoo.get(query("train.model_name"))()
    module = train_state_lib.CTRModule(collection=collection, network=network)
    tx = optimizers.dense_optimizer()
    sparse_optimizer = query("train.sparse_optimizer").scoped_configurable_fn()
    state, shardings = train_state_lib.build(dataset, collection, module, tx, sparse_optimizer, mesh, rules, 0)
    step = trainer.make_train_step(module, tx, sparse_optimizer, shardings, mesh)
    host = next(dataset.train_batches(BATCH.value, 0, 0))
    batch = mesh_lib.to_global(mesh, rules, train_state_lib.device_batch(dataset.schema, host))
    ids = mesh_lib.to_global(mesh, rules, collection.host_ids(host))
    del jax
    return module, state, step, batch, ids, host


def time_steps(step, state, batch, ids, n: int):
    """(state, [seconds per step]) of ``n`` steps after one warm-up step (the state is donated)."""
    import jax

    state, loss = step(state, batch, ids)
    jax.block_until_ready(loss)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        state, loss = step(state, batch, ids)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    return state, times


def _category(op_name: str) -> tuple[str, str]:
    """(pass, module) of an HLO op from its JAX ``op_name`` metadata."""
    if "transpose(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    else:
        phase = "outside autodiff"
    # Flax names modules in the op path: keep the first two module names below the network / embedding.
    parts = [p for p in re.split(r"[/()]", op_name) if p and not p.startswith(("jit", "jvp", "transpose", "pjit"))]
    skip = {"CTRModule", "network", "collection", "main", "train_step"}
    parts = [p for p in parts if p not in skip]
    module = "/".join(parts[:2]) if parts else "?"
    return phase, module


def profile(step, state, batch, ids, top: int) -> None:
    """One step under the profiler; prints time by (pass, module) and the top ops."""
    import jax

    compiled = step.lower(state, batch, ids).compile()
    meta = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", compiled.as_text(),
                         re.M):  # fmt: skip
        meta[m.group(1)] = m.group(2)
    out = tempfile.mkdtemp(prefix="sequence_speed_trace_")
    with jax.profiler.trace(out, create_perfetto_trace=True):
        state, loss = step(state, batch, ids)
        jax.block_until_ready(loss)
    trace = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in meta:
            per_op[e["name"]] += e.get("dur", 0) / 1e3
    total = sum(per_op.values())
    by_cat: collections.Counter[tuple[str, str]] = collections.Counter()
    for name, ms in per_op.items():
        by_cat[_category(meta[name])] += ms
    print(f"  profile: {total:.0f} ms in {len(per_op)} HLO ops (summed over threads)")
    for (phase, module), ms in sorted(by_cat.items(), key=lambda t: -t[1]):
        if ms >= 0.005 * total:
            print(f"    {ms:8.0f} ms {ms / total:6.1%}  {phase:<17} {module}")
    print(f"  top {top} ops:")
    for name, ms in per_op.most_common(top):
        print(f"    {ms:8.0f} ms {ms / total:6.1%}  {name:<24} {meta[name][-110:]}")
    return state


def distinct_ids(host, schema) -> str:
    """Distinct fingerprints per categorical input / sequence in one batch (what deduplication can save)."""
    import numpy as np

    names = list(schema.categorical) + [s.name for s in schema.sequences]
    parts = []
    for name in names:
        values = host[name]
        if name in [s.name for s in schema.sequences]:
            seq = next(s for s in schema.sequences if s.name == name)
            values = values[host[seq.mask_key].astype(bool)]
        parts.append(f"{name} {len(np.unique(values))}/{values.size}")
    return ", ".join(parts)


def main(argv: list[str]) -> None:
    del argv
    import jax



    data_dir = DATA.value or tempfile.mkdtemp(prefix="sequence_speed_")
    print(f"batch {BATCH.value}, {jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.1f}")
    peak = peers.measure_matmul_peak()
    print(f"f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    for config in CONFIGS.value:
        t0 = time.perf_counter()
        module, state, step, batch, ids, host = build(config, data_dir)
        lowered = step.lower(state, batch, ids)
        flops = dot_flops(lowered.as_text(dialect="hlo")) / BATCH.value
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla_flops = cost.get("flops", float("nan")) / BATCH.value
        print(f"\n{config}: built in {time.perf_counter() - t0:.0f} s; distinct ids in the batch: "
              f"{distinct_ids(host, module.collection.schema)}")
        state, times = time_steps(step, state, batch, ids, STEPS.value)
        best, median = min(times), sorted(times)[len(times) // 2]
        rate = BATCH.value / best
        print(f"  step: best {best * 1e3:,.0f} ms, median {median * 1e3:,.0f} ms over {len(times)} "
              f"(load average {os.getloadavg()[0]:.1f}) = {rate:,.0f} examples/s (best)")
        print(f"  matmul FLOPs per example (HLO dots, fwd + bwd): {flops / 1e6:.1f} M; XLA cost analysis (all ops): "
              f"{xla_flops / 1e6:.1f} M")
        print(f"  share of the f32 matmul peak: {flops * rate / peak:.1%} ({flops * rate / 1e9:.1f} of "
              f"{peak / 1e9:.1f} GFLOP/s)")
        if PROFILE.value:
            state = profile(step, state, batch, ids, TOP.value)
        del state, step


if __name__ == "__main__":
    app.run(main)
