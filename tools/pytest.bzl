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

def check_every_test_has_a_target(exclude = []):
    """Fails loading (so `bazel test //...` fails) when a `test_*.py` of this package is in no py_test's srcs.

    Call it last in every BUILD file that holds tests: a test file without a target would otherwise never run.
    The glob covers sub-folders that have no BUILD file of their own (they belong to this package).

    Args:
      exclude: test_*.py files that deliberately have no target.
    """
    listed = {}
    for rule in native.existing_rules().values():
        if rule["kind"] == "py_test":
            for src in rule["srcs"]:
                listed[src.split(":")[-1]] = True
    missing = [f for f in native.glob(["**/test_*.py"]) if f not in listed and f not in exclude]
    if missing:
        fail("%s: test files with no pytest_test target (add one, or they never run): %s" % (
            native.package_name(),
            ", ".join(missing),
        ))
