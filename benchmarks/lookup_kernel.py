"""Measures the embedding-lookup kernels (kernels.lookup) as achieved memory bandwidth.

On a TPU or GPU: times the Pallas kernel and the XLA gather for row gathers of `--ids` random ids from tables
of 1M and 10M rows with rows of 64..512 bytes (plus a dense sum-pooled case), and prints achieved GB/s and the
fraction of the device's peak HBM bandwidth (from the table below, by device kind).

On CPU there is no kernel to time: the Pallas kernels run in interpret mode on a small case (a check that the
path works; interpreter time says nothing about kernel speed) and the XLA gather runs at full size.

Bytes moved per lookup = ids x row_bytes read + ids x row_bytes written + 4 x ids (the int32 ids); for pooled
lookups the output is bags x D float32 written then cast. Only measured figures are printed.

Before timing, each kernel's output is compared with the XLA gather's on the device (exit status 1 if any
differs). Fractions are given of the data-sheet peak and of a measured elementwise copy (`x + 1`).

Usage: python benchmarks/lookup_kernel.py [--rows 1000000 10000000] [--row-bytes 64 128 256 512]
       [--ids N] [--dtype float32|bfloat16] [--iters 20] [--back-to-back 8] [--sweep]
"""
import argparse
import functools
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


def _median_seconds(fn: Callable, args: tuple, iters: int, back_to_back: int = 1) -> float:
    """Median over `iters` timings of `back_to_back` calls dispatched without waiting, per call.

    Dispatching several calls before blocking hides the host's per-call dispatch cost behind device work, as in
    a training loop; one call per timing would add it to every kernel time.
    """
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(back_to_back)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / back_to_back)
        del outs
    return statistics.median(times)


def _report(label: str, seconds: float, bytes_moved: int, peak: float | None, copy_gbps: float | None = None) -> None:
    gbps = bytes_moved / seconds / 1e9
    fraction = f"{gbps / peak:6.1%}" if peak else "   n/a"
    of_copy = f" {gbps / copy_gbps:6.1%} of copy" if copy_gbps else ""
    print(f"{label:<58} {seconds * 1e6:11.1f} us {gbps:9.1f} GB/s {fraction} of peak{of_copy}", flush=True)


def measure_copy_gbps(num_bytes: int = 4 << 30, iters: int = 10) -> float:
    """Achieved GB/s of an elementwise `x + 1` over `num_bytes` of float32 (bytes read + written): the
    practical ceiling of a memory-bound kernel on this device."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    seconds = _median_seconds(jax.jit(lambda a: a + 1), (x,), iters, back_to_back=4)
    return 2 * num_bytes / seconds / 1e9


def _check_equal(label: str, got: jax.Array, want: jax.Array, exact: bool) -> bool:
    """Compares a kernel's output with the XLA gather's; pooled sums may differ by float32 rounding (the
    kernel adds a bag's rows in order, XLA in its own order)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    ok = bool(np.array_equal(got, want)) if exact else bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))
    if not ok:
        print(f"MISMATCH {label}: max |kernel - xla| = {np.max(np.abs(got - want)):.3g}", flush=True)
    return ok


def run_accelerator(args: argparse.Namespace, kernel_backend: str) -> bool:
    """Times kernel and XLA gathers after checking that they agree; returns whether all agreed."""
    device = jax.devices()[0]
    peak = peak_bandwidth_gbps(device.device_kind)
    copy_gbps = measure_copy_gbps()
    dtype = jnp.dtype(args.dtype)
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; peak HBM "
          f"{f'{peak:.0f} GB/s (data sheet)' if peak else 'unknown for this device kind'}; measured copy "
          f"(x + 1 over 4 GiB, read + write) {copy_gbps:.0f} GB/s; dtype {dtype.name}; {args.ids:,} ids per "
          f"lookup; median of {args.iters} timings of {args.back_to_back} calls each", flush=True)
    rng = np.random.default_rng(0)
    all_ok = True
    for num_rows in args.rows:
        ids = jnp.asarray(rng.integers(0, num_rows, args.ids), jnp.int32)
        bags = ids.reshape(-1, args.bag_length)
        for row_bytes in args.row_bytes:
            dim = row_bytes // dtype.itemsize
            table = _table(num_rows, dim, dtype)
            cases = (
                ("gather", ids, {}, 2 * args.ids * row_bytes + 4 * args.ids),
                (f"sum/{args.bag_length:<2}", bags, {"combiner": "sum"},
                 args.ids * row_bytes + 4 * args.ids + bags.shape[0] * dim * 4),
            )
            for name, case_ids, kwargs, moved in cases:
                fns = {b: jax.jit(lambda t, i, b=b: lookup(t, i, backend=b, **kwargs)) for b in (kernel_backend, "xla")}
                label = f"rows={num_rows:>10,} row={row_bytes:>3}B D={dim:<4}"
                all_ok &= _check_equal(f"{name} {label}", fns[kernel_backend](table, case_ids),
                                       fns["xla"](table, case_ids), exact=name == "gather")
                for backend, fn in fns.items():
                    seconds = _median_seconds(fn, (table, case_ids), args.iters, args.back_to_back)
                    _report(f"{name} {backend:<4} {label}", seconds, moved, peak, copy_gbps)
            del table
    print(f"kernel outputs {'all equal' if all_ok else 'DO NOT all equal'} the XLA gather's", flush=True)
    return all_ok


