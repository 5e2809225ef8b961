"""Raw features -> the trainer's host batch, in TensorFlow: the preprocessing of an exported SavedModel.

Each dataset's serving inputs are its raw columns, as strings exactly as they appear in the raw files
(:func:`raw_layout`), ``[B]`` each, batch-polymorphic:

- Criteo: ``I1``..``I13`` and ``C1``..``C26`` (empty = missing).
- Avazu: ``hour`` (``YYMMDDHH``) and the 21 categorical columns of ``train.csv``.
- TaobaoAds: the impression's ``user``, ``adgroup_id``, ``pid``; the ad's ``cate_id``, ``campaign_id``,
  ``customer``, ``brand``, ``price``; the user's profile columns (empty for a user without a profile); and the
  behaviour histories ``cate_his``, ``brand_his``, ``btag_his`` as ``[B, L]`` strings (``L`` the trained
  ``max_len``) whose first ``history_length`` ``[B]`` (int64) entries are the user's last behaviours before the
  impression, oldest first, most recent last; the rest is padding and ignored. ``NULL`` is missing, as in the
  raw files.

:func:`host_batch_tf` turns them into the batch layout of :mod:`ctr.data.schema` with the data modules' own
TensorFlow functions (:func:`ctr.data.fingerprint.fingerprint`, :func:`ctr.data.criteo.int_bucket_strings_tf`,
:func:`ctr.data.avazu.time_features_tf`, :meth:`ctr.data.vocab.Vocabulary.apply_tf`), so serving computes the
fingerprints training read. Bad input (a column with the wrong rank, columns of different lengths, a value
that is not a number where the layout has one, a history length outside ``[0, L]``) fails with an
``InvalidArgumentError`` naming the column; unseen and missing categorical values are ordinary values, as in
training. :func:`split_lines_tf` cuts raw TSV/CSV lines (the file's full layout, label included and ignored)
into the same columns.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from ctr import tf_import
from ctr.data import avazu, criteo, taobao
from ctr.data import schema as schema_lib
from ctr.data import vocab as vocab_lib
from ctr.data.fingerprint import fingerprint

HISTORY_LENGTH = "history_length"
_INTEGER = r"-?[0-9]{1,19}"
_NUMBER = r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|\.[0-9]+([eE][-+]?[0-9]+)?"


@dataclasses.dataclass(frozen=True)
class RawLayout:
    """The serving inputs of one dataset.

    Attributes:
      columns: ``[B]`` string inputs, in signature order.
      sequences: ``[B, L]`` string inputs (with the ``[B]`` int64 :data:`HISTORY_LENGTH`).
      max_len: L.
      line_fields: the fields of one raw line in file order (for ``parse_lines``), or () when the dataset has no
        one-line form (TaobaoAds joins four files).
      delimiter: the raw files' field delimiter.
    """

    columns: tuple[str, ...]
    sequences: tuple[str, ...] = ()
    max_len: int = 0
    line_fields: tuple[str, ...] = ()
    delimiter: str = ","

    def input_signature(self) -> dict[str, Any]:
        """Input name -> ``tf.TensorSpec``. The specs leave the shape open: TensorFlow folds a rank check
        against a declared shape away at trace time, and a tensor of another rank would then fail deep in the
        model with a message naming nothing; :func:`check_inputs_tf` checks ranks and lengths at run time."""
        tf = tf_import.tensorflow()

        spec = {c: tf.TensorSpec(None, tf.string, name=c) for c in self.columns}
        for s in self.sequences:
            spec[s] = tf.TensorSpec(None, tf.string, name=s)
        if self.sequences:
            spec[HISTORY_LENGTH] = tf.TensorSpec(None, tf.int64, name=HISTORY_LENGTH)
        return spec


_TAOBAO_COLUMNS = ("user", "adgroup_id", "pid") + taobao.AD_COLUMNS[1:] + taobao.PROFILE_FEATURES
_TAOBAO_SEQUENCE_FIELDS = {"cate_his": "cate_id", "brand_his": "brand", "btag_his": "btag_his"}


def raw_layout(schema: schema_lib.FeatureSchema) -> RawLayout:
    """The serving inputs of ``schema``'s dataset."""
    if schema.name == criteo.NAME:
        return RawLayout(criteo.INT_FIELDS + criteo.CAT_FIELDS, line_fields=criteo.COLUMNS, delimiter="\t")
    if schema.name == avazu.NAME:
        return RawLayout(("hour",) + avazu.RAW_CATEGORICAL, line_fields=avazu.COLUMNS, delimiter=",")
    if schema.name == taobao.NAME:
        max_len = {s.max_len for s in schema.sequences}
        if tuple(s.name for s in schema.sequences) != tuple(_TAOBAO_SEQUENCE_FIELDS) or len(max_len) != 1:
            raise ValueError(f"unexpected TaobaoAds sequences {schema.sequences}")
        return RawLayout(_TAOBAO_COLUMNS, tuple(_TAOBAO_SEQUENCE_FIELDS), max_len.pop())
    raise ValueError(f"no serving layout for dataset {schema.name!r}")


