"""Checkpoints of the whole training state with orbax, restorable onto any mesh.

A checkpoint holds the :class:`~ctr.trainer.TrainState` (dense parameters, optax state, tables, sparse
optimizer slots, step, RNG) and a small JSON record (examples seen, wall time so far). The input position is
the step itself: datasets produce a pure function of (seed, step) (see :mod:`ctr.data.dataset`). Saves are
asynchronous; orbax writes into a temporary directory and renames it when complete, so a run killed mid-save
resumes from the previous complete checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp


@gin.configurable
class Checkpointer:
    """Saves every ``every_steps`` steps (and on request), keeps the newest ``keep``.

    Args:
      directory: ``<run_dir>/checkpoints``.
      every_steps: save period in steps (0 = only at the end and on SIGTERM).
      keep: number of checkpoints kept.
    """

    def __init__(self, directory: str, every_steps: int = 1000, keep: int = 3):
        self.every_steps = every_steps
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state`` (a pytree of
        ``jax.ShapeDtypeStruct`` with shardings), resharding when the mesh differs from the saved one."""
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["record"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying each array's sharding (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
