r"""Export a trained run as a TensorFlow SavedModel for TF Serving: raw features in, probabilities out.

``bazel run //ctr:export -- --run_dir=RUN --export_dir=DIR [--step=N]`` (or ``export_at_end.enabled = True``
in a training config) writes ``DIR/<step>/saved_model.pb + variables/``: TF Serving's layout for
``--model_base_path=DIR``, the version being the training step.

How: the run's ``config.gin`` rebuilds the dataset schema, the embedding collection and the model; the
checkpoint is restored onto one device (tables trained row-sharded on many devices come back whole) and
SparseAdam's deferred moves are flushed, as before an evaluation. The model's eval forward pass, gathering
rows with XLA's gather (no ``shard_map`` route, no Pallas kernel), is converted with ``jax2tf`` (native
serialization: an ``XlaCallModule`` op, batch-polymorphic) and the dense parameters and tables become
``tf.Variable``\ s, so ``saved_model.pb`` stays small. Everything that turns raw strings into row ids runs in
TensorFlow before it (:mod:`ctr.serving`, then the collection's ``host_ids_tf``): fingerprints are 63-bit and
JAX runs without int64, so only int32 row ids and uint32 DHE words cross into the converted function.

Signatures:

- ``serving_default``: one input per raw column (:func:`ctr.serving.raw_layout`) -> ``probability`` and
  ``logit`` ``[B]`` float32; CETNet also ``<tower>_probability`` ``[B]`` and ``fusion_weights`` ``[B, K]``.
- ``parse_lines``: ``lines`` ``[B]`` raw TSV/CSV lines in the file's layout -> the same outputs (Criteo, Avazu).
- ``row_ids``: the raw columns -> what crosses into the model: every lookup's int32 row ids (DHE: uint32 words)
  and the dense features and masks (for checking serving against the training pipeline).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from ctr import checkpointing, errors, optimizers, paths, tf_import, trainer
from ctr import mesh as mesh_lib
from ctr import train_state as train_state_lib
from ctr import models as model_zoo
from ctr import serving
from ctr.data import schema as schema_lib
from ctr.data import dataset as dataset_lib
from ctr.data import vocab as vocab_lib
from embeddings import table_placement

COMMAND = "ctr.export"
DEFAULT_PLATFORMS = ("cpu",)


@dataclasses.dataclass
class Restored:
    """A run rebuilt from its config with one state (a checkpoint's: :func:`restore`), on one device.

    Attributes:
      step: the checkpoint's step.
      schema: the dataset schema.
      collection: the embedding collection as trained (with the training mesh's row axes, on one device).
      serving_collection: the same, unsharded, reading rows with XLA's gather.
      module: the ``CTRModule`` (collection + network) of ``serving_collection``.
      params, tables: numpy dense parameters and whole tables (flushed).
      vocab: the prepared data's vocabulary when the run trained on data prepared with one, else None.
    """

    step: int
    schema: schema_lib.FeatureSchema
    collection: Any
    serving_collection: Any
    module: Any
    params: Any
    tables: dict[str, np.ndarray]
    vocab: vocab_lib.Vocabulary | None


def _train_argument(name: str) -> Any:
    """What ``trainer.train`` receives for ``name`` under the parsed config (references called as gin would)."""
    try:
        value = gin.query_parameter(f"train.{name}")
    except ValueError:
        return inspect.signature(trainer.train).parameters[name].default
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value


def _xla_gather(collection: Any) -> Any:
    """``collection`` unsharded, reading rows with XLA's gather (what exports: see the module docstring)."""
    if hasattr(collection, "towers"):
        return dataclasses.replace(collection, towers=tuple((n, _xla_gather(c)) for n, c in collection.towers))
    lookup = table_placement.LookupOptions(path="xla", local_gather="take", rows_dtype=collection.lookup.rows_dtype)
    return dataclasses.replace(collection, lookup=lookup, placement=None)


@dataclasses.dataclass
class Rebuilt:
    """The run of the parsed config rebuilt on one device, before any state (what :func:`restore` fills).

    Attributes:
      dataset: the training dataset (its schema, and its data directory for a vocabulary).
      collection: the embedding collection as trained (with the training mesh's row axes, on one device).
      module: the trainer's ``CTRModule`` of ``collection``.
      sparse_optimizer: the tables' optimizer (its slots are part of a checkpoint; flushed before export).
      init_state: ``rng -> TrainState``, the trainer's state layout (for a checkpoint's shapes).
    """

    dataset: Any
    collection: Any
    module: Any
    sparse_optimizer: Any
    init_state: Any


def rebuild() -> Rebuilt:
    """Rebuilds the run of the parsed config on the first local device (nothing is computed)."""
    dataset = _train_argument("dataset_fn")()
    schema = dataset.schema
    device = jax.local_devices()[0]
    mesh = jax.sharding.Mesh(np.array([device]).reshape(1, 1), mesh_lib.AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)  # fmt: skip
    rules = mesh_lib.logical_rules()
    collection = _train_argument("embedding_fn")(schema).with_mesh(mesh, rules["table_rows"])
    network = model_zoo.get(_train_argument("model_name"))()
    module = train_state_lib.CTRModule(collection=collection, network=network)
    sparse_optimizer = _train_argument("sparse_optimizer")
    init_state, _, _ = train_state_lib.init_state_fn(dataset, collection, module, optimizers.dense_optimizer(),
                                                     sparse_optimizer, probe_rows=1)  # fmt: skip
    return Rebuilt(dataset=dataset, collection=collection, module=module, sparse_optimizer=sparse_optimizer,
                   init_state=init_state)  # fmt: skip


def restore(run_dir: str, step: int | None = None) -> Restored:
    """Rebuilds the run of the parsed config (``config.gin`` of ``run_dir``) and restores ``step`` (default the
    newest checkpoint) onto the first local device, as exported (:func:`from_state`).

    Raises:
      errors.UserError: no checkpoint, or no checkpoint at ``step``.
    """
    return from_state(*restore_state(run_dir, step))


def restore_state(run_dir: str, step: int | None = None) -> tuple[Rebuilt, Any, int]:
    """``(run, TrainState as checkpointed, step)``: what :func:`restore` exports, before :func:`from_state`."""
    ckpt_dir = paths.join(run_dir, "checkpoints")
    found = paths.resolve(ckpt_dir).iterdir() if paths.is_dir(ckpt_dir) else []
    steps = sorted(int(p.name) for p in found if p.name.isdigit())
    if not steps:
        raise errors.UserError(f"{ckpt_dir}: no checkpoint to export (train the run first)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise errors.UserError(f"--step={step}: no such checkpoint in {ckpt_dir} (have {steps})")
    ckpt = None
    try:
        run = rebuild()
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shapes = jax.eval_shape(run.init_state, jax.random.key(0))
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes)
        ckpt = checkpointing.Checkpointer(ckpt_dir, table_rows=checkpointing.logical_table_rows(run.collection))
        state, _ = ckpt.restore(step, abstract)
    finally:
        if ckpt is not None:
            ckpt.close()
    return run, state, int(step)


def from_state(run: Rebuilt, state: Any, step: int) -> Restored:
    """``state`` (a ``TrainState`` of ``run``'s layout) as exported at ``step``: tables flushed, the dense
    parameters' moving average where the optimizer keeps one (:func:`ctr.optimizers.eval_params`), numpy."""
    tables, _ = run.collection.flush(state.tables, state.table_slots, run.sparse_optimizer, state.step)
    vocab = None
    data_dir = getattr(run.dataset, "data_dir", None)
    if data_dir and paths.is_dir(paths.join(data_dir, "vocab")):
        vocab = vocab_lib.Vocabulary.load(data_dir)
    serving_collection = _xla_gather(run.collection)
    return Restored(
        step=step, schema=run.dataset.schema, collection=run.collection, serving_collection=serving_collection,
        module=train_state_lib.CTRModule(collection=serving_collection, network=run.module.network),
        params=jax.tree.map(np.asarray, optimizers.eval_params(state.params, state.opt_state)),  # the moving average
        tables={k: np.asarray(v) for k, v in tables.items()}, vocab=vocab,
    )  # fmt: skip


def serving_outputs(module: Any, params: Any, tables: Any, dev: dict, ids: dict) -> dict[str, jax.Array]:
    """The eval forward pass as served: ``logit``, ``probability`` ``[B]`` (+ CETNet's towers and weights)."""
    rows = module.collection.read_rows(tables, ids)
    out = module.apply({"params": params}, rows, dev, train=False)
    logit = module.network.logits(out).astype(jnp.float32)
    result = {"logit": logit, "probability": jax.nn.sigmoid(logit)}
    parts = getattr(module.network, "parts", None)  # an ensemble's members (ctr.model_io.Network)
    if parts:
        members = parts(out)
        for name, (value, _) in members.items():
            result[f"{name}_probability"] = jax.nn.sigmoid(value.astype(jnp.float32))
        result["fusion_weights"] = jnp.stack([w for _, w in members.values()], axis=-1).astype(jnp.float32)
    return result


def build_module(restored: Restored, asset_dir: str,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The ``tf.Module`` to save (variables, and vocabulary tables whose files are written to ``asset_dir``, which
    must live until the module is saved) and its signatures, traced once: signature name -> concrete function.

    The functions are not attributes of the module: ``tf.saved_model.save`` would trace them again (lowering
    the model again), and TF Serving reads only the signatures."""
    tf = tf_import.tensorflow()
    from jax.experimental import jax2tf

    schema, collection = restored.schema, restored.serving_collection
    layout = serving.raw_layout(schema)
    module = restored.module

    def forward(params, tables, dev, ids):
        return serving_outputs(module, params, tables, dev, ids)

    converted = jax2tf.convert(
        forward, polymorphic_shapes=[None, None, "(b, ...)", "(b, ...)"], with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )  # fmt: skip

    root = tf.Module()
    root.params = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), restored.params)
    root.tables = {name: tf.Variable(t, trainable=False, name=name.replace("/", "__")) for name, t in restored.tables.items()}
    tables_by_content: dict[bytes, Any] = {}

    def make_table(kept: np.ndarray) -> Any:
        """One fingerprint -> position table per distinct vocabulary, read from an asset file."""
        key = hashlib.sha256(np.asarray(kept, np.int64).tobytes()).digest()
        if key not in tables_by_content:
            path = os.path.join(asset_dir, f"vocab_{len(tables_by_content)}.txt")
            tables_by_content[key] = vocab_lib.index_table_tf(kept, path)
        return tables_by_content[key]

    root.index_tables = collection.index_tables_tf(make_table)
    vocab = restored.vocab
    root.vocab_tables = {name: make_table(kept) for name, kept in vocab.kept.items()} if vocab is not None else {}

    def preprocess(features):
        batch = serving.host_batch_tf(schema, features, vocab, root.vocab_tables)
        ids = collection.host_ids_tf(batch, root.index_tables)
        dev = {k: batch[k] for k in device_keys(schema)}
        return dev, ids

    signature = layout.input_signature()
    preprocess_fn = tf.function(preprocess, input_signature=[signature], jit_compile=False, autograph=False)

    def score(features):
        dev, ids = preprocess_fn(features)
        return converted(root.params, root.tables, dev, ids)

    serving_fn = tf.function(score, input_signature=[signature], jit_compile=False, autograph=False)
    signatures = {"serving_default": serving_fn.get_concrete_function()}

    def row_ids(features):  # the same preprocessing function as serving_default (traced once)
        dev, ids = preprocess_fn(features)
        return {**dev, **{f"ids/{k}": v for k, v in ids.items()}}

    signatures["row_ids"] = tf.function(row_ids, input_signature=[signature], jit_compile=False,
                                        autograph=False).get_concrete_function()  # fmt: skip
    if layout.line_fields:  # calls serving_default's function: the model is lowered once
        lines_spec = tf.TensorSpec(None, tf.string, name="lines")  # checked in the graph (see serving)
        signatures["parse_lines"] = tf.function(
            lambda lines: serving_fn(serving.split_lines_tf(layout, lines)), input_signature=[lines_spec],
            jit_compile=False, autograph=False,
        ).get_concrete_function()
    return root, signatures


def device_keys(schema: schema_lib.FeatureSchema) -> list[str]:
    """The keys of ``train_state_lib.device_batch`` the forward pass reads (not the label)."""
    return ([schema_lib.DENSE] if schema.dense else []) + [seq.mask_key for seq in schema.sequences]


def export(run_dir: str, export_dir: str, step: int | None = None, platforms: Sequence[str] = DEFAULT_PLATFORMS,
           verbose: bool = True, restored: Restored | None = None) -> str:  # fmt: skip
    """Exports the run of the parsed config to ``export_dir/<step>`` (``restored``: the run already restored,
    :func:`restore`); returns that path.

    The version directory appears whole or not at all (written beside it, then renamed); an existing version
    is replaced.
    """
    tf = tf_import.tensorflow()

    start = time.time()
    restored = restore(run_dir, step) if restored is None else restored
    path = paths.join(export_dir, str(restored.step))
    remote = paths.is_remote(export_dir)
    with tempfile.TemporaryDirectory() as work:
        # Local: written beside the version directory, then renamed. An object store has no rename: the
        # SavedModel is written locally and copied there, saved_model.pb last (what TF Serving looks for).
        partial = os.path.join(work, "saved_model") if remote else f"{path}.partial{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        if not remote:
            os.makedirs(export_dir, exist_ok=True)
        asset_dir = os.path.join(work, "assets")
        os.makedirs(asset_dir)
        root, signatures = build_module(restored, asset_dir, platforms)
        tf.saved_model.save(root, partial, signatures=signatures)
        text = describe(partial, signatures, time.time() - start, serving.raw_layout(restored.schema))
        text = text.replace(partial, path)
        if remote:
            pb = os.path.join(partial, "saved_model.pb")
            held = os.path.join(work, "saved_model.pb")
            os.replace(pb, held)
            paths.copy_tree(partial, path)
            paths.copy_file(held, paths.join(path, "saved_model.pb"))
        else:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(partial, path)
    if verbose:
        print(text, flush=True)
    return path


def describe(path: str, signatures: dict[str, Any], seconds: float, layout: serving.RawLayout) -> str:
    """What was written and the signatures, for the command's output (input shapes as checked in the graph:
    the specs themselves leave them open, see :meth:`ctr.serving.RawLayout.input_signature`)."""
    sizes = {name: os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(path) for name in names}
    pb = os.path.getsize(os.path.join(path, "saved_model.pb"))
    lines = [f"Exported {path} in {seconds:.1f}s: saved_model.pb {pb / 1e6:.2f} MB, "
             f"{sum(sizes.values()) / 1e6:.2f} MB in all (variables/ holds the tables)"]  # fmt: skip
    for name, fn in signatures.items():
        args, kwargs = fn.structured_input_signature
        inputs = dict(kwargs)
        for arg in args:
            inputs.update(arg if isinstance(arg, dict) else {arg.name: arg})
        def dims(k):
            return "[B, L]".replace("L", str(layout.max_len)) if k in layout.sequences else "[B]"

        shown = ", ".join(f"{k}: {v.dtype.name}{dims(k)}" for k, v in inputs.items())
        outputs = ", ".join(f"{k}: {v.dtype.name}{list(v.shape)}".replace("None", "B")
                            for k, v in sorted(fn.structured_outputs.items()))  # fmt: skip
        if name == "row_ids":
            shown = "the inputs of serving_default"
            outputs = f"{len(fn.structured_outputs)} tensors (row ids per lookup, dense features, masks)"
        lines.append(f"  signature {name}({shown})\n    -> {outputs}")
    return "\n".join(lines)


@gin.configurable
def export_at_end(run_dir: str, enabled: bool = False, export_dir: str | None = None,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS) -> str | None:  # fmt: skip
    """The end-of-training hook (``export_at_end.enabled = True``): exports the run's last checkpoint to
    ``export_dir`` (default ``<run_dir>/export``); returns the version directory or None. Single-process runs
    only: a multi-host run exports afterwards with the command."""
    if not enabled:
        return None
    if jax.process_count() > 1:  # restoring on one host alone would wait on the others at orbax's barriers
        logging.warning("export_at_end: skipped in a %d-process run; export with `ctr.export --run_dir=%s`",
                        jax.process_count(), run_dir)  # fmt: skip
        return None
    return export(run_dir, export_dir or paths.join(run_dir, "export"), None, platforms)


def parse_run_config(run_dir: str, gin_params: Sequence[str] = ()) -> None:
    """Parses the run's ``config.gin`` (written by the trainer when it started) and ``gin_params``.

    Raises:
      errors.UserError: no config.gin (not a run directory).
      errors.ConfigError: a binding that does not parse.
    """
    from ctr import config

    import ctr.registration  # noqa: F401  (every configurable the config may name)

    path = paths.join(run_dir, "config.gin")
    if not paths.exists(path):
        raise errors.UserError(f"--run_dir={run_dir}: no config.gin (not a ctr run directory)")
    gin.clear_config()
    with tempfile.TemporaryDirectory() as local:  # gin reads local files; the run may be on gs://
        copy = os.path.join(local, "config.gin")
        paths.copy_file(path, copy)
        config.parse([copy], list(gin_params))


def main(argv: list[str]) -> int:
    from absl import flags, logging

    if len(argv) > 1:
        return errors.report(COMMAND, f"unexpected arguments: {argv[1:]}", "usage error")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    if "BUILD_WORKING_DIRECTORY" in os.environ:
        os.chdir(os.environ["BUILD_WORKING_DIRECTORY"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run_dir, export_dir = flags.FLAGS.run_dir, flags.FLAGS.export_dir
    if not run_dir or not export_dir:
        return errors.report(COMMAND, "--run_dir and --export_dir are required", "usage error")
    try:
        parse_run_config(run_dir, flags.FLAGS.gin_param)
    except errors.ConfigError as e:
        return errors.report(COMMAND, e, "configuration error")
    except errors.UserError as e:
        return errors.report(COMMAND, e)
    try:
        export(run_dir, export_dir, flags.FLAGS.step, tuple(flags.FLAGS.platforms))
    except errors.UserError as e:
        return errors.report(COMMAND, e)
    return errors.EXIT_OK


def run() -> None:
    from absl import app, flags

    flags.DEFINE_string("run_dir", None, "Run directory of a trained run (holds config.gin and checkpoints/).")
    flags.DEFINE_string("export_dir", None, "Model base directory; the SavedModel goes to <export_dir>/<step>.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Platforms to serialize the model for (cpu,cuda,tpu).")
    flags.DEFINE_multi_string("gin_param", [], "Extra gin bindings applied after the run's config.gin.")
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
