"""Every hash the embeddings apply to an id, defined once, in numpy (input pipeline), TensorFlow (export) and jnp.

Ids are 63-bit non-negative fingerprints (``int64``, see :mod:`ctr.data.fingerprint`). Two hashes act on them:

**Bucket hash** (table families): ``bucket(fp, salt, n) = mix64(fp XOR salt) mod n``, in wrapping ``uint64``
arithmetic, where ``mix64`` is the SplitMix64 finaliser (xor-shift / multiply / xor-shift / multiply /
xor-shift). The salt is a 64-bit constant derived from names (:func:`salt`), so the same fingerprint lands on
unrelated rows for every (feature, chunk): this is what lets Unified Embedding features share one table, and
what makes the chunks of one feature independent probes. numpy (:func:`bucket_np`) and TensorFlow
(:func:`bucket_tf`) compute the same bits; the exported SavedModel hashes raw strings with
:func:`bucket_tf` before the JAX part, so serving sees exactly the rows training saw.

**DHE hash** (:mod:`embeddings.dhe`): ``k`` functions from a strongly universal family. JAX runs without
64-bit integers, so the host splits each fingerprint into two ``uint32`` words (:func:`words_np` /
:func:`words_tf`, shape ``[..., 2]``: low word, high word) and the device splits those into four 16-bit limbs
``x_0..x_3`` and computes, for ``i < k``,

    h_i(x) = ((b_i + sum_j a_ij * x_j) mod 2**32) >> 16        (a value in [0, 2**16))

entirely in ``uint32``. This is the vector multiply-add-shift scheme (Dietzfelbinger; Thorup, "High speed
hashing for integers and strings"): with 16-bit characters, 32-bit random ``a_ij, b_i`` and 16 output bits it
is strongly universal (pairwise independent), so each of the ``k`` coordinates is an independent-looking
16-bit value. The coefficients come from :func:`dhe_coefficients` (a counter through ``mix64``, no RNG
library, so they never change with a numpy version). :func:`dhe_hash` is written once against the array API
shared by numpy and ``jax.numpy``.
"""
from __future__ import annotations

import hashlib
import functools
from typing import Any

import numpy as np

from ctr import tf_import

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the SplitMix64 increment
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def salt(*parts: str | int) -> int:
    """A 64-bit salt naming ``parts`` (e.g. ``salt("C1", 0)`` for chunk 0 of feature C1): BLAKE2b, stable."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _mix64_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int (for constants)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def _mix64_np(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


def bucket_np(fingerprints: np.ndarray, salt_value: int, num_buckets: int) -> np.ndarray:
    """``mix64(fp ^ salt) mod num_buckets``: int64 in ``[0, num_buckets)``, same shape as ``fingerprints``."""
    x = np.asarray(fingerprints, np.int64).view(np.uint64) ^ np.uint64(salt_value)
    return (_mix64_np(x) % np.uint64(num_buckets)).view(np.int64)


def bucket_tf(fingerprints: Any, salt_value: int, num_buckets: int) -> Any:
    """TensorFlow twin of :func:`bucket_np` (int64 tensor in, int64 tensor out, bit-identical)."""
    tf = tf_import.tensorflow()  # only the export path needs TF; the training path stays TF-free

    def const(v: int):
        return tf.constant(v, tf.uint64)

    x = tf.bitwise.bitwise_xor(tf.bitcast(tf.cast(fingerprints, tf.int64), tf.uint64), const(salt_value))
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, const(30))) * const(_M1)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, const(27))) * const(_M2)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, const(31)))
    return tf.bitcast(tf.math.floormod(x, const(num_buckets)), tf.int64)


def words_np(fingerprints: np.ndarray) -> np.ndarray:
    """63-bit fingerprints ``[...]`` -> ``uint32 [..., 2]`` (low word, high word), for the device."""
    x = np.asarray(fingerprints, np.int64).view(np.uint64)
    return np.stack([x & np.uint64(0xFFFFFFFF), x >> np.uint64(32)], axis=-1).astype(np.uint32)


def words_tf(fingerprints: Any) -> Any:
    """TensorFlow twin of :func:`words_np`."""
    tf = tf_import.tensorflow()

    x = tf.bitcast(tf.cast(fingerprints, tf.int64), tf.uint64)
    low = tf.bitwise.bitwise_and(x, tf.constant(0xFFFFFFFF, tf.uint64))
    high = tf.bitwise.right_shift(x, tf.constant(32, tf.uint64))
    return tf.cast(tf.stack([low, high], axis=-1), tf.uint32)


@functools.lru_cache(maxsize=None)
def dhe_coefficients(salt_value: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` hash functions of one salt: ``a [4, k]`` and ``b [k]``, uint32 (read-only, cached).

    Function ``i`` takes the 5 words ``5i .. 5i+4`` of the salt's stream, so the first functions do not
    change with ``k``.
    """
    stream = np.array([_mix64_int(salt_value + _GOLDEN * (i + 1)) for i in range(5 * k)], np.uint64)
    coeffs = np.ascontiguousarray((stream & np.uint64(0xFFFFFFFF)).astype(np.uint32).reshape(k, 5).T)
    coeffs.setflags(write=False)
    return coeffs[:4], coeffs[4]


def dhe_hash(words: Any, a: Any, b: Any, xp: Any = np) -> Any:
    """``k`` strongly universal 16-bit hashes of each id.

    Args:
      words: ``uint32 [..., 2]`` from :func:`words_np`.
      a, b: ``uint32 [4, k]`` and ``[k]`` from :func:`dhe_coefficients`.
      xp: ``numpy`` or ``jax.numpy`` (both wrap uint32 products mod 2**32).

    Returns:
      ``uint32 [..., k]`` in ``[0, 2**16)``. Under ``jax.jit`` this is one elementwise fusion.
    """
    low, high = words[..., 0:1], words[..., 1:2]  # [..., 1]: broadcast against the k functions
    mask = xp.uint32(0xFFFF)
    sixteen = xp.uint32(16)
    limbs = (low & mask, low >> sixteen, high & mask, high >> sixteen)
    acc = b
    for j, limb in enumerate(limbs):
        acc = acc + limb * a[j]
    return acc >> sixteen
