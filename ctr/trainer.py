"""The training loop: config checks -> mesh -> state (with shardings) -> restore -> {step, log, eval, checkpoint}
-> results.

The train step is one pure jitted function with explicit shardings and a donated state. Embedding tables
never get dense gradients: the step gathers the rows a batch needs, differentiates the loss with respect to
those rows and the dense parameters, updates dense parameters with optax and the touched rows with a sparse
optimizer (see :mod:`embeddings.collection`). The parts around it are their own modules: the state and its
shardings (:mod:`ctr.train_state`), exact evaluation (:mod:`ctr.evaluator`), what a run writes
(:mod:`ctr.run_writer`), the cross-field checks (:mod:`ctr.config_checks`), the input thread
(:mod:`ctr.prefetch`) and SIGTERM (:mod:`ctr.preemption`).

Where additions go: work at every step belongs in ``train``'s loop before the ``boundary`` test (keep it
free of host syncs); work at log boundaries in :func:`_at_boundary`; work after the last step (export, ...)
in :func:`_finish`, after the final checkpoint and evaluation.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, NamedTuple

import gin
import jax
import optax

from ctr import checkpointing, config_checks, faults, optimizers, paths, preemption, mesh as mesh_lib
from ctr import models as model_zoo
from ctr.data import dataset as dataset_lib
from ctr.data import schema as schema_lib
from ctr.evaluator import Evaluator
from ctr.prefetch import Prefetcher
from ctr.run_writer import ProgressBar, RunWriter
from ctr.train_state import Batch, CTRModule, Shardings, TrainState, device_batch
from ctr import train_state as train_state_lib
from embeddings import collection as collection_lib
from embeddings import sparse_optim


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last checkpoint (saved before it happened) is kept."""


class StepPhases(NamedTuple):
    """The three parts a train step is made of, as :func:`make_train_step` composes them (benchmarks jit each
    alone to time it: ``benchmarks/gpu_throughput.py``).

    Attributes:
      lookup: ``(tables, ids) -> rows``, outside autodiff.
      dense: ``(params, opt_state, rows, batch, dropout_rng) -> (loss, params, opt_state, row grads)``: the
        model's forward and backward pass and the optax update of the dense parameters.
      update: ``(tables, slots, ids, row grads, step) -> (tables, slots)``: the sparse optimizer on the rows
        the lookups touched.
    """

    lookup: Callable
    dense: Callable
    update: Callable


def step_phases(module: CTRModule, tx: optax.GradientTransformation,
                sparse_optimizer: sparse_optim.SparseOptimizer) -> StepPhases:  # fmt: skip
    """The parts of the train step (see :class:`StepPhases`)."""
    collection, network = module.collection, module.network

    def dense(params, opt_state, rows, batch, dropout_rng):
        def loss_fn(params, rows):
            outputs = module.apply({"params": params}, rows, batch, train=True, rngs={"dropout": dropout_rng})
            return network.loss(outputs, batch[schema_lib.LABEL])

        loss, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, rows)
        updates, opt_state = tx.update(g_params, opt_state, params)
        return loss, optax.apply_updates(params, updates), opt_state, g_rows

    def update(tables, slots, ids, g_rows, step):
        return collection.sparse_update(tables, slots, ids, g_rows, sparse_optimizer, step)

    return StepPhases(lookup=collection.read_rows, dense=dense, update=update)


