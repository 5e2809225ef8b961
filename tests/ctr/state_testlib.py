"""Comparing two training states leaf by leaf (tables, slots, dense parameters, optax state)."""
import jax
import numpy as np


def assert_states_close(want_state: dict, got_state: dict, atol: float) -> None:
    """Every leaf of ``got_state[key]`` within ``atol`` of ``want_state[key]``, named by its path on failure."""
    for key, tree in want_state.items():
        want_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        got_leaves = jax.tree.leaves(got_state[key])
        assert len(got_leaves) == len(want_leaves), key
        for (where, want), got in zip(want_leaves, got_leaves):
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"{key}{jax.tree_util.keystr(where)}")
