"""Comparing two training states leaf by leaf (tables, slots, dense parameters, optax state)."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def saved_arrays(run_dir, step: int):
    """Every array of ``run_dir``'s checkpoint at ``step`` as saved, restored onto this process's first device
    (the saving processes' devices need not exist here)."""
    path = os.path.join(run_dir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)  # fmt: skip
    return checkpointer.restore(path, target)


def checkpoint_state(run_dir, step: int) -> dict:
    """The numeric state (tables, slots, dense parameters, optax state) of ``run_dir``'s checkpoint at ``step``."""
    state = saved_arrays(run_dir, step)
    return {key: jax.tree.map(np.asarray, state[key]) for key in ("tables", "table_slots", "params", "opt_state")}


def assert_states_close(want_state: dict, got_state: dict, atol: float) -> None:
    """Every leaf of ``got_state[key]`` within ``atol`` of ``want_state[key]``, named by its path on failure."""
    for key, tree in want_state.items():
        want_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        got_leaves = jax.tree.leaves(got_state[key])
        assert len(got_leaves) == len(want_leaves), key
        for (where, want), got in zip(want_leaves, got_leaves):
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"{key}{jax.tree_util.keystr(where)}")
