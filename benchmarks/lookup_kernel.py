"""Measures the embedding-lookup kernels (kernels.lookup) as achieved memory bandwidth.

On a TPU or GPU: times the Pallas kernel and the XLA gather for row gathers of `--ids` random ids from tables
of 1M and 10M rows with rows of 64..512 bytes (plus a dense sum-pooled case), and prints achieved GB/s and the
fraction of the device's peak HBM bandwidth (from the table below, by device kind).

On CPU there is no kernel to time: the Pallas kernels run in interpret mode on a small case (a check that the
path works; interpreter time says nothing about kernel speed) and the XLA gather runs at full size.

Bytes moved per lookup = ids x row_bytes read + ids x row_bytes written + 4 x ids (the int32 ids); for pooled
lookups the output is bags x D float32 written then cast. Only measured figures are printed.

Usage: python benchmarks/lookup_kernel.py [--rows 1000000 10000000] [--row-bytes 64 128 256 512]
       [--ids 262144] [--dtype float32|bfloat16] [--iters 20]
"""
import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.lookup import lookup

# Peak HBM bandwidth in GB/s (1e9 bytes/s) per JAX device, by substring of `device_kind` (first match wins, so
# more specific names come first). Vendor data-sheet figures.
PEAK_HBM_GBPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("H200", 4800.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100-PCIE-80GB", 1935.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L4", 300.0),
    ("TPU v2", 700.0),
    ("TPU v3", 900.0),
    ("TPU v4", 1228.0),
    ("TPU v5 lite", 819.0),
    ("TPU v5e", 819.0),
    ("TPU v5p", 2765.0),
    ("TPU v5", 2765.0),
    ("TPU v6 lite", 1640.0),
    ("TPU v6e", 1640.0),
    ("TPU7x", 7370.0),
)


def peak_bandwidth_gbps(device_kind: str) -> float | None:
    for name, gbps in PEAK_HBM_GBPS:
        if name.lower() in device_kind.lower():
            return gbps
    return None


def _table(num_rows: int, dim: int, dtype: jnp.dtype) -> jax.Array:
    """A [num_rows, dim] table written in one pass (values do not matter to a gather)."""
    fill = jax.jit(
        lambda: (lax.broadcasted_iota(jnp.float32, (num_rows, dim), 0) * 1e-3
                 + lax.broadcasted_iota(jnp.float32, (num_rows, dim), 1)).astype(dtype)
    )
    return fill()


def _median_seconds(fn: Callable, args: tuple, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _report(label: str, seconds: float, bytes_moved: int, peak: float | None) -> None:
    gbps = bytes_moved / seconds / 1e9
    fraction = f"{gbps / peak:6.1%}" if peak else "   n/a"
    print(f"{label:<58} {seconds * 1e6:11.1f} us {gbps:9.1f} GB/s {fraction} of peak")


def run_accelerator(args: argparse.Namespace, kernel_backend: str) -> None:
    device = jax.devices()[0]
    peak = peak_bandwidth_gbps(device.device_kind)
    dtype = jnp.dtype(args.dtype)
    print(f"device: {device.device_kind} ({device.platform}); peak HBM "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown for this device kind'}; dtype {dtype.name}; "
          f"{args.ids} ids per lookup; median of {args.iters} runs")
    rng = np.random.default_rng(0)
    for num_rows in args.rows:
        ids = jnp.asarray(rng.integers(0, num_rows, args.ids), jnp.int32)
        for row_bytes in args.row_bytes:
            dim = row_bytes // dtype.itemsize
            table = _table(num_rows, dim, dtype)
            moved = 2 * args.ids * row_bytes + 4 * args.ids
            for backend in (kernel_backend, "xla"):
                fn = jax.jit(lambda t, i, b=backend: lookup(t, i, backend=b))
                seconds = _median_seconds(fn, (table, ids), args.iters)
                _report(f"gather {backend:<4} rows={num_rows:>9,} row={row_bytes:>3}B D={dim:<4}", seconds, moved, peak)
            bags = ids.reshape(-1, args.bag_length)
            pooled_moved = args.ids * row_bytes + 4 * args.ids + bags.shape[0] * dim * 4
            for backend in (kernel_backend, "xla"):
                fn = jax.jit(lambda t, i, b=backend: lookup(t, i, combiner="sum", backend=b))
                seconds = _median_seconds(fn, (table, bags), args.iters)
                _report(f"sum/{args.bag_length:<2} {backend:<4} rows={num_rows:>9,} row={row_bytes:>3}B D={dim:<4}",
                        seconds, pooled_moved, peak)
            del table


def run_cpu(args: argparse.Namespace) -> None:
    dtype = jnp.dtype(args.dtype)
    print("No TPU/GPU: Pallas kernels run in INTERPRET mode on a small case below. Interpreter times measure the\n"
          "simulator, not the kernels; the XLA gather (the CPU path of backend='auto') runs at full size.")
    rng = np.random.default_rng(0)
    small_rows, small_ids, dim = 10_000, 256, 128 // dtype.itemsize
    table = _table(small_rows, dim, dtype)
    ids = jnp.asarray(rng.integers(0, small_rows, small_ids), jnp.int32)
    expected = lookup(table, ids, backend="xla")
    for backend in ("tpu", "gpu"):
        fn = jax.jit(lambda t, i, b=backend: lookup(t, i, backend=b, interpret=True))
        seconds = _median_seconds(fn, (table, ids), 3)
        same = bool(jnp.array_equal(fn(table, ids), expected))
        print(f"interpret {backend} gather rows={small_rows:,} ids={small_ids} row=128B: {seconds * 1e3:.1f} ms "
              f"(simulated), equals XLA gather: {same}")
    print(f"XLA gather on CPU ({jax.devices()[0].device_kind}); {args.ids} ids; median of {args.iters} runs")
    for num_rows in args.rows:
        ids = jnp.asarray(rng.integers(0, num_rows, args.ids), jnp.int32)
        for row_bytes in args.row_bytes:
            dim = row_bytes // dtype.itemsize
            table = _table(num_rows, dim, dtype)
            fn = jax.jit(lambda t, i: lookup(t, i, backend="xla"))
            seconds = _median_seconds(fn, (table, ids), args.iters)
            _report(f"gather xla  rows={num_rows:>9,} row={row_bytes:>3}B D={dim:<4}", seconds,
                    2 * args.ids * row_bytes + 4 * args.ids, None)
            del table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--row-bytes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--ids", type=int, default=262_144, help="ids per lookup")
    parser.add_argument("--bag-length", type=int, default=16, help="L of the pooled case ([ids / L, L] bags)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    platform = jax.default_backend()
    if platform == "tpu":
        run_accelerator(args, "tpu")
    elif platform == "gpu":
        run_accelerator(args, "gpu")
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
