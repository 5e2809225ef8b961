"""DCNv2 (Wang et al. 2021, arXiv 2008.13535): explicit cross layers plus an MLP, stacked or parallel."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from ctr.models import registry
from ctr.model_io import ModelInputs
from ctr.models.heads import FeatureModel, logits_from
from ctr.models.layers import (
    MLP,
    CrossLayer,
    MixtureCrossLayer,
    activation_fn,
    flat_features,
)


@registry.register("dcnv2")
@gin.configurable
class DCNv2(FeatureModel):
    """DCNv2 over the concatenated embeddings and dense features: ``[B, ...] -> logits [B]``.

    Attributes:
      num_cross_layers: cross layers.
      cross_rank: None for full-rank cross layers, else the rank of the low-rank form (and of each expert).
      num_experts: 1 for plain cross layers; more for the mixture of low-rank experts (needs ``cross_rank``).
      mlp: hidden widths of the deep network.
      bottom_mlp: hidden widths of an MLP (activated throughout) that the dense features go through before
        they join the embeddings, as in MLPerf's DLRM-DCNv2 (512-256-128); empty: the raw dense features join.
      structure: ``"stacked"`` (cross -> MLP) or ``"parallel"`` (cross and MLP side by side, concatenated).
      activation: MLP (and expert) activation name.
      dropout: MLP dropout.
      pool_sequences: append the mean-pooled behaviour sequences to the input (BARS TaobaoAd protocol).
      dtype: compute dtype (``"bfloat16"`` for mixed precision; parameters stay float32).
    """

    num_cross_layers: int = 3
    cross_rank: int | None = None
    num_experts: int = 1
    mlp: Sequence[int] = (400, 400, 400)
    structure: str = "stacked"
    bottom_mlp: Sequence[int] = ()

    @nn.compact
    def __call__(self, inputs: ModelInputs, *, train: bool = False) -> jax.Array:
        if self.structure not in ("stacked", "parallel"):
            raise ValueError(f"DCNv2.structure must be 'stacked' or 'parallel', got {self.structure!r}")
        if self.num_experts > 1 and self.cross_rank is None:
            raise ValueError("DCNv2 with num_experts > 1 needs a cross_rank (the experts are low-rank)")
        dtype = jnp.dtype(self.dtype)
        act = activation_fn(self.activation)
        if self.bottom_mlp and inputs.dense is not None:
            bottom = MLP(self.bottom_mlp, act, dtype=dtype, name="bottom_mlp")(inputs.dense.astype(dtype))
            inputs = inputs.replace(dense=bottom)
        x0 = flat_features(inputs, self.pool_sequences).astype(dtype)
        x = x0
        for i in range(self.num_cross_layers):
            if self.num_experts > 1:
                layer = MixtureCrossLayer(self.cross_rank, self.num_experts, act, dtype=dtype, name=f"cross_{i}")
            else:
                layer = CrossLayer(rank=self.cross_rank, dtype=dtype, name=f"cross_{i}")
            x = layer(x0, x)
        deep = MLP(self.mlp, act, dropout=self.dropout, dtype=dtype, name="mlp")
        if self.structure == "stacked":
            h = deep(x, train=train)
        else:
            h = jnp.concatenate([x, deep(x0, train=train)], axis=-1)
        return logits_from(nn.Dense(1, dtype=dtype, name="logit")(h))
