"""Layers shared by the models.

Every layer takes a compute ``dtype``; parameters always stay float32 (mixed precision keeps f32 master weights),
and reductions that lose precision in bfloat16 (softmax, layer-norm statistics) run in float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctr.model_io import ModelInputs

Activation = Callable[[jax.Array], jax.Array]

_ACTIVATIONS: dict[str, Activation] = {
    "relu": nn.relu,
    "swish": nn.swish,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def activation_fn(name: str) -> Activation:
    """The activation called ``name`` (``relu``, ``swish``, ``gelu``, ``tanh``, ``identity``), for gin strings."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


_INITIALIZERS = ("lecun_normal", "lecun_uniform", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform")


def initializer(name: str) -> nn.initializers.Initializer:
    """The kernel initializer called ``name`` (one of ``_INITIALIZERS``), for gin strings."""
    if name not in _INITIALIZERS:
        raise ValueError(f"unknown kernel initializer {name!r}; known: {list(_INITIALIZERS)}")
    return getattr(nn.initializers, name)()


def activation_gain(activation: Activation) -> float:
    """``1 / E[activation(z)^2]`` for ``z ~ N(0, 1)`` (Gauss-Hermite quadrature): the kernel variance factor
    that keeps a unit-scale signal at unit scale through a layer and its activation (2 for ReLU, as He et al.;
    2.81 for swish)."""
    z, w = np.polynomial.hermite_e.hermegauss(80)
    with jax.ensure_compile_time_eval():  # a constant, also when called while a model is traced
        values = np.asarray(activation(jnp.asarray(z, jnp.float32)), np.float64)
    return float(1.0 / (values**2 @ (w / w.sum())))


class MLP(nn.Module):
    """Dense layers of widths ``hidden`` with ``activation`` (and optional dropout) between them.

    Attributes:
      hidden: output width of each layer; the last layer has no activation when ``activate_last`` is False.
      activation: nonlinearity.
      dropout: dropout rate after each hidden activation (training only).
      activate_last: apply the activation (and dropout) after the last layer too.
      gain_init: start every layer that feeds an activation with kernel variance ``activation_gain / fan_in``
        instead of LeCun's ``1 / fan_in``, so the signal (and the gradient back to the inputs) keeps its scale
        through deep stacks: at LeCun init each swish layer shrinks it ~1.7x.
      kernel_init: the kernels' initializer where ``gain_init`` does not apply, by its
        ``flax.linen.initializers`` name (Keras's ``Dense`` default is ``"glorot_uniform"``).
      dtype: compute dtype (parameters stay float32).
    """

    hidden: Sequence[int]
    activation: Activation = nn.relu
    dropout: float = 0.0
    activate_last: bool = True
    gain_init: bool = False
    kernel_init: str = "lecun_normal"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for i, width in enumerate(self.hidden):
            activated = i < len(self.hidden) - 1 or self.activate_last
            init = initializer(self.kernel_init)
            if self.gain_init and activated:
                init = nn.initializers.variance_scaling(activation_gain(self.activation), "fan_in", "truncated_normal")
            x = nn.Dense(width, dtype=self.dtype, kernel_init=init, name=f"dense_{i}")(x)
            if activated:
                x = self.activation(x)
                if self.dropout:
                    x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x


class CrossLayer(nn.Module):
    """One DCNv2 cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l`` over ``[..., d]``.

    ``W`` is full rank ``[d, d]`` when ``rank`` is None, else the low-rank product ``U V^T`` with
    ``U, V: [d, rank]``.
    """

    rank: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if self.rank is None:
            projected = nn.Dense(d, dtype=self.dtype, name="w")(x)
        else:
            low = nn.Dense(self.rank, use_bias=False, dtype=self.dtype, name="v")(x)
            projected = nn.Dense(d, dtype=self.dtype, name="u")(low)
        return x0 * projected + x


class MixtureCrossLayer(nn.Module):
    """DCNv2's mixture of low-rank cross experts (DCN-Mix) over ``[B, d]``.

    ``x_{l+1} = sum_i G_i(x_l) * x0 * (U_i g(C_i g(V_i^T x_l)) + b_i) + x_l``, with gates ``G = softmax(x_l W_g)``
    over the experts; ``U_i, V_i: [d, rank]``, ``C_i: [rank, rank]``.
    """

    rank: int
    num_experts: int
    activation: Activation = nn.relu
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
        d, e, r = x.shape[-1], self.num_experts, self.rank
        init = nn.initializers.lecun_normal(batch_axis=(0,))  # fan-in per expert, not over all experts
        v = self.param("v", init, (e, d, r)).astype(self.dtype)
        c = self.param("c", init, (e, r, r)).astype(self.dtype)
        u = self.param("u", init, (e, r, d)).astype(self.dtype)
        b = self.param("b", nn.initializers.zeros, (e, d)).astype(self.dtype)
        g = self.activation
        h = g(jnp.einsum("bd,edr->ber", x, v))
        h = g(jnp.einsum("ber,ers->bes", h, c))
        experts = x0[:, None, :] * (jnp.einsum("ber,erd->bed", h, u) + b)  # [B, E, d]
        gates = nn.softmax(nn.Dense(e, dtype=self.dtype, name="gate")(x).astype(jnp.float32), axis=-1)
        return jnp.einsum("be,bed->bd", gates.astype(self.dtype), experts) + x


def masked_mean(sequence: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B, L, D], [B, L] -> [B, D]``: mean over real events; zeros for an empty sequence."""
    m = mask.astype(sequence.dtype)[..., None]
    return (sequence * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)


def pooled_sequences(inputs: ModelInputs) -> list[jax.Array]:
    """Each sequence mean-pooled over its real events, ``[B, D]`` each, in ``inputs.sequences`` order.

    This is the early summarisation non-sequential models (DCNv2, DLRM, DHEN) use for behaviour sequences, as in
    the BARS TaobaoAd protocol.
    """
    return [masked_mean(seq, inputs.masks[name]) for name, seq in inputs.sequences.items()]


def flat_features(inputs: ModelInputs, pool_sequences: bool) -> jax.Array:
    """``[B, sum(D_f) + n_dense (+ sum(D_s))]``: :meth:`ModelInputs.flat`, plus the mean-pooled sequences."""
    x = inputs.flat()
    if pool_sequences and inputs.sequences:
        x = jnp.concatenate([x, *(p.astype(x.dtype) for p in pooled_sequences(inputs))], axis=-1)
    return x


def width_map(width: int, dim: int) -> np.ndarray:
    """``[width, dim]`` 0/1 matrix that carries a ``width``-wide vector into ``dim``: the identity when the widths
    agree, the vector tiled when ``dim`` is wider, its ``dim``-wide blocks summed when it is narrower.

    As an initial projection it keeps embeddings comparable: two features that read one table (``cate_his`` and
    ``cate_id``) start as the same token, which independent random projections would not give.
    """
    m = np.zeros((width, dim), np.float32)
    m[np.arange(dim) % width, np.arange(dim)] = 1.0  # tile (and the identity part)
    m[np.arange(width), np.arange(width) % dim] = 1.0  # fold
    return m


def width_map_init(*widths: int) -> nn.initializers.Initializer:
    """Kernel initializer ``[sum(widths), dim]``: the stacked ``width_map``s of concatenated inputs (their
    mapped sum)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        if shape[0] != sum(widths):
            raise ValueError(f"width_map_init{widths}: kernel rows {shape[0]} != {sum(widths)}")
        return jnp.asarray(np.concatenate([width_map(w, shape[1]) for w in widths]), dtype)

    return init


class FeatureTokens(nn.Module):
    """The non-sequence features as tokens ``[B, T, dim]`` of one common width.

    Token order: the dense token (when the dataset has dense features), then one token per categorical feature
    (schema order), then one per mean-pooled sequence (when ``pool_sequences``). A categorical embedding whose
    width differs from ``dim`` is linearly projected to ``dim`` (per feature); the dense vector becomes one token
    through ``dense_hidden`` layers and a final layer of width ``dim`` (linear when ``dense_hidden`` is empty;
    DLRM's bottom MLP otherwise, activated throughout).

    Attributes:
      dim: token width.
      dense_hidden: hidden widths of the dense features' bottom MLP.
      pool_sequences: append the mean-pooled sequences as tokens.
      activation: bottom-MLP activation.
      bottom_init: the kernel initializer of the dense features' layers (``MLP.kernel_init``).
      aligned_projections: start every width-changing projection as ``width_map`` (the same map for every
        feature) rather than random, so that features reading one table start as the same token; InterFormer
        needs it to compare the target item with the events (see ``InterFormer``).
      normalize: layer-normalise every token (one shared scale and bias). Embeddings start at ~0.05 while a
        dense token (e.g. TaobaoAds' log price, ~4) starts ~100x larger; without it, models whose layers mix
        tokens learn mostly from the dense token (DHEN on synthetic TaobaoAds trains far worse without it:
        benchmarks/RESULTS.md, "Models on synthetic TaobaoAds").
      dtype: compute dtype.
    """

    dim: int
    dense_hidden: Sequence[int] = ()
    pool_sequences: bool = False
    activation: Activation = nn.relu
    bottom_init: str = "lecun_normal"
    aligned_projections: bool = False
    normalize: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: ModelInputs) -> jax.Array:
        tokens = []
        if inputs.dense is not None:
            dense = inputs.dense.astype(self.dtype)
            if self.dense_hidden:
                bottom = MLP((*self.dense_hidden, self.dim), self.activation, kernel_init=self.bottom_init,
                             dtype=self.dtype, name="bottom_mlp")  # fmt: skip
                tokens.append(bottom(dense))
            else:
                init = initializer(self.bottom_init)
                proj = nn.Dense(self.dim, dtype=self.dtype, kernel_init=init, name="dense_proj")
                tokens.append(proj(dense))
        named = dict(inputs.features)
        if self.pool_sequences:
            named.update({f"pooled_{name}": p for name, p in zip(inputs.sequences, pooled_sequences(inputs))})
        for name, x in named.items():
            x = x.astype(self.dtype)
            if x.shape[-1] != self.dim:
                init = width_map_init(x.shape[-1]) if self.aligned_projections else nn.initializers.lecun_normal()
                x = nn.Dense(self.dim, use_bias=False, kernel_init=init, dtype=self.dtype, name=f"proj_{name}")(x)
            tokens.append(x)
        tokens = jnp.stack(tokens, axis=1)
        if self.normalize:
            tokens = nn.LayerNorm(dtype=self.dtype, name="token_norm")(tokens)
        return tokens


