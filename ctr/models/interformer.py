"""InterFormer (Zeng et al. 2024, arXiv 2411.09852): interleaved learning of non-sequence and sequence features.

Shapes: ``B`` batch, ``n`` non-sequence tokens, ``L`` events, ``d`` token width, ``C`` CLS tokens (the
non-sequence summary width), ``P`` PMA tokens, ``K`` recent tokens.

Preprocessing (paper §4.1). Non-sequence features become tokens ``X [B, n, d]`` (the dense features through one
linear map, each categorical embedding projected to ``d`` when its width differs). The behaviour sequences
(each layer-normalised first, ``sequence_norm``) are merged into one ``S [B, L, d]`` as the paper does with
MaskNet: the sequences are concatenated per position (feature axis; shorter ones left-padded so the most
recent events line up), then
``MaskNet(S) = MLP_lce(S * MLP_mask(S))`` compresses them to ``d``. A position is real when any sequence has an
event there.

Block ``l`` (paper §4.2-4.4 and Algorithm 1):

- Cross Arch: ``X_sum = Gating(MLP(X))  [B, C, d]`` (:class:`NonSequenceSummary`) and
  ``S_sum = Gating([S_CLS || PMA(S) || S_recent || S_target])  [B, C+P+K+n, d]`` (:class:`SequenceSummary`;
  ``S_target``, each non-sequence token attending over the events, is our addition, ``target_attention``), with
  ``Gating(Z) = sigmoid(Z * MLP(Z))`` as in the paper, or (the default, ``gating="glu"``) ``Z * sigmoid(MLP(Z))``,
  because the paper's form did not train on our data (see ``SelfGating``).
- Interaction Arch: ``X' = MLP(Interaction([X || S_sum]))``: a DHEN stack over the ``n + C+P+K`` tokens, then a
  linear map over the token axis back to ``n`` tokens, added to ``X`` and layer-normed.
- Sequence Arch: ``S' = MHA(PFFN(X_sum, S))`` with ``PFFN(X_sum, S) = (X_sum W) S`` (a per-example ``d x d``
  weight built from the summary, paper appendix A.2) and self-attention with rotary positions and the padding
  mask; both sub-layers are residual + layer norm (standard transformer practice; the paper's equations omit it).

Before the first block, ``X_sum`` is prepended to the sequence as ``C`` CLS tokens (always valid, position 0;
events take positions 1..L). After the last block a final Cross Arch summarises both sides and the head MLP reads
``[X_sum || S_sum]``.

Without sequences (Criteo, Avazu) the Sequence Arch and the sequence summary are skipped: each block is the
interaction arch over ``X`` alone and the head reads ``X_sum``, i.e. the model reduces to DHEN with a gated
summary head.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from ctr.models import registry
from ctr.models.dhen import DHENStack
from ctr.model_io import BinaryLogits, ModelInputs
from ctr.models.heads import mlp_logits
from ctr.models.layers import (
    Activation,
    FeatureTokens,
    MultiHeadAttention,
    PoolingByAttention,
    SelfGating,
    activation_fn,
    width_map_init,
)


def merge_sequences(inputs: ModelInputs) -> tuple[jax.Array, jax.Array]:
    """All sequences concatenated per position: ``[B, L_max, sum(D_s)]`` and the merged mask ``[B, L_max]``.

    Sequences are left-padded to the longest so that position ``-1`` is every sequence's most recent event. Each
    sequence's padding is zeroed first, so a position that is real in one sequence and padding in another carries
    nothing from the padding.
    """
    length = max(s.shape[1] for s in inputs.sequences.values())
    parts, masks = [], []
    for name, seq in inputs.sequences.items():
        pad = length - seq.shape[1]
        mask = jnp.pad(inputs.masks[name].astype(bool), ((0, 0), (pad, 0)))
        parts.append(jnp.where(mask[..., None], jnp.pad(seq, ((0, 0), (pad, 0), (0, 0))), 0))
        masks.append(mask)
    return jnp.concatenate(parts, axis=-1), jnp.any(jnp.stack(masks), axis=0)


def most_recent(sequence: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """The ``k`` most recent real events ``[B, k, D]``, most recent first; zeros where there are fewer than ``k``.

    Works for any padding layout: "most recent" is the largest position among the real events.
    """
    m = mask.astype(jnp.int32)
    rank = jnp.flip(jnp.cumsum(jnp.flip(m, axis=1), axis=1), axis=1) * m  # 1 = most recent real event, 0 = pad
    select = (rank[:, None, :] == jnp.arange(1, k + 1)[None, :, None]).astype(sequence.dtype)  # [B, k, L]
    return jnp.einsum("bkl,bld->bkd", select, sequence)


class SequenceMaskNet(nn.Module):
    """``[B, L, sum(widths)] -> [B, L, d]``: ``LayerNorm(MLP_lce(S * MLP_mask(S)))``, position-wise.

    Initialisation keeps a merged event comparable with the target item from the first step. The mask MLP's
    output bias starts at one, so the mask starts near 1 (with a zero bias every token would start as a product
    of embeddings, which no linear map can compare with the target's embedding). ``MLP_lce`` starts as the sum
    of the sequences, each carried to ``d`` by ``width_map`` (the identity when it is ``d`` wide), the same map
    that ``FeatureTokens(aligned_projections=True)`` starts the item features with: an event token starts in
    the space of the item tokens (``cate_his`` shares ``cate_id``'s table). With random maps instead
    (``InterFormer.aligned_init=False``), InterFormer with 16-wide embeddings and 32-wide tokens never left the
    base rate on synthetic TaobaoAds, while these maps train (benchmarks/RESULTS.md, "Models on synthetic TaobaoAds").

    Attributes:
      dim: output width ``d``.
      widths: the widths of the concatenated sequences.
      activation: mask MLP activation.
      aligned: start ``MLP_lce`` as the mapped sum (else random, LeCun normal: the ablation).
      dtype: compute dtype.
    """

    dim: int
    widths: Sequence[int]
    activation: Activation = nn.swish
    aligned: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        f = s.shape[-1]
        hidden = self.activation(nn.Dense(f, dtype=self.dtype, name="mask_hidden")(s))
        mask = nn.Dense(f, dtype=self.dtype, bias_init=nn.initializers.ones, name="mask_out")(hidden)
        lce_init = width_map_init(*self.widths) if self.aligned else nn.initializers.lecun_normal()
        s = nn.Dense(self.dim, dtype=self.dtype, kernel_init=lce_init, name="lce")(s * mask)
        return nn.LayerNorm(dtype=self.dtype, name="norm")(s)


class NonSequenceSummary(nn.Module):
    """Cross Arch, non-sequence side: ``X_sum = Gating(MLP(X))``, ``[B, n, d] -> [B, C, d]`` (sown as ``x_sum``)."""

    num_tokens: int
    gating: str = "glu"
    gate_hidden: Sequence[int] = ()
    activation: Activation = nn.swish
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        x_sum = nn.Dense(self.num_tokens * d, dtype=self.dtype, name="mlp")(x.reshape(b, n * d))
        x_sum = SelfGating(self.gating, self.gate_hidden, self.activation, self.dtype, name="gate")(
            x_sum.reshape(b, self.num_tokens, d)
        )
        self.sow("intermediates", "x_sum", x_sum)
        return x_sum


class SequenceSummary(nn.Module):
    """Cross Arch, sequence side: ``S_sum = Gating([S_CLS || PMA(S) || S_recent (|| S_target)])``,
    ``[B, C+L, d] -> [B, C+P+K (+n), d]``.

    ``S`` starts with the ``C`` CLS tokens; PMA, the recent tokens and the target tokens read the events only.
    With ``target_attention``, each of the ``n`` non-sequence tokens ``X`` queries the events (an addition to the
    paper): ``S_target = MHA(X, events)`` with identity query/key/value maps at init, so from the first step the
    ad's category token gathers the events most like it, the target-vs-history match that the paper's CLS
    tokens (a dense mix of all features) and PMA seeds (which see no target) have to learn from a third-order
    interaction. The parts are sown as ``cls_tokens``, ``pma_tokens``, ``recent_tokens``, ``target_tokens`` and
    the result as ``s_sum``.
    """

    num_cls: int
    num_pma: int
    num_recent: int
    num_heads: int
    target_attention: bool = False
    gating: str = "glu"
    gate_hidden: Sequence[int] = ()
    activation: Activation = nn.swish
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: jax.Array, mask: jax.Array, x: jax.Array | None = None) -> jax.Array:
        cls, events, event_mask = s[:, : self.num_cls], s[:, self.num_cls :], mask[:, self.num_cls :]
        self.sow("intermediates", "cls_tokens", cls)
        parts = [cls]
        if self.num_pma:
            pma = PoolingByAttention(self.num_pma, self.num_heads, self.dtype, name="pma")(events, event_mask)
            self.sow("intermediates", "pma_tokens", pma)
            parts.append(pma)
        if self.num_recent:
            recent = most_recent(events, event_mask, self.num_recent)
            self.sow("intermediates", "recent_tokens", recent)
            parts.append(recent)
        if self.target_attention:
            target = MultiHeadAttention(
                self.num_heads, identity_values=True, identity_queries_keys=True, dtype=self.dtype, name="target"
            )(x, events, event_mask)
            self.sow("intermediates", "target_tokens", target)
            parts.append(target)
        s_sum = SelfGating(self.gating, self.gate_hidden, self.activation, self.dtype, name="gate")(
            jnp.concatenate(parts, axis=1)
        )
        self.sow("intermediates", "s_sum", s_sum)
        return s_sum


class InteractionArch(nn.Module):
    """``X' = LayerNorm(X + LCE(DHENStack([X || S_sum])))``: ``[B, n, d]`` (+ ``[B, m, d]``) ``-> [B, n, d]``.

    The linear compression (LCE) maps the ``n + m`` interacted tokens back to ``n`` over the token axis.
    """

    dhen_layers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, s_sum: jax.Array | None) -> jax.Array:
        n = x.shape[1]
        tokens = x if s_sum is None else jnp.concatenate([x, s_sum], axis=1)
        tokens = DHENStack(num_layers=self.dhen_layers, dtype=self.dtype, name="dhen")(tokens)
        lce = self.param("lce", nn.initializers.lecun_normal(), (tokens.shape[1], n))
        mixed = jnp.einsum("btd,tn->bnd", tokens, lce.astype(self.dtype))
        return nn.LayerNorm(dtype=self.dtype, name="norm")(x + mixed)


class SequenceArch(nn.Module):
    """``S' = MHA(PFFN(X_sum, S))`` over ``S [B, C+L, d]`` with its mask and positions (each residual + norm)."""

    num_heads: int
    rope_base: float = 10000.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_sum: jax.Array, s: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        c, d = x_sum.shape[1], x_sum.shape[2]
        w = self.param("pffn", nn.initializers.normal(1.0 / d), (c, d))
        w_pffn = jnp.einsum("bci,cj->bij", x_sum, w.astype(self.dtype))  # [B, d, d], one FFN weight per example
        s = nn.LayerNorm(dtype=self.dtype, name="pffn_norm")(s + jnp.einsum("bij,btj->bti", w_pffn, s))
        # Identity values: the CLS tokens start by adding a weighted mean of the events, in the events' space.
        attn = MultiHeadAttention(self.num_heads, self.rope_base, identity_values=True, dtype=self.dtype, name="mha")(
            s, s, mask, positions, positions
        )
        return nn.LayerNorm(dtype=self.dtype, name="mha_norm")(s + attn)


@registry.register("interformer")
@gin.configurable
class InterFormer(BinaryLogits, nn.Module):
    """InterFormer: ``ModelInputs -> logits [B]`` (see the module docstring for the architecture).

    Attributes:
      dim: token width ``d``.
      num_layers: InterFormer blocks ``L``.
      num_heads: attention heads (sequence MHA and PMA).
      num_cls: CLS tokens = non-sequence summary tokens ``C`` (paper: 4).
      num_pma: PMA tokens ``P`` (paper: 2; 0 removes them).
      num_recent: most recent event tokens ``K`` (paper: 2; 0 removes them).
      dhen_layers: DHEN layers inside each block's interaction arch (the rest is bound on ``DHENStack``).
      gating: ``"glu"`` (``X * sigmoid(MLP(X))``, default) or ``"paper"`` (``sigmoid(X * MLP(X))``, the paper's
        equation, which did not train on our synthetic TaobaoAds data), see ``SelfGating``.
      gate_hidden: hidden widths of the gating MLPs.
      head: hidden widths of the head MLP (paper: 1024, 512, 256, 128).
      target_attention: add ``n`` target tokens to the sequence summary, each non-sequence token attending over
        the events (see ``SequenceSummary``; an addition to the paper). It makes a sequence-only click rule
        linearly readable after the first interaction arch at init, and raised test AUC on synthetic TaobaoAds
        (benchmarks/RESULTS.md, "InterFormer learning from behaviour sequences").
      head_gain_init: start the head's hidden layers with the activation's gain (``MLP.gain_init``). At LeCun
        init the paper's four swish layers shrink the signal and the tables' gradients start ~20x smaller than
        DHEN's. Alone it did not make InterFormer train; with the other fixes of issue 10 it was neutral without
        target attention and needed with it (one seed each: benchmarks/RESULTS.md, "InterFormer learning from
        behaviour sequences").
      activation: activation name (paper: swish).
      dropout: head dropout.
      token_norm: layer-normalise the feature tokens (see ``FeatureTokens.normalize``).
      sequence_norm: layer-normalise each sequence's event embeddings (one norm per sequence) before they are
        merged, as ``token_norm`` does for the feature tokens. Without it, a sequence whose rows grow fastest
        swamps the merged events: under SparseAdagrad the few ``btag`` rows, read by every event, grow ~4x in 5
        steps while the ``cate`` rows barely move, every event becomes one ``btag`` direction, and the match of
        the ad's category with the history is lost (a linear probe at the head's input falls to chance, and
        InterFormer stayed at the base rate on synthetic TaobaoAds: benchmarks/RESULTS.md, "InterFormer learning
        from behaviour sequences").
      aligned_init: start the item features' projections and the merged events' map with ``width_map``, so
        that the target item and the events start in one token space when the embeddings are not ``dim`` wide
        (see ``SequenceMaskNet``); False starts both random.
      rope_base: rotary frequency base.
      dtype: compute dtype (``"bfloat16"`` for mixed precision; parameters stay float32).
    """

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_cls: int = 4
    num_pma: int = 2
    num_recent: int = 2
    dhen_layers: int = 1
    gating: str = "glu"
    gate_hidden: Sequence[int] = ()
    head: Sequence[int] = (1024, 512, 256, 128)
    head_gain_init: bool = True
    target_attention: bool = True
    activation: str = "swish"
    dropout: float = 0.0
    token_norm: bool = True
    sequence_norm: bool = True
    aligned_init: bool = True
    rope_base: float = 10000.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: ModelInputs, *, train: bool = False) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        act = activation_fn(self.activation)

        def summarise(i: int, x: jax.Array, s: jax.Array | None, mask: jax.Array | None):
            x_sum = NonSequenceSummary(
                self.num_cls, self.gating, tuple(self.gate_hidden), act, dtype, name=f"x_summary_{i}"
            )(x)
            if s is None:
                return x_sum, s, mask, None
            if i == 0:  # the first non-sequence summary becomes the CLS tokens, ahead of the events
                s = jnp.concatenate([x_sum, s], axis=1)
                mask = jnp.concatenate([jnp.ones(x_sum.shape[:2], bool), mask], axis=1)
            s_sum = SequenceSummary(
                self.num_cls, self.num_pma, self.num_recent, self.num_heads, self.target_attention, self.gating,
                tuple(self.gate_hidden), act, dtype, name=f"s_summary_{i}",
            )(s, mask, x)
            return x_sum, s, mask, s_sum

        x = FeatureTokens(
            self.dim, aligned_projections=self.aligned_init, normalize=self.token_norm, dtype=dtype, name="tokens"
        )(inputs)
        s = mask = positions = None
        if inputs.sequences:
            if self.sequence_norm:
                inputs = inputs.replace(sequences={
                    name: nn.LayerNorm(dtype=dtype, name=f"norm_{name}")(seq.astype(dtype))
                    for name, seq in inputs.sequences.items()
                })  # fmt: skip
            merged, mask = merge_sequences(inputs)
            widths = tuple(seq.shape[-1] for seq in inputs.sequences.values())
            s = SequenceMaskNet(self.dim, widths, act, self.aligned_init, dtype, name="masknet")(merged.astype(dtype))
            # CLS tokens sit at position 0, the events at 1..L (rotary attention only sees differences).
            positions = jnp.concatenate([jnp.zeros(self.num_cls, jnp.int32), jnp.arange(1, s.shape[1] + 1)])[None]
        for i in range(self.num_layers):
            x_sum, s, mask, s_sum = summarise(i, x, s, mask)
            x_next = InteractionArch(self.dhen_layers, dtype, name=f"interaction_{i}")(x, s_sum)
            if s is not None:
                s = SequenceArch(self.num_heads, self.rope_base, dtype, name=f"sequence_{i}")(x_sum, s, mask, positions)
            x = x_next
        # A final Cross Arch summarises the last block's outputs for the head.
        x_sum, _, _, s_sum = summarise(self.num_layers, x, s, mask)
        summary = x_sum.reshape(x_sum.shape[0], -1)
        if s_sum is not None:
            summary = jnp.concatenate([summary, s_sum.reshape(s_sum.shape[0], -1)], axis=-1)
        return mlp_logits(summary, self.head, act, dropout=self.dropout, dtype=dtype, name="head", train=train,
                          gain_init=self.head_gain_init)  # fmt: skip
