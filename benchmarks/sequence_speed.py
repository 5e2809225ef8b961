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
- **share of peak**: FLOPs per example x examples/s / the float32 peak of a jitted 4096 x 4096 matmul
  (``benchmarks.peers.measure_matmul_peak``), measured in the same process just before and just after the timed
  steps (on a shared machine the two differ: both are printed).
- **dots alone** (``--dots_alone``): every dot of the step timed alone (jitted, its own shapes and dimension
  numbers): the step's time if only its matmuls cost anything, so the best share of the peak XLA's CPU dots
  allow on these shapes.
- **attention layouts** (``--attention_layouts``): the sequence attention's logits alone, as the model writes
  them and in other layouts.
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

from benchmarks import peers, step_breakdown  # noqa: E402  (the matmul peak, measured the same way; best_ms)

CONFIGS = flags.DEFINE_list("configs", ["taobao_interformer", "taobao_cetnet"], "configs/<config>.gin to time.")
BATCH = flags.DEFINE_integer("batch_size", 4096, "Global batch size.")
STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
USERS = flags.DEFINE_integer("num_users", 2_000, "Synthetic users (about 20 impressions each).")
TABLE_ROWS = flags.DEFINE_integer("table_rows", 100_000, "Hashed rows per feature for the vocabulary tables.")
PROFILE = flags.DEFINE_bool("profile", False, "Profile one step and print where its time goes.")
ATTENTION = flags.DEFINE_bool("attention_layouts", False, "Time the attention logits alone in several layouts.")
DOTS_ALONE = flags.DEFINE_bool("dots_alone", False, "Time each of the step's dots alone (a bound on the step).")
MAX_TEMP = flags.DEFINE_float("max_temp_gib", 12.0, "Skip running a step whose compiled temporaries exceed this "
                               "(GiB): CETNet with DHE per occurrence needs 26 GiB at batch 4096.")
TOP = flags.DEFINE_integer("top", 15, "Top HLO ops printed by --profile.")
DATA = flags.DEFINE_string("data_dir", None, "Where the synthetic raw files go (default: a temporary directory).")
OVERRIDES = flags.DEFINE_multi_string("gin_binding", [], "Extra gin bindings.")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\(([^)]*)\)(.*)$", re.M)


