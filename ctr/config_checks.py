"""Every cross-field check of a training config, in one place, run at start-up before anything is traced.

gin passes whatever a config says, and a mismatch between two bindings (a batch that does not divide over the
devices, a CETNet tower without its embedding collection) would otherwise surface as a shape or key error deep
inside the first trace. :func:`check_bindings` and :func:`check_mesh` run before any data is read;
:func:`check_against_data`, :func:`check_tables` and :func:`check_model_and_embeddings` once the dataset, the
network and the collection exist, before the state is built. Each failure is a :class:`ctr.errors.ConfigError`
(or ``UserError``) naming the bindings.
"""
from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from ctr import errors, mesh as mesh_lib
from ctr import models as model_zoo
from ctr.data import splits as splits_lib
from ctr.data.dataset import Dataset
from ctr.models.cetnet import CETNet
from embeddings import table_placement
from embeddings.collection import Embeddings
from embeddings.towers import SEP, TowerCollections


def check_bindings(
    model_name: str, final_eval_splits: Any, num_steps: Any, num_epochs: Any, **ints: int
) -> None:
    """Types and ranges of the ``train`` bindings, before any data is read."""
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


def check_mesh(mesh: Mesh, rules: dict[str, tuple[str, ...]], batch_size: int, eval_batch_size: int) -> None:
    """The logical rules name mesh axes, and both global batches divide over the devices of the batch axes."""
    for rule, axes in rules.items():
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown or len(set(axes)) != len(axes):
            raise errors.ConfigError(f"logical_rules.{rule} = {axes}: expected distinct axes of the mesh "
                                     f"{tuple(mesh.axis_names)}")  # fmt: skip
    n_batch_shards = mesh_lib.batch_shards(mesh, rules)
    for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if size % n_batch_shards:
            raise errors.ConfigError(f"train.{name} = {size} does not divide over the {n_batch_shards} devices of "
                                     f"the batch axes {rules['batch']}")  # fmt: skip


def check_tables(collection: Embeddings, mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> None:
    """Every table's rows divide over the devices of the ``table_rows`` axes (so it can be row-sharded)."""
    shards = table_placement.axis_size(mesh, rules["table_rows"])
    for table in collection.tables.values():
        if table.num_rows % shards:
            raise errors.ConfigError(f"table {table.name} has {table.num_rows} rows, which do not divide over the "
                                     f"{shards} devices of logical_rules.table_rows = {rules['table_rows']}: raise "
                                     "build_collection.row_alignment")  # fmt: skip


def check_against_data(dataset: Dataset, batch_size: int, eval_every: int, final_eval_splits: tuple[str, ...]) -> None:
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


def check_model_and_embeddings(model_name: str, network: Any, collection: Any) -> None:
    """An ensemble's towers and per-tower collections agree.

    A CETNet tower's name is three things at once: the key of its collection in ``tower_collections.towers``
    (so of ``ModelInputs.towers``), the gin scope its model is built in, and its parameter subtree. Per-tower
    collections are only read by an ensemble, and then every tower needs exactly one.
    """
    names = [name for name, _ in network.towers] if isinstance(network, CETNet) else None
    if names is not None:
        for name, tower_model in network.towers:
            if not isinstance(name, str) or not name or SEP in name:
                raise errors.ConfigError(f"CETNet.towers: tower name {name!r} must be a non-empty string "
                                         f"without {SEP!r} (it is a gin scope and a table-name prefix)")  # fmt: skip
            if tower_model not in model_zoo.names() or tower_model == model_name:
                raise errors.ConfigError(f"CETNet.towers: tower {name!r} names model {tower_model!r}; expected "
                                         f"one of {', '.join(n for n in model_zoo.names() if n != model_name)}")
        if len(set(names)) != len(names):
            raise errors.ConfigError(f"CETNet.towers: tower names must be distinct, got {names}")
    if not isinstance(collection, TowerCollections):
        return
    collections = [name for name, _ in collection.towers]
    if names is None:
        raise errors.ConfigError(f"train.embedding_fn builds per-tower collections ({collections}), which only an "
                                 f"ensemble reads; train.model_name = {model_name!r} is not one")  # fmt: skip
    if sorted(collections) != sorted(names):
        raise errors.ConfigError(f"tower_collections.towers has collections for {sorted(collections)} but "
                                 f"CETNet.towers names {sorted(names)}: give every tower exactly one")  # fmt: skip
