"""Shared test set-up: 8 host CPU devices, so sharding is exercised as on an 8-chip host."""
import os

import pytest

# Must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


@pytest.fixture
def clean_gin():
    """An empty gin config before and after the test (``pytestmark = pytest.mark.usefixtures("clean_gin")``)."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
