"""The numpy FarmHash ids equal TensorFlow's, for every string length and for several fields at once."""
import numpy as np
import tensorflow as tf

from ctr.data import fingerprint as fp
from ctr.data import text


def _tf_ids(field, values):
    return fp.fingerprint(field, tf.constant(values, tf.string)).numpy()


def test_every_length_matches_tensorflow():
    rng = np.random.default_rng(0)
    for field in ["x", "C1", "C10", "device_conn_type", "new_user_class_level", "f" * 63, "g" * 70]:
        values = [bytes(rng.integers(0, 256, n).astype(np.uint8)) for n in range(0, 90) for _ in range(3)]
        np.testing.assert_array_equal(fp.fingerprint_strings(field, values), _tf_ids(field, values))


def test_many_fields_in_one_block():
    # Fields with equal prefix lengths are hashed together; values sit at arbitrary byte offsets of a block.
    rng = np.random.default_rng(1)
    fields = ["C1", "C2", "C10", "C26", "site_id", "hour", "h" * 60, "i" * 60]  # the last two: over 64 bytes
    rows = [[bytes(rng.choice(list(b"0123456789abcdef"), rng.integers(0, 12))) for _ in fields] for _ in range(300)]
    data = b"".join(b"\t".join(r) + b"\n" for r in rows)
    block = np.frombuffer(data, np.uint8)
    spans = text.split_fields(block, b"\t", len(fields))
    got = fp.fingerprint_spans(fields, text.Words(block), spans.starts, spans.ends)
    for j, field in enumerate(fields):
        np.testing.assert_array_equal(got[:, j], _tf_ids(field, [r[j] for r in rows]))


def test_ids_are_63_bit_and_salted():
    ids = fp.fingerprint_strings("cate_id", ["", "7", "123456789"])
    np.testing.assert_array_equal(ids, _tf_ids("cate_id", ["", "7", "123456789"]))
    assert (ids >= 0).all() and (ids < fp.ID_SPACE).all()
    assert not set(ids.tolist()) & set(fp.fingerprint_strings("brand", ["", "7", "123456789"]).tolist())
