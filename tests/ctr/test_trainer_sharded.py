"""The trainer with tables row-sharded over the 8 CPU devices, through both lookup routes, against the same run
with replicated tables (every device holds the whole table and reads it locally, as one device would).

Both runs see the same global batches split the same way over the devices, so the dense math is the same; what
differs is where table rows live, how ids and rows travel (XLA's partitioned gather, or the ``shard_map``
all-to-all route), and in which order duplicate ids' gradients are summed before the sparse update (``shard_map``
sums per device, then at the owner). That float32 order is the only source of difference: a few ulps per step,
carried by 20 Adam/Adagrad steps into parameters of magnitude < 0.5 (measured: parameters within 1e-7 and test
logits within 5e-7 absolute on the shard_map route; the XLA route was bitwise equal). A row read from or
written to the wrong shard, or replicas that drift apart, move them by ~1e-3 and more.
"""
import os

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ctr import metrics, train as train_cli, trainer
from state_testlib import assert_states_close

TINY = os.path.join(os.path.dirname(__file__), "tiny.gin")
STEPS = 20

# name -> (make_mesh.model, logical_rules.table_rows, LookupOptions.path); mesh is data x model over 8 devices.
SHARDED = {
    "4x2/model/xla": (2, ("model",), "xla"),
    "4x2/model/shard_map": (2, ("model",), "shard_map"),  # 2 shards, 4 replicas of each
    "2x4/all/xla": (4, ("data", "model"), "xla"),
    "2x4/all/shard_map": (4, ("data", "model"), "shard_map"),  # 8 shards, no replicas
}


def _run(run_dir, data_dir, *bindings, steps=STEPS):
    """Trains the tiny config for ``steps``; returns (final state, test logits [N], test labels [N])."""
    gin.clear_config()
    train_cli.parse_config(
        [TINY],
        # Adagrad: an update proportional to the gradient, so reduction-order rounding stays at rounding size.
        # Adam's first steps are ~lr * sign(g) and carry that rounding into ~lr-sized differences over 20 steps
        # (measured: 8e-3 on the shard_map route); its routed update is checked exactly, given the same
        # gradients, in tests/embeddings/test_embedding_sharding.py.
        [f'synthetic_criteo.data_dir = "{data_dir}"', f"train.num_steps = {steps}",
         'train.final_eval_splits = ("test",)', "train.sparse_optimizer = @SparseAdagrad()", *bindings],
    )
    seen = []
    evaluate = metrics.evaluate

    def capture(labels, logits, groups=None):
        seen.append((np.asarray(labels), np.asarray(logits)))
        return evaluate(labels, logits, groups)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "evaluate", capture)
        results = trainer.train(run_dir=str(run_dir))
    gin.clear_config()
    assert results["steps"] == steps and len(seen) == 1
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    state = manager.restore(steps, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return state, seen[0][1], seen[0][0]


def _bindings(name):
    model, rows, path = SHARDED[name]
    return (f"make_mesh.model = {model}", f"logical_rules.table_rows = {rows!r}", f'LookupOptions.path = "{path}"')


def _numpy(state):
    """The state's numeric parts (tables, slots, dense parameters, optax state) as numpy."""
    return {key: jax.tree.map(np.asarray, state[key]) for key in ("tables", "table_slots", "params", "opt_state")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, data_dir):
    state, logits, labels = _run(tmp_path_factory.mktemp("replicated"), data_dir, "make_mesh.model = 1")
    assert all(t.sharding.is_fully_replicated for t in state["tables"].values())
    return _numpy(state), logits, labels


def _assert_trains_like_replicated(state, logits, labels, replicated, num_shards):
    for table in state["tables"].values():  # the tables really are split: each device holds 1/S of the rows
        assert len({s.index[0].start for s in table.addressable_shards}) == num_shards
    want_state, want_logits, want_labels = replicated
    assert int(state["step"]) == STEPS
    np.testing.assert_array_equal(labels, want_labels)  # the same test examples, in the same order
    # |entries| < 0.5, where a float32 ulp is <= 6e-8: 1e-6 is ~16 ulps, 1e-4 of one Adam step (lr 1e-2).
    assert_states_close(want_state, _numpy(state), atol=1e-6)
    # Logits sum a few hundred products of those parameters: 1e-5.
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["4x2/model/xla", "4x2/model/shard_map", "2x4/all/shard_map"])
def test_sharded_tables_train_like_replicated_tables(name, tmp_path, data_dir, replicated):
    state, logits, labels = _run(tmp_path, data_dir, *_bindings(name))
    _assert_trains_like_replicated(state, logits, labels, replicated, 8 if "/all/" in name else 2)


def test_sharded_run_resumes_onto_another_mesh_and_route(tmp_path, data_dir, replicated, capsys):
    """Half the steps with tables over all 8 devices (XLA route), then a restart with tables over "model" only
    (shard_map route): the restore reshards tables and slots, and the run ends where the replicated one does."""
    _run(tmp_path, data_dir, *_bindings("2x4/all/xla"), steps=STEPS // 2)
    capsys.readouterr()
    state, logits, labels = _run(tmp_path, data_dir, *_bindings("4x2/model/shard_map"))
    assert f"Resuming from the checkpoint at step {STEPS // 2} " in capsys.readouterr().out
    _assert_trains_like_replicated(state, logits, labels, replicated, 2)
