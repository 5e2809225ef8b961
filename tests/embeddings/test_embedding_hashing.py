"""The hashes of embeddings.hashing: numpy == TensorFlow bit for bit, numpy == jnp, ranges, salts, stability."""
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from embeddings import hashing

ID_SPACE = 2**63 - 1


def _ids(n: int = 20_000, seed: int = 0) -> np.ndarray:
    """Random 63-bit fingerprints, with the extremes and small values mixed in."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, ID_SPACE, n, dtype=np.int64)
    return np.concatenate([ids, [0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**62, ID_SPACE - 1]]).astype(np.int64)


@pytest.mark.parametrize("num_buckets", [1, 7, 1000, 2**20 + 3, 10_000_000, 2**40 + 15])
def test_bucket_numpy_equals_tensorflow(num_buckets):
    ids = _ids()
    for salt in (0, hashing.salt("C1", 0), hashing.salt("C1", 1), 2**64 - 1):
        want = hashing.bucket_np(ids, salt, num_buckets)
        got = hashing.bucket_tf(tf.constant(ids), salt, num_buckets).numpy()
        np.testing.assert_array_equal(got, want)
        assert want.dtype == np.int64 and want.min() >= 0 and want.max() < num_buckets


def test_bucket_matches_its_definition_and_pinned_values():
    """mix64(id ^ salt) mod n with Python ints, and pinned outputs: changing the hash silently would re-map
    every trained row and break exported models."""
    mask = 2**64 - 1
    ids = [0, 1, 12345678901234, ID_SPACE - 1]
    salt = hashing.salt("C1", 0)
    want = []
    for x in ids:
        z = x ^ salt
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        want.append((z ^ (z >> 31)) % 1_000_003)
    got = hashing.bucket_np(np.array(ids, np.int64), salt, 1_000_003)
    assert got.tolist() == want == [352778, 964386, 310956, 244108]
    assert salt == 8258997937391687029
    assert hashing.bucket_np(np.zeros((4, 5), np.int64), 1, 10).shape == (4, 5)


def test_salts_separate_features_and_chunks():
    ids = _ids(5000)
    a = hashing.bucket_np(ids, hashing.salt("C1", 0), 1 << 20)
    b = hashing.bucket_np(ids, hashing.salt("C2", 0), 1 << 20)
    c = hashing.bucket_np(ids, hashing.salt("C1", 1), 1 << 20)
    # Independent hashes agree on ~1/2**20 of the ids.
    assert np.mean(a == b) < 0.01 and np.mean(a == c) < 0.01
    assert hashing.salt("C1", 0) == hashing.salt("C1", 0) != hashing.salt("C10")


def test_words_numpy_equals_tensorflow_and_roundtrips():
    ids = _ids().reshape(-1, 4)
    words = hashing.words_np(ids)
    assert words.dtype == np.uint32 and words.shape == (*ids.shape, 2)
    np.testing.assert_array_equal(hashing.words_tf(tf.constant(ids)).numpy(), words)
    back = words[..., 0].astype(np.uint64) | (words[..., 1].astype(np.uint64) << np.uint64(32))
    np.testing.assert_array_equal(back.astype(np.int64), ids)


def test_dhe_hash_numpy_equals_jax_and_is_16_bit():
    ids = _ids(3000)
    words = hashing.words_np(ids)
    a, b = hashing.dhe_coefficients(hashing.salt("C1"), 64)
    want = hashing.dhe_hash(words, a, b, xp=np)
    got = np.asarray(hashing.dhe_hash(jnp.asarray(words), jnp.asarray(a), jnp.asarray(b), xp=jnp))
    np.testing.assert_array_equal(got, want)
    assert want.shape == (len(ids), 64) and want.max() < 2**16
    # Each coordinate is close to uniform over the 2**16 values (mean 32767.5, sd ~ 18918 / sqrt(n)).
    assert np.all(np.abs(want.mean(axis=0) - 32767.5) < 6 * 18918 / np.sqrt(len(ids)))


def test_dhe_hash_matches_its_definition():
    """h_i(x) = ((b_i + sum_j a_ij x_j) mod 2**32) >> 16 over the 16-bit limbs of the id, with Python ints."""
    ids = _ids(50)
    a, b = hashing.dhe_coefficients(7, 8)
    got = hashing.dhe_hash(hashing.words_np(ids), a, b)
    for row, x in zip(got, ids.tolist()):
        limbs = [(x >> s) & 0xFFFF for s in (0, 16, 32, 48)]
        want = [((int(b[i]) + sum(int(a[j, i]) * limbs[j] for j in range(4))) % 2**32) >> 16 for i in range(8)]
        assert row.tolist() == want


def test_dhe_coefficients_are_deterministic_and_salted():
    a1, b1 = hashing.dhe_coefficients(hashing.salt("C1"), 16)
    # Pinned: function 0 of C1 (the first functions do not depend on k).
    assert a1[:, 0].tolist() == [2847857346, 3066072199, 1754442297, 3229720566] and b1[0] == 283618193
    np.testing.assert_array_equal(hashing.dhe_coefficients(hashing.salt("C1"), 4)[0], a1[:, :4])
    a2, b2 = hashing.dhe_coefficients(hashing.salt("C2"), 16)
    assert a1.shape == (4, 16) and b1.shape == (16,) and a1.dtype == np.uint32
    assert not np.array_equal(a1, a2) and not np.array_equal(b1, b2)
    hashing.dhe_coefficients.cache_clear()
    a3, b3 = hashing.dhe_coefficients(hashing.salt("C1"), 16)
    np.testing.assert_array_equal(a1, a3)
    np.testing.assert_array_equal(b1, b3)
