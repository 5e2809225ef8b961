"""Shared test set-up: 8 host CPU devices, so sharding is exercised as on an 8-chip host; a persistent XLA
compilation cache shared by every Bazel test target on the machine (a temporary one for a pytest session)."""
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
# trainer.train() call and every `python -m ctr.train` child builds its jitted steps anew, and most targets train
# the same tiny configs. So all Bazel test targets share one persistent XLA compilation cache in the system's
# temporary directory (child processes inherit it through the environment; it is not bounded, as jax's eviction
# needs the filelock package). An entry is keyed by the program, the XLA flags and the jax version, and a hit is
# the executable a compile would build, so no result depends on which target compiled it first; a torn entry read
# while another process writes it is a warning and a compile.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    if os.environ.get("TEST_TMPDIR"):  # under Bazel: one cache for every target and every run on this machine
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"ctr-tests-xla-{os.getuid()}")
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
