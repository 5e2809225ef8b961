"""Pallas TPU (Mosaic) kernels that gather embedding rows from a table left in HBM.

Design:
- The table stays in HBM (`memory_space=pl.ANY`); every row is copied by its own DMA
  (`pltpu.make_async_copy`) into a VMEM buffer. Ids are scalar-prefetched into SMEM
  (`pltpu.PrefetchScalarGridSpec`) so each DMA's source address is a scalar read.
- One grid step handles a block of rows. The buffer has two slots: step i starts all DMAs of step i + 1 into
  the other slot before waiting for its own, so up to two blocks of row DMAs are in flight while the pipeline
  writes the previous output tile back. This needs sequential grid order ("arbitrary").
- Id -1: the row gather copies a zero row (a VMEM scratch row zeroed at step 0) so the output row is 0; the
  pooled kernel issues no DMA at all for such an empty (padding) slot and masks it out by its zero weight.
- Output tiles are (rows, D): rows is a multiple of the sublane tile (8 for f32, 16 for bf16) and D is the
  full row, so any D satisfies Mosaic's block rule. D a multiple of 128 fills the 128-lane vregs; smaller D works
  but wastes lanes.
- SMEM is small (1 MiB per TensorCore on v4 and later), so at most `MAX_IDS_PER_CALL` ids are prefetched per
  `pallas_call`; longer inputs are split into several calls.
"""
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.dtypes import check_table_dtype
from kernels.vma import varying_struct

MAX_IDS_PER_CALL = 32768  # 128 KiB of int32 ids in SMEM per call
_BLOCK_BYTES = 128 * 1024  # target bytes of rows per grid step (one of the two buffer slots)
_MAX_ROWS_PER_STEP = 512
_UNROLL = 8  # DMA-issue loop unrolling on hardware: the loop body is a few scalar ops and one DMA


Interpret = bool | pltpu.InterpretParams


def _interpret_params(interpret: Interpret) -> pltpu.InterpretParams | bool:
    """Maps `True` to the TPU interpreter (which simulates DMAs and semaphores) and leaves other values alone."""
    return pltpu.InterpretParams() if interpret is True else interpret


