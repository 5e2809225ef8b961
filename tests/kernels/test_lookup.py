"""Tests of kernels.lookup: the Pallas TPU and GPU kernels in interpret mode on CPU, the XLA path, the custom
gradient, the sparse gradient, the out-of-range policy, and lowering for TPU and CUDA without hardware.

Tables and weights hold small dyadic values (multiples of 1/4 and 1/2), so float32 sums are exact in any order
and "equal" below means bitwise equal.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.experimental.pallas import tpu as pltpu
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter

from kernels import lookup_tpu
from kernels.lookup import lookup, lookup_row_grads
from kernels.lookup_reference import lookup_reference

TPU_INTERPRET = pltpu.InterpretParams(detect_races=True)
KERNEL_BACKENDS = {"tpu": TPU_INTERPRET, "gpu": True}
ALL_BACKENDS = {**KERNEL_BACKENDS, "xla": False}
FORMS = ("rows", "dense_sum", "dense_mean", "ragged_sum", "ragged_mean")
DTYPES = (jnp.float32, jnp.bfloat16)


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _table(rng: np.random.Generator, num_rows: int, dim: int, dtype) -> jax.Array:
    return jnp.asarray(rng.integers(-32, 32, (num_rows, dim)) / 4, dtype)


def _case(rng: np.random.Generator, form: str, num_rows: int, out_of_range: bool = False):
    """Random ids and pooling kwargs for one form; few rows, so ids repeat; some weights are 0 (padding)."""
    low, high = (-3, num_rows + 3) if out_of_range else (0, num_rows)
    if form == "rows":
        return jnp.asarray(rng.integers(low, high, (rng.integers(1, 5), rng.integers(1, 9))), jnp.int32), {}
    combiner = form.split("_")[1]
    if form.startswith("dense"):
        shape = (int(rng.integers(1, 7)), int(rng.integers(1, 10)))
        weights = jnp.asarray(rng.integers(-2, 3, shape) / 2, jnp.float32)
        return jnp.asarray(rng.integers(low, high, shape), jnp.int32), dict(combiner=combiner, weights=weights)
    num_ids, num_segments = int(rng.integers(1, 40)), int(rng.integers(1, 7))
    kwargs = dict(
        combiner=combiner,
        weights=jnp.asarray(rng.integers(-2, 3, num_ids) / 2, jnp.float32),
        # -1 and num_segments are dropped; some segments stay empty.
        segment_ids=jnp.asarray(rng.integers(-1, num_segments + 1, num_ids), jnp.int32),
        num_segments=num_segments,
    )
    return jnp.asarray(rng.integers(low, high, num_ids), jnp.int32), kwargs


def _run(backend: str, table, ids, **kwargs):
    """`lookup` under one jit (as callers use it; eager glue would compile op by op), checking for races."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    run = jax.jit(lambda t, i, a: lookup(t, i, backend=backend, interpret=ALL_BACKENDS[backend], **static, **a))
    out = run(table, ids, arrays)
    if backend == "tpu":
        assert not tpu_interpreter.races.races_found, "the TPU interpreter detected a race"
    return out


def _loss(fn, table, weights, ids, cotangent, kwargs):
    """sum(out * cotangent) with weights (if pooled) as an argument, so both can be differentiated."""
    if "weights" in kwargs:
        kwargs = {**kwargs, "weights": weights}
    return jnp.sum(fn(table, ids, **kwargs).astype(jnp.float32) * cotangent)


