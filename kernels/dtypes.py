"""The table dtypes every lookup kernel (TPU, GPU Triton, Mosaic GPU) takes, and the check they share."""
from __future__ import annotations

import jax.numpy as jnp

KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_table_dtype(dtype, kernel: str) -> None:
    """Raises ValueError naming ``kernel`` (for example ``"TPU"``) when it cannot read a table of ``dtype``."""
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        raise ValueError(f"the {kernel} lookup kernel supports float32 and bfloat16 tables, got {jnp.dtype(dtype)}")
