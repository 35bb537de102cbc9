"""Shared test setup: 8 fake CPU devices for sharding tests, deterministic host RNG."""
import os

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# XLA's C++ warnings (e.g. SPMD rematerialisation notes on tiny sharded test shapes) flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture
def np_rng():
    import numpy as np

    return np.random.default_rng(0)
