"""Small inputs and model sizes shared by the model tests (tiny, so every test compiles and runs in seconds)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from ctr.models import registry
from ctr.model_io import ModelInputs

BATCH = 8
SEQ_LEN = 6

# Per registered model: constructor overrides that keep it tiny.
TINY: dict[str, dict[str, Any]] = {
    "dcnv2": dict(num_cross_layers=2, mlp=(16, 16)),
    "dlrm": dict(dim=8, bottom_mlp=(16,), top_mlp=(16,)),
    "dhen": dict(dim=8, num_layers=2, head=(16,)),
    "interformer": dict(dim=8, num_layers=2, head=(16,)),
    "cetnet": dict(),
}

# CETNet builds its towers itself: shrink them through gin, scoped by tower name.
TINY_TOWER_BINDINGS = [
    "interformer/InterFormer.dim = 8",
    "interformer/InterFormer.head = (16,)",
    "dhen/DHENModel.dim = 8",
    "dhen/DHENModel.head = (16,)",
    "dlrm/DLRM.dim = 8",
    "dlrm/DLRM.bottom_mlp = (16,)",
    "dlrm/DLRM.top_mlp = (16,)",
]


def tiny_model(name: str, **overrides: Any) -> nn.Module:
    """The registered model ``name`` at test size (call inside :func:`tiny_towers` for CETNet)."""
    return registry.get(name)(**{**TINY[name], **overrides})


class gin_config:
    """Context manager parsing gin ``bindings`` on a clean config, cleared again on exit."""

    def __init__(self, *bindings: str):
        self.bindings = list(bindings)

    def __enter__(self) -> None:
        gin.clear_config()
        gin.parse_config(self.bindings)

    def __exit__(self, *exc: object) -> None:
        gin.clear_config()


def tiny_towers(*extra: str) -> gin_config:
    """:data:`TINY_TOWER_BINDINGS` plus ``extra`` bindings, as a :class:`gin_config` context."""
    return gin_config(*TINY_TOWER_BINDINGS, *extra)


def make_inputs(
    seed: int = 0,
    sequences: bool = True,
    dense: bool = True,
    feature_dims: tuple[int, ...] = (8, 8, 4),
    seq_dims: dict[str, int] | None = None,
    batch: int = BATCH,
) -> ModelInputs:
    """Random embedded inputs. Sequences are left-padded (most recent last); row 0 has no events, row 1 is full."""
    rng = np.random.default_rng(seed)
    features = {f"f{i}": jnp.asarray(rng.normal(size=(batch, d)), jnp.float32) for i, d in enumerate(feature_dims)}
    seqs, masks = {}, {}
    if sequences:
        seq_dims = seq_dims or {"cate_his": 8, "brand_his": 8, "btag_his": 4}
        starts = rng.integers(0, SEQ_LEN, size=(batch, 1))
        starts[0], starts[1] = SEQ_LEN, 0
        mask = np.arange(SEQ_LEN)[None] >= starts
        for name, d in seq_dims.items():
            seqs[name] = jnp.asarray(rng.normal(size=(batch, SEQ_LEN, d)), jnp.float32)
            masks[name] = jnp.asarray(mask)
    dense_x = jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32) if dense else None
    return ModelInputs(features=features, dense=dense_x, sequences=seqs, masks=masks)


def host_init(model: nn.Module, inputs: ModelInputs, seed: int = 0) -> Any:
    """Variables of the right shapes filled on the host, without compiling ``model.init``.

    Compiling a model's initialisation costs several times more than compiling its forward pass, so tests that
    need parameters but not the initialisers themselves use this: LayerNorm scales one, biases zero, everything
    else normal with variance ``1 / fan_in``.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)
    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def labels(seed: int = 0, batch: int = BATCH) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed + 100).integers(0, 2, size=batch), jnp.float32)


def logits_of(outputs: Any) -> jax.Array:
    """The ``[B]`` logits of a model's outputs (plain logits, or a dict with ``"logits"``)."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs


def loss_of(model: nn.Module, outputs: Any, y: jax.Array) -> jax.Array:
    """The trainer's loss (the ``ctr.model_io.Network`` contract): the model's own ``loss``."""
    return model.loss(outputs, y)
