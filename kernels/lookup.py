"""The embedding lookup op: row gather and pooled gather, dispatched to Pallas kernels, with a custom gradient.

`lookup` has the semantics of `kernels.lookup_reference.lookup_reference` (shapes, pooling, weights-as-padding,
float32 pooling) and of `kernels.oob` (out-of-range ids). Backends:

- "auto" (default): `lax.platform_dependent` picks the Pallas TPU kernel when lowered for TPU, the Pallas
  Triton kernel for CUDA, and the XLA gather (the reference) elsewhere, e.g. CPU. The choice is made at
  lowering time, so one jitted function takes the right path on whichever platform it is lowered for. Tables whose
  dtype the kernels do not support (anything but float32/bfloat16) always use XLA.
- "tpu" | "gpu" | "xla": force one path; with `interpret=True` (or, for "tpu", `pltpu.InterpretParams(...)`)
  the kernels run in the Pallas interpreter on CPU.
- "mosaic_gpu": the row gather through Pallas' Mosaic GPU lowering (`kernels.lookup_mosaic_gpu`: TMA, Hopper
  and newer, rows of a multiple of 128 bytes; no interpret mode); pooled lookups stay on the Triton kernel.

Gradient (`jax.custom_vjp`): the table cotangent is a scatter-add of the output cotangent into the rows that
were read (duplicates summed in float32, then cast to the table's dtype; "zero"-policy and zero-weight slots
dropped). It is a dense [V, D] array because that is what `jax.grad` returns; `lookup_row_grads` gives the same
gradient as (unique ids, summed rows) for sparse optimizers. Weights get their exact gradient too, computed only
when they are being differentiated.

Composition (jax 0.10.2):
- Inside `jax.shard_map` (with `check_vma`) every backend runs and lowers; kernel outputs vary over the union of
  their inputs' mesh axes (`kernels.vma`). Exception: the generic Pallas interpreter behind `backend="gpu",
  interpret=True` fails JAX's vma check there; use `check_vma=False` for that debugging combination.
- Lowering for one platform works everywhere ("auto" keeps only that platform's branch). Lowering for several
  at once (`jax.export(..., platforms=("cpu", "cuda", "tpu"))`, jax2tf native serialization) fails with
  "auto": `platform_dependent` lowers the kept kernel branches for every platform of the module, and Pallas has
  no CPU lowering. Export with `backend="xla"` (or one platform per export); note also that `jax.export`
  rejects Triton calls as unstable.
"""
import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental.pallas import tpu as pltpu

from kernels import dedupe, lookup_gpu, lookup_mosaic_gpu, lookup_tpu
from kernels.bags import SubBags, dense_subbags, ragged_subbags, subbag_width
from kernels.dtypes import KERNEL_DTYPES, check_table_dtype
from kernels.lookup_reference import COMBINERS, Combiner, lookup_reference, mean_from_sums
from kernels.oob import OOB_POLICIES, OobPolicy, check_in_range, resolve_ids

