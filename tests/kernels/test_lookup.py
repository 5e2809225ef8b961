"""Tests of kernels.lookup: the Pallas TPU and GPU kernels in interpret mode on CPU, the XLA path, the custom
gradient, the sparse gradient, the out-of-range policy, and lowering for TPU and CUDA without hardware.

Tables and weights hold small dyadic values (multiples of 1/4 and 1/2), so float32 sums are exact in any order
and "equal" below means bitwise equal.
"""
import functools
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
from lookup_testlib import assert_equal, dyadic_table, numpy_lookup, rng_for

TPU_INTERPRET = pltpu.InterpretParams(detect_races=True)
KERNEL_BACKENDS = {"tpu": TPU_INTERPRET, "gpu": True}
ALL_BACKENDS = {**KERNEL_BACKENDS, "xla": False}
FORMS = ("rows", "dense_sum", "dense_mean", "ragged_sum", "ragged_mean")
DTYPES = (jnp.float32, jnp.bfloat16)


@pytest.fixture(autouse=True)
def _no_tpu_races(capsys):
    """The TPU interpreter prints every race it detects; its `races_found` flag only covers the last kernel."""
    yield
    assert "RACE DETECTED" not in capsys.readouterr().out


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


def _split(kwargs: dict) -> tuple[dict, dict]:
    """(array kwargs, static kwargs)."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    return arrays, {k: v for k, v in kwargs.items() if k not in arrays}


def _backend(backend: str):
    return functools.partial(lookup, backend=backend, interpret=ALL_BACKENDS[backend])


def _check_races(backend: str) -> None:
    """Checks the last TPU kernel's race flag at once (the autouse fixture checks all kernels at test end)."""
    if backend == "tpu":
        assert not tpu_interpreter.races.races_found, "the TPU interpreter detected a race"


def _jit_call(fn, table, ids, kwargs):
    """fn(table, ids, **kwargs) under one jit, as callers use it (eager glue would compile op by op)."""
    arrays, static = _split(kwargs)
    return jax.jit(lambda t, i, a: fn(t, i, **static, **a))(table, ids, arrays)


def _run(backend: str, table, ids, **kwargs):
    out = _jit_call(_backend(backend), table, ids, kwargs)
    _check_races(backend)
    return out


def _reference(table, ids, **kwargs):
    return _jit_call(lookup_reference, table, ids, kwargs)


