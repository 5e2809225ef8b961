"""What the single-network models share: their common fields and their logit head."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctr.model_io import BinaryLogits
from ctr.models.layers import MLP, Activation


class FeatureModel(BinaryLogits, nn.Module):
    """The fields every single-network model (DCNv2, DLRM, DHEN) shares, gin-bound on the subclass.

    Attributes:
      activation: activation name (see :func:`activation_fn`).
      dropout: dropout of the deep or head MLP.
      pool_sequences: use each behaviour sequence, mean-pooled, as one more feature.
      dtype: compute dtype (``"bfloat16"`` for mixed precision; parameters stay float32).
    """

    activation: str = "relu"
    dropout: float = 0.0
    pool_sequences: bool = True
    dtype: Any = jnp.float32


def logits_from(head_output: jax.Array) -> jax.Array:
    """A head's ``[B, 1]`` output as ``[B]`` float32 logits (the loss and the metrics run in float32)."""
    return head_output[..., 0].astype(jnp.float32)


def mlp_logits(
    x: jax.Array, hidden: Sequence[int], activation: Activation, *, dropout: float, dtype: Any, name: str, train: bool,
    gain_init: bool = False, kernel_init: str = "lecun_normal",
) -> jax.Array:
    """The logit head of DLRM, DHEN and InterFormer: ``[B, F] -> [B]`` float32 logits through an :class:`MLP`
    of widths ``(*hidden, 1)``, the last layer without activation. Call inside the model's compact method."""
    head = MLP((*hidden, 1), activation, dropout=dropout, activate_last=False, gain_init=gain_init,
               kernel_init=kernel_init, dtype=dtype, name=name)  # fmt: skip
    return logits_from(head(x, train=train))
