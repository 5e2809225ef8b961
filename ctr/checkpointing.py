"""Checkpoints of the whole training state with orbax, restorable onto any mesh.

A checkpoint holds the :class:`~ctr.train_state.TrainState` (dense parameters, optax state, tables, sparse
optimizer slots, step, RNG) and a small JSON record (examples seen, wall time so far, checksums). The input
position is the step itself: datasets produce a pure function of (seed, step) (see :mod:`ctr.data.dataset`).
Saves are asynchronous; orbax writes into a temporary directory and renames it when complete, so a run killed
mid-save resumes from the previous complete checkpoint.

Integrity: the record holds a 64-bit checksum of every saved array (:func:`checksums`: computed on device, so it
costs one pass over the state and no host copy, and does not depend on the sharding). It is written inside the
checkpoint, so a checkpoint and its checksums are complete together. :meth:`Checkpointer.restore_latest`
verifies them; a checkpoint that does not parse (a truncated or missing file) or does not match (changed bytes)
is set aside (moved to ``<directory>.rejected/``) with a warning naming it, and the next older one is used.

Resharding: a checkpoint restores onto any device count, mesh shape and table rule (``make_mesh.*``,
``logical_rules.table_rows``) and from any number of processes: orbax reads, for every device of the target
sharding, only that device's slice of each array and builds the array from those slices, so no device ever
holds a whole sharded table (a host buffers the slices of its own devices). Table padding: tables have ``row_alignment``-padded row counts that the mesh does not change, but a run
needing more shards may raise the alignment. The record keeps each table's logical row count (the rows lookups
address); a restore into a table whose padded row count differs but whose logical rows are the same copies
those rows and zero-fills the new padding, and the checksums of table and slot arrays cover logical rows only,
so padding is never compared or read as data.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ctr import errors, paths

_CHECKSUMS = "checksums"
_LOGICAL_ROWS = "logical_rows"  # {leaf path: rows addressed}, for tables and their slots


class CheckpointCorrupt(ValueError):
    """A checkpoint whose arrays do not match the checksums it recorded."""


class NoUsableCheckpoint(errors.UserError):
    """Every checkpoint of a run directory failed to restore."""


class CheckpointMismatch(errors.UserError):
    """A checkpoint whose arrays do not fit this run's config (other than in table padding)."""


@gin.configurable
class Checkpointer:
    """Saves every ``every_steps`` steps (and on request), keeps the newest ``keep``.

    Args:
      directory: ``<run_dir>/checkpoints``.
      every_steps: save period in steps (0 = only at the end and on SIGTERM).
      keep: number of checkpoints kept.
      table_rows: ``{table name: logical rows}`` (the rows lookups address, without alignment padding) of the
        ``tables`` / ``table_slots`` entries of the saved state; None: no table padding is known.
      enabled: False saves nothing, not even at the end or on SIGTERM, so the run cannot resume (throughput
        benchmarks, whose tables of tens of GB would take longer to save than to train on).
    """

    def __init__(self, directory: str, every_steps: int = 1000, keep: int = 3,
                 table_rows: Mapping[str, int] | None = None, enabled: bool = True):  # fmt: skip
        self.every_steps = every_steps if enabled else 0
        self.enabled = enabled
        self._directory = os.fspath(paths.resolve(directory))  # a gs:// URI stays one; orbax writes there
        self._table_rows = dict(table_rows or {})
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rows = _leaf_rows(state, self._table_rows)
        record = {**record, _CHECKSUMS: checksums(state, rows)}
        if rows:
            record[_LOGICAL_ROWS] = rows
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state`` (a pytree of
        ``jax.ShapeDtypeStruct`` with shardings), resharding when the mesh differs from the saved one (each
        device reads only its own slice), re-padding tables whose alignment differs (see module docstring), and
        verifies the recorded checksums.

        Raises:
          CheckpointMismatch: an array's saved shape does not fit ``abstract_state`` (other than table padding).
          CheckpointCorrupt: an array differs from what was saved; orbax's errors for files that do not parse.
        """
        saved_rows = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        saved_rows = dict(saved_rows.get(_LOGICAL_ROWS) or {})
        repad = self._check_shapes(step, abstract_state, saved_rows)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state, strict=not repad), record=ocp.args.JsonRestore()
            ),
        )
        state, record = out["state"], dict(out["record"])
        record.pop(_LOGICAL_ROWS, None)
        expected = record.pop(_CHECKSUMS, None)
        if expected is None:
            _warn(f"checkpoint {self._step_dir(step)} has no checksums (written before they were recorded): "
                  "restored unverified")  # fmt: skip
            return state, record
        got = checksums(state, saved_rows)
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

    def _check_shapes(self, step: int, abstract_state: Any, saved_rows: dict[str, int]) -> bool:
        """Whether some table or slot differs from its saved shape in padding only (restore non-strict).

        Raises:
          CheckpointMismatch: any other difference (naming the first array and both shapes).
        """
        saved = {_names(p): m.shape for p, m in jax.tree_util.tree_flatten_with_path(
            self._manager.item_metadata(step)["state"])[0]}  # fmt: skip
        target_rows = _leaf_rows(abstract_state, self._table_rows)
        repad = False
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            key, shape = jax.tree_util.keystr(path), tuple(saved.get(_names(path), ()))
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # saved as its key data: [*shape, 2]
                shape = shape[: leaf.ndim]
            if shape == tuple(leaf.shape):
                continue
            logical = saved_rows.get(key)
            if (logical is not None and logical == target_rows.get(key) and len(shape) == leaf.ndim > 0
                    and shape[1:] == tuple(leaf.shape[1:]) and logical <= min(shape[0], leaf.shape[0])):  # fmt: skip
                repad = True
                continue
            raise CheckpointMismatch(
                f"checkpoint {self._step_dir(step)}: {key} was saved with shape {shape} ({saved_rows.get(key)} "
                f"logical rows) and this run's config makes it {tuple(leaf.shape)} ({target_rows.get(key)}); only "
                "table padding may differ (the config's tables, models and optimizers must be the ones saved)"
            )
        return repad

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


def logical_table_rows(collection: Any) -> dict[str, int]:
    """``{table name: rows its lookups address}`` of an embedding collection (the rest is alignment padding; a
    table no lookup reads counts whole). Tower collections (:mod:`embeddings.towers`): their towers' tables."""
    towers = getattr(collection, "towers", None)
    if towers is not None:
        from embeddings.towers import SEP

        return {f"{tower}{SEP}{name}": rows for tower, c in towers for name, rows in logical_table_rows(c).items()}
    used: dict[str, int] = {}
    for lk in collection.lookups:
        used[lk.table] = max(used.get(lk.table, 0), lk.offset + lk.num_buckets)
    return {name: used.get(name, t.num_rows) for name, t in collection.tables.items()}