def _assert_equal(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(actual, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_equals_reference(backend, form, dtype):
    rng = _rng(backend, form, jnp.dtype(dtype).name)
    table = _table(rng, int(rng.integers(3, 12)), int(rng.choice([8, 48, 128])), dtype)
    ids, kwargs = _case(rng, form, table.shape[0])
    _assert_equal(_run(backend, table, ids, **kwargs), lookup_reference(table, ids, **kwargs))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_equal_reference_gradients(backend, form):
    rng = _rng("grad", backend, form)
    table = _table(rng, 7, 16, jnp.float32)
    ids, kwargs = _case(rng, form, table.shape[0])
    weights = kwargs.get("weights", jnp.zeros(()))
    out_shape = lookup_reference(table, ids, **kwargs).shape
    cotangent = jnp.asarray(rng.integers(-4, 5, out_shape) / 4, jnp.float32)
    run = functools.partial(_run, backend)
    grads = jax.grad(_loss, argnums=(1, 2))(run, table, weights, ids, cotangent, kwargs)
    expected = jax.grad(_loss, argnums=(1, 2))(lookup_reference, table, weights, ids, cotangent, kwargs)
    _assert_equal(grads[0], expected[0])
    np.testing.assert_allclose(grads[1], expected[1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bfloat16_gradient_equals_reference(backend):
    rng = _rng("bf16 grad", backend)
    table = _table(rng, 5, 32, jnp.bfloat16)
    ids, kwargs = _case(rng, "dense_sum", table.shape[0])
    cotangent = jnp.asarray(rng.integers(-4, 5, (ids.shape[0], 32)) / 4, jnp.float32)
    weights = kwargs.get("weights")
    grad = jax.grad(_loss, argnums=1)(functools.partial(_run, backend), table, weights, ids, cotangent, kwargs)
    _assert_equal(grad, jax.grad(_loss, argnums=1)(lookup_reference, table, weights, ids, cotangent, kwargs))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_duplicate_ids_and_empty_bags(backend):
    rng = _rng("edge", backend)
    table = _table(rng, 6, 128, jnp.float32)
    same = jnp.full((3, 5), 4, jnp.int32)
    padding = jnp.ones((3, 5), jnp.float32).at[1].set(0.0)  # bag 1 is all padding: empty
    cases = [
        (same, {}),
        (same, dict(combiner="sum")),
        (same, dict(combiner="mean", weights=padding)),
        (jnp.zeros((4, 0), jnp.int32), dict(combiner="mean")),  # L = 0: every bag empty
        (jnp.zeros((0,), jnp.int32), dict(combiner="sum", segment_ids=jnp.zeros((0,), jnp.int32), num_segments=3)),
        (jnp.array([2, 2, 2], jnp.int32), dict(combiner="mean", segment_ids=jnp.array([0, 0, 3]), num_segments=5)),
    ]
    for ids, kwargs in cases:
        _assert_equal(_run(backend, table, ids, **kwargs), lookup_reference(table, ids, **kwargs))
    grad = jax.grad(lambda t: jnp.sum(_run(backend, t, same, combiner="sum")))(table)
    np.testing.assert_array_equal(grad[4], np.full(128, 15.0))  # 3 bags x 5 duplicates, summed
    assert not np.any(np.delete(np.asarray(grad), 4, axis=0))


@pytest.mark.parametrize("oob", ["clamp", "zero"])
@pytest.mark.parametrize("form", ["rows", "dense_mean", "ragged_sum"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_policy(backend, form, oob):
    rng = _rng("oob", backend, form, oob)
    table = _table(rng, 6, 8, jnp.float32)
    ids, kwargs = _case(rng, form, table.shape[0], out_of_range=True)
    kwargs["oob"] = oob
    _assert_equal(_run(backend, table, ids, **kwargs), lookup_reference(table, ids, **kwargs))
    cotangent = jnp.ones(lookup_reference(table, ids, **kwargs).shape, jnp.float32)
    weights = kwargs.get("weights")
    grad = jax.grad(_loss, argnums=1)(functools.partial(_run, backend), table, weights, ids, cotangent, kwargs)
    _assert_equal(grad, jax.grad(_loss, argnums=1)(lookup_reference, table, weights, ids, cotangent, kwargs))


def test_out_of_range_zero_reads_zero_rows_and_drops_grads():
    table = jnp.ones((4, 8), jnp.float32)
    ids = jnp.array([0, 4, -1, 3], jnp.int32)
    out = _run("tpu", table, ids, oob="zero")
    np.testing.assert_array_equal(out[:, 0], [1.0, 0.0, 0.0, 1.0])
    grad = jax.grad(lambda t: jnp.sum(_run("gpu", t, ids, oob="zero")))(table)
    np.testing.assert_array_equal(grad[:, 0], [1.0, 0.0, 0.0, 1.0])


def test_out_of_range_error():
    table = jnp.ones((4, 8), jnp.float32)
    bad, good = jnp.array([0, 7], jnp.int32), jnp.array([0, 3], jnp.int32)
    with pytest.raises(IndexError, match="out of range"):
        lookup(table, bad, oob="error")
    jitted = jax.jit(lambda ids: lookup(table, ids, oob="error"))
    with pytest.raises(ValueError, match="checkify"):
        jitted(good)
    error, _ = checkify.checkify(jitted)(bad)
    assert "out of range" in error.get()
    error, out = checkify.checkify(jitted)(good)
    assert error.get() is None
    _assert_equal(out, lookup_reference(table, good))


@pytest.mark.parametrize("oob", ["clamp", "zero"])
@pytest.mark.parametrize("form", FORMS)
def test_row_grads_match_dense_gradient(form, oob):
    rng = _rng("sparse", form, oob)
    table = _table(rng, 9, 16, jnp.float32)
    ids, kwargs = _case(rng, form, table.shape[0], out_of_range=True)
    kwargs["oob"] = oob
    out, vjp = jax.vjp(lambda t: lookup(t, ids, backend="xla", **kwargs), table)
    cotangent = jnp.asarray(rng.integers(-4, 5, out.shape) / 4, jnp.float32)
    (dense,) = vjp(cotangent)
    sparse = lookup_row_grads(table.shape[0], ids, cotangent, **kwargs)
    count = int(sparse.count)
    used = np.asarray(sparse.ids[:count])
    assert sparse.ids.shape == (ids.size,) and sparse.grads.shape == (ids.size, 16)
    assert np.all(np.diff(used) > 0) and np.all(np.asarray(sparse.ids[count:]) == table.shape[0])
    np.testing.assert_array_equal(np.asarray(sparse.valid), np.arange(ids.size) < count)
    assert not np.any(np.asarray(sparse.grads[count:]))
    rebuilt = jnp.zeros_like(table).at[sparse.ids].add(sparse.grads, mode="drop")
    _assert_equal(rebuilt, dense)


def test_tpu_kernel_splits_long_inputs_across_calls():
    rng = _rng("chunks")
    table = _table(rng, 11, 128, jnp.float32)
    ids = jnp.asarray(rng.integers(-1, 11, 70), jnp.int32)
    rows = lookup_tpu.gather_rows_tpu(table, ids, interpret=TPU_INTERPRET, max_ids_per_call=32)
    _assert_equal(rows, lookup_reference(jnp.concatenate([table, jnp.zeros((1, 128))]), jnp.where(ids < 0, 11, ids)))
    slot_ids = jnp.asarray(rng.integers(-1, 11, (40, 2)), jnp.int32)
    weights = jnp.asarray(rng.integers(-2, 3, (40, 2)), jnp.float32)
    sums = lookup_tpu.pooled_rows_tpu(table, slot_ids, weights, interpret=TPU_INTERPRET, max_ids_per_call=32)
    expected = jnp.sum(jnp.where(slot_ids[..., None] >= 0, table[slot_ids] * weights[..., None], 0), axis=1)
    _assert_equal(sums, expected)


def test_invalid_arguments():
    table = jnp.ones((4, 8), jnp.float32)
    ids = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="combiner"):
        lookup(table, ids, combiner="max")
    with pytest.raises(ValueError, match="need a combiner"):
        lookup(table, ids, weights=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="must match"):
        lookup(table, ids, combiner="sum", weights=jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="num_segments"):
        lookup(table, ids[0], combiner="sum", segment_ids=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        lookup(table.astype(jnp.float16), ids, backend="tpu")
    # "auto" falls back to XLA for dtypes the kernels do not take.
    _assert_equal(lookup(table.astype(jnp.float16), ids), lookup_reference(table.astype(jnp.float16), ids))


_CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _lowered_text(fn, platform: str, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("dim", [64, 128, 200])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_without_hardware(platform, dim, dtype):
    """Block shapes, Mosaic/Triton lowering rules and the gradient must lower for real TPU/GPU targets."""
    backend = "tpu" if platform == "tpu" else "gpu"
    table = jnp.zeros((1000, dim), dtype)
    segment_ids = jnp.zeros((300,), jnp.int32)
    forms = {
        "rows": (jnp.zeros((5, 60), jnp.int32), {}),
        "dense": (jnp.zeros((64, 20), jnp.int32), dict(combiner="mean", weights=jnp.ones((64, 20)))),
        "ragged": (jnp.zeros((300,), jnp.int32), dict(combiner="sum", segment_ids=segment_ids, num_segments=50)),
    }
    for ids, kwargs in forms.values():
        for chosen in (backend, "auto"):
            def loss(t, ids=ids, kwargs=kwargs, chosen=chosen):
                return jnp.sum(jnp.square(lookup(t, ids, backend=chosen, **kwargs).astype(jnp.float32)))

            assert _CUSTOM_CALL[platform] in _lowered_text(jax.value_and_grad(loss), platform, table)


def test_auto_uses_xla_gather_on_cpu():
    text = _lowered_text(lambda t, i: lookup(t, i, combiner="sum"), "cpu", jnp.zeros((100, 128)),
                         jnp.zeros((4, 3), jnp.int32))
    assert "custom_call" not in text
