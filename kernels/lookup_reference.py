"""Plain-jnp definition of the lookup op: the semantics every backend must reproduce, and the XLA backend.

Shapes: `table [V, D]`. Three forms:

- row gather (`combiner=None`): `ids` int of any shape -> `[*ids.shape, D]`, dtype of the table.
- dense bags: `ids [B, L]`, optional `weights [B, L]` -> `[B, D]`, pooled over L.
- ragged bags: `ids [N]`, `segment_ids [N]`, static `num_segments` S, optional `weights [N]` -> `[S, D]`; slots
  whose segment id is outside [0, S) are dropped (as in `jax.ops.segment_sum`).

Pooling (`combiner="sum"` or `"mean"`) is computed in float32 and cast to the table dtype at the end:
`sum[b] = sum_i w_i * row(ids_i)` over the slots of bag b, and `mean[b] = sum[b] / sum_i w_i` (0 for a bag whose
weights sum to 0, e.g. an empty bag). Missing weights are 1. A slot whose weight is exactly 0 is padding: it
contributes nothing, its row is not read by the kernels and it gets no gradient (its weight gradient is 0 too).
Out-of-range ids follow `kernels.oob` ("clamp" or "zero" here; `lookup` adds the "error" check).
"""
from typing import Literal

import jax
import jax.numpy as jnp

from kernels.oob import resolve_ids

Combiner = Literal["sum", "mean"]
COMBINERS: tuple[str, ...] = ("sum", "mean")


def mean_from_sums(sums: jax.Array, totals: jax.Array) -> jax.Array:
    """`sums [S, D] / totals [S]` in float32, 0 where a bag's total weight is 0 (gradient-safe double where)."""
    nonzero = totals != 0
    return jnp.where(nonzero[:, None], sums / jnp.where(nonzero, totals, 1.0)[:, None], 0.0)


def lookup_reference(
    table: jax.Array,
    ids: jax.Array,
    *,
    combiner: Combiner | None = None,
    weights: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_segments: int | None = None,
    oob: Literal["clamp", "zero"] = "clamp",
) -> jax.Array:
    """Gathers (and optionally pools) rows of `table`; see the module docstring for shapes and semantics."""
    if oob not in ("clamp", "zero"):
        raise ValueError(f"the reference implements oob='clamp' and 'zero', got {oob!r}")
    safe_ids, valid = resolve_ids(ids, table.shape[0], oob)
    rows = jnp.take(table, safe_ids, axis=0)
    if combiner is None:
        return jnp.where(valid[..., None], rows, 0) if oob == "zero" else rows
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be None or one of {COMBINERS}, got {combiner!r}")
    w = jnp.ones(ids.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    live = valid & (w != 0)
    contributions = jnp.where(live[..., None], rows.astype(jnp.float32) * w[..., None], 0.0)
    if segment_ids is None:
        sums, totals = jnp.sum(contributions, axis=1), jnp.sum(w, axis=1)
    else:
        sums = jax.ops.segment_sum(contributions, segment_ids, num_segments)
        totals = jax.ops.segment_sum(w, segment_ids, num_segments)
    if combiner == "mean":
        sums = mean_from_sums(sums, totals)
    return sums.astype(table.dtype)
