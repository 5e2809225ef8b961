"""Output types for `pallas_call` inside `jax.shard_map`.

With `check_vma=True` (shard_map's default), every `pallas_call` output must state the mesh axes it varies over;
JAX cannot infer it through a kernel. A lookup's output varies wherever any of its inputs (table shard, ids,
weights) does, so it takes the union of the inputs' varying axes. Outside shard_map that union is empty, which
is also correct.
"""
import jax


def varying_struct(shape: tuple[int, ...], dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
    """A `ShapeDtypeStruct` for a kernel output that varies over the union of `inputs`' varying mesh axes."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
