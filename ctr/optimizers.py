"""The dense-parameter optimizer (optax), configured in gin. Tables use :mod:`embeddings.sparse_optim`."""
from __future__ import annotations

from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
def dense_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-3,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    ema_decay: float = 0.0,
    cooldown: float = 0.0,
    num_steps: int | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer for every non-table parameter.

    Args:
      name: ``adam``, ``adamw``, ``adagrad`` or ``sgd``.
      learning_rate: peak learning rate.
      warmup_steps: linear warm-up from 0 over this many steps.
      decay_steps: cosine decay to 0 over this many steps after warm-up (0 = constant).
      weight_decay: decoupled weight decay (``adamw`` only).
      clip_norm: clip the global gradient norm to this value, if set.
      ema_decay: keep an exponential moving average of the parameters with this decay per step (0 = none),
        which evaluation and export then use (:func:`eval_params`); see :func:`param_ema`.
      cooldown: the fraction of the run's last steps over which the learning rate falls linearly to 0, on top
        of the schedule above (0 = none). At a constant step Adam's final parameters sit off the minimum, and
        on the low side for the output offset at ~10% click rates: a short cool-down lands them on it.
      num_steps: the run's length in steps (the trainer passes it; callers that only build the state's layout
        leave it None, which drops the cool-down).
    """
    if not 0.0 <= cooldown <= 1.0:
        raise ValueError(f"dense_optimizer.cooldown must be a fraction in [0, 1], got {cooldown!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"dense_optimizer.ema_decay must be in [0, 1), got {ema_decay!r}")
    schedule: optax.Schedule | float = learning_rate
    if decay_steps and not warmup_steps:  # (a 1-step warm-up would make the first update 0)
        schedule = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif decay_steps:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, warmup_steps + decay_steps)
    elif warmup_steps:
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    if cooldown and num_steps:
        schedule = _with_cooldown(schedule, num_steps, max(1, round(cooldown * num_steps)))
    elif cooldown:  # a schedule all the same: the optimizer state (a schedule's count) has the trained layout
        schedule = _as_schedule(schedule)
    makers = {
        "adam": lambda: optax.adam(schedule),
        "adamw": lambda: optax.adamw(schedule, weight_decay=weight_decay),
        "adagrad": lambda: optax.adagrad(schedule),
        "sgd": lambda: optax.sgd(schedule),
    }
    if name not in makers:
        raise ValueError(f"unknown dense optimizer {name!r}; choose one of {sorted(makers)}")
    tx = makers[name]()
    parts = [*([optax.clip_by_global_norm(clip_norm)] if clip_norm else []), tx,
             *([param_ema(ema_decay)] if ema_decay else [])]  # fmt: skip
    return optax.chain(*parts) if len(parts) > 1 else tx


def _with_cooldown(schedule: optax.Schedule | float, num_steps: int, steps: int) -> optax.Schedule:
    """``schedule`` times a factor falling linearly over the last ``steps`` of ``num_steps`` updates: they run at
    ``steps / (steps + 1)``, ..., ``1 / (steps + 1)`` of it (counts are 0-based), every earlier one at 1."""
    base = _as_schedule(schedule)
    return lambda count: base(count) * jnp.clip((num_steps - count) / (steps + 1), 0.0, 1.0)


def _as_schedule(schedule: optax.Schedule | float) -> optax.Schedule:
    return schedule if callable(schedule) else (lambda count: jnp.asarray(schedule, jnp.float32))


class ParamEMAState(NamedTuple):
    """:func:`param_ema`'s state: ``count`` updates averaged into ``ema`` (a tree like the parameters)."""

    count: jax.Array
    ema: Any


def param_ema(decay: float) -> optax.GradientTransformation:
    """The last link of a chain: leaves the updates as they are and keeps the debiased exponential moving
    average of the parameters they produce, ``ema_t = ema_{t-1} + (1 - decay) / (1 - decay^t) * (p_t - ema_{t-1})``
    (so ``ema_1 = p_1``, and no weight is left on the initial parameters however short the run).

    optax's ``ema`` averages updates (a momentum), not parameters. A moving average of the parameters smooths the
    step-to-step jitter of an Adam run's output offset at small batches, which costs logloss (the calibration).
    """

    def init(params):
        return ParamEMAState(count=jnp.zeros((), jnp.int32), ema=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params):
        count = state.count + 1
        weight = (1 - decay) / (1 - decay ** count.astype(jnp.float32))
        ema = jax.tree.map(lambda e, p, u: e + weight * (p + u - e), state.ema, params, updates)
        return updates, ParamEMAState(count=count, ema=ema)

    return optax.GradientTransformation(init, update)


def eval_params(params: Any, opt_state: Any) -> Any:
    """The parameters to evaluate and export: the moving average of :func:`param_ema` when the optimizer keeps
    one and has taken a step, else ``params``. Traceable (the choice on ``count`` is a ``jnp.where``)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ParamEMAState))
             if isinstance(s, ParamEMAState)]  # fmt: skip
    if not found:
        return params
    state = found[0]
    return jax.tree.map(lambda e, p: jnp.where(state.count > 0, e, p), state.ema, params)
