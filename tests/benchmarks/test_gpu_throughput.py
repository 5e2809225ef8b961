"""benchmarks/gpu_throughput.py end to end on CPU at its tiny sizes, as the GPU session will run it (cell
processes, the JSON and the markdown table): two cells, the MLPerf shape (bfloat16, kernel lookup) and the
shipped Criteo DCNv2, on one CPU device; and every cell's step at full size lowered for CUDA."""
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CELLS = ("mlperf/bfloat16/kernel", "criteo_dcnv2/float32/xla")


def test_tiny_matrix_reports_rates_and_a_split_that_adds_up(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_throughput.py"), "--tiny", "--reps=5",
           "--dtypes=bfloat16", "--lookups=kernel", "--shipped=criteo_dcnv2", f"--json_out={out}",
           f"--compilation_cache_dir={tmp_path / 'xla'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["jax"]
    results = {r["cell"]: r for r in report["results"]}
    assert sorted(results) == sorted(CELLS), done.stdout
    for name, r in results.items():
        assert "error" not in r, r
        assert r["examples_per_s"] > 0 and r["step_ms"] > 0
        assert abs(r["step_ms"] - 1000 * r["batch"] / r["examples_per_s"]) < 1e-6 * r["step_ms"]
        assert r["ratio_to_mlperf"] == r["examples_per_s"] / 500_000
        for part in ("lookup_ms", "dense_ms", "update_ms", "input_ms", "device_step_ms"):
            assert r[part] > 0, (name, part)
        # The step's parts jitted alone add up to the whole jitted step within what timing can show here: at these
        # sizes each part is ~1 ms, so three dispatches weigh, and on 2 shared cores the ratio has been seen at
        # 3.2. The bounds catch a units slip (a part in seconds or microseconds is 1000x off), not the noise; and
        # the training loop is no faster than its step without input.
        parts = r["lookup_ms"] + r["dense_ms"] + r["update_ms"]
        assert r["parts_over_device_step"] == parts / r["device_step_ms"]
        assert 0.2 < r["parts_over_device_step"] < 20.0, r
        assert r["step_ms"] > 0.2 * r["device_step_ms"], r
        assert 0 < r["distinct_ids"] <= 1
        assert r["top_ops"] and all(op["ms"] > 0 and 0 < op["share"] <= 1 for op in r["top_ops"])
    mlperf = results["mlperf/bfloat16/kernel"]
    assert mlperf["batch"] == 256 and list(mlperf["table_rows"]) == ["per_feature_d8"]
    # The 26 MLPerf tables capped at --tiny's 4096 rows, stacked in one table (rows aligned to 256).
    capped = sum(min(r, 4096) for r in (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956,
                                        405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000,
                                        590152, 12973, 108, 36))  # fmt: skip
    assert mlperf["table_rows"]["per_feature_d8"] == -(-capped // 256) * 256
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(CELLS) and all(f"| {c} |" in done.stdout for c in CELLS)
    assert "ONE-HOT" in done.stdout and "jax " in done.stdout.splitlines()[0]


def test_every_cell_lowers_for_cuda_at_full_size():
    """The GPU run's real shapes (batch 65,536, 25.8 GiB of tables), lowered from shapes alone: each kernel
    cell's step holds exactly its kernel's call, the XLA cells none."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_throughput.py"), "--lower_for=cuda",
           "--lookups=xla,kernel,mosaic_gpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = dict(re.findall(r"^  (\S+): batch .*\((\d+ Triton, \d+ Mosaic GPU) calls\)$", done.stdout, re.M))
    expected = {"xla": "0 Triton, 0 Mosaic GPU", "kernel": "1 Triton, 0 Mosaic GPU",
                "mosaic_gpu": "0 Triton, 1 Mosaic GPU"}
    assert found == {f"mlperf/{d}/{k}": v for d in ("bfloat16", "float32") for k, v in expected.items()} | {
        "criteo_dcnv2/float32/xla": expected["xla"], "taobao_interformer/float32/xla": expected["xla"]}, done.stdout
    assert "batch 65,536, tables 25.8 GiB" in done.stdout
