"""CETNet (Liu et al. 2024, arXiv 2411.13700): a collaborative ensemble of distinct towers with confidence fusion.

Towers are registered models, each with its own embedding tables: when ``inputs.towers`` is set (a per-tower
embedding collection produced it), tower ``name`` reads ``inputs.towers[name]``; otherwise every tower shares
``inputs`` (one set of tables, distinct interaction networks). Each tower is built and run inside the gin scope
of its name, so ``<tower name>/InterFormer.num_layers = 3`` configures one tower without touching the others.

Fusion (the paper's "general softmax" over negation entropy): a tower's confidence on an example is
``c = -H(p) = p log p + (1-p) log(1-p)`` of its predicted probability ``p``; the fusion weights are
``w = softmax(c / temperature)`` over the towers, per example; the fused probability is ``sum_i w_i p_i``.

Collaborative learning: ``loss = BCE(fused, y) + sum_i BCE(p_i, y) + lambda * sum_i BCE(p_i, stop_grad(fused))``:
every tower learns from the labels and from the ensemble's prediction.

What the paper leaves open is a gin switch here: the temperature (value, fixed or learned), fusion of
probabilities or of logits, whether the confidences pass gradients to the towers, and lambda.

Not in the paper: a learned per-tower prior (``learn_prior``), a log-weight added to every example's confidence.
At a CTR of a few percent the towers' confidences barely differ, so the paper's weights stay near a plain
average, and an average falls below the better tower when the other is far enough behind. The prior lets the
fusion lean on the tower whose predictions fit the labels better.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from ctr.models import registry
from ctr.model_io import ModelInputs


def confidence(logits: jax.Array) -> jax.Array:
    """Negated binary entropy of ``sigmoid(logits)``: 0 for a certain prediction, ``-log 2`` at ``p = 1/2``."""
    p = jax.nn.sigmoid(logits)
    return p * jax.nn.log_sigmoid(logits) + (1 - p) * jax.nn.log_sigmoid(-logits)


def fuse(
    tower_logits: jax.Array,
    temperature: jax.Array | float,
    mode: str,
    detach_confidence: bool = False,
    prior: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Confidence-weighted fusion of ``tower_logits [B, K]``.

    Args:
      tower_logits: one logit per example and tower.
      temperature: softmax temperature (> 0); lower sharpens the weights toward the most confident tower.
      mode: ``"probability"`` (fused ``p = sum w_i sigmoid(z_i)``) or ``"logit"`` (fused ``z = sum w_i z_i``).
      detach_confidence: no gradient through the weights' dependence on the towers.
      prior: ``[K]`` per-tower log-weights added to every example's ``c / temperature`` (none: zeros).

    Returns:
      The fused logit ``[B]`` and the fusion weights ``[B, K]`` (each row sums to one).
    """
    conf = confidence(jax.lax.stop_gradient(tower_logits) if detach_confidence else tower_logits)
    scores = conf / temperature
    log_w = jax.nn.log_softmax(scores if prior is None else scores + prior, axis=-1)
    weights = jnp.exp(log_w)
    if mode == "logit":
        return (weights * tower_logits).sum(-1), weights
    if mode != "probability":
        raise ValueError(f"CETNet fusion must be 'probability' or 'logit', got {mode!r}")
    # log p and log(1 - p) of the mixture, in log space so the logit stays finite for confident towers.
    log_p = jax.nn.logsumexp(log_w + jax.nn.log_sigmoid(tower_logits), axis=-1)
    log_q = jax.nn.logsumexp(log_w + jax.nn.log_sigmoid(-tower_logits), axis=-1)
    return log_p - log_q, weights


