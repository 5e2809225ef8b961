"""Entry point of every Bazel test target: runs pytest on the files given as arguments.

pytest's exit code 5 (no tests collected) is turned into a failure: a target that runs nothing is broken.
"""
import os
import sys

import pytest

if __name__ == "__main__":
    args = ["-q", "-p", "no:cacheprovider", "--rootdir", os.getcwd(), *sys.argv[1:]]
    code = pytest.main(args)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("pytest collected no tests: failing the target", file=sys.stderr)
        code = 1
    sys.exit(int(code))
