"""The GPU row gather on Pallas' Mosaic GPU lowering: one TMA copy per row (Hopper and newer).

Why it exists beside `kernels.lookup_gpu` (Triton): Pallas' Triton lowering is deprecated from jax 0.11 in
favour of Mosaic GPU, and `jax.export` (so jax2tf native serialization, the SavedModel path) accepts Mosaic GPU
calls but refuses Triton ones. Select it with `lookup(..., backend="mosaic_gpu")` (gin:
`LookupOptions.kernel_backend = "mosaic_gpu"`); `backend="auto"` still picks Triton on CUDA until this one is
measured faster (benchmarks/gpu_throughput.py runs both).

How it gathers: each program takes `rows_per_program` ids, copies them into shared memory (one TMA copy),
then issues one TMA copy per id, table row -> its slot of a [rows, D] shared-memory tile, all on one barrier
that expects every copy (so all are in flight at once), waits, and stores the tile with one TMA copy. Id -1
addresses row V, past the table's end, which TMA fills with zeros without reading memory. Hopper's TMA has no
row gather (Blackwell's `gather4` does): a copy per row is the unit here, so its issue rate, not HBM, may bound
it for short rows.

Constraints (from Mosaic GPU, checked with a ValueError): a row is a multiple of 128 bytes (float32 D % 32 == 0,
bfloat16 D % 64 == 0; TMA transfers per warpgroup thread must be whole bytes), `rows_per_program` is a
multiple of 32 (its int32 ids are a 128-byte multiple), and a program's tile fits shared memory (rows of up to
6 KiB). jax 0.10.2 lowers and exports it for CUDA on a CPU-only
machine, but its Mosaic GPU interpreter has no barriers, so it runs only on a GPU (the Triton kernel keeps the
CPU-interpreted tests): tests/kernels/test_lookup_on_device.py checks it there against the reference.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.dtypes import check_table_dtype
from kernels.vma import varying_struct

ROW_BYTES_MULTIPLE = 128
MAX_ROWS_PER_PROGRAM = 128  # copies in flight per program
TILE_BYTES = 96 << 10  # shared memory per program's tile: two programs fit an SM's 227 KiB
MAX_TILE_BYTES = 200 << 10  # what one program may take (Hopper: 227 KiB per block, barriers and ids beside)


def rows_per_program_for(row_bytes: int) -> int:
    """Rows per program: as many as fit TILE_BYTES, in multiples of 32, between 32 and MAX_ROWS_PER_PROGRAM."""
    return max(32, min(MAX_ROWS_PER_PROGRAM, TILE_BYTES // row_bytes // 32 * 32))


def check_supported(table_shape: tuple[int, ...], dtype, rows_per_program: int) -> None:
    """Raises ValueError naming the constraint a [V, D] table of ``dtype`` (or the tile size) breaks."""
    check_table_dtype(dtype, "Mosaic GPU")
    dtype = jnp.dtype(dtype)
    row_bytes = table_shape[1] * dtype.itemsize
    if row_bytes % ROW_BYTES_MULTIPLE:
        raise ValueError(f"the Mosaic GPU lookup kernel needs rows of a multiple of {ROW_BYTES_MULTIPLE} bytes; "
                         f"a {dtype.name} row of D={table_shape[1]} is {row_bytes} bytes (use the Triton backend "
                         '"gpu")')  # fmt: skip
    if rows_per_program <= 0 or rows_per_program % 32:
        raise ValueError(f"rows_per_program must be a positive multiple of 32, got {rows_per_program}")
    if rows_per_program * row_bytes > MAX_TILE_BYTES:
        raise ValueError(f"a tile of {rows_per_program} rows of {row_bytes} bytes exceeds the {MAX_TILE_BYTES} "
                         'bytes of shared memory a program may use (use the Triton backend "gpu")')  # fmt: skip


def _gather_kernel(ids_gmem, table_gmem, out_gmem, ids_smem, rows_smem, ids_ready, rows_ready, *, rows: int,
                   num_rows: int):  # fmt: skip
    first = lax.axis_index("blocks") * rows
    plgpu.copy_gmem_to_smem(ids_gmem.at[pl.ds(first, rows)], ids_smem, ids_ready)
    plgpu.barrier_wait(ids_ready)
    for i in range(rows):  # independent copies: all in flight before the one wait
        row = ids_smem[i]
        row = jnp.where(row < 0, num_rows, row)  # past the end: TMA writes zeros
        plgpu.copy_gmem_to_smem(table_gmem.at[pl.ds(row, 1)], rows_smem.at[pl.ds(i, 1)], rows_ready)
    plgpu.barrier_wait(rows_ready)
    plgpu.copy_smem_to_gmem(rows_smem, out_gmem.at[pl.ds(first, rows)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("interpret", "rows_per_program"))
def gather_rows_mosaic_gpu(
    table: jax.Array, ids: jax.Array, *, interpret: bool = False, rows_per_program: int | None = None
) -> jax.Array:
    """Row gather `table[ids]` on GPU (Mosaic GPU, TMA).

    Args:
      table: [V, D] float32 or bfloat16, rows a multiple of 128 bytes.
      ids: [N] int32 in [-1, V); -1 yields a zero row. Ids >= V are not checked (resolve them first).
      interpret: not supported (jax 0.10.2's Mosaic GPU interpreter has no barriers); raises.
      rows_per_program: ids per program (a multiple of 32; default :func:`rows_per_program_for` the row size).

    Returns:
      [N, D] rows, dtype of the table.
    """
    if interpret:
        raise NotImplementedError("the Mosaic GPU lookup kernel has no interpret mode (jax 0.10.2's Mosaic GPU "
                                  'interpreter has no barriers): use backend="gpu" (Triton) with '
                                  "interpret=True")  # fmt: skip
    rows_per_program = rows_per_program or rows_per_program_for(table.shape[1] * table.dtype.itemsize)
    check_supported(table.shape, table.dtype, rows_per_program)
    (num_ids,) = ids.shape
    num_rows, dim = table.shape
    if num_ids == 0:
        return jnp.zeros((0, dim), table.dtype)
    padded = -(-num_ids // rows_per_program) * rows_per_program
    ids = jnp.pad(ids.astype(jnp.int32), (0, padded - num_ids), constant_values=-1)
    out = plgpu.kernel(
        functools.partial(_gather_kernel, rows=rows_per_program, num_rows=num_rows),
        out_type=varying_struct((padded, dim), table.dtype, table, ids),
        scratch_types=[
            plgpu.SMEM((rows_per_program,), jnp.int32),
            plgpu.SMEM((rows_per_program, dim), table.dtype),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=rows_per_program),  # one arrival per row copy
        ],
        grid=(padded // rows_per_program,),
        grid_names=("blocks",),
    )(ids, table)
    return out[:num_ids]
