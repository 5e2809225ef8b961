"""DLRM (Naumov et al. 2019, arXiv 1906.00091): bottom MLP, pairwise dot interaction, top MLP."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from ctr.models import registry
from ctr.model_io import ModelInputs
from ctr.models.heads import FeatureModel, mlp_logits
from ctr.models.layers import FeatureTokens, activation_fn, pairwise_dots


@registry.register("dlrm")
@gin.configurable
class DLRM(FeatureModel):
    """DLRM: ``logit = top_mlp([bottom_mlp(dense) || <e_i, e_j> for i < j])``.

    The dense features go through the bottom MLP to one vector of width ``dim``; it and the categorical
    embeddings (each projected to ``dim`` when its width differs) interact through the dot products of all
    distinct pairs. Without dense features the top MLP sees only the pairwise dots.

    Attributes:
      dim: interaction width (the embedding width; the bottom MLP's output width).
      bottom_mlp: hidden widths of the bottom MLP (its final layer, of width ``dim``, is added).
      top_mlp: hidden widths of the top MLP (its final layer, of width 1, is added).
      kernel_init: both MLPs' kernel initializer (``MLP.kernel_init``).
      activation: activation name.
      dropout: top-MLP dropout.
      pool_sequences: add each behaviour sequence, mean-pooled, as one more interacting vector.
      dtype: compute dtype (``"bfloat16"`` for mixed precision; parameters stay float32).
    """

    dim: int = 16
    bottom_mlp: Sequence[int] = (512, 256)
    top_mlp: Sequence[int] = (512, 256)
    kernel_init: str = "lecun_normal"

    @nn.compact
    def __call__(self, inputs: ModelInputs, *, train: bool = False) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        act = activation_fn(self.activation)
        tokens = FeatureTokens(
            self.dim, tuple(self.bottom_mlp), self.pool_sequences, act, bottom_init=self.kernel_init, dtype=dtype,
            name="tokens",
        )(inputs)
        parts = [pairwise_dots(tokens)]
        if inputs.dense is not None:
            parts.insert(0, tokens[:, 0])  # the bottom MLP's output is token 0
        return mlp_logits(jnp.concatenate(parts, axis=-1), self.top_mlp, act, dropout=self.dropout, dtype=dtype,
                          name="top_mlp", train=train, kernel_init=self.kernel_init)  # fmt: skip
