#!/bin/sh
echo "bazel coverage is not available offline in ctr" >&2
exit 1
