"""Sparse optimizers for embedding tables: they update only the rows a step touched.

A step hands each table ``(rows [N] int32, grads [N, D] float32)`` where ``rows`` are already deduplicated
and their gradients summed (see :func:`dedupe_row_grads`); padding entries carry an out-of-range row index, so
the gathers read zeros for them and the scatters drop them. Work per step is O(N * D) whatever the table size
(no op touches a whole table), and with the table and slots donated XLA updates them in place.

Semantics: SGD and Adagrad equal the dense optimizers exactly (a zero gradient changes neither a row nor its
slots), and a row that no step touched keeps its value and slots bit for bit. Adagrad follows Keras
(accumulator starts at 0.1) with epsilon outside the square root (tf-keras 2.21 puts it inside; with
accumulators >= 0.1 the two differ by under 1e-6 relative). Adam is different: dense Adam (Keras on an
``Embedding``, torch Adam on an ``EmbeddingBag``) keeps moving a row on every step after its last gradient, as
its momentum decays, so a row seen once moves ~1/(1-b1) times farther than under "lazy" Adam (TF's
``LazyAdamOptimizer``), which updates only the rows a step read. :class:`SparseAdam` reproduces dense Adam while
touching only the read rows: each row remembers the step it was last brought up to date, and when it is next
read the skipped steps are applied in closed form (see :class:`SparseAdam`); ``flush`` applies what every row
still owes before an evaluation. ``SparseAdam(lazy=True)`` is the lazy variant.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np

from kernels.dedupe import dedupe_row_grads, unique_rows  # noqa: F401  (the sparse update's deduplication)

Slots = dict[str, jax.Array]


def _gather(values: jax.Array, rows: jax.Array) -> jax.Array:
    return values.at[rows].get(mode="fill", fill_value=0)


def _scatter(values: jax.Array, rows: jax.Array, new: jax.Array) -> jax.Array:
    return values.at[rows].set(new, mode="drop")


class _NoDeferredWork:
    """For optimizers whose update of a row is complete when it is applied: ``flush`` has nothing to do."""

    def flush(self, table, slots, step) -> tuple[jax.Array, Slots]:
        return table, slots


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseSGD(_NoDeferredWork):
    """Plain SGD on touched rows. ``learning_rate`` per unit gradient."""

    learning_rate: float = 0.01

    def init(self, table: jax.Array) -> Slots:
        return {}

    def update(self, table, slots, rows, grads, step) -> tuple[jax.Array, Slots]:
        return _scatter(table, rows, _gather(table, rows) - self.learning_rate * grads), slots


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseAdagrad(_NoDeferredWork):
    """Adagrad with one accumulator per table element.

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
class SparseRowwiseAdagrad(_NoDeferredWork):
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
    """Adam on table rows, equal to dense ``optax.adam`` (up to epsilon, below) while touching only read rows.

    A row last updated at Adam count ``s`` (its ``count`` slot; 0 = never) and read again at count ``t`` missed
    the ``k = t - 1 - s`` updates in between, each with a zero gradient, in which dense Adam decays the moments
    and still moves the row by ``lr * mu_hat_j / (sqrt(nu_hat_j) + eps)``. Neglecting ``eps`` against
    ``sqrt(nu_hat_j)``, those moves sum to ``lr * mu_s / sqrt(nu_s) * c(s, k)`` with
    ``c(s, k) = sum_{i=1..k} r^i * sqrt(1 - b2^(s+i)) / (1 - b1^(s+i))`` and ``r = b1 / sqrt(b2)``; with the tail
    ``Q(n) = c(n, inf)`` (a table over ``n``, built once) ``c(s, k) = Q(s) - r^k Q(s + k)``, so a row's catch-up
    costs O(D) whatever ``k``. Then the moments are decayed by ``b1^k``/``b2^k`` and this step's update is applied
    as in optax. The neglected ``eps`` matters only for rows whose gradients are below ~1e-7.

    Attributes:
      learning_rate, b1, b2, epsilon: as ``optax.adam`` (a constant learning rate).
      lazy: update only the rows a step read and never move the others (TF's ``LazyAdamOptimizer``).
    """

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    epsilon: float = 1e-8
    lazy: bool = False

    def init(self, table: jax.Array) -> Slots:
        slots = {"mu": jnp.zeros_like(table), "nu": jnp.zeros_like(table)}
        if not self.lazy:
            slots["count"] = jnp.zeros(table.shape[:1], jnp.int32)
        return slots

    def update(self, table, slots, rows, grads, step) -> tuple[jax.Array, Slots]:
        t = step + 1  # optax's count after this update
        w, mu, nu = _gather(table, rows), _gather(slots["mu"], rows), _gather(slots["nu"], rows)
        if not self.lazy:
            last = _gather(slots["count"], rows)
            w, mu, nu = self._catch_up(w, mu, nu, last, t - 1 - last)
        mu = self.b1 * mu + (1 - self.b1) * grads
        nu = self.b2 * nu + (1 - self.b2) * grads * grads
        tf = t.astype(jnp.float32)
        mu_hat = mu / (1 - self.b1**tf)
        nu_hat = nu / (1 - self.b2**tf)
        new = w - self.learning_rate * mu_hat / (jnp.sqrt(nu_hat) + self.epsilon)
        new_slots = {"mu": _scatter(slots["mu"], rows, mu), "nu": _scatter(slots["nu"], rows, nu)}
        if not self.lazy:
            new_slots["count"] = _scatter(slots["count"], rows, jnp.broadcast_to(t, rows.shape).astype(jnp.int32))
        return _scatter(table, rows, new), new_slots

    def flush(self, table, slots, step) -> tuple[jax.Array, Slots]:
        """Every row brought up to date after ``step`` updates: the table dense Adam would hold (one pass over
        the table; the trainer calls it before evaluating). Later updates continue exactly as without it."""
        if self.lazy:
            return table, slots
        last = slots["count"]
        w, mu, nu = self._catch_up(table, slots["mu"], slots["nu"], last, step - last)
        return w, {"mu": mu, "nu": nu, "count": jnp.full_like(last, step)}

    def _catch_up(self, w, mu, nu, last, skipped):
        """Rows ``w`` with moments last updated at count ``last [N]``, moved through ``skipped [N]`` zero-gradient
        updates: ``(w, mu, nu)`` as dense Adam would hold them."""
        tail = jnp.asarray(_adam_tail(self.b1, self.b2))
        r = self.b1 / np.sqrt(self.b2)
        top = tail.shape[0] - 1
        skipped = jnp.maximum(skipped, 0)
        q_now = tail[jnp.minimum(last, top)]
        q_then = tail[jnp.minimum(last + skipped, top)]
        coeff = (q_now - jnp.exp(skipped.astype(jnp.float32) * np.float32(np.log(r))) * q_then)[:, None]
        safe_nu = jnp.where(nu > 0, nu, 1.0)
        w = w - self.learning_rate * coeff * jnp.where(nu > 0, mu / jnp.sqrt(safe_nu), 0.0)
        k = skipped.astype(jnp.float32)[:, None]
        return w, mu * jnp.power(np.float32(self.b1), k), nu * jnp.power(np.float32(self.b2), k)


