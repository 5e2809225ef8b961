"""The contract between embeddings and models: what a model receives and what it returns.

An embedding collection's ``combine`` produces :class:`ModelInputs`; a registered model (a :class:`Network`)
maps them to outputs, and says itself how its outputs are trained (:meth:`Network.loss`) and which of them
are the predicted logits (:meth:`Network.logits`). Plain models return ``[B]`` logits and inherit both from
:class:`BinaryLogits`; an ensemble returns a dict and defines its own. This module sits below ``embeddings/``
and ``ctr/models/`` (Bazel ``//ctr:model_io``), so neither imports the other.
"""
from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class ModelInputs:
    """One batch, embedded.

    Attributes:
      features: categorical feature name -> ``[B, D_f]`` embedding, in schema order.
      dense: ``[B, n_dense]`` float inputs, or None when the dataset has none.
      sequences: sequence name -> ``[B, L, D]`` embedded events (most recent last).
      masks: sequence name -> ``[B, L]`` bool, True for real events, False for padding.
      towers: per-tower inputs of an ensemble whose towers own their embedding tables (CETNet), by tower name;
        None when every tower shares the top-level fields. When set, an ensemble reads only ``towers[name]``.
    """

    features: dict[str, jax.Array]
    dense: jax.Array | None
    sequences: dict[str, jax.Array]
    masks: dict[str, jax.Array]
    towers: dict[str, ModelInputs] | None = None

    @property
    def batch_size(self) -> int:
        if not self.features and self.towers:
            return next(iter(self.towers.values())).batch_size
        return next(iter(self.features.values())).shape[0]

    def flat(self) -> jax.Array:
        """``[B, sum(D_f) + n_dense]``: all categorical embeddings then the dense features."""
        parts = list(self.features.values())
        if self.dense is not None:
            parts.append(self.dense.astype(parts[0].dtype))
        return jnp.concatenate(parts, axis=-1)


class Network(Protocol):
    """A registered model (a Flax module, built by :func:`ctr.models.get` with its gin bindings)."""

    def __call__(self, inputs: ModelInputs, *, train: bool) -> Any:
        """The model's outputs for one batch: ``[B]`` logits, or whatever :meth:`loss` and :meth:`logits` read."""

    def loss(self, outputs: Any, labels: jax.Array) -> jax.Array:
        """The scalar training loss (mean over the batch) of ``outputs`` against ``[B]`` 0/1 float ``labels``.

        Called on the unbound module the trainer built, inside its differentiated function.
        """

    def logits(self, outputs: Any) -> jax.Array:
        """The ``[B]`` predicted logits (log-odds of a click) in ``outputs``: what evaluation scores."""

    # Optional, for an ensemble: ``parts(outputs) -> {name: (logits [B], weight [B])}``, each member's own
    # prediction and its weight in the fused one. Evaluation then also reports each member's metrics and mean
    # weight (``ctr.evaluator``).


class BinaryLogits:
    """The :class:`Network` contract of a model whose output is its ``[B]`` logits: mean binary cross-entropy."""

    def loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs, labels))

    def logits(self, outputs: jax.Array) -> jax.Array:
        return outputs
