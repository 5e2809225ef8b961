#!/usr/bin/env bash
# Issue 19's one command for a session lent a GPU (the device tool: one NVIDIA H200, 15 minutes of device time
# in all, the machine's start included). It runs, in this order, writing everything under $OUT:
#   1. tests/kernels/test_lookup_on_device.py (the Pallas lookup kernels compiled for the GPU, against XLA)
#      -> lookup_on_device.log
#   2. benchmarks/gpu_throughput.py, the whole matrix (MLPerf DLRM-DCNv2 shape x {bfloat16, float32} x
#      {xla, kernel = Triton, mosaic_gpu}, and the shipped criteo_dcnv2 and taobao_interformer), one process
#      per cell, most wanted first ($CELLS), within --budget_s so that its closing markdown table is always
#      printed (cells the budget leaves out say so) -> throughput.log, throughput.json, cells_stderr.log
#   plus machine.txt (nvidia-smi, python and package versions). About 8 minutes in all (timeouts below).
#
# What the machine has (/work/.library/device/KINDS.md): python3 3.12 with jax 0.11.2 + the CUDA 13 plugin,
# flax, optax, orbax-checkpoint, absl-py, etils, matplotlib, tqdm, pytest; no TensorFlow (ctr's training path
# does not import it; TensorBoard events are skipped with a warning) and NO gin-config, which ctr needs, and no
# internet. So, before the device call, in the root of the checkout that the device tool sends (the session's
# own; .whl/ is git-ignored), fetch its pure-Python wheel once (no device time):
#
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gin-config==0.5.0
#
# then call the device tool with
#
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# No virtualenv travels: the machine's own python3 runs the working tree (PYTHONPATH=the checkout). Its jax is
# newer than requirements.lock's 0.10.2: machine.txt records the versions, and the results must say which ran.
# Arguments are passed on to gpu_throughput.py after these (e.g. --cells=... to rerun some cells); on CPU, to try
# this script itself: OUT=/tmp/o PYTHON=<venv python> JAX_PLATFORMS=cpu bash benchmarks/gpu_run.sh --tiny \
#   --cells=mlperf/bfloat16/xla,criteo_dcnv2/float32/xla   (mosaic_gpu cells run on a GPU only)
# Copy throughput.log's closing table into benchmarks/RESULTS.md with this command and the jax version.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD"
fi
if ! "$PY" -c "import gin" 2>/dev/null; then
  echo "gin-config is missing: see the header of $0 (carry .whl)" | tee "$OUT/machine.txt"
  exit 2
fi

{
  date -u; nvidia-smi; "$PY" --version
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|flax|optax|orbax|numpy|gin|absl|etils|triton|ml.dtypes)'
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== tests/kernels/test_lookup_on_device.py"
timeout 120 "$PY" -m pytest tests/kernels/test_lookup_on_device.py -q -rs -p no:cacheprovider 2>&1 \
  | tee "$OUT/lookup_on_device.log"

CELLS=mlperf/bfloat16/xla,mlperf/bfloat16/kernel,mlperf/bfloat16/mosaic_gpu,mlperf/float32/xla
CELLS=$CELLS,criteo_dcnv2/float32/xla,taobao_interformer/float32/xla,mlperf/float32/kernel,mlperf/float32/mosaic_gpu
echo "== benchmarks/gpu_throughput.py"
timeout 400 "$PY" benchmarks/gpu_throughput.py --budget_s=330 --cell_timeout_s=110 --reps=5 \
  --lookups=xla,kernel,mosaic_gpu --cells="$CELLS" \
  --json_out="$OUT/throughput.json" --stderr_log="$OUT/cells_stderr.log" "$@" 2>&1 | tee "$OUT/throughput.log"
