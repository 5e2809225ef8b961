#!/usr/bin/env bash
# Installs what ctr needs and is missing on a Debian/Ubuntu machine: Bazel (Debian's bazel-bootstrap 4.2.3)
# and Python 3.11 with venv. The project's virtualenv itself is built by Bazel from requirements.lock on the
# first build (tools/python/venv.bzl), so this script stays idempotent and fast on later runs.
#
#   tools/setup.sh [cpu|tpu|cuda]   (default cpu)
# The target picks which build of the pinned jax the venv gets: cpu (jax[cpu], what CI runs), tpu (libtpu, on a
# Cloud TPU VM) or cuda (the CUDA 12 plugin and NVIDIA's wheels; needs an NVIDIA driver). It is written to
# .bazelrc.accelerator, so every later `bazel build/run/test` builds the venv from that target's lock.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-cpu}"
case "$target" in
  cpu | tpu | cuda) ;;
  *)
    echo "ctr setup: unknown target '$target': use cpu (default), tpu or cuda" >&2
    exit 2
    ;;
esac

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  sudo_cmd=(sudo)
fi
python="${CTR_PYTHON:-$(command -v python3.11 || true)}"
missing=()
command -v bazel >/dev/null 2>&1 || missing+=(bazel-bootstrap)
if [ -z "$python" ]; then
  missing+=(python3.11 python3.11-venv)
elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3.11-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "ctr setup: installing ${missing[*]}" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v python3.11 >/dev/null 2>&1 || [ -n "${CTR_PYTHON:-}" ] || {
  echo "ctr setup: Python 3.11 is required (set CTR_PYTHON to its interpreter)" >&2
  exit 1
}
accelerator_rc=.bazelrc.accelerator
if [ "$target" = cpu ]; then
  rm -f "$accelerator_rc"
else
  {
    echo "# Written by tools/setup.sh $target: the venv installs requirements-$target.lock."
    echo "build --repo_env=CTR_ACCELERATOR=$target"
  } > "$accelerator_rc"
fi
echo "ctr setup: target $target" >&2
