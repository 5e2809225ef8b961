"""A checkpoint written on 8 devices with tables sharded over ``model`` restores through the trainer onto 4
devices and onto 1 (``make_mesh.num_devices``), and onto a 2x4 mesh with tables sharded over ``data``: every
leaf right after the restore is bit-equal to the saved array (read back independently onto one device), lies
on the new mesh with the new table rule, and training continues from it.

The chain 8 devices (steps 0-20) -> 4 (20-30) -> 1 (30-40) is compared with one uninterrupted 1-device run
(0-40). Both see the same global batches; only float32 summation order differs between device counts (the
batch mean over data shards, duplicate-id gradient sums), a few ulps per step with Adagrad (see
test_trainer_sharded.py): measured, test AUC equal and logloss within 5e-9. The bound 1e-6 is far below what
ten steps more or less of training change on this data (AUC by ~2e-3).

Table padding: a checkpoint restores into tables of another padded row count (a larger
``build_collection.row_alignment``) when the logical rows are the same, and refuses any other shape change;
each device's slice is read on its own (a table is never whole on one device).
"""
import os
import shutil

import gin
import jax
import numpy as np
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ctr import checkpointing, train as train_cli, trainer
from state_testlib import saved_arrays

TINY = os.path.join(os.path.dirname(__file__), "tiny.gin")


def _numpy(tree):
    return jax.tree.map(
        lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x),
        tree,
    )


def _run(run_dir, data_dir, steps, *bindings):
    """Trains the tiny config to ``steps`` (resuming from ``run_dir``); returns (results, restored) where
    restored is (step, host copy of the restored state, the restored state's table and slot shardings) or None."""
    gin.clear_config()
    train_cli.parse_config(
        [TINY],
        [f'synthetic_criteo.data_dir = "{data_dir}"', f"train.num_steps = {steps}", 'train.final_eval_splits = ("test",)',
         "train.sparse_optimizer = @SparseAdagrad()", *bindings],
    )  # fmt: skip
    seen = []
    restore_latest = checkpointing.Checkpointer.restore_latest

    def spy(self, abstract_state):
        out = restore_latest(self, abstract_state)
        if out is not None:
            step, state, _ = out
            seen.append((step, _numpy(state), jax.tree.map(lambda x: x.sharding, (state.tables, state.table_slots))))
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpointing.Checkpointer, "restore_latest", spy)
        results = trainer.train(run_dir=str(run_dir))
    gin.clear_config()
    assert results["steps"] == steps
    return results, (seen[0] if seen else None)


def _saved(run_dir, step):
    """Every array of the checkpoint at ``step`` as saved, read onto this process's first device."""
    return _numpy(saved_arrays(run_dir, step))


def _assert_bit_equal(saved, restored):
    """Every leaf of the restored TrainState equals the saved array bit for bit (NaN-safe, -0.0 kept)."""
    got = {".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in p): v
           for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}  # fmt: skip
    want = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}  # fmt: skip
    assert sorted(got) == sorted(want) and len(got) > 6
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        assert got[name].tobytes() == value.tobytes(), name


def _assert_placed(shardings, mesh_shape, row_axes, shards):
    """Tables and slots lie on the target mesh, rows split ``shards`` ways over ``row_axes``."""
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        assert dict(s.mesh.shape) == mesh_shape and s.spec[0] == row_axes
        assert s.mesh.devices.size == mesh_shape["data"] * mesh_shape["model"]
        assert len({(idx[0].start, idx[0].stop) for idx in s.devices_indices_map((1024, 8)).values()}) == shards


def test_restore_onto_4_1_and_another_table_rule(tmp_path):
    data = tmp_path / "data"
    eight = ("make_mesh.model = 8", 'logical_rules.table_rows = ("model",)')  # 1x8, tables in 8 shards
    _, none = _run(tmp_path / "r8", data, 20, *eight)
    assert none is None

    shutil.copytree(tmp_path / "r8", tmp_path / "r4")
    four = ("make_mesh.num_devices = 4", "make_mesh.model = 1", 'logical_rules.table_rows = ("data",)')
    r4, (step, state, shardings) = _run(tmp_path / "r4", data, 30, *four)
    assert step == 20 and r4["devices"] == 4
    _assert_bit_equal(_saved(tmp_path / "r8", 20), state)
    _assert_placed(shardings, {"data": 4, "model": 1}, "data", 4)

    shutil.copytree(tmp_path / "r4", tmp_path / "r1")
    chain, (step, state, shardings) = _run(tmp_path / "r1", data, 40, "make_mesh.num_devices = 1")
    assert step == 30 and chain["devices"] == 1
    _assert_bit_equal(_saved(tmp_path / "r4", 30), state)
    _assert_placed(shardings, {"data": 1, "model": 1}, "model", 1)

    shutil.copytree(tmp_path / "r8", tmp_path / "r2x4")
    other = ("make_mesh.model = 4", 'logical_rules.table_rows = ("data",)')  # 2 shards, 4 replicas each
    r2x4, (step, state, shardings) = _run(tmp_path / "r2x4", data, 30, *other)
    assert step == 20 and r2x4["devices"] == 8
    _assert_bit_equal(_saved(tmp_path / "r8", 20), state)
    _assert_placed(shardings, {"data": 2, "model": 4}, "data", 2)

    uninterrupted, _ = _run(tmp_path / "one", data, 40, "make_mesh.num_devices = 1")
    assert chain["examples_seen"] == uninterrupted["examples_seen"] == 40 * 256
    for key in ("auc", "logloss"):
        assert chain["test"][key] == pytest.approx(uninterrupted["test"][key], abs=1e-6), key
    print("chain vs uninterrupted:", {k: chain["test"][k] - uninterrupted["test"][k] for k in ("auc", "logloss")})


