"""What every model receives: embedded features, dense features, sequences with their masks."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


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
