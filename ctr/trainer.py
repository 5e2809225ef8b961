"""The training loop: mesh -> state (with shardings) -> restore -> {step, log, eval, checkpoint} -> results.

The train step is one pure jitted function with explicit shardings and a donated state. Embedding tables
never get dense gradients: the step gathers the rows a batch needs, differentiates the loss with respect to
those rows and the dense parameters, updates dense parameters with optax and the touched rows with a sparse
optimizer (see :mod:`embeddings.collection`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from ctr import checkpointing, errors, metrics, optimizers, plots, sharding
from ctr import models as model_zoo
from ctr.data import dataset as dataset_lib
from ctr.data import schema as schema_lib
from ctr.data import splits as splits_lib
from embeddings import collection as collection_lib
from embeddings import sparse_optim

Batch = dict[str, Any]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last checkpoint (saved before it happened) is kept."""


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``tables``/``table_slots`` are row-sharded, the rest replicated."""

    step: jax.Array
    params: Any
    opt_state: Any
    tables: dict[str, jax.Array]
    table_slots: dict[str, dict[str, jax.Array]]
    rng: jax.Array


class CTRModule(nn.Module):
    """Embedding combination (inside the Flax scope, so DHE-style families can own parameters) + network."""

    collection: Any
    network: nn.Module

    @nn.compact
    def __call__(self, rows: Batch, batch: Batch, *, train: bool) -> Any:
        return self.network(self.collection.combine(rows, batch), train=train)


def logits_of(outputs: Any) -> jax.Array:
    return outputs["logits"] if isinstance(outputs, dict) else outputs


def model_loss(network: nn.Module, outputs: Any, labels: jax.Array) -> jax.Array:
    """The network's own ``loss(outputs, labels)`` when it defines one (ensembles), else mean BCE."""
    if hasattr(network, "loss"):
        return network.loss(outputs, labels)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits_of(outputs), labels))


def device_batch(schema: schema_lib.FeatureSchema, host_batch: Batch) -> Batch:
    """What the device needs of a host batch: label, dense, sequence masks (fingerprints stay on the host)."""
    out = {schema_lib.LABEL: host_batch[schema_lib.LABEL].astype(np.float32)}
    if schema.dense:
        out[schema_lib.DENSE] = host_batch[schema_lib.DENSE].astype(np.float32)
    for seq in schema.sequences:
        out[seq.mask_key] = host_batch[seq.mask_key]
    return out


