"""Distinct rows and their summed gradients: the one deduplication of every sparse table update.

Pure ``jnp`` (a leaf, like the kernels): :func:`kernels.lookup.lookup_row_grads` and the sparse optimizers'
updates (:mod:`embeddings.sparse_optim`, :mod:`embeddings.placement`) share it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def unique_rows(rows: jax.Array, num_rows: int, size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Distinct values of ``rows [N]`` (ids in ``[0, num_rows]``) and where each entry went.

    Sort, flag first occurrences, compact, then a vectorised binary search for the inverse: on CPU this is ~3x
    faster than ``jnp.unique(..., return_inverse=True)``, whose key-value sort dominates a sparse step.

    Args:
      rows: row ids; ``num_rows`` marks padding.
      num_rows: the table's rows, also the fill value.
      size: output length (default N); at least the number of distinct real rows.

    Returns:
      ``(unique [size], inverse [N])``: ``unique`` ascending, padded with ``num_rows``; ``unique[inverse[i]] ==
      rows[i]``, except that an id cut off by ``size`` (only ever the padding value) gets ``inverse == size``.
    """
    size = rows.shape[0] if size is None else size
    ordered = jnp.sort(rows)
    first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
    slot = jnp.where(first, jnp.cumsum(first, dtype=jnp.int32) - 1, size)
    unique = jnp.full((size,), num_rows, rows.dtype).at[slot].set(ordered, mode="drop")
    return unique, jnp.searchsorted(unique, rows, method="scan").astype(jnp.int32)


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
    unique, inverse = unique_rows(rows, num_rows, size)
    summed = jax.ops.segment_sum(grads, inverse, num_segments=size)  # drops inverse == size
    return unique, summed, unique < num_rows


def unique_words(words: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Distinct ids of ``words uint32 [N, 2]`` (two 32-bit words per id, as DHE takes them) and where each went.

    One three-operand sort (both words as keys, the positions as payload), first occurrences flagged and
    compacted; the inverse is scattered back through the sort's permutation (no search).

    Args:
      words: the ids.
      size: output length; ids past the first ``size`` distinct ones are dropped (``count`` tells).

    Returns:
      ``(unique [size, 2], inverse [N], count)``: the distinct ids in ascending (high, low) order, zero-padded;
      ``unique[inverse[i]] == words[i]`` whenever ``count <= size``; ``count`` the number of distinct ids.
    """
    n = words.shape[0]
    high, low, order = jax.lax.sort((words[:, 1], words[:, 0], jnp.arange(n, dtype=jnp.int32)), num_keys=2)
    first = jnp.concatenate([jnp.ones((1,), bool), (high[1:] != high[:-1]) | (low[1:] != low[:-1])])
    slot = jnp.cumsum(first, dtype=jnp.int32) - 1
    unique = jnp.zeros((size, 2), words.dtype).at[jnp.where(first, slot, size)].set(
        jnp.stack([low, high], axis=-1), mode="drop"
    )
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(slot, unique_indices=True)
    return unique, inverse, slot[-1] + 1