def pairwise_dots(tokens: jax.Array) -> jax.Array:
    """``[B, T, D] -> [B, T(T-1)/2]``: the dot products of distinct token pairs (strict upper triangle)."""
    t = tokens.shape[1]
    gram = jnp.einsum("btd,bsd->bts", tokens, tokens)
    rows, cols = np.triu_indices(t, k=1)
    return gram[:, rows, cols]


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (RoFormer) of ``x: [B, L, H, Dh]`` at ``positions: [B or 1, L]``.

    Channel pairs ``(i, i + Dh/2)`` rotate by ``position * base^(-2i/Dh)``, so query-key dot products depend on
    the positions only through their difference. ``Dh`` must be even.
    """
    half = x.shape[-1] // 2
    if 2 * half != x.shape[-1]:
        raise ValueError(f"rotary embeddings need an even head width, got {x.shape[-1]}")
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [B|1, L, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention of ``queries [B, Lq, D]`` over ``keys_values [B, Lk, D]``.

    Keys where ``key_mask`` is False get no weight, so padding never reaches the output; a query with no valid key
    at all gets a zero output. Rotary position embeddings are applied to queries and keys when positions are given.

    Attributes:
      num_heads: heads; ``D`` must be divisible by it.
      rope_base: rotary frequency base.
      identity_values: start the value and output projections as the identity, so the layer starts as a
        (query-weighted) mean of its inputs, in their own space, rather than of random projections of them.
      identity_queries_keys: start the query and key projections as the identity too, so the first attention
        logits are the per-head dot products of queries and keys: a query attends most to the keys most like it
        (target attention) from the first step, rather than by random bilinear forms.
      dtype: compute dtype (the softmax runs in float32).
    """

    num_heads: int
    rope_base: float = 10000.0
    identity_values: bool = False
    identity_queries_keys: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        queries: jax.Array,
        keys_values: jax.Array,
        key_mask: jax.Array | None = None,
        query_positions: jax.Array | None = None,
        key_positions: jax.Array | None = None,
    ) -> jax.Array:
        d = queries.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by {self.num_heads} heads")
        head_dim = d // self.num_heads

        identity = _identity_init if self.identity_values else nn.initializers.lecun_normal()

        def project(x: jax.Array, name: str, init: nn.initializers.Initializer) -> jax.Array:
            return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, kernel_init=init, name=name)(x)

        qk = _identity_init if self.identity_queries_keys else nn.initializers.lecun_normal()
        q, k = project(queries, "query", qk), project(keys_values, "key", qk)
        v = project(keys_values, "value", identity)
        if query_positions is not None:
            q = rotary(q, query_positions, self.rope_base)
        if key_positions is not None:
            k = rotary(k, key_positions, self.rope_base)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        if key_mask is not None:
            valid = key_mask[:, None, None, :]
            logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
            weights = nn.softmax(logits, axis=-1) * valid.any(axis=-1, keepdims=True)
        else:
            weights = nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=identity, name="out")(out)


