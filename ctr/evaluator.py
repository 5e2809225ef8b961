"""Exact evaluation: every prediction of a split reaches the host, so AUC, logloss and gAUC are exact.

Each process feeds its slice of every eval batch (the last one padded, see
:meth:`ctr.data.dataset.Dataset.eval_batches`); the jitted eval step returns batch-sharded logits; in a
multi-host job labels, logits, groups and the padding mask are all-gathered over processes
(``process_allgather``) before the padding is dropped, so every process computes the same metrics.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ctr import metrics, optimizers, mesh as mesh_lib
from ctr.data import schema as schema_lib
from ctr.data.dataset import Dataset
from ctr.train_state import Batch, CTRModule, Shardings, TrainState, device_batch
from embeddings.collection import Embeddings
from embeddings.sparse_optim import SparseOptimizer


class Evaluator:
    """Evaluates a state on whole splits of ``dataset`` (see the module docstring).

    Args:
      dataset: the dataset trained on.
      collection, module: as in the train step.
      sparse_optimizer: the table rows' optimizer, whose deferred moves :meth:`flush` applies.
      mesh, rules, shardings: where the state and a step's inputs live.
      batch_size: global eval batch (examples per eval step over all hosts and devices).
    """

    def __init__(self, dataset: Dataset, collection: Embeddings, module: CTRModule, sparse_optimizer: SparseOptimizer,
                 mesh: Mesh, rules: dict[str, tuple[str, ...]], shardings: Shardings, batch_size: int):  # fmt: skip
        self._dataset, self._collection, self._mesh, self._rules = dataset, collection, mesh, rules
        self._batch_size = batch_size
        network = module.network
        parts = getattr(network, "parts", None)  # an ensemble's members (see ctr.model_io.Network)

        def eval_step(state: TrainState, batch: Batch, ids: Batch) -> Any:
            rows = collection.read_rows(state.tables, ids)
            params = optimizers.eval_params(state.params, state.opt_state)  # the moving average, if kept
            outputs = module.apply({"params": params}, rows, batch, train=False)
            return (network.logits(outputs), parts(outputs) if parts else {})

        self._eval_step = jax.jit(
            eval_step,
            in_shardings=(shardings.state, shardings.batch, shardings.ids),
            out_shardings=mesh_lib.batch_sharding(mesh, rules),
        )

        def flush_step(state: TrainState) -> TrainState:
            tables, slots = collection.flush(state.tables, state.table_slots, sparse_optimizer, state.step)
            return state.replace(tables=tables, table_slots=slots)

        self._flush_step = jax.jit(
            flush_step, in_shardings=(shardings.state,), out_shardings=shardings.state, donate_argnums=0
        )

    def flush(self, state: TrainState) -> TrainState:
        """Brings every row up to date before an evaluation (SparseAdam's deferred moves; donates ``state``).

        It changes no later step, and evaluations fall on fixed steps, so a resumed run flushes where an
        uninterrupted one does.
        """
        return self._flush_step(state)

    def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
        """Exact metrics of ``state`` on the whole ``split`` (:func:`ctr.metrics.evaluate`).

        For an ensemble (a network with ``parts``) also each member's ``tower/<name>/auc``, ``.../logloss``,
        ``.../gauc`` and ``.../weight`` (its mean weight in the fused prediction).
        """
        schema = self._dataset.schema
        labels, logits, groups, members = [], [], [], {}
        for host_batch, real in self._dataset.eval_batches(
            split, self._batch_size, jax.process_index(), jax.process_count()
        ):
            dev = mesh_lib.to_global(self._mesh, self._rules, device_batch(schema, host_batch))
            ids = mesh_lib.to_global(self._mesh, self._rules, self._collection.host_ids(host_batch))
            out, out_parts = self._eval_step(state, dev, ids)
            valid = np.arange(len(host_batch[schema_lib.LABEL])) < real
            local: dict[str, Any] = {"label": host_batch[schema_lib.LABEL], "valid": valid}
            if schema.group_key is not None:
                local["group"] = host_batch[schema_lib.GROUP]
            if jax.process_count() > 1:
                local = multihost_utils.process_allgather(local, tiled=True)
                out, out_parts = multihost_utils.process_allgather((out, out_parts), tiled=True)
            keep = np.asarray(local["valid"])
            labels.append(np.asarray(local["label"])[keep])
            logits.append(np.asarray(out)[keep])
            for name, (part_logits, weight) in out_parts.items():
                members.setdefault(name, ([], []))
                members[name][0].append(np.asarray(part_logits)[keep])
                members[name][1].append(np.asarray(weight)[keep])
            if "group" in local:
                groups.append(np.asarray(local["group"])[keep])
        labels = np.concatenate(labels)
        groups = np.concatenate(groups) if groups else None
        result = metrics.evaluate(labels, np.concatenate(logits), groups)
        for name, (part_logits, weights) in members.items():
            part = metrics.evaluate(labels, np.concatenate(part_logits), groups)
            result.update({f"tower/{name}/{k}": part[k] for k in ("auc", "logloss", "gauc") if k in part})
            result[f"tower/{name}/weight"] = float(np.concatenate(weights).mean())
        return result
