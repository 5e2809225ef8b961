"""The dense-parameter optimizer (optax), configured in gin. Tables use :mod:`embeddings.sparse_optim`."""
from __future__ import annotations

import gin
import optax


@gin.configurable
def dense_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-3,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer for every non-table parameter.

    Args:
      name: ``adam``, ``adamw``, ``adagrad`` or ``sgd``.
      learning_rate: peak learning rate.
      warmup_steps: linear warm-up from 0 over this many steps.
      decay_steps: cosine decay to 0 over this many steps after warm-up (0 = constant).
      weight_decay: decoupled weight decay (``adamw`` only).
      clip_norm: clip the global gradient norm to this value, if set.
    """
    schedule: optax.Schedule | float = learning_rate
    if decay_steps and not warmup_steps:  # (a 1-step warm-up would make the first update 0)
        schedule = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif decay_steps:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, warmup_steps + decay_steps)
    elif warmup_steps:
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    makers = {
        "adam": lambda: optax.adam(schedule),
        "adamw": lambda: optax.adamw(schedule, weight_decay=weight_decay),
        "adagrad": lambda: optax.adagrad(schedule),
        "sgd": lambda: optax.sgd(schedule),
    }
    if name not in makers:
        raise ValueError(f"unknown dense optimizer {name!r}; choose one of {sorted(makers)}")
    tx = makers[name]()
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx
