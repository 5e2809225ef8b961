"""Checkpoint round trips of a sharded TrainState on 8 CPU devices, including onto a different mesh; checksums
and the fallback past damaged checkpoints, down to a real run resuming exactly from the previous one."""
import glob
import json
import os
import re
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ctr import checkpointing, train as train_cli, train_state, trainer


def _mesh(data, model):
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(mesh):
    rows = NamedSharding(mesh, P(("data", "model"), None))
    rep = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    table = jax.device_put(rng.normal(size=(64, 4)).astype(np.float32), rows)
    return train_state.TrainState(
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


def test_disabled_checkpointer_saves_nothing(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, enabled=False)
    assert not ckpt.due(1)
    ckpt.save(1, _state(_mesh(8, 1)), {"examples_seen": 0})
    ckpt.close()
    assert ckpt.latest_step() is None and not glob.glob(str(tmp_path / "ckpt" / "*"))


def test_checksums_do_not_depend_on_the_sharding_and_see_one_changed_bit():
    state = _state(_mesh(8, 1))
    moved = jax.device_put(state.tables["t"], NamedSharding(_mesh(2, 4), P("model", None)))
    sums = checkpointing.checksums(state)
    assert checkpointing.checksums(state.replace(tables={"t": moved})) == sums
    assert len(sums) == len(jax.tree.leaves(state)) and len(set(sums.values())) == len(sums)
    host = np.asarray(state.tables["t"]).copy()
    host.view(np.uint32)[40, 2] ^= 1  # one bit of one value
    changed = state.replace(tables={"t": jax.device_put(host, state.tables["t"].sharding)})
    assert {k for k, v in checkpointing.checksums(changed).items() if sums[k] != v} == {".tables['t']"}
    swapped = state.replace(tables={"t": jax.device_put(host[::-1].copy(), state.tables["t"].sharding)})
    assert checkpointing.checksums(swapped)[".tables['t']"] != sums[".tables['t']"]  # positions count


def _edit_record(step_dir, edit):
    path = os.path.join(step_dir, "record", "metadata")
    with open(path) as f:
        record = json.load(f)
    edit(record)
    with open(path, "w") as f:
        json.dump(record, f)


def test_restore_latest_sets_aside_checkpoints_that_fail_and_uses_the_previous(tmp_path, capsys):
    state = _state(_mesh(8, 1))
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=3)
    for step in (5, 10, 15):
        tables = {"t": state.tables["t"] + step}
        ckpt.save(step, state.replace(tables=tables), {"examples_seen": step, "train_wall_s": 0})
    ckpt.close()
    # 15: well-formed arrays with other values (step 5's), as 4 KiB overwritten in a file can give; 10: torn record.
    shutil.rmtree(os.path.join(directory, "15", "state"))
    shutil.copytree(os.path.join(directory, "5", "state"), os.path.join(directory, "15", "state"))
    with open(os.path.join(directory, "10", "record", "metadata"), "w") as f:
        f.write('{"examples_seen": 1')
    ckpt = checkpointing.Checkpointer(directory, keep=3)
    step, restored, record = ckpt.restore_latest(checkpointing.abstract_like(state))
    assert (step, record) == (5, {"examples_seen": 5, "train_wall_s": 0})
    np.testing.assert_array_equal(np.asarray(restored.tables["t"]), np.asarray(state.tables["t"]) + 5)
    err = capsys.readouterr().err
    expected = "1 of 6 arrays differ from their checksums (first: .tables['t'])"
    assert f"checkpoint {directory}/15 is unusable ({expected})" in err
    assert f"checkpoint {directory}/10 is unusable" in err and f"older checkpoint {directory}/5" in err
    assert ckpt.latest_step() == 5 and sorted(os.listdir(directory)) == ["5"]
    assert sorted(n.split("-")[0] for n in os.listdir(directory + ".rejected")) == ["10", "15"]
    ckpt.close()


def test_restore_latest_without_a_usable_checkpoint_moves_nothing(tmp_path):
    state = _state(_mesh(8, 1))
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory)
    ckpt.save(5, state, {"examples_seen": 5, "train_wall_s": 0.0})
    ckpt.close()
    _edit_record(os.path.join(directory, "5"), lambda r: r["checksums"].update({".step": "0" * 16}))
    ckpt = checkpointing.Checkpointer(directory)
    with pytest.raises(checkpointing.NoUsableCheckpoint, match=f"no checkpoint in {directory} could be restored "
                       r"\(step 5: 1 of 6 arrays differ"):  # fmt: skip
        ckpt.restore_latest(checkpointing.abstract_like(state))
    assert os.listdir(directory) == ["5"] and not os.path.exists(directory + ".rejected")
    empty = checkpointing.Checkpointer(str(tmp_path / "empty"))
    assert empty.restore_latest(checkpointing.abstract_like(state)) is None


# -- a damaged newest checkpoint in a real run ------------------------------------------------------------------

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")


def _tiny_train(run_dir, data_dir):
    gin.clear_config()
    train_cli.parse_config([TINY], [f'synthetic_criteo.data_dir = "{data_dir}"'])
    try:
        return trainer.train(run_dir=str(run_dir))
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """tiny.gin run to its end (40 steps, checkpoints 20, 30, 40): (run dir, data dir, results)."""
    root = tmp_path_factory.mktemp("finished")
    results = _tiny_train(root / "run", root / "data")
    return root / "run", root / "data", results


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_4k(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(4096)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize(
    "damage, reason",
    # Flipped bytes in a zstd chunk either fail to decode or decode to other values, which the checksums catch.
    [(_truncate, "OUT_OF_RANGE: Error reading"), (_flip_4k, "ZSTD_decompressStream|differ from their checksums")],
)
def test_damaged_newest_checkpoint_resumes_from_the_previous_and_matches(
    finished_run, tmp_path, capsys, damage, reason
):
    run_dir, data_dir, uninterrupted = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    os.remove(copy / "results.json")
    data_files = glob.glob(str(copy / "checkpoints" / "40" / "state" / "ocdbt.process_0" / "d" / "*"))
    damage(max(data_files, key=os.path.getsize))  # the tables' chunks
    capsys.readouterr()
    results = _tiny_train(copy, data_dir)
    out, err = capsys.readouterr()
    assert f"checkpoint {copy}/checkpoints/40 is unusable (" in err and re.search(reason, err), err
    assert "Resuming from the checkpoint at step 30" in out
    for split in ("valid", "test"):
        for key in ("auc", "logloss"):
            assert results[split][key] == pytest.approx(uninterrupted[split][key], rel=1e-6, abs=1e-7), (split, key)
    assert results["examples_seen"] == uninterrupted["examples_seen"]
    assert sorted(os.listdir(copy / "checkpoints")) == ["20", "30", "40"]  # 40 written again, the damaged one aside
    rows = [json.loads(line) for line in open(copy / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(5, 41, 5))  # no step logged twice
    assert sum("test/auc" in r for r in rows) == 1
