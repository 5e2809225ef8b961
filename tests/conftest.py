"""Shared test set-up: 8 host CPU devices, so sharding is exercised as on an 8-chip host; one persistent XLA
compilation cache per test target (Bazel's ``TEST_TMPDIR``) or pytest session."""
import atexit
import os
import shutil
import tempfile

import pytest

# Must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Compilation is most of a tiny run's time, and the tests compile the same programs again and again: every
# trainer.train() call and every `python -m ctr.train` child builds its jitted steps anew. Child processes inherit
# the cache through the environment. It starts empty for each target, so no target depends on another's.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    if os.environ.get("TEST_TMPDIR"):  # Bazel removes it
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["TEST_TMPDIR"], "xla_cache")
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ctr-tests-xla-")
        atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture
def clean_gin():
    """An empty gin config before and after the test (``pytestmark = pytest.mark.usefixtures("clean_gin")``)."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
