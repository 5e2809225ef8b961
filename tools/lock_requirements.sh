#!/usr/bin/env bash
# Rebuilds a lock file from requirements.txt.
#   tools/lock_requirements.sh            requirements.lock       (cpu: installs into a throw-away venv, pip freeze)
#   tools/lock_requirements.sh tpu|cuda   requirements-<t>.lock   (the cpu lock plus jax's accelerator extra)
#   tools/lock_requirements.sh --check T  resolves requirements-<t>.lock with `pip install --dry-run` and fails
#                                         unless pip picks exactly the pinned set
# The accelerator locks are resolved, not installed (libtpu and the CUDA wheels are gigabytes and cannot load on
# a machine without the accelerator), on top of every pin of the cpu lock, so the three sets differ only by the
# accelerator's own packages; tests/tools/test_accelerator_locks.py checks that.
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
if [ "${1:-}" = "--check" ]; then
  check=1
  shift
fi
target="${1:-cpu}"
case "$target" in
  cpu) extra="" ;;
  tpu) extra="tpu" ;;
  cuda) extra="cuda12" ;;
  *) echo "lock_requirements: unknown target '$target' (cpu, tpu or cuda)" >&2; exit 2 ;;
esac
lock=requirements.lock
[ "$target" = cpu ] || lock="requirements-$target.lock"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${CTR_PYTHON:-python3.11}" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/pip" --disable-pip-version-check -q)

# Prints "name==version" for every package of a `pip install --dry-run --report` resolution, sorted like a freeze.
resolve() {
  "${pip[@]}" install --dry-run --ignore-installed --report "$tmp/report.json" "$@" >/dev/null
  "$tmp/venv/bin/python" - "$tmp/report.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
# pip freeze leaves out the installer's own packages; so does this, so all three locks list the same kind of set.
skip = {"pip", "setuptools", "wheel"}
pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]}
pins = {name: version for name, version in pins.items() if name.lower() not in skip}
for name in sorted(pins, key=str.lower):
    print(f"{name}=={pins[name]}")
EOF
}

if [ "$check" = 1 ]; then
  [ -f "$lock" ] || { echo "lock_requirements: $lock does not exist" >&2; exit 2; }
  resolve -r "$lock" > "$tmp/resolved"
  grep -vE '^\s*(#|$)' "$lock" | sort -f > "$tmp/pinned"
  if ! diff <(sort -f "$tmp/resolved") "$tmp/pinned" > "$tmp/diff"; then
    echo "lock_requirements: pip resolves $lock to a different set (< resolved, > pinned):" >&2
    cat "$tmp/diff" >&2
    exit 1
  fi
  echo "lock_requirements: $lock resolves to exactly its $(wc -l < "$tmp/pinned") pins"
  exit 0
fi

if [ "$target" = cpu ]; then
  "${pip[@]}" install -r requirements.txt
  body=$("$tmp/venv/bin/pip" freeze)
  header="# Full lock: pip freeze of a venv built from requirements.txt on Python 3.11 (linux x86_64)."
else
  jax_version=$(grep -E '^jax(\[[^]]*\])?==' requirements.txt | sed 's/.*==//')
  body=$(resolve -r requirements.lock "jax[$extra]==$jax_version")
  header="# Full lock for $target: requirements.lock plus jax[$extra]==$jax_version, resolved by pip on Python 3.11 (linux x86_64)."
fi
{
  echo "$header"
  echo "# Regenerate: tools/lock_requirements.sh${extra:+ $target}"
  echo "$body"
} > "$lock"
echo "lock_requirements: wrote $lock ($(echo "$body" | wc -l) packages)"
