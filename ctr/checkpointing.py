"""Checkpoints of the whole training state with orbax, restorable onto any mesh.

A checkpoint holds the :class:`~ctr.trainer.TrainState` (dense parameters, optax state, tables, sparse
optimizer slots, step, RNG) and a small JSON record (examples seen, wall time so far, checksums). The input
position is the step itself: datasets produce a pure function of (seed, step) (see :mod:`ctr.data.dataset`).
Saves are asynchronous; orbax writes into a temporary directory and renames it when complete, so a run killed
mid-save resumes from the previous complete checkpoint.

Integrity: the record holds a 64-bit checksum of every saved array (:func:`checksums`: computed on device, so it
costs one pass over the state and no host copy, and does not depend on the sharding). It is written inside the
checkpoint, so a checkpoint and its checksums are complete together. :meth:`Checkpointer.restore_latest`
verifies them; a checkpoint that does not parse (a truncated or missing file) or does not match (changed bytes)
is set aside (moved to ``<directory>.rejected/``) with a warning naming it, and the next older one is used.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ctr import errors, paths

_CHECKSUMS = "checksums"


class CheckpointCorrupt(ValueError):
    """A checkpoint whose arrays do not match the checksums it recorded."""


class NoUsableCheckpoint(errors.UserError):
    """Every checkpoint of a run directory failed to restore."""


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
        self._directory = os.fspath(paths.resolve(directory))  # a gs:// URI stays one; orbax writes there
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        record = {**record, _CHECKSUMS: checksums(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state`` (a pytree of
        ``jax.ShapeDtypeStruct`` with shardings), resharding when the mesh differs from the saved one, and
        verifies the recorded checksums.

        Raises:
          CheckpointCorrupt: an array differs from what was saved; orbax's errors for files that do not parse.
        """
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()),
        )
        state, record = out["state"], dict(out["record"])
        expected = record.pop(_CHECKSUMS, None)
        if expected is None:
            _warn(f"checkpoint {self._step_dir(step)} has no checksums (written before they were recorded): "
                  "restored unverified")  # fmt: skip
            return state, record
        got = checksums(state)
        wrong = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        if wrong:
            raise CheckpointCorrupt(f"{len(wrong)} of {len(got)} arrays differ from their checksums "
                                    f"(first: {wrong[0]})")  # fmt: skip
        return state, record

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, record) of the newest checkpoint that restores and verifies; None without checkpoints.

        Newer checkpoints that failed are set aside (so that the resumed run can save those steps again) only once
        an older one restored: if none does, nothing is moved.

        Raises:
          NoUsableCheckpoint: there are checkpoints, and none restores (naming each and why).
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, record = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001  (orbax and TensorStore raise many types for a damaged file)
                failed.append((step, _root_cause(e)))
                _warn(f"checkpoint {self._step_dir(step)} is unusable ({failed[-1][1]}); trying the previous one")
                continue
            if failed:
                moved = self._set_aside([s for s, _ in failed])
                _warn(f"resuming from the older checkpoint {self._step_dir(step)}; set aside: {', '.join(moved)}")
            return step, state, record
        if failed:
            listed = "; ".join(f"step {s}: {why}" for s, why in failed)
            raise NoUsableCheckpoint(f"no checkpoint in {self._directory} could be restored ({listed}); move the "
                                     "directory away to start the run over")  # fmt: skip
        return None

    def _step_dir(self, step: int) -> str:
        return paths.join(self._directory, str(step))

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Moves the checkpoints of ``steps`` to ``<directory>.rejected/<step>-<time>``; returns where to."""
        moved = []
        target_dir = self._directory + ".rejected"
        if jax.process_index() == 0:
            paths.makedirs(target_dir)
        for step in steps:
            target = paths.join(target_dir, f"{step}-{int(time.time())}")
            if jax.process_index() == 0:
                paths.move_tree(self._step_dir(step), target)
            moved.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ctr-checkpoints-set-aside")
        self._manager.reload()
        return moved

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying each array's sharding (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def checksums(tree: Any) -> dict[str, str]:
    """``{path: 16 hex digits}``: a 64-bit checksum of every array leaf of ``tree`` (its bits and positions),
    computed on device; the same for any sharding of the same values."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    digests = _digest_all([leaf for _, leaf in leaves])
    out = {}
    for (path, _), digest in zip(leaves, digests):
        lo, hi = (int(v) for v in np.asarray(digest.addressable_data(0)))  # replicated: any shard has it
        out[jax.tree_util.keystr(path)] = f"{hi:08x}{lo:08x}"
    return out


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (64-bit values: a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _digest_all(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per leaf ``[2]`` uint32: sums of two hashes of (word, flat position) over every word."""
    out = []
    for x in leaves:
        w = _words(jnp.asarray(x))
        position = jnp.zeros(w.shape, jnp.uint32)
        for axis in range(w.ndim):  # the flat index, built from iotas so no reshape moves sharded data
            position = position * jnp.uint32(w.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
        h1 = _fmix(w ^ _fmix(position + jnp.uint32(0x9E3779B9)))
        h2 = _fmix(h1 + jnp.uint32(0x7F4A7C15))
        out.append(jnp.stack([jnp.sum(h1, dtype=jnp.uint32), jnp.sum(h2, dtype=jnp.uint32)]))
    return out


def _root_cause(e: BaseException) -> str:
    """The innermost error of a chain as one short line: for a damaged file, TensorStore's own line ("Requested
    byte range ... is not valid") names the array and the file, where orbax's wrapper quotes a 10 KB spec."""
    seen = [e]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    return errors.one_line(seen[-1])


def _warn(message: str) -> None:
    """A warning the user sees (process 0 prints it; orbax's INFO logs are silenced by the command)."""
    if jax.process_index() == 0:
        print(f"ctr: warning: {message}", file=sys.stderr, flush=True)
