"""CETNet: confidence fusion, the collaborative loss, per-tower inputs and per-tower gin scopes."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctr.models.cetnet import CETNet, confidence, fuse
from ctr.models.dlrm import DLRM
from ctr.model_io import ModelInputs
from models_testlib import BATCH, host_init, labels, make_inputs, tiny_towers

TOWER_LOGITS = jnp.array([[4.0, 0.1], [-0.2, -3.0], [0.0, 0.0], [2.0, -2.0]])  # [B, K]


def test_confidence_is_the_negated_binary_entropy():
    z = jnp.array([-3.0, 0.0, 0.5, 6.0])
    p = jax.nn.sigmoid(z)
    np.testing.assert_allclose(confidence(z), p * jnp.log(p) + (1 - p) * jnp.log(1 - p), rtol=1e-6)
    assert float(confidence(jnp.array(0.0))) == pytest.approx(-np.log(2))


@pytest.mark.parametrize("mode", ["probability", "logit"])
def test_fusion_weights_sum_to_one_and_favour_the_more_confident_tower(mode):
    fused, weights = fuse(TOWER_LOGITS, 1.0, mode)
    assert fused.shape == (4,) and weights.shape == (4, 2)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert weights[0, 0] > 0.5 and weights[1, 1] > 0.5  # |logit| 4 beats 0.1; 3 beats 0.2
    np.testing.assert_allclose(weights[2], [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(weights[3], [0.5, 0.5], rtol=1e-6)  # equally confident, opposite predictions
    # A lower temperature moves the weights further toward the confident tower.
    sharp = fuse(TOWER_LOGITS, 0.1, mode)[1]
    assert sharp[0, 0] > weights[0, 0] and sharp[1, 1] > weights[1, 1]
    if mode == "probability":
        np.testing.assert_allclose(
            jax.nn.sigmoid(fused), (weights * jax.nn.sigmoid(TOWER_LOGITS)).sum(-1), rtol=1e-5
        )
    else:
        np.testing.assert_allclose(fused, (weights * TOWER_LOGITS).sum(-1), rtol=1e-6)


def test_probability_fusion_stays_finite_for_saturated_towers():
    fused, _ = fuse(jnp.array([[60.0, 55.0], [-80.0, 40.0]]), 1.0, "probability")
    assert np.isfinite(np.asarray(fused)).all() and fused[0] > 30


def test_the_loss_is_fused_plus_tower_plus_collaborative_terms():
    outputs = {
        "logits": fuse(TOWER_LOGITS, 1.0, "probability")[0],
        "tower_logits": {"a": TOWER_LOGITS[:, 0], "b": TOWER_LOGITS[:, 1]},
    }
    y = jnp.array([1.0, 0.0, 1.0, 0.0])
    bce = optax.sigmoid_binary_cross_entropy
    target = jax.nn.sigmoid(outputs["logits"])
    expected = bce(outputs["logits"], y) + sum(
        bce(z, y) + 0.5 * bce(z, target) for z in outputs["tower_logits"].values()
    )
    # The trainer calls ``loss`` on the unbound module it built.
    np.testing.assert_allclose(CETNet(collab_weight=0.5).loss(outputs, y), expected.mean(), rtol=1e-6)
    # The collaborative term treats the fused prediction as a constant target.
    grad = jax.grad(lambda o, lam: CETNet(collab_weight=lam).loss(o, y))
    np.testing.assert_allclose(grad(outputs, 0.0)["logits"], grad(outputs, 3.0)["logits"], rtol=1e-6)
    assert not np.allclose(grad(outputs, 0.0)["tower_logits"]["a"], grad(outputs, 3.0)["tower_logits"]["a"])


def test_each_tower_reads_its_own_inputs_when_given():
    xa = make_inputs(seed=1, sequences=False, feature_dims=(8, 8))
    xb = make_inputs(seed=2, sequences=False, feature_dims=(4, 4, 4))
    empty = ModelInputs(features={}, dense=None, sequences={}, masks={})
    inputs = empty.replace(towers={"a": xa, "b": xb})
    assert inputs.batch_size == BATCH
    model = CETNet(towers=(("a", "dlrm"), ("b", "dcnv2")), learn_temperature=True, temperature=2.0)
    with tiny_towers("a/DLRM.dim = 8", "b/DCNv2.mlp = (16,)", "b/DCNv2.num_cross_layers = 1"):
        variables = host_init(model, inputs)
        variables["params"]["log_temperature"] = jnp.log(2.0)
        out = jax.jit(model.apply)(variables, inputs)
        with gin.config_scope("a"):
            alone = jax.jit(DLRM().apply)({"params": variables["params"]["a"]}, xa)
    np.testing.assert_allclose(out["tower_logits"]["a"], alone, rtol=1e-6)
    np.testing.assert_allclose(out["weights"].sum(-1), 1.0, rtol=1e-6)
    stacked = jnp.stack([out["tower_logits"]["a"], out["tower_logits"]["b"]], -1)
    np.testing.assert_allclose(out["logits"], fuse(stacked, 2.0, "probability")[0], rtol=1e-5)


def test_towers_are_configured_by_their_gin_scope():
    model = CETNet(towers=(("small", "dhen"), ("large", "dhen")))
    with tiny_towers("small/DHENModel.dim = 4", "large/DHENModel.dim = 8", "DHENModel.head = (16,)"):
        shapes = jax.eval_shape(model.init, jax.random.key(0), make_inputs(sequences=False))["params"]
    assert shapes["small"]["tokens"]["proj_f0"]["kernel"].shape == (8, 4)
    assert "proj_f0" not in shapes["large"]["tokens"]  # already 8 wide
    assert "log_temperature" not in shapes


def test_learned_temperature_gets_a_gradient():
    model = CETNet(towers=(("a", "dlrm"), ("b", "dlrm")), learn_temperature=True)
    inputs, y = make_inputs(sequences=False), labels()
    with tiny_towers("DLRM.dim = 8", "DLRM.bottom_mlp = (8,)", "DLRM.top_mlp = (8,)"):
        variables = host_init(model, inputs)
        grads = jax.jit(jax.grad(lambda p: model.loss(model.apply({"params": p}, inputs), y)))(variables["params"])
    assert variables["params"]["log_temperature"].shape == ()
    assert float(jnp.abs(grads["log_temperature"])) > 0


def test_detached_confidence_passes_no_gradient_through_the_weights():
    def fused_sum(z, detach):
        return fuse(z, 1.0, "logit", detach)[0].sum()

    weights = fuse(TOWER_LOGITS, 1.0, "logit")[1]
    np.testing.assert_allclose(jax.grad(fused_sum)(TOWER_LOGITS, True), weights, rtol=1e-6)
    assert not np.allclose(jax.grad(fused_sum)(TOWER_LOGITS, False), weights, rtol=1e-3)
    with pytest.raises(ValueError, match="fusion"):
        fuse(TOWER_LOGITS, 1.0, "geometric")


@pytest.mark.parametrize("mode", ["probability", "logit"])
def test_the_prior_shifts_every_examples_log_weights(mode):
    prior = jnp.array([0.7, -0.4])
    weights = fuse(TOWER_LOGITS, 2.0, mode, prior=prior)[1]
    conf = confidence(TOWER_LOGITS) / 2.0
    expected = np.exp(conf + prior) / np.exp(conf + prior).sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    # Only differences between towers matter.
    np.testing.assert_allclose(fuse(TOWER_LOGITS, 2.0, mode, prior=prior + 5.0)[1], weights, rtol=1e-5)


def test_the_learned_prior_moves_toward_the_tower_that_predicts_the_labels():
    rng = np.random.default_rng(0)
    truth = rng.normal(0.0, 2.0, 4096)  # tower 0 is the true logit, tower 1 is independent noise
    y = jnp.asarray(rng.random(4096) < 1 / (1 + np.exp(-truth)), jnp.float32)
    z = jnp.asarray(np.stack([truth, rng.normal(0.0, 2.0, 4096)], -1), jnp.float32)

    def fused_loss(prior):
        return optax.sigmoid_binary_cross_entropy(fuse(z, 1.0, "probability", prior=prior)[0], y).mean()

    prior = jnp.zeros(2)
    for _ in range(200):
        prior = prior - 1.0 * jax.grad(fused_loss)(prior)
    assert float(prior[0] - prior[1]) > 1.0
    assert float(fuse(z, 1.0, "probability", prior=prior)[1][:, 0].mean()) > 0.75
    assert float(fused_loss(prior)) < float(fused_loss(jnp.zeros(2)))


def test_the_learned_prior_is_a_scaled_per_tower_parameter_that_starts_at_zero():
    towers = (("a", "dlrm"), ("b", "dlrm"))
    inputs, y = make_inputs(sequences=False), labels()
    with tiny_towers("DLRM.dim = 8", "DLRM.bottom_mlp = (8,)", "DLRM.top_mlp = (8,)"):
        model = CETNet(towers=towers, learn_prior=True, prior_scale=3.0)
        np.testing.assert_array_equal(model.init(jax.random.key(0), inputs)["params"]["tower_prior"], [0.0, 0.0])
        variables = host_init(model, inputs)
        variables["params"]["tower_prior"] = jnp.zeros(2)
        plain = {"params": {k: v for k, v in variables["params"].items() if k != "tower_prior"}}
        np.testing.assert_allclose(model.apply(variables, inputs)["logits"],
                                   CETNet(towers=towers).apply(plain, inputs)["logits"], rtol=1e-6)
        grads = jax.grad(lambda p: model.loss(model.apply({"params": p}, inputs), y))(variables["params"])
        assert float(jnp.abs(grads["tower_prior"]).sum()) > 0
        variables["params"]["tower_prior"] = jnp.array([0.5, 0.0])
        out = model.apply(variables, inputs)
    stacked = jnp.stack([out["tower_logits"]["a"], out["tower_logits"]["b"]], -1)
    np.testing.assert_allclose(out["weights"], fuse(stacked, 1.0, "probability", prior=jnp.array([1.5, 0.0]))[1],
                               rtol=1e-5)
