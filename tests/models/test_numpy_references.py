"""Model blocks against naive NumPy loops written from their papers' formulas (float64, one scalar at a time):
the DCNv2 cross layer (full and low rank), the DCN-Mix mixture of low-rank experts, DLRM's bottom MLP + pairwise
dot interaction + top MLP, a DHEN layer's wiring, multi-head attention with rotary positions and a key mask (InterFormer's), and
CETNet's confidence fusion ``w = softmax(c / T)``.

Parameters are random (biases too), so every term of a formula shows. Tolerances: the blocks compute in float32
with sums of at most ~50 terms of magnitude ~1, so 1e-5 relative (plus 1e-5 absolute near 0) is ~100 ulps.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctr.models.cetnet import fuse
from ctr.models.dhen import DHENLayer
from ctr.models.dlrm import DLRM
from ctr.models.layers import CrossLayer, MixtureCrossLayer, MultiHeadAttention
from models_testlib import make_inputs

B, D = 4, 6
TOL = dict(rtol=1e-5, atol=1e-5)


def _random_params(module, *args, seed=0):
    """The module's parameter tree with every leaf (biases included) drawn from N(0, 0.5^2)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _matvec(x, kernel):
    """``x @ kernel`` for one vector, as loops (flax Dense kernels are [in, out])."""
    return np.array([sum(x[i] * kernel[i, j] for i in range(len(x))) for j in range(kernel.shape[1])])


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(B, D)), jnp.float32), jnp.asarray(rng.normal(size=(B, D)), jnp.float32)


@pytest.mark.parametrize("rank", [None, 3])
def test_cross_layer_is_x0_times_w_x_plus_b_plus_x(rank):
    """DCNv2 (Wang et al. 2021), eq. 1: x_{l+1} = x0 ⊙ (W x_l + b) + x_l, W = U V^T in the low-rank form."""
    x0, x = _inputs()
    layer = CrossLayer(rank=rank)
    params = _random_params(layer, x0, x)
    p = _np(params["params"])
    got = layer.apply(params, x0, x)
    want = np.zeros((B, D))
    for b in range(B):
        xb = np.asarray(x[b], np.float64)
        if rank is None:
            projected = _matvec(xb, p["w"]["kernel"]) + p["w"]["bias"]
        else:
            projected = _matvec(_matvec(xb, p["v"]["kernel"]), p["u"]["kernel"]) + p["u"]["bias"]
        for i in range(D):
            want[b, i] = float(x0[b, i]) * projected[i] + xb[i]
    np.testing.assert_allclose(got, want, **TOL)