def check_inputs_tf(layout: RawLayout, features: Mapping[str, Any]) -> dict[str, Any]:
    """``features`` once every input's shape (``[B]``, sequences ``[B, L]``, one ``B``: the first input's) is
    checked, reshaped to their static ranks. Everything after depends on the checks, and nothing before them
    can fail on a shape (TensorFlow would report that first, naming no input): dimensions are read from the
    shape padded with zeros, and the reshapes are valid for any element count."""
    tf = tf_import.tensorflow()

    names = layout.columns + layout.sequences + ((HISTORY_LENGTH,) if layout.sequences else ())
    out = {}
    batch = None
    for name in names:
        value = features[name]
        sequence = name in layout.sequences
        shown = f"[batch, {layout.max_len}]" if sequence else "[batch]"
        dims = tf.shape(value)
        padded = tf.pad(dims, [[0, 2]])  # [d0, d1, ...] and zeros: safe to index whatever the rank
        batch = padded[0] if batch is None else batch
        ok = tf.logical_and(tf.equal(tf.size(dims), 2 if sequence else 1), tf.equal(padded[0], batch))
        if sequence:
            ok = tf.logical_and(ok, tf.equal(padded[1], layout.max_len))
        check = tf.debugging.Assert(ok, [f"input {name}: expected shape {shown} with the batch length of {names[0]}, "
                                         "got", dims])  # fmt: skip
        with tf.control_dependencies([check]):
            flat = tf.reshape(tf.identity(value), [-1])
        if sequence:
            size = tf.size(flat)
            flat = tf.pad(flat, [[0, (layout.max_len - size % layout.max_len) % layout.max_len]])  # no-op once checked
            out[name] = tf.reshape(flat, [-1, layout.max_len])
        else:
            out[name] = flat
    return out


def _checked(name: str, values: Any, pattern: str, what: str) -> Any:
    """``values`` once asserted to match ``pattern`` (the message names the input and shows bad values)."""
    tf = tf_import.tensorflow()

    ok = tf.strings.regex_full_match(values, pattern)
    bad = tf.boolean_mask(values, tf.logical_not(ok))
    check = tf.debugging.Assert(
        tf.reduce_all(ok), [f"input {name}: expected {what}, got", bad[:3]], summarize=3, name=f"check_{name}"
    )
    with tf.control_dependencies([check]):
        return tf.identity(values)


def _null_to_missing(values: Any) -> Any:
    tf = tf_import.tensorflow()

    return tf.where(tf.equal(values, "NULL"), "", values)


