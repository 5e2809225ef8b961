"""The dense optimizer (``ctr.optimizers.dense_optimizer``) against NumPy loops of the textbook formulas: the
learning-rate schedule (linear warm-up, then cosine decay to 0), global-norm clipping, Adam, AdamW's decoupled
weight decay, Adagrad, SGD, the cool-down and the parameters' moving average. Float64 references; the optimizer
runs in float32 (1e-5 relative is ~100 ulps)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctr.optimizers import dense_optimizer, eval_params

LR = 0.1


def _expected_lr(step, warmup, decay):
    """Learning rate of update ``step`` (0-based): ``LR * step / warmup`` while warming up, then
    ``LR * (1 + cos(pi * t / decay)) / 2`` for t = step - warmup in [0, decay], 0 after; constant LR without
    decay."""
    if step < warmup:
        return LR * step / warmup
    if not decay:
        return LR
    t = min(step - warmup, decay)
    return LR * 0.5 * (1 + math.cos(math.pi * t / decay))


def _run(tx, grads, params):
    """Applies ``tx`` to one gradient per step; returns the update of every step (numpy pytrees)."""
    state = tx.init(params)
    updates = []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, d: p + d, params, u)
        updates.append(jax.tree.map(np.asarray, u))
    return updates


@pytest.mark.parametrize("warmup,decay", [(0, 0), (4, 0), (4, 10), (0, 10)])
def test_schedule_is_linear_warmup_then_cosine_decay(warmup, decay):
    """With SGD and a unit gradient, the update of step t is exactly -lr(t)."""
    steps = warmup + decay + 3
    tx = dense_optimizer(name="sgd", learning_rate=LR, warmup_steps=warmup, decay_steps=decay)
    updates = _run(tx, [jnp.ones(())] * steps, jnp.zeros(()))
    got = [-float(u) for u in updates]
    want = [_expected_lr(t, warmup, decay) for t in range(steps)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("warmup,cooldown,num_steps", [(0, 0.3, 10), (4, 0.25, 12), (0, 0.3, None)])
def test_cooldown_scales_the_last_steps_linearly_to_zero(warmup, cooldown, num_steps):
    """cooldown f over a run of T steps: the last C = round(f * T) updates are scaled by C/(C+1), ..., 1/(C+1)
    on top of the warm-up; without the run's length (a caller building only the state) there is none."""
    steps = num_steps or 10
    tx = dense_optimizer(name="sgd", learning_rate=LR, warmup_steps=warmup, cooldown=cooldown, num_steps=num_steps)
    got = [-float(u) for u in _run(tx, [jnp.ones(())] * steps, jnp.zeros(()))]
    c = round(cooldown * steps) if num_steps else 0
    want = [_expected_lr(t, warmup, 0) * min(1.0, (steps - t) / (c + 1)) for t in range(steps)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    if num_steps:
        assert got[-1] == pytest.approx(LR / (c + 1), rel=1e-6) and got[-c - 1] == pytest.approx(LR, rel=1e-6)
    params = {"w": jnp.zeros((2,))}  # the state's layout does not depend on the run's length (export rebuilds it)
    layout = jax.tree.structure(dense_optimizer(name="adam", cooldown=cooldown).init(params))
    assert jax.tree.structure(dense_optimizer(name="adam", cooldown=cooldown, num_steps=9).init(params)) == layout
    with pytest.raises(ValueError, match="cooldown"):
        dense_optimizer(cooldown=1.5, num_steps=10)


def test_clipping_scales_the_gradient_to_the_global_norm():
    """clip_norm c: every leaf is scaled by min(1, c / ||g||), ||g|| over all leaves together."""
    rng = np.random.default_rng(0)
    params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))}
    tx = dense_optimizer(name="sgd", learning_rate=1.0, clip_norm=1.5)
    for scale in (0.1, 10.0):  # under the norm (unchanged) and over it (scaled)
        g = {k: jnp.asarray(rng.normal(0, scale, v.shape), jnp.float32) for k, v in params.items()}
        norm = math.sqrt(sum(float(x) ** 2 for leaf in g.values() for x in np.asarray(leaf).ravel()))
        factor = min(1.0, 1.5 / norm)
        (u,) = _run(tx, [g], params)
        for key in params:
            np.testing.assert_allclose(u[key], -factor * np.asarray(g[key], np.float64), rtol=1e-5)
    assert factor < 1  # the second draw was clipped


