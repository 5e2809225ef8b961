"""Every registered model: output contract, padding invariance, mixed precision, one training step.

Compile time dominates these tests, so each model compiles one jitted ``init_with_output`` per (dtype, input
layout) and reuses it: parameter initialisation depends only on the input shapes, so the same function gives the
outputs for changed input values with the very same parameters.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ctr.models
from models_testlib import BATCH, labels, logits_of, loss_of, make_inputs, tiny_model, tiny_towers

MODELS = ["dcnv2", "dlrm", "dhen", "interformer", "cetnet"]
# CETNet's default towers (InterFormer + DHEN), with a one-block InterFormer to keep compile times down.
CETNET_BINDINGS = ("interformer/InterFormer.num_layers = 1",)


@functools.lru_cache(maxsize=None)
def init_and_apply(name, dtype="float32"):
    """The model and ``inputs -> (outputs, variables)``, jitted, always from the same RNG key."""
    model = tiny_model(name, dtype=dtype)
    jitted = jax.jit(model.init_with_output)

    def run(inputs):
        with tiny_towers(*CETNET_BINDINGS):  # CETNet builds its towers at trace time, under their gin scopes
            return jitted(jax.random.key(0), inputs)

    return model, run


def test_every_model_is_registered():
    assert set(MODELS) <= set(ctr.models.names())


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name):
    out, _ = init_and_apply(name)[1](make_inputs())
    logits = logits_of(out)
    assert logits.shape == (BATCH,) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    if name == "cetnet":
        assert set(out["tower_logits"]) == {"interformer", "dhen"}
        assert out["weights"].shape == (BATCH, 2)


@pytest.mark.parametrize("name", MODELS)
def test_runs_without_sequences(name):
    """Criteo/Avazu layout: dense features and no behaviour sequences."""
    out, variables = init_and_apply(name)[1](make_inputs(sequences=False))
    assert logits_of(out).shape == (BATCH,) and np.isfinite(np.asarray(logits_of(out))).all()
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    assert not [p for p in paths if "sequence_" in p or "masknet" in p]  # no sequence arch is built


@pytest.mark.parametrize("name", MODELS)
def test_padding_does_not_change_the_output(name):
    inputs = make_inputs()
    noise = np.random.default_rng(7)
    garbage = {
        seq_name: jnp.where(inputs.masks[seq_name][..., None], seq, 1e3 * noise.normal(size=seq.shape))
        for seq_name, seq in inputs.sequences.items()
    }
    assert not np.allclose(np.asarray(garbage["cate_his"]), np.asarray(inputs.sequences["cate_his"]))
    run = init_and_apply(name)[1]
    before, after = logits_of(run(inputs)[0]), logits_of(run(inputs.replace(sequences=garbage))[0])
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_compute_keeps_float32_params_and_output(name):
    inputs = make_inputs()
    out32, variables32 = init_and_apply(name)[1](inputs)
    out16, variables16 = init_and_apply(name, "bfloat16")[1](inputs)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables16)} == {jnp.dtype(jnp.float32)}
    jax.tree.map(np.testing.assert_array_equal, variables16, variables32)  # the same f32 master weights
    out16, out32 = logits_of(out16), logits_of(out32)
    assert out16.dtype == jnp.float32 and np.isfinite(np.asarray(out16)).all()
    assert not np.array_equal(np.asarray(out16), np.asarray(out32))  # bf16 arithmetic did happen
    np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=0.15, rtol=0.1)


@pytest.mark.parametrize("name", MODELS)
def test_one_adam_step_lowers_the_loss(name):
    model, run = init_and_apply(name)
    inputs, y = make_inputs(), labels()
    variables = run(inputs)[1]
    optimizer = optax.adam(3e-3)

    def loss_fn(params):
        return loss_of(model, model.apply({"params": params}, inputs, train=True), y)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = variables["params"]
    with tiny_towers(*CETNET_BINDINGS):
        params, opt_state, before = step(params, optimizer.init(params))
        _, _, after = step(params, opt_state)  # returns the loss at the updated parameters
    assert np.isfinite(float(before)) and float(after) < float(before)