Backend = Literal["auto", "tpu", "gpu", "mosaic_gpu", "xla"]
BACKENDS: tuple[str, ...] = ("auto", "tpu", "gpu", "mosaic_gpu", "xla")
_KERNELS = {
    "tpu": (lookup_tpu.gather_rows_tpu, lookup_tpu.pooled_rows_tpu),
    "gpu": (lookup_gpu.gather_rows_gpu, lookup_gpu.pooled_rows_gpu),
    "mosaic_gpu": (lookup_mosaic_gpu.gather_rows_mosaic_gpu, lookup_gpu.pooled_rows_gpu),
}


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one lookup (the custom_vjp's non-differentiable argument)."""

    num_rows: int
    combiner: Combiner | None
    num_bags: int  # S; 0 for a row gather
    dense: bool  # pooled over axis 1 of [B, L] ids (else ragged with bag ids, or a row gather)
    backend: str  # "auto", "tpu", "gpu", "mosaic_gpu" or "xla" after dtype resolution
    interpret: bool | pltpu.InterpretParams
    oob: Literal["clamp", "zero"]


class _Canonical(NamedTuple):
    """Inputs of the core op: ids [N] (row gather, ragged) or [B, L] (dense); weights float32 like ids or None;
    bags [N] int32 bag of each slot (ragged) or None."""

    ids: jax.Array
    weights: jax.Array | None
    bags: jax.Array | None


class RowGrads(NamedTuple):
    """Gradient of a lookup w.r.t. the table in sparse form.

    Attributes:
      ids: [N] int32 distinct rows that received a gradient, ascending; unused entries (at the end) hold
        num_rows, which `.at[ids].add(..., mode="drop")` ignores.
      grads: [N, D] float32 summed gradient of each row in `ids`; 0 in unused entries.
      count: [] int32 number of used entries.
    """

    ids: jax.Array
    grads: jax.Array
    count: jax.Array

    @property
    def valid(self) -> jax.Array:
        """[N] bool mask of the used entries."""
        return jnp.arange(self.ids.shape[0]) < self.count


def lookup(
    table: jax.Array,
    ids: jax.Array,
    *,
    combiner: Combiner | None = None,
    weights: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_segments: int | None = None,
    backend: Backend = "auto",
    interpret: bool | pltpu.InterpretParams = False,
    oob: OobPolicy = "clamp",
) -> jax.Array:
    """Gathers rows of `table`, optionally pooling them into bags.

    Args:
      table: [V, D] embedding table (float32 or bfloat16 for the kernels; any float dtype on XLA).
      ids: integer row ids. Row gather: any shape. Dense bags: [B, L]. Ragged bags: [N].
      combiner: None (row gather), "sum" or "mean" (pooled; computed in float32).
      weights: optional per-slot weights shaped like `ids` (pooled only); a 0 weight marks a padding slot.
      segment_ids: [N] bag of each id, for ragged bags (pooled only); ids outside [0, num_segments) are dropped.
      num_segments: static number of ragged bags S (required with `segment_ids`).
      backend: "auto", "tpu", "gpu", "mosaic_gpu" or "xla" (see the module docstring).
      interpret: run a forced kernel backend in the Pallas interpreter on CPU; for "tpu" this may be a
        `pltpu.InterpretParams`.
      oob: out-of-range id policy, "clamp", "zero" or "error" (see `kernels.oob`).

    Returns:
      Row gather: [*ids.shape, D]. Dense bags: [B, D]. Ragged bags: [S, D]. Dtype of the table.
    """
    spec, canonical = _canonicalize(table.shape, table.dtype, ids, combiner, weights, segment_ids, num_segments,
                                    backend, interpret, oob)
    out = _lookup(spec, table, *canonical)
    return out.reshape(*jnp.shape(ids), table.shape[1]) if combiner is None else out


def lookup_row_grads(
    num_rows: int,
    ids: jax.Array,
    cotangent: jax.Array,
    *,
    combiner: Combiner | None = None,
    weights: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_segments: int | None = None,
    oob: OobPolicy = "clamp",
) -> RowGrads:
    """The table gradient of `lookup(table, ids, ...)` as unique rows with summed gradients.

    Same arguments as `lookup` (the table only through `num_rows`), plus `cotangent`, the gradient w.r.t. the
    lookup's output (its shape). Equal to the dense custom-VJP gradient: `zeros([V, D]).at[r.ids].add(r.grads,
    mode="drop")`, except that sums are float32 here (the dense gradient has the table's dtype).

    Returns:
      `RowGrads` with N = number of slots (ids.size): every touched row appears once.
    """
    dim = cotangent.shape[-1]
    spec, canonical = _canonicalize((num_rows, dim), cotangent.dtype, ids, combiner, weights, segment_ids,
                                    num_segments, "xla", False, oob)
    targets, slot_grads = _slot_cotangents(spec, canonical, cotangent.reshape(-1, dim) if combiner is None
                                           else cotangent)
    targets, slot_grads = targets.reshape(-1), slot_grads.reshape(-1, dim)
    size = targets.shape[0]
    if size == 0:
        return RowGrads(targets, slot_grads, jnp.int32(0))
    unique, grads, valid = dedupe.dedupe_row_grads(targets.astype(jnp.int32), slot_grads, num_rows)
    return RowGrads(unique, grads, jnp.sum(valid, dtype=jnp.int32))


def _canonicalize(
    table_shape: tuple[int, ...],
    dtype: jnp.dtype,
    ids: jax.Array,
    combiner: Combiner | None,
    weights: jax.Array | None,
    segment_ids: jax.Array | None,
    num_segments: int | None,
    backend: Backend,
    interpret: bool | pltpu.InterpretParams,
    oob: OobPolicy,
) -> tuple[_Spec, _Canonical]:
    """Validates the arguments, runs the "error" check, and flattens them into the core op's inputs."""
    if len(table_shape) != 2 or table_shape[0] == 0:
        raise ValueError(f"table must be [V, D] with V > 0, got shape {table_shape}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if oob not in OOB_POLICIES:
        raise ValueError(f"oob must be one of {OOB_POLICIES}, got {oob!r}")
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    num_rows = table_shape[0]
    if oob == "error":
        check_in_range(ids, num_rows)
    ids = ids.astype(jnp.int32)
    resolved_backend = _resolve_backend(backend, dtype)
    spec = functools.partial(
        _Spec, num_rows=num_rows, combiner=combiner, backend=resolved_backend, interpret=interpret,
        oob="zero" if oob == "zero" else "clamp")

    if combiner is None:
        if weights is not None or segment_ids is not None:
            raise ValueError("weights and segment_ids need a combiner ('sum' or 'mean')")
        return spec(num_bags=0, dense=False), _Canonical(ids.reshape(-1), None, None)
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be None or one of {COMBINERS}, got {combiner!r}")
    if weights is not None and jnp.shape(weights) != ids.shape:
        raise ValueError(f"weights shape {jnp.shape(weights)} must match ids shape {ids.shape}")
    weights = jnp.ones(ids.shape, jnp.float32) if weights is None else jnp.asarray(weights).astype(jnp.float32)
    if segment_ids is None:
        if ids.ndim != 2:
            raise ValueError(f"pooled ids without segment_ids must be [B, L], got shape {ids.shape}")
        return spec(num_bags=ids.shape[0], dense=True), _Canonical(ids, weights, None)
    if ids.ndim != 1 or jnp.shape(segment_ids) != ids.shape:
        raise ValueError(f"ragged bags need ids and segment_ids of one shape [N], got {ids.shape} and "
                         f"{jnp.shape(segment_ids)}")
    if not isinstance(num_segments, int):
        raise ValueError("segment_ids needs a static int num_segments")
    bags = jnp.asarray(segment_ids).astype(jnp.int32)
    return spec(num_bags=num_segments, dense=False), _Canonical(ids, weights, bags)


def _resolve_backend(backend: Backend, dtype: jnp.dtype) -> str:
    supported = jnp.dtype(dtype) in KERNEL_DTYPES
    if backend in _KERNELS:
        check_table_dtype(dtype, backend)
    return "xla" if backend == "auto" and not supported else backend


def _xla_forward(spec: _Spec, table: jax.Array, ids, weights, bags) -> jax.Array:
    return lookup_reference(table, ids, combiner=spec.combiner, weights=weights, segment_ids=bags,
                            num_segments=spec.num_bags or None, oob=spec.oob)


def _kernel_forward(spec: _Spec, kernel: str, table: jax.Array, ids, weights, bags) -> jax.Array:
    gather_rows, pooled_rows = _KERNELS[kernel]
    interpret = spec.interpret if kernel == "tpu" else bool(spec.interpret)
    safe_ids, valid = resolve_ids(ids, spec.num_rows, spec.oob)
    if spec.combiner is None:
        return gather_rows(table, jnp.where(valid, safe_ids, -1), interpret=interpret)
    live = _live_slots(valid, weights, bags, spec.num_bags)
    slot_ids, slot_weights = jnp.where(live, safe_ids, -1), jnp.where(live, weights, 0.0)
    layout: SubBags
    if spec.dense:
        layout = dense_subbags(slot_ids, slot_weights, subbag_width(ids.shape[1]))
    else:
        width = subbag_width(ids.shape[0] / max(spec.num_bags, 1))
        layout = ragged_subbags(slot_ids, slot_weights, bags, spec.num_bags, width)
    sums = layout.pool(pooled_rows(table, layout.ids, layout.weights, interpret=interpret))
    if spec.combiner == "mean":
        sums = mean_from_sums(sums, _bag_totals(spec, weights, bags))
    return sums.astype(table.dtype)


def _forward(spec: _Spec, table: jax.Array, ids, weights, bags) -> jax.Array:
    if spec.backend == "xla":
        return _xla_forward(spec, table, ids, weights, bags)
    if spec.backend in _KERNELS:
        return _kernel_forward(spec, spec.backend, table, ids, weights, bags)
    return lax.platform_dependent(
        table, ids, weights, bags,
        tpu=functools.partial(_kernel_forward, spec, "tpu"),
        cuda=functools.partial(_kernel_forward, spec, "gpu"),
        default=functools.partial(_xla_forward, spec),
    )


def _live_slots(valid: jax.Array, weights: jax.Array, bags: jax.Array | None, num_bags: int) -> jax.Array:
    """Slots that read a row: in range (policy), non-zero weight, and (ragged) in a bag that exists."""
    live = valid & (weights != 0)
    return live if bags is None else live & (bags >= 0) & (bags < num_bags)


def _bag_totals(spec: _Spec, weights: jax.Array, bags: jax.Array | None) -> jax.Array:
    """[S] float32 total weight per bag (the "mean" denominator), computed as the reference does."""
    if spec.dense:
        return jnp.sum(weights, axis=1)
    return jax.ops.segment_sum(weights, bags, spec.num_bags)


def _per_slot(spec: _Spec, per_bag: jax.Array, bags: jax.Array | None) -> jax.Array:
    """Broadcasts [S, D] per-bag values to the slots: [B, L, D] (dense) or [N, D] (ragged, 0 if dropped)."""
    if spec.dense:
        return per_bag[:, None, :]
    # take() would wrap negative bag ids around; map every dropped slot past the end, where "fill" applies.
    in_range = (bags >= 0) & (bags < spec.num_bags)
    return jnp.take(per_bag, jnp.where(in_range, bags, spec.num_bags), axis=0, mode="fill", fill_value=0)


def _bag_cotangent(spec: _Spec, cotangent: jax.Array, weights: jax.Array, bags) -> jax.Array:
    """d loss / d (float32 bag sums) [S, D]: the output cotangent, divided by the bag weight for "mean"."""
    cotangent = cotangent.astype(jnp.float32)
    if spec.combiner == "sum":
        return cotangent
    totals = _bag_totals(spec, weights, bags)
    nonzero = totals != 0
    return jnp.where(nonzero[:, None], cotangent / jnp.where(nonzero, totals, 1.0)[:, None], 0.0)


def _slot_cotangents(spec: _Spec, canonical: _Canonical, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-slot table cotangents.

    Returns:
      (targets, grads): `targets` like ids, the row each slot's gradient goes to (num_rows for dropped slots);
      `grads` [*ids.shape, D] float32.
    """
    ids, weights, bags = canonical
    safe_ids, valid = resolve_ids(ids, spec.num_rows, spec.oob)
    if spec.combiner is None:
        return jnp.where(valid, safe_ids, spec.num_rows), jnp.where(valid[:, None], cotangent.astype(jnp.float32), 0.0)
    live = _live_slots(valid, weights, bags, spec.num_bags)
    slot_cotangent = _per_slot(spec, _bag_cotangent(spec, cotangent, weights, bags), bags)
    grads = jnp.where(live[..., None], slot_cotangent * weights[..., None], 0.0)
    return jnp.where(live, safe_ids, spec.num_rows), grads


def _weight_cotangent(spec: _Spec, table: jax.Array, canonical: _Canonical, cotangent: jax.Array) -> jax.Array:
    """d loss / d weights, like ids: <g, row> for "sum"; <g, row - mean> / total for "mean"."""
    ids, weights, bags = canonical
    safe_ids, valid = resolve_ids(ids, spec.num_rows, spec.oob)
    live = _live_slots(valid, weights, bags, spec.num_bags)
    rows = jnp.where(live[..., None], jnp.take(table, safe_ids, axis=0).astype(jnp.float32), 0.0)
    slot_cotangent = _per_slot(spec, _bag_cotangent(spec, cotangent, weights, bags), bags)
    grads = jnp.sum(slot_cotangent * rows, axis=-1)
    if spec.combiner == "mean":
        contributions = rows * weights[..., None]
        sums = jnp.sum(contributions, axis=1) if spec.dense else jax.ops.segment_sum(contributions, bags,
                                                                                       spec.num_bags)
        means = mean_from_sums(sums, _bag_totals(spec, weights, bags))
        grads = grads - jnp.sum(slot_cotangent * _per_slot(spec, means, bags), axis=-1)
    return grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(spec: _Spec, table: jax.Array, ids, weights, bags) -> jax.Array:
    return _forward(spec, table, ids, weights, bags)


def _lookup_fwd(spec: _Spec, table, ids, weights, bags):
    values = [x.value if x is not None else None for x in (table, ids, weights, bags)]
    # The table is a residual only when the weights need a gradient (it is needed to re-read their rows).
    table_for_weights = values[0] if weights is not None and weights.perturbed else None
    return _forward(spec, *values), (table_for_weights, _Canonical(*values[1:]))


def _lookup_bwd(spec: _Spec, residuals, cotangent):
    table, canonical = residuals
    if isinstance(cotangent, SymbolicZero):
        return None, None, None, None
    targets, grads = _slot_cotangents(spec, canonical, cotangent.reshape(-1, cotangent.shape[-1])
                                      if spec.combiner is None else cotangent)
    dim = cotangent.shape[-1]
    # Summed in float32, then cast: a bf16 scatter-add (what jax.grad of a bf16 gather does) rounds after every
    # duplicate, and on GPU in a nondeterministic order.
    table_grad = jnp.zeros((spec.num_rows, dim), jnp.float32).at[targets.reshape(-1)].add(
        grads.reshape(-1, dim), mode="drop").astype(cotangent.dtype)
    weight_grad = None if table is None else _weight_cotangent(spec, table, canonical, cotangent)
    return table_grad, None, weight_grad, None


_lookup.defvjp(_lookup_fwd, _lookup_bwd, symbolic_zeros=True)
