"""The training state and where its arrays live: built once, abstractly, then initialised with its shardings.

:func:`build` traces the initialiser with ``jax.eval_shape`` (no memory), derives every array's NamedSharding
(tables and their slots row-sharded by the collection, the rest replicated) and runs the initialiser jitted
with those output shardings, so no array is ever materialised on one device first.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ctr import mesh as mesh_lib
from ctr.data import dataset as dataset_lib
from ctr.data import schema as schema_lib
from ctr.data.dataset import Dataset
from embeddings.collection import Embeddings
from embeddings.sparse_optim import SparseOptimizer

Batch = dict[str, Any]


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


def device_batch(schema: schema_lib.FeatureSchema, host_batch: Batch) -> Batch:
    """What the device needs of a host batch: label, dense, sequence masks (fingerprints stay on the host)."""
    out = {schema_lib.LABEL: host_batch[schema_lib.LABEL].astype(np.float32)}
    if schema.dense:
        out[schema_lib.DENSE] = host_batch[schema_lib.DENSE].astype(np.float32)
    for seq in schema.sequences:
        out[seq.mask_key] = host_batch[seq.mask_key]
    return out


@dataclasses.dataclass(frozen=True)
class Shardings:
    """Where each input of a step lives: the state's arrays, the device batch and the row ids."""

    state: TrainState
    batch: Mapping[str, NamedSharding]
    ids: Mapping[str, NamedSharding]


def init_state_fn(
    dataset: Dataset,
    collection: Embeddings,
    module: CTRModule,
    tx: optax.GradientTransformation,
    sparse_optimizer: SparseOptimizer,
    probe_rows: int,
) -> tuple[Callable[[jax.Array], TrainState], Batch, Batch]:
    """``rng -> TrainState``, the initial state (unsharded), with the probe batch it initialises the parameters
    on (``probe_rows`` rows of :func:`~ctr.data.dataset.probe_split`) as (device batch, ids).

    Shapes only depend on the schema, so the probe's content does not matter.
    """
    probe = next(dataset.eval_batches(dataset_lib.probe_split(dataset), probe_rows))[0]
    probe_ids = collection.host_ids(probe)
    probe_dev = device_batch(dataset.schema, probe)

    def init_state(rng: jax.Array) -> TrainState:
        table_rng, param_rng, dropout_rng, state_rng = jax.random.split(rng, 4)
        tables = collection.init(table_rng)
        rows = collection.read_rows(tables, probe_ids)
        params = module.init({"params": param_rng, "dropout": dropout_rng}, rows, probe_dev, train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            tables=tables,
            table_slots={name: sparse_optimizer.init(t) for name, t in tables.items()},
            rng=state_rng,
        )

    return init_state, probe_dev, probe_ids


def build(
    dataset: Dataset,
    collection: Embeddings,
    module: CTRModule,
    tx: optax.GradientTransformation,
    sparse_optimizer: SparseOptimizer,
    mesh: Mesh,
    rules: dict[str, tuple[str, ...]],
    seed: int,
) -> tuple[TrainState, Shardings]:
    """The initial state, sharded, and the shardings of the state and of a step's inputs.

    Parameters are initialised on a probe batch of one row per batch shard (:func:`init_state_fn`).
    """
    init_state, probe_dev, probe_ids = init_state_fn(dataset, collection, module, tx, sparse_optimizer,
                                                     mesh_lib.batch_shards(mesh, rules))  # fmt: skip
    abstract = jax.eval_shape(init_state, jax.random.key(seed))
    state_shardings = TrainState(
        step=mesh_lib.replicated(mesh),
        params=jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract.params),
        opt_state=jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract.opt_state),
        tables=collection.table_shardings(),
        table_slots=collection.slot_shardings(abstract.table_slots),
        rng=mesh_lib.replicated(mesh),
    )

    def sample_shardings(tree):
        return jax.tree.map(lambda x: mesh_lib.batch_sharding(mesh, rules, np.ndim(x)), tree)

    shardings = Shardings(state=state_shardings, batch=sample_shardings(probe_dev), ids=sample_shardings(probe_ids))
    return jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(seed)), shardings


def num_parameters(state: TrainState, collection: Embeddings) -> dict[str, int]:
    """Dense and embedding parameter counts, and the embeddings' bytes (results.json's ``num_params``).

    Embedding parameters are as the family defines them (table rows incl. alignment padding, DHE networks);
    DHE networks live in ``params`` too, so they are subtracted from the dense count.
    """
    embedding_params = collection.num_parameters()
    return {
        "dense": _count(state.params) - (embedding_params - _count(state.tables)),
        "embedding": embedding_params,
        "embedding_bytes": collection.parameter_bytes(),
    }


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
