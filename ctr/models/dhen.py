"""DHEN (Zhang et al. 2022, arXiv 2203.11014): a deep hierarchical ensemble of interaction modules.

Each layer runs several interaction modules side by side on the same tokens, ensembles their outputs and adds a
shortcut: ``X_{l+1} = LayerNorm(Ensemble_i(Interaction_i(X_l)) + X_l)``. Stacking layers builds interactions of
interactions (the hierarchy). :class:`DHENStack` works on a token representation ``[B, T, D]`` and keeps its shape, so
InterFormer uses it as its interaction module; :class:`DHENModel` is the stand-alone CTR model.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from ctr.models import registry
from ctr.model_io import ModelInputs
from ctr.models.heads import FeatureModel, mlp_logits
from ctr.models.layers import (
    CrossLayer,
    FeatureTokens,
    MultiHeadAttention,
    activation_fn,
    pairwise_dots,
)

MODULES = ("dot", "dcn", "attention")


class DotModule(nn.Module):
    """Dot-product interaction: the distinct pairwise dots ``[B, T(T-1)/2]`` mapped linearly back to ``[B, T, D]``."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        return nn.Dense(t * d, dtype=self.dtype, name="proj")(pairwise_dots(x)).reshape(b, t, d)


class DCNModule(nn.Module):
    """One DCNv2 cross layer on the flattened tokens, ``x0 = x`` (the layer input): ``[B, T, D] -> [B, T, D]``."""

    rank: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        flat = x.reshape(b, t * d)
        return CrossLayer(self.rank, dtype=self.dtype, name="cross")(flat, flat).reshape(b, t, d)


class AttentionModule(nn.Module):
    """Self-attention across the tokens (no positions: the tokens are fields, not a sequence)."""

    num_heads: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attention")(x, x)


class DHENLayer(nn.Module):
    """One DHEN layer on ``[B, T, D]``.

    Attributes:
      modules: interaction modules, from ``dot``, ``dcn``, ``attention``.
      ensemble: ``concat`` (module outputs concatenated per token, then a linear map back to ``D``) or ``sum``.
      dcn_rank: rank of the DCN module's cross layer (None: full rank ``[TD, TD]``).
      num_heads: heads of the attention module.
      dtype: compute dtype.
    """

    modules: Sequence[str] = ("dot", "dcn")
    ensemble: str = "concat"
    dcn_rank: int | None = 32
    num_heads: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        outputs = []
        for name in self.modules:
            if name == "dot":
                outputs.append(DotModule(dtype=self.dtype, name="dot")(x))
            elif name == "dcn":
                outputs.append(DCNModule(self.dcn_rank, dtype=self.dtype, name="dcn")(x))
            elif name == "attention":
                outputs.append(AttentionModule(self.num_heads, dtype=self.dtype, name="attention")(x))
            else:
                raise ValueError(f"unknown DHEN module {name!r}; known: {MODULES}")
        if self.ensemble == "concat":
            mixed = nn.Dense(x.shape[-1], dtype=self.dtype, name="ensemble")(jnp.concatenate(outputs, axis=-1))
        elif self.ensemble == "sum":
            mixed = sum(outputs)
        else:
            raise ValueError(f"DHENStack.ensemble must be 'concat' or 'sum', got {self.ensemble!r}")
        return nn.LayerNorm(dtype=self.dtype, name="norm")(mixed + x)


@gin.configurable
class DHENStack(nn.Module):
    """A stack of :class:`DHENLayer`: ``[B, T, D] -> [B, T, D]``. Gin-configurable, so the same bindings shape the
    stand-alone model and InterFormer's interaction arch (use gin scopes to tell them apart).

    Attributes:
      num_layers: DHEN layers.
      modules, ensemble, dcn_rank, num_heads: see :class:`DHENLayer`.
      dtype: compute dtype.
    """

    num_layers: int = 2
    modules: Sequence[str] = ("dot", "dcn")
    ensemble: str = "concat"
    dcn_rank: int | None = 32
    num_heads: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        x = x.astype(dtype)
        for i in range(self.num_layers):
            x = DHENLayer(
                tuple(self.modules), self.ensemble, self.dcn_rank, self.num_heads, dtype=dtype, name=f"layer_{i}"
            )(x)
        return x


@registry.register("dhen")
@gin.configurable
class DHENModel(FeatureModel):
    """DHEN as a CTR model: feature tokens -> :class:`DHENStack` -> flattened -> MLP head -> logits ``[B]``.

    Attributes:
      dim: token width (embeddings of another width are projected).
      num_layers: DHEN layers (the rest of the stack is bound on :class:`DHENStack`).
      head: hidden widths of the head MLP.
      activation: head activation name.
      dropout: head dropout.
      pool_sequences: add each behaviour sequence, mean-pooled, as a token.
      token_norm: layer-normalise the feature tokens (see ``FeatureTokens.normalize``).
      aligned_init: start the projections of embeddings narrower or wider than ``dim`` as ``width_map`` (see
        ``FeatureTokens.aligned_projections``), so an item and its pooled history start as comparable tokens
        (higher test AUC than random maps on synthetic TaobaoAds: benchmarks/RESULTS.md, "Models on synthetic
        TaobaoAds").
      dtype: compute dtype (``"bfloat16"`` for mixed precision; parameters stay float32).
    """

    dim: int = 16
    num_layers: int = 2
    head: Sequence[int] = (512, 256)
    token_norm: bool = True
    aligned_init: bool = True

    @nn.compact
    def __call__(self, inputs: ModelInputs, *, train: bool = False) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        act = activation_fn(self.activation)
        tokens = FeatureTokens(
            self.dim, pool_sequences=self.pool_sequences, aligned_projections=self.aligned_init,
            normalize=self.token_norm, dtype=dtype, name="tokens",
        )(inputs)
        x = DHENStack(num_layers=self.num_layers, dtype=dtype, name="dhen")(tokens)
        return mlp_logits(x.reshape(x.shape[0], -1), self.head, act, dropout=self.dropout, dtype=dtype, name="head",
                          train=train)  # fmt: skip
