"""The device mesh and where each kind of array lives on it, declared in gin.

Mesh axes are ``("data", "model")``. Logical rules map what an array is to mesh axes:

- ``batch``: the batch dimension of inputs (default: every axis, i.e. pure data parallelism over all devices);
- ``table_rows``: the row dimension of embedding tables and their optimizer slots (default ``("model",)``; set
  it to ``("data", "model")`` to row-shard tables over every device);
- dense parameters are replicated.

The same code runs on 1 CPU, 8 CPU devices, a GPU host or a TPU slice: only the mesh shape changes.
"""
from __future__ import annotations

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ctr import errors
from embeddings import table_placement

AXES = ("data", "model")


@gin.configurable
def make_mesh(data: int = -1, model: int = 1, num_devices: int = -1) -> Mesh:
    """A ``data x model`` mesh over the first ``num_devices`` devices (``-1``: all); ``-1`` for ``data`` takes
    whatever ``model`` leaves. Fewer devices than the process has (one process only) is for trying a
    checkpoint on a smaller slice, e.g. 8 -> 4 -> 1 devices on one host."""
    n = jax.device_count()
    if num_devices != -1:
        errors.check_int("make_mesh.num_devices", num_devices, 1)
        if num_devices > n or (jax.process_count() > 1 and num_devices != n):
            raise errors.ConfigError(f"make_mesh.num_devices = {num_devices}: this run has {n} devices over "
                                     f"{jax.process_count()} process(es) (fewer is for one process only)")  # fmt: skip
        n = num_devices
    devices = jax.devices()[:n]
    if data == -1:
        if n % model:
            raise errors.ConfigError(f"make_mesh.model = {model} does not divide the {n} devices")
        data = n // model
    if data * model != n:
        raise errors.ConfigError(f"make_mesh.data x make_mesh.model = {data}x{model} does not match the {n} devices")
    # Auto axes: jax 0.10's default Explicit axes reject a plain gather on a sharded table.
    return jax.make_mesh((data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


@gin.configurable
def logical_rules(
    batch: tuple[str, ...] = ("data", "model"), table_rows: tuple[str, ...] = ("model",)
) -> dict[str, tuple[str, ...]]:
    """Logical axis name -> mesh axes (see module docstring)."""
    return {"batch": tuple(batch), "table_rows": tuple(table_rows)}


def batch_shards(mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> int:
    """Devices a global batch is split over: the product of the ``batch`` rule's axis sizes."""
    return table_placement.axis_size(mesh, rules["batch"])


def batch_sharding(mesh: Mesh, rules: dict[str, tuple[str, ...]], ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(rules["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(mesh: Mesh, rules, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays sharded on the batch axes."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, value.ndim), value)
        for key, value in host_batch.items()
    }