def _numpy_adam(grads, params, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """Adam (Kingma & Ba 2015, bias-corrected) with AdamW's decoupled decay (Loshchilov & Hutter 2019):
    w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w), element by element."""
    w = np.array(params, np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    updates = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        step = np.zeros_like(w)
        for i in range(w.size):
            m.flat[i] = b1 * m.flat[i] + (1 - b1) * g.flat[i]
            v.flat[i] = b2 * v.flat[i] + (1 - b2) * g.flat[i] ** 2
            m_hat, v_hat = m.flat[i] / (1 - b1**t), v.flat[i] / (1 - b2**t)
            step.flat[i] = -lr * (m_hat / (math.sqrt(v_hat) + eps) + weight_decay * w.flat[i])
        w += step
        updates.append(step)
    return updates


@pytest.mark.parametrize("name,weight_decay", [("adam", 0.0), ("adamw", 0.3)])
def test_adam_and_adamw_match_the_textbook_update(name, weight_decay):
    rng = np.random.default_rng(1)
    params = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(5,)), jnp.float32) for _ in range(4)]
    tx = dense_optimizer(name=name, learning_rate=LR, weight_decay=weight_decay)
    got = _run(tx, grads, params)
    want = _numpy_adam(grads, params, LR, weight_decay=weight_decay)
    for t, (u, w) in enumerate(zip(got, want)):
        # optax forms the bias correction 1 - b2^t in float32: at t = 2 that is 0.001999 from a difference of
        # numbers near 1, ~3e-5 relative error, so updates (each < LR) agree to ~3e-5 * LR: atol 1e-5 * LR.
        np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-5 * LR, err_msg=f"step {t}")


def test_adagrad_and_sgd_match_the_textbook_update():
    """Adagrad (optax's form): acc starts at 0.1, acc += g^2, w -= lr * g / sqrt(acc + 1e-7); SGD: w -= lr * g."""
    rng = np.random.default_rng(2)
    params = jnp.zeros((4,))
    grads = [jnp.asarray(rng.normal(size=(4,)), jnp.float32) for _ in range(3)]
    acc = np.full(4, 0.1)
    for u, g in zip(_run(dense_optimizer(name="adagrad", learning_rate=LR), grads, params), grads):
        g = np.asarray(g, np.float64)
        acc += g * g
        np.testing.assert_allclose(u, [-LR * g[i] / math.sqrt(acc[i] + 1e-7) for i in range(4)], rtol=1e-5)
    for u, g in zip(_run(dense_optimizer(name="sgd", learning_rate=LR), grads, params), grads):
        np.testing.assert_allclose(u, -LR * np.asarray(g, np.float64), rtol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="'lamb'"):
        dense_optimizer(name="lamb")


@pytest.mark.parametrize("name,clip_norm", [("adam", None), ("sgd", 0.5)])
def test_moving_average_is_the_debiased_average_of_the_parameters(name, clip_norm):
    """ema_decay d: after t steps, eval_params is sum_i (1 - d) d^(t-i) p_i / (1 - d^t) over the parameters p_i
    after each step (no weight on the initial ones), and the updates are those of the optimizer without it."""
    decay, steps = 0.8, 6
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros((2,))}
    grads = [{k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()} for _ in range(steps)]
    plain = _run(dense_optimizer(name=name, learning_rate=LR, clip_norm=clip_norm), grads, params)
    tx = dense_optimizer(name=name, learning_rate=LR, clip_norm=clip_norm, ema_decay=decay)
    state, p = tx.init(params), params
    for key in params:  # before any step: the parameters themselves
        np.testing.assert_array_equal(eval_params(p, state)[key], params[key])
    history = []
    for t, (g, want_u) in enumerate(zip(grads, plain), start=1):
        u, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, d: a + d, p, u)
        history.append({k: np.asarray(v, np.float64) for k, v in p.items()})
        for key in params:
            np.testing.assert_allclose(u[key], want_u[key], rtol=1e-6, atol=1e-8)
            want = sum((1 - decay) * decay ** (t - i) * h[key] for i, h in enumerate(history, start=1))
            np.testing.assert_allclose(eval_params(p, state)[key], want / (1 - decay**t), rtol=1e-5, atol=1e-6)
    assert not np.allclose(eval_params(p, state)["w"], p["w"])  # an average, not the last parameters


def test_without_moving_average_eval_params_are_the_parameters():
    params = {"w": jnp.ones((2,))}
    tx = dense_optimizer(name="adam", learning_rate=LR)
    assert eval_params(params, tx.init(params)) is params
    with pytest.raises(ValueError, match="ema_decay"):
        dense_optimizer(ema_decay=1.0)