def _dims(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return tuple(int(i) for i in m.group(1).split(",") if i) if m else ()


def parse_dots(hlo_text: str) -> list[dict]:
    """Every ``dot`` of an HLO module's text (with ``debug_info``): shapes, dimension numbers, FLOPs, op_name."""
    shapes, found = {}, []
    for m in _INSTRUCTION.finditer(hlo_text):
        name, dims, op, operands, attrs = m.groups()
        shapes[name] = tuple(int(d) for d in dims.split(",") if d)
        if op == "dot":
            found.append((name, [o.strip() for o in operands.split(",")], attrs))
    dots = []
    for name, (lhs, rhs), attrs in found:
        contracting = _dims(attrs, "lhs_contracting_dims")
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        dots.append(dict(
            lhs=shapes[lhs], rhs=shapes[rhs],
            dims=((contracting, _dims(attrs, "rhs_contracting_dims")),
                  (_dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims"))),
            flops=2 * math.prod(shapes[name]) * math.prod(shapes[lhs][i] for i in contracting),
            op_name=op_name.group(1) if op_name else "?",
        ))  # fmt: skip
    return dots


def dot_flops(dots: list[dict]) -> collections.Counter[str]:
    """2 x multiply-adds of the dots, by op_name."""
    flops: collections.Counter[str] = collections.Counter()
    for d in dots:
        flops[d["op_name"]] += d["flops"]
    return flops


def dots_alone_s(dots: list[dict]) -> float:
    """Seconds the step's dots take one by one, each jitted alone on random f32 operands (best of 3): what the
    step would take if nothing but its matmuls cost time."""
    import jax
    import jax.numpy as jnp

    best: dict = {}
    for d in dots:
        key = (d["lhs"], d["rhs"], d["dims"])
        if key not in best:
            a = jax.random.normal(jax.random.key(0), d["lhs"], jnp.float32)
            b = jax.random.normal(jax.random.key(1), d["rhs"], jnp.float32)
            f = jax.jit(lambda x, y, dims=d["dims"]: jax.lax.dot_general(x, y, dims))
            best[key] = step_breakdown.best_ms(f, a, b, repeats=3) / 1e3
    total, flops = collections.Counter(), collections.Counter()
    for d in dots:
        name = d["op_name"].split("/")[-2] + f" {d['lhs']}x{d['rhs']}"
        total[name] += best[(d["lhs"], d["rhs"], d["dims"])]
        flops[name] += d["flops"]
    print("  slowest dots alone (op, lhs x rhs: time, GFLOP/s):")
    for key, t in total.most_common(8):
        print(f"    {t * 1e3:7.1f} ms {flops[key] / t / 1e9:6.1f} GFLOP/s  {key}")
    return sum(total.values())


def build(config: str, data_dir: str):
    """The trainer's objects for ``configs/<config>.gin``: (module, state, jitted step, device batch, ids, host
    batch)."""
    import gin

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


def attention_layouts(batch: int, length: int = 54, heads: int = 2, head_dim: int = 16) -> None:
    """InterFormer's sequence-attention logits (``[B, L, H, Dh]`` queries and keys) alone, in several layouts."""
    import jax
    import jax.numpy as jnp

    q = jax.random.normal(jax.random.key(0), (batch, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(jax.random.key(1), (batch, length, heads, head_dim), jnp.float32)
    qh, kh = jnp.transpose(q, (0, 2, 1, 3)), jnp.transpose(k, (0, 2, 1, 3))
    qf, kf = qh.reshape(batch * heads, length, head_dim), kh.reshape(batch * heads, length, head_dim)
    variants = [
        ("einsum bqhd,bkhd->bhqk (as in the model)", lambda a, b: jnp.einsum("bqhd,bkhd->bhqk", a, b), (q, k)),
        ("einsum bhqd,bhkd->bhqk (heads leading)", lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b), (qh, kh)),
        ("einsum nqd,nkd->nqk (example x head merged)", lambda a, b: jnp.einsum("nqd,nkd->nqk", a, b), (qf, kf)),
        ("broadcast multiply + sum, heads leading", lambda a, b: (a[:, :, :, None] * b[:, :, None]).sum(-1), (qh, kh)),
    ]
    flops = 2 * batch * heads * length * length * head_dim
    print(f"attention logits alone, batch {batch}, L {length}, {heads} heads of {head_dim}:")
    for name, f, args in variants:
        ms = step_breakdown.best_ms(jax.jit(f), *args)
        print(f"  {ms:7.1f} ms {flops / ms / 1e6:5.1f} GFLOP/s  {name}")


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


def profile(step, state, batch, ids, flops: collections.Counter[str], top: int):
    """One step under the profiler; prints time and matmul FLOPs by (pass, module), and the top ops."""
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
    total, total_flops = sum(per_op.values()), sum(flops.values())
    by_cat: collections.Counter[tuple[str, str]] = collections.Counter()
    flops_by_cat: collections.Counter[tuple[str, str]] = collections.Counter()
    for name, ms in per_op.items():
        by_cat[_category(meta[name])] += ms
    for op_name, f in flops.items():
        flops_by_cat[_category(op_name)] += f
    print(f"  profile: {total:.0f} ms in {len(per_op)} HLO ops (summed over threads); time and matmul FLOPs by "
          f"pass and module:")  # fmt: skip
    for cat in sorted(set(by_cat) | set(flops_by_cat), key=lambda c: -by_cat[c]):
        ms, f = by_cat[cat], flops_by_cat[cat]
        if ms >= 0.005 * total or f >= 0.005 * total_flops:
            print(f"    {ms:8.0f} ms {ms / total:6.1%}  FLOPs {f / total_flops:6.1%}  {cat[0]:<17} {cat[1]}")
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
    if ATTENTION.value:
        attention_layouts(BATCH.value)
    for config in CONFIGS.value:
        t0 = time.perf_counter()
        module, state, step, batch, ids, host = build(config, data_dir)
        lowered = step.lower(state, batch, ids)
        dots = parse_dots(lowered.as_text(dialect="hlo", debug_info=True))
        flops = dot_flops(dots)
        per_example = sum(flops.values()) / BATCH.value
        compiled = lowered.compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        temp_gb = compiled.memory_analysis().temp_size_in_bytes / 2**30
        print(f"\n{config}: built in {time.perf_counter() - t0:.0f} s; step temporaries {temp_gb:.1f} GiB; distinct "
              f"ids in the batch: {distinct_ids(host, module.collection.schema)}")
        print(f"  matmul FLOPs per example (HLO dots, fwd + bwd): {per_example / 1e6:.1f} M; XLA cost analysis "
              f"(all ops): {cost.get('flops', float('nan')) / BATCH.value / 1e6:.1f} M")
        if temp_gb > MAX_TEMP.value:
            print(f"  not run: {temp_gb:.1f} GiB of temporaries > --max_temp_gib={MAX_TEMP.value:g}")
            continue
        peak_before = peers.measure_matmul_peak()
        state, times = time_steps(step, state, batch, ids, STEPS.value)
        peak_after = peers.measure_matmul_peak()
        best, median = min(times), sorted(times)[len(times) // 2]
        rate = BATCH.value / best
        print(f"  step: best {best * 1e3:,.0f} ms, median {median * 1e3:,.0f} ms over {len(times)} "
              f"(load average {os.getloadavg()[0]:.1f}) = {rate:,.0f} examples/s (best)")
        for when, peak in (("before", peak_before), ("after", peak_after)):
            print(f"  share of the f32 matmul peak measured {when}: {per_example * rate / peak:.1%} "
                  f"({per_example * rate / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s)")
        if DOTS_ALONE.value:
            alone = dots_alone_s(dots)
            print(f"  the step's {len(dots)} dots alone: {alone * 1e3:,.0f} ms = "
                  f"{per_example * BATCH.value / alone / 1e9:.1f} GFLOP/s; a step costing only its dots would reach "
                  f"{BATCH.value / alone:,.0f} examples/s")
        if PROFILE.value:
            state = profile(step, state, batch, ids, flops, TOP.value)
        del state, step


if __name__ == "__main__":
    app.run(main)