@registry.register("cetnet")
@gin.configurable
class CETNet(nn.Module):
    """Collaborative ensemble: ``ModelInputs -> {"logits": [B], "tower_logits": {name: [B]}, "weights": [B, K]}``.

    ``logits`` is the fused prediction as a logit; ``weights[:, i]`` is the fusion weight of the ``i``-th tower
    of ``towers``. Train with :meth:`loss`.

    Attributes:
      towers: ``(tower name, registered model name)`` pairs; the name keys ``inputs.towers``, the gin scope and
        the parameter subtree.
      temperature: fusion softmax temperature (the initial value when learned).
      learn_temperature: learn the temperature (as a log-temperature parameter).
      fusion: ``"probability"`` or ``"logit"`` (see :func:`fuse`).
      detach_confidence: stop gradients through the fusion weights, so towers are not rewarded for confidence.
      collab_weight: lambda, the weight of the towers' fit to the (stop-gradient) fused prediction.
      learn_prior: learn a per-tower log-weight added to the confidences (see :func:`fuse`), so the fusion can
        lean on the tower that predicts better overall, not only on the one that is more confident on an
        example. Its only gradient is the fused prediction's loss, and in a one-pass run each batch is unseen
        when it is scored, so it follows the mixture weights that do best on new data.
      prior_scale: the prior is ``prior_scale * theta`` with ``theta`` the trained parameter. Adam moves a
        parameter by about its learning rate per step whatever the gradient's size, so at the dense rate a
        one-pass run of a few hundred steps could move the prior by ~0.2 at most; the scale lets it reach the
        weights the data supports within the run.
      dtype: compute dtype given to every tower (``"bfloat16"`` for mixed precision).
    """

    towers: Sequence[tuple[str, str]] = (("interformer", "interformer"), ("dhen", "dhen"))
    temperature: float = 1.0
    learn_temperature: bool = False
    fusion: str = "probability"
    detach_confidence: bool = False
    collab_weight: float = 1.0
    learn_prior: bool = False
    prior_scale: float = 20.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: ModelInputs, *, train: bool = False) -> dict[str, Any]:
        names = [name for name, _ in self.towers]
        if len(set(names)) != len(names):
            raise ValueError(f"CETNet tower names must be distinct, got {names}")
        tower_logits = {}
        for name, model_name in self.towers:
            tower_inputs = inputs.towers[name] if inputs.towers is not None else inputs
            with gin.config_scope(name):
                tower = registry.get(model_name)(dtype=self.dtype, name=name)
                tower_logits[name] = tower.logits(tower(tower_inputs, train=train)).astype(jnp.float32)
        stacked = jnp.stack([tower_logits[n] for n in names], axis=-1)
        if self.learn_temperature:
            log_t = self.param("log_temperature", nn.initializers.constant(jnp.log(self.temperature)), ())
            temperature = jnp.exp(log_t)
        else:
            temperature = self.temperature
        prior = None
        if self.learn_prior:
            prior = self.prior_scale * self.param("tower_prior", nn.initializers.zeros, (len(names),))
        fused, weights = fuse(stacked, temperature, self.fusion, self.detach_confidence, prior)
        return {"logits": fused, "tower_logits": tower_logits, "weights": weights}

    def logits(self, outputs: dict[str, Any]) -> jax.Array:
        """The fused ``[B]`` logits (what evaluation scores)."""
        return outputs["logits"]

    def parts(self, outputs: dict[str, Any]) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Each tower's ``[B]`` logits and ``[B]`` fusion weight (reported by evaluation per tower)."""
        return {name: (outputs["tower_logits"][name], outputs["weights"][:, i])
                for i, (name, _) in enumerate(self.towers)}  # fmt: skip

    def loss(self, outputs: dict[str, Any], labels: jax.Array) -> jax.Array:
        """Mean over the batch of ``BCE(fused) + sum_i BCE(tower_i) + lambda * sum_i BCE(tower_i, sg(fused))``.

        Args:
          outputs: what ``__call__`` returned.
          labels: ``[B]`` 0/1 labels.
        """
        labels = labels.astype(jnp.float32)
        target = jax.lax.stop_gradient(jax.nn.sigmoid(outputs["logits"]))
        total = optax.sigmoid_binary_cross_entropy(outputs["logits"], labels)
        for logits in outputs["tower_logits"].values():
            total += optax.sigmoid_binary_cross_entropy(logits, labels)
            total += self.collab_weight * optax.sigmoid_binary_cross_entropy(logits, target)
        return total.mean()