def _assert_equals_numpy(out, table, ids, **kwargs):
    """`out` equal to the NumPy-loop reference (not the jnp reference, which is the XLA path itself): bitwise for
    gathers and sums of dyadic values; a "mean" within 1 ulp of the table dtype, since XLA divides by a
    broadcast total as a multiplication by its reciprocal (one more rounding than NumPy's division)."""
    expected = numpy_lookup(table, ids, **kwargs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if kwargs.get("combiner") == "mean":
        eps = float(jnp.finfo(out.dtype).eps)
        np.testing.assert_allclose(np.asarray(out, np.float32), expected.astype(np.float32), rtol=eps, atol=0)
    else:
        assert_equal(out, jnp.asarray(expected))


def _assert_cases_equal_reference(backend: str, table, cases) -> None:
    """Checks several (ids, kwargs) cases, compiling all kernel calls into one jit and the references into
    another (each compile costs more than the tiny computations)."""
    split = [_split(kwargs) for _, kwargs in cases]

    def all_cases(fn):
        def run(t, ids_list, arrays_list):
            return [fn(t, i, **static, **a) for i, a, (_, static) in zip(ids_list, arrays_list, split)]

        return jax.jit(run)(table, [ids for ids, _ in cases], [arrays for arrays, _ in split])

    outs = all_cases(_backend(backend))
    _check_races(backend)
    for out, expected in zip(outs, all_cases(lookup_reference)):
        assert_equal(out, expected)


def _grads(fn, table, ids, kwargs, cotangent):
    """Jitted gradients of sum(fn(table, ids, **kwargs) * cotangent) w.r.t. the table and (if any) weights."""
    arrays, static = _split(kwargs)
    weights = arrays.pop("weights", jnp.zeros(()))

    def loss(t, w, i, a):
        extra = {"weights": w} if "weights" in kwargs else {}
        return jnp.sum(fn(t, i, **static, **a, **extra).astype(jnp.float32) * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(table, weights, ids, arrays)


def _out_shape(table, ids, kwargs) -> tuple[int, ...]:
    return jax.eval_shape(lambda: lookup_reference(table, ids, **kwargs)).shape


# bfloat16 only changes the kernels' buffers and casts, not the pooling glue, so two forms cover it. The XLA
# backend's forward is the reference itself; the gradient tests below run it for every form.
FORWARD_CASES = [(backend, form, jnp.float32) for backend in KERNEL_BACKENDS for form in FORMS] + [
    (backend, form, jnp.bfloat16) for backend in KERNEL_BACKENDS for form in ("rows", "ragged_mean")
]


@pytest.mark.parametrize(
    "backend,form,dtype", FORWARD_CASES, ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name
)
def test_forward_equals_reference(backend, form, dtype):
    rng = rng_for(backend, form, jnp.dtype(dtype).name)
    table = dyadic_table(rng, int(rng.integers(3, 12)), int(rng.choice([8, 48, 128])), dtype)
    ids, kwargs = _case(rng, form, table.shape[0])
    assert_equal(_run(backend, table, ids, **kwargs), _reference(table, ids, **kwargs))


# The jnp reference, and the XLA backend that is it plus the custom VJP, against NumPy loops: every form, both
# value policies, and bfloat16 (dyadic values and float32 pooling: bitwise equal before the final cast).
NUMPY_CASES = [(form, oob, jnp.float32) for form in FORMS for oob in ("clamp", "zero")] + [
    (form, "zero", jnp.bfloat16) for form in ("rows", "ragged_mean")
]


@pytest.mark.parametrize(
    "form,oob,dtype", NUMPY_CASES, ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name
)
def test_reference_and_xla_equal_numpy_loops(form, oob, dtype):
    rng = rng_for("numpy", form, oob, jnp.dtype(dtype).name)
    table = dyadic_table(rng, int(rng.integers(3, 12)), 8, dtype)
    for _ in range(2):
        ids, kwargs = _case(rng, form, table.shape[0], out_of_range=True)
        kwargs = {**kwargs, "oob": oob}
        _assert_equals_numpy(_reference(table, ids, **kwargs), table, ids, **kwargs)
        _assert_equals_numpy(_jit_call(lookup, table, ids, kwargs), table, ids, **kwargs)  # "auto" = "xla" here


def _assert_gradients_match(backend, table, ids, kwargs, cotangent) -> jax.Array:
    """Table gradient bitwise equal to the reference's, which is taken on a float32 copy of the table and cast
    back (the custom VJP sums duplicates in float32); weight gradient equal up to float rounding. Returns the
    table gradient."""
    grads = _grads(_backend(backend), table, ids, kwargs, cotangent)
    _check_races(backend)
    expected = _grads(lookup_reference, table.astype(jnp.float32), ids, kwargs, cotangent)
    assert_equal(grads[0], expected[0].astype(table.dtype))
    np.testing.assert_allclose(grads[1], expected[1], rtol=1e-6, atol=1e-5)
    return grads[0]


# "zero" drops slots, the harder case, so it runs for every form; "clamp" for one gather and one pooled form.
@pytest.mark.parametrize("form,oob", [(form, "zero") for form in FORMS] + [("rows", "clamp"), ("ragged_mean", "clamp")])
def test_gradients_equal_reference_and_row_grads(form, oob):
    """The custom VJP's backward is XLA code shared by every backend (here after the XLA forward); the sparse
    `lookup_row_grads` must rebuild the same dense gradient."""
    rng = rng_for("grad", form, oob)
    table = dyadic_table(rng, 7, 16, jnp.float32)
    ids, kwargs = _case(rng, form, table.shape[0], out_of_range=True)
    kwargs["oob"] = oob
    cotangent = jnp.asarray(rng.integers(-4, 5, _out_shape(table, ids, kwargs)) / 4, jnp.float32)
    dense = _assert_gradients_match("xla", table, ids, kwargs, cotangent)

    arrays, static = _split(kwargs)
    sparse = jax.jit(lambda c, a: lookup_row_grads(table.shape[0], ids, c, **static, **a))(cotangent, arrays)
    count = int(sparse.count)
    assert sparse.ids.shape == (ids.size,) and sparse.grads.shape == (ids.size, 16)
    assert np.all(np.diff(np.asarray(sparse.ids[:count])) > 0)
    assert np.all(np.asarray(sparse.ids[count:]) == table.shape[0]) and not np.any(np.asarray(sparse.grads[count:]))
    np.testing.assert_array_equal(np.asarray(sparse.valid), np.arange(ids.size) < count)
    assert_equal(jnp.zeros_like(table).at[sparse.ids].add(sparse.grads, mode="drop"), dense)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_gradients_equal_reference_gradients(backend):
    """The same backward behind a kernel forward (bfloat16 table, weighted mean with padding)."""
    rng = rng_for("kernel grad", backend)
    table = dyadic_table(rng, 5, 32, jnp.bfloat16)
    ids, kwargs = _case(rng, "dense_mean", table.shape[0])
    cotangent = jnp.asarray(rng.integers(-4, 5, (ids.shape[0], 32)) / 4, jnp.float32)
    _assert_gradients_match(backend, table, ids, kwargs, cotangent)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_duplicate_ids_and_empty_bags(backend):
    table = dyadic_table(rng_for("edge", backend), 6, 128, jnp.float32)
    same = jnp.full((3, 5), 4, jnp.int32)
    padding = jnp.ones((3, 5), jnp.float32).at[1].set(0.0)  # bag 1 is all padding: empty
    cases = [
        (same, dict(combiner="mean", weights=padding)),
        (jnp.zeros((4, 0), jnp.int32), dict(combiner="mean")),  # L = 0: every bag empty
        (jnp.zeros((0,), jnp.int32), dict(combiner="sum", segment_ids=jnp.zeros((0,), jnp.int32), num_segments=3)),
        # Segments 1, 2, 4 empty; segment 3 holds a duplicate id.
        (jnp.array([2, 2, 2, 2], jnp.int32),
         dict(combiner="mean", segment_ids=jnp.array([0, 0, 3, 3]), num_segments=5)),
    ]
    _assert_cases_equal_reference(backend, table, cases)


def test_duplicate_ids_sum_their_gradients():
    table = jnp.ones((6, 8), jnp.float32)
    grad, _ = _grads(_backend("xla"), table, jnp.full((3, 5), 4, jnp.int32), dict(combiner="sum"), 1.0)
    np.testing.assert_array_equal(grad[4], np.full(8, 15.0))  # 3 bags x 5 duplicates
    assert not np.any(np.delete(np.asarray(grad), 4, axis=0))


def test_bfloat16_gradient_sums_duplicates_in_float32():
    """1000 unit gradients into one bf16 row: float32 sums give 1000 (a bf16 value); summing in bf16 would
    stop at 256, where adding 1 no longer changes a bf16 number."""
    table = jnp.zeros((3, 8), jnp.bfloat16)
    grad, _ = _grads(_backend("xla"), table, jnp.ones((1000,), jnp.int32), {}, 1.0)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad[1], np.float32), np.full(8, 1000.0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_apply_out_of_range_policy(backend):
    rng = rng_for("oob", backend)
    table = dyadic_table(rng, 6, 8, jnp.float32)
    cases = []
    for form, oob in (("rows", "clamp"), ("rows", "zero"), ("ragged_sum", "zero")):
        ids, kwargs = _case(rng, form, table.shape[0], out_of_range=True)
        cases.append((ids, {**kwargs, "oob": oob}))
    _assert_cases_equal_reference(backend, table, cases)


def test_out_of_range_zero_reads_zero_rows_and_drops_grads():
    table = jnp.ones((4, 8), jnp.float32)
    ids = jnp.array([0, 4, -1, 3], jnp.int32)
    np.testing.assert_array_equal(_run("xla", table, ids, oob="zero")[:, 0], [1.0, 0.0, 0.0, 1.0])
    grad, _ = _grads(_backend("xla"), table, ids, dict(oob="zero"), 1.0)
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
    assert "id 7 out of range [0, 4)" in error.get()
    error, out = checkify.checkify(jitted)(good)
    assert error.get() is None
    _assert_equals_numpy(out, table, good)


def test_tpu_kernels_split_long_inputs_across_calls():
    rng = rng_for("chunks")
    table = dyadic_table(rng, 11, 128, jnp.float32)
    ids = jnp.asarray(rng.integers(-1, 11, 40), jnp.int32)  # 2 calls of 32 ids
    rows = lookup_tpu.gather_rows_tpu(table, ids, interpret=TPU_INTERPRET, max_ids_per_call=32)
    with_zero_row = jnp.concatenate([table, jnp.zeros((1, 128))])
    assert_equal(rows, _reference(with_zero_row, jnp.where(ids < 0, 11, ids)))
    slot_ids = jnp.asarray(rng.integers(-1, 11, (12, 2)), jnp.int32)  # 2 calls of 8 sub-bags
    weights = jnp.asarray(rng.integers(-2, 3, (12, 2)), jnp.float32)
    sums = lookup_tpu.pooled_rows_tpu(table, slot_ids, weights, interpret=TPU_INTERPRET, max_ids_per_call=16)
    assert_equal(sums, jnp.sum(with_zero_row[jnp.where(slot_ids < 0, 11, slot_ids)] * weights[..., None], axis=1))
    _check_races("tpu")


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
    half = table.astype(jnp.float16)
    _assert_equals_numpy(_jit_call(lookup, half, ids, {}), half, ids)


_CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _lowered_text(fn, platform: str, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


LOWERING_FORMS = {
    "rows": (jnp.zeros((5, 60), jnp.int32), {}),
    "dense": (jnp.zeros((64, 20), jnp.int32), dict(combiner="mean", weights=jnp.ones((64, 20)))),
    "ragged": (jnp.zeros((300,), jnp.int32),
               dict(combiner="sum", segment_ids=jnp.zeros((300,), jnp.int32), num_segments=50)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_without_hardware(platform, dtype):
    """Block shapes and Mosaic/Triton lowering rules must hold for the real targets, for D below 128 and not a
    power of two (48) and for a multiple of 128 (256)."""
    backend = "tpu" if platform == "tpu" else "gpu"
    for dim in (48, 256):
        table = jnp.zeros((1000, dim), dtype)
        for ids, kwargs in LOWERING_FORMS.values():
            arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
            static = {k: v for k, v in kwargs.items() if k not in arrays}
            text = _lowered_text(lambda t, i, a: lookup(t, i, backend=backend, **static, **a), platform, table,
                                 ids, arrays)
            assert _CUSTOM_CALL[platform] in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_lowers_kernel_and_gradient(platform):
    ids, kwargs = LOWERING_FORMS["dense"]

    def loss(table):
        return jnp.sum(jnp.square(lookup(table, ids, **kwargs).astype(jnp.float32)))

    assert _CUSTOM_CALL[platform] in _lowered_text(jax.value_and_grad(loss), platform, jnp.zeros((1000, 128)))


def test_auto_uses_xla_gather_on_cpu():
    text = _lowered_text(lambda t, i: lookup(t, i, combiner="sum"), "cpu", jnp.zeros((100, 128)),
                         jnp.zeros((4, 3), jnp.int32))
    assert "custom_call" not in text


def test_kernels_inside_shard_map():
    """The sharded embedding lookup calls `lookup` on each device's table shard inside `jax.shard_map` (with
    `check_vma`): outputs must carry their varying mesh axes, run (TPU interpreter, XLA), and lower."""
    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    shards, rows_per_shard = mesh.size, 8
    table = dyadic_table(rng_for("shard_map"), shards * rows_per_shard, 128, jnp.float32)
    ids = jnp.asarray(rng_for("shard_map ids").integers(0, rows_per_shard, (shards, 4, 4)), jnp.int32)
    expected = jnp.stack([table[k * rows_per_shard:(k + 1) * rows_per_shard][ids[k]] for k in range(shards)])
    sharding = jax.NamedSharding(mesh, jax.P("x"))
    table, ids = jax.device_put(table, sharding), jax.device_put(ids, sharding)

    def sharded(backend, **kwargs):
        body = lambda t, i: lookup(t, i[0], backend=backend, **kwargs)[None]
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(jax.P("x"), jax.P("x")), out_specs=jax.P("x")))

    assert_equal(sharded("tpu", interpret=TPU_INTERPRET)(table, ids), expected)
    pooled = sharded("auto", combiner="sum")
    assert_equal(pooled(table, ids), expected.sum(axis=2))
    for platform in _CUSTOM_CALL:
        assert _CUSTOM_CALL[platform] in pooled.trace(table, ids).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_mosaic_gpu_gather_lowers_and_exports_for_cuda_without_hardware(dtype):
    """The Mosaic GPU row gather (and its gradient) lowers for CUDA on this CPU-only jaxlib, and, unlike the
    Triton kernel, `jax.export` accepts it (the SavedModel path); it runs only on a GPU (test_lookup_on_device)."""
    table = jnp.zeros((1000, 128), dtype)
    ids = jnp.zeros((5, 60), jnp.int32)  # 300 ids: not a multiple of the 128 rows per program

    def loss(t):
        return jnp.sum(lookup(t, ids, backend="mosaic_gpu").astype(jnp.float32))

    assert "mosaic_gpu_v2" in _lowered_text(jax.value_and_grad(loss), "cuda", table)
    exported = jax.export.export(jax.jit(lambda t, i: lookup(t, i, backend="mosaic_gpu")), platforms=["cuda"])(
        table, ids)  # fmt: skip
    assert exported.out_avals[0].shape == (5, 60, 128) and exported.serialize()
    with pytest.raises(Exception, match="(?i)triton"):  # what mosaic_gpu is for: Triton calls do not export
        jax.export.export(jax.jit(lambda t, i: lookup(t, i, backend="gpu")), platforms=["cuda"])(table, ids)


def test_mosaic_gpu_rejects_what_it_cannot_copy():
    with pytest.raises(ValueError, match="multiple of 128 bytes.*D=48 is 192 bytes"):
        lookup(jnp.zeros((100, 48)), jnp.zeros((4,), jnp.int32), backend="mosaic_gpu")
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        lookup(jnp.zeros((100, 128), jnp.float16), jnp.zeros((4,), jnp.int32), backend="mosaic_gpu")
    with pytest.raises(NotImplementedError, match="interpret"):
        lookup(jnp.zeros((100, 128)), jnp.zeros((4,), jnp.int32), backend="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="exceeds .* shared memory"):  # 32 rows of 8 KiB
        lookup(jnp.zeros((100, 2048)), jnp.zeros((4,), jnp.int32), backend="mosaic_gpu")
