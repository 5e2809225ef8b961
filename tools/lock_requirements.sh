#!/usr/bin/env bash
# Rebuilds requirements.lock from requirements.txt in a throw-away Python 3.11 venv.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${CTR_PYTHON:-python3.11}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt
{
  echo "# Full lock: pip freeze of a venv built from requirements.txt on Python 3.11 (linux x86_64)."
  echo "# Regenerate: tools/lock_requirements.sh"
  "$tmp/venv/bin/pip" freeze
} > requirements.lock