class _Prefetcher:
    """Runs host preprocessing and host->device transfer ``depth`` batches ahead on a background thread."""

    def __init__(self, produce: Iterator[Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work():
            try:
                for item in produce:
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            except BaseException as e:  # surfaced in the main thread by next()
                self._queue.put(e)

        self._thread = threading.Thread(target=work, daemon=True, name="ctr-prefetch")
        self._thread.start()

    def next(self) -> Any:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _StopSignal:
    """Turns SIGTERM (TPU VM preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@gin.configurable
def train(
    run_dir: str = gin.REQUIRED,
    dataset_fn: Callable[[], dataset_lib.Dataset] = gin.REQUIRED,
    model_name: str = "dcnv2",
    embedding_fn: Callable[[schema_lib.FeatureSchema], collection_lib.EmbeddingCollection] = gin.REQUIRED,
    sparse_optimizer: sparse_optim.SparseOptimizer = gin.REQUIRED,
    batch_size: int = 4096,
    num_steps: int | None = None,
    num_epochs: float | None = None,
    eval_every: int = 0,
    eval_batch_size: int = 16384,
    log_every: int = 50,
    seed: int = 0,
    final_eval_splits: tuple[str, ...] = ("valid", "test"),
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``model_name`` on ``dataset_fn()``, evaluates, and writes the run directory.

    Args:
      run_dir: output directory (checkpoints, metrics.jsonl, TensorBoard events, results.json, plots). If it
        holds a checkpoint the run resumes from it.
      dataset_fn: returns the :class:`~ctr.data.dataset.Dataset` (gin reference, e.g. ``@synthetic_criteo``).
      model_name: registered model (see :mod:`ctr.models`).
      embedding_fn: builds the embedding collection from the schema (e.g. ``@per_feature_tables``).
      sparse_optimizer: optimizer of the table rows (e.g. ``@SparseAdagrad()``).
      batch_size: global batch size (examples per step over all hosts and devices).
      num_steps: total training steps; give this or ``num_epochs``, not both (neither: one epoch).
      num_epochs: training length in passes over the train split (``round(num_epochs * steps per epoch)``
        steps; the last partial batch of an epoch is dropped).
      eval_every: evaluate the valid split every this many steps (0 = only at the end).
      eval_batch_size: global eval batch size.
      log_every: steps between loss read-backs (progress bar, metrics.jsonl, NaN check).
      seed: parameter-init, dropout and data-order seed.
      final_eval_splits: splits evaluated at the end and written to results.json.
      progress: show a progress bar.

    Returns:
      The content of results.json.
    """
    start_wall = time.time()
    lead = jax.process_index() == 0
    _check_config(model_name, final_eval_splits, num_steps, num_epochs, batch_size=batch_size, eval_every=eval_every,
                  eval_batch_size=eval_batch_size, log_every=log_every, seed=seed)  # fmt: skip
    mesh = sharding.make_mesh()
    rules = sharding.logical_rules()
    n_batch_shards = sharding.axis_size(mesh, rules["batch"])
    for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if size % n_batch_shards:
            raise errors.ConfigError(f"train.{name} = {size} does not divide over the {n_batch_shards} devices of "
                                     f"the batch axes {rules['batch']}")  # fmt: skip

    dataset = dataset_fn()
    schema = dataset.schema
    _check_splits(dataset, batch_size, eval_every, final_eval_splits)
    steps_per_epoch = dataset.steps_per_epoch(batch_size)
    if num_steps is None:
        num_steps = max(1, round((1.0 if num_epochs is None else num_epochs) * steps_per_epoch))
    if lead:
        print(
            f"Training {num_steps} steps of {batch_size} examples "
            f"({num_steps / max(steps_per_epoch, 1):.2f} epochs of {steps_per_epoch} steps)",
            flush=True,
        )
    collection = embedding_fn(schema).with_mesh(mesh, rules["table_rows"])
    network = model_zoo.get(model_name)()
    module = CTRModule(collection=collection, network=network)
    tx = optimizers.dense_optimizer()
    logging.info("model %s, %d train rows, mesh %s", model_name, dataset.num_rows("train"), dict(mesh.shape))

    # -- state with explicit shardings --------------------------------------------------------------------------
    probe = next(dataset.eval_batches("train", n_batch_shards))[0]
    probe_ids = collection.host_ids(probe)
    probe_dev = device_batch(schema, probe)

    def init_state(rng: jax.Array) -> TrainState:
        table_rng, param_rng, dropout_rng, state_rng = jax.random.split(rng, 4)
        tables = collection.init(table_rng)
        rows = collection.gather(tables, probe_ids)
        params = module.init({"params": param_rng, "dropout": dropout_rng}, rows, probe_dev, train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            tables=tables,
            table_slots={name: sparse_optimizer.init(t) for name, t in tables.items()},
            rng=state_rng,
        )

    abstract = jax.eval_shape(init_state, jax.random.key(seed))
    state_shardings = TrainState(
        step=sharding.replicated(mesh),
        params=jax.tree.map(lambda _: sharding.replicated(mesh), abstract.params),
        opt_state=jax.tree.map(lambda _: sharding.replicated(mesh), abstract.opt_state),
        tables=collection.table_shardings(),
        table_slots=collection.slot_shardings(abstract.table_slots),
        rng=sharding.replicated(mesh),
    )
    state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(seed))
    # Embedding parameters as the family defines them (table rows incl. alignment padding, DHE networks); DHE
    # networks live in ``params`` too, so they are subtracted from the dense count.
    embedding_params = collection.num_parameters()
    num_params = {
        "dense": _count(state.params) - (embedding_params - _count(state.tables)),
        "embedding": embedding_params,
        "embedding_bytes": collection.parameter_bytes(),
    }

    os.makedirs(run_dir, exist_ok=True)  # only now: a config or data error above leaves no run directory
    ckpt = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"))
    record = {"examples_seen": 0, "train_wall_s": 0.0}
    restored = ckpt.restore_latest(checkpointing.abstract_like(state))
    if restored is not None:
        restored_step, state, record = restored
        logging.info("resumed from %s at step %d", ckpt, restored_step)
        if lead:
            print(f"Resuming from the checkpoint at step {restored_step} in {run_dir}", flush=True)

    # -- steps ---------------------------------------------------------------------------------------------------
    def sample_shardings(tree):
        return jax.tree.map(lambda x: sharding.batch_sharding(mesh, rules, np.ndim(x)), tree)

    batch_shardings = sample_shardings(probe_dev)
    ids_shardings = sample_shardings(probe_ids)

    def train_step(state: TrainState, batch: Batch, ids: Batch) -> tuple[TrainState, jax.Array]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        rows = collection.gather(state.tables, ids)

        def loss_fn(params, rows):
            outputs = module.apply({"params": params}, rows, batch, train=True, rngs={"dropout": dropout_rng})
            return model_loss(network, outputs, batch[schema_lib.LABEL])

        loss, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state.params, rows)
        updates, opt_state = tx.update(g_params, state.opt_state, state.params)
        tables, slots = collection.sparse_update(
            state.tables, state.table_slots, ids, g_rows, sparse_optimizer, state.step
        )
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            tables=tables,
            table_slots=slots,
        )
        return new_state, loss

    train_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, ids_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    def eval_step(state: TrainState, batch: Batch, ids: Batch) -> jax.Array:
        rows = collection.gather(state.tables, ids)
        return logits_of(module.apply({"params": state.params}, rows, batch, train=False))

    eval_step = jax.jit(
        eval_step,
        in_shardings=(state_shardings, batch_shardings, ids_shardings),
        out_shardings=sharding.batch_sharding(mesh, rules),
    )

    def flush_step(state: TrainState) -> TrainState:
        tables, slots = collection.flush(state.tables, state.table_slots, sparse_optimizer, state.step)
        return state.replace(tables=tables, table_slots=slots)

    # Brings every row up to date before an evaluation (SparseAdam's deferred moves). It changes no later step,
    # and evaluations fall on fixed steps, so a resumed run flushes where an uninterrupted one does.
    flush_step = jax.jit(flush_step, in_shardings=(state_shardings,), out_shardings=state_shardings, donate_argnums=0)

    def evaluate(split: str) -> dict[str, float]:
        labels, logits, groups = [], [], []
        for host_batch, real in dataset.eval_batches(
            split, eval_batch_size, jax.process_index(), jax.process_count()
        ):
            dev = sharding.to_global(mesh, rules, device_batch(schema, host_batch))
            ids = sharding.to_global(mesh, rules, collection.host_ids(host_batch))
            out = eval_step(state, dev, ids)
            valid = np.arange(len(host_batch[schema_lib.LABEL])) < real
            local = {"label": host_batch[schema_lib.LABEL], "valid": valid}
            if schema.group_key is not None:
                local["group"] = host_batch[schema_lib.GROUP]
            if jax.process_count() > 1:
                local = multihost_utils.process_allgather(local, tiled=True)
                out = multihost_utils.process_allgather(out, tiled=True)
            keep = np.asarray(local["valid"])
            labels.append(np.asarray(local["label"])[keep])
            logits.append(np.asarray(out)[keep])
            if "group" in local:
                groups.append(np.asarray(local["group"])[keep])
        return metrics.evaluate(
            np.concatenate(labels), np.concatenate(logits), np.concatenate(groups) if groups else None
        )

    # -- loop ----------------------------------------------------------------------------------------------------
    start_step = int(state.step)
    writer = _RunWriter(run_dir, start_step, num_steps) if lead else None
    if writer:
        writer.write_config()
    examples_seen = int(record["examples_seen"])

    def produce():
        for host_batch in dataset.train_batches(
            batch_size, start_step, seed, jax.process_index(), jax.process_count()
        ):
            yield (
                sharding.to_global(mesh, rules, device_batch(schema, host_batch)),
                sharding.to_global(mesh, rules, collection.host_ids(host_batch)),
            )

    if lead:
        print(f"Run directory: {os.path.abspath(run_dir)}", flush=True)
    bar = _progress_bar(start_step, num_steps, enabled=progress and lead)
    prefetch = _Prefetcher(produce()) if start_step < num_steps else None
    loop_start = time.time()
    step = start_step
    loss_sum, loss_count, window_start, window_step = None, 0, time.time(), step
    try:
        with _StopSignal() as stop:
            while step < num_steps:
                batch, ids = prefetch.next()
                state, loss = train_step(state, batch, ids)
                loss_sum = loss if loss_sum is None else loss_sum + loss
                loss_count += 1
                step += 1
                examples_seen += batch_size
                preempted = _any_process(stop.requested)
                boundary = (
                    step % log_every == 0 or step == num_steps or ckpt.due(step) or preempted
                    or (eval_every and step % eval_every == 0)
                )
                if not boundary:
                    continue
                mean_loss = float(loss_sum) / loss_count  # the only host sync between boundaries
                if not math.isfinite(mean_loss):
                    ckpt.wait()  # name only a checkpoint whose save has completed
                    last = ckpt.latest_step()
                    kept = (
                        "No checkpoint was written yet." if last is None
                        else f"The last good checkpoint is kept: {os.path.join(run_dir, 'checkpoints', str(last))}."
                    )  # fmt: skip
                    raise TrainingDiverged(
                        f"loss became {mean_loss} between steps {step - loss_count + 1} and {step}; stopping. {kept}"
                    )
                now = time.time()
                rate = (step - window_step) * batch_size / max(now - window_start, 1e-9)
                if writer:
                    writer.log(step, {"train/loss": mean_loss, "train/examples_per_s": rate})
                bar.update(step, mean_loss, rate)
                loss_sum, loss_count, window_start, window_step = None, 0, now, step
                if eval_every and step % eval_every == 0 and step < num_steps:
                    state = flush_step(state)
                    result = evaluate("valid")
                    if writer:
                        writer.log(step, {f"valid/{k}": v for k, v in result.items()})
                    bar.note(f"step {step}: valid auc {result['auc']:.4f} logloss {result['logloss']:.4f}")
                    window_start = time.time()
                if ckpt.due(step) or step == num_steps or preempted:
                    ckpt.save(step, state, _record(examples_seen, record, loop_start))
                if preempted:
                    ckpt.wait()
                    if lead:
                        print(f"Stopped by SIGTERM at step {step}; checkpoint saved. Run again to resume.")
                    return {"preempted_at_step": step}
    finally:
        bar.close()
        if prefetch:
            prefetch.close()
        ckpt.wait()

    train_wall = record["train_wall_s"] + (time.time() - loop_start)
    if ckpt.latest_step() != num_steps:  # e.g. a run resumed from its final checkpoint saves nothing new
        ckpt.save(num_steps, state, _record(examples_seen, record, loop_start))
    ckpt.close()

    results = {
        "model": model_name,
        "dataset": schema.name,
        "steps": num_steps,
        "examples_seen": examples_seen,
        "train_wall_s": train_wall,
        "wall_s_this_process": time.time() - start_wall,
        "num_params": num_params,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    state = flush_step(state)
    for split in final_eval_splits:
        results[split] = evaluate(split)
    if writer:
        writer.log(num_steps, {f"{s}/{k}": v for s in final_eval_splits for k, v in results[s].items()})
        writer.finish(results)
        summary = "  ".join(
            f"{s}: auc {results[s]['auc']:.4f} logloss {results[s]['logloss']:.4f}"
            + (f" gauc {results[s]['gauc']:.4f}" if "gauc" in results[s] else "")
            for s in final_eval_splits
        )
        print(f"Finished {num_steps} steps in {train_wall:.1f}s of training. {summary}", flush=True)
        print(f"Results: {os.path.abspath(os.path.join(run_dir, 'results.json'))}", flush=True)
    from ctr import export  # here: ctr.export imports this module

    export.export_at_end(run_dir)  # a SavedModel of the last checkpoint when export_at_end.enabled
    return results


def _check_config(
    model_name: str, final_eval_splits: Any, num_steps: Any, num_epochs: Any, **ints: int
) -> None:
    """Types and ranges of the ``train`` bindings, before any data is read (gin passes whatever a config says)."""
    minimum = {"eval_every": 0, "seed": None}
    for name, value in ints.items():
        errors.check_int(f"train.{name}", value, minimum.get(name, 1))
    if num_steps is not None and num_epochs is not None:
        raise errors.ConfigError(f"train.num_steps = {num_steps} and train.num_epochs = {num_epochs}: give one")
    if num_steps is not None:
        errors.check_int("train.num_steps", num_steps, 1)
    if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, float))
                                   or not num_epochs > 0):  # fmt: skip
        raise errors.ConfigError(f"train.num_epochs: expected a number > 0, got {errors.shorten(repr(num_epochs), 80)}")
    if not isinstance(model_name, str) or model_name not in model_zoo.names():
        raise errors.ConfigError(f"train.model_name: unknown model {errors.shorten(repr(model_name), 80)}; "
                                 f"registered: {', '.join(model_zoo.names())}")  # fmt: skip
    if isinstance(final_eval_splits, str) or not all(s in splits_lib.NAMES for s in final_eval_splits):
        raise errors.ConfigError(f"train.final_eval_splits: expected a tuple of {splits_lib.NAMES}, got "
                                 f"{errors.shorten(repr(final_eval_splits), 80)}")  # fmt: skip