def _identity_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The identity map as a ``[D, H, Dh]`` (value) or ``[H, Dh, D]`` (output) kernel, ``H * Dh = D``."""
    d = math.isqrt(math.prod(shape))
    return jnp.eye(d, dtype=dtype).reshape(shape)


class PoolingByAttention(nn.Module):
    """PMA (Set Transformer): ``num_queries`` learnable queries attend over a sequence ``[B, L, D] -> [B, k, D]``.

    Attributes:
      num_queries: summary tokens (seed vectors).
      num_heads: attention heads.
      dtype: compute dtype.
    """

    num_queries: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sequence: jax.Array, mask: jax.Array) -> jax.Array:
        seeds = self.param("queries", nn.initializers.normal(1.0), (self.num_queries, sequence.shape[-1]))
        queries = jnp.broadcast_to(seeds.astype(self.dtype), (sequence.shape[0], *seeds.shape))
        # Identity values: PMA starts as a weighted mean of the sequence, in the sequence's own space.
        attention = MultiHeadAttention(self.num_heads, identity_values=True, dtype=self.dtype, name="attention")
        return attention(queries, sequence, mask)


class SelfGating(nn.Module):
    """Self-gating of tokens ``[B, T, D] -> [B, T, D]``; the gate MLP sees all tokens flattened.

    ``form="paper"`` is InterFormer's equation, ``sigmoid(X * MLP(X))`` (outputs in (0, 1)). The MLP's output
    bias starts at one, so the gate starts as ``sigmoid(X + ...)``, monotone in ``X``: with a zero bias it would
    start as ``sigmoid`` of products of features, which loses their signs, and in our runs InterFormer then did not
    learn to match a target item against its history at all. Even with that bias, on synthetic TaobaoAds (15
    features, 3 sequences) an InterFormer with the paper's form stays at the base rate, while ``form="glu"``, the
    usual gated unit ``X * sigmoid(MLP(X))``, which keeps the sign and scale of ``X``, trains
    (benchmarks/RESULTS.md, "Models on synthetic TaobaoAds"): InterFormer defaults to ``"glu"``.

    Attributes:
      form: ``"paper"`` or ``"glu"``.
      hidden: hidden widths of the gate MLP (its output layer, of width ``T*D``, is added).
      activation: hidden activation.
      dtype: compute dtype.
    """

    form: str = "paper"
    hidden: Sequence[int] = ()
    activation: Activation = nn.swish
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.form not in ("paper", "glu"):
            raise ValueError(f"gating form must be 'paper' or 'glu', got {self.form!r}")
        b, t, d = x.shape
        flat = x.reshape(b, t * d)
        h = MLP(self.hidden, self.activation, dtype=self.dtype, name="mlp")(flat) if self.hidden else flat
        bias_init = nn.initializers.ones if self.form == "paper" else nn.initializers.zeros
        gate = nn.Dense(t * d, dtype=self.dtype, bias_init=bias_init, name="gate")(h)
        out = nn.sigmoid(flat * gate) if self.form == "paper" else flat * nn.sigmoid(gate)
        return out.reshape(b, t, d)
