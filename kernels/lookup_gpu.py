"""Pallas GPU kernels that gather embedding rows, lowered through Triton.

Why Triton rather than Mosaic GPU: a gather is a pointer computation per row, which Triton expresses directly
(`table_ref.at[ids[:, None], cols[None, :]]` becomes one vectorised, coalesced load of a [rows, D] tile), and
the loads of a whole block of rows are independent, so they are all in flight at once. Mosaic GPU moves data
with TMA/async copies of rectangular tiles (a row gather would be one copy per row plus barrier bookkeeping),
targets Hopper and newer only, and its warpgroup programming model buys nothing for a memory-bound gather.
Triton also runs on Ampere. The kernels lower for ("cuda",) on a CPU-only jaxlib (the Triton IR is built in
Python and compiled by XLA:GPU later) and run on CPU with `interpret=True`.

Triton needs power-of-two tensor shapes, so rows per program are a power of two and the D columns are split
into power-of-two pieces (D = 48 is 32 + 16), each loaded and stored exactly, without masked-off lanes. The
table and the output are passed whole (`memory_space=pl.ANY`) and addressed with explicit indices.

Measured on an H200 (benchmarks/RESULTS.md): the row gather reaches 71-83% of the HBM peak for float32 rows of
128-512 bytes and beats XLA's gather (by 2-6% in float32, ~30% in bfloat16); the pooled kernel is 1-21% slower
than XLA's gather-then-reduce. That jax (0.11.2) warns that Pallas' Triton backend is deprecated in favour of
Mosaic GPU: a port is due before the pin moves past the release that removes it.

Trade-off: `jax.export` (and so jax2tf native serialization) does not accept Triton custom calls, whose IR has
no stability guarantee (Mosaic GPU and Mosaic TPU calls are accepted). Export serving functions with
`backend="xla"`.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.dtypes import check_table_dtype
from kernels.vma import varying_struct

# Tile sizes and warps per program, from a sweep on an H200 (benchmarks/RESULTS.md). Row gather: [rows, D]
# tiles of 2048 values at 4 warps beat 4096 by 8% at 128-byte rows (more programs keep more rows in flight).
# Pooled: W loads of [bags, D] tiles of 1024 values at 8 warps, 8-30% faster than 2048 at 4 warps (a program
# already has W loads in flight, so smaller tiles and more warps spread them over more programs).
BLOCK_ELEMENTS = 2048
NUM_WARPS = 4
POOLED_BLOCK_ELEMENTS = 1024
POOLED_NUM_WARPS = 8


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _column_pieces(dim: int) -> list[tuple[int, int]]:
    """(offset, width) power-of-two pieces covering [0, dim), widest first: the bits of dim."""
    pieces, offset = [], 0
    for bit in reversed(range(dim.bit_length())):
        if dim & (1 << bit):
            pieces.append((offset, 1 << bit))
            offset += 1 << bit
    return pieces


def _load_rows(table_ref, ids: jax.Array, offset: int, width: int) -> jax.Array:
    """[R] ids in [-1, V) -> [R, width] columns [offset, offset + width) of their rows; id -1 reads 0 (no
    memory access)."""
    valid = ids >= 0
    cols = offset + jnp.arange(width, dtype=jnp.int32)
    return pltriton.load(
        table_ref.at[jnp.where(valid, ids, 0)[:, None], cols[None, :]], mask=valid[:, None], other=0
    )


def _store_rows(out_ref, first_row: jax.Array, values: jax.Array, offset: int) -> None:
    rows = first_row + jnp.arange(values.shape[0], dtype=jnp.int32)
    cols = offset + jnp.arange(values.shape[1], dtype=jnp.int32)
    pltriton.store(out_ref.at[rows[:, None], cols[None, :]], values)


def _gather_kernel(ids_ref, table_ref, out_ref, *, rows: int, dim: int):
    ids = ids_ref[...]
    for offset, width in _column_pieces(dim):
        _store_rows(out_ref, pl.program_id(0) * rows, _load_rows(table_ref, ids, offset, width), offset)


def _pooled_kernel(ids_ref, weights_ref, table_ref, out_ref, *, bags: int, width: int, dim: int):
    for offset, columns in _column_pieces(dim):
        acc = jnp.zeros((bags, columns), jnp.float32)
        for l in range(width):  # the W loads are independent, so they overlap
            rows = _load_rows(table_ref, ids_ref[:, l], offset, columns)
            acc += rows.astype(jnp.float32) * weights_ref[:, l][:, None]
        _store_rows(out_ref, pl.program_id(0) * bags, acc, offset)


def _rows_per_program(num_rows: int, dim: int, block_elements: int) -> int:
    per_program = max(1, block_elements // _next_pow2(dim))
    return min(_next_pow2(per_program + 1) // 2, _next_pow2(num_rows))


@functools.partial(jax.jit, static_argnames=("interpret", "block_elements", "num_warps"))
def gather_rows_gpu(
    table: jax.Array,
    ids: jax.Array,
    *,
    interpret: bool = False,
    block_elements: int = BLOCK_ELEMENTS,
    num_warps: int = NUM_WARPS,
) -> jax.Array:
    """Row gather `table[ids]` on GPU (Triton).

    Args:
      table: [V, D] float32 or bfloat16.
      ids: [N] int32 in [-1, V); -1 yields a zero row. Ids >= V are not checked (resolve them first).
      interpret: run the Pallas interpreter (CPU).
      block_elements: table values gathered per program (rows per program = this / D, a power of two).
      num_warps: warps per program.

    Returns:
      [N, D] rows, dtype of the table.
    """
    check_table_dtype(table.dtype, "GPU")
    (num_ids,) = ids.shape
    dim = table.shape[1]
    if num_ids == 0:
        return jnp.zeros((0, dim), table.dtype)
    rows = _rows_per_program(num_ids, dim, block_elements)
    padded = -(-num_ids // rows) * rows
    ids = jnp.pad(ids.astype(jnp.int32), (0, padded - num_ids), constant_values=-1)
    out = pl.pallas_call(
        functools.partial(_gather_kernel, rows=rows, dim=dim),
        out_shape=varying_struct((padded, dim), table.dtype, table, ids),
        grid=(padded // rows,),
        in_specs=[pl.BlockSpec((rows,), lambda i: (i,)), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="lookup_gather_rows_gpu",
    )(ids, table)
    return out[:num_ids]


@functools.partial(jax.jit, static_argnames=("interpret", "block_elements", "num_warps"))
def pooled_rows_gpu(
    table: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    *,
    interpret: bool = False,
    block_elements: int = POOLED_BLOCK_ELEMENTS,
    num_warps: int = POOLED_NUM_WARPS,
) -> jax.Array:
    """Weighted sums of sub-bags of rows on GPU (Triton); see `kernels.bags`.

    Args:
      table: [V, D] float32 or bfloat16.
      ids: [P, W] int32 in [-1, V), W a power of two; -1 is an empty slot (not read, contributes 0).
      weights: [P, W] float32 slot weights.
      interpret: run the Pallas interpreter (CPU).
      block_elements: table values per load, one slot of each sub-bag (sub-bags per program = this / D, a power
        of two); a program makes W such loads. Sizing the tile per load rather than per program keeps each
        load as wide as the row gather's: dividing by W left 4-byte loads per thread for bf16 rows.
      num_warps: warps per program.

    Returns:
      [P, D] float32: `out[p] = sum_l weights[p, l] * table[ids[p, l]]`.
    """
    check_table_dtype(table.dtype, "GPU")
    num_subbags, width = ids.shape
    if width != _next_pow2(width):
        raise ValueError(f"the GPU pooled kernel needs a power-of-two sub-bag width, got {width}")
    dim = table.shape[1]
    if num_subbags == 0:
        return jnp.zeros((0, dim), jnp.float32)
    bags = _rows_per_program(num_subbags, dim, block_elements)
    padded = -(-num_subbags // bags) * bags
    ids = jnp.pad(ids.astype(jnp.int32), ((0, padded - num_subbags), (0, 0)), constant_values=-1)
    weights = jnp.pad(weights.astype(jnp.float32), ((0, padded - num_subbags), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_pooled_kernel, bags=bags, width=width, dim=dim),
        out_shape=varying_struct((padded, dim), jnp.float32, table, ids, weights),
        grid=(padded // bags,),
        in_specs=[
            pl.BlockSpec((bags, width), lambda i: (i, 0)),
            pl.BlockSpec((bags, width), lambda i: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="lookup_pooled_rows_gpu",
    )(ids, weights, table)
    return out[:num_subbags]