def _check_splits(dataset: Any, batch_size: int, eval_every: int, final_eval_splits: tuple[str, ...]) -> None:
    """The splits the run reads have rows, and the train split a whole global batch."""
    where = getattr(dataset, "data_dir", None) or dataset.schema.name
    train_rows = dataset.num_rows(splits_lib.TRAIN)
    if train_rows < batch_size:
        raise errors.ConfigError(f"train.batch_size = {batch_size} is larger than the train split of {where} "
                                 f"({train_rows} rows)")  # fmt: skip
    for split in set(final_eval_splits) | ({splits_lib.VALID} if eval_every else set()):
        if not dataset.num_rows(split):
            raise errors.UserError(f"the {split} split of {where} is empty (see train.final_eval_splits, "
                                   "train.eval_every)")  # fmt: skip


def _record(examples_seen: int, record: dict, loop_start: float) -> dict:
    return {"examples_seen": examples_seen, "train_wall_s": record["train_wall_s"] + time.time() - loop_start}


def _any_process(flag: bool) -> bool:
    """True when any process got SIGTERM (all processes must stop at the same step)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class _RunWriter:
    """metrics.jsonl, TensorBoard events, the gin configs, results.json and plots of one run (process 0)."""

    def __init__(self, run_dir: str, start_step: int | None = None, num_steps: int | None = None):
        self.run_dir = run_dir
        path = os.path.join(run_dir, "metrics.jsonl")
        if start_step is not None and os.path.exists(path):  # lines of a run killed after its last checkpoint
            _drop_lines_after(path, start_step, num_steps)
        self._jsonl = open(path, "a", encoding="utf-8")
        try:
            import tensorflow as tf  # for tf.summary only
        except ImportError:  # e.g. an accelerator image without TF: training does not need it
            logging.warning("tensorflow is not installed: no TensorBoard events; metrics.jsonl has every value")
            self._tf = self._tb = None
        else:
            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))

    def write_config(self) -> None:
        with open(os.path.join(self.run_dir, "config.gin"), "w", encoding="utf-8") as f:
            f.write(gin.config_str())

    def log(self, step: int, values: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is None:
            return
        with self._tb.as_default(step=step):
            for key, value in values.items():
                self._tf.summary.scalar(key, value)

    def finish(self, results: dict[str, Any]) -> None:
        with open(os.path.join(self.run_dir, "operative_config.gin"), "w", encoding="utf-8") as f:
            f.write(gin.operative_config_str())
        with open(os.path.join(self.run_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        self._jsonl.close()
        if self._tb is not None:
            self._tb.flush()
        plots.plot_run(self.run_dir)


def _drop_lines_after(path: str, step: int, num_steps: int | None) -> None:
    """Keeps the metrics.jsonl lines a run resumed at ``step`` will not write again: those up to ``step``, but not
    the final evaluation when it resumes from its last step (it evaluates again). A torn last line goes too."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                continue
            final = entry["step"] == num_steps and not any(k.startswith("train/") for k in entry)
            if entry["step"] <= step and not final:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".partial", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".partial", path)


class _progress_bar:
    """tqdm bar showing examples/s and the running loss (a no-op when disabled)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self._bar = None
        self._last = start
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, loss: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._last)
            self._bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:,.0f}", refresh=False)
        self._last = step

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
