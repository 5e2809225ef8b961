"""`pytest_test`: a py_test whose main runs pytest over the given test files."""

def pytest_test(name, srcs, deps = [], data = [], args = [], size = "medium", **kwargs):
    """One Bazel test target running pytest over `srcs`.

    Args:
      name: target name.
      srcs: the test_*.py files (plus any helper modules they import).
      deps: py_library targets under test.
      data: extra runtime files.
      args: extra pytest arguments.
      size: Bazel test size (sets the timeout).
      **kwargs: passed to py_test (tags, shard_count, env...).
    """
    native.py_test(
        name = name,
        srcs = srcs + ["//tools:pytest_main.py"],
        main = "//tools:pytest_main.py",
        deps = deps,
        data = data + ["//tests:conftest.py"],
        args = args + ["$(location %s)" % s for s in srcs if s.split("/")[-1].startswith("test_")],
        size = size,
        python_version = "PY3",
        # Bazel's generated __init__.py files would make test folders packages, hiding shared test helpers
        # (models_testlib.py, ...) from pytest's rootdir-relative imports.
        legacy_create_init = False,
        **kwargs
    )
