"""Helpers the lookup test files share: seeded generators, dyadic tables and bitwise comparison."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np


def rng_for(*key) -> np.random.Generator:
    """A generator seeded by `key`, so each test case draws its own stable data."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def dyadic_table(rng: np.random.Generator, num_rows: int, dim: int, dtype) -> jax.Array:
    """[num_rows, dim] multiples of 1/4 in [-8, 8): float32 sums of them are exact in any order."""
    return jnp.asarray(rng.integers(-32, 32, (num_rows, dim)) / 4, dtype)


def assert_equal(actual, expected) -> None:
    """Same shape, dtype and bits (compared as float32)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(actual, np.float32), np.asarray(expected, np.float32))


def numpy_lookup(table, ids, *, combiner=None, weights=None, segment_ids=None, num_segments=None, oob="clamp"):
    """The lookup op's documented semantics as NumPy loops over slots: an independent reference for the XLA
    path, which on CPU is the jnp reference itself. Pools in float32, casts to the table's dtype at the end."""
    values = np.asarray(table, np.float32)
    num_rows, dim = values.shape
    ids = np.asarray(ids)

    def row(i):
        if 0 <= i < num_rows:
            return values[i]
        return np.zeros(dim, np.float32) if oob == "zero" else values[min(max(i, 0), num_rows - 1)]

    out_dtype = np.dtype(jnp.dtype(table.dtype))
    if combiner is None:
        return np.array([row(i) for i in ids.reshape(-1)], np.float32).reshape(*ids.shape, dim).astype(out_dtype)
    w = np.ones(ids.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
    if segment_ids is None:  # dense bags [B, L]: bag b holds the slots of row b
        bags = [list(zip(ids[b], w[b])) for b in range(ids.shape[0])]
    else:
        segments = np.asarray(segment_ids)
        bags = [[(i, wi) for i, wi, s in zip(ids, w, segments) if s == b] for b in range(num_segments)]
    out = np.zeros((len(bags), dim), np.float32)
    for b, bag in enumerate(bags):
        for i, wi in bag:
            if wi != 0:  # padding reads nothing
                out[b] += wi * row(i)
        total = np.float32(sum(wi for _, wi in bag))
        if combiner == "mean":
            out[b] = out[b] / total if total != 0 else 0.0
    return out.astype(out_dtype)
