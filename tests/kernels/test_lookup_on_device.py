"""The lookup kernels compiled and run on a real accelerator, against the `jnp` reference.

Skipped on CPU-only machines (CI), where tests/kernels/test_lookup.py covers the same paths in interpret mode;
run on a GPU or TPU machine with `python -m pytest tests/kernels/test_lookup_on_device.py`. Tables and weights
hold small dyadic values (multiples of 1/4), so float32 sums are exact in any order and "equal" is bitwise.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.lookup import lookup
from kernels.lookup_reference import lookup_reference
from lookup_testlib import assert_equal, dyadic_table, rng_for

PLATFORM = jax.default_backend()
pytestmark = pytest.mark.skipif(PLATFORM not in ("gpu", "tpu"), reason="needs a GPU or TPU")
DTYPES = (jnp.float32, jnp.bfloat16)


def _both(table, ids, **kwargs):
    """(kernel output, reference output), each under jit."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    kernel = jax.jit(lambda t, i, a: lookup(t, i, backend=PLATFORM, **static, **a))(table, ids, arrays)
    reference = jax.jit(lambda t, i, a: lookup_reference(t, i, **static, **a))(table, ids, arrays)
    return kernel, reference


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("dim", [8, 16, 48, 128, 200])
def test_row_gather_equals_reference(dim, dtype):
    rng = rng_for("rows", dim, jnp.dtype(dtype).name)
    table = dyadic_table(rng, 50_000, dim, dtype)
    ids = jnp.asarray(rng.integers(0, 50_000, (333, 7)), jnp.int32)  # not a multiple of any block
    assert_equal(*_both(table, ids))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_pooled_equals_reference(combiner, dtype):
    rng = rng_for("pooled", combiner, jnp.dtype(dtype).name)
    table = dyadic_table(rng, 1_000, 48, dtype)
    ids = jnp.asarray(rng.integers(0, 1_000, (517, 13)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 3, ids.shape) / 2, jnp.float32)  # zeros are padding
    weights = weights.at[5].set(0.0)  # an empty bag
    assert_equal(*_both(table, ids, combiner=combiner, weights=weights))
    num_ids = 2_000
    segments = jnp.asarray(np.sort(rng.integers(-1, 301, num_ids)), jnp.int32)  # -1 and 300 are dropped
    ragged = jnp.asarray(rng.integers(0, 1_000, num_ids), jnp.int32)
    assert_equal(*_both(table, ragged, combiner=combiner, segment_ids=segments, num_segments=300))


@pytest.mark.parametrize("oob", ["clamp", "zero"])
def test_duplicate_and_out_of_range_ids(oob):
    rng = rng_for("edges", oob)
    table = dyadic_table(rng, 100, 32, jnp.float32)
    ids = jnp.asarray(np.concatenate([np.full(64, 7), rng.integers(-5, 105, 1000)]), jnp.int32)
    assert_equal(*_both(table, ids, oob=oob))
    assert_equal(*_both(table, ids.reshape(-1, 8), combiner="sum", oob=oob))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gradients_equal_reference_gradients(dtype):
    """The reference gradient is taken on a float32 copy of the table and cast back, as the custom VJP sums
    duplicates in float32; dyadic values and "sum" keep every float32 sum exact in any (atomic) order."""
    rng = rng_for("grads", jnp.dtype(dtype).name)
    table = dyadic_table(rng, 300, 64, dtype)
    ids = jnp.asarray(rng.integers(0, 300, (256, 10)), jnp.int32)  # ~8 duplicates per row
    weights = jnp.asarray(rng.integers(0, 3, ids.shape) / 2, jnp.float32)
    cotangent = jnp.asarray(rng.integers(-4, 5, (256, 64)) / 4, jnp.float32)

    def grads(fn, t):
        loss = lambda t, w: jnp.sum(fn(t, ids, combiner="sum", weights=w).astype(jnp.float32) * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(t, weights)

    kernel = grads(lambda *a, **k: lookup(*a, backend=PLATFORM, **k), table)
    reference = grads(lookup_reference, table.astype(jnp.float32))
    assert_equal(kernel[0], reference[0].astype(dtype))
    np.testing.assert_allclose(kernel[1], reference[1], rtol=1e-6, atol=1e-5)


def test_auto_runs_the_kernel_on_this_device():
    table = dyadic_table(rng_for("auto"), 1_000, 32, jnp.float32)
    ids = jnp.arange(0, 1_000, 3, dtype=jnp.int32)
    auto = jax.jit(lambda t, i: lookup(t, i))
    hlo = auto.lower(table, ids).as_text()
    assert ("triton" if PLATFORM == "gpu" else "tpu_custom_call") in hlo.lower()
    assert_equal(auto(table, ids), table[ids])


@pytest.mark.skipif(PLATFORM != "gpu", reason="the Mosaic GPU kernel is for NVIDIA GPUs (Hopper and newer)")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("dim", [32, 64, 128, 512])
def test_mosaic_gpu_row_gather_equals_reference(dim, dtype):
    """`backend="mosaic_gpu"` (TMA row copies) for every row size it takes (a multiple of 128 bytes), with
    out-of-range ids read as zero rows (past the table's end) and duplicates, and its gradient."""
    BACKEND = "mosaic_gpu"
    if dim * jnp.dtype(dtype).itemsize % 128:
        pytest.skip("rows of a multiple of 128 bytes only")
    rng = rng_for("mosaic_gpu", dim, jnp.dtype(dtype).name)
    table = dyadic_table(rng, 50_000, dim, dtype)
    ids = jnp.asarray(rng.integers(0, 50_000, (333, 7)), jnp.int32)
    mosaic = jax.jit(lambda t, i: lookup(t, i, backend=BACKEND))
    assert "mosaic_gpu" in mosaic.lower(table, ids).as_text()
    assert_equal(mosaic(table, ids), jax.jit(lookup_reference)(table, ids))
    edges = jnp.asarray(np.concatenate([np.full(64, 7), rng.integers(-5, 50_005, 1000)]), jnp.int32)
    zero = jax.jit(lambda t, i: lookup(t, i, backend=BACKEND, oob="zero"))
    assert_equal(zero(table, edges), jax.jit(lambda t, i: lookup_reference(t, i, oob="zero"))(table, edges))
    cotangent = jnp.asarray(rng.integers(-4, 5, (333, 7, dim)) / 4, jnp.float32)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(lookup(t, ids, backend=BACKEND).astype(jnp.float32) * cotangent)))
    reference = jax.jit(jax.grad(lambda t: jnp.sum(lookup_reference(t, ids).astype(jnp.float32) * cotangent)))
    assert_equal(grad(table), reference(table.astype(jnp.float32)).astype(dtype))