def make_train_step(module: CTRModule, tx: optax.GradientTransformation, sparse_optimizer: sparse_optim.SparseOptimizer,
                    shardings: Shardings, mesh: jax.sharding.Mesh) -> Callable:  # fmt: skip
    """The jitted step ``(state, device batch, ids) -> (state, loss)``; the state is donated."""
    phases = step_phases(module, tx, sparse_optimizer)

    def train_step(state: TrainState, batch: Batch, ids: Batch) -> tuple[TrainState, jax.Array]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        rows = phases.lookup(state.tables, ids)
        loss, params, opt_state, g_rows = phases.dense(state.params, state.opt_state, rows, batch, dropout_rng)
        tables, slots = phases.update(state.tables, state.table_slots, ids, g_rows, state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, tables=tables, table_slots=slots
        )
        return new_state, loss

    return jax.jit(
        train_step,
        in_shardings=(shardings.state, shardings.batch, shardings.ids),
        out_shardings=(shardings.state, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )


@gin.configurable
def train(
    run_dir: str = gin.REQUIRED,
    dataset_fn: Callable[[], dataset_lib.Dataset] = gin.REQUIRED,
    model_name: str = "dcnv2",
    embedding_fn: Callable[[schema_lib.FeatureSchema], collection_lib.Embeddings] = gin.REQUIRED,
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
    start_wall, lead = time.time(), jax.process_index() == 0
    config_checks.check_bindings(model_name, final_eval_splits, num_steps, num_epochs, batch_size=batch_size,
                                 eval_every=eval_every, eval_batch_size=eval_batch_size, log_every=log_every,
                                 seed=seed)  # fmt: skip
    mesh, rules = mesh_lib.make_mesh(), mesh_lib.logical_rules()
    config_checks.check_mesh(mesh, rules, batch_size, eval_batch_size)
    dataset = dataset_fn()
    config_checks.check_against_data(dataset, batch_size, eval_every, final_eval_splits)
    num_steps = _resolve_num_steps(dataset, batch_size, num_steps, num_epochs, lead)
    collection = embedding_fn(dataset.schema)
    config_checks.check_tables(collection, mesh, rules)
    collection = collection.with_mesh(mesh, rules["table_rows"])
    network = model_zoo.get(model_name)()
    config_checks.check_model_and_embeddings(model_name, network, collection)
    module = CTRModule(collection=collection, network=network)
    tx = optimizers.dense_optimizer(num_steps=num_steps)  # the run's length, for a cool-down
    logging.info("model %s, %d train rows, mesh %s", model_name, dataset.num_rows("train"), dict(mesh.shape))
    state, shardings = train_state_lib.build(dataset, collection, module, tx, sparse_optimizer, mesh, rules, seed)
    num_params = train_state_lib.num_parameters(state, collection)

    paths.makedirs(run_dir)  # only now: a config or data error above leaves no run directory
    ckpt = checkpointing.Checkpointer(paths.join(run_dir, "checkpoints"),
                                      table_rows=checkpointing.logical_table_rows(collection))  # fmt: skip
    state, record = _restore(ckpt, state, run_dir, lead, dataset, batch_size)
    train_step = make_train_step(module, tx, sparse_optimizer, shardings, mesh)
    evaluator = Evaluator(dataset, collection, module, sparse_optimizer, mesh, rules, shardings, eval_batch_size)

    start_step = step = int(state.step)
    run = _Run(run_dir, num_steps, batch_size, eval_every, ckpt, evaluator, record, lead=lead,
               writer=RunWriter(run_dir, start_step, num_steps) if lead else None, progress=progress,
               start_step=start_step, devices=mesh.size)  # fmt: skip
    examples_seen = int(record["examples_seen"])
    inputs = device_inputs(dataset, collection, mesh, rules, batch_size, start_step, seed)
    prefetch = Prefetcher(inputs) if start_step < num_steps else None
    window = _LossWindow(step)
    try:
        with preemption.StopSignal() as stop, faults.Watchdog(steps_per_sync=log_every) as watch:
            while step < num_steps:
                batch, ids = prefetch.next()
                state, loss = train_step(state, batch, ids)
                window.add(loss)  # per-step work goes here: no host sync between boundaries
                step += 1
                examples_seen += batch_size
                watch.step_done(step)
                boundary = (
                    step % log_every == 0 or step == num_steps or ckpt.due(step)
                    or (eval_every and step % eval_every == 0)
                )
                if not boundary:
                    continue
                preempted = preemption.any_process(stop.requested)  # boundaries only: the same steps everywhere
                state = run.at_boundary(step, state, window, examples_seen, preempted, watch)
                if preempted:
                    return {"preempted_at_step": step}
    finally:
        run.bar.close()
        if prefetch:
            prefetch.close()
        ckpt.wait()
    return run.finish(state, examples_seen, final_eval_splits, model_name, dataset.schema.name, num_params,
                      start_wall)  # fmt: skip


def _resolve_num_steps(dataset: dataset_lib.Dataset, batch_size: int, num_steps: int | None,
                       num_epochs: float | None, lead: bool) -> int:  # fmt: skip
    """``num_steps``, else ``round(num_epochs * steps per epoch)`` (neither: one epoch); printed."""
    steps_per_epoch = dataset.steps_per_epoch(batch_size, jax.process_count())
    if num_steps is None:
        num_steps = max(1, round((1.0 if num_epochs is None else num_epochs) * steps_per_epoch))
    if lead:
        print(
            f"Training {num_steps} steps of {batch_size} examples "
            f"({num_steps / max(steps_per_epoch, 1):.2f} epochs of {steps_per_epoch} steps)",
            flush=True,
        )
    return num_steps


def _restore(ckpt: checkpointing.Checkpointer, state: TrainState, run_dir: str, lead: bool,
             dataset: dataset_lib.Dataset, batch_size: int) -> tuple[TrainState, dict]:  # fmt: skip
    """The newest intact checkpoint's state and record, or ``state`` and an empty record. A data order that
    depends on the host count (``prepared.host_shards``) resumes on another count only at an epoch boundary."""
    record = {"examples_seen": 0, "train_wall_s": 0.0}
    restored = ckpt.restore_latest(checkpointing.abstract_like(state))
    if restored is None:
        return state, record
    restored_step, state, record = restored
    if dataset.host_shards:
        dataset_lib.check_resume_host_count(restored_step, dataset.steps_per_epoch(batch_size, jax.process_count()),
                                            record.get("process_count"), jax.process_count())  # fmt: skip
    logging.info("resumed from %s at step %d", ckpt, restored_step)
    if lead:
        print(f"Resuming from the checkpoint at step {restored_step} in {run_dir}", flush=True)
    return state, record


def device_inputs(dataset, collection, mesh, rules, batch_size: int, start_step: int, seed: int):
    """(device batch, ids) of every step from ``start_step`` on, as global arrays (run on the input thread)."""
    for host_batch in dataset.train_batches(batch_size, start_step, seed, jax.process_index(), jax.process_count()):
        yield (
            mesh_lib.to_global(mesh, rules, device_batch(dataset.schema, host_batch)),
            mesh_lib.to_global(mesh, rules, collection.host_ids(host_batch)),
        )


class _LossWindow:
    """The step losses since the last log boundary, summed on device: reading them is the loop's only host sync."""

    def __init__(self, step: int):
        self.reset(step)

    def reset(self, step: int) -> None:
        self.sum, self.count, self.start, self.step = None, 0, time.time(), step

    def add(self, loss: jax.Array) -> None:
        self.sum = loss if self.sum is None else self.sum + loss
        self.count += 1


class _Run:
    """What the loop does at log boundaries and after the last step; the rest of one run's fixed context."""

    def __init__(self, run_dir: str, num_steps: int, batch_size: int, eval_every: int,
                 ckpt: checkpointing.Checkpointer, evaluator: Evaluator, record: dict, *, lead: bool,
                 writer: RunWriter | None, progress: bool, start_step: int, devices: int):  # fmt: skip
        self.run_dir, self.num_steps, self.batch_size, self.eval_every = run_dir, num_steps, batch_size, eval_every
        self.devices = devices  # the mesh's (a run may use fewer than jax.device_count(): make_mesh.num_devices)
        self.ckpt, self.evaluator, self.record, self.lead, self.writer = ckpt, evaluator, record, lead, writer
        if writer:
            writer.write_config()
        if lead:
            print(f"Run directory: {paths.resolve(run_dir)}", flush=True)
        self.bar = ProgressBar(start_step, num_steps, enabled=progress and lead)
        self.loop_start = time.time()

    def at_boundary(self, step: int, state: TrainState, window: _LossWindow, examples_seen: int,
                    preempted: bool, watch: faults.Watchdog) -> TrainState:  # fmt: skip
        """Reads the loss (stops on NaN/Inf), logs, evaluates and checkpoints when due; after a preemption
        notice it saves and waits for the save (the loop then returns)."""
        mean_loss = float(window.sum) / window.count  # the only host sync between boundaries
        if not math.isfinite(mean_loss):
            self._diverged(mean_loss, step, window.count)
        now = time.time()
        rate = (step - window.step) * self.batch_size / max(now - window.start, 1e-9)
        if self.writer:
            self.writer.log(step, {"train/loss": mean_loss, "train/examples_per_s": rate})
        self.bar.update(step, mean_loss, rate)
        window.reset(step)
        window.start = now
        if self.eval_every and step % self.eval_every == 0 and step < self.num_steps:
            with watch.phase("evaluation"):
                state = self.evaluator.flush(state)
                result = self.evaluator.evaluate(state, "valid")
            if self.writer:
                self.writer.log(step, {f"valid/{k}": v for k, v in result.items()})
            self.bar.note(f"step {step}: valid auc {result['auc']:.4f} logloss {result['logloss']:.4f}")
            window.start = time.time()
        if self.ckpt.due(step) or step == self.num_steps or preempted:
            with watch.phase("checkpoint save"):
                self.ckpt.save(step, state, self._record(examples_seen))
            if self.writer:
                self.writer.sync()  # run files on an object store follow the checkpoints
        if preempted:
            with watch.phase("checkpoint save"):
                self.ckpt.wait()
            if self.lead:
                print(f"Stopped by SIGTERM at step {step}; checkpoint saved. Run again to resume.")
        return state

    def _diverged(self, mean_loss: float, step: int, count: int) -> None:
        self.ckpt.wait()  # name only a checkpoint whose save has completed
        last = self.ckpt.latest_step()
        kept = (
            "No checkpoint was written yet." if last is None
            else f"The last good checkpoint is kept: {paths.join(self.run_dir, 'checkpoints', str(last))}."
        )  # fmt: skip
        raise TrainingDiverged(f"loss became {mean_loss} between steps {step - count + 1} and {step}; stopping. {kept}")

    def finish(self, state: TrainState, examples_seen: int, splits: tuple[str, ...], model_name: str,
               dataset_name: str, num_params: dict[str, int], start_wall: float) -> dict[str, Any]:  # fmt: skip
        """The final checkpoint, the final evaluation of ``splits`` and results.json; returns the results.

        End-of-training additions (export, ...) go here, after the final evaluation.
        """
        train_wall = self.record["train_wall_s"] + (time.time() - self.loop_start)
        if self.ckpt.latest_step() != self.num_steps:  # e.g. a run resumed from its final checkpoint saves nothing
            self.ckpt.save(self.num_steps, state, self._record(examples_seen))
        self.ckpt.close()
        results = {
            "model": model_name,
            "dataset": dataset_name,
            "steps": self.num_steps,
            "examples_seen": examples_seen,
            "train_wall_s": train_wall,
            "wall_s_this_process": time.time() - start_wall,
            "num_params": num_params,
            "devices": self.devices,
            "processes": jax.process_count(),
        }
        state = self.evaluator.flush(state)
        for split in splits:
            results[split] = self.evaluator.evaluate(state, split)
        if self.writer:
            self.writer.finish(results, splits)
        from ctr import export  # here: ctr.export imports this module

        export.export_at_end(self.run_dir)  # a SavedModel of the last checkpoint when export_at_end.enabled
        return results

    def _record(self, examples_seen: int) -> dict:
        wall = self.record["train_wall_s"] + time.time() - self.loop_start
        return {"examples_seen": examples_seen, "train_wall_s": wall, "process_count": jax.process_count()}
