"""Sparse optimizers for embedding tables: they update only the rows a step touched.

A step hands each table ``(rows [N] int32, grads [N, D] float32)`` where ``rows`` are already deduplicated
and their gradients summed (see :func:`dedupe_row_grads`); padding entries carry an out-of-range row index, so
the gathers read zeros for them and the scatters drop them. Work per step is O(N * D) whatever the table size
(no op touches a whole table), and with the table and slots donated XLA updates them in place.

Semantics match the dense optimizers restricted to touched rows: a row that no step touched keeps its value
and slots bit for bit. Adagrad follows Keras (accumulator starts at 0.1, epsilon outside the square root);
Adam follows ``optax.adam`` but is "lazy" (as TF's ``LazyAdamOptimizer``): moments of untouched rows are not
decayed, bias correction uses the global step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp

Slots = dict[str, jax.Array]


def dedupe_row_grads(
    rows: jax.Array, grads: jax.Array, num_rows: int, size: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Deduplicates ``rows [N]`` (ids in ``[0, num_rows]``, ``num_rows`` = padding) and sums their ``grads [N, D]``.

    Args:
      rows, grads: touched rows and their gradients.
      num_rows: the table's rows; an entry equal to it is padding and is dropped.
      size: output length (default N); it must be at least the number of distinct real rows.

    Returns:
      ``(unique_rows [size], summed_grads [size, D], valid [size])``: the first ``k`` entries are the distinct
      rows (ascending) with their summed gradients, the rest padding with row index ``num_rows``.
    """
    size = rows.shape[0] if size is None else size
    unique, inverse = jnp.unique(rows, size=size, fill_value=num_rows, return_inverse=True)
    # Padding ids sort last, so when ``size`` cuts the padding value off its gradients get segment ids >= size
    # and segment_sum drops them.
    summed = jax.ops.segment_sum(grads, inverse.reshape(-1), num_segments=size)
    return unique, summed, unique < num_rows


def _gather(values: jax.Array, rows: jax.Array) -> jax.Array:
    return values.at[rows].get(mode="fill", fill_value=0)


def _scatter(values: jax.Array, rows: jax.Array, new: jax.Array) -> jax.Array:
    return values.at[rows].set(new, mode="drop")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseSGD:
    """Plain SGD on touched rows. ``learning_rate`` per unit gradient."""

    learning_rate: float = 0.01

    def init(self, table: jax.Array) -> Slots:
        return {}

    def update(self, table, slots, rows, grads, step) -> tuple[jax.Array, Slots]:
        return _scatter(table, rows, _gather(table, rows) - self.learning_rate * grads), slots


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseAdagrad:
    """Adagrad with one accumulator per table element (Keras/TF semantics).

    ``acc += g^2; w -= lr * g / (sqrt(acc) + epsilon)``, accumulators start at ``initial_accumulator``.
    """

    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    epsilon: float = 1e-7

    def init(self, table: jax.Array) -> Slots:
        return {"accumulator": jnp.full_like(table, self.initial_accumulator)}

    def update(self, table, slots, rows, grads, step) -> tuple[jax.Array, Slots]:
        acc = _gather(slots["accumulator"], rows) + grads * grads
        new = _gather(table, rows) - self.learning_rate * grads / (jnp.sqrt(acc) + self.epsilon)
        return _scatter(table, rows, new), {"accumulator": _scatter(slots["accumulator"], rows, acc)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseRowwiseAdagrad:
    """Row-wise Adagrad (one accumulator per row, the mean squared gradient of the row): D times less slot memory."""

    learning_rate: float = 0.05
    initial_accumulator: float = 0.0
    epsilon: float = 1e-8

    def init(self, table: jax.Array) -> Slots:
        return {"accumulator": jnp.full(table.shape[:1], self.initial_accumulator, table.dtype)}

    def update(self, table, slots, rows, grads, step) -> tuple[jax.Array, Slots]:
        acc = _gather(slots["accumulator"], rows) + jnp.mean(grads * grads, axis=-1)
        scale = self.learning_rate / (jnp.sqrt(acc) + self.epsilon)
        new = _gather(table, rows) - scale[:, None] * grads
        return _scatter(table, rows, new), {"accumulator": _scatter(slots["accumulator"], rows, acc)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseAdam:
    """Lazy Adam: the moments of touched rows only, bias-corrected with the global step (``optax.adam`` formula)."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    epsilon: float = 1e-8

    def init(self, table: jax.Array) -> Slots:
        return {"mu": jnp.zeros_like(table), "nu": jnp.zeros_like(table)}

    def update(self, table, slots, rows, grads, step) -> tuple[jax.Array, Slots]:
        t = (step + 1).astype(jnp.float32)
        mu = self.b1 * _gather(slots["mu"], rows) + (1 - self.b1) * grads
        nu = self.b2 * _gather(slots["nu"], rows) + (1 - self.b2) * grads * grads
        mu_hat = mu / (1 - self.b1**t)
        nu_hat = nu / (1 - self.b2**t)
        new = _gather(table, rows) - self.learning_rate * mu_hat / (jnp.sqrt(nu_hat) + self.epsilon)
        return _scatter(table, rows, new), {"mu": _scatter(slots["mu"], rows, mu), "nu": _scatter(slots["nu"], rows, nu)}


SparseOptimizer = Any  # any class above: init(table) -> slots; update(table, slots, rows, grads, step) -> (table, slots)