def host_batch_tf(
    schema: schema_lib.FeatureSchema, features: Mapping[str, Any], vocab: vocab_lib.Vocabulary | None = None,
    vocab_tables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The raw inputs of :func:`raw_layout` -> the host batch of ``schema`` (no label or group): int64
    fingerprints per categorical feature and sequence (0 on padding), ``dense`` float32, sequence masks.

    ``vocab``/``vocab_tables``: the prepared data's vocabulary and its :func:`~ctr.data.vocab.index_table_tf`
    tables by vocabulary name, when the run trained on data prepared with one (values outside it become OOV).
    """
    tf = tf_import.tensorflow()

    layout = raw_layout(schema)
    features = check_inputs_tf(layout, features)
    batch: dict[str, Any] = {}
    if schema.name == criteo.NAME:
        ints, present = [], []
        for name in criteo.INT_FIELDS:
            value = _checked(name, features[name], f"|{_INTEGER}", "an integer or an empty string")
            present.append(tf.not_equal(value, ""))
            ints.append(tf.strings.to_number(tf.where(present[-1], value, "0"), tf.int64))
        batch[schema_lib.DENSE] = tf.stack(
            [tf.math.log1p(tf.cast(tf.maximum(x, 0), tf.float32)) for x in ints], axis=1
        )
        for name in criteo.CAT_FIELDS:
            batch[name] = fingerprint(name, features[name])
        for name, x, p in zip(criteo.INT_FIELDS, ints, present):
            if criteo.bucket_field(name) in schema.categorical:
                field = criteo.bucket_field(name)
                batch[field] = fingerprint(field, criteo.int_bucket_strings_tf(x, p))
    elif schema.name == avazu.NAME:
        hour = _checked("hour", features["hour"], "[0-9]{6}([01][0-9]|2[0-3])", "YYMMDDHH")
        for name in avazu.RAW_CATEGORICAL:
            batch[name] = fingerprint(name, features[name])
        for name, value in avazu.time_features_tf(hour).items():
            batch[name] = fingerprint(name, value)
    elif schema.name == taobao.NAME:
        side = set(taobao.AD_FEATURES) | set(taobao.PROFILE_FEATURES)  # side-table columns: NULL is missing
        for name in ("user", "adgroup_id", "pid") + taobao.AD_FEATURES + taobao.PROFILE_FEATURES:
            value = _null_to_missing(features[name]) if name in side else features[name]
            batch["userid" if name == "user" else name] = fingerprint("userid" if name == "user" else name, value)
        price = _checked("price", features["price"], _NUMBER, "a number >= 0")
        batch[schema_lib.DENSE] = tf.cast(tf.math.log1p(tf.strings.to_number(price, tf.float64)), tf.float32)[:, None]
        length = features[HISTORY_LENGTH]
        in_range = tf.logical_and(length >= 0, length <= layout.max_len)
        check = tf.debugging.Assert(tf.reduce_all(in_range), [
            f"input {HISTORY_LENGTH}: expected lengths in [0, {layout.max_len}], got", tf.boolean_mask(length, ~in_range)[:3],
        ])  # fmt: skip
        with tf.control_dependencies([check]):
            length = tf.identity(length)
        mask = _right_aligned_mask(length, layout.max_len)
        for seq in schema.sequences:
            values = _right_align(features[seq.name], length, layout.max_len)
            if seq.name != "btag_his":
                values = _null_to_missing(values)
            ids = fingerprint(_TAOBAO_SEQUENCE_FIELDS[seq.name], values)
            batch[seq.name] = tf.where(mask, ids, tf.zeros_like(ids))
            batch[seq.mask_key] = mask
    else:
        raise ValueError(f"no serving layout for dataset {schema.name!r}")
    if vocab is not None:
        _apply_vocab(schema, batch, vocab, vocab_tables or {})
    return batch


def _apply_vocab(schema, batch, vocab, tables) -> None:
    """What prepare does to the ids of data prepared with a vocabulary (padding stays 0)."""
    tf = tf_import.tensorflow()

    vocab_of = vocab_lib.vocab_features(schema)
    for name in schema.categorical:
        batch[name] = vocab.apply_tf(vocab_of[name], batch[name], tables.get(vocab_of[name]))
    for seq in schema.sequences:
        applied = vocab.apply_tf(vocab_of[seq.name], batch[seq.name], tables.get(vocab_of[seq.name]))
        batch[seq.name] = tf.where(batch[seq.mask_key], applied, tf.zeros_like(applied))


def _right_aligned_mask(length: Any, max_len: int) -> Any:
    """``[B, L]`` True on the last ``length`` positions (training's layout: most recent at ``L - 1``)."""
    tf = tf_import.tensorflow()

    return tf.range(max_len, dtype=tf.int64)[None, :] >= max_len - length[:, None]


def _right_align(values: Any, length: Any, max_len: int) -> Any:
    """Moves the first ``length`` entries of each row to its end (the padding in front is garbage)."""
    tf = tf_import.tensorflow()

    source = tf.range(max_len, dtype=tf.int64)[None, :] - (max_len - length[:, None])
    return tf.gather(values, tf.maximum(source, 0), batch_dims=1)


def split_lines_tf(layout: RawLayout, lines: Any) -> dict[str, Any]:
    """Raw lines ``[B]`` in the file's layout (no newline) -> the serving columns; a line with another field
    count fails naming the line and the count."""
    tf = tf_import.tensorflow()

    if not layout.line_fields:
        raise ValueError("this dataset has no one-line raw form")
    rank = tf.debugging.Assert(tf.equal(tf.rank(lines), 1), ["input lines: expected shape [batch], got", tf.shape(lines)])
    with tf.control_dependencies([rank]):
        lines = tf.strings.regex_replace(tf.reshape(tf.identity(lines), [-1]), "\r$", "")
    parts = tf.strings.split(lines, layout.delimiter)
    counts = parts.row_lengths()
    expected = len(layout.line_fields)
    bad = tf.where(tf.not_equal(counts, expected))[:, 0]
    check = tf.debugging.Assert(
        tf.equal(tf.size(bad), 0),
        [f"input lines: expected {expected} fields separated by {layout.delimiter!r}; line (0-based) and its field "
         "count:", bad[:1], tf.gather(counts, bad[:1])],
        name="check_lines",
    )  # fmt: skip
    with tf.control_dependencies([check]):
        dense = parts.to_tensor(default_value="", shape=[None, expected])
    return {name: dense[:, layout.line_fields.index(name)] for name in layout.columns}


def taobao_requests(raw_dir: str, max_len: int, limit: int | None = None) -> dict[str, Any]:
    """``serving_default`` inputs for the impressions of raw TaobaoAds files (the first ``limit``), joined as a
    client would: each impression's ad and user profile rows (empty strings for a user without one) and its
    user's last ``max_len`` behaviours strictly before its time (ties in log order). Plain Python, for examples,
    tests and benchmarks (the training reader joins in numpy, out of core)."""
    import csv
    import numpy as np

    def rows(name):
        with open(os.path.join(raw_dir, name + ".csv"), newline="") as f:
            reader = csv.reader(f)
            next(reader)
            yield from reader

    ads = {r[0]: r[1:] for r in rows("ad_feature")}
    users = {r[0]: r[1:] for r in rows("user_profile")}
    history: dict[str, list] = {}
    for i, (user, ts, btag, cate, brand) in enumerate(rows("behavior_log")):
        history.setdefault(user, []).append((int(ts), i, cate, brand, btag))
    for events in history.values():
        events.sort()
    columns: dict[str, list] = {name: [] for name in _TAOBAO_COLUMNS + tuple(_TAOBAO_SEQUENCE_FIELDS)}
    columns[HISTORY_LENGTH] = []
    for n, (user, ts, adgroup, pid, _, _) in enumerate(rows("raw_sample")):
        if limit is not None and n >= limit:
            break
        profile = users.get(user, [""] * len(taobao.PROFILE_FEATURES))
        for name, value in zip(_TAOBAO_COLUMNS, [user, adgroup, pid, *ads[adgroup], *profile]):
            columns[name].append(value)
        events = [e for e in history.get(user, []) if e[0] < int(ts)][-max_len:]
        columns[HISTORY_LENGTH].append(len(events))
        for j, name in enumerate(_TAOBAO_SEQUENCE_FIELDS):  # cate, brand, btag: oldest first, then padding
            columns[name].append([e[2 + j] for e in events] + [""] * (max_len - len(events)))
    out = {name: np.array(values, object) for name, values in columns.items()}
    out[HISTORY_LENGTH] = out[HISTORY_LENGTH].astype(np.int64)
    return out
