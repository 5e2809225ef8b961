"""A toy schema with every feature kind, random batches of it, and a Flax wrapper to run ``combine``."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctr.data import schema as schema_lib
from embeddings.collection import EmbeddingCollection

ID_SPACE = 2**63 - 1

SCHEMA = schema_lib.FeatureSchema(
    name="toy",
    dense=("d0", "d1"),
    categorical=("user", "item", "cate", "site"),
    sequences=(
        schema_lib.SequenceFeature("item_his", "item", 5),
        schema_lib.SequenceFeature("btag_his", None, 5),
    ),
)


def random_batch(batch_size: int, seed: int = 0, vocab: int = 50) -> dict[str, np.ndarray]:
    """Ids drawn from ``vocab`` random fingerprints per feature (so ids repeat, as in real batches)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, ID_SPACE, vocab, dtype=np.int64)
    batch = {
        schema_lib.LABEL: rng.integers(0, 2, batch_size).astype(np.float32),
        schema_lib.DENSE: rng.normal(size=(batch_size, len(SCHEMA.dense))).astype(np.float32),
    }
    for name in SCHEMA.categorical:
        batch[name] = rng.choice(pool, batch_size)
    for seq in SCHEMA.sequences:
        batch[seq.name] = rng.choice(pool, (batch_size, seq.max_len))
        batch[seq.mask_key] = rng.random((batch_size, seq.max_len)) < 0.8
    return batch


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """What the trainer puts on device besides ids: label, dense, masks."""
    keys = [schema_lib.LABEL, schema_lib.DENSE] + [s.mask_key for s in SCHEMA.sequences]
    return {k: jnp.asarray(batch[k]) for k in keys}


class Head(nn.Module):
    """combine() inside a Flax compact scope, then a linear logit over features, dense and pooled sequences.

    Returns ``(logits [B], model inputs)``.
    """

    collection: EmbeddingCollection

    @nn.compact
    def __call__(self, rows, batch):
        inputs = self.collection.combine(rows, batch)
        pooled = [
            jnp.sum(inputs.sequences[s] * inputs.masks[s][..., None], axis=1) for s in sorted(inputs.sequences)
        ]
        x = jnp.concatenate([inputs.flat(), *pooled], axis=-1).astype(jnp.float32)
        return nn.Dense(1, name="logit")(x)[..., 0], inputs
