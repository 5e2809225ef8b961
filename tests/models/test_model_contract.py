"""Every registered model: output contract, padding invariance, mixed precision, one training step.

Compile time dominates these tests. Compiling a model's initialisation costs several times its forward pass (and
eager initialisation compiles every op separately, slower still), so initialisation is only traced
(``jax.eval_shape``: every parameter is created, float32, with its shape) and the parameter values come from
:func:`host_init`. Each model's jitted forward pass is shared by the tests that use the same input layout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ctr.models
from models_testlib import BATCH, host_init, labels, logits_of, loss_of, make_inputs, tiny_model, tiny_towers

MODELS = ctr.models.names()  # every registered model, so a new one is covered without editing this file
# CETNet's default towers (InterFormer + DHEN), with a one-block InterFormer to keep compile times down.
CETNET_BINDINGS = ("interformer/InterFormer.num_layers = 1",)


@functools.lru_cache(maxsize=None)
def model_and_apply(name, dtype="float32"):
    """The model and its jitted ``apply`` (CETNet builds its towers at trace time, under their gin scopes)."""
    model = tiny_model(name, dtype=dtype)
    jitted = jax.jit(model.apply)

    def apply(variables, inputs):
        with tiny_towers(*CETNET_BINDINGS):
            return jitted(variables, inputs)

    return model, apply


@functools.lru_cache(maxsize=None)
def initialised(name):
    """``name``'s variables for :func:`make_inputs` inputs (shapes from the traced ``init``)."""
    with tiny_towers(*CETNET_BINDINGS):
        return host_init(tiny_model(name), make_inputs())


def test_the_zoo_is_registered():
    assert {"dcnv2", "dlrm", "dhen", "interformer", "cetnet"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_logits_keep_the_network_contract(name):
    """``logits`` finds the ``[B]`` logits in the outputs; a plain model's ``loss`` is mean binary cross-entropy."""
    model, apply = model_and_apply(name)
    out, y = apply(initialised(name), make_inputs()), labels()
    np.testing.assert_array_equal(model.logits(out), logits_of(out))
    if not isinstance(out, dict):
        expected = np.mean(np.log1p(np.exp(-np.abs(out))) + np.maximum(out, 0) - out * y)  # stable BCE in numpy
        np.testing.assert_allclose(model.loss(out, y), expected, rtol=1e-5)


def test_a_model_without_the_network_contract_is_refused():
    import flax.linen as nn

    class NoLoss(nn.Module):
        def __call__(self, inputs, *, train=False):
            return inputs.flat()[:, 0]

    with pytest.raises(TypeError, match=r"lacks \['loss', 'logits'\] of ctr.model_io.Network"):
        ctr.models.register("no_loss")(NoLoss)
    assert "no_loss" not in ctr.models.names()


@pytest.mark.parametrize("name", MODELS)
def test_init_and_output_shapes(name):
    variables = initialised(name)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = model_and_apply(name)[1](variables, make_inputs())
    logits = logits_of(out)
    assert logits.shape == (BATCH,) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    if name == "cetnet":
        assert set(out["tower_logits"]) == {"interformer", "dhen"}
        assert out["weights"].shape == (BATCH, 2)


@pytest.mark.parametrize("name", MODELS)
def test_runs_without_sequences(name):
    """Criteo/Avazu layout: dense features and no behaviour sequences."""
    inputs = make_inputs(sequences=False)
    model, apply = model_and_apply(name)
    with tiny_towers(*CETNET_BINDINGS):
        variables = host_init(model, inputs)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    assert not [p for p in paths if "sequence_" in p or "masknet" in p]  # no sequence arch is built
    logits = logits_of(apply(variables, inputs))
    assert logits.shape == (BATCH,) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_does_not_change_the_output(name):
    inputs = make_inputs()
    noise = np.random.default_rng(7)
    garbage = {
        seq_name: jnp.where(inputs.masks[seq_name][..., None], seq, 1e3 * noise.normal(size=seq.shape))
        for seq_name, seq in inputs.sequences.items()
    }
    assert not np.allclose(np.asarray(garbage["cate_his"]), np.asarray(inputs.sequences["cate_his"]))
    apply = model_and_apply(name)[1]
    variables = initialised(name)
    before = logits_of(apply(variables, inputs))
    after = logits_of(apply(variables, inputs.replace(sequences=garbage)))
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_compute_keeps_float32_params_and_output(name):
    inputs, variables = make_inputs(), initialised(name)
    model16, apply16 = model_and_apply(name, "bfloat16")
    with tiny_towers(*CETNET_BINDINGS):
        shapes16 = jax.eval_shape(model16.init, jax.random.key(0), inputs)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes16)} == {jnp.dtype(jnp.float32)}
    assert jax.tree.structure(shapes16) == jax.tree.structure(variables)
    out16, out32 = logits_of(apply16(variables, inputs)), logits_of(model_and_apply(name)[1](variables, inputs))
    assert out16.dtype == jnp.float32 and np.isfinite(np.asarray(out16)).all()
    assert not np.array_equal(np.asarray(out16), np.asarray(out32))  # bf16 arithmetic did happen
    np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=0.15, rtol=0.1)


@pytest.mark.parametrize("name", MODELS)
def test_one_adam_step_lowers_the_loss(name):
    model = model_and_apply(name)[0]
    inputs, y = make_inputs(), labels()
    optimizer = optax.adam(3e-3)

    def loss_fn(params):
        return loss_of(model, model.apply({"params": params}, inputs, train=True), y)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = initialised(name)["params"]
    with tiny_towers(*CETNET_BINDINGS):
        params, opt_state, before = step(params, optimizer.init(params))
        _, _, after = step(params, opt_state)  # returns the loss at the updated parameters
    assert np.isfinite(float(before)) and float(after) < float(before)
