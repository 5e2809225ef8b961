r"""InterFormer's first steps on a noisy sequence-only task: test AUC, and whether the head's input still
carries the rule (a linear probe), step by step.

The task is ``tests/models/capacity_testlib.py``'s (the click rule: the ad's category among the user's last 5
of up to ``--seq_len`` events), made noisy and imbalanced like real clicks: click ~ Bernoulli(sigmoid(b0 + 2.5 *
rule)), b0 = -3.2 (click rate ~0.18). Tables train with Adagrad at SparseAdagrad's rule and initial accumulator
(0.1), the network with Adam (optionally warmed up), batch 512, as the TaobaoAds benchmark. The probe: ridge
regression of the noise-free rule on the final cross arch's outputs (the head's input, ``[X_sum || S_sum]``), AUC
on held-out examples; its value at step 0 is what the initialisation offers. Model bindings:
``configs/<config>.gin``, then ``--set name=value`` constructor overrides.

    PYTHONPATH=. python benchmarks/sequence_probe.py --config=taobao_interformer --steps=100 --warmup=50
"""
from __future__ import annotations

import ast
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "models"))

from absl import app, flags  # noqa: E402

CONFIG = flags.DEFINE_string("config", "taobao_interformer", "configs/<config>.gin to build the model from.")
SETS = flags.DEFINE_multi_string("set", [], "Model constructor override name=value (Python literal).")
STEPS = flags.DEFINE_integer("steps", 100, "Training steps.")
BATCH = flags.DEFINE_integer("batch_size", 512, "Batch size.")
TABLE_LR = flags.DEFINE_float("table_lr", 0.3, "Adagrad learning rate of the tables.")
DENSE_LR = flags.DEFINE_float("dense_lr", 3e-3, "Adam learning rate of the network.")
WARMUP = flags.DEFINE_integer("warmup", 0, "Linear warm-up steps of the network's Adam.")
B0 = flags.DEFINE_float("b0", -3.2, "Click logit intercept (-1.25: balanced clicks).")
SEED = flags.DEFINE_integer("seed", 0, "Data and init seed.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 20, "Longest history (the capacity test uses 10, to be cheap).")


def noisy_task(n: int, seed: int):
    import numpy as np

    import capacity_testlib as cap

    data = cap.make_task(n, seed)
    data["rule"] = data["label"]
    logit = B0.value + 2.5 * data["rule"]
    data["label"] = (np.random.default_rng(seed + 7).random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return data


def main(argv: list[str]) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import capacity_testlib as cap

    cap.SEQ_LEN = SEQ_LEN.value  # read by make_task
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in SETS.value)}
    steps, batch, seed = STEPS.value, BATCH.value, SEED.value
    train, test = noisy_task(steps * batch, seed), noisy_task(20_000, seed + 1)
    probe_fit, probe_test = noisy_task(4000, seed + 50), noisy_task(4000, seed + 51)

    def ridge_auc(a: np.ndarray, b: np.ndarray) -> float:
        mu, sd = a.mean(0), a.std(0) + 1e-6
        a, b = [np.hstack([(x - mu) / sd, np.ones((len(x), 1))]) for x in (a, b)]
        y = probe_fit["rule"]
        w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ (y - y.mean()))
        return cap.auc(probe_test["rule"], b @ w)

    with cap.config_model(CONFIG.value) as (network, dim):
        network = network.clone(**overrides)
        model = cap.TaskModel(network, dim)
        params = model.init({"params": jax.random.key(seed)}, {k: v[:batch] for k, v in train.items()})
        groups = jax.tree_util.tree_map_with_path(
            lambda path, _: "table" if any(getattr(k, "key", "") == "embedding" for k in path) else "dense", params
        )
        dense_lr = optax.linear_schedule(0.0, DENSE_LR.value, WARMUP.value) if WARMUP.value else DENSE_LR.value
        tx = optax.multi_transform({
            "table": optax.adagrad(TABLE_LR.value, initial_accumulator_value=0.1, eps=1e-7),
            "dense": optax.adam(dense_lr),
        }, groups)  # fmt: skip
        opt_state = tx.init(params)

        def loss_fn(p, b):
            return optax.sigmoid_binary_cross_entropy(model.apply(p, b), b["label"]).mean()

        @jax.jit
        def step(p, o, b):
            loss, grads = jax.value_and_grad(loss_fn)(p, b)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        predict = jax.jit(lambda p, b: model.apply(p, b))
        sown = jax.jit(lambda p, b: model.apply(p, b, mutable=["intermediates"])[1]["intermediates"]["network"])
        last = getattr(network, "num_layers", 0)

        def head_input(p, data):
            s = sown(p, data)
            parts = [s[f"x_summary_{last}"]["x_sum"][0], s[f"s_summary_{last}"]["s_sum"][0]]
            return np.hstack([np.asarray(x).reshape(len(data["label"]), -1) for x in parts])

        def report(i: int, loss: float) -> None:
            rows = {t: float(jnp.abs(params["params"][t]["embedding"]).mean()) for t in ("cate", "btag")}
            probe = float("nan")  # only InterFormer has the cross arch whose outputs are probed
            if hasattr(network, "num_cls"):
                probe = ridge_auc(head_input(params, probe_fit), head_input(params, probe_test))
            auc = cap.auc(test["label"], np.asarray(predict(params, test)))
            print(f"step {i:>4}  train loss {loss:.4f}  test AUC {auc:.4f}  probe AUC {probe:.3f}  "
                  f"mean |row| cate {rows['cate']:.4f} btag {rows['btag']:.4f}  {time.time() - t0:.0f} s", flush=True)

        t0 = time.time()
        report(0, float("nan"))
        for i in range(steps):
            batch_i = {k: v[i * batch : (i + 1) * batch] for k, v in train.items()}
            params, opt_state, loss = step(params, opt_state, batch_i)
            if i + 1 in (5, 10, 20) or (i + 1) % 25 == 0:
                report(i + 1, float(loss))
    print(f"{CONFIG.value} {overrides} warmup {WARMUP.value}: click rate {train['label'].mean():.3f}")


if __name__ == "__main__":
    app.run(main)
