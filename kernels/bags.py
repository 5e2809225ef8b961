"""Regrouping pooled lookups into fixed-width sub-bags: the static layout both pooled kernels consume.

A kernel pools a `[P, W]` block of slots per call: row `p` is one sub-bag of W slots whose weighted rows it sums
into `partials[p]`. Bags of any length are cut into consecutive sub-bags, and `SubBags.pool` adds each bag's
sub-bag partial sums back together. All shapes are static, so this works under `jit` for ragged bags too.

Slot convention (shared with the kernels): id -1 marks an empty slot that reads as an all-zero row, and its
weight is 0. Callers map padding (weight 0) and "zero"-policy out-of-range ids to -1 before building a layout,
so kernels never fetch rows that cannot contribute.
"""
import dataclasses

import jax
import jax.numpy as jnp

MAX_WIDTH = 32  # widest sub-bag: the kernels unroll their loop over the W slots


def subbag_width(mean_bag_length: float) -> int:
    """Sub-bag width W for bags of about this many slots: a power of two (Triton shapes) in [1, MAX_WIDTH]."""
    width = 1
    while width < min(mean_bag_length, MAX_WIDTH):
        width *= 2
    return width


@dataclasses.dataclass(frozen=True)
class SubBags:
    """Pooled slots laid out as sub-bags.

    Attributes:
      ids: [P, W] int32 row ids, -1 on empty slots.
      weights: [P, W] float32 slot weights, 0 on empty slots.
      num_bags: number of output bags S.
      per_bag: for dense bags, the number of consecutive sub-bags of each bag (P == S * per_bag);
        None for ragged bags, which use `owner`.
      owner: [P] int32 bag of each sub-bag, non-decreasing, S for unused sub-bags (ragged bags only).
    """

    ids: jax.Array
    weights: jax.Array
    num_bags: int
    per_bag: int | None
    owner: jax.Array | None

    def pool(self, partials: jax.Array) -> jax.Array:
        """Sums sub-bag partial sums `[P, D]` float32 into bag sums `[S, D]` float32."""
        if self.per_bag is None:
            return jax.ops.segment_sum(partials, self.owner, self.num_bags, indices_are_sorted=True)
        if self.per_bag == 1:
            return partials
        return partials.reshape(self.num_bags, self.per_bag, -1).sum(axis=1)


def dense_subbags(ids: jax.Array, weights: jax.Array, width: int) -> SubBags:
    """Layout for dense bags `ids, weights [B, L]`: L is padded with empty slots to a multiple of `width`."""
    num_bags, length = ids.shape
    per_bag = max(1, -(-length // width))
    pad = per_bag * width - length
    ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return SubBags(
        ids=ids.reshape(num_bags * per_bag, width),
        weights=weights.reshape(num_bags * per_bag, width),
        num_bags=num_bags,
        per_bag=per_bag,
        owner=None,
    )


def ragged_subbags(
    ids: jax.Array, weights: jax.Array, segment_ids: jax.Array, num_segments: int, width: int
) -> SubBags:
    """Layout for ragged bags `ids, weights, segment_ids [N]`; slots of segments outside [0, S) are dropped.

    Slots are stably sorted by segment, and bag s gets ceil(count_s / width) consecutive sub-bags, so
    P = ceil(N / width) + min(S, N) sub-bags always suffice (each non-empty bag wastes less than one).
    """
    (num_slots,) = ids.shape
    in_range = (segment_ids >= 0) & (segment_ids < num_segments)
    segment = jnp.where(in_range, segment_ids, num_segments).astype(jnp.int32)
    order = jnp.argsort(segment, stable=True)
    segment, ids, weights = segment[order], ids[order], weights[order]

    counts = jnp.bincount(segment, length=num_segments + 1)
    first_slot = jnp.cumsum(counts) - counts
    position = jnp.arange(num_slots, dtype=jnp.int32) - first_slot[segment]
    subbags_of_bag = -(-counts[:num_segments] // width)
    subbag_end = jnp.cumsum(subbags_of_bag)
    num_subbags = -(-num_slots // width) + min(num_segments, num_slots)
    # Dropped slots (segment == S) get sub-bag index num_subbags, which the scatters below discard.
    subbag_start = jnp.concatenate([subbag_end - subbags_of_bag, jnp.array([num_subbags], subbag_end.dtype)])
    subbag = subbag_start[segment] + position // width
    slot = position % width

    return SubBags(
        ids=jnp.full((num_subbags, width), -1, jnp.int32).at[subbag, slot].set(ids, mode="drop"),
        weights=jnp.zeros((num_subbags, width), jnp.float32).at[subbag, slot].set(weights, mode="drop"),
        num_bags=num_segments,
        per_bag=None,
        owner=jnp.searchsorted(subbag_end, jnp.arange(num_subbags), side="right").astype(jnp.int32),
    )
