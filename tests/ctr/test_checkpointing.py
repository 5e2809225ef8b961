"""Checkpoint round trips of a sharded TrainState on 8 CPU devices, including onto a different mesh."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ctr import checkpointing, trainer


def _mesh(data, model):
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(mesh):
    rows = NamedSharding(mesh, P(("data", "model"), None))
    rep = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    table = jax.device_put(rng.normal(size=(64, 4)).astype(np.float32), rows)
    return trainer.TrainState(
        step=jax.device_put(jnp.int32(17), rep),
        params={"w": jax.device_put(rng.normal(size=(5, 3)).astype(np.float32), rep)},
        opt_state=({"mu": jax.device_put(np.ones((5, 3), np.float32), rep)},),
        tables={"t": table},
        table_slots={"t": {"accumulator": jax.device_put(np.full((64, 4), 0.1, np.float32), rows)}},
        rng=jax.device_put(jax.random.key_data(jax.random.key(3)), rep),
    )


def test_round_trip_on_8_devices_and_reshard(tmp_path):
    assert jax.device_count() == 8
    state = _state(_mesh(8, 1))
    assert len(state.tables["t"].sharding.device_set) == 8
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every_steps=5, keep=2)
    ckpt.save(17, state, {"examples_seen": 123, "train_wall_s": 1.5})
    ckpt.wait()
    assert ckpt.latest_step() == 17

    restored, record = ckpt.restore(17, checkpointing.abstract_like(state))
    assert record == {"examples_seen": 123, "train_wall_s": 1.5}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding

    # Onto a 2x4 mesh with tables sharded over "model" only: values equal, new shardings honoured.
    other = _mesh(2, 4)
    target = checkpointing.abstract_like(_state(other))
    target = target.replace(
        tables={"t": jax.ShapeDtypeStruct((64, 4), jnp.float32, sharding=NamedSharding(other, P("model", None)))}
    )
    moved, _ = ckpt.restore(17, target)
    np.testing.assert_array_equal(np.asarray(moved.tables["t"]), np.asarray(state.tables["t"]))
    assert moved.tables["t"].sharding.spec == P("model", None)
    ckpt.close()


def test_keeps_only_the_newest(tmp_path):
    state = _state(_mesh(8, 1))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every_steps=5, keep=2)
    for step in (5, 10, 15):
        ckpt.save(step, state, {"examples_seen": step, "train_wall_s": 0.0})
    ckpt.close()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [10, 15]
    assert ckpt.due(10) and not ckpt.due(11)