def sweep_gpu(args: argparse.Namespace) -> None:
    """Times the GPU gather and sum-pooled kernels over tile sizes and warp counts (on the largest table)."""
    from kernels import lookup_gpu

    dtype = jnp.dtype(args.dtype)
    num_rows = max(args.rows)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, num_rows, args.ids), jnp.int32)
    bags = ids.reshape(-1, args.bag_length)
    weights = jnp.ones(bags.shape, jnp.float32)
    print(f"GPU kernel sweep (block_elements/num_warps:GB/s): rows={num_rows:,}, {args.ids:,} ids, dtype "
          f"{dtype.name} (defaults: gather {lookup_gpu.BLOCK_ELEMENTS}/{lookup_gpu.NUM_WARPS}, pooled "
          f"{lookup_gpu.POOLED_BLOCK_ELEMENTS}/{lookup_gpu.POOLED_NUM_WARPS})",
          flush=True)
    for row_bytes in args.row_bytes:
        dim = row_bytes // dtype.itemsize
        table = _table(num_rows, dim, dtype)
        kinds = (
            ("gather", lookup_gpu.gather_rows_gpu, (ids,), 2 * args.ids * row_bytes + 4 * args.ids),
            (f"sum/{args.bag_length}", lookup_gpu.pooled_rows_gpu, (bags, weights),
             args.ids * (row_bytes + 8) + bags.shape[0] * dim * 4),  # rows, ids and weights read; sums written
        )
        for name, kernel, inputs, moved in kinds:
            results = []
            for block_elements in (1024, 2048, 4096, 8192):
                for num_warps in (4, 8):
                    fn = jax.jit(functools.partial(kernel, block_elements=block_elements, num_warps=num_warps))
                    seconds = _median_seconds(fn, (table, *inputs), max(3, args.iters // 2), args.back_to_back)
                    results.append((moved / seconds / 1e9, block_elements, num_warps))
            best = max(results)
            print(f"{name:<7} row={row_bytes:>3}B D={dim:<4} " + " ".join(f"{b}/{w}:{g:.0f}" for g, b, w in results)
                  + f"  best {best[1]}/{best[2]}", flush=True)
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
    parser.add_argument("--ids", type=int, default=None,
                        help="ids per lookup (default 4,194,304 on an accelerator, 262,144 on CPU)")
    parser.add_argument("--bag-length", type=int, default=16, help="L of the pooled case ([ids / L, L] bags)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--back-to-back", type=int, default=8, help="calls dispatched per timing (accelerator)")
    parser.add_argument("--sweep", action="store_true",
                        help="GPU: also sweep the gather and pooled kernels' tile sizes and warps")
    args = parser.parse_args()
    platform = jax.default_backend()
    if args.ids is None:
        args.ids = 1 << 22 if platform in ("tpu", "gpu") else 1 << 18
    if platform in ("tpu", "gpu"):
        ok = run_accelerator(args, platform)
        if args.sweep and platform == "gpu":
            sweep_gpu(args)
        raise SystemExit(0 if ok else 1)
    run_cpu(args)


if __name__ == "__main__":
    main()
