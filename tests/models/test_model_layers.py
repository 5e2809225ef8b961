"""Shared layers and the DCNv2 / DLRM / DHEN structure (cheap: mostly eager math and traced shapes)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctr.model_io import ModelInputs
from ctr.models.layers import (
    MLP,
    FeatureTokens,
    MultiHeadAttention,
    SelfGating,
    activation_fn,
    activation_gain,
    masked_mean,
    pairwise_dots,
    rotary,
    width_map,
)
from models_testlib import gin_config, host_init, make_inputs, tiny_model

RNG = np.random.default_rng(0)


def param_shapes(model, inputs):
    return jax.tree.map(lambda x: x.shape, jax.eval_shape(model.init, jax.random.key(0), inputs)["params"])


def test_pairwise_dots_are_the_distinct_pairs():
    x = jnp.asarray(RNG.normal(size=(2, 4, 3)), jnp.float32)
    expected = [[float(x[b, i] @ x[b, j]) for i, j in itertools.combinations(range(4), 2)] for b in range(2)]
    np.testing.assert_allclose(pairwise_dots(x), expected, rtol=1e-5)


def test_rotary_preserves_norms_and_depends_on_relative_positions():
    q = jnp.asarray(RNG.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(1, 1, 1, 8)), jnp.float32)

    def score(m, n):
        return float((rotary(q, jnp.array([[m]])) * rotary(k, jnp.array([[n]]))).sum())

    np.testing.assert_allclose(jnp.linalg.norm(rotary(q, jnp.array([[5]]))), jnp.linalg.norm(q), rtol=1e-5)
    assert score(3, 1) == pytest.approx(score(12, 10), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_attention_ignores_masked_keys_and_zeroes_queries_without_keys():
    layer = MultiHeadAttention(num_heads=2)
    q = jnp.asarray(RNG.normal(size=(2, 3, 4)), jnp.float32)
    kv = jnp.asarray(RNG.normal(size=(2, 5, 4)), jnp.float32)
    mask = jnp.array([[True, True, False, False, True], [False] * 5])
    params = layer.init(jax.random.key(0), q, kv, mask)
    out = layer.apply(params, q, kv, mask)
    changed = layer.apply(params, q, kv.at[:, 2:4].set(100.0).at[1].set(-7.0), mask)
    np.testing.assert_allclose(changed, out, rtol=1e-6)
    bias = params["params"]["out"]["bias"]
    np.testing.assert_allclose(out[1], jnp.broadcast_to(bias, (3, 4)), atol=1e-6)  # no key: only the out bias


def test_identity_query_key_attention_starts_as_softmax_of_input_dot_products():
    layer = MultiHeadAttention(num_heads=2, identity_values=True, identity_queries_keys=True)
    q = jnp.asarray(RNG.normal(size=(2, 3, 4)), jnp.float32)
    kv = jnp.asarray(RNG.normal(size=(2, 5, 4)), jnp.float32)
    out = layer.apply(layer.init(jax.random.key(0), q, kv), q, kv)
    # Reference: per head (channels 0-1 and 2-3), softmax over keys of q.k / sqrt(2), times the raw keys.
    expected = np.zeros((2, 3, 4))
    for h in (slice(0, 2), slice(2, 4)):
        logits = np.einsum("bqd,bkd->bqk", q[..., h], kv[..., h]) / np.sqrt(2)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        expected[..., h] = np.einsum("bqk,bkd->bqd", w / w.sum(-1, keepdims=True), kv[..., h])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,gain", [("relu", 2.0), ("identity", 1.0), ("tanh", None), ("swish", None)])
def test_activation_gain_is_one_over_the_second_moment_under_a_unit_normal(name, gain):
    act = activation_fn(name)
    if gain is None:  # Monte Carlo reference
        z = np.random.default_rng(1).normal(size=2_000_000)
        gain = 1 / np.mean(np.asarray(act(jnp.asarray(z, jnp.float32)), np.float64) ** 2)
    assert activation_gain(act) == pytest.approx(gain, rel=5e-3)


def test_gain_init_keeps_the_scale_through_a_deep_swish_stack():
    x = jnp.asarray(RNG.normal(size=(4096, 128)), jnp.float32)
    stds = {}
    for gain_init in (False, True):
        mlp = MLP((256, 256, 256, 256, 1), activation_fn("swish"), activate_last=False, gain_init=gain_init)
        stds[gain_init] = float(jnp.std(mlp.apply(mlp.init(jax.random.key(0), x), x)))
    assert 0.7 < stds[True] < 1.4  # one unit-scale input through four gain-corrected layers
    assert stds[False] < 0.5 * stds[True]  # LeCun: ~1.7x smaller per swish layer


def test_masked_mean():
    seq = jnp.arange(6.0).reshape(1, 3, 2) * jnp.ones((2, 1, 1))
    mask = jnp.array([[False, True, True], [False, False, False]])
    np.testing.assert_allclose(masked_mean(seq, mask), [[3.0, 4.0], [0.0, 0.0]])


def test_dcnv2_low_rank_and_mixture_of_experts():
    inputs = make_inputs(sequences=False)
    width = 8 + 8 + 4 + 3
    low = param_shapes(tiny_model("dcnv2", cross_rank=4), inputs)
    assert low["cross_0"]["v"]["kernel"] == (width, 4) and low["cross_0"]["u"]["kernel"] == (4, width)
    mix = param_shapes(tiny_model("dcnv2", cross_rank=4, num_experts=3), inputs)
    assert mix["cross_0"]["v"] == (3, width, 4) and mix["cross_0"]["c"] == (3, 4, 4)
    assert mix["cross_0"]["u"] == (3, 4, width) and mix["cross_0"]["gate"]["kernel"] == (width, 3)
    with pytest.raises(ValueError, match="cross_rank"):
        param_shapes(tiny_model("dcnv2", num_experts=3), inputs)
    model = tiny_model("dcnv2", cross_rank=4, num_experts=3, structure="parallel")
    out = jax.jit(model.apply)(host_init(model, inputs), inputs)
    assert out.shape == (inputs.batch_size,) and np.isfinite(np.asarray(out)).all()


def test_dcnv2_parallel_concatenates_cross_and_deep_outputs():
    shapes = param_shapes(tiny_model("dcnv2", structure="parallel"), make_inputs())
    # Mean-pooled sequences (8 + 8 + 4 wide) are appended to the 23 input features.
    assert shapes["cross_0"]["w"]["kernel"] == (43, 43)
    assert shapes["logit"]["kernel"] == (43 + 16, 1)
    no_pool = param_shapes(tiny_model("dcnv2", pool_sequences=False), make_inputs())
    assert no_pool["cross_0"]["w"]["kernel"] == (23, 23)


@pytest.mark.parametrize("with_dense", [True, False])
def test_dlrm_top_mlp_reads_the_bottom_output_and_the_distinct_pairs(with_dense):
    inputs = make_inputs(sequences=False, dense=with_dense)
    shapes = param_shapes(tiny_model("dlrm"), inputs)
    n = 3 + int(with_dense)  # vectors: bottom-MLP output (with dense), 3 features
    assert shapes["top_mlp"]["dense_0"]["kernel"] == (8 * with_dense + n * (n - 1) // 2, 16)
    assert ("bottom_mlp" in shapes["tokens"]) == with_dense


@pytest.mark.parametrize("kernel_init", ["lecun_normal", "glorot_uniform"])
def test_dlrm_kernel_init_reaches_both_mlps(kernel_init):
    model = tiny_model("dlrm", kernel_init=kernel_init, bottom_mlp=(512,), top_mlp=(512,))
    params = model.init(jax.random.key(0), make_inputs(sequences=False, dense=True))["params"]
    kernels = {"bottom": params["tokens"]["bottom_mlp"]["dense_0"]["kernel"],
               "top": params["top_mlp"]["dense_0"]["kernel"]}  # fmt: skip
    for where, w in kernels.items():
        fan_in, fan_out = w.shape
        want = 1 / fan_in if kernel_init == "lecun_normal" else 2 / (fan_in + fan_out)  # the two variances
        assert float(np.var(w)) == pytest.approx(want, rel=0.1), where
    # With no bottom hidden layers, the dense features' one linear layer follows it too.
    linear = tiny_model("dlrm", kernel_init=kernel_init, bottom_mlp=(), dim=512)
    w = linear.init(jax.random.key(0), make_inputs(sequences=False, dense=True))["params"]["tokens"]["dense_proj"]
    fan_in, fan_out = w["kernel"].shape
    want = 1 / fan_in if kernel_init == "lecun_normal" else 2 / (fan_in + fan_out)
    assert float(np.var(w["kernel"])) == pytest.approx(want, rel=0.1)
    with pytest.raises(ValueError, match="unknown kernel initializer 'glorot'"):
        param_shapes(tiny_model("dlrm", kernel_init="glorot"), make_inputs(sequences=False))


@pytest.mark.parametrize("modules,ensemble", [(("dot", "dcn"), "concat"), (("dot", "dcn", "attention"), "sum")])
def test_dhen_layers_ensemble_their_modules(modules, ensemble):
    inputs = make_inputs(sequences=False)
    with gin_config(f"DHENStack.modules = {modules!r}", f"DHENStack.ensemble = {ensemble!r}", "DHENStack.dcn_rank = 2"):
        model = tiny_model("dhen", num_layers=2)
        shapes = param_shapes(model, inputs)
        out = jax.jit(model.apply)(host_init(model, inputs), inputs)
    layer = shapes["dhen"]["layer_1"]
    assert set(modules) <= set(layer)
    assert ("ensemble" in layer) == (ensemble == "concat")
    assert layer["dcn"]["cross"]["v"]["kernel"] == (4 * 8, 2)  # 4 tokens of width 8, flattened
    assert np.isfinite(np.asarray(out)).all()


def test_dhen_rejects_unknown_modules():
    with gin_config("DHENStack.modules = ('dot', 'fm')"), pytest.raises(ValueError, match="unknown DHEN module"):
        param_shapes(tiny_model("dhen"), make_inputs(sequences=False))


@pytest.mark.parametrize("form", ["paper", "glu"])
def test_self_gating_forms(form):
    x = jnp.asarray(RNG.normal(size=(4, 3, 2)), jnp.float32)
    layer = SelfGating(form=form)
    params = layer.init(jax.random.key(0), x)
    # The paper form's gate bias starts at one, so the gate starts monotone in X (see SelfGating).
    expected_bias = 1.0 if form == "paper" else 0.0
    np.testing.assert_array_equal(params["params"]["gate"]["bias"], np.full(6, expected_bias))
    out = layer.apply(params, x)
    assert out.shape == x.shape
    if form == "paper":
        assert ((out > 0) & (out < 1)).all()
    else:
        np.testing.assert_array_equal(np.sign(out), np.sign(x))
    with pytest.raises(ValueError, match="gating form"):
        SelfGating(form="tanh").init(jax.random.key(0), x)


def test_normalized_feature_tokens_put_embeddings_and_a_large_dense_feature_on_one_scale():
    """TaobaoAds-like scales: embeddings ~0.05, a log-price dense feature ~4.5."""
    inputs = ModelInputs(
        features={f"f{i}": jnp.asarray(RNG.uniform(-0.05, 0.05, (16, 8)), jnp.float32) for i in range(3)},
        dense=jnp.asarray(RNG.normal(4.5, 1.0, (16, 1)), jnp.float32),
        sequences={},
        masks={},
    )
    for normalize in (False, True):
        layer = FeatureTokens(8, normalize=normalize)
        tokens = layer.apply(layer.init(jax.random.key(0), inputs), inputs)  # [B, 1 dense + 3, 8]
        scale = np.asarray(jnp.sqrt(jnp.mean(tokens**2, axis=-1))).mean(axis=0)
        if normalize:
            # every token at unit scale (LayerNorm starts as identity; its epsilon shaves ~0.1% off tiny tokens)
            np.testing.assert_allclose(scale, 1.0, atol=0.01)
        else:
            assert scale[0] > 20 * scale[1:].max()  # the dense token dwarfs the embeddings


@pytest.mark.parametrize("width,dim", [(4, 4), (2, 5), (4, 8), (8, 4), (5, 2), (6, 4)])
def test_width_map_tiles_or_folds(width, dim):
    x = np.arange(1.0, width + 1)
    tiled = np.tile(x, -(-dim // width))[:dim]
    folded = np.pad(x, (0, -width % dim)).reshape(-1, dim).sum(0)
    np.testing.assert_array_equal(x @ width_map(width, dim), tiled if dim >= width else folded)


def test_aligned_projections_map_one_table_to_one_token():
    """Two 4-wide features holding the same embedding become the same 8-wide token (random maps would not)."""
    emb = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    inputs = ModelInputs(features={"a": emb, "b": emb}, dense=None, sequences={}, masks={})
    for aligned in (True, False):
        layer = FeatureTokens(8, aligned_projections=aligned)
        tokens = layer.apply(layer.init(jax.random.key(0), inputs), inputs)
        assert np.allclose(tokens[:, 0], tokens[:, 1]) == aligned


def test_dcnv2_bottom_mlp_feeds_the_dense_features_through_relu_layers():
    inputs = make_inputs(sequences=False)
    model = tiny_model("dcnv2", bottom_mlp=(6, 5), cross_rank=4)
    params = host_init(model, inputs)["params"]
    bottom = params["bottom_mlp"]
    assert bottom["dense_0"]["kernel"].shape == (3, 6) and bottom["dense_1"]["kernel"].shape == (6, 5)
    assert params["cross_0"]["v"]["kernel"].shape == (8 + 8 + 4 + 5, 4)  # embeddings + the bottom output
    # Reference: the same model without a bottom MLP, fed numpy's ReLU MLP of the dense features.
    h = np.asarray(inputs.dense)
    for layer in ("dense_0", "dense_1"):
        h = np.maximum(h @ np.asarray(bottom[layer]["kernel"]) + np.asarray(bottom[layer]["bias"]), 0.0)
    plain = tiny_model("dcnv2", cross_rank=4)
    rest = {k: v for k, v in params.items() if k != "bottom_mlp"}
    expected = plain.apply({"params": rest}, inputs.replace(dense=jnp.asarray(h, jnp.float32)))
    np.testing.assert_allclose(model.apply({"params": params}, inputs), expected, rtol=1e-5, atol=1e-6)
    without_dense = param_shapes(model, make_inputs(sequences=False, dense=False))
    assert "bottom_mlp" not in without_dense
