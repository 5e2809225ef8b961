"""Synthetic data in the raw Criteo layout (tab-separated ``label, I1..I13, C1..C26``), with learnable structure."""
from __future__ import annotations

import gzip

import numpy as np

from ctr import tf_import
from ctr.data.criteo import CAT_FIELDS, INT_FIELDS


def write_synthetic(path: str, num_rows: int, seed: int = 0, chunk_rows: int = 200_000) -> None:
    """Writes ``num_rows`` raw Criteo lines to ``path`` whose clicks a CTR model can learn.

    The click logit sums (a) a per-value effect for every categorical field, with long-tailed (Zipf-like)
    value frequencies and vocabularies from 8 to ~50k values, (b) low-rank crosses between field pairs, which a
    model only captures through feature interactions, (c) smooth functions of a few integer fields. Values are
    missing at per-field rates up to 40%, and missing carries its own effect. The same ``seed`` gives the same
    file; different ``num_rows`` with the same seed share the same generating model. A path ending in ``.gz``
    is written gzip-compressed.
    """
    rng = np.random.default_rng(seed)
    n_cat = len(CAT_FIELDS)
    vocab = np.exp(rng.uniform(np.log(8), np.log(50_000), n_cat)).astype(np.int64)
    zipf = rng.uniform(1.5, 4.0, n_cat)  # larger = heavier head
    missing_rate = np.where(rng.random(n_cat) < 0.5, rng.uniform(0.0, 0.4, n_cat), 0.0)
    effect_scale = rng.uniform(0.1, 0.6, n_cat)
    effects = [rng.normal(0.0, s, v + 1) for s, v in zip(effect_scale, vocab)]  # index v = missing
    cross_pairs = [tuple(p) for p in rng.choice(n_cat, size=(8, 2), replace=False)]
    rank = 3
    cross_factors = {f: rng.normal(0.0, 0.5, (vocab[f] + 1, rank)) for f in {f for p in cross_pairs for f in p}}
    salt = rng.integers(1, 2**31, n_cat)
    int_missing = rng.uniform(0.0, 0.3, len(INT_FIELDS))
    int_scale = np.exp(rng.uniform(0.0, 5.0, len(INT_FIELDS)))
    int_weight = np.zeros(len(INT_FIELDS))
    int_weight[:4] = rng.normal(0.0, 0.35, 4)

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="ascii") as out:
        row_rng = np.random.default_rng([seed, 1])
        for start in range(0, num_rows, chunk_rows):
            n = min(chunk_rows, num_rows - start)
            idx = np.empty((n, n_cat), np.int64)
            for f in range(n_cat):
                u = row_rng.random(n)
                idx[:, f] = np.minimum((vocab[f] * u ** zipf[f]).astype(np.int64), vocab[f] - 1)
                idx[row_rng.random(n) < missing_rate[f], f] = vocab[f]
            logit = np.full(n, -1.2)
            for f in range(n_cat):
                logit += effects[f][idx[:, f]]
            for a, b in cross_pairs:
                logit += np.sum(cross_factors[a][idx[:, a]] * cross_factors[b][idx[:, b]], axis=1)
            ints = np.floor(row_rng.exponential(1.0, (n, len(INT_FIELDS))) * int_scale).astype(np.int64)
            ints[:, 1] -= (row_rng.random(n) < 0.05) * row_rng.integers(1, 4, n)  # I2's small negatives
            int_present = row_rng.random((n, len(INT_FIELDS))) >= int_missing
            logt = np.log1p(np.maximum(ints, 0)) / np.log1p(int_scale)
            logit += np.sum(np.where(int_present, np.sin(3.0 * logt) * int_weight, 0.0), axis=1)
            label = (row_rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
            out.write(_format_rows(label, ints, int_present, idx, vocab, salt))


def _format_rows(label, ints, int_present, idx, vocab, salt) -> str:
    """Formats generated rows as raw TSV text, through TensorFlow's vectorised string ops."""
    tf = tf_import.tensorflow()  # only the generator needs it

    hexes = (idx * 2654435761 + salt) & 0xFFFFFFFF
    cats = tf.where(idx < vocab, _hex(hexes), "")
    int_text = tf.where(int_present, tf.strings.as_string(ints), "")
    cols = tf.concat([tf.strings.as_string(label)[:, None], int_text, cats], axis=1)
    lines = tf.strings.reduce_join(cols, axis=1, separator="\t")
    return "\n".join(s.decode() for s in lines.numpy()) + "\n"


def _hex(values: np.ndarray) -> "tf.Tensor":
    """8-digit lower-case hex of uint32 values (vectorised: 8 nibble lookups)."""
    tf = tf_import.tensorflow()

    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    nibbles = (values[..., None] >> np.arange(28, -1, -4)) & 0xF
    chars = digits[nibbles]  # [..., 8] uint8
    flat = chars.reshape(-1, 8).view("S8").reshape(values.shape)
    return tf.constant(flat)