def test_mixture_cross_layer_is_the_gated_sum_of_low_rank_experts():
    """DCN-Mix (DCNv2 paper, eq. 3): x_{l+1} = Σ_i G_i(x_l) E_i(x_l) + x_l with
    E_i(x) = x0 ⊙ (U_i g(C_i g(V_i^T x)) + b_i) and G = softmax(x_l W_g + b_g) over the experts."""
    x0, x = _inputs()
    experts, rank = 3, 2
    layer = MixtureCrossLayer(rank=rank, num_experts=experts, activation=jax.nn.relu)
    params = _random_params(layer, x0, x)
    p = _np(params["params"])
    relu = lambda v: np.maximum(v, 0.0)
    got = layer.apply(params, x0, x)
    want = np.zeros((B, D))
    for b in range(B):
        xb, x0b = np.asarray(x[b], np.float64), np.asarray(x0[b], np.float64)
        scores = _matvec(xb, p["gate"]["kernel"]) + p["gate"]["bias"]
        gates = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        for e in range(experts):
            h = relu(_matvec(xb, p["v"][e]))
            h = relu(_matvec(h, p["c"][e]))
            expert = x0b * (_matvec(h, p["u"][e]) + p["b"][e])
            want[b] += gates[e] * expert
        want[b] += xb
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("with_dense", [True, False])
def test_dlrm_is_top_mlp_of_bottom_output_and_pairwise_dots(with_dense):
    """DLRM (Naumov et al. 2019): z = [bottom_mlp(dense)] ++ [<e_i, e_j> for i < j] over the vectors (bottom
    output first, then the features, the narrower one projected to the interaction width); logit = top_mlp(z)."""
    inputs = make_inputs(sequences=False, dense=with_dense, feature_dims=(8, 4, 8), batch=B)
    model = DLRM(dim=8, bottom_mlp=(5,), top_mlp=(7,), activation="relu")
    params = _random_params(model, inputs)
    p = _np(params["params"])
    relu = lambda v: np.maximum(v, 0.0)

    def dense_layer(v, layer):
        return _matvec(v, layer["kernel"]) + layer["bias"]

    got = model.apply(params, inputs)
    want = np.zeros(B)
    for b in range(B):
        vectors = []
        if with_dense:
            bottom = p["tokens"]["bottom_mlp"]
            hidden = relu(dense_layer(np.asarray(inputs.dense[b], np.float64), bottom["dense_0"]))
            vectors.append(relu(dense_layer(hidden, bottom["dense_1"])))  # activated throughout
        for name, value in inputs.features.items():
            v = np.asarray(value[b], np.float64)
            vectors.append(v if len(v) == 8 else _matvec(v, p["tokens"][f"proj_{name}"]["kernel"]))
        dots = [sum(vi[k] * vj[k] for k in range(8)) for vi, vj in itertools.combinations(vectors, 2)]
        z = np.concatenate([vectors[0], dots]) if with_dense else np.array(dots)
        top = p["top_mlp"]
        want[b] = dense_layer(relu(dense_layer(z, top["dense_0"])), top["dense_1"])[0]
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("mode", ["probability", "logit"])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_cetnet_fusion_weights_are_softmax_of_confidence_over_temperature(mode, temperature):
    """CETNet (arXiv 2411.13700): c_k = p_k log p_k + (1 - p_k) log(1 - p_k) (negated entropy, p_k = σ(z_k)),
    w = softmax(c / T) over the towers; fused p = Σ w_k p_k ("probability") or fused z = Σ w_k z_k ("logit")."""
    logits = np.random.default_rng(2).normal(0, 2.5, (6, 3))
    fused, weights = fuse(jnp.asarray(logits, jnp.float32), temperature, mode)
    for b in range(len(logits)):
        p = [1 / (1 + math.exp(-z)) for z in logits[b]]
        c = [pk * math.log(pk) + (1 - pk) * math.log(1 - pk) for pk in p]
        e = [math.exp(ck / temperature) for ck in c]
        w = [ek / sum(e) for ek in e]
        np.testing.assert_allclose(weights[b], w, rtol=1e-5)
        if mode == "logit":
            want = sum(wk * zk for wk, zk in zip(w, logits[b]))
        else:
            mixed = sum(wk * pk for wk, pk in zip(w, p))
            want = math.log(mixed / (1 - mixed))
        assert float(fused[b]) == pytest.approx(want, rel=1e-4, abs=1e-5), b


def _numpy_rotary(vec, position, base):
    """RoFormer (Su et al. 2021) with the half-split pairing: channel i and i + Dh/2 rotate by
    position * base^(-2i/Dh)."""
    half = len(vec) // 2
    out = np.array(vec, np.float64)
    for i in range(half):
        angle = position * base ** (-2 * i / len(vec))
        out[i] = vec[i] * math.cos(angle) - vec[i + half] * math.sin(angle)
        out[i + half] = vec[i + half] * math.cos(angle) + vec[i] * math.sin(angle)
    return out