def checksums(tree: Any, rows: Mapping[str, int] | None = None) -> dict[str, str]:
    """``{path: 16 hex digits}``: a 64-bit checksum of every array leaf of ``tree`` (its bits and positions),
    computed on device; the same for any sharding of the same values. A leaf whose path is in ``rows`` counts
    only its first ``rows[path]`` rows (logical table rows: the same for any padding)."""
    rows = rows or {}
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    limits = tuple(rows.get(jax.tree_util.keystr(path), -1) for path, _ in leaves)
    digests = _digest_all([leaf for _, leaf in leaves], limits)
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


@functools.partial(jax.jit, static_argnums=1)
def _digest_all(leaves: list[jax.Array], limits: tuple[int, ...]) -> list[jax.Array]:
    """Per leaf ``[2]`` uint32: sums of two hashes of (word, flat position) over every word (of the first
    ``limit`` rows where the leaf's limit is not -1)."""
    out = []
    for x, limit in zip(leaves, limits):
        w = _words(jnp.asarray(x))
        position = jnp.zeros(w.shape, jnp.uint32)
        for axis in range(w.ndim):  # the flat index, built from iotas so no reshape moves sharded data
            position = position * jnp.uint32(w.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
        h1 = _fmix(w ^ _fmix(position + jnp.uint32(0x9E3779B9)))
        h2 = _fmix(h1 + jnp.uint32(0x7F4A7C15))
        if limit >= 0:
            kept = jax.lax.broadcasted_iota(jnp.int32, w.shape, 0) < limit
            h1, h2 = (jnp.where(kept, h, jnp.uint32(0)) for h in (h1, h2))
        out.append(jnp.stack([jnp.sum(h1, dtype=jnp.uint32), jnp.sum(h2, dtype=jnp.uint32)]))
    return out


def _names(path: Any) -> tuple[str, ...]:
    """A tree path as plain names (a dataclass field and a dict key of the same name compare equal)."""
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _leaf_rows(tree: Any, table_rows: Mapping[str, int]) -> dict[str, int]:
    """``{leaf path: logical rows}`` for the ``tables`` and ``table_slots`` leaves of the tables in
    ``table_rows`` (slots are row-aligned with their table)."""
    out = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = _names(path)
        if len(names) >= 2 and names[0] in ("tables", "table_slots") and names[1] in table_rows:
            out[jax.tree_util.keystr(path)] = int(table_rows[names[1]])
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