def _padded_state(mesh, rows, logical=50):
    """A TrainState whose table and slot have ``rows`` rows, the first ``logical`` of them addressed."""
    rep, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))
    table = np.zeros((rows, 4), np.float32)
    table[:logical] = np.random.default_rng(1).normal(size=(logical, 4))
    table[logical:] = 7.0  # padding: values no lookup reads
    return trainer.TrainState(
        step=jax.device_put(jnp.int32(3), rep),
        params={"w": jax.device_put(np.ones((2, 2), np.float32), rep)},
        opt_state=(),
        tables={"t": jax.device_put(table, by_rows)},
        table_slots={"t": {"acc": jax.device_put(table[:, 0] + 1, NamedSharding(mesh, P("data")))}},
        rng=jax.device_put(jax.random.key_data(jax.random.key(0)), rep),
    )


def test_restore_into_another_padding_keeps_logical_rows(tmp_path):
    mesh8 = jax.make_mesh((8, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    state = _padded_state(mesh8, 64)
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), table_rows={"t": 50})
    ckpt.save(3, state, {"examples_seen": 0})
    ckpt.close()
    for rows, devices in ((128, 8), (56, 4)):  # more padding on 8 devices, less on 4
        mesh = jax.make_mesh((devices, 1), ("data", "model"), devices=jax.devices()[:devices],
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)  # fmt: skip
        target = checkpointing.abstract_like(_padded_state(mesh, rows))
        ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), table_rows={"t": 50})
        built, make = [], jax.make_array_from_single_device_arrays
        with pytest.MonkeyPatch.context() as patch:  # how orbax assembles each restored array
            patch.setattr(jax, "make_array_from_single_device_arrays",
                          lambda shape, sharding, arrays, **kw: built.append((shape, [a.shape for a in arrays]))
                          or make(shape, sharding, arrays, **kw))  # fmt: skip
            got, record = ckpt.restore(3, target)
        # The table came from one slice per device (rows / devices each), never from a whole table on a device.
        assert ((rows, 4), [(rows // devices, 4)] * devices) in built
        assert record == {"examples_seen": 0}
        table = np.asarray(got.tables["t"])
        assert table.shape == (rows, 4) and got.tables["t"].sharding == target.tables["t"].sharding
        np.testing.assert_array_equal(table[:50], np.asarray(state.tables["t"])[:50])
        np.testing.assert_array_equal(np.asarray(got.table_slots["t"]["acc"])[:50], table[:50, 0] + 1)
        assert not np.any(table[64:]) and (rows < 64 or np.all(table[50:64] == 7.0))  # new padding is zeros
    # Other logical rows (a changed vocabulary or bucket count) or another dense shape: a clear refusal.
    with pytest.raises(checkpointing.CheckpointMismatch, match=r"\.tables\['t'\] was saved with shape \(64, 4\) "
                       r"\(50 logical rows\) and this run's config makes it \(72, 4\) \(60\)"):  # fmt: skip
        target = checkpointing.abstract_like(_padded_state(mesh8, 72, logical=60))
        checkpointing.Checkpointer(str(tmp_path / "ckpt"), table_rows={"t": 60}).restore(3, target)
    target = checkpointing.abstract_like(_padded_state(mesh8, 64))
    target = target.replace(params={"w": jax.ShapeDtypeStruct((3, 2), jnp.float32, sharding=NamedSharding(mesh8, P()))})
    with pytest.raises(checkpointing.CheckpointMismatch, match=r"\.params\['w'\] was saved with shape \(2, 2\)"):
        checkpointing.Checkpointer(str(tmp_path / "ckpt"), table_rows={"t": 50}).restore(3, target)