def _unroll(interpret: Interpret) -> int:
    """The interpreter gains nothing from unrolling and compiles an unrolled kernel more slowly."""
    return 1 if interpret else _UNROLL


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _rows_per_step(num_rows: int, row_bytes: int, dtype: jnp.dtype) -> int:
    """Rows per grid step: about `_BLOCK_BYTES` of rows, a multiple of the dtype's sublane tile (8 rows of 32
    bits), no more than the input rounded up to that multiple."""
    multiple = 8 * 4 // dtype.itemsize
    target = max(multiple, min(_MAX_ROWS_PER_STEP, _BLOCK_BYTES // row_bytes))
    target = target // multiple * multiple
    return min(target, _round_up(num_rows, multiple))


def _double_buffered_steps(
    ids_smem,
    table_hbm,
    zero_row,
    sems,
    *,
    slots_per_step: int,
    destination: Callable[[jax.Array, jax.Array], object],
    unroll: int,
) -> jax.Array:
    """Issues this step's row DMAs (prefetching the next step's) and waits for this step's; returns its slot.

    Args:
      ids_smem: [n] int32 ids of the whole call in SMEM, `slots_per_step` consecutive ids per grid step.
      table_hbm: [V, D] table in HBM.
      zero_row: [1, D] VMEM scratch copied for id -1, or None to skip id -1 (no DMA, buffer row left stale).
      sems: [2] DMA semaphores, one per buffer slot (all DMAs of a slot signal the same one).
      slots_per_step: DMAs per grid step.
      destination: (buffer_slot, j) -> the [1, D] VMEM ref receiving the step's j-th row.
      unroll: unrolling of the DMA-issue loop.
    """
    step = pl.program_id(0)
    buffer_slot = lax.rem(step, 2)

    def start(block, slot):
        def issue(j, carry):
            row = ids_smem[block * slots_per_step + j]
            dst = destination(slot, j)

            @pl.when(row >= 0)
            def _():
                pltpu.make_async_copy(table_hbm.at[pl.ds(row, 1)], dst, sems.at[slot]).start()

            if zero_row is not None:

                @pl.when(row < 0)
                def _():
                    pltpu.make_async_copy(zero_row, dst, sems.at[slot]).start()

            return carry

        lax.fori_loop(0, slots_per_step, issue, 0, unroll=min(unroll, slots_per_step))

    @pl.when(step == 0)
    def _():
        if zero_row is not None:
            zero_row[...] = jnp.zeros(zero_row.shape, zero_row.dtype)
        start(0, 0)

    @pl.when(step + 1 < pl.num_programs(0))
    def _():
        start(step + 1, 1 - buffer_slot)

    # Every DMA of a slot has the same size, so one descriptor serves for all the waits.
    waiter = pltpu.make_async_copy(table_hbm.at[pl.ds(0, 1)], destination(buffer_slot, 0), sems.at[buffer_slot])

    def wait(j, carry):
        if zero_row is None:
            pl.when(ids_smem[step * slots_per_step + j] >= 0)(waiter.wait)
        else:
            waiter.wait()
        return carry

    lax.fori_loop(0, slots_per_step, wait, 0)
    return buffer_slot


def _gather_kernel(ids_smem, table_hbm, out_ref, buffer, zero_row, sems, *, rows: int, unroll: int):
    slot = _double_buffered_steps(
        ids_smem,
        table_hbm,
        zero_row,
        sems,
        slots_per_step=rows,
        destination=lambda s, j: buffer.at[s, pl.ds(j, 1)],
        unroll=unroll,
    )
    out_ref[...] = buffer[slot]


def _pooled_kernel(ids_smem, weights_ref, table_hbm, out_ref, buffer, sems, *, bags: int, width: int, unroll: int):
    # buffer [2, W, bags, D]: slot l of every bag of the block is one contiguous (bags, D) tile, so pooling is
    # W full-tile multiply-adds with the weight column broadcast across lanes.
    slot = _double_buffered_steps(
        ids_smem,
        table_hbm,
        None,
        sems,
        slots_per_step=bags * width,
        # lax.rem/div rather than %, //: non-negative j needs no floor correction (which Mosaic lowers via sign).
        destination=lambda s, j: buffer.at[s, lax.rem(j, width), pl.ds(lax.div(j, width), 1)],
        unroll=unroll,
    )
    weights = weights_ref[...]
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for l in range(width):
        w = weights[:, l : l + 1]
        # Empty slots (weight 0) were not fetched: their buffer rows are stale, so select rather than multiply.
        acc = acc + jnp.where(w != 0, buffer[slot, l].astype(jnp.float32) * w, 0.0)
    out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret", "max_ids_per_call"))
def gather_rows_tpu(
    table: jax.Array, ids: jax.Array, *, interpret: Interpret = False, max_ids_per_call: int = MAX_IDS_PER_CALL
) -> jax.Array:
    """Row gather `table[ids]` on TPU.

    Args:
      table: [V, D] float32 or bfloat16, left in HBM.
      ids: [N] int32 in [-1, V); -1 yields a zero row. Ids >= V are not checked (resolve them first).
      interpret: True or `pltpu.InterpretParams(...)` to run the TPU interpreter on CPU.
      max_ids_per_call: ids prefetched into SMEM per `pallas_call` (longer inputs use several calls).

    Returns:
      [N, D] rows, dtype of the table.
    """
    check_table_dtype(table.dtype, "TPU")
    (num_ids,) = ids.shape
    dim = table.shape[1]
    if num_ids == 0:
        return jnp.zeros((0, dim), table.dtype)
    rows = _rows_per_step(min(num_ids, max_ids_per_call), dim * table.dtype.itemsize, table.dtype)
    ids_per_call = max(rows, max_ids_per_call // rows * rows)
    padded = jnp.pad(ids.astype(jnp.int32), (0, _round_up(num_ids, rows) - num_ids), constant_values=-1)
    outputs = []
    for begin in range(0, padded.shape[0], ids_per_call):
        chunk = padded[begin : begin + ids_per_call]
        outputs.append(
            pl.pallas_call(
                functools.partial(_gather_kernel, rows=rows, unroll=_unroll(interpret)),
                out_shape=varying_struct((chunk.shape[0], dim), table.dtype, table, chunk),
                grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=1,
                    grid=(chunk.shape[0] // rows,),
                    in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                    out_specs=pl.BlockSpec((rows, dim), lambda i, ids_ref: (i, 0)),
                    scratch_shapes=[
                        pltpu.VMEM((2, rows, dim), table.dtype),
                        pltpu.VMEM((1, dim), table.dtype),
                        pltpu.SemaphoreType.DMA((2,)),
                    ],
                ),
                compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
                interpret=_interpret_params(interpret),
                name="lookup_gather_rows_tpu",
            )(chunk, table)
        )
    return jnp.concatenate(outputs)[:num_ids] if len(outputs) > 1 else outputs[0][:num_ids]


@functools.partial(jax.jit, static_argnames=("interpret", "max_ids_per_call"))
def pooled_rows_tpu(
    table: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    *,
    interpret: Interpret = False,
    max_ids_per_call: int = MAX_IDS_PER_CALL,
) -> jax.Array:
    """Weighted sums of sub-bags of rows on TPU (see `kernels.bags`).

    Args:
      table: [V, D] float32 or bfloat16, left in HBM.
      ids: [P, W] int32 in [-1, V); -1 is an empty slot (not read, contributes 0).
      weights: [P, W] float32 slot weights.
      interpret: True or `pltpu.InterpretParams(...)` to run the TPU interpreter on CPU.
      max_ids_per_call: slot ids prefetched into SMEM per `pallas_call` (more sub-bags use several calls).

    Returns:
      [P, D] float32: `out[p] = sum_l weights[p, l] * table[ids[p, l]]`.
    """
    check_table_dtype(table.dtype, "TPU")
    num_subbags, width = ids.shape
    dim = table.shape[1]
    if num_subbags == 0:
        return jnp.zeros((0, dim), jnp.float32)
    bags = _rows_per_step(
        min(num_subbags, max(1, max_ids_per_call // width)), width * dim * table.dtype.itemsize, table.dtype
    )
    bags_per_call = max(bags, max_ids_per_call // width // bags * bags)
    padded_subbags = _round_up(num_subbags, bags)
    padding = ((0, padded_subbags - num_subbags), (0, 0))
    ids = jnp.pad(ids.astype(jnp.int32), padding, constant_values=-1)
    # The kernel tells empty slots by their zero weight (ids stay in SMEM, out of reach of vector code).
    weights = jnp.where(ids >= 0, jnp.pad(weights.astype(jnp.float32), padding), 0.0)
    outputs = []
    for begin in range(0, padded_subbags, bags_per_call):
        chunk_ids = ids[begin : begin + bags_per_call]
        chunk_bags = chunk_ids.shape[0]
        outputs.append(
            pl.pallas_call(
                functools.partial(_pooled_kernel, bags=bags, width=width, unroll=_unroll(interpret)),
                out_shape=varying_struct((chunk_bags, dim), jnp.float32, table, chunk_ids, weights),
                grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=1,
                    grid=(chunk_bags // bags,),
                    in_specs=[
                        pl.BlockSpec((bags, width), lambda i, ids_ref: (i, 0)),
                        pl.BlockSpec(memory_space=pl.ANY),
                    ],
                    out_specs=pl.BlockSpec((bags, dim), lambda i, ids_ref: (i, 0)),
                    scratch_shapes=[
                        pltpu.VMEM((2, width, bags, dim), table.dtype),
                        pltpu.SemaphoreType.DMA((2,)),
                    ],
                ),
                compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
                interpret=_interpret_params(interpret),
                name="lookup_pooled_rows_tpu",
            )(chunk_ids.reshape(-1), weights[begin : begin + bags_per_call], table)
        )
    return jnp.concatenate(outputs)[:num_subbags] if len(outputs) > 1 else outputs[0][:num_subbags]