def test_attention_with_rotary_positions_and_key_mask():
    """softmax over the valid keys of <rot(q_h, m), rot(k_h, n)> / sqrt(Dh), times v_h, heads concatenated and
    projected; a query with no valid key gets only the output bias."""
    heads, head_dim, lq, lk, base = 2, 4, 3, 5, 100.0
    d = heads * head_dim
    rng = np.random.default_rng(3)
    queries = jnp.asarray(rng.normal(size=(2, lq, d)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(2, lk, d)), jnp.float32)
    mask = jnp.array([[True, False, True, True, False], [False] * lk])
    q_pos, k_pos = jnp.array([[7, 8, 9]] * 2), jnp.array([[0, 2, 3, 5, 6]] * 2)
    layer = MultiHeadAttention(num_heads=heads, rope_base=base)
    args = (queries, keys, mask, q_pos, k_pos)
    params = _random_params(layer, *args)
    p = _np(params["params"])
    got = layer.apply(params, *args)

    def project(x, name):  # [D] -> [H, Dh]
        kernel, bias = p[name]["kernel"], p[name]["bias"]
        return np.array([[sum(x[i] * kernel[i, h, j] for i in range(d)) + bias[h, j] for j in range(head_dim)]
                         for h in range(heads)])  # fmt: skip

    want = np.zeros((2, lq, d))
    for b in range(2):
        ks = [project(np.asarray(keys[b, n], np.float64), "key") for n in range(lk)]
        vs = [project(np.asarray(keys[b, n], np.float64), "value") for n in range(lk)]
        valid = [n for n in range(lk) if mask[b, n]]
        for m in range(lq):
            q = project(np.asarray(queries[b, m], np.float64), "query")
            mixed = np.zeros((heads, head_dim))
            for h in range(heads):
                qh = _numpy_rotary(q[h], int(q_pos[b, m]), base)
                scores = {n: float(qh @ _numpy_rotary(ks[n][h], int(k_pos[b, n]), base)) / math.sqrt(head_dim)
                          for n in valid}  # fmt: skip
                total = sum(math.exp(v) for v in scores.values())
                for n, score in scores.items():
                    mixed[h] += math.exp(score) / total * vs[n][h]
            for o in range(d):
                want[b, m, o] = p["out"]["bias"][o] + sum(
                    mixed[h, j] * p["out"]["kernel"][h, j, o] for h in range(heads) for j in range(head_dim)
                )
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("ensemble,rank", [("concat", None), ("sum", 2)])
def test_dhen_layer_is_layernorm_of_the_ensembled_modules_plus_the_input(ensemble, rank):
    """DHEN (Zhang et al. 2022): X' = LayerNorm(Ensemble(Dot(X), DCN(X)) + X) per token, with Dot(X) = the
    distinct pairwise dots mapped linearly to [T, D], DCN(X) = one cross layer on the flattened tokens (x0 = x),
    and the ensemble a per-token linear map of the concatenated outputs, or their sum."""
    t, d = 3, 4
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, t, d)), jnp.float32)
    layer = DHENLayer(modules=("dot", "dcn"), ensemble=ensemble, dcn_rank=rank)
    params = _random_params(layer, x)
    p = _np(params["params"])
    got = layer.apply(params, x)
    want = np.zeros((2, t, d))
    for b in range(2):
        tokens = np.asarray(x[b], np.float64)
        flat = tokens.reshape(-1)
        dots = [tokens[i] @ tokens[j] for i, j in itertools.combinations(range(t), 2)]
        dot_out = (_matvec(np.array(dots), p["dot"]["proj"]["kernel"]) + p["dot"]["proj"]["bias"]).reshape(t, d)
        cross = p["dcn"]["cross"]
        if rank is None:
            projected = _matvec(flat, cross["w"]["kernel"]) + cross["w"]["bias"]
        else:
            projected = _matvec(_matvec(flat, cross["v"]["kernel"]), cross["u"]["kernel"]) + cross["u"]["bias"]
        dcn_out = (flat * projected + flat).reshape(t, d)
        for i in range(t):
            if ensemble == "concat":
                mixed = _matvec(np.concatenate([dot_out[i], dcn_out[i]]), p["ensemble"]["kernel"]) + p["ensemble"]["bias"]
            else:
                mixed = dot_out[i] + dcn_out[i]
            y = mixed + tokens[i]
            mean, var = y.mean(), ((y - y.mean()) ** 2).mean()
            want[b, i] = (y - mean) / math.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
    np.testing.assert_allclose(got, want, **TOL)
