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