@functools.lru_cache(maxsize=None)
def _adam_tail(b1: float, b2: float) -> np.ndarray:
    """``Q(n) = sum_{i>=1} r^i sqrt(1 - b2^(n+i)) / (1 - b1^(n+i))`` for ``n = 0..N``, float32 (see
    :class:`SparseAdam`); past ``N`` both bias corrections are 1 to float32 precision and ``Q`` is constant."""
    r = b1 / np.sqrt(b2)
    n_max = int(np.ceil(np.log(1e-9) / np.log(max(b1, b2)))) + 1
    m = np.arange(1, n_max + 2, dtype=np.float64)
    g = np.sqrt(1 - b2**m) / (1 - b1**m)  # g[m - 1] = g(m)
    q = np.empty(n_max + 1)
    q[n_max] = r / (1 - r)  # g = 1 from here on
    for n in range(n_max - 1, -1, -1):
        q[n] = r * (g[n] + q[n + 1])  # g[n] = g(n + 1)
    return q.astype(np.float32)


class SparseOptimizer(Protocol):
    """An optimizer of table rows (the classes above).

    ``init(table [V, D]) -> slots`` (each slot ``[V, ...]``, row-sharded like the table);
    ``update(table, slots, rows [N] int32, grads [N, D] float32, step) -> (table, slots)``: ``rows`` are
    distinct (padding = an out-of-range index, dropped), ``grads`` their summed gradients, ``step`` the number
    of updates before this one; ``flush(table, slots, step) -> (table, slots)``: every row as the dense
    optimizer would hold it after ``step`` updates (identity for optimizers without deferred work).
    """

    def init(self, table: jax.Array) -> Slots: ...

    def update(
        self, table: jax.Array, slots: Slots, rows: jax.Array, grads: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, Slots]: ...

    def flush(self, table: jax.Array, slots: Slots, step: jax.Array) -> tuple[jax.Array, Slots]: ...
