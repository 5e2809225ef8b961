"""The out-of-range id policy shared by every lookup backend and by the reference.

An id is out of range when it is outside [0, num_rows). Policies:

- "clamp" (default): the id is clamped into [0, num_rows - 1]; the clamped row is read and receives the gradient.
- "zero": the slot reads an all-zero row and its gradient is dropped. In a pooled bag it still counts like any
  other slot (its weight is part of a "mean" denominator), it just contributes nothing.
- "error": a debugging mode. Concrete (non-traced) ids are checked on the host and an `IndexError` is raised
  before anything runs. Traced ids (under `jax.jit`, `grad`, ...) get a `jax.experimental.checkify.check`, so
  the caller must wrap its function in `checkify.checkify(...)` and inspect or `.throw()` the returned error;
  without that wrapper JAX refuses to trace the check (a ValueError naming checkify), rather than ignoring it.
  Values are then computed as with "clamp".
"""
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

OobPolicy = Literal["clamp", "zero", "error"]
OOB_POLICIES: tuple[str, ...] = ("clamp", "zero", "error")


def check_in_range(ids: jax.Array, num_rows: int) -> None:
    """Raises (concrete ids) or stages a checkify check (traced ids) that all `ids` lie in [0, num_rows)."""
    if isinstance(ids, jax.core.Tracer):
        in_range = jnp.all((ids >= 0) & (ids < num_rows))
        bad = jnp.where((ids >= 0) & (ids < num_rows), 0, ids).reshape(-1)
        first_bad = bad[jnp.argmax(bad != 0)] if bad.size else jnp.int32(0)
        checkify.check(in_range, f"lookup: id {{}} out of range [0, {num_rows})", first_bad)
        return
    host_ids = np.asarray(ids)
    bad = host_ids[(host_ids < 0) | (host_ids >= num_rows)]
    if bad.size:
        raise IndexError(f"lookup: {bad.size} id(s) out of range [0, {num_rows}), e.g. {bad[:8].tolist()}")


def resolve_ids(ids: jax.Array, num_rows: int, oob: OobPolicy) -> tuple[jax.Array, jax.Array]:
    """Applies the policy's value mapping (not the "error" check; see `check_in_range`).

    Args:
      ids: int32 row ids, any shape.
      num_rows: rows in the table (V).
      oob: the policy.

    Returns:
      (safe_ids, valid): `safe_ids` has the shape of `ids` with every entry in [0, num_rows) (clamped), and
      `valid` is a bool mask of slots that read a real row (all True except under "zero").
    """
    if oob not in OOB_POLICIES:
        raise ValueError(f"oob must be one of {OOB_POLICIES}, got {oob!r}")
    safe_ids = jnp.clip(ids, 0, num_rows - 1)
    if oob == "zero":
        return safe_ids, (ids >= 0) & (ids < num_rows)
    return safe_ids, jnp.ones(ids.shape, jnp.bool_)
